"""``causal_conv3d``: causal temporal convolution with a streaming cache, [B, C, T, H, W]."""
from __future__ import annotations

from ..._backend import resolve_backend
from .reference import (PAD_MODES, causal_conv3d_bytes, causal_conv3d_flops, causal_conv3d_reference,
                        causal_pad_front, check_causal_conv_inputs)

KERNELS = ("cuda", "cpp")


def causal_conv3d(x, weight, bias=None, *, stride=1, pad_mode="replicate", cache=None, backend="auto"):
    """Causal conv over time (see ``reference.py``): returns ``(y, new_cache)``.

    backend: ``"auto"`` (CUDA kernel for GPU tensors, C++ path for CPU tensors, where built and
    supported, else the reference), ``"cuda"``, ``"cpp"``, ``"reference"``.
    """
    check_causal_conv_inputs(x, weight, bias, stride, pad_mode, cache)
    chosen = resolve_backend("causal_conv3d", backend, x.device, KERNELS)
    if chosen in ("cuda", "cpp"):
        from .native import causal_conv3d_native, native_supports

        if backend == "auto" and not native_supports(x, weight, stride):
            chosen = "reference"
        else:
            return causal_conv3d_native(x, weight, bias, stride=stride, pad_mode=pad_mode, cache=cache,
                                        backend=chosen)
    return causal_conv3d_reference(x, weight, bias, stride=stride, pad_mode=pad_mode, cache=cache)


__all__ = ["causal_conv3d", "causal_conv3d_reference", "check_causal_conv_inputs", "causal_pad_front",
           "causal_conv3d_bytes", "causal_conv3d_flops", "PAD_MODES"]
