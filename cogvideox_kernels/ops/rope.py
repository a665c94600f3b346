"""3D rotary position embedding tables (the layout of real CogVideoX-5B).

head_dim D splits into t | h | w parts of D/4, 3D/8, 3D/8 dims (each rounded down to an even
number; leftover dims are not rotated: cos 1, sin 0). Pairs (2i, 2i+1) rotate together, so each
frequency appears twice in a row of the table.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_int


class RopeTables(NamedTuple):
    """The two RoPE tables, ``[N, head_dim]`` float32 each. Positionally ``(sin, cos)``, as the seed's
    ``rope3d_freqs`` API returns them; read them by name (``tables.cos``, ``tables.sin``): the op and
    diffusers take them the other way round."""
    sin: torch.Tensor
    cos: torch.Tensor


def rope3d_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Rotated dims per axis (t, h, w) for a head of ``head_dim``."""
    even = lambda n: n - (n % 2)  # noqa: E731
    return even(head_dim // 4), even(3 * head_dim // 8), even(3 * head_dim // 8)


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    # [P, dim]: angle pos * theta^(-2j/dim) for j < dim/2, each repeated for the pair.
    j = torch.arange(dim // 2, dtype=torch.float64)
    inv_freq = 1.0 / (theta ** (2.0 * j / dim))
    return torch.outer(positions.to(torch.float64), inv_freq).repeat_interleave(2, dim=1)


def rope3d_angles(time_dim: int, height_dim: int, width_dim: int, head_dim: int, theta: float = 10000.0):
    """float64 angles [T*H*W, head_dim] (0 in the unrotated dims), token order (t, h, w)."""
    d_t, d_h, d_w = rope3d_axis_dims(head_dim)
    t = _axis_angles(torch.arange(time_dim), d_t, theta)
    h = _axis_angles(torch.arange(height_dim), d_h, theta)
    w = _axis_angles(torch.arange(width_dim), d_w, theta)
    n = time_dim * height_dim * width_dim
    angles = torch.zeros(time_dim, height_dim, width_dim, head_dim, dtype=torch.float64)
    angles[..., :d_t] = t[:, None, None, :]
    angles[..., d_t:d_t + d_h] = h[None, :, None, :]
    angles[..., d_t + d_h:d_t + d_h + d_w] = w[None, None, :, :]
    return angles.reshape(n, head_dim)


def rope3d_freqs(time_dim: int, height_dim: int, width_dim: int, *, hidden_size: int, num_heads: int,
                 theta: float = 10000.0, device=None) -> RopeTables:
    """``RopeTables(sin, cos)``, each ``[time_dim*height_dim*width_dim, head_dim]`` float32.

    ``time_dim``/``height_dim``/``width_dim`` are the latent grid after patchify (frames, rows,
    columns of patches); ``head_dim = hidden_size // num_heads``.
    """
    for name, v in (("time_dim", time_dim), ("height_dim", height_dim), ("width_dim", width_dim),
                    ("num_heads", num_heads), ("hidden_size", hidden_size)):
        check_int(name, v, 1)
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    head_dim = hidden_size // num_heads
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} (hidden_size // num_heads) must be even for RoPE")
    if not theta > 0:
        raise ValueError(f"theta={theta} must be > 0")
    angles = rope3d_angles(time_dim, height_dim, width_dim, head_dim, theta)
    sin, cos = angles.sin().float(), angles.cos().float()
    if device is not None:
        sin, cos = sin.to(device), cos.to(device)
    return RopeTables(sin=sin, cos=cos)
