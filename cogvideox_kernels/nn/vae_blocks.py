"""Building blocks of the causal 3D VAE. Tensors are ``[B, C, T, H, W]`` throughout.

Causality rule: every block is either per frame (GroupNorm statistics, spatial convs, nearest
upsampling) or a ``CausalConv3d`` over time, so output frame t never depends on a later frame.
That is also what makes streaming exact: a clip can run in frame chunks when each causal conv
carries its cache from one chunk to the next in a ``StreamCache``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_input
from .causal_conv import CausalConv3d

MAX_GROUPS = 32


class StreamCache:
    """What one clip carries from a frame chunk to the next; make a fresh one per clip.

    ``conv``: the ``new_cache`` of every causal conv, keyed by the module.
    ``started``: the temporal upsamplers that have already seen the clip's first frame.
    """

    def __init__(self):
        self.conv: dict[nn.Module, torch.Tensor] = {}
        self.started: set[nn.Module] = set()


def run_causal(conv: CausalConv3d, x: torch.Tensor, stream: StreamCache | None) -> torch.Tensor:
    """Apply a causal conv, continuing from (and updating) its cache when streaming."""
    if stream is None:
        return conv(x)[0]
    y, stream.conv[conv] = conv(x, stream.conv.get(conv))
    return y


def group_count(channels: int) -> int:
    """GroupNorm groups: gcd(32, channels): 32 for the real widths (128, 256, 512); for small or odd
    widths the largest power of two <= 32 that divides them (8 channels -> 8 groups of 1)."""
    return math.gcd(MAX_GROUPS, channels)


def frame_group_norm(x, weight, bias, num_groups: int, eps: float):
    """GroupNorm with statistics per frame: over a group's channels and the H, W of one frame.

    Equals ``F.group_norm`` on the frames folded into the batch, without moving T next to B.
    Statistics in float32 for half inputs.
    """
    B, C, T, H, W = x.shape
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    groups = work.reshape(B, num_groups, C // num_groups, T, H * W)
    var, mean = torch.var_mean(groups, dim=(2, 4), correction=0, keepdim=True)
    y = ((groups - mean) * torch.rsqrt(var + eps)).reshape(B, C, T, H, W)
    y = y * weight.to(y.dtype).view(1, C, 1, 1, 1) + bias.to(y.dtype).view(1, C, 1, 1, 1)
    return y.to(x.dtype)


class FrameGroupNorm(nn.Module):
    """Per-frame GroupNorm (keeps the VAE causal); groups by ``group_count``."""

    def __init__(self, channels: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.num_groups, self.eps = group_count(channels), eps
        self.weight = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))

    def forward(self, x):
        check_input("FrameGroupNorm", "x", x, self.weight, ndim=5)
        return frame_group_norm(x, self.weight, self.bias, self.num_groups, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, groups={self.num_groups}, eps={self.eps}"


class FrameConv2d(nn.Conv2d):
    """A 2D conv applied to every frame (zero padding k//2, optional spatial stride).

    Parameters are those of ``nn.Conv2d``; it runs as a conv3d with a (1, k, k) kernel so frames
    never have to be folded into the batch (the same result as Conv2d on [B*T, C, H, W]).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                         device=device, dtype=dtype)

    def forward(self, x):
        check_input("FrameConv2d", "x", x, self.weight, ndim=5)
        k, s = self.kernel_size[0], self.stride[0]
        return F.conv3d(x, self.weight.unsqueeze(2), self.bias, stride=(1, s, s), padding=(0, k // 2, k // 2))


class FactorizedConv3d(nn.Module):
    """A 3x3x3 conv factorized: spatial 3x3 per frame, then a causal (kt, 1, 1) temporal conv."""

    def __init__(self, in_channels: int, out_channels: int, *, temporal_kernel: int = 3,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.spatial = FrameConv2d(in_channels, out_channels, 3, device=device, dtype=dtype)
        self.temporal = CausalConv3d(out_channels, out_channels, temporal_kernel, backend=backend,
                                     device=device, dtype=dtype)

    def forward(self, x, stream: StreamCache | None = None):
        return run_causal(self.temporal, self.spatial(x), stream)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))); a per-frame 1x1 conv on x when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, *, backend: str = "auto", device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm1 = FrameGroupNorm(in_channels, **factory)
        self.conv1 = FactorizedConv3d(in_channels, out_channels, backend=backend, **factory)
        self.norm2 = FrameGroupNorm(out_channels, **factory)
        self.conv2 = FactorizedConv3d(out_channels, out_channels, backend=backend, **factory)
        self.shortcut = (FrameConv2d(in_channels, out_channels, 1, **factory)
                         if in_channels != out_channels else nn.Identity())

    def forward(self, x, stream: StreamCache | None = None):
        h = self.conv1(F.silu(self.norm1(x)), stream)
        h = self.conv2(F.silu(self.norm2(h)), stream)
        return self.shortcut(x) + h


class SpatialDownsample(nn.Module):
    """H, W -> H/2, W/2 by a stride-2 3x3 conv on every frame."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, 3, stride=2, device=device, dtype=dtype)

    def forward(self, x, stream: StreamCache | None = None):
        return self.conv(x)


class TemporalDownsample(nn.Module):
    """T -> (T-1)/2 + 1 by a stride-2 causal temporal conv (kt = 3, frame 0 replicated)."""

    def __init__(self, channels: int, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=2, backend=backend, device=device,
                                 dtype=dtype)

    def forward(self, x, stream: StreamCache | None = None):
        return run_causal(self.conv, x, stream)


class SpatialUpsample(nn.Module):
    """H, W -> 2H, 2W: nearest-neighbour repetition, then a 3x3 conv on every frame."""

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, 3, device=device, dtype=dtype)

    def forward(self, x, stream: StreamCache | None = None):
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))


def repeat_frames(x, *, first_chunk: bool = True):
    """Frame 0 once, every later frame twice: T -> 2T - 1. A later chunk of a stream does not hold
    frame 0, so all its frames repeat: T -> 2T. One gather, so the result is contiguous."""
    source = torch.arange(2 * x.shape[2], device=x.device) // 2
    return x.index_select(2, source[1:] if first_chunk else source)


class TemporalUpsample(nn.Module):
    """T -> 2T - 1 (the inverse of ``TemporalDownsample``'s frame count): frame repetition, then a
    causal temporal conv (kt = 3)."""

    def __init__(self, channels: int, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, backend=backend, device=device, dtype=dtype)

    def forward(self, x, stream: StreamCache | None = None):
        first_chunk = stream is None or self not in stream.started
        if stream is not None:
            stream.started.add(self)
        return run_causal(self.conv, repeat_frames(x, first_chunk=first_chunk), stream)
