"""Plain-PyTorch reference of the fused VAE conv, and its input checks.

What one call computes (the ResNet-block step of CogVideoX's VAE, diffusers' semantics)::

    a    = act(x)                      in float32, then rounded once to x's dtype
    act  = [GroupNorm(num_groups, norm_weight, norm_bias, eps)] [* scale + shift] [SiLU]
    xpad = cat(front, a) over time     front: ``cache`` (kt-1 frames, already activated), else
                                       kt-1 copies of a's frame 0 (``pad_mode="replicate"``,
                                       diffusers' ``pad_mode="first"``) or zeros (``"zeros"``)
    y    = conv3d(xpad, weight, bias, spatial zero padding (kh//2, kw//2), stride 1) [+ residual]
    new_cache = xpad[:, :, -(kt-1):]   (what diffusers' CogVideoXCausalConv3d returns as conv_cache)

GroupNorm statistics are nn.GroupNorm's on the tensor as given: per batch element and group, over
the group's channels and *all* frames, rows and columns of x (biased variance). diffusers runs its
VAE in frame batches (encode: 8 frames, the first batch 9; decode: 2 latent frames, the first 3)
and normalises each batch on its own, so the statistics are per frame batch; the caller passes
that batch as x, and the op then matches diffusers exactly. (Chunking a call further changes the
statistics: chunked == whole holds only without GroupNorm.)

``scale``/``shift`` are the spatial norm's modulation (diffusers' CogVideoXSpatialNorm3D:
``GroupNorm(f) * conv_y(zq) + conv_b(zq)``), given as full [B, C, T, H, W] tensors.

``norm_coef`` (float32 [B, C, 2], from ``group_norm_coef``) gives the GroupNorm-apply as
``v * a + d`` instead of statistics over x (``num_groups`` 0, affine folded in): a frame batch can
then run as several calls over frame chunks, each chained to the last by its cache, with the
statistics of the whole batch, so that only a chunk's activation, scale and shift exist at a time.
``out`` (a [B, C_out, T, H, W] tensor, e.g. that chunk's frames of the batch's output) receives y.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import FLOAT_DTYPES, check_conv_weight, check_shape, check_tensor

PAD_MODES = ("replicate", "zeros")


def check_vae_conv_inputs(x, weight, bias=None, *, num_groups=0, norm_weight=None, norm_bias=None,
                          eps=1e-6, scale=None, shift=None, silu=False, cache=None,
                          pad_mode="replicate", residual=None, norm_coef=None, out=None):
    check_tensor("x", x, ndim=5, dtypes=FLOAT_DTYPES + (torch.float64,))
    device, dtype = x.device, x.dtype
    B, C, T, H, W = x.shape
    if min(B, C, T, H, W) == 0:
        raise ValueError(f"x has an empty dimension: shape {tuple(x.shape)} [B, C, T, H, W]")

    def same(name, t, shape):
        check_tensor(name, t, ndim=len(shape), device=device)
        check_shape(name, t, shape)
        if t.dtype != dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {dtype}; they must match")

    C_out, kt, kh, kw = check_conv_weight(weight, x)
    if bias is not None:
        same("bias", bias, (C_out,))
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups must be an int >= 0 (0 = no GroupNorm), got {num_groups!r}")
    if num_groups and C % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {C} channels of x")
    if norm_coef is not None:
        check_tensor("norm_coef", norm_coef, ndim=3, device=device, dtypes=(torch.float32,))
        check_shape("norm_coef", norm_coef, (B, C, 2))
        if num_groups or norm_weight is not None or norm_bias is not None:
            raise ValueError("norm_coef replaces the GroupNorm statistics and affine: give num_groups=0 and no "
                             "norm_weight / norm_bias with it")
    elif not num_groups and any(t is not None for t in (norm_weight, norm_bias, scale, shift)):
        raise ValueError("norm_weight, norm_bias, scale and shift need num_groups > 0 or norm_coef (GroupNorm on)")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None:
            same(name, t, (C,))
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift (the spatial norm's modulation) come together: give both or neither")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            same(name, t, (B, C, T, H, W))
    if not isinstance(silu, bool):
        raise ValueError(f"silu must be a bool, got {silu!r}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode={pad_mode!r} is not supported; choose one of {PAD_MODES}")
    if cache is not None:
        same("cache", cache, (B, C, kt - 1, H, W))
    if residual is not None:
        same("residual", residual, (B, C_out, T, H, W))
    if out is not None:
        same("out", out, (B, C_out, T, H, W))


def group_norm_coef_reference(x, num_groups, norm_weight=None, norm_bias=None, eps=1e-6):
    """GroupNorm-apply of x as coefficients, float32 [B, C, 2]: ``norm(v) = v * a + d`` with
    a = rstd * weight, d = bias - mean * a (nn.GroupNorm's statistics over each group's channels and
    all frames, rows and columns of x; biased variance), computed in float64."""
    check_tensor("x", x, ndim=5, dtypes=FLOAT_DTYPES + (torch.float64,))
    B, C = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups must be an int >= 1 dividing the {C} channels of x, got {num_groups!r}")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None:
            check_tensor(name, t, ndim=1, device=x.device)
            check_shape(name, t, (C,))
    g = x.reshape(B, num_groups, -1).double()
    var, mean = torch.var_mean(g, dim=-1, correction=0)
    rstd = (var + eps).rsqrt()
    per_c = lambda v: v.repeat_interleave(C // num_groups, dim=1)  # noqa: E731  [B, C]
    a = per_c(rstd) * (1.0 if norm_weight is None else norm_weight.double())
    d = (0.0 if norm_bias is None else norm_bias.double()) - per_c(mean) * a
    return torch.stack((a, d), dim=-1).float().contiguous()


def activate(x, *, num_groups=0, norm_weight=None, norm_bias=None, eps=1e-6, scale=None, shift=None,
             silu=False, compute_dtype=torch.float32, norm_coef=None):
    """act(x) in ``compute_dtype`` (not rounded)."""
    h = x.to(compute_dtype)
    if norm_coef is not None:
        coef = norm_coef.to(compute_dtype)[:, :, None, None, None]
        h = h * coef[..., 0] + coef[..., 1]
    if num_groups or norm_coef is not None:
        if num_groups:
            cast = lambda t: None if t is None else t.to(compute_dtype)  # noqa: E731
            h = F.group_norm(h, num_groups, cast(norm_weight), cast(norm_bias), eps)
        if scale is not None:
            h = h * scale.to(compute_dtype) + shift.to(compute_dtype)
    if silu:
        h = F.silu(h)
    return h


def vae_conv3d_reference(x, weight, bias=None, *, num_groups=0, norm_weight=None, norm_bias=None,
                         eps=1e-6, scale=None, shift=None, silu=False, cache=None, pad_mode="replicate",
                         residual=None, norm_coef=None, out=None, compute_dtype=None):
    """The fused op in plain PyTorch (float32 maths for half inputs; ``compute_dtype`` overrides).

    Returns ``(y [B, C_out, T, H, W], new_cache [B, C, kt-1, H, W])`` in x's dtype.
    """
    check_vae_conv_inputs(x, weight, bias, num_groups=num_groups, norm_weight=norm_weight,
                          norm_bias=norm_bias, eps=eps, scale=scale, shift=shift, silu=silu, cache=cache,
                          pad_mode=pad_mode, residual=residual, norm_coef=norm_coef, out=out)
    work = compute_dtype or (x.dtype if x.dtype == torch.float64 else torch.float32)
    kt, kh, kw = weight.shape[2:]
    a = activate(x, num_groups=num_groups, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps,
                 scale=scale, shift=shift, silu=silu, compute_dtype=work, norm_coef=norm_coef).to(x.dtype)
    if cache is not None:
        front = cache
    elif pad_mode == "replicate":
        front = a[:, :, :1].expand(-1, -1, kt - 1, -1, -1)
    else:
        front = a.new_zeros(a.shape[0], a.shape[1], kt - 1, a.shape[3], a.shape[4])
    padded = torch.cat((front, a), dim=2)
    y = F.conv3d(padded.to(work), weight.to(work), None if bias is None else bias.to(work),
                 padding=(0, kh // 2, kw // 2))
    if residual is not None:
        y = y + residual.to(work)
    new_cache = padded[:, :, padded.shape[2] - (kt - 1):].contiguous()
    if out is not None:
        return out.copy_(y), new_cache
    return y.to(x.dtype), new_cache


def diffusers_sequence(x, weight, bias=None, *, num_groups=0, norm_weight=None, norm_bias=None, eps=1e-6,
                       scale=None, shift=None, silu=False, cache=None, pad_mode="replicate", residual=None):
    """The same function the way diffusers' ResNet block runs it, in x's dtype: GroupNorm, (scale,
    shift), SiLU, ``torch.cat`` of the front frames, Conv3d (cuDNN on a GPU), residual add, each a
    separate op that rounds. The baseline of the benchmarks and of the "2x torch's own error" rule."""
    kt, kh, kw = weight.shape[2:]
    h = x
    if num_groups:
        h = F.group_norm(h, num_groups, norm_weight, norm_bias, eps)
        if scale is not None:
            h = h * scale + shift
    if silu:
        h = F.silu(h)
    if cache is not None:
        front = [cache]
    elif pad_mode == "replicate":
        front = [h[:, :, :1]] * (kt - 1)
    else:
        front = [h.new_zeros(h.shape[0], h.shape[1], kt - 1, h.shape[3], h.shape[4])]
    padded = torch.cat(front + [h], dim=2)
    new_cache = padded[:, :, padded.shape[2] - (kt - 1):].clone()
    y = F.conv3d(padded, weight, bias, padding=(0, kh // 2, kw // 2))
    if residual is not None:
        y = y + residual
    return y, new_cache


def vae_conv3d_flops(weight, y) -> float:
    C_out, C_in, kt, kh, kw = weight.shape
    return 2.0 * y.numel() * C_in * kt * kh * kw


def vae_conv3d_bytes(x, weight, y, *, residual=False, modulation=False) -> int:
    """Bytes the fused op must move at least: x (and scale, shift), weight, y (and residual) once."""
    n = x.numel() * (3 if modulation else 1) + weight.numel() + y.numel() * (2 if residual else 1)
    return n * x.element_size()
