"""``precision="fp8"`` of ``expert_ffn``: both FFN GEMMs in float8 e4m3 with float32 accumulation.

Scheme (one definition; the reference emulates it, the kernels compute it):

* activations, per row (token): ``scale = amax(|row|) / 448`` (1 for an all-zero row),
  ``q = e4m3(row / scale)`` rounded to nearest even; ``row ~= q * scale``. h is quantized by the
  LN-modulate pre-pass itself (``triton_fwd._modulated_norm_fwd_kernel`` with QUANTIZE), the GELU
  output by the row-wise bias + GELU + quantize kernel below.
* weights, per output channel (a row of ``w1[e]`` / ``w2[e]``): the same formula, done once per
  weight version and cached (:class:`WeightCache`).
* GEMMs: ``torch._scaled_mm`` with row-wise scales (cuBLASLt / CUTLASS FP8 on sm_90) giving bf16;
  b1 + tanh-GELU + re-quantization run row-wise after GEMM1, b2 + gate + residual after GEMM2
  (the bf16 path's fused kernel). Off the GPU (CI, under TRITON_INTERPRET=1) the two GEMMs are
  emulated in float32 on the dequantized operands, so the Triton pieces are tested there too.

Supported by the kernel path: the shared FFN of the real checkpoints (``num_text_experts=0``),
bf16 inputs. Everything else in fp8 takes the reference's emulation (``backend="auto"``).
"""
from __future__ import annotations

import os
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl

from .._triton_utils import interpret_mode
from .triton_fwd import (QUANT_OF, _gelu_tanh, _quantize_row, _row_scale, _to_e4m3, _to_int8, gate_residual_fwd,
                         modulated_norm_fwd)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# cuBLASLt's "fast accumulation" keeps the FP8 tensor-core sums in their reduced-precision accumulator
# (no periodic promotion to float32). On by default: measured on the H200 (h200_s7, db11c38) it gives the same
# errors as the promoted sums (FFN op 1.13e-2 both; 5B step under "fp8-all" 1.5731e-2 vs 1.5730e-2 vs float32)
# and is faster (FFN op 5.115 vs 5.507 ms; step 0.871 vs 0.906 s). "0" in the environment variable turns it off.
FAST_ACCUM_ENV = "COGVIDEOX_KERNELS_FP8_FAST_ACCUM"


# --------------------------------------------------------------------------------------------
# reference quantization (plain PyTorch; tests and the reference path use it)
# --------------------------------------------------------------------------------------------
def quantize_rows(t: torch.Tensor):
    """(e4m3 values, float32 scales ``t.shape[:-1]``) of ``t``, one scale per row (last dim)."""
    amax = t.abs().amax(dim=-1).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (t.float() / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


def fp8_round_trip(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the FP8 path sees it: quantized per row and dequantized, in ``t``'s dtype."""
    return dequantize_rows(*quantize_rows(t), dtype=t.dtype)


# --------------------------------------------------------------------------------------------
# weights: quantized once per weight version
# --------------------------------------------------------------------------------------------
class WeightCache:
    """FP8 copies of weights (or what ``quantize`` makes: int8.py's cache holds int8 ones), one per
    storage, reused while the weight is unchanged.

    An entry is found through the weight's storage (its Python object, held weakly: a new tensor
    that the allocator places at a freed weight's address is a different storage and misses) and
    must match the view (offset, shape, strides, dtype) and the version counter (bumped by every
    in-place write, e.g. ``fuse_lora``'s ``weight += delta``, ``copy_``, ``load_state_dict``).
    A weight replaced through ``param.data = ...`` (offloading, LoRA fuse) is a new storage. An entry
    dies with its storage, so offloaded or per-call weights (unfused LoRA) leave nothing behind.
    """

    def __init__(self, quantize=None):
        self._quantize = quantize or quantize_weight  # w -> (quantized w, float32 scales per output channel)
        self._entries: dict[int, tuple] = {}
        self.quantizations = 0  # how many times a weight was quantized (tests read it)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, w: torch.Tensor):
        """(quantized ``w``, float32 scales ``w.shape[:-1]``) for ``w`` [..., out, in], per output channel."""
        storage = w.untyped_storage()
        key = id(storage)
        view = (w.storage_offset(), tuple(w.shape), w.stride(), w.dtype, w.device, w._version)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is storage and entry[1] == view:
            return entry[2]
        value = self._quantize(w)
        self.quantizations += 1
        entries = self._entries
        ref = weakref.ref(storage, lambda _, key=key: entries.pop(key, None))
        entries[key] = (ref, view, value)
        return value


def quantize_weight(w: torch.Tensor):
    """Per-output-channel e4m3 quantization of ``w`` [..., out, in] (contiguous outputs)."""
    with torch.no_grad():
        q, scale = quantize_rows(w)
    return q.contiguous(), scale.contiguous()


WEIGHTS = WeightCache()


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _gelu_tanh_fast(v):
    """gelu_tanh with an approximate division (MUFU.RCP + FMUL instead of an IEEE divide); the
    denominator is clamped to 1e30 so it stays in the approximate divide's range (v < -9 gives ~0)."""
    u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
    return tl.fdiv(v, 1.0 + tl.minimum(tl.exp(-2.0 * u), 1e30), ieee_rounding=False)


@triton.jit
def _bias_gelu_quant_fwd_kernel(y_ptr, bias_ptr, q_ptr, scale_ptr, N, HAS_BIAS: tl.constexpr, QUANT: tl.constexpr,
                                BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr, FAST: tl.constexpr = False,
                                GELU: tl.constexpr = True):
    """One row of GEMM1's output: gelu_tanh(y + b1) -> e4m3 or int8 (QUANT) with the row's scale
    (GEMM2's A operand). FAST: the pass is compute-bound with two IEEE divides and an F2I per element
    (H200: int8 0.87 ms = 1.5 TB/s); FAST takes GELU's divide approximate, multiplies by the row's
    reciprocal scale and rounds to int8 by the 1.5 * 2^23 add (round to nearest even, as rint) instead.
    GELU False: (y + b) quantized as it is (``quantize_rows_fwd``)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    v = tl.load(y_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v = v + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if not GELU:
        v = tl.where(mask, v, 0.0)
    elif FAST:
        v = tl.where(mask, _gelu_tanh_fast(v), 0.0)
    else:
        v = tl.where(mask, _gelu_tanh(v), 0.0)
    if FAST:
        scale = _row_scale(tl.max(tl.abs(v), axis=0), QUANT)
        x = v * (1.0 / scale)
        if QUANT == 2:
            x = tl.clamp(x, -127.0, 127.0) + 12582912.0  # the low bits now hold round(x), two's complement
            q = (x.to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)
        else:
            q = _to_e4m3(x, INTERPRET)
    else:
        q, scale = _quantize_row(v, mask, QUANT, INTERPRET)
    tl.store(scale_ptr + row, scale)
    tl.store(q_ptr + row * N + cols, q, mask=mask)


# The pass's launch: "row_fast" (one row per program, ``_bias_gelu_quant_fwd_kernel``'s FAST: the default) or
# "row" (IEEE GELU divide and scale division, rint). H200 (3c64d6f, 35552 x 12288 bf16 in): int8 0.655 vs
# 0.874 ms, e4m3 0.596 vs 0.630, bit-identical outputs on that input (benchmarks/results/h200_s7/). A chunked
# launch (rows per program, column chunks) did not pay (1168a00: int8 0.870 vs 0.874 ms, e4m3 0.745 vs 0.630;
# the pass is compute-bound) and lives in benchmarks/experiments/gelu_quant_sweep.py.
GELU_QUANT_CONFIG = "row_fast"
GELU_QUANT_LAUNCHES = ("row", "row_fast")


def bias_gelu_quant_fwd(y: torch.Tensor, bias, out_dtype=E4M3, config=None, gelu=True):
    """(gelu_tanh(y + bias) quantized per row to out_dtype (e4m3, or int8 for int8.py), float32 row
    scales) for y [rows, N] contiguous; ``gelu`` False: y + bias quantized as it is.
    ``config``: one of ``GELU_QUANT_LAUNCHES`` (default ``GELU_QUANT_CONFIG``)."""
    if y.dim() != 2 or not y.is_contiguous():
        raise ValueError(f"bias_gelu_quant_fwd: y must be a contiguous 2-D tensor, got shape {tuple(y.shape)} "
                         f"strides {y.stride()}")
    rows, N = y.shape
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous()):
        raise ValueError(f"bias_gelu_quant_fwd: bias must be contiguous of shape ({N},), got {tuple(bias.shape)}")
    if out_dtype not in QUANT_OF:
        raise ValueError(f"bias_gelu_quant_fwd: out_dtype must be one of {list(QUANT_OF)}, got {out_dtype}")
    q = torch.empty(rows, N, dtype=out_dtype, device=y.device)
    scale = torch.empty(rows, dtype=torch.float32, device=y.device)
    b = bias if bias is not None else y
    config = GELU_QUANT_CONFIG if config is None else config
    if config not in GELU_QUANT_LAUNCHES:
        raise ValueError(f"bias_gelu_quant_fwd: config must be one of {GELU_QUANT_LAUNCHES}, got {config!r}")
    block = triton.next_power_of_2(N)
    _bias_gelu_quant_fwd_kernel[(rows,)](y, b, q, scale, N, HAS_BIAS=bias is not None,
                                         QUANT=QUANT_OF[out_dtype], BLOCK_N=block, INTERPRET=interpret_mode(),
                                         FAST=config == "row_fast", GELU=bool(gelu),
                                         num_warps=4 if interpret_mode() else min(32, max(4, block // 512)))
    return q, scale


def quantize_rows_fwd(y: torch.Tensor, out_dtype=E4M3):
    """(y quantized per row to out_dtype, float32 row scales) for y [rows, N] contiguous: the kernel of
    ``bias_gelu_quant_fwd`` without bias and GELU (``quantize_rows``' formula; the default launch
    multiplies by the reciprocal scale, which may round a value at a midpoint the other way)."""
    return bias_gelu_quant_fwd(y, None, out_dtype, gelu=False)


def fp8_linear(a_q, a_scale, w_q, w_scale, out_dtype=torch.bfloat16, bias=None, out=None):
    """(a_q * a_scale[:, None]) @ (w_q * w_scale[:, None])^T (+ bias) with float32 accumulation, in
    out_dtype (written into ``out`` when given). a_q [M, K], w_q [N, K] e4m3; scales float32 [M], [N];
    bias [N] in out_dtype. CUDA: ``torch._scaled_mm`` row-wise (bias in its epilogue); elsewhere the
    same sum in float32 on the dequantized operands (what CI can run)."""
    if a_q.is_cuda:
        fast = os.environ.get(FAST_ACCUM_ENV, "1") not in ("", "0")
        kw = dict(scale_a=a_scale[:, None], scale_b=w_scale[None, :], bias=bias, out_dtype=out_dtype,
                  use_fast_accum=fast)
        if out is None:
            return torch._scaled_mm(a_q, w_q.t(), **kw)
        return torch._scaled_mm(a_q, w_q.t(), **kw, out=out)
    y = dequantize_rows(a_q, a_scale) @ dequantize_rows(w_q, w_scale).t()
    if bias is not None:
        y = y + bias.float()
    y = y.to(out_dtype)
    return y if out is None else out.copy_(y)


def expert_ffn_fp8_fwd(x, modulation, w1, b1, w2, b2, text_len, norm_weight, norm_bias, eps, cache=WEIGHTS):
    """The shared FFN (one expert) in FP8; inputs checked and contiguous. Returns a new tensor like x."""
    B, S, Hd = x.shape
    x2d = x.view(B * S, Hd)
    h_q, h_scale = modulated_norm_fwd(x2d, modulation, norm_weight, norm_bias, eps, S, text_len, E4M3)
    w1_q, w1_scale = cache.get(w1[0])
    w2_q, w2_scale = cache.get(w2[0])
    y = fp8_linear(h_q, h_scale, w1_q, w1_scale)  # [T, inner] bf16, before b1
    a_q, a_scale = bias_gelu_quant_fwd(y, None if b1 is None else b1[0])
    del y
    f = fp8_linear(a_q, a_scale, w2_q, w2_scale)  # [T, hidden] bf16, before b2
    return gate_residual_fwd(x2d, f, modulation, None if b2 is None else b2[0], S, text_len).view(B, S, Hd)


def supports(x, w1, num_text_experts, **_) -> str | None:
    """Why the FP8 kernel path cannot take these inputs (None: it can)."""
    if num_text_experts != 0:
        return ("precision='fp8' runs the shared FFN (num_text_experts=0) in the kernels; separate "
                "experts take the reference")
    if x.dtype != torch.bfloat16:
        return f"precision='fp8' kernels take bfloat16 x, not {x.dtype}"
    inner, hidden = w1.shape[1:]
    if x.is_cuda:
        if torch.cuda.get_device_capability(x.device) < (9, 0):
            return "precision='fp8' needs row-wise FP8 GEMMs: a GPU of sm_90 or newer"
        if hidden % 16 or inner % 16:
            return f"FP8 GEMMs need hidden ({hidden}) and inner ({inner}) sizes divisible by 16"
    return None


@torch.library.custom_op("cogvideox_kernels::expert_ffn_fp8", mutates_args=())
def expert_ffn_fp8_op(x: torch.Tensor, modulation: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                      w2: torch.Tensor, b2: Optional[torch.Tensor], text_len: int, norm_weight: Optional[torch.Tensor],
                      norm_bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return expert_ffn_fp8_fwd(x, modulation, w1, b1, w2, b2, text_len, norm_weight, norm_bias, eps)


@expert_ffn_fp8_op.register_fake
def _expert_ffn_fp8_fake(x, modulation, w1, b1, w2, b2, text_len, norm_weight, norm_bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
