"""One diffusers ``CogVideoXResnetBlock3D`` forward through ``vae_conv3d`` (duck-typed: diffusers
is not imported here; ``integrations`` wires it in).

Mapping (diffusers 0.42 ``autoencoder_kl_cogvideox.py``), for encoder and decoder blocks alike:

* ``norm1`` (``nn.GroupNorm``, or ``CogVideoXSpatialNorm3D`` when ``zq`` is given) +
  ``nonlinearity`` (SiLU) + ``conv1`` (``CogVideoXCausalConv3d`` k=3, ``pad_mode="first"``)
  -> ``vae_conv3d(x, conv1.conv.weight, conv1.conv.bias, num_groups, norm weight/bias, eps,
  [scale=conv_y(zq), shift=conv_b(zq)], silu=True, cache=conv_cache["conv1"])``
* ``temb_proj`` (when ``temb`` is given; the VAE passes none): added by torch in between
* ``norm2`` + ``nonlinearity`` + ``dropout`` (p = 0 or eval) + ``conv2`` + shortcut add ->
  ``vae_conv3d(h, conv2..., residual=shortcut)``, where the shortcut is ``inputs`` or diffusers'
  own ``conv_shortcut(inputs)`` module call (1x1x1 ``CogVideoXSafeConv3d`` or causal k=3 conv).

The spatial norm's zq interpolation and its two 1x1x1 convs run through the diffusers modules
themselves (so their hooks apply); only the GroupNorm-apply, modulation, SiLU, the (3,3,3) conv,
its padding/cache and the residual add move into the fused op. Returns ``(hidden_states,
new_conv_cache)`` with the same cache dict keys diffusers uses, so the result can be fed back as
``conv_cache`` by diffusers' own frame-batch loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import vae_conv3d


def _refuse(msg):
    raise ValueError(f"resnet_block_forward: {msg}; run the block's own forward instead")


def _conv_args(conv, name):
    """weight, bias of a diffusers CogVideoXCausalConv3d with kernel 3, 'first' padding, stride 1."""
    inner = getattr(conv, "conv", None)
    if inner is None or not isinstance(inner, torch.nn.Conv3d):
        _refuse(f"{name} is not a CogVideoXCausalConv3d")
    if getattr(conv, "pad_mode", None) == "replicate":
        _refuse(f"{name} uses pad_mode='replicate' (replicates rows/columns too), not supported")
    if inner.stride != (1, 1, 1) or inner.dilation != (1, 1, 1) or inner.groups != 1:
        _refuse(f"{name} has stride {inner.stride}, dilation {inner.dilation}, groups {inner.groups}")
    kt, kh, kw = inner.kernel_size
    if tuple(inner.padding) != (0, kh // 2, kw // 2):
        _refuse(f"{name} has padding {inner.padding}, expected (0, {kh // 2}, {kw // 2})")
    return inner.weight, inner.bias


def _group_norm_args(gn, name):
    if not isinstance(gn, torch.nn.GroupNorm):
        _refuse(f"{name} is {type(gn).__name__}, not nn.GroupNorm")
    return dict(num_groups=gn.num_groups, norm_weight=gn.weight if gn.affine else None,
                norm_bias=gn.bias if gn.affine else None, eps=float(gn.eps))


def spatial_norm_modulation(norm, f, zq, conv_cache=None):
    """diffusers' CogVideoXSpatialNorm3D without its GroupNorm: (conv_y(zq'), conv_b(zq'), new cache),
    zq' = zq interpolated to f's frames/size (the first frame apart when f has an odd frame count > 1)."""
    conv_cache = conv_cache or {}
    if f.shape[2] > 1 and f.shape[2] % 2 == 1:
        z_first = F.interpolate(zq[:, :, :1], size=f[:, :, :1].shape[-3:])
        z_rest = F.interpolate(zq[:, :, 1:], size=f[:, :, 1:].shape[-3:])
        zq = torch.cat([z_first, z_rest], dim=2)
    else:
        zq = F.interpolate(zq, size=f.shape[-3:])
    new = {}
    conv_y, new["conv_y"] = norm.conv_y(zq, conv_cache=conv_cache.get("conv_y"))
    conv_b, new["conv_b"] = norm.conv_b(zq, conv_cache=conv_cache.get("conv_b"))
    return conv_y, conv_b, new


def _norm_args(norm, x, zq, cache, name):
    if zq is None:
        return _group_norm_args(norm, name), None
    if not hasattr(norm, "norm_layer"):
        _refuse(f"zq was given but {name} is not a CogVideoXSpatialNorm3D")
    scale, shift, new = spatial_norm_modulation(norm, x, zq, cache)
    return dict(_group_norm_args(norm.norm_layer, f"{name}.norm_layer"), scale=scale.to(x.dtype),
                shift=shift.to(x.dtype)), new


def resnet_block_forward(block, inputs, temb=None, zq=None, conv_cache=None, *, backend="auto"):
    """``block(inputs, temb, zq, conv_cache)`` of a diffusers CogVideoXResnetBlock3D, through the
    fused op. Raises a ValueError for a block it cannot honour (non-SiLU activation, active dropout,
    'replicate' padding, strided convs)."""
    if not isinstance(block.nonlinearity, torch.nn.SiLU):
        _refuse(f"nonlinearity is {type(block.nonlinearity).__name__}, only SiLU is fused")
    if block.training and block.dropout.p > 0:
        _refuse(f"dropout p={block.dropout.p} is active (training mode)")
    conv_cache = conv_cache or {}
    new_cache = {}

    norm1, new_norm1 = _norm_args(block.norm1, inputs, zq, conv_cache.get("norm1"), "norm1")
    if new_norm1 is not None:
        new_cache["norm1"] = new_norm1
    w1, b1 = _conv_args(block.conv1, "conv1")
    h, new_cache["conv1"] = vae_conv3d(inputs, w1, b1, silu=True, cache=conv_cache.get("conv1"),
                                       backend=backend, **norm1)
    if temb is not None:
        h = h + block.temb_proj(block.nonlinearity(temb))[:, :, None, None, None]

    norm2, new_norm2 = _norm_args(block.norm2, h, zq, conv_cache.get("norm2"), "norm2")
    if new_norm2 is not None:
        new_cache["norm2"] = new_norm2
    shortcut = inputs
    if block.in_channels != block.out_channels:
        if block.use_conv_shortcut:
            shortcut, new_cache["conv_shortcut"] = block.conv_shortcut(
                inputs, conv_cache=conv_cache.get("conv_shortcut"))
        else:
            shortcut = block.conv_shortcut(inputs)
    w2, b2 = _conv_args(block.conv2, "conv2")
    h, new_cache["conv2"] = vae_conv3d(h, w2, b2, silu=True, cache=conv_cache.get("conv2"),
                                       residual=shortcut.to(h.dtype), backend=backend, **norm2)
    return h, new_cache
