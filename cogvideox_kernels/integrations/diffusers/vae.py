"""VAE: ``CogVideoXCausalConv3d`` modules run ``causal_conv3d`` where our conv kernel covers them."""
from __future__ import annotations

import contextlib
import sys

import torch

from ...ops import registry
from . import weights

_ops = sys.modules[__package__]  # ops are looked up on the package, where tests (and users) may wrap them


def _plain_conv(conv) -> bool:
    """diffusers' CogVideoXSafeConv3d (a Conv3d that only splits big inputs in time) or a plain Conv3d;
    not a peft LoRA layer, a quantized conv or any other subclass with its own forward."""
    cls = type(conv)
    return cls is torch.nn.Conv3d or (cls.__name__ == "CogVideoXSafeConv3d" and cls.__module__.startswith("diffusers."))


def conv_shape_supported(module) -> bool:
    """Convs whose padding/stride/dilation are what ``causal_conv3d`` computes."""
    conv = module.conv
    if not _plain_conv(conv):
        return False
    kt, kh, kw = conv.kernel_size
    return (module.pad_mode != "replicate"  # diffusers' "replicate" also pads H, W by replication
            and kh == kw and kh % 2 == 1
            and tuple(conv.padding) == (0, kh // 2, kw // 2)
            and conv.stride[1:] == (1, 1) and tuple(conv.dilation) == (1, 1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros")


def _native_supports(shape, dtype, weight_shape, stride, kernel="cuda") -> bool:
    """Whether our conv ``kernel`` covers such a call, asked of the op registry with shape-only (meta)
    probes: no values are read, and the weight may still be offloaded or in its storage dtype."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    w = torch.empty(weight_shape, dtype=dtype, device="meta")
    try:
        return registry.why_unsupported("causal_conv3d", kernel, x=x, weight=w, bias=None, stride=stride,
                                        pad_mode="replicate", cache=None) is None
    except (TypeError, ValueError):  # a shape the probe itself rejects: not covered
        return False


def backend_can_run_here(backend) -> bool:
    """Whether ``backend`` can ever take a conv in this process (``auto``: a CUDA GPU and the CUDA build)."""
    if backend == "reference":
        return True
    from ..._ext import cuda_available, extension_available

    if backend == "cpp":
        return extension_available()
    return cuda_available() and torch.cuda.is_available()


def kernel_shape_covered(module, backend) -> bool:
    """The conv's kernel shape and stride are ones our kernel for ``backend`` takes (checked at apply)."""
    weight = module.conv.weight
    return backend == "reference" or _native_supports((1, weight.shape[1], 2, 4, 4), torch.float32,
                                                      weight.shape, module.conv.stride[0], _kernel(backend))


def _takes(inputs, weight_shape, stride, backend) -> bool:
    """Whether ``backend`` runs our conv on these inputs (else diffusers' conv, cuDNN on a GPU).
    ``auto`` takes our CUDA kernel on CUDA tensors only; ``cuda``/``cpp`` that kernel where it covers."""
    if backend == "reference":
        return True
    if backend == "auto" and inputs.device.type != "cuda":
        return False
    return _native_supports(inputs.shape, inputs.dtype, weight_shape, stride, _kernel(backend))


def _kernel(backend) -> str:
    return "cuda" if backend == "auto" else backend


class KernelConvForward:
    """``CogVideoXCausalConv3d.forward`` while patched: frame-0 replicate padding and the chunk cache inside
    ``causal_conv3d``, no ``torch.cat``. diffusers' forward runs whatever our kernel does not cover
    (for ``auto``: non-CUDA tensors, uncovered shapes), under autograd, and when the conv's weights cannot
    be had exactly (unknown hooks, LoRA, quantized weights; see weights.py)."""

    def __init__(self, module, backend: str = "auto"):
        self.module = module
        self.backend = backend

    def __call__(self, inputs, conv_cache=None):
        module, backend = self.module, self.backend
        conv = module.conv
        runs = (_plain_conv(conv) and weights.hooks_known(conv)  # (a peft LoRA Conv3d has no .stride)
                and not weights.autograd_needed((inputs, conv_cache), (conv,))
                and _takes(inputs, conv.weight.shape, conv.stride[0], backend))
        if runs:
            with contextlib.ExitStack() as stack:
                params = weights.leaf_params(conv, stack)
                if params is not None:
                    return self._ours(inputs, conv_cache, *params, conv.stride[0])
        return type(module).forward(module, inputs, conv_cache)

    def _ours(self, inputs, conv_cache, weight, bias, stride):
        kt = self.module.time_kernel_size
        # For kt == 1 diffusers passes (and keeps) a clone of the whole input as "cache": not needed.
        cache = conv_cache if kt > 1 else None
        if self.backend != "reference":  # the native kernels take contiguous tensors
            inputs = inputs.contiguous()
            cache = None if cache is None else cache.contiguous()
        out, new_cache = _ops.causal_conv3d(inputs, weight, bias, stride=stride, pad_mode="replicate", cache=cache,
                                            backend=self.backend)
        return out, (new_cache if kt > 1 else None)


def coverage_note(convs) -> str:
    shapes = sorted({tuple(m.conv.kernel_size) for m in convs})
    return f"{len(convs)} CogVideoXCausalConv3d with kernel shapes {shapes}"


def upsample_sources(frames: int, compress_time: bool) -> list:
    """Input frame of each output frame of diffusers' CogVideoXUpsample3D (nearest 2x; with
    ``compress_time`` also 2x in time, the first frame of an odd clip once)."""
    if not compress_time:
        return list(range(frames))
    if frames > 1 and frames % 2 == 1:
        return [0] + [1 + j // 2 for j in range(2 * (frames - 1))]
    if frames > 1:
        return [j // 2 for j in range(2 * frames)]
    return [0]


class KernelUpsampleForward:
    """``CogVideoXUpsample3D.forward`` while patched, for outputs above ``resnet.CHUNK_BYTES``: nearest 2x
    and the 3x3 conv (diffusers' own ``conv`` module call, hooks included) over a few source frames at a
    time, written into one contiguous [B, C, T, H, W] output. diffusers interpolates the whole frame batch
    first (a second output-sized tensor) and returns a permuted view (which the next fused conv copies);
    a frame repeated in time (``compress_time``) goes through the conv once and is copied. The same
    values: nearest interpolation copies, and the conv sees the same images. diffusers' forward runs
    under autograd and for small outputs."""

    def __init__(self, module):
        self.module = module

    def __call__(self, inputs):
        from .resnet import CHUNK_BYTES

        up = self.module
        b, c, t, h, w = inputs.shape
        conv = up.conv
        frame_bytes = b * conv.out_channels * 4 * h * w * inputs.element_size()
        if (weights.autograd_needed((inputs,), (up,)) or type(conv) is not torch.nn.Conv2d
                or len(upsample_sources(t, up.compress_time)) * frame_bytes <= CHUNK_BYTES):
            return type(up).forward(up, inputs)
        sources = upsample_sources(t, up.compress_time)
        out = None
        step = max(1, CHUNK_BYTES // frame_bytes)
        for s0 in range(0, t, step):
            s1 = min(t, s0 + step)
            x = inputs[:, :, s0:s1].transpose(1, 2).reshape(b * (s1 - s0), c, h, w)
            y = conv(torch.nn.functional.interpolate(x, scale_factor=2.0))
            del x
            y = y.view(b, s1 - s0, *y.shape[1:])
            if out is None:
                out = torch.empty((b, y.shape[2], len(sources), *y.shape[3:]), dtype=y.dtype, device=y.device)
            for i, s in enumerate(sources):
                if s0 <= s < s1:
                    out[:, :, i] = y[:, s - s0]
            del y
        return out
