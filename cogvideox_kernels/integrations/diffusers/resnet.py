"""VAE: each ``CogVideoXResnetBlock3D`` runs as two ``vae_conv3d`` calls.

diffusers' block (0.42, ``autoencoder_kl_cogvideox.py``) computes, for one frame batch::

    h   = conv1(silu(norm1(x [, zq])), cache["conv1"])           # norm1: GroupNorm, or the spatial norm
    h   = h + temb_proj(silu(temb))                               # only with temb (the VAE passes none)
    out = conv2(dropout(silu(norm2(h [, zq]))), cache["conv2"]) + shortcut(x)

Patched, each line without temb is one fused op: GroupNorm-apply (statistics over the frame batch it
is given, as ``nn.GroupNorm`` takes them), the spatial norm's ``* conv_y(zq') + conv_b(zq')``, SiLU,
the causal (3,3,3) conv with its cache or replicated first frame, bias, and the shortcut as the fused
residual. What stays diffusers' own module calls: the spatial norm's ``conv_y`` / ``conv_b`` (on zq
interpolated as diffusers does it) and ``conv_shortcut``. The skipped modules' weights come from
``weights.py`` (their hooks run; a LoRA'd or quantized conv is not read). The new conv caches come
back in diffusers' dict format, so diffusers' frame-batch loop carries them either way.

diffusers' forward runs instead whenever anything is not exactly what the op computes: autograd,
``temb`` given, dropout active, a non-SiLU activation, a norm or conv that is not the plain diffusers
module (LoRA, quantized, a forward replaced), hooks we do not know, weights whose dtype differs from
the input's, and inputs the backend does not take (``auto``: our CUDA kernel on CUDA tensors it covers:
bf16/fp16, channels % 16 == 0; never the reference on a GPU).
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

from ...ops import registry
from . import state, weights
from .vae import KernelConvForward, conv_shape_supported

_ops = sys.modules[__package__]  # ops are looked up on the package, where tests (and users) may wrap them


def _diffusers_classes():
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import (CogVideoXCausalConv3d,
                                                                        CogVideoXResnetBlock3D,
                                                                        CogVideoXSpatialNorm3D)
    return CogVideoXResnetBlock3D, CogVideoXCausalConv3d, CogVideoXSpatialNorm3D


# ------------------------------------------------------------------------------------ structure


def _causal_conv_ok(conv, causal_cls) -> bool:
    """A diffusers causal conv the op computes: plain (Safe)Conv3d, stride 1, kt >= 2, 'first' padding."""
    return (type(conv) is causal_cls and conv_shape_supported(conv) and tuple(conv.conv.stride) == (1, 1, 1)
            and conv.time_kernel_size == conv.conv.kernel_size[0] >= 2)


def _norm_kind(norm, spatial_cls):
    """"group" (nn.GroupNorm), "spatial" (diffusers' spatial norm around an nn.GroupNorm) or None."""
    if type(norm) is torch.nn.GroupNorm:
        return "group"
    if type(norm) is spatial_cls and type(getattr(norm, "norm_layer", None)) is torch.nn.GroupNorm:
        return "spatial"
    return None


def _structure_why_not(block):
    """None when ``block`` is built the way our forward computes it, else why not (no backend asked)."""
    block_cls, causal_cls, spatial_cls = _diffusers_classes()
    if type(block).forward is not block_cls.forward:
        return f"{type(block).__name__} has its own forward"
    if type(block.nonlinearity) is not torch.nn.SiLU:
        return f"nonlinearity is {type(block.nonlinearity).__name__}; only SiLU is fused"
    for name in ("conv1", "conv2"):
        if not _causal_conv_ok(getattr(block, name), causal_cls):
            return f"{name} is not a plain stride-1 causal conv with 'first' padding and kt >= 2"
    kinds = {_norm_kind(block.norm1, spatial_cls), _norm_kind(block.norm2, spatial_cls)}
    if None in kinds or len(kinds) != 1:
        return "norm1/norm2 are not both nn.GroupNorm or both CogVideoXSpatialNorm3D"
    return None


def why_not_covered(block, backend: str):
    """None when ``block`` (a CogVideoXResnetBlock3D) is one our forward computes with ``backend``,
    else why not. Checked at ``apply``; the per-call checks (hooks, dtypes, devices) come on top."""
    why = _structure_why_not(block)
    if why is None and backend in ("auto", "cuda"):  # the CUDA kernel's channel rule, shape-only probes
        for conv in (block.conv1.conv, block.conv2.conv):
            why = _kernel_why_not((1, conv.in_channels, 2, 4, 4), torch.bfloat16, conv.weight.shape, "cuda")
            if why is not None:
                break
    return why


def _kernel_why_not(shape, dtype, weight_shape, kernel):
    x = torch.empty(shape, dtype=dtype, device="meta")
    w = torch.empty(weight_shape, dtype=dtype, device="meta")
    return registry.why_unsupported("vae_conv3d", kernel, x=x, weight=w)


def _takes(inputs, block, backend) -> bool:
    """Whether ``backend`` runs both of the block's convs on ``inputs`` (else diffusers' forward).
    ``auto`` takes our CUDA kernel on CUDA tensors it covers, never the reference on a GPU."""
    if backend == "reference":
        return True
    if backend == "auto" and inputs.device.type != "cuda":
        return False
    kernel = "cuda" if backend == "auto" else backend
    if registry.availability("vae_conv3d", inputs.device)[kernel] is not None:
        return False
    B, _, T, H, W = inputs.shape
    return all(_kernel_why_not((B, conv.in_channels, T, H, W), inputs.dtype, conv.weight.shape, kernel) is None
               for conv in (block.conv1.conv, block.conv2.conv))


# ------------------------------------------------------------------------ per-call checks


def _forward_untouched(module, ours=()) -> bool:
    """Nothing replaced ``module``'s forward: the innermost one (under any hooks) is its class's or ours."""
    holder, attr, kind = state._slots(module)[-1]
    fn = state._slot_value(holder, attr, kind)
    return fn is None or state._is_own_forward(fn, module) or isinstance(fn, ours)


def _skippable(module, ours=()) -> bool:
    """We may skip ``module``'s forward: known hooks only (run by weights.enter_hooks) and its own forward."""
    return weights.hooks_known(module) and _forward_untouched(module, ours)


def _skipped_modules(block, spatial: bool) -> list:
    mods = [block.nonlinearity, block.dropout, block.conv1, block.conv2, block.conv1.conv, block.conv2.conv]
    for norm in (block.norm1, block.norm2):
        mods += [norm, norm.norm_layer] if spatial else [norm]
    return mods


def _cache_tensors(cache):
    if isinstance(cache, dict):
        return [t for v in cache.values() for t in _cache_tensors(v)]
    return [cache] if isinstance(cache, torch.Tensor) else []


def _call_ok(block, inputs, temb, zq, conv_cache) -> bool:
    if temb is not None or weights.autograd_needed((inputs, zq, _cache_tensors(conv_cache)), (block,)):
        return False
    if _structure_why_not(block) is not None:  # a module swapped since apply (a LoRA'd conv, GELU, ...)
        return False
    if zq is not None and zq.dtype != inputs.dtype:
        return False
    _, _, spatial_cls = _diffusers_classes()
    spatial = type(block.norm1) is spatial_cls
    if spatial != (zq is not None):  # diffusers' own forward raises its own error here
        return False
    if not (isinstance(block.dropout, torch.nn.Dropout) and weights.identity_ok(block.dropout)):
        return False
    if not all(_skippable(m, (KernelConvForward,)) for m in _skipped_modules(block, spatial)):
        return False
    return not weights.function_mode_active()


# --------------------------------------------------------------------------------- forward


def _interpolate_zq(zq, f):
    """diffusers' CogVideoXSpatialNorm3D resizing of zq to f (the first frame apart for odd T > 1)."""
    if f.shape[2] > 1 and f.shape[2] % 2 == 1:
        z_first = F.interpolate(zq[:, :, :1], size=f[:, :, :1].shape[-3:])
        z_rest = F.interpolate(zq[:, :, 1:], size=f[:, :, 1:].shape[-3:])
        return torch.cat([z_first, z_rest], dim=2)
    return F.interpolate(zq, size=f.shape[-3:])


class KernelResnetForward:
    """``CogVideoXResnetBlock3D.forward`` while patched (see the module docstring). A picklable
    instance attribute of the block; diffusers' forward runs whatever it does not cover."""

    def __init__(self, block, backend: str = "auto"):
        self.block = block
        self.backend = registry.backend_for("vae_conv3d", backend)

    def __call__(self, inputs, temb=None, zq=None, conv_cache=None):
        block = self.block
        if _call_ok(block, inputs, temb, zq, conv_cache) and _takes(inputs, block, self.backend):
            out = self._ours(inputs, zq, conv_cache or {})
            if out is not None:
                return out
        return type(block).forward(block, inputs, temb, zq, conv_cache)

    def _step(self, stack, x, norm, conv, zq, cache, new_cache, key, skipped=()):
        """The arguments of one fused call (norm + modulation + SiLU + conv), or None: with the hooks of
        the modules it skips run onto ``stack``, the spatial norm's convs called, ``new_cache`` filled."""
        spatial = zq is not None
        group_norm = norm.norm_layer if spatial else norm
        mods = [norm, group_norm] if spatial else [norm]
        for m in mods + [self.block.nonlinearity, *skipped, conv, conv.conv]:  # as their calls would
            weights.enter_hooks(m, stack)
        args = {}
        if spatial:
            zq = _interpolate_zq(zq, x)
            norm_cache = cache.get(key) or {}
            new = new_cache[key] = {}
            scale, new["conv_y"] = norm.conv_y(zq, conv_cache=norm_cache.get("conv_y"))
            shift, new["conv_b"] = norm.conv_b(zq, conv_cache=norm_cache.get("conv_b"))
            args.update(scale=scale, shift=shift)
        gn = (group_norm.weight, group_norm.bias) if group_norm.affine else (None, None)
        w, b = conv.conv.weight, conv.conv.bias
        tensors = [*gn, w, b] + ([args["scale"], args["shift"]] if spatial else [])
        if not all(t is None or (weights._plain(t) and t.dtype == x.dtype and t.device == x.device)
                   for t in tensors):
            return None
        args.update(weight=w, bias=b, num_groups=group_norm.num_groups, norm_weight=gn[0], norm_bias=gn[1],
                    eps=float(group_norm.eps))
        return args

    def _ours(self, inputs, zq, cache):
        block, backend = self.block, self.backend
        new_cache = {}
        with contextlib.ExitStack() as stack:
            first = self._step(stack, inputs, block.norm1, block.conv1, zq, cache, new_cache, "norm1")
            if first is None:
                return None
            h, new_cache["conv1"] = _ops.vae_conv3d(inputs, silu=True, cache=cache.get("conv1"), backend=backend,
                                                    **first)
            del first  # the spatial norm's scale and shift
        shortcut = inputs
        if block.in_channels != block.out_channels:  # diffusers' own module call (hooks, LoRA, ...)
            if block.use_conv_shortcut:
                shortcut, shortcut_cache = block.conv_shortcut(inputs, conv_cache=cache.get("conv_shortcut"))
            else:
                shortcut, shortcut_cache = block.conv_shortcut(inputs), None
        with contextlib.ExitStack() as stack:
            second = self._step(stack, h, block.norm2, block.conv2, zq, cache, new_cache, "norm2",
                                skipped=(block.dropout,))
            if second is None:  # (rare: a hook left the second conv's weights in another dtype)
                return None
            fused = shortcut.dtype == h.dtype
            out, new_cache["conv2"] = _ops.vae_conv3d(h, silu=True, cache=cache.get("conv2"),
                                                      residual=shortcut if fused else None, backend=backend,
                                                      **second)
            del second, h
        if not fused:
            out = out + shortcut
        if block.in_channels != block.out_channels and block.use_conv_shortcut:
            new_cache["conv_shortcut"] = shortcut_cache
        return out, new_cache


__all__ = ["KernelResnetForward", "why_not_covered"]
