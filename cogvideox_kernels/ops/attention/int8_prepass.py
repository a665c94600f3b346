"""8-bit attention (``precision="int8"``): the quantizing pre-pass and its float32 emulation.

SageAttention2's recipe for Q K^T, fused with our QK LayerNorm + RoPE3D pre-pass
(``_norm_rope_tile``):

* **K smoothing**: k' = k - mean_s(k) per (b, h, channel), over all tokens after norm + RoPE.
  q k'^T differs from q k^T by a per-query-row constant, which softmax ignores; the mean takes out
  the channel offsets that would otherwise set the INT8 scale of every key.
* **Rotation** (``rotate``, on by default): q and k' times one fixed
  orthogonal D x D matrix R (a Hadamard matrix / sqrt(D) with fixed random row signs,
  ``rotation_matrix``) before quantization. (q R)(k' R)^T = q k'^T, so the kernel is unchanged;
  the rotation spreads a heavy-tailed row's few large channels (and the channel offsets that RoPE
  moves with the position, which the smoothing cannot remove) over all channels, so amax / 127
  is a finer step. On the hard inputs it takes the emulated error from ~2.9x to ~1.7x the bf16
  path's (``benchmarks/results/int8_attention_notes.md``).
* **q -> INT8** with one scale per token (a row of the score matrix: the kernel folds it into the
  softmax's per-row FFMA for free); **k' -> INT8** with one scale per block of ``block_n`` keys
  (the kernel's key block, so one scalar per Q K^T block). Scales are amax / 127, round to nearest.
* **k as two INT8 parts** (``k_split``, "heads" by default): beside
  k_hi = round(k' / s) the pre-pass writes k_lo = round((k' / s - k_hi) * 2^7) (|k_lo| <= 64, same
  scale s, same layout), so k' ~= s (k_hi + k_lo / 2^7) = s / 2^7 round(k' / s * 2^7): a 15-bit k.
  The kernel's K_SPLIT runs a second s8 Q K^T per key block (q8 . k_lo into the same s32
  accumulator after shifting q8 . k_hi by 7 bits). K's INT8 rounding is most of the error on the
  hard inputs; with the rotation this brings it from ~2.9x to ~1.1x the bf16 path's
  (``benchmarks/results/int8_attention_notes.md``). ``k_split="heads"``: only the heads whose
  score bound does not hold (T > 80, ``score_bound``: those that keep the running max, where K's
  rounding error, which grows with T, matters) use k_lo; the others multiply k_hi alone, so the
  norms (and the bound) are k_hi's, as without the split.
* **v -> FP8 e4m3** (``fp8_v``, for the kernel's PV_FP8 config) with one scale per (b, h, channel)
  (amax / 448), stored transposed ``[B, H, D, S_pad]`` (S padded to 16 with zeros): FP8 wgmma
  needs both operands K-major, and for P V the reduction runs over keys. The shipped kernel keeps
  P V in 16 bits (V as the bf16 pre-pass writes it): FP8 P V was slower and 3.4x less accurate
  on the H200 (``benchmarks/results/int8_attention_notes.md``).

Two launches per tensor: a column-statistics pass (partial sums of normed, rotated k; partial
absolute maxima of v, per chunk of tokens, reduced in torch) and the quantizing pass. ``q`` needs
only the second. ``int8_attention_reference`` computes the same quantization in torch and the
attention in float32 from the dequantized values, with P rounded as the kernel rounds it, so CPU
tests check the maths without the Gluon kernel.
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..._backend import env_switch
from .._triton_utils import interpret_mode
from .reference import qk_norm_rope_reference
from .triton_fwd import _norm_rope_tile

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
LOG2E = 1.4426950408889634
P_SCALE = FP8_MAX  # softmax probabilities p in [0, 1] are stored as p * 448 in e4m3
V_PAD = 16  # V^T rows padded to 16 keys: TMA strides are multiples of 16 bytes
# how the pre-pass kernel rotates (``_rotate``): 1 = Hadamard entries from indices, three bf16 products
ROT_MODE = 1
# warps of k's quantizing pass (block_n = 128 tokens per program). Offline sm_90a SASS (4895424): with 4 it
# spills ~540 STL / ~590 LDL per thread (rotation or not), with 8 16-41 (0 without the k split). H200
# (cf372be, attention_quality.py): pre-pass with rotation + k split 1.177 ms with 8 warps vs 1.248 with 4.
K_WARPS = 8
ROTATE_ENV = "COGVIDEOX_KERNELS_INT8_ROTATE"  # "1": rotate q and k by default (see above)
K_SPLIT_ENV = "COGVIDEOX_KERNELS_INT8_K_SPLIT"  # "1" / "heads": k as two INT8 parts (see above)
K_SPLIT_MODES = (False, True, "heads")
K_LO_BITS = 7  # k_lo's weight is 2^-K_LO_BITS of k_hi's (|k_lo| <= 2^(K_LO_BITS - 1))
_I8 = tl.constexpr(INT8_MAX)  # the same constants inside kernels
_F8 = tl.constexpr(FP8_MAX)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tile(x_ptr, pid_s, pid_bh, S, H, text_len, stride_xb, stride_xs, stride_xh, cos_ptr, sin_ptr,
          stride_cs, weight_ptr, bias_ptr, eps, HAS_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
          HAS_BIAS: tl.constexpr, HAS_ROPE: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
          BLOCK_D: tl.constexpr):
    """BLOCK_S tokens of one (b, h): normed + rotated float32 [BLOCK_S, BLOCK_D], rows past S and
    columns past D zero; also the token indices."""
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    tokens = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = tokens < S
    offs_d = tl.arange(0, BLOCK_D)
    rows = b * stride_xb + tokens.to(tl.int64) * stride_xs + h * stride_xh
    x = _norm_rope_tile(x_ptr, rows, tokens, row_mask, offs_d, D, text_len, cos_ptr, sin_ptr,
                        stride_cs, weight_ptr, bias_ptr, eps, HAS_NORM, HAS_WEIGHT, HAS_BIAS,
                        HAS_ROPE)
    return tl.where(row_mask[:, None] & (offs_d < D)[None, :], x, 0.0), tokens


@triton.jit
def _column_stats_kernel(x_ptr, part_ptr, S, H, text_len, stride_xb, stride_xs, stride_xh,
                         cos_ptr, sin_ptr, stride_cs, weight_ptr, bias_ptr, eps,
                         HAS_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_ROPE: tl.constexpr, AMAX: tl.constexpr, D: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """part[b, h, chunk, :D] = sum over the chunk's tokens of rope(norm(x)) (AMAX: max |x|)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    x, _ = _tile(x_ptr, pid_s, pid_bh, S, H, text_len, stride_xb, stride_xs, stride_xh, cos_ptr,
                 sin_ptr, stride_cs, weight_ptr, bias_ptr, eps, HAS_NORM, HAS_WEIGHT, HAS_BIAS,
                 HAS_ROPE, D, BLOCK_S, BLOCK_D)
    if AMAX:
        col = tl.max(tl.abs(x), axis=0)
    else:
        col = tl.sum(x, axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    out = part_ptr + (pid_bh.to(tl.int64) * tl.num_programs(0) + pid_s) * D
    tl.store(out + offs_d, col, mask=offs_d < D)


@triton.jit
def _rotate(x, rot_ptr, offs_d, BLOCK_D: tl.constexpr, ROT_MODE: tl.constexpr):
    """x [rows, BLOCK_D] float32 times the rotation R = diag(signs) H / sqrt(BLOCK_D).
    ROT_MODE 1 (2 under the interpreter, float32 products of the same bf16 values): rot_ptr holds
    the signs [BLOCK_D]; H's +-1 entries come from the indices
    (H[i, j] = (-1)^popcount(i & j), Sylvester order) and x * signs goes through three bf16 products
    (x = hi + mid + lo, all bf16: 24 bits; the +-1 products are exact and accumulate in float32,
    smallest first): float32-accurate without loading a matrix per program. ROT_MODE 0: rot_ptr holds R (float32,
    row-major), 3 TF32 products."""
    if ROT_MODE == 0:
        rot = tl.load(rot_ptr + offs_d[:, None] * BLOCK_D + offs_d[None, :])
        return tl.dot(x, rot, input_precision="tf32x3")
    xs = x * tl.load(rot_ptr + offs_d)[None, :]
    par = offs_d[:, None] & offs_d[None, :]
    par = par ^ (par >> 4)
    par = par ^ (par >> 2)
    par = par ^ (par >> 1)  # bit 0: the parity of i & j (head dims up to 256)
    had = (1.0 - 2.0 * (par & 1).to(tl.float32)).to(tl.bfloat16)  # (the interpreter mangles int -> bf16)
    hi = xs.to(tl.bfloat16)
    rest = xs - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    if ROT_MODE == 2:  # the interpreter (its bf16 tl.dot is wrong): the same exact products in float32
        hi, mid, lo, had = hi.to(tl.float32), mid.to(tl.float32), lo.to(tl.float32), had.to(tl.float32)
        acc = tl.dot(lo, had, input_precision="ieee")
        acc = tl.dot(mid, had, acc, input_precision="ieee")
        acc = tl.dot(hi, had, acc, input_precision="ieee")
    else:
        acc = tl.dot(lo, had, out_dtype=tl.float32)
        acc = tl.dot(mid, had, acc, out_dtype=tl.float32)
        acc = tl.dot(hi, had, acc, out_dtype=tl.float32)
    return acc * (1.0 / tl.sqrt(tl.full([], BLOCK_D, tl.float32)))


@triton.jit
def _quant_int8_kernel(x_ptr, y_ptr, scale_ptr, mean_ptr, norm_ptr, rot_ptr, S, H, text_len,
                       stride_xb, stride_xs, stride_xh, cos_ptr, sin_ptr, stride_cs, weight_ptr,
                       bias_ptr, eps, lo_ptr, HAS_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_MEAN: tl.constexpr,
                       ROTATE: tl.constexpr, PER_ROW: tl.constexpr, NORM_SQ: tl.constexpr,
                       D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                       SPLIT: tl.constexpr = False, LO_BITS: tl.constexpr = 7,
                       LO_NORM: tl.constexpr = True, ROT_MODE: tl.constexpr = 1):
    """y[b, h, s] = round(x' / scale) as int8, x' = rope(norm(x)) (- mean[b, h] with HAS_MEAN),
    head-major [B, H, S, D]; ROTATE: x' times the orthogonal rot [D, D] (float32, row-major;
    D == BLOCK_D) first; scale = amax / 127 per token (PER_ROW, scale[b, h, s]) or per
    BLOCK_S tokens (scale[b, h, block]). NORM_SQ: norm[b, h, program] = the largest
    ||y[b, h, s] * scale||^2 of the program's tokens (the dequantized rows the attention kernel
    multiplies: its score bound). SPLIT: also lo[b, h, s] = round((x' / scale - y) * 2^LO_BITS)
    as int8 (the second INT8 part, same layout; with LO_NORM the norms are those of
    (y + lo / 2^LO_BITS) * scale)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    x, tokens = _tile(x_ptr, pid_s, pid_bh, S, H, text_len, stride_xb, stride_xs, stride_xh,
                      cos_ptr, sin_ptr, stride_cs, weight_ptr, bias_ptr, eps, HAS_NORM, HAS_WEIGHT,
                      HAS_BIAS, HAS_ROPE, D, BLOCK_S, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row_mask = tokens < S
    if HAS_MEAN:
        mean = tl.load(mean_ptr + pid_bh.to(tl.int64) * D + offs_d, mask=d_mask, other=0.0)
        x = tl.where(row_mask[:, None] & d_mask[None, :], x - mean[None, :], 0.0)
    if ROTATE:
        x = _rotate(x, rot_ptr, offs_d, BLOCK_D, ROT_MODE)
    if PER_ROW:
        amax = tl.max(tl.abs(x), axis=1)  # [BLOCK_S]
        inv = tl.where(amax > 0, _I8 / tl.maximum(amax, 1e-30), 0.0)
        y = x * inv[:, None]
        # a zero row/block keeps scale 1 (any scale dequantizes its zeros; 0 would make 0 * inf)
        scale = tl.where(amax > 0, amax / _I8, 1.0)
        tl.store(scale_ptr + pid_bh.to(tl.int64) * S + tokens, scale, mask=row_mask)
    else:
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        inv = tl.where(amax > 0, _I8 / tl.maximum(amax, 1e-30), 0.0)
        y = x * inv
        scale = tl.where(amax > 0, amax / _I8, 1.0)
        tl.store(scale_ptr + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_s, scale)
    yr = y
    y = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)  # round half away from zero
    if SPLIT:  # yr - y is exact (|.| <= 1/2) and so is its product by 2^LO_BITS
        r = (yr - y.to(tl.float32)) * (1 << LO_BITS)
        lo = tl.where(r >= 0, r + 0.5, r - 0.5).to(tl.int8)
    if NORM_SQ:  # sums of squared int8 values are exact in float32 (D * 127^2 < 2^24)
        yf = y.to(tl.float32)
        if SPLIT and LO_NORM:  # (float32 rounding of the sum: ~1e-7 relative, inside the margin)
            yf = yf + lo.to(tl.float32) * (1.0 / (1 << LO_BITS))
        n2 = tl.sum(yf * yf, axis=1) * (scale * scale)  # rows past S are zero
        tl.store(norm_ptr + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_s, tl.max(n2, axis=0))
    rows = pid_bh.to(tl.int64) * S + tokens
    tl.store(y_ptr + rows[:, None] * D + offs_d[None, :], y,
             mask=row_mask[:, None] & d_mask[None, :])
    if SPLIT:
        tl.store(lo_ptr + rows[:, None] * D + offs_d[None, :], lo,
                 mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _round_e4m3(x):
    """float32 rounded to the nearest e4m3 value (ties to even), as float32. The interpreter's
    float32 -> e4m3 cast drops the carry into the exponent (127.2 -> 64), so under INTERPRET the
    value is rounded here first and the cast only changes the format."""
    bits = x.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    tiny = ((x * 512.0 + 12582912.0) - 12582912.0) / 512.0  # subnormals: multiples of 2^-9
    return tl.where(tl.abs(x) < 0.015625, tiny, normal)


@triton.jit
def _quant_fp8_t_kernel(x_ptr, y_ptr, inv_ptr, S, S_PAD, H, stride_xb, stride_xs, stride_xh,
                        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                        INTERPRET: tl.constexpr):
    """y[b, h, d, s] = e4m3(x[b, s, h, d] * inv[b, h, d]) for s < S_PAD (zeros past S): V^T."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    tokens = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    rows = b * stride_xb + tokens.to(tl.int64) * stride_xs + h * stride_xh
    x = tl.load(x_ptr + rows[:, None] + offs_d[None, :],
                mask=(tokens < S)[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    inv = tl.load(inv_ptr + pid_bh.to(tl.int64) * D + offs_d, mask=d_mask, other=0.0)
    # clamp: rounding may step past 448, and e4m3 has no infinity (the interpreter's cast does
    # not saturate)
    y = tl.minimum(tl.maximum(x * inv[None, :], -_F8), _F8)
    if INTERPRET:
        y = _round_e4m3(y)
    y = y.to(tl.float8e4nv)
    out = y_ptr + (pid_bh.to(tl.int64) * D + offs_d)[None, :] * S_PAD + tokens[:, None]
    tl.store(out, y, mask=(tokens < S_PAD)[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------
class Int8Inputs(NamedTuple):
    """What the 8-bit kernel reads (all contiguous, on q's device).

    q8 / k8: int8 [B, H, S, D] (k smoothed); q_scale: float32 [B, H, S] (per token);
    k_scale: float32 [B, H, cdiv(S, block_n)]; v8t: float8_e4m3fn [B, H, D, S_pad] (V^T, zero
    past S); v_scale: float32 [B, H, D]; block_n: the key block the k scales belong to;
    norm_max: float32 [2, B * H], per head the max over tokens of ||q8 * q_scale||^2 and of
    ||k8 * k_scale||^2 (the dequantized q and smoothed k: they bound every score the kernel
    computes, ``score_bound``), or None; rotated: q8 and k8 are the rotated q and smoothed k
    (``rotation_matrix``; the kernel does not need to know); k8_lo: k's second INT8 part
    (``k_split``; int8 [B, H, S, D], k ~= k_scale * (k8 + k8_lo / 2^K_LO_BITS)) or None;
    k_lo_heads: k8_lo is for the heads whose score bound does not hold only (``k_split="heads"``:
    norm_max is then k8's, as without k8_lo).
    """
    q8: torch.Tensor
    q_scale: torch.Tensor
    k8: torch.Tensor
    k_scale: torch.Tensor
    v8t: Optional[torch.Tensor]
    v_scale: Optional[torch.Tensor]
    block_n: int
    norm_max: Optional[torch.Tensor] = None
    rotated: bool = False
    k8_lo: Optional[torch.Tensor] = None
    k_lo_heads: bool = False


def can_rotate(head_dim) -> bool:
    """Whether ``rotation_matrix`` exists for this head dim (a power of two, 16 or more)."""
    return isinstance(head_dim, int) and head_dim >= 16 and not head_dim & (head_dim - 1)


def rotate_default(head_dim=None) -> bool:
    """Whether the 8-bit path rotates q and k when the caller does not say: the environment
    variable ``COGVIDEOX_KERNELS_INT8_ROTATE`` ("0" off; unset or "1": on, the default since the
    H200 measurement in ``benchmarks/results/int8_attention_notes.md``), for head dims that can be
    rotated (``can_rotate``; others quantize unrotated unless ``rotate=True`` asks, which raises)."""
    on = env_switch(ROTATE_ENV, True)
    return on and (head_dim is None or can_rotate(head_dim))


def k_split_mode(value, name="k_split"):
    """``value`` as one of ``K_SPLIT_MODES`` (False: k in one INT8 part; True: two parts for every
    head; "heads": two parts for the heads that keep the running max); 0 / 1 are False / True."""
    if isinstance(value, str):
        if value == "heads":
            return value
    elif value in (0, 1):
        return bool(value)
    raise ValueError(f"{name}={value!r}: use False (k in one INT8 part), True (two parts for every "
                     f"head) or 'heads' (two parts where the score bound does not hold)")


def k_split_default():
    """How the 8-bit path stores k when the caller does not say (the kernel's K_SPLIT):
    ``COGVIDEOX_KERNELS_INT8_K_SPLIT`` "1" (two INT8 parts, every head), "heads" (two parts for
    the heads that keep the running max; also when unset: the default since the H200 measurement),
    "0": one part."""
    value = os.environ.get(K_SPLIT_ENV, "heads").strip() or "heads"
    if value not in ("0", "1", "", "heads"):
        raise ValueError(f"{K_SPLIT_ENV}={value!r}: use 1 (k as two INT8 parts), heads (two parts "
                         f"for the heads without a score bound) or 0 (one part)")
    return "heads" if value == "heads" else value == "1"


@functools.lru_cache(maxsize=None)
def _signs_cpu(head_dim: int) -> torch.Tensor:
    return (torch.randint(0, 2, (head_dim,), generator=torch.Generator().manual_seed(15)) * 2 - 1).float()


@functools.lru_cache(maxsize=None)
def _rotation_cpu(head_dim: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < head_dim:  # Sylvester: [[H, H], [H, -H]]
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (_signs_cpu(head_dim).double()[:, None] * h / math.sqrt(head_dim)).float()


def rotation_signs(head_dim: int, device=None) -> torch.Tensor:
    """The row signs of ``rotation_matrix`` (float32 [head_dim], +-1): what the pre-pass kernel
    reads (it builds the Hadamard entries from their indices)."""
    rotation_matrix(head_dim)  # validates head_dim
    return _signs_cpu(head_dim).to(device)


def rotation_matrix(head_dim: int, device=None) -> torch.Tensor:
    """The pre-pass's rotation R, float32 [head_dim, head_dim], orthogonal (R R^T = I): a
    Sylvester Hadamard matrix / sqrt(head_dim) with fixed pseudo-random row signs (the signs
    keep structured inputs from lining up with the Hadamard pattern). head_dim: a power of two,
    16 or more (the kernel's head dims are 64 and 128)."""
    if not can_rotate(head_dim):
        raise ValueError(f"head_dim={head_dim}: the int8 rotation needs a power of two >= 16")
    return _rotation_cpu(head_dim).to(device)


def _norm_args(cos, weight, bias, apply_norm):
    return dict(HAS_NORM=apply_norm, HAS_WEIGHT=apply_norm and weight is not None,
                HAS_BIAS=apply_norm and bias is not None, HAS_ROPE=cos is not None)


def quantize_int8_inputs(q, k, v, text_len, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight,
                         k_norm_bias, apply_q_norm, apply_k_norm, eps, *, block_n=128,
                         block_s=None, fp8_v=True, norms=True, rotate=False,
                         k_split=False) -> Int8Inputs:
    """The 8-bit pre-pass (see the module docstring) of strided [B, S, H, D] q, k, v.
    ``fp8_v=False`` leaves V alone (v8t and v_scale None: the kernel's P V in 16 bits);
    ``norms=False`` skips ``norm_max`` (None); ``rotate``: q and smoothed k times
    ``rotation_matrix(D)`` before quantization; ``k_split`` (``K_SPLIT_MODES``): also k's second
    INT8 part (``Int8Inputs.k8_lo``; with "heads" the norms stay k8's)."""
    k_split = k_split_mode(k_split)
    B, S, H, D = q.shape
    dev = q.device
    rot = rotation_matrix(D, dev) if rotate else None  # raises for head dims it cannot rotate
    rot_mode = 2 if ROT_MODE == 1 and interpret_mode() else ROT_MODE
    if rotate and ROT_MODE == 1:
        rot = rotation_signs(D, dev)
    block_d = max(16, triton.next_power_of_2(D))
    if block_s is None:
        block_s = 32 if interpret_mode() else 64
    if block_n % 16:
        raise ValueError(f"block_n={block_n} must be a multiple of 16")
    stride_cs = cos.stride(0) if cos is not None else 0
    common = dict(D=D, BLOCK_D=block_d, num_warps=4)
    grid = (triton.cdiv(S, block_s), B * H)

    # K: mean over tokens of rope(norm(k)), then smoothed INT8 per key block
    part = torch.empty((B * H, grid[0], D), dtype=torch.float32, device=dev)
    _column_stats_kernel[grid](
        k, part, S, H, text_len, k.stride(0), k.stride(1), k.stride(2), cos, sin, stride_cs,
        k_norm_weight, k_norm_bias, eps, AMAX=False, BLOCK_S=block_s,
        **_norm_args(cos, k_norm_weight, k_norm_bias, apply_k_norm), **common)
    k_mean = part.sum(1).div_(S)
    k8 = torch.empty((B, H, S, D), dtype=torch.int8, device=dev)
    n_kblocks = triton.cdiv(S, block_n)
    k_scale = torch.empty((B, H, n_kblocks), dtype=torch.float32, device=dev)
    # per program: the largest squared norm of its dequantized rows (k: per key block, q: per
    # block_s tokens), reduced per head below
    k_norm = torch.empty((B * H, n_kblocks), dtype=torch.float32, device=dev) if norms else k_scale
    k8_lo = torch.empty((B, H, S, D), dtype=torch.int8, device=dev) if k_split else None
    _quant_int8_kernel[(n_kblocks, B * H)](
        k, k8, k_scale, k_mean, k_norm, rot if rotate else k_mean, S, H, text_len, k.stride(0), k.stride(1), k.stride(2), cos,
        sin, stride_cs, k_norm_weight, k_norm_bias, eps, k8_lo if k_split else k8, HAS_MEAN=True,
        ROTATE=rotate, ROT_MODE=rot_mode, PER_ROW=False, NORM_SQ=norms, BLOCK_S=block_n, SPLIT=bool(k_split),
        LO_BITS=K_LO_BITS, LO_NORM=k_split is True,
        **_norm_args(cos, k_norm_weight, k_norm_bias, apply_k_norm),
        **dict(common, num_warps=4 if interpret_mode() else K_WARPS))

    # Q: INT8 per token
    q8 = torch.empty((B, H, S, D), dtype=torch.int8, device=dev)
    q_scale = torch.empty((B, H, S), dtype=torch.float32, device=dev)
    q_norm = torch.empty((B * H, grid[0]), dtype=torch.float32, device=dev) if norms else q_scale
    _quant_int8_kernel[grid](
        q, q8, q_scale, q_scale, q_norm, rot if rotate else q_scale, S, H, text_len, q.stride(0), q.stride(1), q.stride(2),
        cos, sin, stride_cs, q_norm_weight, q_norm_bias, eps, q8, HAS_MEAN=False, ROTATE=rotate,
        ROT_MODE=rot_mode, PER_ROW=True,
        NORM_SQ=norms, BLOCK_S=block_s,
        **_norm_args(cos, q_norm_weight, q_norm_bias, apply_q_norm), **common)
    norm_max = torch.stack((q_norm.amax(1), k_norm.amax(1))) if norms else None

    if not fp8_v:
        return Int8Inputs(q8, q_scale, k8, k_scale, None, None, block_n, norm_max, rotate, k8_lo,
                          k_split == "heads")
    # V: per-channel amax, then FP8 e4m3, transposed
    _column_stats_kernel[grid](
        v, part, S, H, 0, v.stride(0), v.stride(1), v.stride(2), None, None, 0, None, None, eps,
        HAS_NORM=False, HAS_WEIGHT=False, HAS_BIAS=False, HAS_ROPE=False, AMAX=True,
        BLOCK_S=block_s, **common)
    v_amax = part.amax(1)
    v_scale = (v_amax / FP8_MAX).view(B, H, D)
    v_inv = torch.where(v_amax > 0, FP8_MAX / v_amax, torch.zeros_like(v_amax))
    s_pad = triton.cdiv(S, V_PAD) * V_PAD
    v8t = torch.empty((B, H, D, s_pad), dtype=torch.float8_e4m3fn, device=dev)
    _quant_fp8_t_kernel[(triton.cdiv(s_pad, block_s), B * H)](
        v, v8t, v_inv, S, s_pad, H, v.stride(0), v.stride(1), v.stride(2), BLOCK_S=block_s,
        INTERPRET=interpret_mode(), **common)
    return Int8Inputs(q8, q_scale, k8, k_scale, v8t, v_scale, block_n, norm_max, rotate, k8_lo,
                      k_split == "heads")


# ----------------------------------------------------------------------------------------------
# float32 emulation (CPU tests, quality harness)
# ----------------------------------------------------------------------------------------------
def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))


def quantize_int8_reference(q, k, v, *, text_len, cos=None, sin=None, q_norm=None, k_norm=None,
                            eps=1e-6, block_n=128, rotate=False, k_split=False) -> Int8Inputs:
    """``quantize_int8_inputs`` in torch (float32): the same scales and 8-bit values up to the
    rounding of values on a tie (and the last bit of the float32 norm/RoPE and rotation)."""
    k_split = k_split_mode(k_split)
    B, S, H, D = q.shape
    rot = rotation_matrix(D, q.device) if rotate else None
    qw = qk_norm_rope_reference(q, text_len, cos, sin, q_norm, eps, torch.float32)
    kw = qk_norm_rope_reference(k, text_len, cos, sin, k_norm, eps, torch.float32)
    qw, kw, vw = (t.transpose(1, 2).float() for t in (qw, kw, v))  # [B, H, S, D]
    kw = kw - kw.mean(2, keepdim=True)  # smoothing
    if rotate:
        qw, kw = qw @ rot, kw @ rot

    q_amax = qw.abs().amax(-1)
    q_scale = torch.where(q_amax > 0, q_amax / INT8_MAX, 1.0)
    q8 = _round_half_away(qw * torch.where(q_amax > 0, INT8_MAX / q_amax, 0.0)[..., None])

    n_blocks = triton.cdiv(S, block_n)
    pad = n_blocks * block_n - S
    kb = torch.nn.functional.pad(kw, (0, 0, 0, pad)).view(B, H, n_blocks, block_n, D)
    k_amax = kb.abs().amax((-1, -2))
    k_scale = torch.where(k_amax > 0, k_amax / INT8_MAX, 1.0)
    k_inv = torch.where(k_amax > 0, INT8_MAX / k_amax, 0.0)
    ky = kb * k_inv[..., None, None]
    k8 = _round_half_away(ky)
    k8_lo = None
    if k_split:  # the second part: what k8 rounded off, in steps of 2^-K_LO_BITS
        k8_lo = _round_half_away((ky - k8) * 2.0 ** K_LO_BITS).view(B, H, -1, D)[:, :, :S]
        k8_lo = k8_lo.to(torch.int8).contiguous()
    k8 = k8.view(B, H, -1, D)[:, :, :S]

    v_amax = vw.abs().amax(2)
    v_scale = v_amax / FP8_MAX
    v_inv = torch.where(v_amax > 0, FP8_MAX / v_amax, 0.0)
    v8 = (vw * v_inv[:, :, None, :]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    s_pad = triton.cdiv(S, V_PAD) * V_PAD
    v8t = torch.nn.functional.pad(v8.float().transpose(2, 3), (0, s_pad - S)).to(torch.float8_e4m3fn)
    q8, k8 = q8.to(torch.int8), k8.to(torch.int8).contiguous()
    return Int8Inputs(q8, q_scale, k8, k_scale, v8t.contiguous(), v_scale, block_n,
                      dequantized_norm_max(q8, q_scale, k8, k_scale, block_n,
                                           k8_lo if k_split is True else None).float(),
                      rotate, k8_lo, k_split == "heads")


def dequantized_k(t: Int8Inputs, dtype=torch.float32) -> torch.Tensor:
    """The smoothed k the kernel multiplies, [B, H, S, D]: k_scale * (k8 (+ k8_lo / 2^7))."""
    S = t.k8.shape[2]
    k = t.k8.to(dtype)
    if t.k8_lo is not None:
        k = k + t.k8_lo.to(dtype) * 2.0 ** -K_LO_BITS
    return k * t.k_scale.to(dtype).repeat_interleave(t.block_n, dim=-1)[..., :S, None]


def dequantized_norm_max(q8, q_scale, k8, k_scale, block_n, k8_lo=None) -> torch.Tensor:
    """float64 [2, B * H]: per head the max over tokens of ||q8 * q_scale||^2 and of
    ||k8 * k_scale||^2 (with k8_lo: of ||(k8 + k8_lo / 2^7) * k_scale||^2; ``Int8Inputs.norm_max``
    computed in float64)."""
    qd = q8.double() * q_scale.double()[..., None]
    kd = dequantized_k(Int8Inputs(q8, q_scale, k8, k_scale, None, None, block_n, k8_lo=k8_lo),
                       torch.float64)
    return torch.stack([x.square().sum(-1).amax(-1).flatten() for x in (qd, kd)])


def score_bound(norm_max: torch.Tensor, qk_scale: float):
    """The attention kernel's bound per head (``hopper_fwd._score_bound``, here in torch):
    (T, fixed, m) from ``norm_max`` [2, B * H]. Every score t = q . k * qk_scale (log2 units; q, k
    the dequantized, smoothed rows) lies in [-T, T] (Cauchy-Schwarz, 1% margin); heads with T <= 80
    (``fixed``) subtract the constant m = T - max(0, 2T - 96) instead of the running row max, so
    every numerator 2^(t - m) lies in [2^-96, 2^64]."""
    n = norm_max.float().reshape(2, -1)
    t = (n[0] * n[1]).sqrt() * abs(float(qk_scale)) * 1.01
    return t, t <= 80.0, t - (2.0 * t - 96.0).clamp_min(0.0)


def int8_attention_from_quantized(t: Int8Inputs, scale: float, out_dtype, v=None, *,
                                  fixed_max=False) -> torch.Tensor:
    """float32 attention over the dequantized 8-bit q, k, as the kernel computes it: P rounded to
    e4m3 (as p * 448 relative to the row max) against the FP8 V^T of ``t``, or, given ``v``
    (the 16-bit V, [B, H, S, D]), P rounded to v's dtype against v. ``fixed_max``: heads whose
    score bound holds (``score_bound`` of ``t.norm_max``) take P relative to the fixed m instead
    of the row max, as the kernel's fixed-max softmax (bf16 P only). k: k8 + k8_lo / 2^7 where
    ``t`` has k8_lo, except (``t.k_lo_heads``) on those fixed-max heads: k8 alone. Query rows go
    in chunks of at most ~64M scores. Returns [B, S, H, D] in ``out_dtype``."""
    B, H, S, D = t.q8.shape
    k = dequantized_k(t)
    if v is None:
        vf = t.v8t[..., :S].float().transpose(-1, -2) * t.v_scale[:, :, None, :]
    else:
        vf = v.float()
    m_fixed = None
    if fixed_max and v is not None and v.dtype == torch.bfloat16 and t.norm_max is not None:
        _, fixed, m = score_bound(t.norm_max.to(t.q8.device), scale * LOG2E)
        # natural-log units; NaN marks the running-max heads
        m_fixed = torch.where(fixed, m.double() / LOG2E, math.nan).float().view(B, H, 1, 1)
        if t.k8_lo is not None and t.k_lo_heads:
            k = torch.where(m_fixed.isnan(), k, dequantized_k(t._replace(k8_lo=None)))
    out = torch.empty((B, H, S, D), dtype=torch.float32, device=t.q8.device)
    rows = max(1, 2 ** 26 // (B * H * S))
    for r0 in range(0, S, rows):
        q = t.q8[:, :, r0:r0 + rows].float() * (t.q_scale[:, :, r0:r0 + rows, None] * scale)
        s = q @ k.transpose(-1, -2)
        m = s.amax(-1, keepdim=True)
        if m_fixed is not None:
            m = torch.where(m_fixed.isnan(), m, m_fixed)
        p = torch.exp(s - m)
        if v is None:
            p = p * P_SCALE
            pq = p.to(torch.float8_e4m3fn).float()
        else:
            pq = p.to(v.dtype).float()
        out[:, :, r0:r0 + rows] = (pq @ vf) / p.sum(-1, keepdim=True)
    return out.transpose(1, 2).to(out_dtype)


def int8_attention_reference(q, k, v, *, text_len, cos=None, sin=None, q_norm=None, k_norm=None,
                             eps=1e-6, scale=None, block_n=128, pv_fp8=False, fixed_max=True,
                             rotate=None, k_split=None):
    """``rope3d_attention(..., precision="int8")`` emulated in float32: the pre-pass's
    quantization, then attention over the dequantized values, with P V in v's dtype (the shipped
    kernel; float32 inputs: P and V in bf16) or, ``pv_fp8``, in FP8 e4m3 (the PV_FP8 kernel
    config). ``fixed_max``: bf16 P relative to the fixed max where the kernel takes it (its
    default; False: the running max everywhere, the kernel's SCORE_BOUND=False). ``rotate``: q
    and smoothed k rotated before quantization (the kernel's ROTATE; None: ``rotate_default(D)``).
    ``k_split``: k as two INT8 parts (the kernel's K_SPLIT, ``K_SPLIT_MODES``; None:
    ``k_split_default()``).
    Returns [B, S, H, D] in q's dtype."""
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    t = quantize_int8_reference(q, k, v, text_len=text_len, cos=cos, sin=sin, q_norm=q_norm,
                                k_norm=k_norm, eps=eps, block_n=block_n,
                                rotate=rotate_default(D) if rotate is None else bool(rotate),
                                k_split=k_split_default() if k_split is None else k_split)
    v16 = None
    if not pv_fp8:
        v16 = v.transpose(1, 2)
        v16 = v16 if v16.dtype in (torch.bfloat16, torch.float16) else v16.to(torch.bfloat16)
    return int8_attention_from_quantized(t, scale, q.dtype, v16, fixed_max=fixed_max)


LOG2_P_SCALE = math.log2(P_SCALE)

__all__ = ["Int8Inputs", "quantize_int8_inputs", "quantize_int8_reference", "score_bound",
           "rotation_matrix", "can_rotate", "rotate_default", "ROTATE_ENV", "k_split_default", "K_SPLIT_ENV",
           "K_SPLIT_MODES", "k_split_mode",
           "K_LO_BITS", "dequantized_norm_max", "dequantized_k",
           "int8_attention_from_quantized", "int8_attention_reference", "INT8_MAX", "FP8_MAX",
           "P_SCALE", "LOG2_P_SCALE", "V_PAD"]
