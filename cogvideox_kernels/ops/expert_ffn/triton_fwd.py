"""Triton forward of ``expert_ffn``: one grouped GEMM kernel serves both FFN matmuls.

Pipeline (all on device, no host sync for the shared FFN of the real checkpoints):

1. ``_modulated_norm_fwd_kernel``: one pass over x, writes ``h = LN(x) * (1 + scale_m) + shift_m``
   (modality m from the token's position: the first ``text_len`` tokens of a sample are text).
2. routing (only with several experts per modality): router logits in torch on h, top-1 expert per
   token, ``torch.sort`` of the expert ids -> a permutation and per-expert row offsets, all on device.
3. ``_grouped_gemm_fwd_kernel`` (GELU epilogue): rows of h (gathered through the permutation) times
   their expert's W1, + b1, tanh-GELU, stored grouped by expert as the [tokens, inner] intermediate.
4. ``_grouped_gemm_fwd_kernel`` (gate epilogue): intermediate times the expert's W2, + b2, times the
   router probability, times the token's modality gate, + x; rows scattered back to token order.

For the shared FFN on a GPU, steps 3-4 may run as cuBLAS(Lt) GEMMs instead (``SHARED_PATH_DEFAULT``,
picked by measurement), keeping our pre-pass and a fused bias + gate + residual kernel.

The tile schedule is a flat list of (m-tile, n-tile) over all groups: m-tiles are numbered group
after group, with an upper bound ``cdiv(rows, BLOCK_M) + groups - 1`` so the grid never needs the
per-group counts on the host; a program maps its m-tile to (group, rows) from the [groups + 1] row
offsets. Programs loop over tiles persistently (or get one tile each, by config).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .._triton_utils import ensure_tma_allocator, interpret_mode, store_cast, tma_aligned
from . import reference as _rows

# modulation rows from their one definition (jit code reads module globals that are constexprs)
ROWS = tl.constexpr(_rows.MODULATION_ROWS)
SHIFT_V, SCALE_V, GATE_V = tl.constexpr(_rows.SHIFT_V), tl.constexpr(_rows.SCALE_V), tl.constexpr(_rows.GATE_V)
SHIFT_T, SCALE_T, GATE_T = tl.constexpr(_rows.SHIFT_T), tl.constexpr(_rows.SCALE_T), tl.constexpr(_rows.GATE_T)

EPILOGUE_GELU = 0
EPILOGUE_GATE_RESIDUAL = 1

# Which path computes the shared-FFN (num_text_experts=0) GEMMs on a GPU; chosen by measurement
# (benchmarks/bench_ffn.py on an H100, benchmarks/results/ffn_h100_8c4a928.md): half-block 5B
# triton 8.39 ms / cublaslt 8.48 / cublas 8.41 (a tie within run-to-run noise), 2B triton 3.63 /
# cublaslt 3.39 / cublas 3.26, so "cublas". Override: COGVIDEOX_KERNELS_FFN_SHARED=triton|cublaslt|cublas.
# Routed experts always run the Triton grouped GEMM.
#   "triton":   both GEMMs in our grouped kernel, epilogues fused.
#   "cublaslt": GEMM1 + bias + tanh-GELU in cuBLASLt (torch._addmm_activation), GEMM2 in our kernel.
#   "cublas":   both GEMMs in cuBLAS(Lt), then our fused bias + gate + residual kernel.
SHARED_PATHS = ("triton", "cublaslt", "cublas")
SHARED_PATH_DEFAULT = "cublas"
SHARED_PATH_ENV = "COGVIDEOX_KERNELS_FFN_SHARED"


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
E4M3_MAX = tl.constexpr(448.0)  # largest float8_e4m3fn value (fp8.py holds the scheme)
INT8_MAX = tl.constexpr(127.0)  # int8 rows use [-127, 127] (int8.py holds the scheme)
# QUANT of the row-quantizing kernels: what a row is written as
QUANT_NONE, QUANT_E4M3, QUANT_INT8 = 0, 1, 2
QUANT_OF = {torch.float8_e4m3fn: QUANT_E4M3, torch.int8: QUANT_INT8}


@triton.jit
def _row_scale(amax, QUANT: tl.constexpr):
    """Scale of a row: amax / 448 (e4m3) or amax / 127 (int8); 1 for an all-zero row (all 0 anyway)."""
    qmax = INT8_MAX if QUANT == 2 else E4M3_MAX
    return tl.where(amax > 0, amax / qmax, 1.0)


@triton.jit
def _to_e4m3(v, INTERPRET: tl.constexpr):
    """float32 ``v`` (|v| <= 448) -> float8_e4m3fn, rounding to nearest even. The GPU's cvt rounds;
    triton 3.6's interpreter does not (it truncates at a binade's top and in the subnormals), so
    there the value is rounded by hand to 3 mantissa bits (subnormals: multiples of 2^-9) first."""
    if INTERPRET:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
        normal = bits.to(tl.float32, bitcast=True)
        sub = tl.floor(tl.abs(v) * 512.0 + 0.5) / 512.0
        v = tl.where(tl.abs(v) < 0.015625, tl.where(v < 0, -sub, sub), normal)
    return v.to(tl.float8e4nv)


@triton.jit
def _to_int8(v, INTERPRET: tl.constexpr):
    """float32 ``v`` (|v| <= 127 up to rounding) -> int8, rounding to nearest even (``torch.round``).
    libdevice is not in the interpreter: there 1.5 * 2^23 added and taken away rounds (IEEE, |v| < 2^22)."""
    if INTERPRET:
        v = (v + 12582912.0) - 12582912.0
    else:
        v = tl.extra.cuda.libdevice.rint(v)
    return tl.clamp(v, -127.0, 127.0).to(tl.int8)


@triton.jit
def _quantize_row(v, mask, QUANT: tl.constexpr, INTERPRET: tl.constexpr):
    """(quantized float32 row ``v``, its scale): e4m3 or int8 per ``QUANT``; masked-off lanes ignored.
    (One return: the compiler, unlike the interpreter, refuses returns of different types.)"""
    scale = _row_scale(tl.max(tl.where(mask, tl.abs(v), 0.0), axis=0), QUANT)
    if QUANT == 2:
        q = _to_int8(v / scale, INTERPRET)
    else:
        q = _to_e4m3(v / scale, INTERPRET)
    return q, scale


@triton.jit
def _modulate(y, row_ok, cols, col_ok, sample, is_text, mod_ptr, norm_w_ptr, norm_b_ptr, hidden,
              HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr):
    """The normed rows ``y`` [R, C] (columns ``cols``) times the norm weight plus bias, modulated by each
    token's modality: (1 + scale_m) and + shift_m."""
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_NORM_W:
        y = y * tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_NORM_B:
        y = y + tl.load(norm_b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.static_assert(SCALE_T - SHIFT_T == SCALE_V - SHIFT_V, "scale sits the same rows after shift")
    shift_row = tl.where(is_text, SHIFT_T, SHIFT_V)
    mod_rows = (sample * ROWS + shift_row) * hidden
    shift = tl.load(mod_ptr + mod_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(mod_ptr + (mod_rows + (SCALE_V - SHIFT_V) * hidden)[:, None] + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
    h = y * (1.0 + scale) + shift
    return h


@triton.jit
def _modulated_norm_fwd_kernel(x_ptr, mod_ptr, norm_w_ptr, norm_b_ptr, h_ptr, h_scale_ptr, seq_len, text_len,
                               hidden, eps, n_rows, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr, QUANT: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, CHUNK: tl.constexpr,
                               INTERPRET: tl.constexpr):
    """h = LN(x) * (1 + scale_m) + shift_m for BLOCK_R tokens; with QUANT (QUANT_E4M3 / QUANT_INT8), h goes
    out quantized with its row scale instead: the activation quantization of precision="fp8" / "int8".
    CHUNK 0: each row whole in registers (BLOCK_H >= hidden). CHUNK > 0 (bf16/fp16 out only): the row in
    CHUNK-column pieces, three passes (mean, centered variance, output; the re-reads hit L2), so that few
    registers per row leave room for many rows in flight."""
    if BLOCK_R == 1 and CHUNK == 0:  # the default launch, as it was measured (1-D: 64 registers at 16 warps)
        row = tl.program_id(0).to(tl.int64)
        sample = row // seq_len
        is_text = (row - sample * seq_len) < text_len
        cols = tl.arange(0, BLOCK_H)
        mask = cols < hidden
        x = tl.load(x_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / hidden
        centered = tl.where(mask, x - mean, 0.0)
        var = tl.sum(centered * centered, axis=0) / hidden
        y = centered / tl.sqrt(var + eps)
        if HAS_NORM_W:
            y = y * tl.load(norm_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM_B:
            y = y + tl.load(norm_b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        shift_row = tl.where(is_text, SHIFT_T, SHIFT_V)
        mod_row = mod_ptr + sample * ROWS * hidden + shift_row * hidden
        shift = tl.load(mod_row + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(mod_row + (SCALE_V - SHIFT_V) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        h = y * (1.0 + scale) + shift
        if QUANT != 0:
            h_q, h_scale = _quantize_row(h, mask, QUANT, INTERPRET)
            tl.store(h_scale_ptr + row, h_scale)
            tl.store(h_ptr + row * hidden + cols, h_q, mask=mask)
        else:
            tl.store(h_ptr + row * hidden + cols, store_cast(h, h_ptr.dtype.element_ty, INTERPRET), mask=mask)
        return
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    sample = rows // seq_len
    is_text = (rows - sample * seq_len) < text_len
    if CHUNK == 0:
        cols = tl.arange(0, BLOCK_H)
        col_ok = cols < hidden
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * hidden + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / hidden
        centered = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / hidden
        y = centered / tl.sqrt(var + eps)[:, None]
        h = _modulate(y, row_ok, cols, col_ok, sample, is_text, mod_ptr, norm_w_ptr, norm_b_ptr, hidden,
                      HAS_NORM_W, HAS_NORM_B)
        if QUANT != 0:
            h_scale = _row_scale(tl.max(tl.where(mask, tl.abs(h), 0.0), axis=1), QUANT)
            if QUANT == 2:
                h_q = _to_int8(h / h_scale[:, None], INTERPRET)
            else:
                h_q = _to_e4m3(h / h_scale[:, None], INTERPRET)
            tl.store(h_scale_ptr + rows, h_scale, mask=row_ok)
            tl.store(h_ptr + offs, h_q, mask=mask)
        else:
            tl.store(h_ptr + offs, store_cast(h, h_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        tl.static_assert(QUANT == 0, "the chunked pre-pass writes bf16/fp16 h only")
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, hidden, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            mask = row_ok[:, None] & (cols < hidden)[None, :]
            x = tl.load(x_ptr + rows[:, None] * hidden + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            total += tl.sum(x, axis=1)
        mean = total / hidden
        total = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, hidden, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            mask = row_ok[:, None] & (cols < hidden)[None, :]
            x = tl.load(x_ptr + rows[:, None] * hidden + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            centered = tl.where(mask, x - mean[:, None], 0.0)
            total += tl.sum(centered * centered, axis=1)
        rstd = 1.0 / tl.sqrt(total / hidden + eps)
        for c0 in range(0, hidden, CHUNK):
            cols = c0 + tl.arange(0, CHUNK)
            col_ok = cols < hidden
            mask = row_ok[:, None] & col_ok[None, :]
            offs = rows[:, None] * hidden + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None]
            h = _modulate(y, row_ok, cols, col_ok, sample, is_text, mod_ptr, norm_w_ptr, norm_b_ptr, hidden,
                          HAS_NORM_W, HAS_NORM_B)
            tl.store(h_ptr + offs, store_cast(h, h_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _gelu_tanh(v):
    # 0.5 * v * (1 + tanh(u)) == v * sigmoid(2u): exp-based, exact under the interpreter and on GPU
    u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
    return v / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _ffn_epilogue(acc, rows, row_mask, tokens, cols, N, c_ptr, bias_ptr, bias_base, x_ptr, mod_ptr, row_scale_ptr,
                  seq_len, text_len, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """acc [rows, cols] (fp32) + bias, then GELU -> c[row] (EPILOGUE 0) or x + gate * scale * acc -> c[token]."""
    col_mask = cols < N
    out_mask = row_mask[:, None] & col_mask[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + bias_base + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 0:  # tanh-GELU, stored in grouped row order
        acc = _gelu_tanh(acc)
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(c_ptrs, store_cast(acc, c_ptr.dtype.element_ty, INTERPRET), mask=out_mask)
    else:  # * router prob * gate_m + x, stored at the token's row
        if HAS_ROW_SCALE:
            acc = acc * tl.load(row_scale_ptr + tokens, mask=row_mask, other=0.0)[:, None]
        sample = tokens // seq_len
        gate_row = tl.where(tokens - sample * seq_len < text_len, GATE_T, GATE_V)
        gate = tl.load(mod_ptr + (sample * ROWS + gate_row)[:, None] * N + cols[None, :],
                       mask=out_mask, other=0.0).to(tl.float32)
        token_offs = tokens[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + token_offs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(c_ptr + token_offs, store_cast(x + gate * acc, c_ptr.dtype.element_ty, INTERPRET), mask=out_mask)


@triton.jit
def _grouped_gemm_fwd_kernel(
        a_ptr, b_ptr, c_ptr, bias_ptr, group_rows_ptr, row_index_ptr,
        x_ptr, mod_ptr, row_scale_ptr,
        total_rows, N, K, seq_len, text_len, num_programs,
        NUM_GROUPS: tl.constexpr, EPILOGUE: tl.constexpr,
        GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
        A_TMA: tl.constexpr, B_TMA: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EPILOGUE_SUBTILE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr,
        INTERPRET: tl.constexpr):
    """C[rows of group g] = epilogue(A[rows] @ B[g]^T), B: [groups, N, K] (nn.Linear layout).

    Rows live in "grouped" order: group g owns rows [group_rows[g], group_rows[g+1]). With GATHER_A,
    A's row r is A[row_index[r]]; with SCATTER_C, C's row r (and x, row scale, gate) is token
    row_index[r]; else row r is token r.
    """
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(total_rows, BLOCK_M) + NUM_GROUPS - 1
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = num_m_tiles * num_n_tiles
    if A_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[total_rows, K], strides=[K, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    if B_TMA:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[NUM_GROUPS * N, K], strides=[K, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(pid, num_tiles, num_programs, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        # GROUP_M swizzle over the (virtual m-tile, n-tile) grid, for L2 reuse of B columns
        tiles_per_band = GROUP_M * num_n_tiles
        band = tile // tiles_per_band
        first_m = band * GROUP_M
        band_m = tl.minimum(num_m_tiles - first_m, GROUP_M)
        m_tile = first_m + (tile % tiles_per_band) % band_m
        n_tile = (tile % tiles_per_band) // band_m

        # which group owns this m-tile (m-tiles numbered group after group)
        if NUM_GROUPS == 1:
            group = pid * 0
            row_start = m_tile * BLOCK_M
            row_end = total_rows
        else:
            group = pid * 0
            row_start = 0
            row_end = 0
            tiles_before = 0
            for g in tl.static_range(NUM_GROUPS):
                g_start = tl.load(group_rows_ptr + g)
                g_end = tl.load(group_rows_ptr + g + 1)
                g_tiles = tl.cdiv(g_end - g_start, BLOCK_M)
                mine = (m_tile >= tiles_before) & (m_tile < tiles_before + g_tiles)
                group = tl.where(mine, g, group)
                row_start = tl.where(mine, g_start + (m_tile - tiles_before) * BLOCK_M, row_start)
                row_end = tl.where(mine, g_end, row_end)
                tiles_before += g_tiles
        rows = row_start + offs_m
        row_mask = rows < row_end
        cols = n_tile * BLOCK_N + offs_n
        col_mask = cols < N
        # tiles past the last group (the upper bound's slack) run no K iterations and store nothing
        k_end = tl.where(row_start < row_end, K, 0)

        if GATHER_A:
            a_rows = tl.load(row_index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        b_rows = group.to(tl.int64) * N + cols
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, k_end, BLOCK_K):
            if A_TMA:
                a = a_desc.load([row_start, k])
            else:
                ks = k + offs_k
                a = tl.load(a_ptr + a_rows[:, None] * K + ks[None, :],
                            mask=row_mask[:, None] & (ks[None, :] < K), other=0.0)
            if B_TMA:
                b = b_desc.load([group * N + n_tile * BLOCK_N, k])
            else:
                ks = k + offs_k
                b = tl.load(b_ptr + b_rows[:, None] * K + ks[None, :],
                            mask=col_mask[:, None] & (ks[None, :] < K), other=0.0)
            if INTERPRET:  # bf16 arithmetic is wrong in the interpreter: do the dot in fp32 there
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32).T, acc)
            else:
                acc = tl.dot(a.to(b.dtype), b.T, acc)

        if EPILOGUE == 1 and SCATTER_C:
            tokens = tl.load(row_index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            tokens = rows.to(tl.int64)
        bias_base = group.to(tl.int64) * N
        if EPILOGUE_SUBTILE:  # two [BLOCK_M, BLOCK_N / 2] halves: fewer live registers in the epilogue
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            cols0 = n_tile * BLOCK_N + tl.arange(0, BLOCK_N // 2)
            _ffn_epilogue(acc0, rows, row_mask, tokens, cols0, N, c_ptr, bias_ptr, bias_base, x_ptr, mod_ptr,
                          row_scale_ptr, seq_len, text_len, EPILOGUE, HAS_BIAS, HAS_ROW_SCALE,
                          INTERPRET)
            _ffn_epilogue(acc1, rows, row_mask, tokens, cols0 + BLOCK_N // 2, N, c_ptr, bias_ptr, bias_base,
                          x_ptr, mod_ptr, row_scale_ptr, seq_len, text_len, EPILOGUE, HAS_BIAS, HAS_ROW_SCALE,
                          INTERPRET)
        else:
            _ffn_epilogue(acc, rows, row_mask, tokens, cols, N, c_ptr, bias_ptr, bias_base, x_ptr, mod_ptr,
                          row_scale_ptr, seq_len, text_len, EPILOGUE, HAS_BIAS, HAS_ROW_SCALE,
                          INTERPRET)


@triton.jit
def _gate_residual_fwd_kernel(x_ptr, f_ptr, mod_ptr, bias_ptr, out_ptr, seq_len, text_len, hidden,
                              HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr):
    """out = x + gate_m * (f + b2), one token per program (the cuBLAS GEMM2 alternative)."""
    row = tl.program_id(0).to(tl.int64)
    sample = row // seq_len
    gate_row = tl.where(row - sample * seq_len < text_len, GATE_T, GATE_V)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    f = tl.load(f_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        f = f + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(mod_ptr + (sample * ROWS + gate_row) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, store_cast(x + gate * f, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1,
                        persistent=True, num_programs=3, warp_specialize=False, flatten=False,
                        epilogue_subtile=True)


def default_config(dtype: torch.dtype, M: int, N: int, K: int, epilogue: int, gather_a: bool = False) -> dict:
    """Best of the H100 sweep at the 5B shape (benchmarks/results/ffn_h100_sweep_8c4a928.jsonl):
    GEMM1 (GELU epilogue) 3.90 ms = 689 TF/s, GEMM2 (gate/residual epilogue) 3.63 ms = 739 TF/s.
    The interpreter gets one small config."""
    if interpret_mode():
        return dict(INTERPRET_CONFIG)
    if dtype == torch.float32:  # tf32 tiles: half the K depth fits the same shared memory (not swept)
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3,
                    persistent=True, epilogue_subtile=True)
    if epilogue == EPILOGUE_GELU:
        # 4 stages were measured with TMA loads; the routed GEMM1 gathers rows with pointer loads, where
        # only 3 stages ran on the GPU (tests), so it keeps 3
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3 if gather_a else 4,
                    persistent=True, epilogue_subtile=True)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3,
                persistent=False, epilogue_subtile=True)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tma_ok(t: torch.Tensor) -> bool:
    """The descriptors here assume packed rows: contiguous, and the TMA alignment rule."""
    return t.is_contiguous() and tma_aligned(t)


def grouped_gemm_fwd(a, weight, bias, out, *, epilogue, group_rows=None, row_index=None, gather_a=False,
                     scatter_c=False, x=None, modulation=None, row_scale=None, seq_len=1, text_len=0,
                     config=None):
    """One launch over all groups. a: [rows, K]; weight: [G, N, K]; bias: [G, N] or None.

    epilogue GELU: out[row] = gelu_tanh(a[row] @ W_g^T + b_g) in grouped row order.
    epilogue GATE_RESIDUAL: out[tok] = x[tok] + gate_m(tok) * scale[tok] * (a[row] @ W_g^T + b_g).
    ``group_rows`` [G + 1] int32 (device) row offsets, needed when G > 1.
    """
    rows, K = a.shape
    G, N, _ = weight.shape
    cfg = dict(default_config(a.dtype, rows, N, K, epilogue, gather_a))
    if config:
        cfg.update(config)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    num_tiles = (triton.cdiv(rows, BM) + G - 1) * triton.cdiv(N, BN)
    if cfg.get("persistent", True):
        if "num_programs" in cfg:
            programs = cfg["num_programs"]
        else:
            programs = _num_sms(a.device.index if a.device.index is not None else torch.cuda.current_device())
        programs = max(1, min(num_tiles, programs))
    else:
        programs = num_tiles
    use_tma = cfg.get("tma", True)
    a_tma = use_tma and not gather_a and _tma_ok(a)
    b_tma = use_tma and _tma_ok(weight)
    if a_tma or b_tma:
        ensure_tma_allocator()
    if G > 1 and group_rows is None:
        raise ValueError(f"grouped_gemm_fwd: weight stacks {G} groups but group_rows was not given")
    dummy = out
    _grouped_gemm_fwd_kernel[(programs,)](
        a, weight, out, bias if bias is not None else dummy,
        group_rows if group_rows is not None else dummy, row_index if row_index is not None else dummy,
        x if x is not None else dummy, modulation if modulation is not None else dummy,
        row_scale if row_scale is not None else dummy,
        rows, N, K, seq_len, text_len, programs,
        NUM_GROUPS=G, EPILOGUE=epilogue, GATHER_A=gather_a, SCATTER_C=scatter_c,
        HAS_BIAS=bias is not None, HAS_ROW_SCALE=row_scale is not None, A_TMA=a_tma, B_TMA=b_tma,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        EPILOGUE_SUBTILE=cfg.get("epilogue_subtile", False), WARP_SPECIALIZE=cfg.get("warp_specialize", False),
        FLATTEN=cfg.get("flatten", False),
        INTERPRET=interpret_mode(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


# (rows per program, warps, chunk columns or 0) of the LN-modulate pre-pass; None: the measured default
# (norm_launch). benchmarks/experiments/norm_sweep.py times other launches.
NORM_LAUNCH = None


def norm_launch(hidden: int, quantize: bool) -> tuple[int, int, int]:
    """The LN-modulate pre-pass launch. bf16/fp16 out at hidden >= 2048: four rows per program in
    1024-column chunks with 4 warps (H200, 5B shape, 485a03c: 0.143 ms = 3.06 TB/s against 0.221 ms =
    1.98 TB/s for one whole row per program with 16 warps; benchmarks/results/h200_s5/). Quantized out
    (the row scale needs the whole row) and narrower rows keep one whole row per program, hidden / 256
    warps (4..16)."""
    if NORM_LAUNCH is not None:
        return NORM_LAUNCH
    if not quantize and hidden >= 2048:
        return (4, 4, 1024)
    return (1, min(16, max(4, triton.next_power_of_2(hidden) // 256)), 0)


def modulated_norm_fwd(x2d, modulation, norm_weight, norm_bias, eps, seq_len, text_len, out_dtype):
    """h = LN(x) * (1 + scale_m) + shift_m for x2d [B*S, hidden] (contiguous), in out_dtype.
    out_dtype ``torch.float8_e4m3fn`` / ``torch.int8``: returns (h quantized per row, its float32 row
    scales [B*S]) (fp8.py / int8.py)."""
    rows, hidden = x2d.shape
    quant = QUANT_OF.get(out_dtype, QUANT_NONE)
    quantize = quant != QUANT_NONE
    h = torch.empty(rows, hidden, dtype=out_dtype, device=x2d.device)
    h_scale = torch.empty(rows, dtype=torch.float32, device=x2d.device) if quantize else h
    block = triton.next_power_of_2(hidden)
    block_r, num_warps, chunk = norm_launch(hidden, quantize)
    if quantize:
        chunk = 0  # the row scale needs the whole row: the chunked form writes bf16/fp16 only
    if interpret_mode():
        num_warps = 4
    _modulated_norm_fwd_kernel[(triton.cdiv(rows, block_r),)](
        x2d, modulation, norm_weight if norm_weight is not None else x2d,
        norm_bias if norm_bias is not None else x2d, h, h_scale, seq_len, text_len, hidden, eps, rows,
        HAS_NORM_W=norm_weight is not None, HAS_NORM_B=norm_bias is not None, QUANT=quant, BLOCK_R=block_r,
        BLOCK_H=block, CHUNK=chunk, INTERPRET=interpret_mode(), num_warps=num_warps)
    return (h, h_scale) if quantize else h


def gate_residual_fwd(x2d, f, modulation, bias, seq_len, text_len):
    rows, hidden = x2d.shape
    out = torch.empty_like(x2d)
    block = triton.next_power_of_2(hidden)
    _gate_residual_fwd_kernel[(rows,)](x2d, f, modulation, bias if bias is not None else f, out, seq_len,
                                       text_len, hidden, HAS_BIAS=bias is not None, BLOCK_H=block,
                                       INTERPRET=interpret_mode(),
                                       num_warps=4 if interpret_mode() else min(16, max(4, block // 256)))
    return out


def route_tokens(h, text_len, num_experts, num_text_experts, text_router, video_router):
    """Top-1 expert [B*S] (int64) and its softmax probability [B*S] (fp32) for every token, on device.

    Loops over the two modalities (not over experts or samples); a modality with one expert gets
    that expert with scale 1.
    """
    B, S, Hd = h.shape
    expert = torch.zeros(B, S, dtype=torch.long, device=h.device)
    scale = torch.ones(B, S, dtype=torch.float32, device=h.device)
    nt = num_text_experts
    for lo, hi, n, router, offset in ((0, text_len, nt, text_router, 0),
                                      (text_len, S, num_experts - nt, video_router, nt)):
        if hi == lo:
            continue
        if n == 1:
            expert[:, lo:hi] = offset
            continue
        weight, bias = router
        logits = torch.nn.functional.linear(h[:, lo:hi].float(), weight.float(),
                                            None if bias is None else bias.float())
        prob, idx = logits.softmax(dim=-1).max(dim=-1)
        expert[:, lo:hi] = idx + offset
        scale[:, lo:hi] = prob
    return expert.view(-1), scale.view(-1)


def _shared_path() -> str:
    path = os.environ.get(SHARED_PATH_ENV, SHARED_PATH_DEFAULT)
    if path not in SHARED_PATHS:
        raise ValueError(f"{SHARED_PATH_ENV}={path!r} is not supported; choose one of {SHARED_PATHS}")
    return path


def _linear_gelu_cublaslt(h, weight, bias):
    """gelu_tanh(h @ weight^T + bias) by cuBLASLt's fused bias + GELU epilogue (tanh approximation;
    torch's own CUDA fallback for this call is tanh-GELU too). On CPU torch's version uses erf-GELU,
    so there we spell it out."""
    if h.is_cuda:
        return torch._addmm_activation(bias, h, weight.t(), use_gelu=True)
    return torch.nn.functional.gelu(torch.nn.functional.linear(h, weight, bias), approximate="tanh")


def expert_ffn_fwd(x, modulation, w1, b1, w2, b2, text_len, norm_weight, norm_bias, eps, num_text_experts,
                   text_router, video_router, shared_path=None, config1=None, config2=None):
    """Launch the pipeline; inputs checked and contiguous (the registry's layout). Returns a new
    tensor shaped like x."""
    B, S, Hd = x.shape
    E, inner, _ = w1.shape
    T = B * S
    x2d = x.view(T, Hd)
    routed = num_text_experts > 0 and E > 1 and (text_router is not None or video_router is not None)

    if num_text_experts == 0:  # one shared FFN: a single group of all T rows, no permutation
        h = modulated_norm_fwd(x2d, modulation, norm_weight, norm_bias, eps, S, text_len, x.dtype)
        path = shared_path or (_shared_path() if x.is_cuda else "triton")
        if path in ("cublaslt", "cublas") and b1 is not None:
            inter = _linear_gelu_cublaslt(h, w1[0], b1[0])
        else:
            inter = torch.empty(T, inner, dtype=x.dtype, device=x.device)
            grouped_gemm_fwd(h, w1, b1, inter, epilogue=EPILOGUE_GELU, config=config1)
        if path == "cublas":
            f = torch.mm(inter, w2[0].t())
            return gate_residual_fwd(x2d, f, modulation, None if b2 is None else b2[0], S, text_len).view(B, S, Hd)
        out = torch.empty_like(x2d)
        grouped_gemm_fwd(inter, w2, b2, out, epilogue=EPILOGUE_GATE_RESIDUAL, x=x2d, modulation=modulation,
                         seq_len=S, text_len=text_len, config=config2)
        return out.view(B, S, Hd)

    # experts: h in fp32 when routing so the router sees the same values as the fp32 reference
    h_dtype = torch.float32 if routed else x.dtype
    h = modulated_norm_fwd(x2d, modulation, norm_weight, norm_bias, eps, S, text_len, h_dtype)
    if routed:
        expert, row_scale = route_tokens(h.view(B, S, Hd), text_len, E, num_text_experts, text_router,
                                         video_router)
    else:  # one expert per modality: expert = is_video
        pos = torch.arange(S, device=x.device)
        expert = (pos >= text_len).long().expand(B, S).reshape(-1)
        row_scale = None
    sorted_expert, order = torch.sort(expert, stable=True)
    group_rows = torch.searchsorted(sorted_expert, torch.arange(E + 1, device=x.device)).to(torch.int32)
    order = order.to(torch.int32)
    inter = torch.empty(T, inner, dtype=x.dtype, device=x.device)
    grouped_gemm_fwd(h, w1, b1, inter, epilogue=EPILOGUE_GELU, group_rows=group_rows, row_index=order,
                     gather_a=True, config=config1)
    out = torch.empty_like(x2d)
    grouped_gemm_fwd(inter, w2, b2, out, epilogue=EPILOGUE_GATE_RESIDUAL, group_rows=group_rows,
                     row_index=order, scatter_c=True, x=x2d, modulation=modulation, row_scale=row_scale,
                     seq_len=S, text_len=text_len, config=config2)
    return out.view(B, S, Hd)


# --------------------------------------------------------------------------------------------
# custom op (opaque to torch.compile) and the function the dispatcher calls
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("cogvideox_kernels::expert_ffn", mutates_args=())
def expert_ffn_op(x: torch.Tensor, modulation: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                  w2: torch.Tensor, b2: Optional[torch.Tensor], text_len: int,
                  norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], eps: float,
                  num_text_experts: int, text_router_weight: Optional[torch.Tensor],
                  text_router_bias: Optional[torch.Tensor], video_router_weight: Optional[torch.Tensor],
                  video_router_bias: Optional[torch.Tensor]) -> torch.Tensor:
    text_router = None if text_router_weight is None else (text_router_weight, text_router_bias)
    video_router = None if video_router_weight is None else (video_router_weight, video_router_bias)
    return expert_ffn_fwd(x, modulation, w1, b1, w2, b2, text_len, norm_weight, norm_bias, eps,
                          num_text_experts, text_router, video_router)


@expert_ffn_op.register_fake
def _expert_ffn_fake(x, modulation, w1, b1, w2, b2, text_len, norm_weight, norm_bias, eps, num_text_experts,
                     text_router_weight, text_router_bias, video_router_weight, video_router_bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def supports(x, precision="bf16", **inputs) -> str | None:
    """Registry ``supports``: None for the inputs this kernel takes, else why not."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x has dtype {x.dtype}; the Triton kernels take float16, bfloat16 and float32"
    if precision == "fp8":
        from . import fp8

        return fp8.supports(x, **inputs)
    if precision == "int8":
        from . import int8

        return int8.supports(x, **inputs)
    return None


def expert_ffn_triton(x, modulation, w1, b1, w2, b2, *, text_len, norm_weight=None, norm_bias=None, eps=1e-5,
                      num_text_experts=0, text_router=None, video_router=None, precision="bf16"):
    """Triton backend of ``expert_ffn`` (inputs checked and ``supports``-ed by the registry)."""
    if precision == "fp8":  # the shared FFN (``fp8.supports``)
        from .fp8 import expert_ffn_fp8_op

        return expert_ffn_fp8_op(x, modulation, w1, b1, w2, b2, int(text_len), norm_weight, norm_bias, float(eps))
    if precision == "int8":  # the shared FFN (``int8.supports``)
        from .int8 import expert_ffn_int8_op

        return expert_ffn_int8_op(x, modulation, w1, b1, w2, b2, int(text_len), norm_weight, norm_bias, float(eps))
    tw, tb = text_router if text_router is not None else (None, None)
    vw, vb = video_router if video_router is not None else (None, None)
    return expert_ffn_op(x, modulation, w1, b1, w2, b2, int(text_len), norm_weight, norm_bias, float(eps),
                         int(num_text_experts), tw, tb, vw, vb)
