"""8-bit Hopper (sm_90a) attention forward in Gluon (``precision="int8"``), and its launcher.

The bf16 kernel's structure (``hopper_fwd.py``: one loader warp streaming K/V blocks by TMA into a
ring, ``NUM_WG`` consumer warpgroups of 64 query rows, S_{j+1} = Q K^T issued before the softmax of
block j is done with P V) on the operands of ``int8_prepass.quantize_int8_inputs``:

* ``S = Q K^T`` on ``warpgroup_mma`` with INT8 operands (s32 accumulator). The dequantisation is the
  softmax scale: row r of block j has ``q_scale[r] * k_scale[j] * sm_scale * log2(e)``, one FFMA per
  score as in the bf16 kernel (the scale is per row there too). ``MAGIC_CVT``: the s32 -> f32
  conversion as one integer add (for |s| < 2^22, bits(s + 0x4B400000) as float32 is 12582912 + s;
  the constant folds into the FFMA) instead of I2F.
* ``O += P V`` in 16 bits (P in V's dtype; V read in place from the QKV slice where its layout
  allows, else the pre-pass's head-major copy), as the bf16 kernel.
* ``SCORE_BOUND`` (default): the bf16 kernel's softmax without a running max. The pre-pass gives
  each head's largest squared norms of the *dequantized* q rows and smoothed k rows, which bound
  every score the kernel computes (``hopper_fwd._score_bound``); heads within the bound subtract a
  fixed m (no row max, alpha or O rescale: 365 instead of 490 SASS instructions per key block),
  the others keep the running max in the same launch. bf16 P only (fp16 and e4m3 P lack the
  exponent range).
* ``K_SPLIT``: k as two INT8 parts on one scale (``int8_prepass``'s ``k_split``: k ~= s (k_hi +
  k_lo / 2^7), a 15-bit k). The loader brings k_lo tiles beside k_hi's (own ring buffers, the same
  barrier); the consumer waits for q8 . k_hi, shifts it by 7 bits and issues q8 . k_lo into the same
  s32 accumulator (|S| < 2^29 at D 128), 2^-7 goes into q's scale; s32 -> f32 by I2F (MAGIC_CVT
  needs |S| < 2^22). Twice the Q K^T tensor work and K bytes; off by default until measured.
  ``K_SPLIT="heads"``: only heads that keep the running max (score bound T > 80, or no bound)
  load and multiply k_lo; bounded heads run the one-part loop (with I2F).
* ``PV_FP8``: SageAttention2's FP8 P V (P as e4m3 ``p * 448``, the factor folded into the
  exponent; V^T per-channel FP8, K-major; V's scale in the epilogue), one- or two-level
  (``TWO_LEVEL``: each block into a fresh float32 accumulator, added to O with the rescale in one
  FFMA). Measured slower (the accumulator -> e4m3 operand layout change costs ~230 instructions
  per block) and 3.4x less accurate; kept as a config to measure.

Gluon kernels do not run under ``TRITON_INTERPRET``; ``compile_offline`` builds this one for sm_90a
anywhere. ``hopper.py`` routes ``precision="int8"`` here.
"""
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .hopper_fwd import (LOG2E, _mask_tail, _registers, _score_bound, alloc_shared, load_tile,
                         mma_layout, row_partial_sums, store_rows, v_token_major_ok)

LOG2_P_SCALE = gl.constexpr(math.log2(448.0))  # P is stored as p * 448 in e4m3 (its max)
MAGIC = gl.constexpr(0x4B400000)  # float32 bits of 12582912 = 1.5 * 2^23
MAGIC_F = gl.constexpr(12582912.0)
K_LO_W = gl.constexpr(2.0 ** -7)  # k_lo's weight (int8_prepass.K_LO_BITS)


@gluon.jit
def _load_partition(sm, q_desc, k_desc, v_desc, row_q, row_kv, v_row, v_col, S,
                    PV_FP8: gl.constexpr, klo_desc, klo_bufs, K_SPLIT: gl.constexpr, split):
    """One warp: the Q tiles once, then K and V blocks into the ring (``hopper_fwd.load_tile``).
    V^T (PV_FP8) is read as [D, BLOCK_N] boxes of the [B*H*D, S_pad] view at (v_row, j * BLOCK_N),
    16-bit V as [BLOCK_N, D] boxes at (v_row + j * BLOCK_N, v_col) of its head-major or
    token-major view. K_SPLIT: k_lo blocks too, into ``klo_bufs``, where ``split`` (this head
    uses them)."""
    if K_SPLIT:
        load_tile(sm, q_desc, k_desc, v_desc, row_q, 0, row_kv, v_row, v_col, S, 0, PV_FP8,
                  klo_desc, klo_bufs, split)
    else:
        load_tile(sm, q_desc, k_desc, v_desc, row_q, 0, row_kv, v_row, v_col, S, 0, PV_FP8)


@gluon.jit
def _add_k_lo(s, q_smem, klo_buf):
    """K_SPLIT: S = (q8 . k_hi) * 2^7 + q8 . k_lo, issued (async) into the one s32 accumulator
    once q8 . k_hi (``s``, in flight, the newest wgmma group) is done. |S| <= D 127 (127 * 2^7 + 64)
    < 2^29 at D 128."""
    s = warpgroup_mma_wait(0, deps=(s,))
    return warpgroup_mma(q_smem, klo_buf.permute((1, 0)), s << 7, use_acc=True, is_async=True)


@gluon.jit
def _v_operand(sm, stage, PV_FP8: gl.constexpr):
    """V_j as the B operand [BLOCK_N, D] of P V (V^T stored: a transposed view)."""
    if PV_FP8:
        return sm.v_bufs.index(stage).permute((1, 0))
    else:
        return sm.v_bufs.index(stage)


@gluon.jit
def _exp2_bounded(x, MASK: gl.constexpr):
    """2^x for the fixed-max softmax's numerators (MASK: x may hold -inf). One MUFU.EX2 per score;
    ``benchmarks/experiments/int8_poly_probe.py`` swaps this function to put a share of them on
    the FMA pipe (a polynomial) and times that."""
    return gl.exp2(x)


@gluon.jit
def _softmax_step(s, m_i, l_i, row_scale, n0, S, MASK: gl.constexpr, MAGIC_CVT: gl.constexpr,
                  P_DTYPE: gl.constexpr, FIXED: gl.constexpr):
    """Softmax numerators of one block of s32 scores: P (float32; times 448 when P_DTYPE is
    e4m3), the row max (log2 units) and row sums after it, alpha = 2^(m_old - m_new). row_scale:
    q_scale * k_scale_j * sm_scale * log2(e). FIXED: m_i is the head's fixed bound
    (``hopper_fwd._score_bound`` on the dequantized q and smoothed k): no row max, alpha unused,
    l_i per-thread partial sums (``row_partial_sums``). P is cast by the caller after the P V wait:
    a cast here writes registers while the previous P V (register A operand) is in flight, and
    the compiler then waits for it (no overlap)."""
    if MAGIC_CVT:
        # exact for |s| < 2^22 (D * 127^2 = 1.03e6 at D 64): float(s) = bits(s + MAGIC) - MAGIC_F
        sf = (s + MAGIC).to(gl.float32, bitcast=True)
        offset = MAGIC_F
    else:
        sf = s.to(gl.float32)
        offset = 0.0
    if MASK:
        sf = _mask_tail(sf, n0, S)
    if P_DTYPE == gl.float8e4nv:
        p_log2 = LOG2_P_SCALE  # p * 448 = exp2(... + log2 448): e4m3's range
    else:
        p_log2 = 0.0
    if FIXED:
        # one FFMA per score: (s - offset) * row_scale - m; the per-row bias rounds by at most
        # ulp(offset * row_scale) <= 1e-4 T (row_scale <= T / 127^2): inside the bound's margin
        bias = offset * row_scale + (m_i - p_log2)
        p = _exp2_bounded(sf * row_scale[:, None] - bias[:, None], MASK)
        l_i = l_i + row_partial_sums(p)
        alpha = m_i
        m_new = m_i
    else:
        m_new = gl.maximum(m_i, (gl.max(sf, axis=1) - offset) * row_scale)
        # one FFMA per score: (s - offset) * row_scale - m_new + p_log2
        bias = offset * row_scale + m_new - p_log2
        p = gl.exp2(sf * row_scale[:, None] - bias[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _attend_block(j, sm, q_smem, acc, m_i, l_i, alpha, p_op, s_zero, o_zero, q_scale, ks_ptr, S,
                  MASK: gl.constexpr, PV_FP8: gl.constexpr, MAGIC_CVT: gl.constexpr,
                  TWO_LEVEL: gl.constexpr, FIXED: gl.constexpr, klo_bufs,
                  K_SPLIT: gl.constexpr):
    """Key block j >= 1: issue S_j = Q K_j^T, issue O_{j-1} = P_{j-1} V_{j-1}, softmax of S_j
    while P V runs. TWO_LEVEL: P V into a fresh accumulator, then O = O * alpha_{j-1} + O_{j-1}
    (one FFMA per element, as the bf16 kernel's rescale); else P V accumulates into O (rescaled
    by alpha_j afterwards), as in the bf16 kernel. FIXED: no rescale (alpha is 1). K_SPLIT: S_j
    in two dependent wgmmas (``_add_k_lo``), both before P_{j-1} V_{j-1} is issued."""
    stage = j % sm.STAGES
    prev = (j - 1) % sm.STAGES
    mbarrier.wait(sm.k_ready.index(stage), (j // sm.STAGES) & 1)
    s = warpgroup_mma(q_smem, sm.k_bufs.index(stage).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    if K_SPLIT:
        s = _add_k_lo(s, q_smem, klo_bufs.index(stage))
    if TWO_LEVEL:
        pv = warpgroup_mma(p_op, _v_operand(sm, prev, PV_FP8), o_zero, use_acc=False,
                           is_async=True)
    else:
        acc = warpgroup_mma(p_op, _v_operand(sm, prev, PV_FP8), acc, is_async=True)
    k_scale = gl.load(ks_ptr + j)
    s = warpgroup_mma_wait(1, deps=(s,))  # groups retire in order: S_j is done, P V may run on
    alpha_prev = alpha
    p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, q_scale * k_scale, j * sm.BLOCK_N, S, MASK,
                                       MAGIC_CVT, p_op.dtype, FIXED)
    # the V_j wait ends the basic block here, so ptxas keeps the P V wait below the softmax
    # (see hopper_fwd._attend_block)
    mbarrier.wait(sm.v_ready.index(stage), (j // sm.STAGES) & 1)
    row: gl.constexpr = gl.SliceLayout(1, o_zero.type.layout)
    if TWO_LEVEL:
        pv = warpgroup_mma_wait(0, deps=(pv,))
        mbarrier.arrive(sm.kv_empty.index(prev))
        if FIXED:
            acc = acc + pv
        else:
            acc = acc * gl.convert_layout(alpha_prev, row)[:, None] + pv
    else:
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(sm.kv_empty.index(prev))
        if not FIXED:
            acc = acc * gl.convert_layout(alpha, row)[:, None]
    p_op = gl.convert_layout(p.to(p_op.dtype), p_op.type.layout)
    return acc, m_i, l_i, alpha, p_op


@gluon.jit
def _consumer_loop(sm, q_smem, m_i, q_scale, ks_ptr, S, PV_FP8: gl.constexpr,
                   MAGIC_CVT: gl.constexpr, TWO_LEVEL: gl.constexpr, FIXED: gl.constexpr,
                   klo_bufs, K_SPLIT: gl.constexpr):
    """All key blocks for one warpgroup's rows: the unnormalised O and the row sums. m_i: the
    running max's start (-inf per row) or, FIXED, the head's fixed bound (a scalar). K_SPLIT: k
    as two INT8 parts (S counts k in steps of 2^-7 of its scale)."""
    if K_SPLIT:
        q_scale = q_scale * K_LO_W
    BLOCK_M: gl.constexpr = sm.q_bufs.type.shape[1]
    HEAD_D: gl.constexpr = sm.q_bufs.type.shape[2]
    BLOCK_N: gl.constexpr = sm.BLOCK_N
    s_layout: gl.constexpr = mma_layout(BLOCK_N, 32)
    if PV_FP8:
        p_dtype: gl.constexpr = gl.float8e4nv
        o_layout: gl.constexpr = mma_layout(HEAD_D, 32)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    else:
        p_dtype: gl.constexpr = sm.v_bufs.dtype
        o_layout: gl.constexpr = mma_layout(HEAD_D)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    o_zero = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=s_layout)
    if FIXED:  # per-thread partial sums, reduced after the loop
        l_i = row_partial_sums(gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout))
    else:
        l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    n_blocks = gl.cdiv(S, BLOCK_N)

    # ---- block 0: S_0 and its softmax (masked: it may also be the last block)
    mbarrier.wait(sm.k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, sm.k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    if K_SPLIT:
        s = _add_k_lo(s, q_smem, klo_bufs.index(0))
    k_scale = gl.load(ks_ptr)
    s = warpgroup_mma_wait(0, deps=(s,))
    p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, q_scale * k_scale, 0, S, True, MAGIC_CVT,
                                       p_dtype, FIXED)
    mbarrier.wait(sm.v_ready.index(0), 0)
    p_op = gl.convert_layout(p.to(p_dtype), p_layout)

    # ---- full blocks 1 .. n-2 (no branch inside the loop), then the last block (masked)
    for j in range(1, n_blocks - 1):
        acc, m_i, l_i, alpha, p_op = _attend_block(j, sm, q_smem, acc, m_i, l_i, alpha, p_op,
                                                   s_zero, o_zero, q_scale, ks_ptr, S, False,
                                                   PV_FP8, MAGIC_CVT, TWO_LEVEL, FIXED, klo_bufs,
                                                   K_SPLIT)
    if n_blocks > 1:
        acc, m_i, l_i, alpha, p_op = _attend_block(n_blocks - 1, sm, q_smem, acc, m_i, l_i, alpha,
                                                   p_op, s_zero, o_zero, q_scale, ks_ptr, S, True,
                                                   PV_FP8, MAGIC_CVT, TWO_LEVEL, FIXED, klo_bufs,
                                                   K_SPLIT)

    # ---- the last block's P V
    last = (n_blocks - 1) % sm.STAGES
    if TWO_LEVEL:
        pv = warpgroup_mma(p_op, _v_operand(sm, last, PV_FP8), o_zero, use_acc=False,
                           is_async=True)
        pv = warpgroup_mma_wait(0, deps=(pv,))
        if FIXED:
            acc = acc + pv
        else:
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None] + pv
    else:
        acc = warpgroup_mma(p_op, _v_operand(sm, last, PV_FP8), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(sm.kv_empty.index(last))
    if FIXED:
        l_i = gl.convert_layout(gl.sum(l_i, axis=1), gl.SliceLayout(1, s_layout))
    return acc, l_i


@gluon.jit
def _consumer_partition(sm, o_ptr, qs_ptr, ks_ptr, vs_ptr, q_start, S, stride_os, qk_scale,
                        fixed, m_fixed, WG: gl.constexpr, PV_FP8: gl.constexpr,
                        MAGIC_CVT: gl.constexpr, TWO_LEVEL: gl.constexpr, BOUNDED: gl.constexpr,
                        klo_bufs, K_SPLIT: gl.constexpr, K_SPLIT_HEADS: gl.constexpr):
    """One warpgroup: 64 query rows against all keys; stores its rows of the output. BOUNDED and
    ``fixed`` (this head's score bound holds, ``hopper_fwd._score_bound``): the softmax against
    the fixed ``m_fixed``, else with a running row max. K_SPLIT_HEADS: k's second part only in
    the running-max loop."""
    BLOCK_M: gl.constexpr = sm.q_bufs.type.shape[1]
    HEAD_D: gl.constexpr = sm.q_bufs.type.shape[2]
    s_layout: gl.constexpr = mma_layout(sm.BLOCK_N, 32)
    if PV_FP8:
        o_layout: gl.constexpr = mma_layout(HEAD_D, 32)
    else:
        o_layout: gl.constexpr = mma_layout(HEAD_D)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    rows = q_start + WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_layout)
    q_scale = gl.load(qs_ptr + rows, mask=rows < S, other=1.0) * qk_scale
    q_smem = sm.q_bufs.index(WG)
    mbarrier.wait(sm.q_bar, 0)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
    if BOUNDED:
        if fixed:
            if K_SPLIT_HEADS:
                acc, l_i = _consumer_loop(sm, q_smem, m_fixed, q_scale, ks_ptr, S, PV_FP8,
                                          MAGIC_CVT, TWO_LEVEL, True, klo_bufs, False)
            else:
                acc, l_i = _consumer_loop(sm, q_smem, m_fixed, q_scale, ks_ptr, S, PV_FP8,
                                          MAGIC_CVT, TWO_LEVEL, True, klo_bufs, K_SPLIT)
        else:
            acc, l_i = _consumer_loop(sm, q_smem, m_i, q_scale, ks_ptr, S, PV_FP8, MAGIC_CVT,
                                      TWO_LEVEL, False, klo_bufs, K_SPLIT)
    else:
        acc, l_i = _consumer_loop(sm, q_smem, m_i, q_scale, ks_ptr, S, PV_FP8, MAGIC_CVT,
                                  TWO_LEVEL, False, klo_bufs, K_SPLIT)

    # ---- epilogue: O / l (times V's per-channel scale); rows past S are not stored
    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    if PV_FP8:  # (the factor 448 of P is in both O and l)
        cols_o = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        out = out * gl.load(vs_ptr + cols_o)[None, :]
    store_rows(out, o_ptr, q_start + WG * BLOCK_M, S, stride_os)


@gluon.jit
def _hopper_int8_attention_fwd_kernel(q_desc, k_desc, v_desc, qs_ptr, ks_ptr, vs_ptr, o_ptr,
                                      norm_ptr, S, H, BH, stride_ob, stride_os, stride_oh,
                                      qk_scale, NUM_WG: gl.constexpr, STAGES: gl.constexpr,
                                      PV_FP8: gl.constexpr, MAGIC_CVT: gl.constexpr,
                                      TWO_LEVEL: gl.constexpr, BOUNDED: gl.constexpr,
                                      V_TOKEN_MAJOR: gl.constexpr,
                                      CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
                                      klo_desc=None, K_SPLIT: gl.constexpr = False,
                                      K_SPLIT_HEADS: gl.constexpr = False):
    """out[b, rows, h] = softmax(q k^T * scale) v from 8-bit q, k (and v) for NUM_WG * 64 query
    rows of one (b, h). Descriptors: q, k over int8 [B*H*S, D]; v over float8 [B*H*D, S_pad]
    (V^T, PV_FP8), 16-bit [B*H*S, D] or (V_TOKEN_MAJOR) V's token-major [B*S, H*D] view.
    qs: q scales [B*H*S]; ks: k scales [B*H, n_blocks]; vs: v scales [B*H, D];
    qk_scale = sm_scale * log2(e). BOUNDED: norm_ptr holds the max squared row norms of the
    dequantized q and smoothed k per head ([2, BH]); heads whose bound holds run the fixed-max
    softmax (``hopper_fwd._score_bound``), the others the running max. K_SPLIT: klo_desc over k's
    second INT8 part (as k_desc); None (a constexpr: not a kernel parameter) otherwise.
    K_SPLIT_HEADS: only heads without the fixed max use it."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start = pid_m * (BLOCK_M * NUM_WG)
    row_kv = pid_bh * S
    row_q = row_kv + q_start
    o_base = o_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    qs_base = qs_ptr + row_kv.to(gl.int64)
    ks_base = ks_ptr + pid_bh * gl.cdiv(S, BLOCK_N)
    vs_base = vs_ptr + pid_bh * HEAD_D
    if PV_FP8:
        v_row = pid_bh * HEAD_D  # V^T rows
        v_col = 0
    elif V_TOKEN_MAJOR:
        v_row = b * S
        v_col = h * HEAD_D
    else:
        v_row = row_kv
        v_col = 0
    if BOUNDED:
        fixed, m_fixed = _score_bound(norm_ptr, pid_bh, BH, qk_scale)
    else:
        fixed = pid_bh < 0  # unused
        m_fixed = qk_scale * 0.0

    sm = alloc_shared(q_desc, k_desc, v_desc, NUM_WG, STAGES, PV_FP8)
    if K_SPLIT:
        klo_bufs = gl.allocate_shared_memory(klo_desc.dtype, [STAGES, BLOCK_N, HEAD_D],
                                             klo_desc.layout)
        klo_tma = klo_desc
        if K_SPLIT_HEADS and BOUNDED:
            split = fixed == 0  # the loader brings k_lo for the running-max heads only
        else:
            split = gl.constexpr(True)
    else:  # constexprs: no argument for the partitions
        klo_bufs = gl.constexpr(0)
        klo_tma = gl.constexpr(0)
        split = gl.constexpr(False)
    if NUM_WG == 2:
        gl.warp_specialize([
            (_consumer_partition, (sm, o_base, qs_base, ks_base, vs_base, q_start, S, stride_os,
                                   qk_scale, fixed, m_fixed, 0, PV_FP8, MAGIC_CVT, TWO_LEVEL,
                                   BOUNDED, klo_bufs, K_SPLIT, K_SPLIT_HEADS)),
            (_consumer_partition, (sm, o_base, qs_base, ks_base, vs_base, q_start, S, stride_os,
                                   qk_scale, fixed, m_fixed, 1, PV_FP8, MAGIC_CVT, TWO_LEVEL,
                                   BOUNDED, klo_bufs, K_SPLIT, K_SPLIT_HEADS)),
            (_load_partition, (sm, q_desc, k_desc, v_desc, row_q, row_kv, v_row, v_col, S,
                               PV_FP8, klo_tma, klo_bufs, K_SPLIT, split)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])
    else:
        gl.static_assert(NUM_WG == 3, "NUM_WG is 2 or 3")
        gl.warp_specialize([
            (_consumer_partition, (sm, o_base, qs_base, ks_base, vs_base, q_start, S, stride_os,
                                   qk_scale, fixed, m_fixed, 0, PV_FP8, MAGIC_CVT, TWO_LEVEL,
                                   BOUNDED, klo_bufs, K_SPLIT, K_SPLIT_HEADS)),
            (_consumer_partition, (sm, o_base, qs_base, ks_base, vs_base, q_start, S, stride_os,
                                   qk_scale, fixed, m_fixed, 1, PV_FP8, MAGIC_CVT, TWO_LEVEL,
                                   BOUNDED, klo_bufs, K_SPLIT, K_SPLIT_HEADS)),
            (_consumer_partition, (sm, o_base, qs_base, ks_base, vs_base, q_start, S, stride_os,
                                   qk_scale, fixed, m_fixed, 2, PV_FP8, MAGIC_CVT, TWO_LEVEL,
                                   BOUNDED, klo_bufs, K_SPLIT, K_SPLIT_HEADS)),
            (_load_partition, (sm, q_desc, k_desc, v_desc, row_q, row_kv, v_row, v_col, S,
                               PV_FP8, klo_tma, klo_bufs, K_SPLIT, split)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS])


# ----------------------------------------------------------------------------------------------
# configs and launcher
# ----------------------------------------------------------------------------------------------
def default_config(head_dim: int) -> dict:
    """NUM_WG consumer warpgroups of 64 rows, BLOCK_N keys per block (= the pre-pass's k-scale
    block), STAGES of the ring, the integer-trick s32 -> f32 conversion (MAGIC_CVT), P V in FP8
    (PV_FP8; measured slower and less accurate, off) and its two-level accumulation (TWO_LEVEL),
    the softmax without a running max where the score bound allows (SCORE_BOUND; bf16 P only),
    and the pre-pass's rotation of q and k (ROTATE: ``int8_prepass.rotation_matrix``; the kernel
    is the same either way; default ``int8_prepass.rotate_default(head_dim)``: on unless
    COGVIDEOX_KERNELS_INT8_ROTATE=0), k as two INT8 parts (K_SPLIT: a second s8 Q K^T per key
    block; False, True or "heads": only for the heads that keep the running max; MAGIC_CVT does
    not apply to it; default ``int8_prepass.k_split_default()``: "heads" unless
    COGVIDEOX_KERNELS_INT8_K_SPLIT=0 / 1)."""
    from .int8_prepass import k_split_default, rotate_default

    return dict(NUM_WG=3, BLOCK_N=128, STAGES=4 if head_dim <= 64 else 2, PV_FP8=False,
                MAGIC_CVT=True, TWO_LEVEL=False, SCORE_BOUND=True, ROTATE=rotate_default(head_dim),
                K_SPLIT=k_split_default())


def resolve_config(head_dim: int, config: dict | None) -> dict:
    cfg = {**default_config(head_dim), **(config or {})}
    unknown = set(cfg) - set(default_config(head_dim))
    if unknown:
        raise ValueError(f"config keys {sorted(unknown)} are not known; the kernel takes "
                         f"{sorted(default_config(head_dim))}")
    if cfg["NUM_WG"] not in (2, 3):
        raise ValueError(f"NUM_WG={cfg['NUM_WG']}: the kernel takes 2 or 3 consumer warpgroups")
    from .int8_prepass import k_split_mode

    cfg["K_SPLIT"] = k_split_mode(cfg["K_SPLIT"], "K_SPLIT")
    return cfg


def bound_applies(cfg: dict, v_dtype: torch.dtype) -> bool:
    """Whether the fixed-max softmax can run: asked for (SCORE_BOUND) and P in bf16. e4m3 P
    (PV_FP8) and fp16 P lack the exponent range for numerators from 2^-96 to 2^64."""
    return bool(cfg["SCORE_BOUND"]) and not cfg["PV_FP8"] and v_dtype == torch.bfloat16


def _constexprs(cfg: dict, bounded: bool, v_token_major: bool = False) -> dict:
    consumer_regs, loader_regs = _registers(cfg["NUM_WG"])
    out = dict(NUM_WG=cfg["NUM_WG"], STAGES=cfg["STAGES"], PV_FP8=bool(cfg["PV_FP8"]),
               MAGIC_CVT=bool(cfg["MAGIC_CVT"]) and not cfg["K_SPLIT"],  # |S| < 2^22 only
               TWO_LEVEL=bool(cfg["TWO_LEVEL"]), BOUNDED=bool(bounded),
               V_TOKEN_MAJOR=bool(v_token_major), CONSUMER_REGS=consumer_regs,
               LOADER_REGS=loader_regs)
    if cfg["K_SPLIT"]:  # (absent otherwise: the default kernel's signature stays as it was)
        out["K_SPLIT"] = True
        if cfg["K_SPLIT"] == "heads":
            out["K_SPLIT_HEADS"] = True
    return out


def _nvmma(block, dtype):
    return gl.NVMMASharedLayout.get_default_for(block, dtype)


_GL_DTYPES = {torch.int8: gl.int8, torch.float8_e4m3fn: gl.float8e4nv,
              torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def hopper_int8_attention_core(q8, q_scale, k8, k_scale, v, v_scale, out, scale: float,
                               config: dict | None = None, norm_max: torch.Tensor | None = None,
                               *, v_token_major: bool = False,
                               k8_lo: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v from the pre-pass's tensors (``int8_prepass.Int8Inputs``).

    q8, k8: int8 [B, H, S, D] contiguous; q_scale [B, H, S], k_scale [B, H, cdiv(S, BLOCK_N)],
    v_scale [B, H, D] float32; v: float8_e4m3fn V^T [B, H, D, S_pad] (PV_FP8), 16-bit
    [B, H, S, D] contiguous, or with ``v_token_major`` a 16-bit [B, S, H, D] whose (B, S) and
    (H, D) dims merge (``hopper_fwd.v_token_major_ok``: the QKV slice, read in place); out:
    [B, S, H, D] with stride 1 in D (written and returned). ``norm_max``: float32 [2, B * H], the
    max squared row norms of the dequantized q and smoothed k (``Int8Inputs.norm_max``); with it
    (and ``bound_applies``) heads whose score bound holds skip the running max. ``k8_lo``: k's
    second INT8 part (int8, as k8; ``Int8Inputs.k8_lo``), needed by and only by K_SPLIT; with
    K_SPLIT="heads" norm_max must be k8's alone (the pre-pass's ``k_split="heads"``), else the
    two-part k's.
    """
    B, H, S, D = q8.shape
    cfg = resolve_config(D, config)
    if bool(cfg["K_SPLIT"]) != (k8_lo is not None):
        raise ValueError(f"k8_lo: K_SPLIT={cfg['K_SPLIT']} needs k's second INT8 part exactly when "
                         f"on (the pre-pass's k_split=True); got "
                         f"{'None' if k8_lo is None else 'a tensor'}")
    if k8_lo is not None and (k8_lo.dtype != torch.int8 or k8_lo.shape != k8.shape
                              or not k8_lo.is_contiguous()):
        raise ValueError(f"k8_lo must be a contiguous int8 tensor shaped like k8 "
                         f"{tuple(k8.shape)}; got {k8_lo.dtype} {tuple(k8_lo.shape)}")
    if k_scale.shape[-1] != triton.cdiv(S, cfg["BLOCK_N"]):
        raise ValueError(f"k_scale has {k_scale.shape[-1]} blocks; BLOCK_N={cfg['BLOCK_N']} "
                         f"needs {triton.cdiv(S, cfg['BLOCK_N'])}")
    rows = B * H * S
    q_desc = TensorDescriptor(q8, [rows, D], [D, 1], [64, D], _nvmma([64, D], gl.int8))
    k_desc = TensorDescriptor(k8, [rows, D], [D, 1], [cfg["BLOCK_N"], D],
                              _nvmma([cfg["BLOCK_N"], D], gl.int8))
    klo_desc = None if k8_lo is None else TensorDescriptor(
        k8_lo, [rows, D], [D, 1], [cfg["BLOCK_N"], D], _nvmma([cfg["BLOCK_N"], D], gl.int8))
    if cfg["PV_FP8"]:
        if v.dtype != torch.float8_e4m3fn or v_scale is None or v_token_major:
            raise ValueError(f"PV_FP8 needs V^T in float8_e4m3fn and v_scale; v is {v.dtype}"
                             f"{' (token-major)' if v_token_major else ''}")
        s_pad = v.shape[-1]
        box = [D, cfg["BLOCK_N"]]
        v_desc = TensorDescriptor(v, [B * H * D, s_pad], [s_pad, 1], box,
                                  _nvmma(box, gl.float8e4nv))
    else:
        if v.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"v must be bf16/fp16 without PV_FP8, got {v.dtype}")
        box = [cfg["BLOCK_N"], D]
        layout = _nvmma(box, _GL_DTYPES[v.dtype])
        if v_token_major:
            if tuple(v.shape) != (B, S, H, D) or not v_token_major_ok(v):
                raise ValueError(f"v: a token-major V must be [B, S, H, D]={[B, S, H, D]} with "
                                 f"merged (B, S) and (H, D) dims and 16-byte aligned rows; got "
                                 f"shape {tuple(v.shape)}, strides {v.stride()}")
            v_desc = TensorDescriptor(v, [B * S, H * D], [v.stride(1), 1], box, layout)
        else:
            if tuple(v.shape) != (B, H, S, D) or not v.is_contiguous():
                raise ValueError(f"v must be contiguous [B, H, S, D]={[B, H, S, D]} (or pass "
                                 f"v_token_major=True); got {tuple(v.shape)}, strides {v.stride()}")
            v_desc = TensorDescriptor(v, [rows, D], [D, 1], box, layout)
        v_scale = q_scale  # not read
    bounded = norm_max is not None and bound_applies(cfg, v.dtype)
    if norm_max is not None and (norm_max.dtype != torch.float32 or norm_max.numel() != 2 * B * H
                                 or not norm_max.is_contiguous()):
        raise ValueError(f"norm_max must be a contiguous float32 tensor of 2*B*H={2 * B * H} "
                         f"elements, got {norm_max.dtype} {tuple(norm_max.shape)}")
    grid = (triton.cdiv(S, 64 * cfg["NUM_WG"]), B * H)
    _hopper_int8_attention_fwd_kernel[grid](
        q_desc, k_desc, v_desc, q_scale, k_scale, v_scale, out,
        norm_max if bounded else q_scale, S, H, B * H, out.stride(0), out.stride(1),
        out.stride(2), float(scale) * LOG2E, **_constexprs(cfg, bounded, v_token_major),
        **({} if klo_desc is None else dict(klo_desc=klo_desc)), num_warps=4)
    return out


def compile_offline(config: dict | None = None, head_dim: int = 64, out_dtype: str = "bf16",
                    v_token_major: bool = False):
    """Compile the kernel for sm_90a without a GPU (PTX/SASS, registers, spills); the score
    bound is compiled in where ``bound_applies``. Needs ``TRITON_INTERPRET`` unset."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    cfg = resolve_config(head_dim, config)
    D, N = head_dim, cfg["BLOCK_N"]

    def desc_type(name, box, gdt):
        return f"tensordesc<{name}[{box[0]}, {box[1]}],{_nvmma(box, gdt)!r}>"

    if cfg["PV_FP8"]:
        v_type = desc_type("fp8e4nv", [D, N], gl.float8e4nv)
    else:
        v_type = desc_type(out_dtype, [N, D], gl.bfloat16 if out_dtype == "bf16" else gl.float16)
    signature = {"q_desc": desc_type("i8", [64, D], gl.int8), "k_desc": desc_type("i8", [N, D], gl.int8),
                 "v_desc": v_type, "qs_ptr": "*fp32", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
                 "o_ptr": f"*{out_dtype}", "norm_ptr": "*fp32", "S": "i32", "H": "i32",
                 "BH": "i32", "stride_ob": "i32", "stride_os": "i32", "stride_oh": "i32",
                 "qk_scale": "fp32"}
    v_dtype = torch.bfloat16 if out_dtype == "bf16" else torch.float16
    constexprs = _constexprs(cfg, bound_applies(cfg, v_dtype), v_token_major)
    if cfg["K_SPLIT"]:
        signature["klo_desc"] = desc_type("i8", [N, D], gl.int8)
    signature.update({name: "constexpr" for name in constexprs})
    src = GluonASTSource(_hopper_int8_attention_fwd_kernel, signature=signature,
                         constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
