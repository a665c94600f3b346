"""``CausalConv3d``: the causal temporal convolution as a module (parameters + one op call).

The weight is ``[C_out, C_in, kt, kh, kw]`` (kh = kw = 1 for the VAE's temporal convs), the same
tensor whatever the backend, so the state_dict never depends on ``backend``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import causal_conv3d
from ..ops.causal_conv import PAD_MODES
from ._checks import check_input
from ._switch import BackendSwitch


def _kernel_size(kernel_size) -> tuple[int, int, int]:
    size = (kernel_size, 1, 1) if isinstance(kernel_size, int) else tuple(kernel_size)
    if (len(size) != 3 or any(isinstance(k, bool) or not isinstance(k, int) for k in size)
            or size[0] < 1 or size[1] < 1 or size[2] < 1 or size[1] % 2 == 0 or size[2] % 2 == 0):
        raise ValueError(f"kernel_size={kernel_size!r} is not supported; give kt (an int >= 1, "
                         "spatial 1x1) or (kt, kh, kw) with kt >= 1 and odd kh, kw")
    return size


class CausalConv3d(BackendSwitch, nn.Module):
    """Conv over [B, C, T, H, W] whose output frame t sees input frames <= t * stride only.

    ``forward(x, cache=None) -> (y, new_cache)``: with ``cache=None`` the kt-1 frames before frame 0
    are copies of frame 0 (``pad_mode="replicate"``) or zeros; passing the previous chunk's
    ``new_cache`` continues a clip chunk by chunk (every chunk but the last a multiple of ``stride``).
    ``backend``: ``"auto"`` | ``"reference"`` | a kernel of ``causal_conv3d`` (``"cuda"``, ``"cpp"``); may
    be changed at any time.
    """

    OPS = ("causal_conv3d",)

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, *, stride: int = 1,
                 pad_mode: str = "replicate", bias: bool = True, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not supported; it must be an int >= 1")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode={pad_mode!r} is not supported; choose one of {PAD_MODES}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _kernel_size(kernel_size)
        self.stride, self.pad_mode = stride, pad_mode
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The same uniform(+-1/sqrt(fan_in)) init as torch.nn.Conv3d.
        fan_in = self.in_channels * math.prod(self.kernel_size)
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        check_input("CausalConv3d", "x", x, self.weight, ndim=5)
        return causal_conv3d(x, self.weight, self.bias, stride=self.stride, pad_mode=self.pad_mode,
                             cache=cache, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, pad_mode={self.pad_mode!r}, backend={self.backend!r}")
