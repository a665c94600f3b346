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
K/V block read from L2 serves more queries), 128-key blocks, a 3-deep ring at head_dim 64; 64-key
blocks and 4 stages at head_dim 128 (shared memory). Other schedules that were measured (ping-pong,
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


@gluon.jit
def _load_partition(sm, q_desc, k_desc, v_desc, row_q, row_kv, S):
    """One warp: the Q tiles once, then K and V blocks into the ring (K and V on separate
    barriers, so Q K^T can start before V has landed)."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    mbarrier.expect(sm.q_bar, sm.NUM_WG * q_desc.block_type.nbytes)
    for i in gl.static_range(sm.NUM_WG):
        tma.async_copy_global_to_shared(q_desc, [row_q + i * BLOCK_M, 0], sm.q_bar,
                                        sm.q_bufs.index(i))
    n_blocks = gl.cdiv(S, sm.BLOCK_N)
    for j in range(n_blocks):
        stage = j % sm.STAGES
        mbarrier.wait(sm.kv_empty.index(stage), ((j // sm.STAGES) & 1) ^ 1)
        row = row_kv + j * sm.BLOCK_N
        k_bar = sm.k_ready.index(stage)
        mbarrier.expect(k_bar, k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, 0], k_bar, sm.k_bufs.index(stage))
        v_bar = sm.v_ready.index(stage)
        mbarrier.expect(v_bar, v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row, 0], v_bar, sm.v_bufs.index(stage))


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale, n0, S, MASK: gl.constexpr):
    """Online softmax on one key block: P (fp32), the new row max and row sum, and
    alpha = 2^(m_old - m_new) for the accumulator. MASK: the last block (keys past S -> -inf)."""
    if MASK:
        s = _mask_tail(s, n0, S)
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    row_sum = gl.sum(p, axis=1)
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + row_sum
    return p, m_new, l_i, alpha


@gluon.jit
def _attend_block(j, sm, q_smem, acc, m_i, l_i, p_op, s_zero, qk_scale, S, MASK: gl.constexpr):
    """Key block j >= 1: issue S_j = Q K_j^T, issue O += P_{j-1} V_{j-1}, wait for S_j only,
    softmax of S_j while P V runs on the tensor cores, wait for P V, rescale O by alpha_j."""
    stage = j % sm.STAGES
    prev = (j - 1) % sm.STAGES
    mbarrier.wait(sm.k_ready.index(stage), (j // sm.STAGES) & 1)
    s = warpgroup_mma(q_smem, sm.k_bufs.index(stage).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    acc = warpgroup_mma(p_op, sm.v_bufs.index(prev), acc, is_async=True)  # V_{j-1}: waited for
    s = warpgroup_mma_wait(1, deps=(s,))  # groups retire in order: S_j is done, P V may run on
    p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale, j * sm.BLOCK_N, S, MASK)
    # Wait for V_j (the next step's P V operand) here, between the softmax and the P V wait: the
    # mbarrier poll loop ends a basic block. Within one block ptxas (12.8 and 13.0) hoists the
    # wgmma wait above the softmax, which then runs after P V instead of under it.
    mbarrier.wait(sm.v_ready.index(stage), (j // sm.STAGES) & 1)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.arrive(sm.kv_empty.index(prev))
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    p_op = gl.convert_layout(p.to(p_op.dtype), p_op.type.layout)
    return acc, m_i, l_i, p_op


@gluon.jit
def _consumer_partition(sm, o_ptr, q_start, S, stride_os, qk_scale, WG: gl.constexpr):
    """One warpgroup: BLOCK_M query rows (64 or 128) against all keys; stores its rows of the
    output."""
    BLOCK_M: gl.constexpr = sm.q_bufs.type.shape[1]
    HEAD_D: gl.constexpr = sm.q_bufs.type.shape[2]
    dtype: gl.constexpr = sm.q_bufs.dtype
    BLOCK_N: gl.constexpr = sm.BLOCK_N
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_D], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    q_smem = sm.q_bufs.index(WG)
    mbarrier.wait(sm.q_bar, 0)
    n_blocks = gl.cdiv(S, BLOCK_N)

    # ---- block 0: S_0 and its softmax (masked: it may also be the last block)
    mbarrier.wait(sm.k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, sm.k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale, 0, S, True)
    mbarrier.wait(sm.v_ready.index(0), 0)
    p_op = gl.convert_layout(p.to(dtype), p_layout)

    # ---- full blocks 1 .. n-2 (no branch inside the loop), then the last block (masked)
    for j in range(1, n_blocks - 1):
        acc, m_i, l_i, p_op = _attend_block(j, sm, q_smem, acc, m_i, l_i, p_op, s_zero, qk_scale,
                                            S, False)
    if n_blocks > 1:
        acc, m_i, l_i, p_op = _attend_block(n_blocks - 1, sm, q_smem, acc, m_i, l_i, p_op, s_zero,
                                            qk_scale, S, True)

    # ---- the last block's P V
    last = (n_blocks - 1) % sm.STAGES
    acc = warpgroup_mma(p_op, sm.v_bufs.index(last), acc, is_async=True)
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
def _hopper_attention_fwd_kernel(q_desc, k_desc, v_desc, o_ptr, S, H, stride_ob, stride_os,
                                 stride_oh, qk_scale, NUM_WG: gl.constexpr, STAGES: gl.constexpr,
                                 CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr):
    """out[b, rows, h] = softmax(q k^T * scale) v for NUM_WG * BLOCK_M query rows of one (b, h).

    Descriptors are over the head-major [B*H*S, D] storage (boxes: BLOCK_M query rows, BLOCK_N
    keys); qk_scale = scale * log2(e). Rows of a box past its head read the next head (or zeros
    past the end): their scores are masked, their outputs not stored.
    """
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
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
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], v_desc.layout)
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

    sm = _Shared(q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, kv_empty, NUM_WG, BLOCK_N,
                 STAGES)
    # worker arguments are spelled out per call (tuple arithmetic would drop their constexpr-ness)
    if NUM_WG == 2:
        gl.warp_specialize([
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, 0)),
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, 1)),
            (_load_partition, (sm, q_desc, k_desc, v_desc, row_q, row_kv, S)),
        ], [4, 1], [CONSUMER_REGS, LOADER_REGS])
    else:
        gl.static_assert(NUM_WG == 3, "NUM_WG is 2 or 3")
        gl.warp_specialize([
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, 0)),
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, 1)),
            (_consumer_partition, (sm, o_base, q_start, S, stride_os, qk_scale, 2)),
            (_load_partition, (sm, q_desc, k_desc, v_desc, row_q, row_kv, S)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS])


# ----------------------------------------------------------------------------------------------
# configs and launcher
# ----------------------------------------------------------------------------------------------
def default_config(head_dim: int) -> dict:
    """Measured defaults (H200, ``benchmarks/results/hopper_attention_notes.md``): NUM_WG consumer
    warpgroups of BLOCK_M query rows, BLOCK_N keys per block, STAGES of the K/V ring."""
    if head_dim <= 64:
        return dict(NUM_WG=3, BLOCK_M=64, BLOCK_N=128, STAGES=3)
    return dict(NUM_WG=3, BLOCK_M=64, BLOCK_N=64, STAGES=4)


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


def hopper_attention_core(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, out: torch.Tensor,
                          scale: float, config: dict | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v on head-major inputs.

    qh, kh, vh: [B, H, S, D] contiguous (bf16/fp16, D 64 or 128); out: [B, S, H, D] with stride 1
    in D (written and returned). ``config`` overrides keys of ``default_config``.
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

    grid = (triton.cdiv(S, cfg["BLOCK_M"] * cfg["NUM_WG"]), B * H)
    _hopper_attention_fwd_kernel[grid](
        desc(qh, cfg["BLOCK_M"]), desc(kh, cfg["BLOCK_N"]), desc(vh, cfg["BLOCK_N"]), out, S, H,
        out.stride(0), out.stride(1), out.stride(2), float(scale) * LOG2E, **_launch_args(cfg),
        num_warps=4)
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

    signature = {"q_desc": desc_type(cfg["BLOCK_M"]), "k_desc": desc_type(cfg["BLOCK_N"]),
                 "v_desc": desc_type(cfg["BLOCK_N"]), "o_ptr": f"*{dtype}", "S": "i32",
                 "H": "i32", "stride_ob": "i32", "stride_os": "i32", "stride_oh": "i32",
                 "qk_scale": "fp32"}
    constexprs = _launch_args(cfg)
    signature.update({name: "constexpr" for name in constexprs})
    src = GluonASTSource(_hopper_attention_fwd_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
