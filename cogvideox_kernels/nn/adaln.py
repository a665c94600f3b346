"""Adaptive LayerNorms of CogVideoX, conditioned on the timestep embedding ``temb``.

``ExpertAdaLN`` is the per-modality ("expert") adaLN of every block half: one Linear on SiLU(temb)
gives six vectors, (shift, scale, gate) for video then for text (diffusers'
``CogVideoXLayerNormZero`` order), and one LayerNorm is shared by both modalities:
``h = LN(x) * (1 + scale_m) + shift_m`` before the sub-layer, ``x + gate_m * f(h)`` after it.
``AdaLayerNormOut`` is the final norm before the output projection (shift, scale only).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.expert_ffn.reference import (GATE_T, GATE_V, MODULATION_ROWS, SCALE_T, SCALE_V, SHIFT_T,
                                        SHIFT_V)
from ._checks import check_input


def _per_modality(x: torch.Tensor, text_len: int, text_op, video_op) -> torch.Tensor:
    # Tokens [0, text_len) are text, the rest video; each part gets its own vectors.
    return torch.cat((text_op(x[:, :text_len]), video_op(x[:, text_len:])), dim=1)


class ExpertAdaLN(nn.Module):
    """Linear(time_embed_dim -> 6 * hidden) on SiLU(temb) plus a shared LayerNorm(hidden, eps)."""

    def __init__(self, time_embed_dim: int, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(time_embed_dim, MODULATION_ROWS * hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=True)

    def modulation(self, temb: torch.Tensor) -> torch.Tensor:
        """[B, 6, hidden]: shift, scale, gate for video, then for text."""
        check_input("ExpertAdaLN", "temb", temb, self.linear.weight, ndim=2, width=self.linear.in_features,
                    width_name="time_embed_dim")
        return self.linear(F.silu(temb)).unflatten(-1, (MODULATION_ROWS, self.hidden_size))

    def modulate(self, x: torch.Tensor, modulation: torch.Tensor, text_len: int) -> torch.Tensor:
        """LN(x) * (1 + scale_m) + shift_m for x [B, S, hidden] whose first text_len tokens are text."""
        m = modulation[:, :, None, :]
        return _per_modality(
            self.norm(x), text_len,
            lambda t: t * (1 + m[:, SCALE_T]) + m[:, SHIFT_T],
            lambda v: v * (1 + m[:, SCALE_V]) + m[:, SHIFT_V])

    @staticmethod
    def gated_residual(x: torch.Tensor, update: torch.Tensor, modulation: torch.Tensor,
                       text_len: int) -> torch.Tensor:
        """x + gate_m * update."""
        m = modulation[:, :, None, :]
        gated = _per_modality(update, text_len, lambda t: t * m[:, GATE_T], lambda v: v * m[:, GATE_V])
        return x + gated

    def forward(self, x: torch.Tensor, temb: torch.Tensor, text_len: int):
        """(modulated x, modulation) so the caller can apply the gate after its sub-layer."""
        check_input("ExpertAdaLN", "x", x, self.norm.weight, ndim=3, width=self.hidden_size, width_name="hidden_size")
        modulation = self.modulation(temb)
        return self.modulate(x, modulation, text_len), modulation


class AdaLayerNormOut(nn.Module):
    """Final adaLN: LN(x) * (1 + scale) + shift with (shift, scale) = Linear(SiLU(temb)), in that order."""

    def __init__(self, time_embed_dim: int, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.linear = nn.Linear(time_embed_dim, 2 * hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        check_input("AdaLayerNormOut", "x", x, self.norm.weight, ndim=3, width=self.norm.normalized_shape[0],
                    width_name="hidden_size")
        check_input("AdaLayerNormOut", "temb", temb, self.linear.weight, ndim=2, width=self.linear.in_features,
                    width_name="time_embed_dim")
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale[:, None, :]) + shift[:, None, :]


__all__ = ["ExpertAdaLN", "AdaLayerNormOut"]
