"""``causal_conv3d``: causal temporal convolution with a streaming cache, [B, C, T, H, W]."""
from __future__ import annotations

from .. import registry
from .reference import (PAD_MODES, causal_conv3d_bytes, causal_conv3d_flops, causal_conv3d_reference,
                        causal_pad_front, check_causal_conv_inputs)


registry.register_op("causal_conv3d", reference=causal_conv3d_reference, check=check_causal_conv_inputs,
                     device_arg="x")
registry.register_backend("causal_conv3d", "cuda", run="cogvideox_kernels.ops.causal_conv.native:causal_conv3d_cuda",
                          supports="cogvideox_kernels.ops.causal_conv.native:cuda_supports",
                          layout={"*": registry.CONTIGUOUS},
                          available=registry.extension_cuda)
registry.register_backend("causal_conv3d", "cpp", run="cogvideox_kernels.ops.causal_conv.native:causal_conv3d_cpp",
                          supports="cogvideox_kernels.ops.causal_conv.native:cpp_supports",
                          layout={"*": registry.CONTIGUOUS},
                          available=registry.extension_cpp)


def causal_conv3d(x, weight, bias=None, *, stride=1, pad_mode="replicate", cache=None, backend="auto"):
    """Causal conv over time (see ``reference.py``): returns ``(y, new_cache)``.

    backend: ``"auto"`` (the CUDA kernel for GPU tensors, the C++ path for CPU tensors, where built
    and supported, else the reference), ``"cuda"``, ``"cpp"``, ``"reference"``.
    """
    return registry.dispatch("causal_conv3d", backend, x=x, weight=weight, bias=bias, stride=stride,
                             pad_mode=pad_mode, cache=cache)


__all__ = ["causal_conv3d", "causal_conv3d_reference", "check_causal_conv_inputs", "causal_pad_front",
           "causal_conv3d_bytes", "causal_conv3d_flops", "PAD_MODES"]
