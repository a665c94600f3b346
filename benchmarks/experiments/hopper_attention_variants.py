"""Experimental variants of the Hopper attention kernel (not shipped; the benchmark sweeps them).

They are variants of the running-max loop. The shipped kernel has since gained the score-bound
loop (a fixed per-head max, ``hopper_fwd._score_bound``), which is not in this module; its own
variants (polynomial exp2 shares, BLOCK_N 64) are in ``hopper_bound_probe.py`` and the notes.

A superset of ``cogvideox_kernels/ops/attention/hopper_fwd.py``: with the default options it
compiles to the same instruction sequence (``hopper_same_sass.py`` checks it offline). The extra
constexpr options and what they measured on the H200 (``benchmarks/results/hopper_attention_notes.md``):

* ``OVERLAP=False``: wait for S_j before issuing P_{j-1} V_{j-1} (no intra-warpgroup overlap):
  17.15 vs 17.35 ms with 2 consumer warpgroups, i.e. the overlap bought nothing there.
* ``PINGPONG``: consumer warpgroups take turns issuing their GEMMs (one mbarrier per warpgroup):
  2 WGs 17.33 vs 17.35 ms, 3 WGs 15.19-15.26 vs 15.17-15.19 ms: no gain.
* ``N_B`` (+ ``POLY_B``): a second key part per block (e.g. 128 + 64 = 192 keys), optionally with
  exp2 as a degree-3 polynomial on the FMA pipe: 17.28 (N 192), 17.78 (192, poly on 64), 17.59
  (160, poly on 32) vs 17.35 ms: the FMA pipe is not free either.
* ``ROWSUM_MMA``: row sums as P x ones on the tensor cores (8 HGMMA 64x8x16 per block instead of 68
  FADD): the first version (an N-major [BLOCK_N, 8] ones tile) hit an illegal address on the H200;
  the K-major version here compiles but has NOT run on a GPU yet.
"""


import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _exp2_poly(x):
    """2^x for x <= 0 on the FMA pipe: 2^round(x) into the exponent bits, 2^f (|f| <= 0.5) by a
    degree-3 minimax polynomial (relative error 7.5e-5, far below the bf16 rounding of P)."""
    x = gl.maximum(x, -125.0)
    shifted = x + 12582912.0  # 1.5 * 2^23: round(x) lands in the low mantissa bits
    f = x - (shifted - 12582912.0)
    p = f * 0.05517167 + 0.24261115
    p = p * f + 0.69326099
    p = p * f + 0.99992807
    bits = p.to(gl.int32, bitcast=True) + (shifted.to(gl.int32, bitcast=True) << 23)
    return bits.to(gl.float32, bitcast=True)



@gluon.jit
def _mask_tail(s, n0, S):
    """Scores of key columns n0 + c >= S (past the sequence) -> -inf."""
    cols = n0 + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
    return gl.where((cols < S)[None, :], s, float("-inf"))


@aggregate
class _Shared:
    """Shared-memory buffers and mbarriers of one CTA. A key block is BLOCK_N + N_B keys: part A
    (BLOCK_N keys, exp2 on MUFU) and part B (N_B keys, 0 = none; exp2 on the FMA pipe when
    POLY_B). Tensor shapes must be powers of two, so a block of 192 keys is 128 + 64.
    ROWSUM_MMA: the softmax row sums come from the tensor cores, P times a [BLOCK_N, 8] tile of
    ones (``ones``), instead of one FADD per score on the FMA pipe."""
    q_bufs: gl.shared_memory_descriptor
    ka_bufs: gl.shared_memory_descriptor
    va_bufs: gl.shared_memory_descriptor
    kb_bufs: gl.shared_memory_descriptor
    vb_bufs: gl.shared_memory_descriptor
    q_bar: gl.shared_memory_descriptor
    k_ready: gl.shared_memory_descriptor
    v_ready: gl.shared_memory_descriptor
    kv_empty: gl.shared_memory_descriptor
    turn_bars: gl.shared_memory_descriptor
    ones: gl.shared_memory_descriptor
    NUM_WG: gl.constexpr
    BLOCK_N: gl.constexpr
    N_B: gl.constexpr
    STAGES: gl.constexpr
    ROWSUM_MMA: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, q_bufs, ka_bufs, va_bufs, kb_bufs, vb_bufs, q_bar, k_ready, v_ready,
                 kv_empty, turn_bars, ones, NUM_WG, BLOCK_N, N_B, STAGES, ROWSUM_MMA):
        self.q_bufs = q_bufs
        self.ka_bufs = ka_bufs
        self.va_bufs = va_bufs
        self.kb_bufs = kb_bufs
        self.vb_bufs = vb_bufs
        self.q_bar = q_bar
        self.k_ready = k_ready
        self.v_ready = v_ready
        self.kv_empty = kv_empty
        self.turn_bars = turn_bars
        self.ones = ones
        self.NUM_WG = gl.constexpr(NUM_WG)
        self.BLOCK_N = gl.constexpr(BLOCK_N)
        self.N_B = gl.constexpr(N_B)
        self.STAGES = gl.constexpr(STAGES)
        self.ROWSUM_MMA = gl.constexpr(ROWSUM_MMA)


@gluon.jit
def _load_partition(sm, q_desc, ka_desc, va_desc, kb_desc, vb_desc, row_q, row_kv, S):
    """One warp: the Q tiles once, then K and V blocks into the ring (K and V on separate
    barriers, so Q K^T can start before V has landed)."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    BN_TOT: gl.constexpr = sm.BLOCK_N + sm.N_B
    mbarrier.expect(sm.q_bar, sm.NUM_WG * q_desc.block_type.nbytes)
    for i in gl.static_range(sm.NUM_WG):
        tma.async_copy_global_to_shared(q_desc, [row_q + i * BLOCK_M, 0], sm.q_bar,
                                        sm.q_bufs.index(i))
    k_bytes: gl.constexpr = ka_desc.block_type.nbytes + (kb_desc.block_type.nbytes if sm.N_B > 0 else 0)
    n_blocks = gl.cdiv(S, BN_TOT)
    for j in range(n_blocks):
        stage = j % sm.STAGES
        mbarrier.wait(sm.kv_empty.index(stage), ((j // sm.STAGES) & 1) ^ 1)
        row = row_kv + j * BN_TOT
        k_bar = sm.k_ready.index(stage)
        mbarrier.expect(k_bar, k_bytes)
        tma.async_copy_global_to_shared(ka_desc, [row, 0], k_bar, sm.ka_bufs.index(stage))
        if sm.N_B > 0:
            tma.async_copy_global_to_shared(kb_desc, [row + sm.BLOCK_N, 0], k_bar,
                                            sm.kb_bufs.index(stage))
        v_bar = sm.v_ready.index(stage)
        mbarrier.expect(v_bar, k_bytes)
        tma.async_copy_global_to_shared(va_desc, [row, 0], v_bar, sm.va_bufs.index(stage))
        if sm.N_B > 0:
            tma.async_copy_global_to_shared(vb_desc, [row + sm.BLOCK_N, 0], v_bar,
                                            sm.vb_bufs.index(stage))


@gluon.jit
def _issue_qk(q_smem, sm, stage, s_zero, sb_zero):
    """Start S = Q K^T on the tensor cores (async), part A and part B."""
    s = warpgroup_mma(q_smem, sm.ka_bufs.index(stage).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    if sm.N_B > 0:
        sb = warpgroup_mma(q_smem, sm.kb_bufs.index(stage).permute((1, 0)), sb_zero,
                           use_acc=False, is_async=True)
    else:
        sb = sb_zero
    return s, sb


@gluon.jit
def _wait_qk(s, sb, pending: gl.constexpr, N_B: gl.constexpr):
    if N_B > 0:
        s, sb = warpgroup_mma_wait(pending, deps=(s, sb))
    else:
        s = warpgroup_mma_wait(pending, deps=(s,))
    return s, sb


@gluon.jit
def _issue_pv(p_op, pb_op, sm, stage, acc, l_acc):
    """Start O += P V (async), P from registers; with ROWSUM_MMA also L += P 1 (row sums in
    every one of L's 8 columns)."""
    acc = warpgroup_mma(p_op, sm.va_bufs.index(stage), acc, is_async=True)
    if sm.N_B > 0:
        acc = warpgroup_mma(pb_op, sm.vb_bufs.index(stage), acc, is_async=True)
    if sm.ROWSUM_MMA:
        lp_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_acc.type.layout,
                                                      k_width=2)
        ones_t = sm.ones.permute((1, 0))  # [BLOCK_N, 8], K-major like K in Q K^T
        l_acc = warpgroup_mma(gl.convert_layout(p_op, lp_layout), ones_t, l_acc, is_async=True)
        if sm.N_B > 0:
            l_acc = warpgroup_mma(gl.convert_layout(pb_op, lp_layout),
                                  ones_t.slice(0, sm.N_B, dim=0), l_acc, is_async=True)
    return acc, l_acc


@gluon.jit
def _softmax_step(s, sb, m_i, l_i, qk_scale, n0, S, N_B: gl.constexpr, POLY_B: gl.constexpr,
                  MASK: gl.constexpr, ROWSUM_MMA: gl.constexpr):
    """Online softmax on one key block: P of parts A and B (fp32), the new row max and row sum,
    and alpha = 2^(m_old - m_new) for the accumulator. exp2 takes the scale folded into one FMA.
    With ROWSUM_MMA l_i is the [BLOCK_M, 8] MMA accumulator of the row sums, left unchanged here."""
    row_layout: gl.constexpr = m_i.type.layout
    if MASK:  # the last block: keys past S score -inf
        s = _mask_tail(s, n0, S)
        if N_B > 0:
            sb = _mask_tail(sb, n0 + s.shape[1], S)
    m_blk = gl.max(s, axis=1)
    if N_B > 0:
        m_blk = gl.maximum(m_blk, gl.convert_layout(gl.max(sb, axis=1), row_layout))
    m_new = gl.maximum(m_i, m_blk * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    if not ROWSUM_MMA:
        row_sum = gl.sum(p, axis=1)
    if N_B > 0:
        mb = gl.convert_layout(m_new, gl.SliceLayout(1, sb.type.layout))
        if POLY_B:
            pb = _exp2_poly(sb * qk_scale - mb[:, None])
        else:
            pb = gl.exp2(sb * qk_scale - mb[:, None])
        if not ROWSUM_MMA:
            row_sum = row_sum + gl.convert_layout(gl.sum(pb, axis=1), row_layout)
    else:
        pb = p
    alpha = gl.exp2(m_i - m_new)
    if not ROWSUM_MMA:
        l_i = l_i * alpha + row_sum
    return p, pb, m_new, l_i, alpha


@gluon.jit
def _attend_block(j, sm, q_smem, acc, m_i, l_i, p_op, pb_op, s_zero, sb_zero, turn, next_turn,
                  qk_scale, S, MASK: gl.constexpr, OVERLAP: gl.constexpr,
                  PINGPONG: gl.constexpr, POLY_B: gl.constexpr):
    """Key block j >= 1: issue S_j = Q K_j^T, issue O += P_{j-1} V_{j-1}, wait for S_j, softmax
    of S_j (while P V runs on the tensor cores, when OVERLAP), wait for P V, rescale O.
    MASK: j is the last block (keys past S are masked). No branch may sit between the P V issue
    and its wait: ptxas then waits for the wgmma at the join and the overlap is lost."""
    N_B: gl.constexpr = sm.N_B
    STAGES: gl.constexpr = sm.STAGES
    PV_GROUPS: gl.constexpr = (2 if N_B > 0 else 1) * (2 if sm.ROWSUM_MMA else 1)
    stage = j % STAGES
    prev = (j - 1) % STAGES
    if PINGPONG:
        mbarrier.wait(turn, j & 1)
    mbarrier.wait(sm.k_ready.index(stage), (j // STAGES) & 1)
    s, sb = _issue_qk(q_smem, sm, stage, s_zero, sb_zero)
    if not OVERLAP:
        s, sb = _wait_qk(s, sb, 0, N_B)
    acc, l_i = _issue_pv(p_op, pb_op, sm, prev, acc, l_i)  # V_{j-1}: waited for by the last step
    if PINGPONG:
        mbarrier.arrive(next_turn)
    if OVERLAP:
        s, sb = _wait_qk(s, sb, PV_GROUPS, N_B)
    p, pb, m_i, l_i, alpha = _softmax_step(s, sb, m_i, l_i, qk_scale, j * (sm.BLOCK_N + N_B), S,
                                           N_B, POLY_B, MASK, sm.ROWSUM_MMA)
    # Wait for V_j (needed by the next step) here: the mbarrier poll loop ends a basic block, so
    # ptxas cannot hoist the P V wait below above the softmax (it does within one block).
    mbarrier.wait(sm.v_ready.index(stage), (j // STAGES) & 1)
    if sm.ROWSUM_MMA:
        acc, l_i = warpgroup_mma_wait(0, deps=(acc, l_i))
        l_i = l_i * gl.convert_layout(alpha, gl.SliceLayout(1, l_i.type.layout))[:, None]
    else:
        acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(sm.kv_empty.index(prev))
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    p_op = gl.convert_layout(p.to(p_op.dtype), p_op.type.layout)
    pb_op = gl.convert_layout(pb.to(p_op.dtype), p_op.type.layout)
    return acc, m_i, l_i, p_op, pb_op


@gluon.jit
def _consumer_partition(sm, o_ptr, q_start, S, stride_os, qk_scale, WG: gl.constexpr,
                        OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, POLY_B: gl.constexpr):
    """One warpgroup: BLOCK_M (64 or 128) query rows against all keys; stores its rows of the
    output."""
    BLOCK_M: gl.constexpr = sm.q_bufs.type.shape[1]
    HEAD_D: gl.constexpr = sm.q_bufs.type.shape[2]
    dtype: gl.constexpr = sm.q_bufs.dtype
    BLOCK_N: gl.constexpr = sm.BLOCK_N
    N_B: gl.constexpr = sm.N_B
    STAGES: gl.constexpr = sm.STAGES
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    if sm.ROWSUM_MMA:  # row sums accumulate on the tensor cores, 8 equal columns
        l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 8, 16])
        l_i = gl.zeros([BLOCK_M, 8], gl.float32, layout=l_layout)
    else:
        l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    if N_B > 0:
        sb_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, N_B, 16])
        sb_zero = gl.zeros([BLOCK_M, N_B], gl.float32, layout=sb_layout)
    else:
        sb_zero = s_zero
    turn = sm.turn_bars.index(WG)
    next_turn = sm.turn_bars.index((WG + 1) % sm.NUM_WG)

    q_smem = sm.q_bufs.index(WG)
    mbarrier.wait(sm.q_bar, 0)
    n_blocks = gl.cdiv(S, BLOCK_N + N_B)

    # ---- block 0: S_0 and its softmax (masked: it may also be the last block)
    if PINGPONG:
        mbarrier.wait(turn, 0)
    mbarrier.wait(sm.k_ready.index(0), 0)
    s, sb = _issue_qk(q_smem, sm, 0, s_zero, sb_zero)
    if PINGPONG:
        mbarrier.arrive(next_turn)
    s, sb = _wait_qk(s, sb, 0, N_B)
    p, pb, m_i, l_i, alpha = _softmax_step(s, sb, m_i, l_i, qk_scale, 0, S, N_B, POLY_B, True,
                                           sm.ROWSUM_MMA)
    mbarrier.wait(sm.v_ready.index(0), 0)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    pb_op = gl.convert_layout(pb.to(dtype), p_layout)

    # ---- full blocks 1 .. n-2, then the last block (masked)
    for j in range(1, n_blocks - 1):
        acc, m_i, l_i, p_op, pb_op = _attend_block(j, sm, q_smem, acc, m_i, l_i, p_op, pb_op,
                                                   s_zero, sb_zero, turn, next_turn, qk_scale, S,
                                                   False, OVERLAP, PINGPONG, POLY_B)
    if n_blocks > 1:
        acc, m_i, l_i, p_op, pb_op = _attend_block(n_blocks - 1, sm, q_smem, acc, m_i, l_i, p_op,
                                                   pb_op, s_zero, sb_zero, turn, next_turn,
                                                   qk_scale, S, True, OVERLAP, PINGPONG, POLY_B)

    # ---- the last block's P V
    last = (n_blocks - 1) % STAGES
    if PINGPONG:
        mbarrier.wait(turn, n_blocks & 1)
    acc, l_i = _issue_pv(p_op, pb_op, sm, last, acc, l_i)
    if PINGPONG:
        mbarrier.arrive(next_turn)
    if sm.ROWSUM_MMA:
        acc, l_i = warpgroup_mma_wait(0, deps=(acc, l_i))
        l_i = gl.max(l_i, axis=1)
    else:
        acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(sm.kv_empty.index(last))

    # ---- epilogue: O / l; rows past S are not stored
    out = acc / gl.convert_layout(l_i, orow_layout)[:, None]
    TPW_D: gl.constexpr = HEAD_D // 8
    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [4, 1], [1, 0])
    out = gl.convert_layout(out.to(dtype), store_layout)
    rows = q_start + WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store_layout))
    cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, store_layout))
    ptrs = o_ptr + rows.to(gl.int64)[:, None] * stride_os + cols[None, :]
    gl.store(ptrs, out, mask=(rows < S)[:, None])


@gluon.jit
def _hopper_attention_fwd_kernel(q_desc, ka_desc, va_desc, kb_desc, vb_desc, o_ptr, S, H,
                                 stride_ob, stride_os, stride_oh, qk_scale,
                                 NUM_WG: gl.constexpr, N_B: gl.constexpr, STAGES: gl.constexpr,
                                 OVERLAP: gl.constexpr, PINGPONG: gl.constexpr,
                                 POLY_B: gl.constexpr, ROWSUM_MMA: gl.constexpr,
                                 CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    """out[b, rows, h] = softmax(q k^T * scale) v for NUM_WG * BLOCK_M query rows of one (b, h).

    Descriptors are over the head-major [B*H*S, D] storage; ka/va boxes are BLOCK_N keys, kb/vb
    boxes N_B keys (unused when N_B = 0). qk_scale = scale * log2(e).
    """
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = ka_desc.block_type.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start = pid_m * (BLOCK_M * NUM_WG)
    row_kv = pid_bh * S
    row_q = row_kv + q_start
    o_base = o_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh

    q_bufs = gl.allocate_shared_memory(dtype, [NUM_WG, BLOCK_M, HEAD_D], q_desc.layout)
    ka_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], ka_desc.layout)
    va_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], va_desc.layout)
    if N_B > 0:
        kb_bufs = gl.allocate_shared_memory(dtype, [STAGES, N_B, HEAD_D], kb_desc.layout)
        vb_bufs = gl.allocate_shared_memory(dtype, [STAGES, N_B, HEAD_D], vb_desc.layout)
    else:
        kb_bufs = ka_bufs
        vb_bufs = va_bufs
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    q_bar = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    turn_bars = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], bar_layout)
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=NUM_WG)
    for i in gl.static_range(NUM_WG):
        mbarrier.init(turn_bars.index(i), count=1)
    if PINGPONG:
        mbarrier.arrive(turn_bars.index(0))  # warpgroup 0 issues first
    if ROWSUM_MMA:
        # stored [8, BLOCK_N] (K contiguous, 128-byte swizzle) and fed transposed, the layout
        # the K tiles use; a [BLOCK_N, 8] N-major tile (16-byte rows, no swizzle) faulted on the
        # H200 (illegal address, run 3)
        ones_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([8, BLOCK_N], dtype)
        fill_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [1, gl.num_warps()], [1, 0])
        ones = gl.allocate_shared_memory(dtype, [8, BLOCK_N], ones_layout,
                                         gl.full([8, BLOCK_N], 1.0, dtype, layout=fill_layout))
        fence_async_shared()  # written by plain stores, read by wgmma (async proxy)
    else:
        ones = q_bar

    sm = _Shared(q_bufs, ka_bufs, va_bufs, kb_bufs, vb_bufs, q_bar, k_ready, v_ready, kv_empty,
                 turn_bars, ones, NUM_WG, BLOCK_N, N_B, STAGES, ROWSUM_MMA)
    if NUM_WG == 1:
        gl.warp_specialize([
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, 0, OVERLAP,
                                   PINGPONG, POLY_B)),
            (_load_partition, (sm, q_desc, ka_desc, va_desc, kb_desc, vb_desc, row_q, row_kv, S)),
        ], [1], [LOADER_REGS])
    elif NUM_WG == 2:
        gl.warp_specialize([
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, 0, OVERLAP,
                                   PINGPONG, POLY_B)),
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, 1, OVERLAP,
                                   PINGPONG, POLY_B)),
            (_load_partition, (sm, q_desc, ka_desc, va_desc, kb_desc, vb_desc, row_q, row_kv, S)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])
    else:
        gl.static_assert(NUM_WG == 3, "NUM_WG is 1, 2 or 3")
        gl.warp_specialize([
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, 0, OVERLAP,
                                   PINGPONG, POLY_B)),
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, 1, OVERLAP,
                                   PINGPONG, POLY_B)),
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, 2, OVERLAP,
                                   PINGPONG, POLY_B)),
            (_load_partition, (sm, q_desc, ka_desc, va_desc, kb_desc, vb_desc, row_q, row_kv, S)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS])


# ----------------------------------------------------------------------------------------------
# configs and launcher
# ----------------------------------------------------------------------------------------------
def default_config(head_dim: int) -> dict:
    """Measured defaults (H200, see the notes file). Keys: NUM_WG consumer warpgroups, BLOCK_N +
    N_B keys per block (part B on the FMA-pipe exp2 when POLY_B), BLOCK_M query rows per consumer
    warpgroup (64 or 128), STAGES of the K/V ring, OVERLAP, PINGPONG."""
    if head_dim <= 64:
        return dict(NUM_WG=3, BLOCK_M=64, BLOCK_N=128, N_B=0, POLY_B=False, STAGES=3,
                    OVERLAP=True, PINGPONG=False, ROWSUM_MMA=False)
    return dict(NUM_WG=3, BLOCK_M=64, BLOCK_N=64, N_B=0, POLY_B=False, STAGES=4, OVERLAP=True,
                PINGPONG=False, ROWSUM_MMA=False)


def _registers(num_wg: int) -> tuple[int, int]:
    """(per consumer warpgroup, loader) registers per thread: the loader warp keeps 24 and the
    consumers share the rest of the 64K register file (one CTA per SM)."""
    total = 65536 // (128 * (num_wg + 1))  # per thread, the loader counted as a warpgroup
    total -= total % 8
    consumer = (total * (num_wg + 1) - 24) // num_wg
    return min(240, consumer - consumer % 8), 24


def hopper_attention_core(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, out: torch.Tensor,
                          scale: float, config: dict | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v on head-major inputs.

    qh, kh, vh: [B, H, S, D] contiguous (bf16/fp16); out: [B, S, H, D] with stride 1 in D
    (written and returned). ``config`` overrides keys of ``default_config``.
    """
    B, H, S, D = qh.shape
    cfg = dict(default_config(D))
    if config:
        cfg.update(config)
    num_wg, block_m, block_n, n_b = cfg["NUM_WG"], cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["N_B"]
    gdt = gl.bfloat16 if qh.dtype == torch.bfloat16 else gl.float16
    rows = B * H * S

    def desc(t, box):
        layout = gl.NVMMASharedLayout.get_default_for([box, D], gdt)
        return TensorDescriptor(t, [rows, D], [D, 1], [box, D], layout)

    q_desc = desc(qh, block_m)
    ka_desc, va_desc = desc(kh, block_n), desc(vh, block_n)
    kb_desc, vb_desc = (desc(kh, n_b), desc(vh, n_b)) if n_b else (ka_desc, va_desc)
    consumer_regs, loader_regs = _registers(num_wg)
    consumer_regs = cfg.get("CONSUMER_REGS", consumer_regs)
    grid = (triton.cdiv(S, block_m * num_wg), B * H)
    _hopper_attention_fwd_kernel[grid](
        q_desc, ka_desc, va_desc, kb_desc, vb_desc, out, S, H, out.stride(0), out.stride(1),
        out.stride(2), float(scale) * LOG2E, NUM_WG=num_wg, N_B=n_b, STAGES=cfg["STAGES"],
        OVERLAP=cfg["OVERLAP"], PINGPONG=cfg["PINGPONG"] and num_wg > 1, POLY_B=cfg["POLY_B"],
        ROWSUM_MMA=cfg["ROWSUM_MMA"], CONSUMER_REGS=consumer_regs, LOADER_REGS=loader_regs, num_warps=4)
    return out


def compile_offline(config: dict | None = None, head_dim: int = 64, dtype: str = "bf16"):
    """Compile the kernel for sm_90a without a GPU (to read its PTX/SASS, registers, spills).
    Needs ``TRITON_INTERPRET`` unset: Gluon does not build under the interpreter."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    cfg = {**default_config(head_dim), **(config or {})}
    gdt = gl.bfloat16 if dtype == "bf16" else gl.float16

    def desc_type(box):
        layout = gl.NVMMASharedLayout.get_default_for([box, head_dim], gdt)
        return f"tensordesc<{dtype}[{box}, {head_dim}],{layout!r}>"

    n_b = cfg["N_B"] or cfg["BLOCK_N"]
    signature = {"q_desc": desc_type(cfg["BLOCK_M"]), "ka_desc": desc_type(cfg["BLOCK_N"]),
                 "va_desc": desc_type(cfg["BLOCK_N"]), "kb_desc": desc_type(n_b),
                 "vb_desc": desc_type(n_b), "o_ptr": f"*{dtype}", "S": "i32", "H": "i32",
                 "stride_ob": "i32", "stride_os": "i32", "stride_oh": "i32", "qk_scale": "fp32"}
    consumer_regs, loader_regs = _registers(cfg["NUM_WG"])
    constexprs = dict(NUM_WG=cfg["NUM_WG"], N_B=cfg["N_B"], STAGES=cfg["STAGES"],
                      OVERLAP=cfg["OVERLAP"], PINGPONG=cfg["PINGPONG"] and cfg["NUM_WG"] > 1,
                      POLY_B=cfg["POLY_B"], ROWSUM_MMA=cfg["ROWSUM_MMA"],
                      CONSUMER_REGS=consumer_regs, LOADER_REGS=loader_regs)
    signature.update({name: "constexpr" for name in constexprs})
    src = GluonASTSource(_hopper_attention_fwd_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
