"""Triton forward of ``rope3d_attention``: QK LayerNorm + interleaved RoPE3D + flash attention.

Layout of the work (chosen by measurement on an H100, see ``benchmarks/results/attention_notes.md``):

* ``_qk_norm_rope_fwd_kernel`` (a pre-pass, ~0.17 ms per tensor at the 5B shape) norms and rotates
  q and k once, and writes k and v head-major ([B, H, S, D] storage), so each key/value block is one
  contiguous chunk (strided K/V cost ~2 ms at 5B). K is re-read by every query block, so rotating it
  inside the attention loop would repeat that work S / BLOCK_M times; q done in the attention prologue
  raised the kernel's registers over 128 and halved the CTAs per SM (22.9 vs 17.4 ms).
* ``_rope3d_attention_fwd_kernel`` reads q, k, v through strides, runs an online softmax with float32
  statistics and exp2 with scale * log2(e) folded into one multiply, full key blocks unmasked and one
  masked tail block, and writes a contiguous [B, S, H, D] output.

Variants measured slower (q prologue, k/v read in place, FMA-pipe or packed 16-bit exponentials) live
in ``benchmarks/experiments/attention_variants.py``.

Under ``TRITON_INTERPRET=1`` bf16/fp16 arithmetic is wrong (the interpreter keeps raw 16-bit
integers), so the ``INTERPRET`` flag upcasts dot operands to float32 there; loads, stores and casts
are fine, except that float32 -> bf16 casts truncate there (see ``_triton_utils.store_cast``). The
interpreter also cannot time autotune configs, so it runs one pinned config.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._triton_utils import ensure_tma_allocator, interpret_mode, store_cast, tma_aligned

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _norm_rope_tile(x_ptr, row_offsets, tokens, row_mask, offs_d, D, text_len,
                    cos_ptr, sin_ptr, stride_cs, weight_ptr, bias_ptr, eps,
                    HAS_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_ROPE: tl.constexpr):
    """Load rows of x (one head vector per row), LayerNorm over D, rotate video rows. float32."""
    d_mask = offs_d < D
    mask = row_mask[:, None] & d_mask[None, :]
    x = tl.load(x_ptr + row_offsets[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        mean = tl.sum(x, axis=1) / D
        centered = tl.where(d_mask[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
        x = centered * rstd[:, None]
        if HAS_WEIGHT:
            x = x * tl.load(weight_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            x = x + tl.load(bias_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_ROPE:
        # text rows (token < text_len) read cos 1, sin 0: unrotated
        is_video = row_mask & (tokens >= text_len)
        table_mask = is_video[:, None] & d_mask[None, :]
        table_offsets = (tokens - text_len).to(tl.int64)[:, None] * stride_cs + offs_d[None, :]
        cos = tl.load(cos_ptr + table_offsets, mask=table_mask, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + table_offsets, mask=table_mask, other=0.0).to(tl.float32)
        # y[2i] = x[2i] cos - x[2i+1] sin ; y[2i+1] = x[2i+1] cos + x[2i] sin. The pair swap is a
        # split/join of the last dim (pairs sit in one thread), not a second, scalar load.
        ROWS: tl.constexpr = x.shape[0]
        COLS: tl.constexpr = x.shape[1]
        even, odd = tl.split(tl.reshape(x, [ROWS, COLS // 2, 2]))
        swapped = tl.reshape(tl.join(-odd, even), [ROWS, COLS])
        x = x * cos + swapped * sin
    return x


@triton.jit
def _qk_norm_rope_fwd_kernel(x_ptr, y_ptr, S, H, text_len,
                             stride_xb, stride_xs, stride_xh, stride_yb, stride_ys, stride_yh,
                             cos_ptr, sin_ptr, stride_cs, weight_ptr, bias_ptr, eps, norm_sq_ptr,
                             norm_max_ptr, HAS_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                             HAS_BIAS: tl.constexpr, HAS_ROPE: tl.constexpr, D: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                             NORM_SQ: tl.constexpr, NORM_MAX: tl.constexpr, HEAD_ROWS: tl.constexpr,
                             INTERPRET: tl.constexpr, out_scale=1.0, HAS_OUT_SCALE: tl.constexpr = False):
    """Pre-pass: y[b, s, h] = rope(layernorm(x[b, s, h])). Rows run over (s, h) of one sample,
    so neighbouring rows are neighbouring heads in memory; with HEAD_ROWS over BLOCK_R tokens of
    one (b, h) (program axis 1), so the head-major writes of a program are one contiguous run.
    NORM_SQ: also norm_sq[b, s, h] = ||y[b, s, h]||^2 (float32, contiguous [B, S, H]).
    NORM_MAX (needs HEAD_ROWS): norm_max[b * H + h] = max over s of ||y[b, s, h]||^2, by one
    atomic max per program into a zeroed float32 [B * H] (the Hopper kernel's score bound).
    HAS_OUT_SCALE: y is multiplied by out_scale (float32) before its store and its norms (the Hopper
    kernel's q with the softmax scale * log2(e) folded in)."""
    pid_r = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    if HEAD_ROWS:
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        tokens = pid_r * BLOCK_R + offs_r
        heads = tl.zeros([BLOCK_R], dtype=tl.int32) + bh % H
        row_mask = tokens < S
        rows = tokens * H + heads
    else:
        b = tl.program_id(1).to(tl.int64)
        rows = pid_r * BLOCK_R + offs_r
        row_mask = rows < S * H
        tokens = rows // H
        heads = rows % H
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = b * stride_xb + tokens.to(tl.int64) * stride_xs + heads * stride_xh
    y = _norm_rope_tile(x_ptr, x_rows, tokens, row_mask, offs_d, D, text_len, cos_ptr, sin_ptr,
                        stride_cs, weight_ptr, bias_ptr, eps, HAS_NORM, HAS_WEIGHT, HAS_BIAS,
                        HAS_ROPE)
    if HAS_OUT_SCALE:
        y = y * out_scale
    y_rows = b * stride_yb + tokens.to(tl.int64) * stride_ys + heads * stride_yh
    mask = row_mask[:, None] & (offs_d < D)[None, :]
    tl.store(y_ptr + y_rows[:, None] + offs_d[None, :],
             store_cast(y, y_ptr.dtype.element_ty, INTERPRET), mask=mask)
    if NORM_SQ or NORM_MAX:
        norms = tl.sum(tl.where(mask, y * y, 0.0), axis=1)
        if NORM_SQ:
            tl.store(norm_sq_ptr + b * S * H + rows, norms, mask=row_mask)
        if NORM_MAX:
            tl.atomic_max(norm_max_ptr + tl.program_id(1), tl.max(norms, axis=0))


@triton.jit
def _attend_block(acc, l_i, m_i, q, k, v, qk_scale, cols_valid, MASK_COLS: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """One online-softmax step over a [BLOCK_N, BLOCK_D] block of keys and values."""
    if INTERPRET:
        qk = tl.dot(q, tl.trans(k.to(tl.float32)))
    else:
        qk = tl.dot(q, tl.trans(k))
    if MASK_COLS:
        qk = tl.where(cols_valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
    acc = acc * alpha[:, None]
    if INTERPRET:
        acc = tl.dot(p, v.to(tl.float32), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _rope3d_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, S, H, S_BUCKET,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, qk_scale,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, INTERPRET: tl.constexpr):
    """out[b, m-block, h] = softmax(q k^T * scale) v for q, k already normed and rotated.

    qk_scale = scale * log2(e), so the softmax runs on exp2. S_BUCKET is only an autotune key.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < S
    d_mask = offs_d < D
    PAD_D: tl.constexpr = BLOCK_D != D  # masks on the head dim only when D is not a power of 2

    q_rows = b * stride_qb + offs_m.to(tl.int64) * stride_qs + h * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)
    if not INTERPRET:
        q = q.to(k_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    n_full = (S // BLOCK_N) * BLOCK_N
    if USE_TMA:
        # out-of-bounds rows and head dims read as zero
        k_desc = tl.make_tensor_descriptor(k_base, shape=[S, D], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[S, D], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k, v, qk_scale, offs_n, False, INTERPRET)
        if n_full < S:
            k = k_desc.load([n_full, 0])
            v = v_desc.load([n_full, 0])
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k, v, qk_scale, n_full + offs_n < S, True,
                                          INTERPRET)
    else:
        k_ptrs = k_base + offs_n[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            if PAD_D:
                k = tl.load(k_ptrs, mask=d_mask[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k, v, qk_scale, offs_n, False, INTERPRET)
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs
        if n_full < S:
            cols_valid = n_full + offs_n < S
            tail_mask = cols_valid[:, None] & d_mask[None, :]
            k = tl.load(k_ptrs, mask=tail_mask, other=0.0)
            v = tl.load(v_ptrs, mask=tail_mask, other=0.0)
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, k, v, qk_scale, cols_valid, True, INTERPRET)

    out = acc / l_i[:, None]
    o_rows = b * stride_ob + offs_m.to(tl.int64) * stride_os + h * stride_oh
    tl.store(o_ptr + o_rows[:, None] + offs_d[None, :],
             store_cast(out, o_ptr.dtype.element_ty, INTERPRET),
             mask=m_mask[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def _attention_config(block_m, block_n, num_warps, num_stages, use_tma=False, warp_specialize=False):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "USE_TMA": use_tma,
                          "WARP_SPECIALIZE": warp_specialize},
                         num_warps=num_warps, num_stages=num_stages)


# Hopper autotune sets (from the sweeps in benchmarks/bench_attention.py: 128x64 with 8 warps and
# 3-4 stages won at 5B; the others are within 4% there or may win at other shapes); keyed on
# (head dim, S bucket) plus the dtypes, which the autotuner adds to the key itself.
POINTER_CONFIGS = [
    _attention_config(128, 64, 8, 3),
    _attention_config(128, 64, 8, 4),
    _attention_config(64, 64, 4, 3),
    _attention_config(64, 128, 4, 3),
    _attention_config(128, 128, 8, 3),
]
# Same, reading K/V through tensor descriptors (TMA); used when every base and stride is 16-byte
# aligned (always true for the pre-pass buffers).
TMA_CONFIGS = [
    _attention_config(128, 64, 8, 3, use_tma=True),
    _attention_config(128, 64, 8, 4, use_tma=True),
    _attention_config(128, 64, 4, 3, use_tma=True),
    _attention_config(64, 64, 4, 3, use_tma=True),
    _attention_config(64, 128, 4, 3, use_tma=True),
    _attention_config(128, 128, 8, 3, use_tma=True),
]
# The interpreter cannot time configs: one small pinned config.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "USE_TMA": False, "WARP_SPECIALIZE": False}

_AUTOTUNE_KEY = ["S_BUCKET", "D"]
_attention_pointer_autotuned = triton.autotune(configs=POINTER_CONFIGS, key=_AUTOTUNE_KEY)(
    _rope3d_attention_fwd_kernel)
_attention_tma_autotuned = triton.autotune(configs=TMA_CONFIGS, key=_AUTOTUNE_KEY)(
    _rope3d_attention_fwd_kernel)


def _s_bucket(S: int) -> int:
    return triton.next_power_of_2(max(S, 1024))


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def qk_norm_rope_fwd(x, text_len, cos, sin, weight, bias, apply_norm, eps, *, head_major=True,
                     block_r=None, norm_sq=None, norm_max=None, head_rows=None, num_warps=None,
                     out_scale=None):
    """Pre-pass: rope(layernorm(x)) (either part optional; neither = a copy) of a strided
    [B, S, H, D] x. Returns a [B, S, H, D] view of x's dtype whose storage is [B, H, S, D]
    (``head_major``, what the attention kernel reads fastest) or [B, S, H, D].
    ``norm_sq``: a float32 [B, S, H] contiguous tensor that receives ||y[b, s, h]||^2 (of the
    float32 values before the cast). ``norm_max``: a zeroed float32 [B * H] contiguous tensor that
    receives max over s of ||y[b, s, h]||^2 (the Hopper kernel bounds its scores with it); it
    implies ``head_rows`` (programs over tokens of one head instead of (token, head) rows).
    ``out_scale``: a float; y = out_scale * rope(layernorm(x)) (multiplied in float32 before the
    cast and the norms)."""
    B, S, H, D = x.shape
    if head_major:
        y = torch.empty((B, H, S, D), dtype=x.dtype, device=x.device).transpose(1, 2)
    else:
        y = torch.empty((B, S, H, D), dtype=x.dtype, device=x.device)
    if norm_max is not None:
        if head_rows is False:
            raise ValueError("qk_norm_rope_fwd: norm_max needs head_rows (one head per program)")
        if (norm_max.dtype != torch.float32 or norm_max.numel() != B * H
                or not norm_max.is_contiguous()):
            raise ValueError(f"qk_norm_rope_fwd: norm_max must be a contiguous float32 tensor of "
                             f"B * H = {B * H} elements, got {norm_max.dtype} {tuple(norm_max.shape)}")
        head_rows = True
    head_rows = bool(head_rows)
    block_d = max(16, triton.next_power_of_2(D))
    if block_r is None:
        block_r = 32 if interpret_mode() else (64 if block_d <= 64 else 32)
    if num_warps is None:
        num_warps = 4
    has_rope = cos is not None
    grid = (triton.cdiv(S, block_r), B * H) if head_rows else (triton.cdiv(S * H, block_r), B)
    _qk_norm_rope_fwd_kernel[grid](
        x, y, S, H, text_len, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1),
        y.stride(2), cos, sin, cos.stride(0) if has_rope else 0, weight, bias, eps, norm_sq,
        norm_max, NORM_SQ=norm_sq is not None, NORM_MAX=norm_max is not None,
        HEAD_ROWS=head_rows, HAS_NORM=apply_norm, HAS_WEIGHT=apply_norm and weight is not None,
        HAS_BIAS=apply_norm and bias is not None, HAS_ROPE=has_rope, D=D, BLOCK_R=block_r,
        BLOCK_D=block_d, INTERPRET=interpret_mode(), num_warps=num_warps,
        out_scale=1.0 if out_scale is None else float(out_scale), HAS_OUT_SCALE=out_scale is not None)
    return y


def rope3d_attention_fwd(q, k, v, text_len, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight,
                         k_norm_bias, apply_q_norm, apply_k_norm, eps, scale, *, config=None, use_tma=None):
    """Launch the pre-passes and the attention kernel (tables and norm vectors packed, as the
    registry hands them).

    k and v always go through the pre-pass (k normed/rotated, v copied), written head-major; q
    through it when it is normed or rotated. ``config``: a dict of BLOCK_M, BLOCK_N, USE_TMA,
    WARP_SPECIALIZE, num_warps, num_stages (optionally maxnreg) to bypass autotuning (benchmark
    sweeps). ``use_tma``: force the TMA/pointer autotune set.
    """
    B, S, H, D = q.shape
    interpret = interpret_mode()
    k = qk_norm_rope_fwd(k, text_len, cos, sin, k_norm_weight, k_norm_bias, apply_k_norm, eps)
    v = qk_norm_rope_fwd(v, 0, None, None, None, None, False, eps)
    if apply_q_norm or cos is not None:
        q = qk_norm_rope_fwd(q, text_len, cos, sin, q_norm_weight, q_norm_bias, apply_q_norm, eps)

    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    args = (q, k, v, out, S, H, _s_bucket(S),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            scale * LOG2E)
    flags = dict(D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), INTERPRET=interpret)
    if interpret or config is not None:
        meta = dict(config) if config is not None else dict(INTERPRET_CONFIG)
        if meta.get("USE_TMA"):
            ensure_tma_allocator()
        grid = (triton.cdiv(S, meta["BLOCK_M"]), B * H)
        _rope3d_attention_fwd_kernel[grid](*args, **{**flags, **meta})
        return out
    if use_tma is None:
        use_tma = tma_aligned(k, v) and (D * q.element_size()) % 16 == 0
    kernel = _attention_tma_autotuned if use_tma else _attention_pointer_autotuned
    if use_tma:
        ensure_tma_allocator()
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](*args, **flags)
    return out


# ----------------------------------------------------------------------------------------------
# custom op (opaque to torch.compile) and the entry point the dispatcher calls
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("cogvideox_kernels::rope3d_attention", mutates_args=())
def rope3d_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int,
                        cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                        q_norm_weight: Optional[torch.Tensor], q_norm_bias: Optional[torch.Tensor],
                        k_norm_weight: Optional[torch.Tensor], k_norm_bias: Optional[torch.Tensor],
                        apply_q_norm: bool, apply_k_norm: bool, eps: float,
                        scale: float) -> torch.Tensor:
    return rope3d_attention_fwd(q, k, v, text_len, cos, sin, q_norm_weight, q_norm_bias,
                                k_norm_weight, k_norm_bias, apply_q_norm, apply_k_norm, eps, scale)


@rope3d_attention_op.register_fake
def _(q, k, v, text_len, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
      apply_q_norm, apply_k_norm, eps, scale):
    return q.new_empty(q.shape)


def supports(q, precision="bf16", **_) -> str | None:
    """Registry ``supports``: the dtypes and head dims this kernel takes (None), or why not."""
    if precision != "bf16":
        return f"precision={precision!r}: the Triton kernel runs 'bf16' only (int8: 'hopper' backend)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"q has dtype {q.dtype}; the Triton kernel takes float16, bfloat16 and float32"
    D = q.shape[-1]
    if D > MAX_HEAD_DIM or D % 2:
        return f"head_dim={D}; the Triton kernel takes even head dims up to {MAX_HEAD_DIM}"
    return None


def rope3d_attention_triton(q, k, v, *, text_len, cos=None, sin=None, q_norm=None, k_norm=None,
                            eps=1e-6, scale=None, precision="bf16"):
    """Triton path of ``rope3d_attention`` (inputs checked and ``supports``-ed by the registry)."""
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    q_w, q_b = q_norm if q_norm is not None else (None, None)
    k_w, k_b = k_norm if k_norm is not None else (None, None)
    return rope3d_attention_op(q, k, v, int(text_len), cos, sin, q_w, q_b, k_w, k_b,
                               q_norm is not None, k_norm is not None, float(eps), scale)


__all__ = ["rope3d_attention_triton", "rope3d_attention_fwd", "qk_norm_rope_fwd",
           "rope3d_attention_op", "POINTER_CONFIGS", "TMA_CONFIGS"]
