"""Next-step variants of the Hopper attention's score-bound (fixed-max) path, for the next H200 probe
(issue 13). Not shipped; written after the session's device time was spent, so only compiled
offline for sm_90a so far (``python benchmarks/experiments/hopper_attention_next.py`` prints the
main-loop instruction counts of each variant). ``hopper_bound_probe.py --next`` times them.

Shared pieces (shared-memory aggregate, K/V ring, score bound, tail mask) are imported from the
shipped ``cogvideox_kernels/ops/attention/hopper_fwd.py``; what differs:

* ``PINGPONG``: the 3 consumer warpgroups take turns issuing their GEMMs (an mbarrier per
  warpgroup, as FA3 does for 2), so one's softmax runs while the tensor cores work for the others.
  With the running max this bought nothing (notes); with the bound the softmax is 27% shorter and the
  ncu of the bound kernel shows tensor and MUFU both at 67% with 0.71 eligible warps per scheduler,
  i.e. the warpgroups' phases collide.
* ``QFUSE``: q's LayerNorm + RoPE move into the consumer prologue: the loader brings each
  warpgroup's 64 raw q rows by TMA from q's token-major view (the QKV slice, like V), the consumer
  norms and rotates them in registers, writes them back as bf16, and takes its per-row score bound
  from their norms (tighter than the per-head one). Saves the q pre-pass (~0.17 ms at 5B). Always
  with QK LayerNorm (weight and bias) and RoPE on, the 5B/1.5-5B configuration; heads whose bound
  exceeds 80 take the shipped running-max loop.
* ``ROWSUM_MMA`` (its own kernel, ``_rowsum_kernel``: the shipped launch with q prescaled by
  scale * log2(e), head dims 64 and 128): the bounded heads' softmax row sums come from the tensor
  cores, L += P x ones, P being the same bf16 register operand as P V's and ones an [8, BLOCK_N]
  bf16 tile in shared memory (K contiguous, 128-byte swizzle, fed transposed as K is in Q K^T),
  into a [64, 8] fp32 accumulator whose 8 columns all hold the row sum. Issued right after each
  P V wgmma and waited with it; the loop loses its 64 FADD per block (D 64) and gains one
  64x8xBLOCK_N wgmma. The sums are then over the bf16-rounded P that P V multiplies. Without
  ROWSUM_MMA the kernel runs the shipped loop (a control for the probe).
* ``POLY`` (on ``_rowsum_kernel``, with or without ROWSUM_MMA; issues 13/15): POLY eighths of the
  bounded heads' exponentials (the left POLY/8 of each accumulator tile's columns, split off in
  registers) as 2^round(x) * p(x - round(x)), p a degree-3 polynomial (``_exp2_poly``, relative
  error 1.01e-4; tests/experiments/test_poly_exp2.py), on the FMA pipe; the rest on MUFU.EX2;
  the row sums over all. POLY 0 compiles to the shipped loop (SASS compared offline).
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from cogvideox_kernels.ops.attention.hopper_fwd import (LOG2E, _consumer_loop, _load_partition,
                                                        _mask_tail, _registers, _score_bound,
                                                        alloc_shared, default_config, load_tile,
                                                        mma_layout, row_partial_sums, store_rows,
                                                        v_token_major_ok)


@gluon.jit
def _tile_coords(t, n_m, H, S, HEAD_D: gl.constexpr, BLOCK_M: gl.constexpr, NUM_WG: gl.constexpr,
                 QFUSE: gl.constexpr):
    """Tile t (query tiles of one head adjacent, so their K/V stay in L2) -> (b, h, pid_bh,
    q_start, q_row, q_col, row_kv)."""
    pid_bh = t // n_m
    b = pid_bh // H
    h = pid_bh % H
    q_start = (t % n_m) * (BLOCK_M * NUM_WG)
    row_kv = pid_bh * S
    if QFUSE:
        q_row = b * S + q_start
        q_col = h * HEAD_D
    else:
        q_row = row_kv + q_start
        q_col = 0
    return b, h, pid_bh, q_start, q_row, q_col, row_kv


@gluon.jit
def _loader(sm, q_empty, q_desc, k_desc, v_desc, S, H, n_m, n_tiles, QFUSE: gl.constexpr,
            PERSIST: gl.constexpr):
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = k_desc.block_type.shape[1]
    n_blocks = gl.cdiv(S, sm.BLOCK_N)
    if PERSIST:
        it = 0
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            b, h, pid_bh, q_start, q_row, q_col, row_kv = _tile_coords(
                t, n_m, H, S, HEAD_D, BLOCK_M, sm.NUM_WG, QFUSE)
            mbarrier.wait(q_empty, (it & 1) ^ 1)  # the consumers are done with the last tile's Q
            load_tile(sm, q_desc, k_desc, v_desc, q_row, q_col, row_kv, b * S, h * HEAD_D, S,
                      it * n_blocks)
            it += 1
    else:
        t = gl.program_id(1) * n_m + gl.program_id(0)
        b, h, pid_bh, q_start, q_row, q_col, row_kv = _tile_coords(
            t, n_m, H, S, HEAD_D, BLOCK_M, sm.NUM_WG, QFUSE)
        load_tile(sm, q_desc, k_desc, v_desc, q_row, q_col, row_kv, b * S, h * HEAD_D, S, 0)


@gluon.jit
def _turn_wait(turns, WG: gl.constexpr, k, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.wait(turns.index(WG), k & 1)


@gluon.jit
def _turn_pass(turns, WG: gl.constexpr, NUM_WG: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turns.index((WG + 1) % NUM_WG))


@gluon.jit
def _row_sums(p, LAZY_SUM: gl.constexpr):
    """Row sums of a [64, N] accumulator tile: complete ([64]), or with LAZY_SUM each thread's own
    partial sums ([64, 4], one per lane of the quad that shares a row: no shuffles in the loop;
    the caller sums the 4 at the end)."""
    if LAZY_SUM:
        return row_partial_sums(p)
    else:
        return gl.sum(p, axis=1)


@gluon.jit
def _fixed_block(j, sm, q_smem, acc, m_row, l_i, p_op, s_zero, qk_scale, S, turns, base, tbase,
                 WG: gl.constexpr, MASK: gl.constexpr, PINGPONG: gl.constexpr,
                 LAZY_SUM: gl.constexpr):
    """Key block j >= 1 of the fixed-max loop (the shipped ``_attend_block`` with FIXED, m per row,
    and the GEMM issue inside the warpgroup's turn); base / tbase: ring blocks / turns of earlier
    tiles (persistent)."""
    c = base + j
    stage = c % sm.STAGES
    prev = (c - 1) % sm.STAGES
    mbarrier.wait(sm.k_ready.index(stage), (c // sm.STAGES) & 1)
    _turn_wait(turns, WG, tbase + j, PINGPONG)
    s = warpgroup_mma(q_smem, sm.k_bufs.index(stage).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    acc = warpgroup_mma(p_op, sm.v_bufs.index(prev), acc, is_async=True)
    _turn_pass(turns, WG, sm.NUM_WG, PINGPONG)
    s = warpgroup_mma_wait(1, deps=(s,))
    if MASK:
        s = _mask_tail(s, j * sm.BLOCK_N, S)
    p = gl.exp2(s * qk_scale - m_row[:, None])
    l_i = l_i + _row_sums(p, LAZY_SUM)
    mbarrier.wait(sm.v_ready.index(stage), (c // sm.STAGES) & 1)  # ends the basic block (ptxas)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(sm.kv_empty.index(prev))
    p_op = gl.convert_layout(p.to(p_op.dtype), p_op.type.layout)
    return acc, l_i, p_op


@gluon.jit
def _fixed_loop(sm, q_smem, m_row, qk_scale, S, turns, base, tbase, q_empty, WG: gl.constexpr,
                PINGPONG: gl.constexpr, PERSIST: gl.constexpr, LAZY_SUM: gl.constexpr):
    """The fixed-max loop over all key blocks with a per-row m (``m_row``, the S layout's rows);
    PERSIST: arrive on q_empty once the last Q K^T has read Q."""
    BLOCK_M: gl.constexpr = sm.q_bufs.type.shape[1]
    HEAD_D: gl.constexpr = sm.q_bufs.type.shape[2]
    dtype: gl.constexpr = sm.q_bufs.dtype
    BLOCK_N: gl.constexpr = sm.BLOCK_N
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    o_layout: gl.constexpr = mma_layout(HEAD_D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    l_i = _row_sums(s_zero, LAZY_SUM)  # zeros in the layout the loop accumulates
    n_blocks = gl.cdiv(S, BLOCK_N)

    st0 = base % sm.STAGES
    ph0 = (base // sm.STAGES) & 1
    mbarrier.wait(sm.k_ready.index(st0), ph0)
    _turn_wait(turns, WG, tbase, PINGPONG)
    s = warpgroup_mma(q_smem, sm.k_bufs.index(st0).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    _turn_pass(turns, WG, sm.NUM_WG, PINGPONG)
    s = warpgroup_mma_wait(0, deps=(s,))
    s = _mask_tail(s, 0, S)
    p = gl.exp2(s * qk_scale - m_row[:, None])
    l_i = l_i + _row_sums(p, LAZY_SUM)
    mbarrier.wait(sm.v_ready.index(st0), ph0)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    for j in range(1, n_blocks - 1):
        acc, l_i, p_op = _fixed_block(j, sm, q_smem, acc, m_row, l_i, p_op, s_zero, qk_scale, S,
                                      turns, base, tbase, WG, False, PINGPONG, LAZY_SUM)
    if n_blocks > 1:
        acc, l_i, p_op = _fixed_block(n_blocks - 1, sm, q_smem, acc, m_row, l_i, p_op, s_zero,
                                      qk_scale, S, turns, base, tbase, WG, True, PINGPONG, LAZY_SUM)
    if PERSIST:
        mbarrier.arrive(q_empty)  # every Q K^T of this tile has completed (waited above)
    last = (base + n_blocks - 1) % sm.STAGES
    _turn_wait(turns, WG, tbase + n_blocks, PINGPONG)
    acc = warpgroup_mma(p_op, sm.v_bufs.index(last), acc, is_async=True)
    _turn_pass(turns, WG, sm.NUM_WG, PINGPONG)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(sm.kv_empty.index(last))
    if LAZY_SUM:
        l_i = gl.convert_layout(gl.sum(l_i, axis=1), gl.SliceLayout(1, s_layout))
    return acc, l_i


@gluon.jit
def _q_prologue(q_smem, rows, S, text_len, cos_ptr, sin_ptr, stride_cs, qw_ptr, qb_ptr, eps,
                HEAD_D: gl.constexpr):
    """LayerNorm (weight, bias) + RoPE of the warpgroup's raw q rows in shared memory, written back
    in place (bf16); returns the squared row norms of the stored values (rows past S: 0)."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[0]
    TPW_D: gl.constexpr = HEAD_D // 8
    ql: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [4, 1], [1, 0])
    x = q_smem.load(ql).to(gl.float32)
    cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, ql))
    r = rows + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ql))
    mean = gl.sum(x, axis=1) / HEAD_D
    xc = x - mean[:, None]
    rstd = gl.rsqrt(gl.sum(xc * xc, axis=1) / HEAD_D + eps)
    w = gl.load(qw_ptr + cols).to(gl.float32)
    b = gl.load(qb_ptr + cols).to(gl.float32)
    x = xc * rstd[:, None] * w[None, :] + b[None, :]
    video = (r >= text_len) & (r < S)
    offs = (r - text_len).to(gl.int64)[:, None] * stride_cs + cols[None, :]
    tmask = video[:, None] & (cols < HEAD_D)[None, :]
    cos = gl.load(cos_ptr + offs, mask=tmask, other=1.0)
    sin = gl.load(sin_ptr + offs, mask=tmask, other=0.0)
    even, odd = gl.split(x.reshape([BLOCK_M, HEAD_D // 2, 2]))
    swapped = gl.join(-odd, even).reshape([BLOCK_M, HEAD_D])
    x = x * cos + gl.convert_layout(swapped, x.type.layout) * sin
    xq = x.to(q_smem.dtype)
    q_smem.store(xq)
    fence_async_shared()
    gl.thread_barrier()  # every warp's rows are in shared memory before the warpgroup's wgmma
    xf = xq.to(gl.float32)
    return gl.where(r < S, gl.sum(xf * xf, axis=1), 0.0)


@gluon.jit
def _consumer_tile(sm, turns, q_empty, o_ptr, norm_ptr, pid_bh, BH, q_start, S, text_len,
                   stride_os, qk_scale, cos_ptr, sin_ptr, stride_cs, qw_ptr, qb_ptr, eps, it,
                   WG: gl.constexpr, PINGPONG: gl.constexpr, QFUSE: gl.constexpr,
                   PERSIST: gl.constexpr, LAZY_SUM: gl.constexpr):
    """One tile of one warpgroup: its 64 rows against all keys, stored; ``it``: the tiles this
    CTA did before (persistent: ring, turn and Q barrier phases continue)."""
    BLOCK_M: gl.constexpr = sm.q_bufs.type.shape[1]
    HEAD_D: gl.constexpr = sm.q_bufs.type.shape[2]
    BLOCK_N: gl.constexpr = sm.BLOCK_N
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    o_layout: gl.constexpr = mma_layout(HEAD_D)
    srow: gl.constexpr = gl.SliceLayout(1, s_layout)
    n_blocks = gl.cdiv(S, BLOCK_N)
    q_smem = sm.q_bufs.index(WG)
    mbarrier.wait(sm.q_bar, it & 1)
    kn = gl.load(norm_ptr + BH + pid_bh)
    cq = gl.abs(qk_scale) * 1.01
    if QFUSE:
        qn = _q_prologue(q_smem, q_start + WG * BLOCK_M, S, text_len, cos_ptr, sin_ptr, stride_cs,
                         qw_ptr, qb_ptr, eps, HEAD_D)
        t = gl.sqrt(qn * kn) * cq
    else:
        qn = gl.load(norm_ptr + pid_bh)
        t = gl.full([BLOCK_M], 0.0, gl.float32, layout=srow) + gl.sqrt(qn * kn) * cq
    fixed = gl.max(t, axis=0) <= 80.0
    t = gl.convert_layout(t, srow)
    m_row = t - gl.maximum(2.0 * t - 96.0, 0.0)
    if PERSIST:
        # (the host checks that every head is bounded: the running-max loop has no ring offset)
        acc, l_i = _fixed_loop(sm, q_smem, m_row, qk_scale, S, turns, it * n_blocks,
                               it * (n_blocks + 1), q_empty, WG, PINGPONG, PERSIST, LAZY_SUM)
    elif fixed:
        acc, l_i = _fixed_loop(sm, q_smem, m_row, qk_scale, S, turns, 0, 0, q_empty, WG,
                               PINGPONG, PERSIST, LAZY_SUM)
    else:
        # the running-max loop takes no turns; it passes its n_blocks + 1 turns first so that the
        # other warpgroups (with QFUSE their bound is per warpgroup) never wait on it
        for k in range(n_blocks + 1):
            _turn_wait(turns, WG, k, PINGPONG)
            _turn_pass(turns, WG, sm.NUM_WG, PINGPONG)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=srow)
        acc, l_i = _consumer_loop(sm, q_smem, m_i, qk_scale, S, False)
    store_rows(acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None], o_ptr,
               q_start + WG * BLOCK_M, S, stride_os)


@gluon.jit
def _consumer(sm, turns, q_empty, o_ptr, norm_ptr, H, BH, n_m, n_tiles, S, text_len, stride_ob,
              stride_os, stride_oh, qk_scale, cos_ptr, sin_ptr, stride_cs, qw_ptr, qb_ptr, eps,
              WG: gl.constexpr, PINGPONG: gl.constexpr, QFUSE: gl.constexpr,
              PERSIST: gl.constexpr, LAZY_SUM: gl.constexpr):
    BLOCK_M: gl.constexpr = sm.q_bufs.type.shape[1]
    HEAD_D: gl.constexpr = sm.q_bufs.type.shape[2]
    if PERSIST:
        it = 0
        for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            b, h, pid_bh, q_start, q_row, q_col, row_kv = _tile_coords(
                t, n_m, H, S, HEAD_D, BLOCK_M, sm.NUM_WG, QFUSE)
            o_base = o_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
            _consumer_tile(sm, turns, q_empty, o_base, norm_ptr, pid_bh, BH, q_start, S, text_len,
                           stride_os, qk_scale, cos_ptr, sin_ptr, stride_cs, qw_ptr, qb_ptr, eps,
                           it, WG, PINGPONG, QFUSE, PERSIST, LAZY_SUM)
            it += 1
    else:
        t = gl.program_id(1) * n_m + gl.program_id(0)
        b, h, pid_bh, q_start, q_row, q_col, row_kv = _tile_coords(
            t, n_m, H, S, HEAD_D, BLOCK_M, sm.NUM_WG, QFUSE)
        o_base = o_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
        _consumer_tile(sm, turns, q_empty, o_base, norm_ptr, pid_bh, BH, q_start, S, text_len,
                       stride_os, qk_scale, cos_ptr, sin_ptr, stride_cs, qw_ptr, qb_ptr, eps, 0,
                       WG, PINGPONG, QFUSE, PERSIST, LAZY_SUM)


@gluon.jit
def _next_kernel(q_desc, k_desc, v_desc, o_ptr, norm_ptr, S, H, BH, n_m, n_tiles, text_len,
                 stride_ob, stride_os, stride_oh, qk_scale, cos_ptr, sin_ptr, stride_cs, qw_ptr,
                 qb_ptr, eps, STAGES: gl.constexpr, PINGPONG: gl.constexpr, QFUSE: gl.constexpr,
                 PERSIST: gl.constexpr, LAZY_SUM: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                 LOADER_REGS: gl.constexpr):
    """3 consumer warpgroups x 64 rows + a loader warp, as the shipped kernel; q from its
    token-major view when QFUSE (raw), else head-major (normed by the pre-pass); V token-major.
    Tiles: n_m query tiles of 192 rows per (b, h); PERSIST: one CTA per SM walks tiles
    pid, pid + grid, ... (ring and barrier phases continue across them), else grid (n_m, B*H)."""
    NUM_WG: gl.constexpr = 3
    sm = alloc_shared(q_desc, k_desc, v_desc, NUM_WG, STAGES)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    turns = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], bar_layout)
    for i in gl.static_range(NUM_WG):
        mbarrier.init(turns.index(i), count=1)
    if PINGPONG:
        mbarrier.arrive(turns.index(0))  # warpgroup 0 issues first
    q_empty = gl.allocate_shared_memory(gl.int64, [1], bar_layout)
    mbarrier.init(q_empty, count=NUM_WG)
    gl.warp_specialize([
        (_consumer, (sm, turns, q_empty, o_ptr, norm_ptr, H, BH, n_m, n_tiles, S, text_len,
                     stride_ob, stride_os, stride_oh, qk_scale, cos_ptr, sin_ptr, stride_cs, qw_ptr,
                     qb_ptr, eps, 0, PINGPONG, QFUSE, PERSIST, LAZY_SUM)),
        (_consumer, (sm, turns, q_empty, o_ptr, norm_ptr, H, BH, n_m, n_tiles, S, text_len,
                     stride_ob, stride_os, stride_oh, qk_scale, cos_ptr, sin_ptr, stride_cs, qw_ptr,
                     qb_ptr, eps, 1, PINGPONG, QFUSE, PERSIST, LAZY_SUM)),
        (_consumer, (sm, turns, q_empty, o_ptr, norm_ptr, H, BH, n_m, n_tiles, S, text_len,
                     stride_ob, stride_os, stride_oh, qk_scale, cos_ptr, sin_ptr, stride_cs, qw_ptr,
                     qb_ptr, eps, 2, PINGPONG, QFUSE, PERSIST, LAZY_SUM)),
        (_loader, (sm, q_empty, q_desc, k_desc, v_desc, S, H, n_m, n_tiles, QFUSE, PERSIST)),
    ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS])


def _launch(q_src, kh, v, out, norm_max, S, text_len, cos, sin, qw, qb, eps, scale, *,
            pingpong, qfuse, persist=False, lazy_sum=False, stages=None):
    """q_src: raw q [B, S, H, D] (token-major, QFUSE) or the pre-pass's head-major [B, H, S, D]."""
    B, H, _, D = kh.shape
    cfg = default_config(D)
    stages = stages or cfg["STAGES"]
    gdt = gl.bfloat16
    lay = lambda box: gl.NVMMASharedLayout.get_default_for([box, D], gdt)  # noqa: E731
    if qfuse:
        q_desc = TensorDescriptor(q_src, [B * S, H * D], [q_src.stride(1), 1], [64, D], lay(64))
    else:
        q_desc = TensorDescriptor(q_src, [B * H * S, D], [D, 1], [64, D], lay(64))
    k_desc = TensorDescriptor(kh, [B * H * S, D], [D, 1], [cfg["BLOCK_N"], D], lay(cfg["BLOCK_N"]))
    v_desc = TensorDescriptor(v, [B * S, H * D], [v.stride(1), 1], [cfg["BLOCK_N"], D],
                              lay(cfg["BLOCK_N"]))
    consumer_regs, loader_regs = _registers(3)
    n_m = triton.cdiv(S, 192)
    n_tiles = n_m * B * H
    if persist:
        n_sm = torch.cuda.get_device_properties(out.device).multi_processor_count
        grid = (min(n_tiles, n_sm),)
    else:
        grid = (n_m, B * H)
    _next_kernel[grid](q_desc, k_desc, v_desc, out, norm_max, S, H, B * H, n_m, n_tiles, text_len,
                       out.stride(0), out.stride(1), out.stride(2), float(scale) * LOG2E, cos,
                       sin, cos.stride(0), qw, qb, float(eps), STAGES=stages, PINGPONG=pingpong,
                       QFUSE=qfuse, PERSIST=persist, LAZY_SUM=lazy_sum, CONSUMER_REGS=consumer_regs,
                       LOADER_REGS=loader_regs, num_warps=4)
    return out


def attention_next(q, k, v, text_len, cos, sin, q_norm, k_norm, eps, scale, *, pingpong=False,
                   qfuse=False, persist=False, lazy_sum=False, stages=None, check_bound=True,
                   rowsum_mma=None, poly=0):
    """The full path (k pre-pass with norms, q pre-pass unless qfuse, V in place) for bf16 q/k/v
    [B, S, H, D] strided views with QK LayerNorm (weight, bias) and RoPE on. ``check_bound``: with
    persist, first check on the host that every head takes the fixed-max loop (time it without).
    ``rowsum_mma`` True / False: the shipped full path (q prescaled) on ``_rowsum_kernel`` with /
    without the tensor-core row sums (not combined with the other options); ``poly`` (eighths of
    the exponentials on the FMA pipe) only with it."""
    from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd

    if rowsum_mma is not None:
        if pingpong or qfuse or persist or lazy_sum:
            raise ValueError("rowsum_mma: runs on its own kernel, without pingpong, qfuse, "
                             "persist or lazy_sum")
        return attention_rowsum(q, k, v, text_len, cos, sin, q_norm, k_norm, eps, scale,
                                rowsum_mma=rowsum_mma, stages=stages, poly=poly)
    if poly:
        raise ValueError("poly: only with rowsum_mma=True / False (the prescaled kernel)")
    B, S, H, D = q.shape
    assert q.dtype == torch.bfloat16 and v_token_major_ok(v) and (not qfuse or v_token_major_ok(q))
    sq = torch.empty((2, B, S, H), dtype=torch.float32, device=q.device)
    kh = qk_norm_rope_fwd(k, text_len, cos, sin, *k_norm, True, eps, norm_sq=sq[1])
    if qfuse:
        q_src = q
        sq[0].fill_(0.0)  # unused (per-row norms come from the prologue)
    else:
        q_src = qk_norm_rope_fwd(q, text_len, cos, sin, *q_norm, True, eps,
                                 norm_sq=sq[0]).transpose(1, 2)
    norm_max = sq.amax(dim=2).reshape(2, B * H)
    if persist and check_bound:  # the persistent consumers have only the fixed-max loop
        qmax = (sq[0].amax(dim=1) if not qfuse else
                qk_norm_rope_fwd(q, text_len, cos, sin, *q_norm, True, eps).float().pow(2).sum(-1)
                .amax(dim=1)).reshape(-1)
        t = (qmax * norm_max[1]).sqrt() * abs(scale) * LOG2E * 1.01
        if bool((t > 80).any()):
            raise ValueError("persist=True needs every head's score bound <= 80")
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    return _launch(q_src, kh.transpose(1, 2), v, out, norm_max, S, text_len, cos, sin,
                   q_norm[0], q_norm[1], eps, scale, pingpong=pingpong, qfuse=qfuse,
                   persist=persist, lazy_sum=lazy_sum, stages=stages)


# Measured at 3de6870 (H200, 5B / D128 full path ms, shipped 13.61 / 10.78): base 13.74 / 10.91,
# pingpong 14.02 / 10.74, qfuse 13.71 / 10.93, pingpong+qfuse 13.84 / 10.96, persist 13.65 / 10.85,
# persist+qfuse 13.94 / 11.23, persist+pingpong+qfuse 14.11 / 11.17, lazy_sum 13.49 / 10.73,
# persist+qfuse+lazy_sum 13.71 / 10.89 (lazy_sum then shipped as hopper_fwd.row_partial_sums).
VARIANTS = {"lazy_sum": dict(lazy_sum=True),
            "persist+lazy_sum": dict(persist=True, lazy_sum=True),
            "pingpong+lazy_sum": dict(pingpong=True, lazy_sum=True),
            "qfuse+lazy_sum": dict(qfuse=True, lazy_sum=True),
            "persist+pingpong+lazy_sum": dict(persist=True, pingpong=True, lazy_sum=True),
            "persist+lazy_sum stages3": dict(persist=True, lazy_sum=True, stages=3),
            # the shipped full path on _rowsum_kernel: the control (shipped loop, the same SASS
            # loop as hopper_fwd's) and the MMA sums. Offline sm_90a (ptxas 13.0, f81f912): fixed-
            # max loop D64 223 -> 174 instructions (FADD 64 -> 0, HGMMA 12 -> 20, MUFU 64), D128
            # 148 -> 121 (FADD 32 -> 0, HGMMA 12 -> 16); shared memory +2 / +1 KB; no local
            # memory; not run on a GPU yet (hopper_rowsum_check.py: parity on small shapes).
            "prescaled control": dict(rowsum_mma=False),
            "prescaled rowsum_mma": dict(rowsum_mma=True),
            # POLY (issues 13/15): poly eighths of the bounded heads' exponentials by _exp2_poly
            # (FMA pipe), the rest on MUFU. Offline sm_90a (ptxas 13.0), fixed-max loop per key
            # block and warp, instructions (MUFU / FFMA / FADD): D64 control 223 (64/0/64), 1/8
            # 271 (56/24/88), 1/4 319 (48/48/112), 3/8 367 (40/72/136), 1/2 415 (32/96/160); with
            # rowsum_mma 174 (64/0/0), 1/4 270 (48/48/48), 3/8 318 (40/72/72). D128 (BLOCK_N 64)
            # control 148 (32/0/32), 1/8 172, 1/4 196, 3/8 220. Each polynomial exp2 = 3 FADD +
            # 3 FFMA + 1 IMAD/LEA in place of 1 MUFU (+6 issue slots). No local memory; the P V
            # wgmma wait stays after the last exponential. Per SM sub-partition and round of 3
            # warpgroups (one key block each, D64): tensor 1536 cycles (2048 bf16 FMA/clk/SM),
            # XU 3 x 8 x MUFU = 1536 - 192 k, issue 3 x loop = 669 + 144 k (k eighths): XU =
            # issue at k = 2.6; 1/4: 1152 / 957, 3/8: 960 / 1101; with rowsum_mma 3/8: 960 / 954.
            # D128 is already tensor-bound (XU 768, issue 444 of 1536): expect nothing there.
            "prescaled poly 1/8": dict(rowsum_mma=False, poly=1),
            "prescaled poly 1/4": dict(rowsum_mma=False, poly=2),
            "prescaled poly 3/8": dict(rowsum_mma=False, poly=3),
            "prescaled poly 1/2": dict(rowsum_mma=False, poly=4),
            "prescaled rowsum_mma poly 1/4": dict(rowsum_mma=True, poly=2),
            "prescaled rowsum_mma poly 3/8": dict(rowsum_mma=True, poly=3)}


# ---------------------------------------------------------------------------------------------
# POLY: a share of the bounded heads' exponentials on the FMA pipe (issues 13/15)
# ---------------------------------------------------------------------------------------------
# 2^x = 2^j * p(f), j = round(x) (the 1.5 * 2^23 add: round-to-nearest-even into the low mantissa
# bits), f = x - j in [-0.5, 0.5], p(f) = 1 + f (C1 + f (C2 + f C3)): minimax relative error on
# [-0.5, 0.5] with p(0) = 1 exactly (a float64 linear programme on 4001 points, coefficients rounded
# to float32): 1.01e-4, against bf16's 2^-9 rounding of P. p(0) = 1 makes 2^j exact at integers and
# turns x = -127 (where -inf is clamped to, masked blocks only) into the bit pattern 0: +0.0.
# (Degree 4, 1 more FFMA: 0.693124, 0.240241, 0.0559075, 0.00958433, 2.8e-6.)
POLY_COEFFS = (0.6932829022407532, 0.24221095442771912, 0.055008936673402786)  # C1, C2, C3
POLY_MAGIC = 12582912.0  # 1.5 * 2^23
_C1 = gl.constexpr(POLY_COEFFS[0])
_C2 = gl.constexpr(POLY_COEFFS[1])
_C3 = gl.constexpr(POLY_COEFFS[2])
_MAGIC = gl.constexpr(POLY_MAGIC)


@gluon.jit
def _exp2_poly(x, CLAMP: gl.constexpr):
    """2^x by FADD/FFMA and one integer add (no MUFU), for x in [-126, 126]; CLAMP: also -inf -> 0
    (x clamped to -127 first: j = -127, f = 0, p = 1.0 = 127 << 23, so the sum is 0)."""
    if CLAMP:
        x = gl.maximum(x, -127.0)
    shifted = x + _MAGIC
    f = x - (shifted - _MAGIC)
    p = f * _C3 + _C2
    p = p * f + _C1
    p = p * f + 1.0
    bits = p.to(gl.int32, bitcast=True) + (shifted.to(gl.int32, bitcast=True) << 23)
    return bits.to(gl.float32, bitcast=True)


@gluon.jit
def _halves(x):
    """Columns [0, N/2) and [N/2, N) of a [64, N] wgmma accumulator tile, without data movement:
    the top column bit is a register bit in that layout (each thread holds 2 adjacent columns of
    every 8), so reshape + permute + split only renames registers."""
    a, b = gl.split(x.reshape([x.shape[0], 2, x.shape[1] // 2]).permute((0, 2, 1)))
    return a, b


@gluon.jit
def _unhalves(a, b):
    """The inverse of ``_halves`` (a, b: equal layouts, possibly spelled differently: a split's
    slice layout vs a reshape's linear one, so b is converted, a no-op)."""
    ab = gl.join(a, gl.convert_layout(b, a.type.layout))
    return ab.permute((0, 2, 1)).reshape([a.shape[0], 2 * a.shape[1]])


@gluon.jit
def _exp2_mixed(s, POLY: gl.constexpr, CLAMP: gl.constexpr):
    """2^s of a [64, N] accumulator tile with POLY eighths of its columns (0..4: column chunks of
    N/8 from the left, i.e. POLY/8 of every thread's registers) by ``_exp2_poly`` and the rest by
    MUFU.EX2 (gl.exp2). CLAMP: s may hold -inf (masked blocks)."""
    if POLY == 0:
        p = gl.exp2(s)
    else:
        h0, h1 = _halves(s)
        if POLY == 4:
            h0 = _exp2_poly(h0, CLAMP)
        else:
            q0, q1 = _halves(h0)
            if POLY == 1:
                e0, e1 = _halves(q0)
                q0 = _unhalves(_exp2_poly(e0, CLAMP), gl.exp2(e1))
                q1 = gl.exp2(q1)
            elif POLY == 2:
                q0 = _exp2_poly(q0, CLAMP)
                q1 = gl.exp2(q1)
            else:
                gl.static_assert(POLY == 3, "POLY: 0..4 eighths")
                q0 = _exp2_poly(q0, CLAMP)
                e0, e1 = _halves(q1)
                q1 = _unhalves(_exp2_poly(e0, CLAMP), gl.exp2(e1))
            h0 = _unhalves(q0, q1)
        p = gl.convert_layout(_unhalves(h0, gl.exp2(h1)), s.type.layout)
    return p


@gluon.jit
def _poly_block(j, sm, q_smem, acc, l_i, p_op, s_zero, S, POLY: gl.constexpr,
                MASK: gl.constexpr):
    """Key block j >= 1 of the prescaled fixed-max loop: the shipped ``_attend_block`` (FIXED,
    PRESCALED) with P = 2^S by ``_exp2_mixed``; row sums (per-thread partials, FADD) over all
    of P."""
    stage = j % sm.STAGES
    prev = (j - 1) % sm.STAGES
    mbarrier.wait(sm.k_ready.index(stage), (j // sm.STAGES) & 1)
    s = warpgroup_mma(q_smem, sm.k_bufs.index(stage).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    acc = warpgroup_mma(p_op, sm.v_bufs.index(prev), acc, is_async=True)
    s = warpgroup_mma_wait(1, deps=(s,))
    if MASK:
        s = _mask_tail(s, j * sm.BLOCK_N, S)
    p = _exp2_mixed(s, POLY, MASK)
    l_i = l_i + row_partial_sums(p)
    mbarrier.wait(sm.v_ready.index(stage), (j // sm.STAGES) & 1)  # ends the basic block (ptxas)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(sm.kv_empty.index(prev))
    p_op = gl.convert_layout(p.to(p_op.dtype), p_op.type.layout)
    return acc, l_i, p_op


@gluon.jit
def _poly_loop(sm, q_smem, S, POLY: gl.constexpr):
    """The shipped ``_consumer_loop`` (FIXED, PRESCALED) with ``_poly_block``. Forced with POLY 0
    it compiled (offline, D64 and D128) to the shipped loop's SASS, instruction for instruction."""
    BLOCK_M: gl.constexpr = sm.q_bufs.type.shape[1]
    HEAD_D: gl.constexpr = sm.q_bufs.type.shape[2]
    dtype: gl.constexpr = sm.q_bufs.dtype
    BLOCK_N: gl.constexpr = sm.BLOCK_N
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    o_layout: gl.constexpr = mma_layout(HEAD_D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    l_i = row_partial_sums(s_zero)
    n_blocks = gl.cdiv(S, BLOCK_N)

    mbarrier.wait(sm.k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, sm.k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    p = _exp2_mixed(_mask_tail(s, 0, S), POLY, True)
    l_i = l_i + row_partial_sums(p)
    mbarrier.wait(sm.v_ready.index(0), 0)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    for j in range(1, n_blocks - 1):
        acc, l_i, p_op = _poly_block(j, sm, q_smem, acc, l_i, p_op, s_zero, S, POLY, False)
    if n_blocks > 1:
        acc, l_i, p_op = _poly_block(n_blocks - 1, sm, q_smem, acc, l_i, p_op, s_zero, S, POLY,
                                     True)
    last = (n_blocks - 1) % sm.STAGES
    acc = warpgroup_mma(p_op, sm.v_bufs.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(sm.kv_empty.index(last))
    return acc, gl.convert_layout(gl.sum(l_i, axis=1), gl.SliceLayout(1, s_layout))


# ---------------------------------------------------------------------------------------------
# ROWSUM_MMA: the row sums of the bounded (prescaled, fixed-max) heads on the tensor cores
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _issue_rowsum(p_op, ones, l_acc):
    """Start L += P x ones (async): P the bf16 register operand of P V, ones the [8, BLOCK_N]
    shared tile fed as a K-major [BLOCK_N, 8] B (as K is in Q K^T); every column of the [64, 8]
    fp32 accumulator gets the row sums."""
    lp_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_acc.type.layout,
                                                  k_width=2)
    return warpgroup_mma(gl.convert_layout(p_op, lp_layout), ones.permute((1, 0)), l_acc,
                         is_async=True)


@gluon.jit
def _rowsum_block(j, sm, ones, q_smem, acc, l_acc, p_op, s_zero, S, POLY: gl.constexpr,
                  MASK: gl.constexpr):
    """Key block j >= 1 of the prescaled fixed-max loop (the shipped ``_attend_block`` with FIXED
    and PRESCALED): issue S_j, P_{j-1} V_{j-1} and L += P_{j-1} x ones, wait for S_j only (3
    groups in flight, they retire in order), P_j = 2^S_j while the other two run, then wait for
    both. The V_j mbarrier wait sits between the softmax and the wgmma wait, as in the shipped
    loop (it ends the basic block, so ptxas cannot hoist the wait above the exp2s)."""
    stage = j % sm.STAGES
    prev = (j - 1) % sm.STAGES
    mbarrier.wait(sm.k_ready.index(stage), (j // sm.STAGES) & 1)
    s = warpgroup_mma(q_smem, sm.k_bufs.index(stage).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    acc = warpgroup_mma(p_op, sm.v_bufs.index(prev), acc, is_async=True)
    l_acc = _issue_rowsum(p_op, ones, l_acc)
    s = warpgroup_mma_wait(2, deps=(s,))
    if MASK:
        s = _mask_tail(s, j * sm.BLOCK_N, S)
    p = _exp2_mixed(s, POLY, MASK)
    mbarrier.wait(sm.v_ready.index(stage), (j // sm.STAGES) & 1)
    acc, l_acc = warpgroup_mma_wait(0, deps=(acc, l_acc))
    mbarrier.arrive(sm.kv_empty.index(prev))
    p_op = gl.convert_layout(p.to(p_op.dtype), p_op.type.layout)
    return acc, l_acc, p_op


@gluon.jit
def _rowsum_loop(sm, ones, q_smem, S, POLY: gl.constexpr):
    """All key blocks of one warpgroup, prescaled fixed-max softmax (P = 2^S), row sums by MMA:
    returns the unnormalised O and l (column 0 of the [64, 8] row-sum accumulator) in the layout
    the shipped ``_consumer_loop`` returns it."""
    BLOCK_M: gl.constexpr = sm.q_bufs.type.shape[1]
    HEAD_D: gl.constexpr = sm.q_bufs.type.shape[2]
    dtype: gl.constexpr = sm.q_bufs.dtype
    BLOCK_N: gl.constexpr = sm.BLOCK_N
    s_layout: gl.constexpr = mma_layout(BLOCK_N)
    o_layout: gl.constexpr = mma_layout(HEAD_D)
    l_layout: gl.constexpr = mma_layout(8)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    l_acc = gl.zeros([BLOCK_M, 8], gl.float32, layout=l_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    n_blocks = gl.cdiv(S, BLOCK_N)

    mbarrier.wait(sm.k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, sm.k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    p = _exp2_mixed(_mask_tail(s, 0, S), POLY, True)
    mbarrier.wait(sm.v_ready.index(0), 0)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    for j in range(1, n_blocks - 1):
        acc, l_acc, p_op = _rowsum_block(j, sm, ones, q_smem, acc, l_acc, p_op, s_zero, S, POLY,
                                         False)
    if n_blocks > 1:
        acc, l_acc, p_op = _rowsum_block(n_blocks - 1, sm, ones, q_smem, acc, l_acc, p_op, s_zero,
                                         S, POLY, True)
    last = (n_blocks - 1) % sm.STAGES
    acc = warpgroup_mma(p_op, sm.v_bufs.index(last), acc, is_async=True)
    l_acc = _issue_rowsum(p_op, ones, l_acc)
    acc, l_acc = warpgroup_mma_wait(0, deps=(acc, l_acc))
    mbarrier.arrive(sm.kv_empty.index(last))
    cols = gl.arange(0, 8, layout=gl.SliceLayout(0, l_layout))
    l_i = gl.sum(gl.where((cols == 0)[None, :], l_acc, 0.0), axis=1)  # column 0, exactly
    return acc, gl.convert_layout(l_i, gl.SliceLayout(1, s_layout))


@gluon.jit
def _rowsum_consumer(sm, ones, o_ptr, q_start, S, stride_os, qk_scale, fixed, WG: gl.constexpr,
                     ROWSUM_MMA: gl.constexpr, POLY: gl.constexpr):
    """The shipped ``_consumer_partition`` with PRESCALED; bounded heads take ``_rowsum_loop``
    when ROWSUM_MMA, else ``_poly_loop`` when POLY (eighths of the exponentials on the FMA pipe),
    else the shipped loop; running-max heads the shipped loop."""
    BLOCK_M: gl.constexpr = sm.q_bufs.type.shape[1]
    HEAD_D: gl.constexpr = sm.q_bufs.type.shape[2]
    s_layout: gl.constexpr = mma_layout(sm.BLOCK_N)
    q_smem = sm.q_bufs.index(WG)
    mbarrier.wait(sm.q_bar, 0)
    if fixed:
        if ROWSUM_MMA:
            acc, l_i = _rowsum_loop(sm, ones, q_smem, S, POLY)
        elif POLY > 0:
            acc, l_i = _poly_loop(sm, q_smem, S, POLY)
        else:
            acc, l_i = _consumer_loop(sm, q_smem, qk_scale * 0.0, qk_scale, S, True, True)
    else:
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc, l_i = _consumer_loop(sm, q_smem, m_i, qk_scale, S, False, True)
    store_rows(acc / gl.convert_layout(l_i, gl.SliceLayout(1, mma_layout(HEAD_D)))[:, None],
               o_ptr, q_start + WG * BLOCK_M, S, stride_os)


@gluon.jit
def _rowsum_kernel(q_desc, k_desc, v_desc, o_ptr, norm_ptr, S, H, BH, stride_ob, stride_os,
                   stride_oh, qk_scale, STAGES: gl.constexpr, ROWSUM_MMA: gl.constexpr,
                   POLY: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    """The shipped ``_hopper_attention_fwd_kernel`` with NUM_WG 3, BOUNDED, PRESCALED and V
    token-major; with ROWSUM_MMA the CTA's [8, BLOCK_N] ones tile is written here, by the default
    warps before the partitions start, and fenced for the async proxy (wgmma reads it)."""
    NUM_WG: gl.constexpr = 3
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start = pid_m * (BLOCK_M * NUM_WG)
    row_kv = pid_bh * S
    o_base = o_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    fixed, m_fixed = _score_bound(norm_ptr, pid_bh, BH, qk_scale, True)
    sm = alloc_shared(q_desc, k_desc, v_desc, NUM_WG, STAGES)
    if ROWSUM_MMA:
        ones_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([8, BLOCK_N],
                                                                         q_desc.dtype)
        TPW_N: gl.constexpr = BLOCK_N // 8
        fill_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_N, TPW_N], [4, 1], [1, 0])
        ones = gl.allocate_shared_memory(q_desc.dtype, [8, BLOCK_N], ones_layout,
                                         gl.full([8, BLOCK_N], 1.0, q_desc.dtype,
                                                 layout=fill_layout))
        fence_async_shared()  # generic-proxy stores, read by wgmma (async proxy)
    else:
        ones = sm.q_bar  # unused
    gl.warp_specialize([
        (_rowsum_consumer, (sm, ones, o_base, q_start, S, stride_os, qk_scale, fixed, 0,
                            ROWSUM_MMA, POLY)),
        (_rowsum_consumer, (sm, ones, o_base, q_start, S, stride_os, qk_scale, fixed, 1,
                            ROWSUM_MMA, POLY)),
        (_rowsum_consumer, (sm, ones, o_base, q_start, S, stride_os, qk_scale, fixed, 2,
                            ROWSUM_MMA, POLY)),
        (_load_partition, (sm, q_desc, k_desc, v_desc, row_kv + q_start, row_kv, b * S,
                           h * HEAD_D, S)),
    ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS])


def attention_rowsum(q, k, v, text_len, cos, sin, q_norm, k_norm, eps, scale, *, rowsum_mma=True,
                     stages=None, poly=0):
    """The shipped full path (``hopper.hopper_attention_fwd`` with its defaults: pre-pass with
    per-head max norms, q prescaled, V read in place) on ``_rowsum_kernel``; ``poly``: eighths
    (0..4) of the bounded heads' exponentials by ``_exp2_poly``."""
    from cogvideox_kernels.ops.attention.hopper import PREPASS_CONFIG
    from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd

    B, S, H, D = q.shape
    if q.dtype != torch.bfloat16 or D not in (64, 128):
        raise ValueError(f"q: attention_rowsum takes bf16 with head_dim 64 or 128, got {q.dtype}, "
                         f"head_dim {D}")
    if not v_token_major_ok(v):
        raise ValueError(f"v: must be readable in place ([B*S, H*D] view), strides {v.stride()}")
    if poly not in (0, 1, 2, 3, 4):
        raise ValueError(f"poly: eighths of the exponentials on the FMA pipe, 0..4, got {poly!r}")
    cfg = default_config(D)
    stages = stages or cfg["STAGES"]
    norm_max = torch.zeros((2, B * H), dtype=torch.float32, device=q.device)
    qh = qk_norm_rope_fwd(q, text_len, cos, sin, *q_norm, True, eps, norm_max=norm_max[0],
                          out_scale=scale * LOG2E, **PREPASS_CONFIG)
    kh = qk_norm_rope_fwd(k, text_len, cos, sin, *k_norm, True, eps, norm_max=norm_max[1],
                          **PREPASS_CONFIG)
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    lay = lambda box: gl.NVMMASharedLayout.get_default_for([box, D], gl.bfloat16)  # noqa: E731
    bn = cfg["BLOCK_N"]
    # the pre-pass returns [B, S, H, D] views of [B, H, S, D] storage
    q_desc = TensorDescriptor(qh.transpose(1, 2), [B * H * S, D], [D, 1], [64, D], lay(64))
    k_desc = TensorDescriptor(kh.transpose(1, 2), [B * H * S, D], [D, 1], [bn, D], lay(bn))
    v_desc = TensorDescriptor(v, [B * S, H * D], [v.stride(1), 1], [bn, D], lay(bn))
    consumer_regs, loader_regs = _registers(3)
    grid = (triton.cdiv(S, 192), B * H)
    _rowsum_kernel[grid](q_desc, k_desc, v_desc, out, norm_max, S, H, B * H, out.stride(0),
                         out.stride(1), out.stride(2), 1.0, STAGES=stages,
                         ROWSUM_MMA=bool(rowsum_mma), POLY=int(poly), CONSUMER_REGS=consumer_regs,
                         LOADER_REGS=loader_regs, num_warps=4)
    return out


def compile_rowsum_offline(head_dim=64, rowsum_mma=True, stages=None, poly=0):
    """``_rowsum_kernel`` for sm_90a without a GPU (TRITON_INTERPRET unset)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc_type(box):
        layout = gl.NVMMASharedLayout.get_default_for([box, head_dim], gl.bfloat16)
        return f"tensordesc<bf16[{box}, {head_dim}],{layout!r}>"

    cfg = default_config(head_dim)
    consumer_regs, loader_regs = _registers(3)
    sig = {"q_desc": desc_type(64), "k_desc": desc_type(cfg["BLOCK_N"]),
           "v_desc": desc_type(cfg["BLOCK_N"]), "o_ptr": "*bf16", "norm_ptr": "*fp32", "S": "i32",
           "H": "i32", "BH": "i32", "stride_ob": "i32", "stride_os": "i32", "stride_oh": "i32",
           "qk_scale": "fp32"}
    constexprs = dict(STAGES=stages or cfg["STAGES"], ROWSUM_MMA=rowsum_mma, POLY=poly,
                      CONSUMER_REGS=consumer_regs, LOADER_REGS=loader_regs)
    sig.update({n: "constexpr" for n in constexprs})
    src = GluonASTSource(_rowsum_kernel, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


def compile_offline(pingpong, qfuse, head_dim=64, stages=4, persist=False, lazy_sum=False):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc_type(box):
        layout = gl.NVMMASharedLayout.get_default_for([box, head_dim], gl.bfloat16)
        return f"tensordesc<bf16[{box}, {head_dim}],{layout!r}>"

    bn = default_config(head_dim)["BLOCK_N"]
    consumer_regs, loader_regs = _registers(3)
    sig = {"q_desc": desc_type(64), "k_desc": desc_type(bn), "v_desc": desc_type(bn),
           "o_ptr": "*bf16", "norm_ptr": "*fp32", "S": "i32", "H": "i32", "BH": "i32",
           "n_m": "i32", "n_tiles": "i32", "text_len": "i32", "stride_ob": "i32", "stride_os": "i32", "stride_oh": "i32",
           "qk_scale": "fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "stride_cs": "i32",
           "qw_ptr": "*bf16", "qb_ptr": "*bf16", "eps": "fp32"}
    constexprs = dict(STAGES=stages, PINGPONG=pingpong, QFUSE=qfuse, PERSIST=persist,
                      LAZY_SUM=lazy_sum, CONSUMER_REGS=consumer_regs, LOADER_REGS=loader_regs)
    sig.update({n: "constexpr" for n in constexprs})
    src = GluonASTSource(_next_kernel, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


if __name__ == "__main__":
    import collections
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hopper_same_sass import main_loops

    for name, kw in {"base": {}, **VARIANTS}.items():
        if "rowsum_mma" in kw:
            for d in (64, 128):
                c = compile_rowsum_offline(d, kw["rowsum_mma"], poly=kw.get("poly", 0))
                loops = main_loops(c)
                counts = [dict(collections.Counter(o.split(".")[0] for o in body).most_common(6))
                          for body in loops]
                print(f"{name} D{d}: smem {c.metadata.shared} B, main loops "
                      f"{[len(x) for x in loops]} {counts[:1]}")
            continue
        c = compile_offline(kw.get("pingpong", False), kw.get("qfuse", False),
                            persist=kw.get("persist", False), lazy_sum=kw.get("lazy_sum", False))
        loops = main_loops(c)
        counts = [dict(collections.Counter(o.split(".")[0] for o in body).most_common(6))
                  for body in loops]
        print(f"{name}: smem {c.metadata.shared} B, main loops {[len(x) for x in loops]} {counts[:1]}")
