"""Experimental variants of the Triton attention forward, measured slower and taken out of the shipped
kernel (numbers: benchmarks/results/attention_notes.md). Kept runnable for re-measurement on other GPUs:

* ``POLY_EXP``: half of the softmax exponentials on the FMA pipe (degree-3 polynomial) instead of MUFU;
  H100 5B 20.10 vs 17.39 ms.
* ``exp_x2``: packed 16-bit exponentials (``ex2.approx.ftz.bf16x2`` / ``ex2.approx.f16x2``); ptxas
  splits them into one MUFU op per half: H100 5B kernel 18.20 vs 16.99 ms.
* ``q_prologue``: q normed and rotated inside the attention kernel instead of by the pre-pass (142 vs
  107 registers, half the CTAs per SM): 22.95 vs 17.39 ms.
* ``relayout_kv=False``: k/v read in place instead of written head-major by the pre-pass: 20.05 vs
  17.39 ms (TMA).

``attention_variant_fwd`` takes the shipped launcher's arguments plus those options and a config (no
autotuning); the pre-pass and the norm/RoPE tile are the shipped ones. GPU only for ``exp_x2`` (inline
PTX); the rest also runs under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cogvideox_kernels.ops._triton_utils import ensure_tma_allocator, interpret_mode, store_cast
from cogvideox_kernels.ops.attention.triton_fwd import LOG2E, _norm_rope_tile, qk_norm_rope_fwd

DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, USE_TMA=False, WARP_SPECIALIZE=False, POLY_EXP=False,
                      num_warps=8, num_stages=3)
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, USE_TMA=False, WARP_SPECIALIZE=False, POLY_EXP=False)


@triton.jit
def _exp2_fma(x):
    """2^x for x <= 0 on the FMA pipe: 2^round(x) into the exponent bits, 2^f for f in [-0.5, 0.5] a
    degree-3 minimax polynomial (max relative error 7.5e-5, far below the bf16 rounding of P)."""
    x = tl.maximum(x, -125.0)
    shifted = x + 12582912.0  # 1.5 * 2^23: round(x) lands in the low mantissa bits
    f = x - (shifted - 12582912.0)
    p = 0.05517167 * f + 0.24261115
    p = p * f + 0.69326099
    p = p * f + 0.99992807
    bits = p.to(tl.int32, bitcast=True) + (shifted.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _exp2_x2(x, EXP_X2: tl.constexpr):
    """2^x of a 16-bit tensor, one PTX ``ex2.approx`` per packed pair (sm_90). EXP_X2 == 1: in x's own
    dtype; EXP_X2 == 2: in fp16 whatever x's dtype. GPU only: the interpreter has no inline asm."""
    if EXP_X2 == 2 or x.dtype == tl.float16:
        return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)],
                                         dtype=tl.float16, is_pure=True, pack=2)
    else:
        tl.static_assert(x.dtype == tl.bfloat16, "_exp2_x2 takes bf16 or fp16")
        return tl.inline_asm_elementwise("ex2.approx.ftz.bf16x2 $0, $1;", "=r,r", [x],
                                         dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _attend_block_variant(acc, l_i, m_i, q, k, v, qk_scale, cols_valid, MASK_COLS: tl.constexpr,
                          POLY_EXP: tl.constexpr, INTERPRET: tl.constexpr, EXP_X2: tl.constexpr):
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
        logits = qk * qk_scale - m_new[:, None]
        if POLY_EXP:  # odd columns on the FMA pipe, even ones on MUFU (pairs sit in one thread)
            BM: tl.constexpr = logits.shape[0]
            BN: tl.constexpr = logits.shape[1]
            even, odd = tl.split(tl.reshape(logits, [BM, BN // 2, 2]))
            p = tl.reshape(tl.join(tl.math.exp2(even), _exp2_fma(odd)), [BM, BN])
        elif EXP_X2 != 0 and not INTERPRET and v.dtype != tl.float32:
            p = _exp2_x2(logits.to(v.dtype), EXP_X2).to(v.dtype)
        else:
            p = tl.math.exp2(logits)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
    acc = acc * alpha[:, None]
    if INTERPRET:
        acc = tl.dot(p, v.to(tl.float32), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attention_variant_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, S, H, text_len,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
        cos_ptr, sin_ptr, stride_cs, q_weight_ptr, q_bias_ptr, eps, qk_scale,
        Q_NORM: tl.constexpr, Q_WEIGHT: tl.constexpr, Q_BIAS: tl.constexpr, Q_ROPE: tl.constexpr,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, POLY_EXP: tl.constexpr,
        INTERPRET: tl.constexpr, EXP_X2: tl.constexpr):
    """The shipped kernel's loop, plus q norm/RoPE in the prologue and the exponential options."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < S
    d_mask = offs_d < D
    PAD_D: tl.constexpr = BLOCK_D != D

    q_rows = b * stride_qb + offs_m.to(tl.int64) * stride_qs + h * stride_qh
    q = _norm_rope_tile(q_ptr, q_rows, offs_m, m_mask, offs_d, D, text_len, cos_ptr, sin_ptr,
                        stride_cs, q_weight_ptr, q_bias_ptr, eps, Q_NORM, Q_WEIGHT, Q_BIAS, Q_ROPE)
    if not INTERPRET:
        q = q.to(k_ptr.dtype.element_ty)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    n_full = (S // BLOCK_N) * BLOCK_N
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[S, D], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[S, D], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            acc, l_i, m_i = _attend_block_variant(acc, l_i, m_i, q, k_desc.load([start_n, 0]),
                                                  v_desc.load([start_n, 0]), qk_scale, offs_n, False,
                                                  POLY_EXP, INTERPRET, EXP_X2)
        if n_full < S:
            acc, l_i, m_i = _attend_block_variant(acc, l_i, m_i, q, k_desc.load([n_full, 0]),
                                                  v_desc.load([n_full, 0]), qk_scale, n_full + offs_n < S,
                                                  True, False, INTERPRET, 0)
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
            acc, l_i, m_i = _attend_block_variant(acc, l_i, m_i, q, k, v, qk_scale, offs_n, False,
                                                  POLY_EXP, INTERPRET, EXP_X2)
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs
        if n_full < S:
            cols_valid = n_full + offs_n < S
            tail_mask = cols_valid[:, None] & d_mask[None, :]
            k = tl.load(k_ptrs, mask=tail_mask, other=0.0)
            v = tl.load(v_ptrs, mask=tail_mask, other=0.0)
            acc, l_i, m_i = _attend_block_variant(acc, l_i, m_i, q, k, v, qk_scale, cols_valid, True,
                                                  False, INTERPRET, 0)
    out = acc / l_i[:, None]
    o_rows = b * stride_ob + offs_m.to(tl.int64) * stride_os + h * stride_oh
    tl.store(o_ptr + o_rows[:, None] + offs_d[None, :], store_cast(out, o_ptr.dtype.element_ty, INTERPRET),
             mask=m_mask[:, None] & d_mask[None, :])


def attention_variant_fwd(q, k, v, text_len, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight,
                          k_norm_bias, apply_q_norm, apply_k_norm, eps, scale, *, q_prologue=False,
                          relayout_kv=True, config=None, exp_x2=0):
    """The shipped launcher's work with the experimental options (inputs packed as the registry
    hands them: contiguous tables and norm vectors). ``config``: BLOCK_M, BLOCK_N, USE_TMA,
    WARP_SPECIALIZE, POLY_EXP, num_warps, num_stages (optionally maxnreg, EXP_X2); None: 128x64, 8
    warps, 3 stages, pointer loads (the interpreter: 32x32)."""
    B, S, H, D = q.shape
    interpret = interpret_mode()
    has_rope = cos is not None
    if relayout_kv or apply_k_norm or has_rope:
        k = qk_norm_rope_fwd(k, text_len, cos, sin, k_norm_weight, k_norm_bias, apply_k_norm, eps,
                             head_major=relayout_kv)
    if relayout_kv:
        v = qk_norm_rope_fwd(v, 0, None, None, None, None, False, eps)
    q_norm_here, q_rope_here = apply_q_norm, has_rope
    if not q_prologue and (apply_q_norm or has_rope):
        q = qk_norm_rope_fwd(q, text_len, cos, sin, q_norm_weight, q_norm_bias, apply_q_norm, eps,
                             head_major=relayout_kv)
        q_norm_here, q_rope_here = False, False
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    meta = dict(INTERPRET_CONFIG if interpret else DEFAULT_CONFIG)
    meta.update(config or {})
    meta.setdefault("EXP_X2", 0 if interpret or q.dtype == torch.float32 else exp_x2)
    if interpret:
        meta.update(EXP_X2=0, num_warps=4, num_stages=1)
    if meta["USE_TMA"]:
        ensure_tma_allocator()
    grid = (triton.cdiv(S, meta["BLOCK_M"]), B * H)
    _attention_variant_kernel[grid](
        q, k, v, out, S, H, text_len, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        cos if q_rope_here else None, sin if q_rope_here else None, cos.stride(0) if q_rope_here else 0,
        q_norm_weight if q_norm_here else None, q_norm_bias if q_norm_here else None, eps, scale * LOG2E,
        Q_NORM=q_norm_here, Q_WEIGHT=q_norm_here and q_norm_weight is not None,
        Q_BIAS=q_norm_here and q_norm_bias is not None, Q_ROPE=q_rope_here, D=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)), INTERPRET=interpret, **meta)
    return out


if __name__ == "__main__":  # CPU check under TRITON_INTERPRET=1: every option == the reference
    from cogvideox_kernels.ops.attention import rope3d_attention_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 61, 2, 40, generator=g).unbind(0)
    angles = torch.randn(54, 20, generator=g).repeat_interleave(2, dim=1)
    cos, sin = angles.cos(), angles.sin()
    qn, kn = (1 + 0.2 * torch.randn(40, generator=g), 0.1 * torch.randn(40, generator=g)), (torch.ones(40), None)
    want = rope3d_attention_reference(q, k, v, text_len=7, cos=cos, sin=sin, q_norm=qn, k_norm=kn,
                                      compute_dtype=torch.float64)
    for options in (dict(), dict(q_prologue=True), dict(relayout_kv=False), dict(config=dict(POLY_EXP=True))):
        got = attention_variant_fwd(q, k, v, 7, cos, sin, *qn, *kn, True, True, 1e-6, 40 ** -0.5, **options)
        err = ((got.double() - want).norm() / want.norm()).item()
        print(options, f"rel err {err:.1e}")
        assert err < (1e-4 if "config" in options else 1e-5)  # (the polynomial's own error is 7.5e-5)
