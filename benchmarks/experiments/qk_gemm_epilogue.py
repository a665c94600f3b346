"""Experiment (issue 13, did not ship): the attention's QK-LayerNorm + RoPE pre-pass folded into the q/k GEMM's
epilogue.

Today the fused attention half runs to_q / to_k as cuBLAS ``addmm``s into a token-major [3, B*S, inner]
buffer, then ``qk_norm_rope_fwd`` reads q and k back, norms each head's D channels, rotates the video
tokens, writes head-major [B, H, S, D] and reduces the per-head max squared row norm (the Hopper
kernel's score bound). Here one Triton GEMM, y = h @ W^T + b for W = to_q, to_k or both stacked
(N = P * H * D), does that work on its float32 tile before anything is stored:

* per (token, head) of a BLOCK_M x BLOCK_N tile (BLOCK_N a multiple of D, split into heads in
  registers): LayerNorm over D in float32 of the accumulator + bias (no bf16 rounding in between,
  unlike the unfused path), norm weight + bias, interleaved RoPE on video tokens (cos/sin tables
  [S - text_len, D]); tiles may straddle the text/video boundary, two (or, for S < BLOCK_M, more)
  samples and the q/k boundary of a stacked weight;
* stores bf16 head-major ``y[P, B, H, S, D]`` (``y[p]`` is what the attention kernel reads);
* ``norm_max[p, b * H + h]`` = max over tokens of ||y||^2 of the **stored** (bf16) rows, by one
  atomic max per (head, sample) of a tile into a zeroed float32 [P, B * H]. (The shipped pre-pass takes
  the norm of the float32 row before its cast; the rounded row's is the quantity the attention's
  score bound is about.)

EPILOGUE_BIAS (0) is the same GEMM with a plain bias epilogue into a token-major [M, N] (what addmm
writes), to separate GEMM speed from the epilogue's cost.

Result (H200, commit 187010d, CogVideoX-5B shape; benchmarks/results/h200_s6/qk_gemm_probe_187010d.log and
step_qk_187010d.md): it loses. Per layer, (a) today's two cuBLAS addmm + pre-pass 2.439 ms; the best fused
config (b) 2.437 ms (128x256x64 w8 s3 persistent, one launch over the stacked weight), GPU_CONFIG below (two
launches, one per projection, as the wiring ran it) 2.899 ms; the plain bias-epilogue GEMM (c) 2.131-2.576 ms
vs cuBLAS's 1.956 ms, >= 9% slower, so the GEMM itself gives back what the epilogue saves. 5B step with the
front wired in: 1119.0 ms vs 1096.4 ms without (same error 1.468e-2). So the wiring (a switch in the fused
attention half, custom ops around it, a bench step variant) was taken out of the package again; the kernel,
launcher and reference live only here (``benchmarks/results/attention_half_notes.md``, last sections).

Run the GPU probe (H200, ~3 minutes): ``PYTHONPATH=$PWD python3 benchmarks/experiments/qk_gemm_epilogue.py
--out $OUT``; ``--offline`` compiles every config for sm_90a without a GPU and prints registers / spills;
``--dry-run`` (with TRITON_INTERPRET=1) runs the probe's code on CPU at a tiny shape.
CPU checks: tests/experiments/test_qk_gemm_epilogue.py (interpreter).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from cogvideox_kernels.ops._triton_utils import ensure_tma_allocator, interpret_mode, store_cast  # noqa: E402
from cogvideox_kernels.ops.attention.reference import apply_rope_interleaved  # noqa: E402

EPILOGUE_BIAS = 0
EPILOGUE_NORM_ROPE = 1


# ----------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _head_epilogue(x, gh, rows, y_ptr, bias_ptr, lnw_ptr, lnb_ptr, cos_ptr, sin_ptr,
                   norm_max_ptr, M, N, S, H, B, text_len, eps, stride_cs,
                   EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LN_W: tl.constexpr,
                   HAS_LN_B: tl.constexpr, HAS_ROPE: tl.constexpr, NORM_MAX: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
    """One head's [BLOCK_M, D] float32 accumulator ``x`` (global head ``gh`` of the P * H stacked heads) for
    the tokens ``rows`` of the flattened [B * S] (a tile may cover several samples)."""
    row_ok = rows < M
    sample = rows // S
    tok = rows - sample * S
    offs_d = tl.arange(0, D)
    head_ok = gh < N // D
    mask = row_ok[:, None] & head_ok
    if HAS_BIAS:
        x = x + tl.load(bias_ptr + gh * D + offs_d, mask=(offs_d < D) & head_ok, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 0:  # plain bias epilogue, token-major [M, N]
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + gh * D + offs_d[None, :],
                 store_cast(x, y_ptr.dtype.element_ty, INTERPRET), mask=mask)
        return
    part = gh // H
    h = gh - part * H
    # LayerNorm over the head's D channels, as _qk_norm_rope_fwd_kernel computes it (float32)
    mean = tl.sum(x, axis=1) / D
    centered = x - mean[:, None]
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
    x = centered * rstd[:, None]
    if HAS_LN_W:
        x = x * tl.load(lnw_ptr + part * D + offs_d, mask=(offs_d < D) & head_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LN_B:
        x = x + tl.load(lnb_ptr + part * D + offs_d, mask=(offs_d < D) & head_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_ROPE:  # text rows read cos 1, sin 0 (unrotated); pairs (2i, 2i+1) rotate together
        video = row_ok & (tok >= text_len)
        t_offs = (tok - text_len).to(tl.int64)[:, None] * stride_cs + offs_d[None, :]
        t_mask = video[:, None] & (offs_d < D)[None, :]
        cos = tl.load(cos_ptr + t_offs, mask=t_mask, other=1.0)
        sin = tl.load(sin_ptr + t_offs, mask=t_mask, other=0.0)
        even, odd = tl.split(tl.reshape(x, [BLOCK_M, D // 2, 2]))
        x = x * cos + tl.reshape(tl.join(-odd, even), [BLOCK_M, D]) * sin
    yq = store_cast(x, y_ptr.dtype.element_ty, INTERPRET)
    # y[part, b, h, s, :] of a [P, B, H, S, D] tensor
    head_base = (part * B * H + h).to(tl.int64) * S * D
    row_offs = (sample * H * S + tok).to(tl.int64) * D
    tl.store(y_ptr + head_base + row_offs[:, None] + offs_d[None, :], yq, mask=mask)
    if NORM_MAX:  # of the stored rows; one atomic per sample the tile touches
        yr = yq.to(tl.float32)
        norms = tl.where(row_ok, tl.sum(yr * yr, axis=1), 0.0)
        first = tl.min(tl.where(row_ok, sample, B), axis=0)
        last = tl.max(tl.where(row_ok, sample, -1), axis=0)
        for b in range(first, last + 1):
            m = tl.max(tl.where(sample == b, norms, 0.0), axis=0)
            tl.atomic_max(norm_max_ptr + (part * B + b) * H + h, m, mask=head_ok)


@triton.jit
def _heads(x, gh, rows, y_ptr, bias_ptr, lnw_ptr, lnb_ptr, cos_ptr, sin_ptr, norm_max_ptr, M, N, S, H, B,
           text_len, eps, stride_cs, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LN_W: tl.constexpr,
           HAS_LN_B: tl.constexpr, HAS_ROPE: tl.constexpr, NORM_MAX: tl.constexpr, D: tl.constexpr,
           BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, INTERPRET: tl.constexpr):
    """The epilogue of a [BLOCK_M, WIDTH] accumulator, one head (D columns) at a time: halved in registers
    until a head is left (fewer live registers than the whole tile at once)."""
    if WIDTH == D:
        _head_epilogue(x, gh, rows, y_ptr, bias_ptr, lnw_ptr, lnb_ptr, cos_ptr, sin_ptr, norm_max_ptr, M, N, S,
                       H, B, text_len, eps, stride_cs, EPILOGUE, HAS_BIAS, HAS_LN_W, HAS_LN_B, HAS_ROPE,
                       NORM_MAX, D, BLOCK_M, INTERPRET)
    else:
        left, right = tl.split(tl.permute(tl.reshape(x, (BLOCK_M, 2, WIDTH // 2)), (0, 2, 1)))
        _heads(left, gh, rows, y_ptr, bias_ptr, lnw_ptr, lnb_ptr, cos_ptr, sin_ptr, norm_max_ptr, M, N, S, H,
               B, text_len, eps, stride_cs, EPILOGUE, HAS_BIAS, HAS_LN_W, HAS_LN_B, HAS_ROPE, NORM_MAX, D,
               BLOCK_M, WIDTH // 2, INTERPRET)
        _heads(right, gh + WIDTH // (2 * D), rows, y_ptr, bias_ptr, lnw_ptr, lnb_ptr, cos_ptr, sin_ptr,
               norm_max_ptr, M, N, S, H, B, text_len, eps, stride_cs, EPILOGUE, HAS_BIAS, HAS_LN_W, HAS_LN_B,
               HAS_ROPE, NORM_MAX, D, BLOCK_M, WIDTH // 2, INTERPRET)


@triton.jit
def _qk_gemm_fwd_kernel(
        a_ptr, w_ptr, bias_ptr, y_ptr, lnw_ptr, lnb_ptr, cos_ptr, sin_ptr, norm_max_ptr,
        M, N, K, S, H, B, text_len, eps, stride_cs, num_programs,
        EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr,
        HAS_ROPE: tl.constexpr, NORM_MAX: tl.constexpr, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr, INTERPRET: tl.constexpr):
    """y = epilogue(a @ w^T) for a [M, K] (M = B * S tokens) and w [N, K] (N = P * H * D), both
    contiguous and read by TMA. Programs walk the tiles persistently (num_programs < tiles) or take one
    each, GROUP_M-swizzled for L2 reuse of w (as expert_ffn's grouped GEMM)."""
    tl.static_assert(BLOCK_N % D == 0, "a tile holds whole heads")
    HPT: tl.constexpr = BLOCK_N // D
    tl.static_assert(HPT & (HPT - 1) == 0, "a power of two of heads per tile")
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    offs_m = tl.arange(0, BLOCK_M)
    for tile in tl.range(pid, num_m * num_n, num_programs, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        band = tile // (GROUP_M * num_n)
        first_m = band * GROUP_M
        band_m = tl.minimum(num_m - first_m, GROUP_M)
        m_tile = first_m + (tile % (GROUP_M * num_n)) % band_m
        n_tile = (tile % (GROUP_M * num_n)) // band_m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):  # out-of-bounds rows / columns / k read as zero
            a = a_desc.load([m_tile * BLOCK_M, k])
            w = w_desc.load([n_tile * BLOCK_N, k])
            if INTERPRET:  # bf16 arithmetic is wrong in the interpreter
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32).T, acc)
            else:
                acc = tl.dot(a, w.T, acc)
        rows = m_tile * BLOCK_M + offs_m
        _heads(acc, n_tile * HPT, rows, y_ptr, bias_ptr, lnw_ptr, lnb_ptr, cos_ptr, sin_ptr, norm_max_ptr, M, N,
               S, H, B, text_len, eps, stride_cs, EPILOGUE, HAS_BIAS, HAS_LN_W, HAS_LN_B, HAS_ROPE, NORM_MAX, D,
               BLOCK_M, BLOCK_N, INTERPRET)


# --------------------------------------------------------------------------------------------------- launcher
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1,
                        num_programs=3, warp_specialize=False, flatten=False)
GPU_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4,
                  num_programs=None, warp_specialize=False, flatten=False)
# head_dim 128: the 128 x 128 tile's epilogue (one head of 128 columns) spills offline (255 registers + 148 B);
# 64 x 128 with 8 warps does not (196 registers). Untimed: the probe times head_dim 64 only.
GPU_CONFIG_D128 = dict(GPU_CONFIG, BLOCK_M=64)


def _config(config, head_dim=64):
    cfg = dict(INTERPRET_CONFIG if interpret_mode() else GPU_CONFIG_D128 if head_dim == 128 else GPU_CONFIG)
    cfg.update(config or {})
    return cfg


def _num_programs(cfg, tiles, device):
    n = cfg.get("num_programs")
    if n is None:
        return tiles
    if isinstance(n, str):  # "sms", "2sms": programs per SM
        n = int(n[:-3] or 1) * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, int(n)))


def qk_gemm_fwd(h, weight, bias, *, seq_len, num_heads, head_dim=64, text_len=0, norm_weight=None,
                norm_bias=None, cos=None, sin=None, eps=1e-6, norm_max=None, epilogue=EPILOGUE_NORM_ROPE,
                config=None, out=None):
    """y = epilogue(h @ weight^T + bias).

    h [B * S, K] (S = ``seq_len``); weight [N, K] = P stacked [H * D, K] projections (H = ``num_heads``,
    D = ``head_dim``; P = 1: to_q or to_k, P = 2: both); bias [N] or None. ``epilogue``:

    * EPILOGUE_NORM_ROPE: returns y [P, B, H, S, D] (contiguous, head-major: ``y[p].transpose(1, 2)``
      is the [B, S, H, D] view the pre-pass returns), LayerNorm per (token, head) with norm_weight /
      norm_bias [P, D] (or None), RoPE on the video tokens with cos / sin [S - text_len, D] float32 (or
      None); with ``norm_max`` (a zeroed float32 [P, B * H]), its max squared row norm per head by atomic
      max.
    * EPILOGUE_BIAS: returns y [B * S, N] = h @ weight^T + bias (what addmm gives), nothing else.

    ``out``: where to write y (a contiguous tensor of y's shape and h's dtype), e.g. ``y[p:p + 1]`` of a
    stacked result written by one launch per projection. Non-contiguous arguments are copied contiguous
    first (the kernel reads h and weight by TMA).
    """
    def need(name, t, ndim, shape=None, dtypes=None):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            raise ValueError(f"qk_gemm_fwd: {name} must be a {ndim}-d tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"qk_gemm_fwd: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if dtypes is not None and t.dtype not in dtypes:
            raise ValueError(f"qk_gemm_fwd: {name} has dtype {t.dtype}, supported: {dtypes}")
        if t.device != h.device:
            raise ValueError(f"qk_gemm_fwd: {name} is on {t.device}, h on {h.device}")
        return t.contiguous()

    half = (torch.bfloat16, torch.float16)
    h = need("h", h, 2, dtypes=half)
    M, K = h.shape
    weight = need("weight", weight, 2, dtypes=(h.dtype,))
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"qk_gemm_fwd: weight has shape {tuple(weight.shape)}, h has K={K} columns")
    if K % 8:
        raise ValueError(f"qk_gemm_fwd: K={K} must be a multiple of 8 (16-byte TMA rows)")
    if bias is not None:
        bias = need("bias", bias, 1, (N,))
    if not isinstance(seq_len, int) or seq_len < 1 or M % seq_len:
        raise ValueError(f"qk_gemm_fwd: seq_len={seq_len!r} must be a positive int dividing h's {M} rows")
    S, B = seq_len, M // seq_len
    if not isinstance(text_len, int) or not 0 <= text_len <= S:
        raise ValueError(f"qk_gemm_fwd: text_len={text_len!r} must be an int in [0, seq_len={S}]")
    if epilogue not in (EPILOGUE_BIAS, EPILOGUE_NORM_ROPE):
        raise ValueError(f"qk_gemm_fwd: epilogue={epilogue!r}; supported: EPILOGUE_BIAS (0), EPILOGUE_NORM_ROPE (1)")
    cfg = _config(config, head_dim)
    D, H = head_dim, num_heads
    if not isinstance(D, int) or D < 16 or D & (D - 1):
        raise ValueError(f"qk_gemm_fwd: head_dim={D!r} must be a power of two >= 16")
    if not isinstance(H, int) or H < 1:
        raise ValueError(f"qk_gemm_fwd: num_heads={H!r} must be a positive int")
    if cfg["BLOCK_N"] % D or cfg["BLOCK_N"] // D not in (1, 2, 4):
        raise ValueError(f"qk_gemm_fwd: config BLOCK_N={cfg['BLOCK_N']} must be 1, 2 or 4 heads of head_dim={D}")
    P = N // (H * D)
    if P * H * D != N or P not in (1, 2):
        raise ValueError(f"qk_gemm_fwd: weight's N={N} rows must be P * num_heads * head_dim with P 1 or 2 "
                         f"(num_heads={H}, head_dim={D})")
    if epilogue == EPILOGUE_NORM_ROPE:
        norm_weight = None if norm_weight is None else need("norm_weight", norm_weight, 2, (P, D))
        norm_bias = None if norm_bias is None else need("norm_bias", norm_bias, 2, (P, D))
        if (cos is None) != (sin is None):
            raise ValueError("qk_gemm_fwd: cos and sin must be given together (or both None)")
        if cos is not None:
            cos = need("cos", cos, 2, (S - text_len, D), (torch.float32,))
            sin = need("sin", sin, 2, (S - text_len, D), (torch.float32,))
        if norm_max is not None:
            if (norm_max.dtype != torch.float32 or tuple(norm_max.shape) != (P, B * H)
                    or not norm_max.is_contiguous() or norm_max.device != h.device):
                raise ValueError(f"qk_gemm_fwd: norm_max must be a contiguous float32 [{P}, {B * H}] tensor on "
                                 f"{h.device} (zeroed), got {norm_max.dtype} {tuple(norm_max.shape)}")
    else:
        norm_weight = norm_bias = cos = sin = norm_max = None
    shape = (M, N) if epilogue == EPILOGUE_BIAS else (P, B, H, S, D)
    if out is None:
        y = torch.empty(shape, dtype=h.dtype, device=h.device)
    elif (not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != h.dtype
          or out.device != h.device or not out.is_contiguous()):
        raise ValueError(f"qk_gemm_fwd: out must be a contiguous {h.dtype} tensor of shape {shape} on {h.device}, got "
                         f"{(out.dtype, tuple(out.shape), out.device) if isinstance(out, torch.Tensor) else out!r}")
    else:
        y = out
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    programs = _num_programs(cfg, tiles, h.device)
    ensure_tma_allocator()
    dummy = y
    _qk_gemm_fwd_kernel[(programs,)](
        h, weight, bias if bias is not None else dummy, y,
        norm_weight if norm_weight is not None else dummy, norm_bias if norm_bias is not None else dummy,
        cos if cos is not None else dummy, sin if sin is not None else dummy,
        norm_max if norm_max is not None else dummy,
        M, N, K, S, H, B, text_len, eps, cos.stride(0) if cos is not None else 0, programs,
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, HAS_LN_W=norm_weight is not None,
        HAS_LN_B=norm_bias is not None, HAS_ROPE=cos is not None, NORM_MAX=norm_max is not None, D=D,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        WARP_SPECIALIZE=cfg["warp_specialize"], FLATTEN=cfg["flatten"], INTERPRET=interpret_mode(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


# -------------------------------------------------------------------------------------------------- reference
def qk_gemm_reference(h, weight, bias, *, seq_len, num_heads, head_dim=64, text_len=0, norm_weight=None,
                      norm_bias=None, cos=None, sin=None, eps=1e-6, dtype=torch.float64):
    """``qk_gemm_fwd``'s EPILOGUE_NORM_ROPE result in ``dtype``: [P, B, H, S, D]."""
    M, K = h.shape
    N = weight.shape[0]
    S, B, H, D = seq_len, M // seq_len, num_heads, head_dim
    P = N // (H * D)
    x = h.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        x = x + bias.to(dtype)
    x = x.view(B, S, P, H, D)
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    x = (x - mean) / torch.sqrt(var + eps)
    if norm_weight is not None:
        x = x * norm_weight.to(dtype).view(1, 1, P, 1, D)
    if norm_bias is not None:
        x = x + norm_bias.to(dtype).view(1, 1, P, 1, D)
    if cos is not None and S > text_len:
        video = apply_rope_interleaved(x[:, text_len:].reshape(B, S - text_len, P * H, D), cos, sin)
        x = torch.cat((x[:, :text_len], video.to(dtype).view(B, S - text_len, P, H, D)), dim=1)
    return x.permute(2, 0, 3, 1, 4).contiguous()


def norm_max_of(y):
    """float64 [P, B * H] max over tokens of ||y[p, b, h, s]||^2, from an output [P, B, H, S, D]."""
    P, B, H = y.shape[:3]
    return y.double().square().sum(-1).amax(-1).reshape(P, B * H)


# The probe's sweep. num_programs None: one tile per program; "sms" / "2sms": one / two programs per SM,
# persistent. Offline (sm_90a, 5B specialization, no spills in any): 128x128 w8 177 registers (bias epilogue
# 110), 128x256 w8 246 (170), 64x128 w4 178 (110; 98 KB shared memory: two CTAs per SM, so one's epilogue
# runs under the other's main loop). 128x64 with 4 warps spilled (not in the sweep).
PROBE_CONFIGS = [
    GPU_CONFIG,
    dict(GPU_CONFIG, num_programs="sms"),
    dict(GPU_CONFIG, num_programs="sms", flatten=True),
    dict(GPU_CONFIG, num_stages=3),
    dict(GPU_CONFIG, BLOCK_N=256, num_stages=3),
    dict(GPU_CONFIG, BLOCK_N=256, num_stages=3, num_programs="sms"),
    dict(GPU_CONFIG, BLOCK_M=64, num_warps=4),
    dict(GPU_CONFIG, BLOCK_M=64, num_warps=4, num_programs="2sms"),
    dict(GPU_CONFIG, num_programs="sms", warp_specialize=True),
]


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


# ----------------------------------------------------------------------------------------------- offline check
def compile_offline(config=None, epilogue=EPILOGUE_NORM_ROPE, rope=True, head_dim=64):
    """Compile the kernel for sm_90a without a GPU; returns the CompiledKernel (asm: ttgir, ptx, cubin)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = dict(GPU_CONFIG, **(config or {}))
    sig = {"a_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16", "lnw_ptr": "*bf16",
           "lnb_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "norm_max_ptr": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "S": "i32", "H": "i32", "B": "i32", "text_len": "i32",
           "eps": "fp32", "stride_cs": "i32", "num_programs": "i32"}
    constexprs = dict(EPILOGUE=epilogue, HAS_BIAS=True, HAS_LN_W=True, HAS_LN_B=True, HAS_ROPE=rope,
                      NORM_MAX=epilogue == EPILOGUE_NORM_ROPE, D=head_dim, BLOCK_M=cfg["BLOCK_M"],
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                      WARP_SPECIALIZE=cfg["warp_specialize"], FLATTEN=cfg["flatten"], INTERPRET=False)
    # what the launch at the 5B shape specializes: pointers, M, N, K, S, H, stride_cs divisible by 16
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in names if n.endswith("_ptr") or n in ("M", "N", "K", "S", "H", "stride_cs")}
    sig.update({k: "constexpr" for k in constexprs})
    return triton.compile(ASTSource(fn=_qk_gemm_fwd_kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 128),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def ptxas_usage(ptx: str) -> str:
    """ptxas -v's register / spill line for the kernel (needs ptxas on PATH)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run(["ptxas", "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    lines = [ln.split("info    : ")[-1] for ln in run.stderr.splitlines() if "registers" in ln or "spill" in ln]
    return "; ".join(lines) if run.returncode == 0 else run.stderr[-500:]


def offline_report():
    for i, cfg in enumerate(PROBE_CONFIGS):
        for epilogue in (EPILOGUE_NORM_ROPE, EPILOGUE_BIAS):
            tag = f"config {i} {_tag(cfg)} epilogue {'norm+rope' if epilogue else 'bias'}"
            try:
                ptx = compile_offline(cfg, epilogue).asm["ptx"]
            except Exception as e:  # noqa: BLE001
                print(f"{tag}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            print(f"{tag}: wgmma={'wgmma.mma_async' in ptx} tma={'cp.async.bulk.tensor' in ptx} "
                  f"{ptxas_usage(ptx)}", flush=True)


# ---------------------------------------------------------------------------------------------------- GPU probe
def _tag(cfg):
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']} "
            f"{'persist ' + str(cfg['num_programs']) if cfg.get('num_programs') else 'grid'}"
            f"{' flat' if cfg.get('flatten') else ''}"
            f"{' ws' if cfg.get('warp_specialize') else ''}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="qk_gemm_out")
    ap.add_argument("--offline", action="store_true", help="compile for sm_90a (no GPU) and print registers")
    ap.add_argument("--dry-run", action="store_true",
                    help="the probe's code path on CPU at a tiny shape (TRITON_INTERPRET=1; numbers meaningless)")
    ap.add_argument("--deadline", type=float, default=240.0, help="seconds; later configs are skipped")
    args = ap.parse_args()
    if args.offline:
        offline_report()
        return
    from cogvideox_kernels.bench.common import environment, time_ms
    from cogvideox_kernels.ops.attention.hopper import PREPASS_CONFIG
    from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd
    from cogvideox_kernels.ops.rope import rope3d_freqs

    os.makedirs(args.out, exist_ok=True)
    lines, rows = [], []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    dev = "cpu" if args.dry_run else "cuda"
    B, text_len, H, D, hidden = 2, 226, 48, 64, 3072  # CogVideoX-5B
    grid = (13, 30, 45)
    configs = PROBE_CONFIGS
    if args.dry_run:
        text_len, H, hidden, grid = 5, 3, 64, (2, 3, 4)
        configs = [dict(INTERPRET_CONFIG), dict(INTERPRET_CONFIG, BLOCK_N=64, num_programs=None)]
    S = text_len + grid[0] * grid[1] * grid[2]
    inner, M = H * D, B * S
    g = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16
    h = torch.randn(M, hidden, device=dev, generator=g).to(bf)
    w = (torch.randn(2 * inner, hidden, device=dev, generator=g) * hidden ** -0.5).to(bf)  # [to_q; to_k]
    b = (0.1 * torch.randn(2 * inner, device=dev, generator=g)).to(bf)
    lnw = (1 + 0.1 * torch.randn(2, D, device=dev, generator=g)).to(bf)
    lnb = (0.1 * torch.randn(2, D, device=dev, generator=g)).to(bf)
    sin, cos = rope3d_freqs(*grid, hidden_size=inner, num_heads=H, device=dev)
    wq, wk = w[:inner], w[inner:]  # contiguous views: the model's two separate weights
    bq, bk = b[:inner], b[inner:]
    kw = dict(seq_len=S, text_len=text_len, num_heads=H, cos=cos, sin=sin, eps=1e-6)
    flops = 2.0 * M * (2 * inner) * hidden
    env = environment(dev)
    log(f"{env.get('gpu', '')} torch {torch.__version__} triton {triton.__version__}; B {B} S {S} H {H} D {D} "
        f"hidden {hidden}; q and k GEMMs {flops / 1e12:.3f} TFLOP")

    # float64 reference of q and k, one at a time (memory), then errors of both paths against it
    ref = torch.cat([qk_gemm_reference(h, w[p * inner:(p + 1) * inner], b[p * inner:(p + 1) * inner],
                                       norm_weight=lnw[p:p + 1], norm_bias=lnb[p:p + 1], **kw).float()
                     for p in range(2)])
    ref_nm = norm_max_of(ref.view(2, B, H, S, D)).float()

    # (a) today: two addmm into the [3, B*S, inner] buffer, then the shipped pre-pass on q and k
    qkv = torch.empty((3, M, inner), dtype=bf, device=dev)
    nm_a = torch.zeros((2, B * H), dtype=torch.float32, device=dev)

    def gemms_a():
        torch.addmm(bq, h, wq.t(), out=qkv[0])
        torch.addmm(bk, h, wk.t(), out=qkv[1])

    def prepass_a():
        nm_a.zero_()
        out = []
        for p in range(2):
            x = qkv[p].view(B, S, H, D)
            out.append(qk_norm_rope_fwd(x, text_len, cos, sin, lnw[p], lnb[p], True, 1e-6, norm_max=nm_a[p],
                                        **PREPASS_CONFIG))
        return out

    def path_a():
        gemms_a()
        return prepass_a()

    ya = path_a()
    ya = torch.stack([t.transpose(1, 2) for t in ya])  # [2, B, H, S, D]
    err_a = rel_err(ya, ref)
    log(f"(a) addmm + pre-pass: rel err {err_a:.3e} vs float64; norm_max vs its output "
        f"{rel_err(nm_a, norm_max_of(ya)):.2e}")

    nm_b = torch.zeros((2, B * H), dtype=torch.float32, device=dev)
    nm_q, nm_k = nm_b[0:1], nm_b[1:2]

    def fused_one(cfg):  # one launch over the stacked [to_q; to_k] (a weight copy in a real integration)
        nm_b.zero_()
        return qk_gemm_fwd(h, w, b, norm_weight=lnw, norm_bias=lnb, norm_max=nm_b, config=cfg, **kw)

    def fused_two(cfg):  # one launch per projection (no weight copy)
        nm_b.zero_()
        yq = qk_gemm_fwd(h, wq, bq, norm_weight=lnw[0:1], norm_bias=lnb[0:1], norm_max=nm_q, config=cfg, **kw)
        yk = qk_gemm_fwd(h, wk, bk, norm_weight=lnw[1:2], norm_bias=lnb[1:2], norm_max=nm_k, config=cfg, **kw)
        return yq, yk

    def plain(cfg):  # (c) same GEMM, bias epilogue only, token-major (as addmm)
        return qk_gemm_fwd(h, w, b, seq_len=S, num_heads=2 * H, epilogue=EPILOGUE_BIAS, config=cfg)

    pieces = {"(a) addmm q + k": gemms_a, "(a) pre-pass q + k (+ zero norm_max)": prepass_a,
              "(a) total": path_a}
    for name, fn in pieces.items():
        ms = time_ms(fn, dev, rep_ms=300)
        rows.append(dict(row=name, ms=ms, err=err_a if name.endswith("total") else None))
        log(f"{name:44s} {ms:7.4f} ms" + (f" {flops / ms / 1e9:6.0f} TFLOP/s" if "addmm" in name else ""))
    base, base_gemm = rows[-1]["ms"], rows[0]["ms"]
    plain_ref = h.double() @ w.double().T + b.double()
    start = time.time()
    for cfg in configs:
        tag = _tag(cfg)
        if time.time() - start > args.deadline:
            log(f"{tag}: skipped (deadline {args.deadline:.0f} s)")
            continue
        try:
            yb = fused_one(cfg).view(2, B, H, S, D)
            err_b = rel_err(yb, ref)
            nm_ok = rel_err(nm_b, norm_max_of(yb))
            yc = plain(cfg)
            err_c = rel_err(yc, plain_ref)
        except Exception as e:  # noqa: BLE001
            log(f"{tag}: {type(e).__name__}: {str(e)[:200]}")
            continue
        ok = err_b <= 1.02 * err_a and nm_ok < 1e-5 and err_c < 5e-3  # no worse than today's path
        log(f"{tag}: parity (b) {err_b:.3e} (a {err_a:.3e}) norm_max {nm_ok:.1e} (c) {err_c:.3e} "
            f"{'ok' if ok else 'FAILED: not timed'}")
        if not ok:
            rows.append(dict(row="parity", config=tag, err_b=err_b, err_c=err_c, norm_max_err=nm_ok, ok=False))
            continue
        for name, fn in (("(b) fused, one launch q+k", lambda: fused_one(cfg)),
                         ("(b) fused, two launches", lambda: fused_two(cfg)),
                         ("(c) plain bias epilogue q+k", lambda: plain(cfg))):
            ms = time_ms(fn, dev, rep_ms=300)
            # (b) against (a)'s total: the step's saving; (c) against (a)'s two addmm: GEMM speed vs cuBLAS
            vs, what = (base, "(a) total") if name.startswith("(b)") else (base_gemm, "(a) addmm")
            rows.append(dict(row=name, config=tag, ms=ms, err=err_b if name.startswith("(b)") else err_c,
                             tflops=flops / ms / 1e9, step_ms_saved=42 * (vs - ms), vs=what))
            log(f"  {name:42s} {ms:7.4f} ms {flops / ms / 1e9:6.0f} TFLOP/s; 42 x ({what} - this) = "
                f"{42 * (vs - ms):+7.1f} ms per step")
    with open(os.path.join(args.out, "qk_gemm_epilogue.json"), "w") as f:
        json.dump(dict(env=env, shape=dict(B=B, S=S, H=H, D=D, hidden=hidden, text_len=text_len), rows=rows,
                       err_a=err_a, ref_norm_max_max=float(ref_nm.max())), f, indent=1, default=str)
    with open(os.path.join(args.out, "qk_gemm_epilogue.log"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
