"""Hopper (sm_90a) attention forward in Gluon, and its launcher.

Work split (measurements in ``benchmarks/results/hopper_attention_notes.md``):

* The Triton pre-pass ``qk_norm_rope_fwd`` norms and rotates q and k and writes q, k, v
  head-major ([B, H, S, D] storage), so every Q/K/V tile is one TMA box of a 2D ``[B*H*S, D]``
  view.
* ``_hopper_attention_fwd_kernel``: a CTA is ``NUM_WG`` consumer warpgroups of ``BLOCK_M`` query
  rows each plus one loader warp (``gl.warp_specialize``; ``setmaxnreg`` moves registers from the
  loader to the consumers). The loader streams K/V blocks of ``BLOCK_N`` keys by TMA into a
  ``STAGES``-deep shared-memory ring (ready/empty mbarriers, K and V on separate barriers). Each
  consumer warpgroup runs ``S = Q K^T`` and ``O += P V`` on ``warpgroup_mma`` (Q, K, V from shared
  memory, P from registers) and an online softmax on exp2 with ``scale * log2(e)`` folded into one
  FMA. Per key block j it issues S_j, then P_{j-1} V_{j-1}, waits for S_j only and runs the softmax
  of S_j while P V is on the tensor cores (see ``_attend_block`` for the ptxas detail this needs).

The measured defaults (H200): 3 consumer warpgroups x 64 rows (192 query rows per CTA, so each
K/V block read from L2 serves more queries), 128-key blocks, a 4-deep ring at head_dim 64; 64-key
blocks and 3 stages at head_dim 128 (f953dd0: 10.61 ms full path vs 10.84 with 4).

Softmax without a running max (bf16): the pre-pass also gives each head's largest squared row
norms of q and k, which bound every score (Cauchy-Schwarz). Where that bound is small enough
(``_score_bound``: always for LayerNorm'd q/k with weights near 1) the consumers subtract a fixed
per-head constant instead of the running row max: no row max, no alpha, no rescale of O, 299
instead of 411 instructions per key block, and the same result (every numerator stays a normal
bf16/fp32 number). Other heads keep the running max in the same launch. Other schedules that were measured (ping-pong,
polynomial exp2, 192-key blocks, 128 rows per warpgroup, tensor-core row sums) live in
``benchmarks/experiments/hopper_attention_variants.py``.

Gluon kernels do not run under ``TRITON_INTERPRET``; this module only launches on a GPU
(``compile_offline`` builds the kernel for sm_90a anywhere). ``hopper.py`` holds the public
wrapper, input checks and the custom op.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

# NB: no `from __future__ import annotations` here: the aggregate below needs real annotations.

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _mask_tail(s, n0, S):
    """Scores of key columns n0 + c >= S (past the sequence) -> -inf."""
    cols = n0 + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
    return gl.where((cols < S)[None, :], s, float("-inf"))


@aggregate
class _Shared:
    """Shared-memory buffers and mbarriers of one CTA."""
    q_bufs: gl.shared_memory_descriptor  # [NUM_WG, BLOCK_M, D]
    k_bufs: gl.shared_memory_descriptor  # [STAGES, BLOCK_N, D]
    v_bufs: gl.shared_memory_descriptor  # [STAGES, BLOCK_N, D]
    q_bar: gl.shared_memory_descriptor
    k_ready: gl.shared_memory_descriptor  # [STAGES] TMA of K landed
    v_ready: gl.shared_memory_descriptor  # [STAGES] TMA of V landed
    kv_empty: gl.shared_memory_descriptor  # [STAGES] every consumer is done with the stage
    NUM_WG: gl.constexpr
    BLOCK_N: gl.constexpr
    STAGES: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, NUM_WG,
                 BLOCK_N, STAGES):
        self.q_bufs = q_bufs
        self.k_bufs = k_bufs
        self.v_bufs = v_bufs
        self.q_bar = q_bar
        self.k_ready = k_ready
        self.v_ready = v_ready
        self.kv_empty = kv_empty
        self.NUM_WG = gl.constexpr(NUM_WG)
        self.BLOCK_N = gl.constexpr(BLOCK_N)
        self.STAGES = gl.constexpr(STAGES)


@gluon.constexpr_function
def mma_layout(n, k=16):
    """The wgmma accumulator layout of a [64, n] tile of one warpgroup (k: the instruction's K, 16
    for 16-bit operands, 32 for 8-bit ones)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, k])


@gluon.jit
def alloc_shared(q_desc, k_desc, v_desc, NUM_WG: gl.constexpr, STAGES: gl.constexpr,
                 V_T: gl.constexpr = False):
    """The CTA's shared memory (NUM_WG Q tiles, a STAGES-deep K/V ring; V^T tiles [D, BLOCK_N]
    with V_T) and its mbarriers, initialised: kv_empty counts one arrival per consumer."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [NUM_WG, BLOCK_M, HEAD_D], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    if V_T:
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, HEAD_D, BLOCK_N], v_desc.layout)
    else:
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    q_bar = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=NUM_WG)
    return _Shared(q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, NUM_WG, BLOCK_N,
                   STAGES)


@gluon.jit
def load_tile(sm, q_desc, k_desc, v_desc, q_row, q_col, k_row, v_row, v_col, S, base,
              V_T: gl.constexpr = False, klo_desc=None, klo_bufs=None, split=False):
    """The loader warp's work for one tile: the NUM_WG Q boxes at (q_row + i * BLOCK_M, q_col),
    then K and V blocks into the ring (K and V on separate barriers, so Q K^T can start before V
    has landed). K block j is the box at (k_row + j * BLOCK_N, 0); V block j at
    (v_row + j * BLOCK_N, v_col), or with V_T (V^T tiles) at (v_row, v_col + j * BLOCK_N).
    ``base``: ring blocks loaded before this tile (stage and phase continue from there).
    ``klo_desc`` (the INT8 kernel's K_SPLIT): K's second part too, block j into ``klo_bufs`` on
    the same barrier as K's, where ``split`` (a constexpr or the head's runtime flag)."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    mbarrier.expect(sm.q_bar, sm.NUM_WG * q_desc.block_type.nbytes)
    for i in gl.static_range(sm.NUM_WG):
        tma.async_copy_global_to_shared(q_desc, [q_row + i * BLOCK_M, q_col], sm.q_bar,
                                        sm.q_bufs.index(i))
    n_blocks = gl.cdiv(S, sm.BLOCK_N)
    for j in range(n_blocks):
        c = base + j
        stage = c % sm.STAGES
        mbarrier.wait(sm.kv_empty.index(stage), ((c // sm.STAGES) & 1) ^ 1)
        k_bar = sm.k_ready.index(stage)
        if klo_desc is None:
            mbarrier.expect(k_bar, k_desc.block_type.nbytes)
        elif split:
            mbarrier.expect(k_bar, k_desc.block_type.nbytes + klo_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(klo_desc, [k_row + j * sm.BLOCK_N, 0], k_bar,
                                            klo_bufs.index(stage))
        else:
            mbarrier.expect(k_bar, k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row + j * sm.BLOCK_N, 0], k_bar,
                                        sm.k_bufs.index(stage))
        v_bar = sm.v_ready.index(stage)
        mbarrier.expect(v_bar, v_desc.block_type.nbytes)
        if V_T:
            tma.async_copy_global_to_shared(v_desc, [v_row, v_col + j * sm.BLOCK_N], v_bar,
                                            sm.v_bufs.index(stage))
        else:
            tma.async_copy_global_to_shared(v_desc, [v_row + j * sm.BLOCK_N, v_col], v_bar,
                                            sm.v_bufs.index(stage))


@gluon.jit
def _load_partition(sm, q_desc, k_desc, v_desc, row_q, row_kv, v_row, v_col, S):
    """One warp: the tile's Q boxes and K/V blocks (``load_tile``); V block j is the box at
    (v_row + j * BLOCK_N, v_col) of V's 2D view (head-major or token-major)."""
    load_tile(sm, q_desc, k_desc, v_desc, row_q, 0, row_kv, v_row, v_col, S, 0)


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale, n0, S, MASK: gl.constexpr, FIXED: gl.constexpr,
                  PRESCALED: gl.constexpr):
    """Softmax numerators of one key block: P (fp32), the row max and row sum after it, and
    alpha = 2^(m_old - m_new) for the accumulator. MASK: the last block (keys past S -> -inf).
    FIXED: m_i is a fixed scalar that bounds every score of the head (``_score_bound``), so there
    is no running max, alpha is 1 and the accumulator is never rescaled. PRESCALED: q holds
    q * scale * log2(e), so s is already in log2 units (qk_scale unused), and FIXED needs no shift
    (m_i = 0): P = 2^s straight from the accumulator, one MUFU.EX2 per score and no FFMA."""
    if MASK:
        s = _mask_tail(s, n0, S)
    if FIXED:
        if PRESCALED:
            p = gl.exp2(s)
        else:
            p = gl.exp2(s * qk_scale - m_i)
        l_i = l_i + row_partial_sums(p)
        alpha = m_i
    else:
        if PRESCALED:
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            p = gl.exp2(s - m_new[:, None])
        else:
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            p = gl.exp2(s * qk_scale - m_new[:, None])
        row_sum = gl.sum(p, axis=1)
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + row_sum
        m_i = m_new
    return p, m_i, l_i, alpha


@gluon.jit
def row_partial_sums(p):
    """Per-thread partial row sums of a [BLOCK_M, N] wgmma accumulator tile, [BLOCK_M, 4]: in the
    accumulator layout the 4 lanes of a quad share a row, each holding 2 adjacent columns of every
    8, so summing the (N // 8, 2) axes stays in registers (no shuffles in the key loop); the
    caller adds the 4 partials once at the end. Measured (H200): -0.25 ms of 13.7 at the 5B shape,
    -0.18 of 10.9 at head_dim 128."""
    return gl.sum(gl.sum(p.reshape([p.shape[0], p.shape[1] // 8, 4, 2]), axis=3), axis=1)


@gluon.jit
def _attend_block(j, sm, q_smem, acc, m_i, l_i, p_op, s_zero, qk_scale, S, MASK: gl.constexpr,
                  FIXED: gl.constexpr, PRESCALED: gl.constexpr):
    """Key block j >= 1: issue S_j = Q K_j^T, issue O += P_{j-1} V_{j-1}, wait for S_j only,
    softmax of S_j while P V runs on the tensor cores, wait for P V, rescale O by alpha_j (not
    with FIXED)."""
    stage = j % sm.STAGES
    prev = (j - 1) % sm.STAGES
    mbarrier.wait(sm.k_ready.index(stage), (j // sm.STAGES) & 1)
    s = warpgroup_mma(q_smem, sm.k_bufs.index(stage).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    acc = warpgroup_mma(p_op, sm.v_bufs.index(prev), acc, is_async=True)  # V_{j-1}: waited for
    s = warpgroup_mma_wait(1, deps=(s,))  # groups retire in order: S_j is done, P V may run on
    p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale, j * sm.BLOCK_N, S, MASK, FIXED,
                                       PRESCALED)
    # Wait for V_j (the next step's P V operand) here, between the softmax and the P V wait: the
    # mbarrier poll loop ends a basic block. Within one block ptxas (12.8 and 13.0) hoists the
    # wgmma wait above the softmax, which then runs after P V instead of under it.
    mbarrier.wait(sm.v_ready.index(stage), (j // sm.STAGES) & 1)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(sm.kv_empty.index(prev))
    if not FIXED:
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    p_op = gl.convert_layout(p.to(p_op.dtype), p_op.type.layout)
    return acc, m_i, l_i, p_op


@gluon.jit
def _consumer_loop(sm, q_smem, m_i, qk_scale, S, FIXED: gl.constexpr, PRESCALED: gl.constexpr = False):
    """All key blocks for one warpgroup's rows: returns the unnormalised O and the row sums."""
    BLOCK_M: gl.constexpr = sm.q_bufs.type.shape[1]
    HEAD_D: gl.constexpr = sm.q_bufs.type.shape[2]
    dtype: gl.constexpr = sm.q_bufs.dtype
    BLOCK_N: gl.constexpr = sm.BLOCK_N
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    o_layout: gl.constexpr = mma_layout(HEAD_D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    if FIXED:  # per-thread partial sums (``row_partial_sums``), reduced after the loop
        l_i = row_partial_sums(s_zero)
    else:
        l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    n_blocks = gl.cdiv(S, BLOCK_N)

    # ---- block 0: S_0 and its softmax (masked: it may also be the last block)
    mbarrier.wait(sm.k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, sm.k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale, 0, S, True, FIXED, PRESCALED)
    mbarrier.wait(sm.v_ready.index(0), 0)
    p_op = gl.convert_layout(p.to(dtype), p_layout)

    # ---- full blocks 1 .. n-2 (no branch inside the loop), then the last block (masked)
    for j in range(1, n_blocks - 1):
        acc, m_i, l_i, p_op = _attend_block(j, sm, q_smem, acc, m_i, l_i, p_op, s_zero, qk_scale,
                                            S, False, FIXED, PRESCALED)
    if n_blocks > 1:
        acc, m_i, l_i, p_op = _attend_block(n_blocks - 1, sm, q_smem, acc, m_i, l_i, p_op, s_zero,
                                            qk_scale, S, True, FIXED, PRESCALED)

    # ---- the last block's P V
    last = (n_blocks - 1) % sm.STAGES
    acc = warpgroup_mma(p_op, sm.v_bufs.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(sm.kv_empty.index(last))
    if FIXED:
        l_i = gl.convert_layout(gl.sum(l_i, axis=1), gl.SliceLayout(1, s_layout))
    return acc, l_i


@gluon.jit
def _consumer_partition(sm, o_ptr, q_start, S, stride_os, qk_scale, fixed, m_fixed,
                        WG: gl.constexpr, PRESCALED: gl.constexpr):
    """One warpgroup: BLOCK_M query rows (64 or 128) against all keys; stores its rows of the
    output. ``fixed``: run the softmax against the fixed bound ``m_fixed`` (see
    ``_score_bound``), else with a running row max."""
    BLOCK_M: gl.constexpr = sm.q_bufs.type.shape[1]
    HEAD_D: gl.constexpr = sm.q_bufs.type.shape[2]
    dtype: gl.constexpr = sm.q_bufs.dtype
    BLOCK_N: gl.constexpr = sm.BLOCK_N
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    o_layout: gl.constexpr = mma_layout(HEAD_D)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = sm.q_bufs.index(WG)
    mbarrier.wait(sm.q_bar, 0)
    if fixed:
        acc, l_i = _consumer_loop(sm, q_smem, m_fixed, qk_scale, S, True, PRESCALED)
    else:
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc, l_i = _consumer_loop(sm, q_smem, m_i, qk_scale, S, False, PRESCALED)

    # ---- epilogue: O / l; rows past S are not stored
    store_rows(acc / gl.convert_layout(l_i, orow_layout)[:, None], o_ptr, q_start + WG * BLOCK_M,
               S, stride_os)


@gluon.jit
def store_rows(out, o_ptr, row0, S, stride_os):
    """Store a warpgroup's [BLOCK_M, D] fp32 result as rows row0.. of o (its dtype, row stride
    stride_os, unit stride in D) through a row-contiguous layout; rows >= S are not stored."""
    BLOCK_M: gl.constexpr = out.shape[0]
    HEAD_D: gl.constexpr = out.shape[1]
    TPW_D: gl.constexpr = HEAD_D // 8
    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [4, 1], [1, 0])
    out = gl.convert_layout(out.to(o_ptr.dtype.element_ty), store_layout)
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store_layout))
    cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, store_layout))
    ptrs = o_ptr + rows.to(gl.int64)[:, None] * stride_os + cols[None, :]
    gl.store(ptrs, out, mask=(rows < S)[:, None])


@gluon.jit
def _score_bound(norm_ptr, pid_bh, BH, qk_scale, PRESCALED: gl.constexpr = False):
    """(fixed, m) for one (b, h) from the pre-pass's max squared row norms of q and k.

    Every score t = (q . k) * qk_scale (log2 units) lies in [-T, T] with T = |qk_scale| *
    max||q|| * max||k|| (Cauchy-Schwarz; 1% margin for the bf16 rounding and fp32 sums). With
    m = T - e, e = max(0, 2T - 96), every numerator 2^(t - m) lies in [2^-96, 2^e]: no overflow and
    no underflow, so a fixed m gives the same softmax as a running max. Taken when T <= 80
    (e <= 64); otherwise (or for inf/nan norms) the kernel runs the running-max softmax.
    PRESCALED (q holds q * scale * log2(e), so T = max||q|| * max||k||): no shift, m = 0, so every
    numerator 2^t lies in [2^-T, 2^T]; taken when T <= 64 (the same largest numerator, 2^64, as the
    shifted form at T = 80)."""
    qn = gl.load(norm_ptr + pid_bh)
    kn = gl.load(norm_ptr + BH + pid_bh)
    if PRESCALED:
        t = gl.sqrt(qn * kn) * 1.01
        return t <= 64.0, t * 0.0
    else:
        t = gl.sqrt(qn * kn) * gl.abs(qk_scale) * 1.01
        e = gl.maximum(2.0 * t - 96.0, 0.0)
        return t <= 80.0, t - e


@gluon.jit
def _hopper_attention_fwd_kernel(q_desc, k_desc, v_desc, o_ptr, norm_ptr, S, H, BH, stride_ob,
                                 stride_os, stride_oh, qk_scale, NUM_WG: gl.constexpr,
                                 STAGES: gl.constexpr, BOUNDED: gl.constexpr,
                                 V_TOKEN_MAJOR: gl.constexpr, PRESCALED: gl.constexpr,
                                 CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    """out[b, rows, h] = softmax(q k^T * scale) v for NUM_WG * BLOCK_M query rows of one (b, h).

    Descriptors are over the head-major [B*H*S, D] storage (boxes: BLOCK_M query rows, BLOCK_N
    keys); qk_scale = scale * log2(e). Rows of a box past its head read the next head (or zeros
    past the end): their scores are masked, their outputs not stored. BOUNDED: norm_ptr holds the
    pre-pass's max squared row norms ([2, BH]: q then k), see ``_score_bound``. V_TOKEN_MAJOR:
    v_desc is over V's token-major [B*S, H*D] view (a strided input read in place) instead of the
    head-major [B*H*S, D] storage. PRESCALED: q holds q * scale * log2(e) (qk_scale unused) and
    bounded heads run without a shift (``_softmax_step``, ``_score_bound``).
    """
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start = pid_m * (BLOCK_M * NUM_WG)
    row_kv = pid_bh * S
    row_q = row_kv + q_start
    if V_TOKEN_MAJOR:
        v_row = b * S
        v_col = h * HEAD_D
    else:
        v_row = row_kv
        v_col = 0
    o_base = o_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    if BOUNDED:
        fixed, m_fixed = _score_bound(norm_ptr, pid_bh, BH, qk_scale, PRESCALED)
    else:
        fixed = pid_bh < 0  # False, as a runtime value like the bounded case's
        m_fixed = qk_scale * 0.0

    sm = alloc_shared(q_desc, k_desc, v_desc, NUM_WG, STAGES)
    # worker arguments are spelled out per call (tuple arithmetic would drop their constexpr-ness)
    if NUM_WG == 2:
        gl.warp_specialize([
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, fixed, m_fixed, 0,
                                  PRESCALED)),
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, fixed, m_fixed, 1,
                                  PRESCALED)),
            (_load_partition, (sm, q_desc, k_desc, v_desc, row_q, row_kv, v_row, v_col, S)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])
    else:
        gl.static_assert(NUM_WG == 3, "NUM_WG is 2 or 3")
        gl.warp_specialize([
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, fixed, m_fixed, 0,
                                  PRESCALED)),
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, fixed, m_fixed, 1,
                                  PRESCALED)),
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, fixed, m_fixed, 2,
                                  PRESCALED)),
            (_load_partition, (sm, q_desc, k_desc, v_desc, row_q, row_kv, v_row, v_col, S)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS])


# ----------------------------------------------------------------------------------------------
# configs and launcher
# ----------------------------------------------------------------------------------------------
def default_config(head_dim: int) -> dict:
    """Measured defaults (H200, ``benchmarks/results/hopper_attention_notes.md``): NUM_WG consumer
    warpgroups of BLOCK_M query rows, BLOCK_N keys per block, STAGES of the K/V ring."""
    if head_dim <= 64:
        return dict(NUM_WG=3, BLOCK_M=64, BLOCK_N=128, STAGES=4)
    # head_dim 128: 3 stages (H200, 485a03c: full path 10.61 ms against 10.84 with 4, FA3 11.64)
    return dict(NUM_WG=3, BLOCK_M=64, BLOCK_N=64, STAGES=3)


def _registers(num_wg: int) -> tuple[int, int]:
    """(per consumer warpgroup, loader) registers per thread: the loader warp keeps 24 and the
    consumers share the rest of the 64K register file (one CTA per SM)."""
    total = 65536 // (128 * (num_wg + 1))  # per thread, the loader counted as a warpgroup
    total -= total % 8
    consumer = (total * (num_wg + 1) - 24) // num_wg
    return min(240, consumer - consumer % 8), 24


def _launch_args(cfg: dict):
    if cfg["NUM_WG"] not in (2, 3):
        raise ValueError(f"NUM_WG={cfg['NUM_WG']}: the kernel takes 2 or 3 consumer warpgroups")
    consumer_regs, loader_regs = _registers(cfg["NUM_WG"])
    return dict(NUM_WG=cfg["NUM_WG"], STAGES=cfg["STAGES"], CONSUMER_REGS=consumer_regs,
                LOADER_REGS=loader_regs)


def v_token_major_ok(v: torch.Tensor) -> bool:
    """Whether the kernel can read a [B, S, H, D] V in place through a [B*S, H*D] TMA view: unit
    stride in D, heads adjacent (stride D), batches adjacent (stride S * token stride), token rows
    and the base 16-byte aligned."""
    B, S, H, D = v.shape
    st = v.stride()
    return (st[3] == 1 and st[2] == D and (B == 1 or st[0] == S * st[1])
            and (st[1] * v.element_size()) % 16 == 0 and v.data_ptr() % 16 == 0 and st[1] >= H * D)


def hopper_attention_core(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, out: torch.Tensor,
                          scale: float, config: dict | None = None,
                          norm_max: torch.Tensor | None = None, *,
                          v_token_major: bool = False, q_prescaled: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale) v on head-major inputs.

    qh, kh: [B, H, S, D] contiguous (bf16/fp16, D 64 or 128); vh: the same, or with
    ``v_token_major`` a [B, S, H, D] tensor whose (B, S) and (H, D) dims merge
    (``v_token_major_ok``: e.g. the V slice of a QKV projection, read in place); out: [B, S, H, D] with stride 1 in D (written and
    returned). ``config`` overrides keys of ``default_config``. ``norm_max``:
    float32 [2, B * H], the max over s of ||qh[b, h, s]||^2 and of ||kh[b, h, s]||^2 (the
    pre-pass writes them); with it, heads whose scores are bounded closely enough run the softmax
    without a running max (``_score_bound``); without it every head keeps the running max.
    ``q_prescaled``: qh holds q * scale * log2(e) (and norm_max its norms); ``scale`` is then not
    applied again, and bounded heads take 2^score straight from the accumulator (no shift).
    """
    B, H, S, D = qh.shape
    cfg = {**default_config(D), **(config or {})}
    if set(cfg) != set(default_config(D)):
        raise ValueError(f"config keys {sorted(set(cfg) - set(default_config(D)))} are not known; "
                         f"the kernel takes {sorted(default_config(D))}")
    gdt = gl.bfloat16 if qh.dtype == torch.bfloat16 else gl.float16
    rows = B * H * S

    def desc(t, box):
        layout = gl.NVMMASharedLayout.get_default_for([box, D], gdt)
        return TensorDescriptor(t, [rows, D], [D, 1], [box, D], layout)

    if v_token_major:
        if vh.shape != (B, S, H, D) or not v_token_major_ok(vh):
            raise ValueError(f"vh: a token-major V must be [B, S, H, D]={[B, S, H, D]} with merged "
                             f"(B, S) and (H, D) dims and 16-byte aligned rows; got shape "
                             f"{tuple(vh.shape)}, strides {vh.stride()}")
        v_desc = TensorDescriptor(vh, [B * S, H * D], [vh.stride(1), 1], [cfg["BLOCK_N"], D],
                                  gl.NVMMASharedLayout.get_default_for([cfg["BLOCK_N"], D], gdt))
    else:
        if vh.shape != qh.shape or not vh.is_contiguous():
            raise ValueError(f"vh must be contiguous [B, H, S, D]={[B, H, S, D]} (or pass "
                             f"v_token_major=True); got {tuple(vh.shape)}, strides {vh.stride()}")
        v_desc = desc(vh, cfg["BLOCK_N"])

    if norm_max is not None and (norm_max.dtype != torch.float32 or norm_max.numel() != 2 * B * H
                                 or not norm_max.is_contiguous()):
        raise ValueError(f"norm_max must be a contiguous float32 tensor of 2*B*H={2 * B * H} "
                         f"elements, got {norm_max.dtype} {tuple(norm_max.shape)}")
    if norm_max is not None and qh.dtype != torch.bfloat16:
        raise ValueError("norm_max (the fixed-max softmax) is for bf16 inputs: fp16 P has too "
                         "little exponent range for numerators down to 2^-96")
    grid = (triton.cdiv(S, cfg["BLOCK_M"] * cfg["NUM_WG"]), B * H)
    _hopper_attention_fwd_kernel[grid](
        desc(qh, cfg["BLOCK_M"]), desc(kh, cfg["BLOCK_N"]), v_desc, out,
        norm_max, S, H, B * H, out.stride(0), out.stride(1), out.stride(2),
        1.0 if q_prescaled else float(scale) * LOG2E,
        BOUNDED=norm_max is not None, V_TOKEN_MAJOR=v_token_major, PRESCALED=bool(q_prescaled),
        **_launch_args(cfg),
        num_warps=4)
    return out


def compile_offline(config: dict | None = None, head_dim: int = 64, dtype: str = "bf16",
                    bounded: bool = True, prescaled: bool | None = None):
    """Compile the kernel for sm_90a without a GPU (to read its PTX/SASS, registers, spills).
    Needs ``TRITON_INTERPRET`` unset: Gluon does not build under the interpreter."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    cfg = {**default_config(head_dim), **(config or {})}
    gdt = gl.bfloat16 if dtype == "bf16" else gl.float16
    if prescaled is None:  # what hopper_attention_fwd launches (hopper.PRESCALE_Q)
        prescaled = bounded and dtype == "bf16"

    def desc_type(box):
        layout = gl.NVMMASharedLayout.get_default_for([box, head_dim], gdt)
        return f"tensordesc<{dtype}[{box}, {head_dim}],{layout!r}>"

    signature = {"q_desc": desc_type(cfg["BLOCK_M"]), "k_desc": desc_type(cfg["BLOCK_N"]),
                 "v_desc": desc_type(cfg["BLOCK_N"]), "o_ptr": f"*{dtype}", "norm_ptr": "*fp32",
                 "S": "i32", "H": "i32", "BH": "i32", "stride_ob": "i32", "stride_os": "i32",
                 "stride_oh": "i32", "qk_scale": "fp32"}
    constexprs = {**_launch_args(cfg), "BOUNDED": bounded, "V_TOKEN_MAJOR": False,
                  "PRESCALED": prescaled}
    signature.update({name: "constexpr" for name in constexprs})
    src = GluonASTSource(_hopper_attention_fwd_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
