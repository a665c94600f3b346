"""Input embeddings of the CogVideoX transformer: latent patches, the diffusion timestep and the
3D sin-cos absolute positions (used instead of RoPE by CogVideoX-2B)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_input

# CogVideoX-2B compresses spatial positions by this factor in its sin-cos table (temporal: 1).
SPATIAL_INTERPOLATION_SCALE = 1.875
TEMPORAL_INTERPOLATION_SCALE = 1.0


def timestep_sinusoid(timesteps: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True,
                      freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps -> [B, dim] float32: (cos | sin) of t * max_period^(-j / (dim/2 - freq_shift)),
    j < dim/2 (sin first when ``flip_sin_to_cos`` is False); an odd ``dim`` gets a zero last column."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - freq_shift)
    angles = timesteps.float()[:, None] * torch.exp(-math.log(max_period) * exponent)[None, :]
    parts = (angles.cos(), angles.sin()) if flip_sin_to_cos else (angles.sin(), angles.cos())
    return F.pad(torch.cat(parts, dim=-1), (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """Sinusoid of width ``sinusoid_dim`` -> Linear -> SiLU -> Linear, to ``time_embed_dim``."""

    def __init__(self, sinusoid_dim: int, time_embed_dim: int):
        super().__init__()
        self.sinusoid_dim = sinusoid_dim
        self.linear_1 = nn.Linear(sinusoid_dim, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        sinusoid = timestep_sinusoid(timesteps, self.sinusoid_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(sinusoid)))


class PatchEmbed3D(nn.Module):
    """Latents [B, T, C, H, W] -> tokens [B, T/pt * H/ph * W/pw, hidden] in (t, h, w) order, and back.

    One Linear over each patch's values flattened in (C, pt, ph, pw) order; with pt = 1 this is
    the Conv2d patchifier of CogVideoX 1.0, with pt > 1 the frame grouping of CogVideoX 1.5.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = tuple(patch_size)
        pt, ph, pw = self.patch_size
        self.proj = nn.Linear(in_channels * pt * ph * pw, hidden_size)

    def grid(self, latent_shape) -> tuple[int, int, int]:
        """Token grid (frames, rows, columns) of latents of shape [B, T, C, H, W]; refuses a size that
        the patch does not divide (CogVideoX 1.5 pads the latent frames to a multiple of pt first)."""
        _, T, _, H, W = latent_shape
        for name, size, p in (("frames T", T, self.patch_size[0]), ("height H", H, self.patch_size[1]),
                              ("width W", W, self.patch_size[2])):
            if size % p:
                raise ValueError(f"latents {name}={size} is not a multiple of the patch size {p} "
                                 f"(patch_size={self.patch_size})")
        pt, ph, pw = self.patch_size
        return T // pt, H // ph, W // pw

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, T, C, H, W] -> [B, N, C*pt*ph*pw] patch vectors."""
        B, _, C, _, _ = latents.shape
        t, h, w = self.grid(latents.shape)
        pt, ph, pw = self.patch_size
        x = latents.reshape(B, t, pt, C, h, ph, w, pw)
        return x.permute(0, 1, 4, 6, 3, 2, 5, 7).reshape(B, t * h * w, C * pt * ph * pw)

    def unpatchify(self, patches: torch.Tensor, grid: tuple[int, int, int], channels: int) -> torch.Tensor:
        """[B, N, channels*pt*ph*pw] -> [B, T, channels, H, W] (the inverse of ``patchify``)."""
        B = patches.shape[0]
        t, h, w = grid
        pt, ph, pw = self.patch_size
        x = patches.reshape(B, t, h, w, channels, pt, ph, pw)
        return x.permute(0, 1, 5, 4, 2, 6, 3, 7).reshape(B, t * pt, channels, h * ph, w * pw)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        check_input("PatchEmbed3D", "latents", latents, self.proj.weight, ndim=5)
        if latents.shape[2] != self.in_channels:
            raise ValueError(f"PatchEmbed3D: latents have C={latents.shape[2]} (dim 2 of [B, T, C, H, W]); "
                             f"in_channels={self.in_channels}")
        return self.proj(self.patchify(latents))


def _sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    # [P, dim]: (sin | cos) of pos / 10000^(j / (dim/2)), j < dim/2, in float64.
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = torch.outer(positions.to(torch.float64), omega)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def sincos_pos_embed_3d(frames: int, rows: int, cols: int, hidden_size: int, *,
                        spatial_interpolation_scale: float = SPATIAL_INTERPOLATION_SCALE,
                        temporal_interpolation_scale: float = TEMPORAL_INTERPOLATION_SCALE) -> torch.Tensor:
    """[frames*rows*cols, hidden] float32 absolute position table in (t, h, w) token order.

    Layout of CogVideoX-2B: hidden/4 dims encode the frame, then 3*hidden/8 the column, then
    3*hidden/8 the row, each a 1D (sin | cos) table; positions are divided by the interpolation
    scales. ``hidden_size`` must be a multiple of 16 so every part has an even width.
    """
    if hidden_size % 16:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of 16 for the 3D sin-cos "
                         "position embedding (use_rope=False)")
    d_t, d_s = hidden_size // 4, 3 * hidden_size // 8
    t = _sincos_1d(torch.arange(frames) / temporal_interpolation_scale, d_t)
    h = _sincos_1d(torch.arange(rows) / spatial_interpolation_scale, d_s)
    w = _sincos_1d(torch.arange(cols) / spatial_interpolation_scale, d_s)
    table = torch.cat((t[:, None, None, :].expand(frames, rows, cols, d_t),
                       w[None, None, :, :].expand(frames, rows, cols, d_s),
                       h[None, :, None, :].expand(frames, rows, cols, d_s)), dim=-1)
    return table.reshape(frames * rows * cols, hidden_size).float()


__all__ = ["timestep_sinusoid", "TimestepEmbedding", "PatchEmbed3D", "sincos_pos_embed_3d",
           "SPATIAL_INTERPOLATION_SCALE", "TEMPORAL_INTERPOLATION_SCALE"]
