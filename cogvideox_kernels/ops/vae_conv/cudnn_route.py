"""``vae_conv3d`` backend ``"cudnn"``: our activation pass (Triton) + cuDNN's conv + the residual add.

Four steps compute the op's function (reference.py):

1. the GroupNorm statistics as coefficients (``vae_group_norm_coef``: the CUDA statistics pass on a GPU,
   float64 on a CPU), or the given ``norm_coef``;
2. ``act_cl_fwd`` (``_vae_act_cl_fwd_kernel``): reads x NCDHW, applies ``v * a + d``, the spatial norm's
   ``* scale + shift`` (given tensors, or computed per element from ``zq`` and the (1,1,1) convs' weights,
   summed over zq's channels in order, bias last, rounded to x's dtype as the CUDA kernel does), SiLU, rounds
   once and writes the padded activation channels-last: the kt-1 front frames (the cache as given, else the
   activation's frame 0 repeated, else zeros) then the T activated frames, memory [B, T+kt-1, H, W, C] = a
   channels_last_3d [B, C, T+kt-1, H, W] tensor; the new cache (its last kt-1 frames) NCDHW;
3. ``F.conv3d`` on that tensor with the weight in channels_last_3d (cached per weight version) and the bias:
   cuDNN on a GPU, torch's CPU conv on a CPU (where the pass runs under ``TRITON_INTERPRET=1``, so CI tests it);
4. the residual add, written into contiguous NCDHW y (or ``out``); without a residual the conv output is
   converted to NCDHW (or copied into ``out``).

The conv output is rounded before the residual add (two roundings, like diffusers' own sequence; the fused
kernels round once). Never picked by ``auto``: named (``backend="cudnn"``), or for the VAE's ResNet blocks by
``COGVIDEOX_KERNELS_VAE_CONV_CUDNN_CHANNELS`` (``parse_cudnn_channels``). GPU: bf16 / fp16; CPU: float32 too.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._triton_utils import interpret_mode, store_cast
from ..expert_ffn.fp8 import WeightCache
from .native import _modulation  # the zq arguments as keywords, as the CUDA backend's ops take them
from .reference import spatial_norm_index, spatial_norm_index_on

CUDNN_CHANNELS_ENV = "COGVIDEOX_KERNELS_VAE_CONV_CUDNN_CHANNELS"
ACT_CONFIG = (64, 64, 4)  # (BLOCK_P pixels, BLOCK_C channels, warps) of the activation pass
ZQ_MOD_CONFIG = (64, 32, 4)  # (BLOCK_P zq positions, BLOCK_C channels, warps) of zq_modulation_fwd
TRANSPOSE_CONFIG = (64, 64, 4)  # (BLOCK_P pixels, BLOCK_C channels, warps) of cl_to_nc_fwd
_MOD_NONE, _MOD_TENSORS, _MOD_ZQ = 0, 1, 2


def parse_cudnn_channels(value: str, name: str = CUDNN_CHANNELS_ENV) -> tuple:
    """The in-channel counts whose ResNet convs run on backend "cudnn": ``value`` is a comma-separated list
    of ``N`` (exactly N input channels) and ``N+`` (N or more), e.g. ``"256,512"`` or ``"256+"``; empty
    (or "0" / "off") means none. Returns sorted ``(low, high)`` ranges (high None: no upper end); anything
    else is a ValueError that names the variable."""
    value = value.strip()
    if value.lower() in ("", "0", "off"):
        return ()
    ranges = []
    for item in value.split(","):
        item = item.strip()
        digits = item[:-1] if item.endswith("+") else item
        if not digits.isdigit() or int(digits) < 1:
            raise ValueError(f"{name}={value!r}: {item!r} is not a channel count N >= 1 or N+ (N or more); "
                             "write e.g. '256,512' or '256+', or unset it")
        ranges.append((int(digits), None if item.endswith("+") else int(digits)))
    return tuple(sorted(set(ranges), key=lambda r: (r[0], r[1] is None, r[1] or 0)))


def channels_match(ranges: tuple, channels: int) -> bool:
    """Whether ``channels`` falls in one of ``parse_cudnn_channels``'s ranges."""
    return any(lo <= channels and (hi is None or channels <= hi) for lo, hi in ranges)


def cudnn_channels_from_env() -> tuple:
    """``parse_cudnn_channels`` of the environment variable (unset: no conv)."""
    return parse_cudnn_channels(os.environ.get(CUDNN_CHANNELS_ENV, ""))


@triton.jit
def _zq_modulation_fwd_kernel(zq_ptr, sw_ptr, sb_ptr, hw_ptr, hb_ptr, scale_ptr, shift_ptr, C, P, KZ, szb, szk,
                              HAS_SB: tl.constexpr, HAS_HB: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr):
    """One program: BLOCK_C channels x BLOCK_P of the P = Tz * Hz * Wz positions of batch element ``b`` (zq's
    (t, h, w) dense per channel): scale = round(sum_k sw[c, k] * zq[b, k, pos] + sb[c]), shift likewise (float32
    sums over k ascending, the bias last, rounded to the outputs' dtype: diffusers' conv outputs); the outputs
    are contiguous [B, C, P]."""
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    s = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    f = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for k in range(0, KZ):
        z = tl.load(zq_ptr + b * szb + k * szk + p, mask=p_ok, other=0.0).to(tl.float32)
        ws = tl.load(sw_ptr + c * KZ + k, mask=c_ok, other=0.0).to(tl.float32)
        wh = tl.load(hw_ptr + c * KZ + k, mask=c_ok, other=0.0).to(tl.float32)
        s += ws[:, None] * z[None, :]
        f += wh[:, None] * z[None, :]
    if HAS_SB:
        s += tl.load(sb_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_HB:
        f += tl.load(hb_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    mask = c_ok[:, None] & p_ok[None, :]
    off = (b * C + c[:, None]) * P + p[None, :]
    tl.store(scale_ptr + off, store_cast(s, scale_ptr.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(shift_ptr + off, store_cast(f, shift_ptr.dtype.element_ty, INTERPRET), mask=mask)


def zq_modulation_fwd(zq, dtype, scale_weight, scale_bias=None, shift_weight=None, shift_bias=None, config=None):
    """(scale, shift), each contiguous [B, C, Tz, Hz, Wz] in ``dtype``: the spatial norm's (1,1,1) convs on zq
    [B, Kz, Tz, Hz, Wz] at zq's own resolution (weights [C, Kz] or [C, Kz, 1, 1, 1], biases [C] or None), with
    the CUDA kernel's arithmetic: float32 sums over zq's channels in order, the bias last, rounded to ``dtype``.
    ``config``: (BLOCK_P, BLOCK_C, warps); None: ZQ_MOD_CONFIG."""
    zq = zq.contiguous()
    B, kz = zq.shape[:2]
    C = scale_weight.shape[0]
    P = zq[0, 0].numel()
    scale = torch.empty((B, C, *zq.shape[2:]), dtype=dtype, device=zq.device)
    shift = torch.empty_like(scale)
    bp, bc, warps = config or ZQ_MOD_CONFIG
    sb = scale_weight if scale_bias is None else scale_bias.contiguous()  # (the weight: a pointer never read)
    hb = scale_weight if shift_bias is None else shift_bias.contiguous()
    _zq_modulation_fwd_kernel[(triton.cdiv(P, bp), triton.cdiv(C, bc), B)](
        zq, scale_weight.reshape(C, kz).contiguous(), sb, shift_weight.reshape(C, kz).contiguous(), hb, scale, shift,
        C, P, kz, zq.stride(0), zq.stride(1), HAS_SB=scale_bias is not None, HAS_HB=shift_bias is not None,
        BLOCK_P=bp, BLOCK_C=bc, INTERPRET=interpret_mode(), num_warps=warps)
    return scale, shift


@triton.jit
def _act_value(x_ptr, coef_ptr, scale_ptr, shift_ptr, idx_ptr, b, c, p, mask, t, C, T, H, W, sxb, sxc, sxt,
               ssb, ssc, sst, sfb, sfc, sft, WZ, HAS_COEF: tl.constexpr, MOD: tl.constexpr, SILU: tl.constexpr):
    """act(x[b, c, t, p]) in float32 (not rounded): v * a + d, then * scale + shift, then SiLU."""
    t64 = t.to(tl.int64)
    v = tl.load(x_ptr + b * sxb + c[:, None] * sxc + t64 * sxt + p[None, :], mask=mask, other=0.0).to(tl.float32)
    c_ok = c < C
    if HAS_COEF:
        a = tl.load(coef_ptr + (b * C + c) * 2, mask=c_ok, other=0.0)
        d = tl.load(coef_ptr + (b * C + c) * 2 + 1, mask=c_ok, other=0.0)
        v = v * a[:, None] + d[:, None]
    if MOD != 0:
        if MOD == 1:  # scale / shift given as [B, C, T, H, W] tensors (dense H x W planes)
            ts, ps = t64, p
        else:  # MOD == 2: at zq's resolution [B, C, Tz, Hz, Wz] (dense planes, row stride WZ), gathered through
            # zq_index (int32 [T + H + W]: zq's frame of each frame t, row of each row, column of each column)
            p_ok = p < H * W
            ts = tl.load(idx_ptr + t).to(tl.int64)
            hi = tl.load(idx_ptr + T + p // W, mask=p_ok, other=0).to(tl.int64)
            wi = tl.load(idx_ptr + T + H + p % W, mask=p_ok, other=0).to(tl.int64)
            ps = hi * WZ + wi
        s = tl.load(scale_ptr + b * ssb + c[:, None] * ssc + ts * sst + ps[None, :], mask=mask, other=0.0)
        f = tl.load(shift_ptr + b * sfb + c[:, None] * sfc + ts * sft + ps[None, :], mask=mask, other=0.0)
        v = v * s.to(tl.float32) + f.to(tl.float32)
    if SILU:
        v = v / (1.0 + tl.exp(-v))
    return v


@triton.jit
def _vae_act_cl_fwd_kernel(x_ptr, cache_ptr, coef_ptr, scale_ptr, shift_ptr, idx_ptr, act_ptr, new_cache_ptr,
                           C, T, H, W, sxb, sxc, sxt, scb, scc, sct, ssb, ssc, sst, sfb, sfc, sft, WZ,
                           NF: tl.constexpr, HAS_CACHE: tl.constexpr, ZERO_FRONT: tl.constexpr,
                           HAS_COEF: tl.constexpr, MOD: tl.constexpr, SILU: tl.constexpr, BLOCK_P: tl.constexpr,
                           BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr):
    """One program: BLOCK_C channels x BLOCK_P pixels of padded frame ``fp`` of batch element ``b``. Padded
    frames 0..NF-1 are the front (cache as given / act(x) frame 0 / zeros), NF.. are act(x) frames 0..T-1.
    Reads along pixels (NCDHW planes, each dense), writes along channels (act: [B, T+NF, H*W, C]); padded
    frames >= T also go to the new cache [B, C, NF, H*W]."""
    pid_f = tl.program_id(2)
    TP = T + NF
    b = (pid_f // TP).to(tl.int64)
    fp = pid_f % TP
    HW = H * W
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (c < C)[:, None] & (p < HW)[None, :]
    if HAS_CACHE:
        if fp < NF:  # a front frame: the cache's frame fp, as given (already activated)
            v = tl.load(cache_ptr + b * scb + c[:, None] * scc + fp.to(tl.int64) * sct + p[None, :], mask=mask,
                        other=0.0).to(tl.float32)
        else:
            v = _act_value(x_ptr, coef_ptr, scale_ptr, shift_ptr, idx_ptr, b, c, p, mask, fp - NF, C, T, H, W,
                           sxb, sxc, sxt, ssb, ssc, sst, sfb, sfc, sft, WZ, HAS_COEF, MOD, SILU)
    else:  # x's frame fp - NF, or frame 0 for a front frame (replicated; zeroed below for ZERO_FRONT)
        v = _act_value(x_ptr, coef_ptr, scale_ptr, shift_ptr, idx_ptr, b, c, p, mask, tl.maximum(fp - NF, 0), C, T,
                       H, W, sxb, sxc, sxt, ssb, ssc, sst, sfb, sfc, sft, WZ, HAS_COEF, MOD, SILU)
        if ZERO_FRONT:
            v = tl.where(fp < NF, 0.0, v)
    out = store_cast(v, act_ptr.dtype.element_ty, INTERPRET)
    row = (b * TP + fp) * HW + p  # channels-last pixel rows of act
    tl.store(act_ptr + row[None, :] * C + c[:, None], out, mask=mask)
    if fp >= T:  # padded frames T .. T+NF-1 are the new cache's frames 0 .. NF-1
        nc = ((b * C + c[:, None]) * NF + (fp - T)) * HW + p[None, :]
        tl.store(new_cache_ptr + nc, out, mask=mask)


def _pixel_stride(t):
    """The stride of the flattened pixel index h * W + w of a [B, C, T, H, W] tensor (its column stride), or None
    where its rows are not W columns apart (no single pixel stride)."""
    return t.stride(4) if t.shape[3] == 1 or t.stride(3) == t.shape[4] * t.stride(4) else None


def _plane_dense(t):
    """A [B, C, T, H, W] tensor whose (H, W) planes are dense (row stride W, unit column stride): the kernels
    read / write it through its (b, c, t) strides; anything else is copied (or, as ``out``, left to torch)."""
    return _pixel_stride(t) == 1


def _dense(t):
    return None if t is None else (t if _plane_dense(t) else t.contiguous())


def act_cl_fwd(x, coef=None, *, silu, kt, cache=None, pad_mode="replicate", scale=None, shift=None, zq=None,
               zq_index=None, scale_weight=None, scale_bias=None, shift_weight=None, shift_bias=None,
               config=None):
    """(act [B, C, T+kt-1, H, W] channels_last_3d, new_cache [B, C, kt-1, H, W] contiguous): the padded
    activation (see the module doc). ``coef`` float32 [B, C, 2] (norm(v) = v * a + d) or None; the modulation
    as ``scale``/``shift`` or as ``zq`` with ``zq_index`` (int32 [T+H+W] on x's device) and the (1,1,1) convs'
    weights ([C, Kz] or [C, Kz, 1, 1, 1]) / biases: formed once at zq's resolution (``zq_modulation_fwd``),
    gathered per element through ``zq_index``. ``config``: (BLOCK_P, BLOCK_C, warps); None: ACT_CONFIG."""
    B, C, T, H, W = x.shape
    nf = kt - 1
    x, cache, scale, shift = _dense(x), _dense(cache), _dense(scale), _dense(shift)
    mod, wz = _MOD_NONE, 0
    if scale is not None:
        mod = _MOD_TENSORS
    elif zq is not None:
        mod = _MOD_ZQ
        scale, shift = zq_modulation_fwd(zq, x.dtype, scale_weight, scale_bias, shift_weight, shift_bias)
        wz = scale.stride(3)
    act = torch.empty((B, T + nf, H, W, C), dtype=x.dtype, device=x.device).permute(0, 4, 1, 2, 3)
    new_cache = torch.empty((B, C, nf, H, W), dtype=x.dtype, device=x.device)
    bp, bc, warps = config or ACT_CONFIG
    strides = lambda t: t.stride()[:3] if t is not None else (0, 0, 0)  # noqa: E731
    dummy = x
    grid = (triton.cdiv(H * W, bp), triton.cdiv(C, bc), B * (T + nf))
    _vae_act_cl_fwd_kernel[grid](
        x, dummy if cache is None else cache, dummy if coef is None else coef.contiguous(),
        dummy if scale is None else scale, dummy if shift is None else shift,
        dummy if zq_index is None or mod != _MOD_ZQ else zq_index, act, new_cache, C, T, H, W,
        *x.stride()[:3], *strides(cache), *strides(scale), *strides(shift), wz,
        NF=nf, HAS_CACHE=cache is not None, ZERO_FRONT=pad_mode == "zeros", HAS_COEF=coef is not None, MOD=mod,
        SILU=silu, BLOCK_P=bp, BLOCK_C=bc, INTERPRET=interpret_mode(), num_warps=warps)
    return act, new_cache


@triton.jit
def _cl_to_nc_fwd_kernel(y_ptr, res_ptr, out_ptr, C, T, HW, syb, syc, syt, syp, srb, src, srt, sob, soc, sot,
                         HAS_RES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                         INTERPRET: tl.constexpr):
    """One program: BLOCK_C channels x BLOCK_P pixels of frame ``t`` of batch element ``b``: out = y (+ residual,
    added in float32 and rounded once). y's tile is read [BLOCK_P, BLOCK_C] along channels (channels_last_3d y:
    unit channel stride, pixel stride ``syp``) and transposed; the residual's is read and out's written along
    pixels (dense H x W planes)."""
    pid_f = tl.program_id(2)
    b = (pid_f // T).to(tl.int64)
    t = (pid_f % T).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok, c_ok = p < HW, c < C
    v = tl.load(y_ptr + b * syb + t * syt + p[:, None] * syp + c[None, :] * syc, mask=p_ok[:, None] & c_ok[None, :])
    v = tl.trans(v)  # [BLOCK_C, BLOCK_P]
    mask = c_ok[:, None] & p_ok[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + b * srb + c[:, None] * src + t * srt + p[None, :], mask=mask)
        v = store_cast(v.to(tl.float32) + r.to(tl.float32), out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + b * sob + c[:, None] * soc + t * sot + p[None, :], v, mask=mask)


def cl_to_nc_fwd(y, residual=None, out=None, config=None):
    """``y`` (+ ``residual``, [B, C, T, H, W] like y) written into ``out`` (None: a new contiguous NCDHW
    tensor); returns out. The values of ``torch.add(y, residual)`` (float32 add, one rounding) / of y. The
    Triton kernel where y has a single pixel stride (channels_last_3d: the conv's output on a GPU; contiguous
    NCDHW too) and out dense H x W planes and y's dtype; else torch (``out.copy_`` / ``torch.add``).
    ``config``: (BLOCK_P, BLOCK_C, warps); None: TRANSPOSE_CONFIG."""
    B, C, T, H, W = y.shape
    if out is None:
        out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    syp = _pixel_stride(y)
    if syp is None or not _plane_dense(out) or out.dtype != y.dtype:
        return out.copy_(y) if residual is None else torch.add(y, residual, out=out)
    residual = _dense(residual)
    bp, bc, warps = config or TRANSPOSE_CONFIG
    grid = (triton.cdiv(H * W, bp), triton.cdiv(C, bc), B * T)
    _cl_to_nc_fwd_kernel[grid](
        y, y if residual is None else residual, out, C, T, H * W, y.stride(0), y.stride(1), y.stride(2), syp,
        *(residual.stride()[:3] if residual is not None else (0, 0, 0)), *out.stride()[:3],
        HAS_RES=residual is not None, BLOCK_P=bp, BLOCK_C=bc, INTERPRET=interpret_mode(), num_warps=warps)
    return out


# The weight in channels_last_3d, one copy per weight storage and version (as native.PACKED for the CUDA kernel).
CHANNELS_LAST = WeightCache(lambda w: w.detach().contiguous(memory_format=torch.channels_last_3d))


def channels_last_weight(weight):
    """``weight`` in channels_last_3d: itself when it is so already, else a cached copy (see CHANNELS_LAST)."""
    if weight.is_contiguous(memory_format=torch.channels_last_3d) or weight.device.type == "meta":
        return weight.contiguous(memory_format=torch.channels_last_3d)
    return CHANNELS_LAST.get(weight)


def _run(out, x, weight, bias, coef, scale, shift, cache, residual, silu, pad_mode, modulation):
    """Steps 2-4 (module doc): y into ``out`` (None: a new contiguous tensor); returns (y, new_cache)."""
    kh, kw = weight.shape[3:]
    index = modulation.get("zq_index")
    if index is not None:  # (read as T + H + W consecutive ints)
        modulation = dict(modulation, zq_index=spatial_norm_index_on(index, x.device))
    act, new_cache = act_cl_fwd(x, coef, silu=silu, kt=weight.shape[2], cache=cache, pad_mode=pad_mode, scale=scale,
                                shift=shift, **modulation)
    y = F.conv3d(act, channels_last_weight(weight), bias, padding=(0, kh // 2, kw // 2))
    del act
    if out is None and residual is None and y.is_contiguous():  # (the CPU conv's output: already NCDHW)
        return y, new_cache
    return cl_to_nc_fwd(y, residual, out), new_cache


@torch.library.custom_op("cogvideox_kernels::vae_conv3d_cudnn", mutates_args=())
def _cudnn_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], coef: Optional[torch.Tensor],
              scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], cache: Optional[torch.Tensor],
              residual: Optional[torch.Tensor], silu: bool, pad_mode: str, zq: Optional[torch.Tensor],
              zq_index: Optional[torch.Tensor], scale_weight: Optional[torch.Tensor],
              scale_bias: Optional[torch.Tensor], shift_weight: Optional[torch.Tensor],
              shift_bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(None, x, weight, bias, coef, scale, shift, cache, residual, silu, pad_mode,
                _modulation(zq, zq_index, scale_weight, scale_bias, shift_weight, shift_bias))


@_cudnn_op.register_fake
def _cudnn_fake(x, weight, bias, coef, scale, shift, cache, residual, silu, pad_mode, *modulation):
    B, C, T, H, W = x.shape
    C_out, _, kt = weight.shape[:3]
    return x.new_empty((B, C_out, T, H, W)), x.new_empty((B, C, kt - 1, H, W))


@torch.library.custom_op("cogvideox_kernels::vae_conv3d_cudnn_out", mutates_args=("out",))
def _cudnn_out_op(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  coef: Optional[torch.Tensor], scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                  cache: Optional[torch.Tensor], residual: Optional[torch.Tensor], silu: bool, pad_mode: str,
                  zq: Optional[torch.Tensor], zq_index: Optional[torch.Tensor], scale_weight: Optional[torch.Tensor],
                  scale_bias: Optional[torch.Tensor], shift_weight: Optional[torch.Tensor],
                  shift_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The op writing y into ``out`` (any strides); returns the new cache."""
    return _run(out, x, weight, bias, coef, scale, shift, cache, residual, silu, pad_mode,
                _modulation(zq, zq_index, scale_weight, scale_bias, shift_weight, shift_bias))[1]


@_cudnn_out_op.register_fake
def _cudnn_out_fake(out, x, weight, bias, coef, scale, shift, cache, residual, silu, pad_mode, *modulation):
    B, C, T, H, W = x.shape
    return x.new_empty((B, C, weight.shape[2] - 1, H, W))


def vae_conv3d_cudnn(x, weight, bias=None, *, num_groups=0, norm_weight=None, norm_bias=None, eps=1e-6, scale=None,
                     shift=None, silu=False, cache=None, pad_mode="replicate", residual=None, norm_coef=None, out=None,
                     zq=None, zq_index=None, scale_weight=None, scale_bias=None, shift_weight=None, shift_bias=None):
    """``vae_conv3d``'s function by the route of the module doc; returns ``(y, new_cache)`` (y is ``out`` when
    given). The registry's ``run``: inputs checked by ``vae_conv3d`` (``check_vae_conv_inputs``) and by
    ``supports`` before it is called."""
    from . import vae_group_norm_coef

    coef = norm_coef
    if num_groups:
        coef = vae_group_norm_coef(x, num_groups, norm_weight, norm_bias, eps)
    if zq is not None and zq_index is None:
        zq_index = spatial_norm_index(zq.shape[2:], x.shape[2:])
    args = (x, weight, bias, coef, scale, shift, cache, residual, silu, pad_mode, zq, zq_index, scale_weight,
            scale_bias, shift_weight, shift_bias)
    if out is None:
        return _cudnn_op(*args)
    return out, _cudnn_out_op(out, *args)


# registry hooks (see ops/registry.py): the op's inputs as keywords
def cudnn_supports(x, weight, **_) -> Optional[str]:
    if x.device.type == "cuda" and x.dtype not in (torch.bfloat16, torch.float16):
        return f"x is {x.dtype} on {x.device}; on a GPU the cuDNN route takes bf16 / fp16"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"x is {x.dtype}; the cuDNN route's activation pass takes float32, bf16 or fp16"
    return None


__all__ = ["vae_conv3d_cudnn", "act_cl_fwd", "zq_modulation_fwd", "cl_to_nc_fwd", "channels_last_weight",
           "parse_cudnn_channels", "channels_match", "cudnn_channels_from_env", "cudnn_supports", "CUDNN_CHANNELS_ENV"]
