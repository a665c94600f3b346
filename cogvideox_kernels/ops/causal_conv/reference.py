"""Plain-PyTorch reference of the causal temporal convolution, and its input checks.

Input ``[B, C, T, H, W]``, weight ``[C_out, C_in, kt, kh, kw]`` (kh, kw odd), temporal stride st.
The kt-1 frames before frame 0 are copies of frame 0 (``pad_mode="replicate"``), zeros
(``"zeros"``), or the ``cache`` of the previous chunk. Spatial padding is zero, (kh//2, kw//2).
Output frames: (T - 1) // st + 1. Also returns the new cache: the last kt-1 frames of the padded
input. Streaming a clip in chunks with the cache equals one pass when every chunk but the last
has a length divisible by st.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import FLOAT_DTYPES, check_conv_weight, check_int, check_shape, check_tensor

PAD_MODES = ("replicate", "zeros")


def check_causal_conv_inputs(x, weight, bias, stride, pad_mode, cache):
    check_tensor("x", x, ndim=5, dtypes=FLOAT_DTYPES + (torch.float64,))
    device = x.device
    B, C, T, H, W = x.shape
    if min(B, C, T, H, W) == 0:
        raise ValueError(f"x has an empty dimension: shape {tuple(x.shape)} [B, C, T, H, W]")
    C_out, kt, kh, kw = check_conv_weight(weight, x)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=device)
        check_shape("bias", bias, (C_out,))
        if bias.dtype != x.dtype:
            raise ValueError(f"bias has dtype {bias.dtype} but x has {x.dtype}; they must match")
    check_int("stride", stride, 1)
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode={pad_mode!r} is not supported; choose one of {PAD_MODES}")
    if cache is not None:
        check_tensor("cache", cache, ndim=5, device=device)
        check_shape("cache", cache, (B, C, kt - 1, H, W))
        if cache.dtype != x.dtype:
            raise ValueError(f"cache has dtype {cache.dtype} but x has {x.dtype}; they must match")


def causal_pad_front(x, kt, pad_mode, cache):
    """The kt-1 frames that precede frame 0: the cache, copies of frame 0, or zeros."""
    if cache is not None:
        return cache
    if pad_mode == "replicate":
        return x[:, :, :1].expand(-1, -1, kt - 1, -1, -1)
    return x.new_zeros(x.shape[0], x.shape[1], kt - 1, x.shape[3], x.shape[4])


def causal_conv3d_reference(x, weight, bias=None, *, stride=1, pad_mode="replicate", cache=None,
                            compute_dtype=None):
    """Explicit pad + ``F.conv3d``, in float32 for half inputs (``compute_dtype`` overrides).

    Returns ``(y [B, C_out, (T-1)//stride + 1, H, W], new_cache [B, C, kt-1, H, W])`` in x's dtype.
    """
    kt, kh, kw = weight.shape[2:]
    work = compute_dtype or (x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
    padded = torch.cat((causal_pad_front(x, kt, pad_mode, cache), x), dim=2)
    y = F.conv3d(padded.to(work), weight.to(work), None if bias is None else bias.to(work),
                 stride=(stride, 1, 1), padding=(0, kh // 2, kw // 2))
    new_cache = padded[:, :, padded.shape[2] - (kt - 1):].contiguous()
    return y.to(x.dtype), new_cache


def causal_conv3d_bytes(x, weight, y) -> int:
    """Bytes a kernel must move at least: input, weight and output once each."""
    return (x.numel() + weight.numel() + y.numel()) * x.element_size()


def causal_conv3d_flops(weight, y) -> float:
    C_out, C_in, kt, kh, kw = weight.shape
    return 2.0 * y.numel() * C_in * kt * kh * kw
