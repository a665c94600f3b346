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

Or the modulation from the spatial norm's latent and (1,1,1) convs, never as full-size tensors: ``zq``
[B, Kz, Tz, Hz, Wz] (diffusers' zq, 16 channels at the latent resolution), ``zq_index`` (int32 [T + H + W]:
the zq frame, row and column each frame, row and column of x reads, on the CPU or x's device;
``spatial_norm_index`` gives diffusers' nearest resizing), ``scale_weight`` / ``shift_weight``
([C, Kz] or conv_y's / conv_b's [C, Kz, 1, 1, 1]) and optional ``scale_bias`` / ``shift_bias`` [C]::

    scale = round(scale_weight @ zq[b, :, ti[t], hi[h], wi[w]] + scale_bias)     (shift likewise)

rounded to x's dtype as diffusers' conv_y / conv_b outputs are, then used as the given ``scale``/``shift``.

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


MODULATION_ARGS = ("zq", "zq_index", "scale_weight", "scale_bias", "shift_weight", "shift_bias")


def spatial_norm_index(zq_size, size, device="cpu"):
    """int32 [T + H + W]: the zq frame, row and column that each frame, row and column of a [.., T, H, W]
    feature map reads in diffusers' CogVideoXSpatialNorm3D (nearest ``F.interpolate`` of zq [.., Tz, Hz, Wz]
    to the feature's size; for an odd T > 1, frame 0 from zq's frame 0 and the rest from zq's others).
    The indices come from ``F.interpolate`` itself, so they are PyTorch's nearest rule exactly."""
    (Tz, Hz, Wz), (T, H, W) = tuple(zq_size), tuple(size)
    if min(Tz, Hz, Wz, T, H, W) < 1:
        raise ValueError(f"spatial_norm_index: empty sizes zq {tuple(zq_size)} / x {tuple(size)}")

    def nearest(n_in, n_out):
        src = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in, 1, 1)
        return F.interpolate(src, size=(n_out, 1, 1), mode="nearest").view(-1).round().to(torch.int32)

    if T > 1 and T % 2 == 1:
        if Tz < 2:
            raise ValueError(f"spatial_norm_index: an odd T={T} > 1 takes zq's frames 1.. for frames 1.. "
                             f"(diffusers' split), but zq has Tz={Tz}")
        frames = torch.cat((torch.zeros(1, dtype=torch.int32), 1 + nearest(Tz - 1, T - 1)))
    else:
        frames = nearest(Tz, T)
    return torch.cat((frames, nearest(Hz, H), nearest(Wz, W))).to(device)


_INDEX_ON_DEVICE = {}  # (device, index bytes) -> the index on that device


def spatial_norm_index_on(index, device):
    """A spatial_norm_index (or a slice of one) on ``device``, made once per distinct index and device and kept
    (a decode reads a handful). Copying the T + H + W ints before every conv instead would put a small host ->
    device copy on the compute stream that queues on the copy engine behind any large copy running beside it
    (``apply(vae, vae_cache="host")``'s cache loads: the H200 decode idled ~230 ms that way at 49x480x720). The one
    copy is synchronous, so the kept tensor is ready for every stream."""
    device = torch.device(device)
    if index.device == device:
        return index.contiguous()
    host = index.detach().to("cpu").contiguous()
    key = (str(device), host.dtype, tuple(host.shape), host.numpy().tobytes())
    kept = _INDEX_ON_DEVICE.get(key)
    if kept is None:
        if len(_INDEX_ON_DEVICE) >= 256:
            _INDEX_ON_DEVICE.clear()
        kept = _INDEX_ON_DEVICE[key] = host.to(device)
    return kept


def _check_modulation(x, zq, zq_index, scale_weight, scale_bias, shift_weight, shift_bias):
    B, C, T, H, W = x.shape
    check_tensor("zq", zq, ndim=5, device=x.device)
    if zq.dtype != x.dtype:
        raise ValueError(f"zq has dtype {zq.dtype} but x has {x.dtype}; they must match")
    if zq.shape[0] != B or min(zq.shape) == 0:
        raise ValueError(f"zq must be [B={B}, Kz, Tz, Hz, Wz] with no empty dimension, got {tuple(zq.shape)}")
    Kz, Tz, Hz, Wz = zq.shape[1:]
    for name, t in (("scale_weight", scale_weight), ("shift_weight", shift_weight)):
        if t is None:
            raise ValueError(f"{name} is needed with zq (the spatial norm's conv_y / conv_b weight)")
        check_tensor(name, t, device=x.device)
        if tuple(t.shape) not in ((C, Kz), (C, Kz, 1, 1, 1)):
            raise ValueError(f"{name} must be [C={C}, Kz={Kz}] or [C, Kz, 1, 1, 1], got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    for name, t in (("scale_bias", scale_bias), ("shift_bias", shift_bias)):
        if t is not None:
            check_tensor(name, t, ndim=1, device=x.device)
            check_shape(name, t, (C,))
            if t.dtype != x.dtype:
                raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    if zq_index is not None:
        check_tensor("zq_index", zq_index, ndim=1, dtypes=(torch.int32,))
        if zq_index.device not in (torch.device("cpu"), x.device):
            raise ValueError(f"zq_index is on {zq_index.device}; it must be on the CPU or on x's device {x.device}")
        check_shape("zq_index", zq_index, (T + H + W,))
        if not torch.compiler.is_compiling():  # (the native ops check again inside, compiled or not)
            check_zq_index_values(zq_index, T, H, zq.shape[2:])


def check_zq_index_values(zq_index, T, H, zq_size):
    """Every index of ``zq_index`` (int32 [T + H + W]) inside zq's frames / rows / columns (reads the values:
    a device-to-host copy for a GPU tensor)."""
    idx = zq_index.cpu()
    for what, part, n in (("frame", idx[:T], zq_size[0]), ("row", idx[T:T + H], zq_size[1]),
                          ("column", idx[T + H:], zq_size[2])):
        if part.min() < 0 or part.max() >= n:
            raise ValueError(f"zq_index: a {what} index is outside zq's {n} {what}s")


def modulation_from_zq(x, zq, zq_index=None, scale_weight=None, scale_bias=None, shift_weight=None,
                       shift_bias=None, compute_dtype=torch.float32):
    """(scale, shift) [B, C, T, H, W] in x's dtype from the spatial norm's latent (see the module doc):
    diffusers' nearest-resized zq through conv_y / conv_b, computed in ``compute_dtype`` and rounded."""
    B, C, T, H, W = x.shape
    if zq_index is None:
        zq_index = spatial_norm_index(zq.shape[2:], x.shape[2:], x.device)
    idx = zq_index.to(zq.device).long()
    z = zq.to(compute_dtype)[:, :, idx[:T]][:, :, :, idx[T:T + H]][..., idx[T + H:]]
    out = []
    for w, b in ((scale_weight, scale_bias), (shift_weight, shift_bias)):
        m = torch.einsum("ck,bkthw->bcthw", w.reshape(C, -1).to(compute_dtype), z)
        if b is not None:
            m = m + b.to(compute_dtype)[:, None, None, None]
        out.append(m.to(x.dtype))
    return tuple(out)


def check_vae_conv_inputs(x, weight, bias=None, *, num_groups=0, norm_weight=None, norm_bias=None,
                          eps=1e-6, scale=None, shift=None, silu=False, cache=None,
                          pad_mode="replicate", residual=None, norm_coef=None, out=None, zq=None, zq_index=None,
                          scale_weight=None, scale_bias=None, shift_weight=None, shift_bias=None):
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
    elif not num_groups and any(t is not None for t in (norm_weight, norm_bias, scale, shift, zq)):
        raise ValueError("norm_weight, norm_bias, scale, shift and zq need num_groups > 0 or norm_coef (GroupNorm on)")
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
    if zq is not None:
        if scale is not None:
            raise ValueError("give the modulation either as scale / shift or as zq with its weights, not both")
        _check_modulation(x, zq, zq_index, scale_weight, scale_bias, shift_weight, shift_bias)
    elif any(t is not None for t in (zq_index, scale_weight, scale_bias, shift_weight, shift_bias)):
        raise ValueError("zq_index, scale_weight, scale_bias, shift_weight and shift_bias come with zq")
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
                         residual=None, norm_coef=None, out=None, zq=None, zq_index=None, scale_weight=None,
                         scale_bias=None, shift_weight=None, shift_bias=None, compute_dtype=None):
    """The fused op in plain PyTorch (float32 maths for half inputs; ``compute_dtype`` overrides).

    Returns ``(y [B, C_out, T, H, W], new_cache [B, C, kt-1, H, W])`` in x's dtype.
    """
    mod = dict(zq=zq, zq_index=zq_index, scale_weight=scale_weight, scale_bias=scale_bias, shift_weight=shift_weight,
               shift_bias=shift_bias)
    check_vae_conv_inputs(x, weight, bias, num_groups=num_groups, norm_weight=norm_weight,
                          norm_bias=norm_bias, eps=eps, scale=scale, shift=shift, silu=silu, cache=cache,
                          pad_mode=pad_mode, residual=residual, norm_coef=norm_coef, out=out, **mod)
    work = compute_dtype or (x.dtype if x.dtype == torch.float64 else torch.float32)
    if zq is not None:
        scale, shift = modulation_from_zq(x, compute_dtype=work, **mod)
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
                       scale=None, shift=None, silu=False, cache=None, pad_mode="replicate", residual=None,
                       zq=None, **modulation):
    """The same function the way diffusers' ResNet block runs it, in x's dtype: GroupNorm, (scale,
    shift; or conv_y / conv_b of the resized zq), SiLU, ``torch.cat`` of the front frames, Conv3d (cuDNN on
    a GPU), residual add, each a separate op that rounds. The baseline of the benchmarks and of the "2x
    torch's own error" rule."""
    kt, kh, kw = weight.shape[2:]
    if zq is not None:
        scale, shift = modulation_from_zq(x, zq, compute_dtype=x.dtype, **modulation)
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
