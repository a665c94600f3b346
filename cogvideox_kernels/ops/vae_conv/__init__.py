"""``vae_conv3d``: GroupNorm-apply + SiLU + causal (3,3,3) conv + bias + residual, the step of
CogVideoX's VAE ResNet blocks, in one op with a streaming cache (see ``reference.py``)."""
from __future__ import annotations

import torch

from .. import registry
from .reference import (PAD_MODES, check_vae_conv_inputs, diffusers_sequence, group_norm_coef_reference,
                        modulation_from_zq, spatial_norm_index, vae_conv3d_bytes, vae_conv3d_flops,
                        vae_conv3d_reference)

registry.register_op("vae_conv3d", reference=vae_conv3d_reference, check=check_vae_conv_inputs, device_arg="x")
# the launchers copy what is not contiguous themselves (layout: any strides reach them)
registry.register_backend("vae_conv3d", "cuda", run="cogvideox_kernels.ops.vae_conv.native:vae_conv3d_cuda",
                          supports="cogvideox_kernels.ops.vae_conv.native:cuda_supports",
                          available=registry.extension_cuda)
registry.register_backend("vae_conv3d", "cpp", run="cogvideox_kernels.ops.vae_conv.native:vae_conv3d_cpp",
                          available=registry.extension_cpp)
# our Triton activation pass + cuDNN's conv (cudnn_route.py): only when named, never by "auto"
# (or for the VAE's ResNet convs through COGVIDEOX_KERNELS_VAE_CONV_CUDNN_CHANNELS, see integrations/diffusers/resnet.py)
registry.register_backend("vae_conv3d", "cudnn", run="cogvideox_kernels.ops.vae_conv.cudnn_route:vae_conv3d_cudnn",
                          supports="cogvideox_kernels.ops.vae_conv.cudnn_route:cudnn_supports",
                          available=registry.triton_device, auto_devices=())


def vae_conv3d(x, weight, bias=None, *, num_groups=0, norm_weight=None, norm_bias=None, eps=1e-6,
               scale=None, shift=None, silu=False, cache=None, pad_mode="replicate", residual=None,
               norm_coef=None, out=None, zq=None, zq_index=None, scale_weight=None, scale_bias=None,
               shift_weight=None, shift_bias=None, backend="auto"):
    """``y, new_cache = conv(act(x)) + bias (+ residual)`` with causal temporal padding.

    x [B, C, T, H, W]; weight [C_out, C, kt, kh, kw] (stride 1, spatial zero padding kh//2, kw//2);
    ``num_groups`` > 0 turns GroupNorm on (statistics over each group's channels and all frames,
    rows and columns of x, like nn.GroupNorm; affine ``norm_weight``/``norm_bias``), then
    ``h * scale + shift`` when given (spatial norm), then SiLU when ``silu``. The kt-1 frames before
    x come from ``cache`` (activated frames, as returned in ``new_cache``), else copies of frame 0
    (``pad_mode="replicate"``, diffusers' ``"first"``) or zeros. ``residual`` [B, C_out, T, H, W]
    is added before the output's single rounding. ``norm_coef`` (float32 [B, C, 2], from
    ``vae_group_norm_coef``; ``num_groups`` 0) gives the GroupNorm-apply ``v * a + d`` instead of
    statistics over x, so a frame batch can run in frame chunks chained by the cache. ``out``
    [B, C_out, T, H, W] receives y (returned as the first output); the native backends read x,
    scale/shift and residual and write ``out`` in place when each is T consecutive frames of a
    contiguous tensor (a frame chunk of a batch), so chunks cost no copies.

    Instead of ``scale``/``shift``, the spatial norm's latent: ``zq`` [B, Kz, Tz, Hz, Wz] with
    ``scale_weight``/``shift_weight`` (conv_y's / conv_b's [C, Kz, 1, 1, 1]), optional ``scale_bias``/
    ``shift_bias`` [C] and ``zq_index`` (int32 [T + H + W], default ``spatial_norm_index``: diffusers'
    nearest resizing): scale and shift are then computed per element (rounded to x's dtype like
    diffusers' conv outputs), never as full-size tensors (the CUDA kernel: once per call at zq's
    resolution, gathered per element). ``COGVIDEOX_KERNELS_VAE_FUSED_MODULATION_CUDA=0`` makes the CUDA
    backend form scale / shift first (``modulation_from_zq``) and run the kernel on them instead.

    backend: ``"auto"`` (CUDA kernel for GPU tensors it covers, C++ path for CPU tensors, else the
    reference), ``"cuda"``, ``"cpp"``, ``"reference"``, or ``"cudnn"`` (never picked by ``auto``: a Triton
    activation pass writing the padded activation channels-last, then cuDNN's conv3d and the residual add;
    bf16/fp16 on a GPU, CPU tensors under ``TRITON_INTERPRET=1``; see cudnn_route.py).
    """
    return registry.dispatch("vae_conv3d", backend, x=x, weight=weight, bias=bias, num_groups=num_groups,
                             norm_weight=norm_weight, norm_bias=norm_bias, eps=eps, scale=scale, shift=shift,
                             silu=silu, cache=cache, pad_mode=pad_mode, residual=residual, norm_coef=norm_coef,
                             out=out, zq=zq, zq_index=zq_index, scale_weight=scale_weight, scale_bias=scale_bias,
                             shift_weight=shift_weight, shift_bias=shift_bias)


def vae_group_norm_coef(x, num_groups, norm_weight=None, norm_bias=None, eps=1e-6, backend="auto"):
    """GroupNorm of x (nn.GroupNorm's statistics) as float32 coefficients [B, C, 2]: ``norm(v) = v * a + d``,
    the ``norm_coef`` input of ``vae_conv3d``. backend: ``"auto"`` (the CUDA statistics pass for bf16/fp16
    CUDA tensors when the extension has CUDA, else the reference), ``"cuda"``, ``"reference"`` (float64)."""
    if backend not in ("auto", "cuda", "cpp", "reference"):
        raise ValueError(f"vae_group_norm_coef: backend={backend!r}; choose 'auto', 'cuda', 'cpp' or 'reference'")
    cuda_ok = (x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16)
               and registry.extension_cuda(x.device) is None)
    if backend == "cuda" and not cuda_ok:
        raise ValueError(f"vae_group_norm_coef backend='cuda': x is {x.dtype} on {x.device}; it needs bf16/fp16 "
                         "CUDA tensors and the extension built with CUDA")
    if backend in ("auto", "cuda") and cuda_ok:
        from .native import group_norm_coef_cuda

        group_norm_coef_reference(x[:, :, :1, :1, :1], num_groups, norm_weight, norm_bias, eps)  # the checks
        return group_norm_coef_cuda(x, num_groups, norm_weight, norm_bias, eps)
    return group_norm_coef_reference(x, num_groups, norm_weight, norm_bias, eps)


__all__ = ["vae_conv3d", "vae_group_norm_coef", "spatial_norm_index", "modulation_from_zq",
           "group_norm_coef_reference", "vae_conv3d_reference", "check_vae_conv_inputs", "diffusers_sequence",
           "vae_conv3d_flops", "vae_conv3d_bytes", "PAD_MODES"]
