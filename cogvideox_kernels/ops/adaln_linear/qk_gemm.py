"""q and k of the attention half through one Triton GEMM whose epilogue is the attention's pre-pass.

Today the fused attention half runs to_q / to_k as cuBLAS ``addmm``s into a token-major buffer, then the
Hopper attention's pre-pass (``qk_norm_rope_fwd``) reads q and k back, norms each head's D channels, rotates
the video tokens, writes them head-major and reduces the per-head max squared row norm (the Hopper kernel's
score bound). ``qk_gemm_fwd`` does that work on the GEMM's float32 tile before anything is stored:
y = h @ W^T + b for W = to_q, to_k or both stacked (N = P * H * D), and per (token, head) of a
BLOCK_M x BLOCK_N tile (BLOCK_N a multiple of D, split into heads in registers):

* LayerNorm over D in float32 of the accumulator + bias (no bf16 rounding in between, unlike the unfused
  path), norm weight + bias, interleaved RoPE on video tokens (cos/sin tables [S - text_len, D]); tiles
  may straddle the text/video boundary, two (or, for S < BLOCK_M, more) samples and the q/k boundary of a
  stacked weight;
* bf16 store head-major ``y[P, B, H, S, D]`` (``y[p]`` is what ``hopper_attention_core`` reads);
* ``norm_max[p, b * H + h]`` = max over tokens of ||y||^2 of the **stored** (bf16) rows, by one atomic max
  per (head, sample) of a tile into a zeroed float32 [P, B * H] (the shipped pre-pass takes the float32
  row before its cast; the rounded row's is the quantity the attention's score bound is about).

EPILOGUE_BIAS is the same GEMM with a plain bias epilogue into a token-major [M, N] (what addmm writes).

``adaln_qk_gemm`` is the attention half's front on this GEMM (norm1's LN-modulate pre-pass once, q and k
through the GEMM, v by addmm) and ``hopper_attention_headmajor`` the Hopper attention on its output; both
are custom ops (fake implementations, so ``torch.compile(fullgraph=True)`` traces them). The fused attention
half takes them only behind ``state.QK_GEMM_EPILOGUE`` (off by default; issue 13, not yet timed on a GPU).
The GPU probe and the offline compile are ``benchmarks/experiments/qk_gemm_epilogue.py``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._triton_utils import ensure_tma_allocator, interpret_mode, store_cast

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
    from ..attention.reference import apply_rope_interleaved

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


# ------------------------------------------------------------------------------------- the attention half's front
def adaln_qk_gemm_fwd(x, modulation, weights, biases, text_len, norm_weight, norm_bias, eps, num_heads,
                      qk_norm_weight, qk_norm_bias, qk_eps, cos, sin, config=None):
    """norm1's LN-modulate pre-pass of x [B, S, hidden] once (as ``adaln_linear_parts_fwd``), then q and k
    through ``qk_gemm_fwd`` and v by addmm. ``weights``/``biases``: [to_q, to_k, to_v] (three launches' worth
    of separate [inner, hidden] weights: q and k one GEMM launch each, no weight copy) or [to_qkv] (one
    [3 * inner, hidden] weight: q and k one launch over its first 2 * inner rows). ``qk_norm_weight`` /
    ``qk_norm_bias``: [2, D] (q's, k's) or None. Returns (qk [2, B, H, S, D] normed + rotated, head-major;
    norm_max float32 [2, B * H], the max squared row norms of qk[0] and qk[1] per head; v [B, S, inner])."""
    from ..expert_ffn import triton_fwd as ffn

    B, S, Hd = x.shape
    x = x.contiguous()
    norm_weight, norm_bias = (None if t is None else t.contiguous() for t in (norm_weight, norm_bias))
    h = ffn.modulated_norm_fwd(x.view(B * S, Hd), modulation.contiguous(), norm_weight, norm_bias, eps, S,
                               text_len, x.dtype)
    inner = weights[0].shape[0] // (3 if len(weights) == 1 else 1)
    D = inner // num_heads
    if len(weights) == 1:
        w_qk, w_v = weights[0][:2 * inner], weights[0][2 * inner:]
        b_qk, b_v = (None, None) if biases[0] is None else (biases[0][:2 * inner], biases[0][2 * inner:])
    else:
        w_qk, b_qk, w_v, b_v = None, None, weights[2], biases[2]
    qk = torch.empty((2, B, num_heads, S, D), dtype=x.dtype, device=x.device)
    norm_max = torch.zeros((2, B * num_heads), dtype=torch.float32, device=x.device)
    kw = dict(seq_len=S, num_heads=num_heads, head_dim=D, text_len=text_len, cos=cos, sin=sin, eps=qk_eps,
              config=config)
    if w_qk is not None:
        qk_gemm_fwd(h, w_qk, b_qk, norm_weight=qk_norm_weight, norm_bias=qk_norm_bias, norm_max=norm_max, out=qk,
                    **kw)
    else:
        for p in range(2):
            qk_gemm_fwd(h, weights[p], biases[p], out=qk[p:p + 1], norm_max=norm_max[p:p + 1],
                        norm_weight=None if qk_norm_weight is None else qk_norm_weight[p:p + 1],
                        norm_bias=None if qk_norm_bias is None else qk_norm_bias[p:p + 1], **kw)
    v = torch.empty((B * S, inner), dtype=x.dtype, device=x.device)
    if b_v is None:
        torch.mm(h, w_v.t(), out=v)
    else:
        torch.addmm(b_v, h, w_v.t(), out=v)
    return qk, norm_max, v.view(B, S, inner)


def adaln_qk_gemm_reference(x, modulation, weights, biases, text_len, norm_weight, norm_bias, eps, num_heads,
                            qk_norm_weight, qk_norm_bias, qk_eps, cos, sin, dtype=torch.float64):
    """``adaln_qk_gemm_fwd``'s (qk, v) in ``dtype`` from the same definitions (adaln_linear's reference
    semantics for the normalized rows, ``qk_gemm_reference`` for q and k): qk [2, B, H, S, D], v [B, S, inner]."""
    from ..expert_ffn.reference import modulated_norm_reference

    B, S, Hd = x.shape
    up = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    h, _ = modulated_norm_reference(x.to(dtype), up(modulation), text_len, up(norm_weight), up(norm_bias), eps)
    h = h.reshape(B * S, Hd)
    w = weights[0] if len(weights) == 1 else torch.cat(list(weights))
    b = None
    if any(t is not None for t in biases):
        b = biases[0] if len(biases) == 1 else torch.cat([t if t is not None else w.new_zeros(weights[0].shape[0])
                                                          for t in biases])
    inner = w.shape[0] // 3
    D = inner // num_heads
    qk = qk_gemm_reference(h, w[:2 * inner], None if b is None else b[:2 * inner], seq_len=S, num_heads=num_heads,
                           head_dim=D, text_len=text_len, norm_weight=qk_norm_weight, norm_bias=qk_norm_bias,
                           cos=cos, sin=sin, eps=qk_eps, dtype=dtype)
    v = h @ w[2 * inner:].to(dtype).T
    if b is not None:
        v = v + b[2 * inner:].to(dtype)
    return qk, v.view(B, S, inner)


@torch.library.custom_op("cogvideox_kernels::adaln_qk_gemm", mutates_args=())
def adaln_qk_gemm_op(x: torch.Tensor, modulation: torch.Tensor, weights: List[torch.Tensor],
                     biases: List[Optional[torch.Tensor]], text_len: int, norm_weight: Optional[torch.Tensor],
                     norm_bias: Optional[torch.Tensor], eps: float, num_heads: int,
                     qk_norm_weight: Optional[torch.Tensor], qk_norm_bias: Optional[torch.Tensor], qk_eps: float,
                     cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return adaln_qk_gemm_fwd(x, modulation, weights, biases, text_len, norm_weight, norm_bias, eps, num_heads,
                             qk_norm_weight, qk_norm_bias, qk_eps, cos, sin)


@adaln_qk_gemm_op.register_fake
def _adaln_qk_gemm_fake(x, modulation, weights, biases, text_len, norm_weight, norm_bias, eps, num_heads,
                        qk_norm_weight, qk_norm_bias, qk_eps, cos, sin):
    B, S, _ = x.shape
    inner = weights[0].shape[0] // (3 if len(weights) == 1 else 1)
    return (x.new_empty(2, B, num_heads, S, inner // num_heads),
            x.new_empty(2, B * num_heads, dtype=torch.float32), x.new_empty(B, S, inner))


def adaln_qk_gemm(x, modulation, weights, biases, *, text_len, norm_weight, norm_bias, eps, num_heads,
                  qk_norm_weight, qk_norm_bias, qk_eps, cos=None, sin=None):
    """Checked entry of ``adaln_qk_gemm_op`` (see ``adaln_qk_gemm_fwd``): x [B, S, hidden] bf16/fp16,
    modulation [B, 6, hidden], weights [to_q, to_k, to_v] or [to_qkv] in x's dtype, head_dim = inner /
    num_heads a power of two >= 16, cos/sin [S - text_len, D] float32 or None. ValueErrors name the argument."""
    from . import check_adaln_linear_inputs

    weights, biases = list(weights), list(biases)
    if len(weights) not in (1, 3) or len(biases) != len(weights):
        raise ValueError(f"weights must be [to_q, to_k, to_v] or [to_qkv] with as many biases, got {len(weights)} "
                         f"weights and {len(biases)} biases")
    check_adaln_linear_inputs(x, modulation, weights, biases, text_len, norm_weight, norm_bias, eps)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x has dtype {x.dtype}; adaln_qk_gemm takes bfloat16 and float16")
    rows = weights[0].shape[0] // (3 if len(weights) == 1 else 1)
    if rows * (3 if len(weights) == 1 else 1) != weights[0].shape[0]:
        raise ValueError(f"weights[0] (to_qkv) has {weights[0].shape[0]} rows, not a multiple of 3")
    if not isinstance(num_heads, int) or num_heads < 1 or rows % num_heads:
        raise ValueError(f"num_heads={num_heads!r} must be a positive int dividing the projection size {rows}")
    D = rows // num_heads
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim={D} (projection size {rows} / num_heads={num_heads}) must be a power of two >= 16")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (or both None for no rotation)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device != x.device
                              or tuple(t.shape) != (x.shape[1] - text_len, D)):
            raise ValueError(f"{name} must be a float32 [S - text_len={x.shape[1] - text_len}, head_dim={D}] tensor "
                             f"on {x.device}, got {(t.dtype, tuple(t.shape), t.device) if isinstance(t, torch.Tensor) else t!r}")
    for name, t in (("qk_norm_weight", qk_norm_weight), ("qk_norm_bias", qk_norm_bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (2, D)):
            raise ValueError(f"{name} must be a [2, head_dim={D}] tensor (q's, k's) or None, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    return adaln_qk_gemm_op(x, modulation, weights, biases, int(text_len), norm_weight, norm_bias, float(eps),
                            num_heads, qk_norm_weight, qk_norm_bias, float(qk_eps), cos, sin)


# ------------------------------------------------------------------------------ the Hopper attention on its output
def hopper_attention_headmajor_fwd(qk, norm_max, v, scale):
    """``hopper_attention_core`` on ``adaln_qk_gemm``'s output (its q/k pre-pass already done by the GEMM):
    qk [2, B, H, S, D], norm_max [2, B * H], v [B, S, H * D] (read in place when its layout allows).
    Returns [B, S, H, D]."""
    from ..attention.hopper_fwd import hopper_attention_core, v_token_major_ok

    _, B, H, S, D = qk.shape
    v = v.view(B, S, H, D)
    v_in_place = v_token_major_ok(v)
    vh = v if v_in_place else v.transpose(1, 2).contiguous()
    out = torch.empty((B, S, H, D), dtype=qk.dtype, device=qk.device)
    return hopper_attention_core(qk[0], qk[1], vh, out, scale, None, norm_max, v_token_major=v_in_place)


@torch.library.custom_op("cogvideox_kernels::hopper_attention_headmajor", mutates_args=())
def hopper_attention_headmajor_op(qk: torch.Tensor, norm_max: torch.Tensor, v: torch.Tensor,
                                  scale: float) -> torch.Tensor:
    return hopper_attention_headmajor_fwd(qk, norm_max, v, scale)


@hopper_attention_headmajor_op.register_fake
def _hopper_attention_headmajor_fake(qk, norm_max, v, scale):
    _, B, H, S, D = qk.shape
    return qk.new_empty(B, S, H, D)


def hopper_attention_headmajor(qk, norm_max, v, *, scale=None):
    """softmax(q k^T * scale) v for ``adaln_qk_gemm``'s (qk, norm_max, v) on the Hopper kernel: [B, S, H, D]."""
    D = qk.shape[-1]
    return hopper_attention_headmajor_op(qk, norm_max, v, D ** -0.5 if scale is None else float(scale))
