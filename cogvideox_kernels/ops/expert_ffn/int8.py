"""``precision="int8"`` of ``expert_ffn``: both FFN GEMMs in int8 with int32 accumulation.

Scheme (one definition; the reference emulates it, the kernels compute it):

* activations, per row (token): ``scale = amax(|row|) / 127`` (1 for an all-zero row),
  ``q = round(row / scale)`` to nearest even, in [-127, 127]; ``row ~= q * scale``. h is quantized by
  the LN-modulate pre-pass itself (``triton_fwd._modulated_norm_fwd_kernel``), the GELU output by
  fp8.py's row-wise bias + GELU + quantize kernel (its int8 target).
* weights, per output channel (a row of ``w1[e]`` / ``w2[e]``): the same formula, once per weight
  version, cached (:class:`fp8.WeightCache` with the int8 quantizer).
* GEMMs: one Triton kernel (``tl.dot`` on int8 operands, int32 accumulator: ``wgmma`` s8 on sm_90,
  ``mma`` s8 on sm_80) whose epilogue dequantizes (row scale x column scale) in float32, so no int32
  tensor reaches memory. GEMM1's epilogue stores the dequantized product in bf16 (b1 + GELU + the
  re-quantization need the row's amax over all of N, so they run in the row-wise kernel after it);
  GEMM2's adds b2, multiplies by the modality gate and adds the residual x (the bf16 path's epilogue).

Compared with e4m3 (3 mantissa bits, ~2.5% rms per element), round-to-nearest int8 on a row scaled
to its amax errs ~0.23% of amax rms per element, which is smaller for all but the largest values
of a row; see benchmarks/results/fp8_ffn_notes.md for the measured error ratios.

Supported by the kernel path: the shared FFN of the real checkpoints (``num_text_experts=0``),
bf16 inputs. Everything else in int8 takes the reference's emulation (``backend="auto"``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._triton_utils import ensure_tma_allocator, interpret_mode, store_cast, tma_aligned
from .fp8 import WeightCache, bias_gelu_quant_fwd
from .triton_fwd import _ffn_epilogue, modulated_norm_fwd

INT8_MAX = 127.0
EPILOGUE_STORE = 0  # C = the dequantized product, in C's dtype (GEMM1)
EPILOGUE_GATE_RESIDUAL = 1  # C = x + gate_m * (product + b2) (GEMM2; triton_fwd's epilogue)


# --------------------------------------------------------------------------------------------
# reference quantization (plain PyTorch; tests and the reference path use it)
# --------------------------------------------------------------------------------------------
def quantize_rows(t: torch.Tensor):
    """(int8 values, float32 scales ``t.shape[:-1]``) of ``t``, one scale per row (last dim)."""
    tf = t.float()
    amax = tf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(tf / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


def int8_round_trip(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the int8 path sees it: quantized per row and dequantized, in ``t``'s dtype."""
    return dequantize_rows(*quantize_rows(t), dtype=t.dtype)


def quantize_weight(w: torch.Tensor):
    """Per-output-channel int8 quantization of ``w`` [..., out, in] (contiguous outputs)."""
    with torch.no_grad():
        q, scale = quantize_rows(w)
    return q.contiguous(), scale.contiguous()



def kernel_emulation(x, modulation, w1, b1, w2, b2, *, text_len, norm_weight=None, norm_bias=None, eps=1e-5):
    """What the int8 kernels compute for the shared FFN, in float32 with their bf16 roundings (GEMM1's
    product, the output) on top of the reference's emulation; tests and benchmarks compare against it."""
    from .reference import modulated_norm_reference

    up = lambda t: None if t is None else t.float()  # noqa: E731
    bf = lambda t: t.bfloat16().float()  # noqa: E731
    h, gate = modulated_norm_reference(up(x), up(modulation), text_len, up(norm_weight), up(norm_bias), eps)
    y = bf(int8_round_trip(h) @ int8_round_trip(up(w1[0])).t())
    a = int8_round_trip(torch.nn.functional.gelu(y if b1 is None else y + up(b1[0]), approximate="tanh"))
    f = a @ int8_round_trip(up(w2[0])).t()
    return bf(up(x) + gate * (f if b2 is None else f + up(b2[0]))).to(x.dtype)


WEIGHTS = WeightCache(quantize_weight)


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _int8_gemm_fwd_kernel(a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, c_ptr, bias_ptr, x_ptr, mod_ptr,
                          M, N, K, seq_len, text_len,
                          EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          EPILOGUE_SUBTILE: tl.constexpr, INTERPRET: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of epilogue((A @ B^T) * a_scale[:, None] * b_scale[None, :]).

    A [M, K] int8 (a row per token), B [N, K] int8 (nn.Linear layout), both K-contiguous; the sum
    stays int32 in registers and is dequantized (row scale x column scale) in float32 there."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M swizzle: bands of GROUP_M m-tiles walk the n-tiles together (B tiles reused from L2)
    band_tiles = GROUP_M * num_n
    first_m = (pid // band_tiles) * GROUP_M
    band_m = tl.minimum(num_m - first_m, GROUP_M)
    m_tile = first_m + (pid % band_tiles) % band_m
    n_tile = (pid % band_tiles) // band_m
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    rows64 = rows.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    if TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        if TMA:  # out-of-bounds rows / columns / k come in as zeros
            a = a_desc.load([m_tile * BLOCK_M, k])
            b = b_desc.load([n_tile * BLOCK_N, k])
        else:
            ks = k + offs_k
            a = tl.load(a_ptr + rows64[:, None] * K + ks[None, :], mask=row_mask[:, None] & (ks[None, :] < K), other=0)
            b = tl.load(b_ptr + cols.to(tl.int64)[:, None] * K + ks[None, :],
                        mask=col_mask[:, None] & (ks[None, :] < K), other=0)
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)

    if EPILOGUE_SUBTILE:  # two [BLOCK_M, BLOCK_N / 2] halves: fewer live registers in the epilogue
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        cols0 = n_tile * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        _int8_epilogue(acc0, rows64, row_mask, cols0, N, a_scale_ptr, b_scale_ptr, c_ptr, bias_ptr, x_ptr, mod_ptr,
                       seq_len, text_len, EPILOGUE, HAS_BIAS, INTERPRET)
        _int8_epilogue(acc1, rows64, row_mask, cols0 + BLOCK_N // 2, N, a_scale_ptr, b_scale_ptr, c_ptr, bias_ptr,
                       x_ptr, mod_ptr, seq_len, text_len, EPILOGUE, HAS_BIAS, INTERPRET)
    else:
        _int8_epilogue(acc, rows64, row_mask, cols, N, a_scale_ptr, b_scale_ptr, c_ptr, bias_ptr, x_ptr, mod_ptr,
                       seq_len, text_len, EPILOGUE, HAS_BIAS, INTERPRET)


@triton.jit
def _int8_epilogue(acc, rows, row_mask, cols, N, a_scale_ptr, b_scale_ptr, c_ptr, bias_ptr, x_ptr, mod_ptr,
                   seq_len, text_len, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    col_mask = cols < N
    a_scale = tl.load(a_scale_ptr + rows, mask=row_mask, other=0.0)
    b_scale = tl.load(b_scale_ptr + cols, mask=col_mask, other=0.0)
    out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if EPILOGUE == 0:
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], store_cast(out, c_ptr.dtype.element_ty, INTERPRET),
                 mask=row_mask[:, None] & col_mask[None, :])
    else:  # + b2, * gate_m, + x (rows are tokens; no router scale)
        _ffn_epilogue(out, rows, row_mask, rows, cols, N, c_ptr, bias_ptr, 0, x_ptr, mod_ptr, a_scale_ptr,
                      seq_len, text_len, 1, HAS_BIAS, False, INTERPRET)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1,
                        epilogue_subtile=True, tma=True)
# Not measured yet (no GPU in the session that wrote it): the bf16 kernel's tile with twice its K depth
# (same bytes per stage); benchmarks/bench_fp8_ffn.py --int8-sweep times alternatives.
GPU_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3,
                  epilogue_subtile=True, tma=True)


def int8_linear_fwd(a_q, a_scale, w_q, w_scale, out, *, epilogue=EPILOGUE_STORE, bias=None, x=None,
                    modulation=None, seq_len=1, text_len=0, config=None):
    """out = epilogue((a_q * a_scale[:, None]) @ (w_q * w_scale[:, None])^T), int32 sums, float32 dequantization.

    a_q [M, K], w_q [N, K] int8, contiguous; a_scale [M], w_scale [N] float32; out [M, N].
    EPILOGUE_STORE: out = the product. EPILOGUE_GATE_RESIDUAL: out = x + gate_m * (product + bias),
    x [M, N] (M = B * seq_len tokens), modulation [B, 6, N]."""
    M, K = a_q.shape
    N = w_q.shape[0]
    cfg = dict(INTERPRET_CONFIG if interpret_mode() else GPU_CONFIG)
    cfg.update(config or {})
    tma = cfg["tma"] and tma_aligned(a_q, w_q) and (
        interpret_mode() or torch.cuda.get_device_capability(a_q.device) >= (9, 0))
    if tma:
        ensure_tma_allocator()
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _int8_gemm_fwd_kernel[grid](
        a_q, w_q, a_scale, w_scale, out, bias if bias is not None else out, x if x is not None else out,
        modulation if modulation is not None else out, M, N, K, seq_len, text_len,
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, TMA=tma, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], EPILOGUE_SUBTILE=cfg["epilogue_subtile"], INTERPRET=interpret_mode(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def expert_ffn_int8_fwd(x, modulation, w1, b1, w2, b2, text_len, norm_weight, norm_bias, eps, cache=WEIGHTS,
                        config1=None, config2=None):
    """The shared FFN (one expert) in int8; inputs checked and contiguous. Returns a new tensor like x."""
    B, S, Hd = x.shape
    T = B * S
    x2d = x.view(T, Hd)
    h_q, h_scale = modulated_norm_fwd(x2d, modulation, norm_weight, norm_bias, eps, S, text_len, torch.int8)
    w1_q, w1_scale = cache.get(w1[0])
    w2_q, w2_scale = cache.get(w2[0])
    y = torch.empty(T, w1_q.shape[0], dtype=x.dtype, device=x.device)  # GEMM1's product, before b1
    int8_linear_fwd(h_q, h_scale, w1_q, w1_scale, y, config=config1)
    a_q, a_scale = bias_gelu_quant_fwd(y, None if b1 is None else b1[0], torch.int8)
    del y
    out = torch.empty_like(x2d)
    int8_linear_fwd(a_q, a_scale, w2_q, w2_scale, out, epilogue=EPILOGUE_GATE_RESIDUAL,
                    bias=None if b2 is None else b2[0], x=x2d, modulation=modulation, seq_len=S, text_len=text_len,
                    config=config2)
    return out.view(B, S, Hd)


def supports(x, w1, num_text_experts, **_) -> str | None:
    """Why the int8 kernel path cannot take these inputs (None: it can)."""
    if num_text_experts != 0:
        return ("precision='int8' runs the shared FFN (num_text_experts=0) in the kernels; separate "
                "experts take the reference")
    if x.dtype != torch.bfloat16:
        return f"precision='int8' kernels take bfloat16 x, not {x.dtype}"
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
        return "precision='int8' needs int8 tensor-core dots: a GPU of sm_80 or newer"
    return None


@torch.library.custom_op("cogvideox_kernels::expert_ffn_int8", mutates_args=())
def expert_ffn_int8_op(x: torch.Tensor, modulation: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                       w2: torch.Tensor, b2: Optional[torch.Tensor], text_len: int,
                       norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                       eps: float) -> torch.Tensor:
    return expert_ffn_int8_fwd(x, modulation, w1, b1, w2, b2, text_len, norm_weight, norm_bias, eps)


@expert_ffn_int8_op.register_fake
def _expert_ffn_int8_fake(x, modulation, w1, b1, w2, b2, text_len, norm_weight, norm_bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
