"""Self-attention of a CogVideoX block: fused QKV projection, QK-norm, 3D RoPE on the video tokens,
softmax attention and the output projection. Everything between the two projections is one call
of ``ops.rope3d_attention``."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.attention import rope3d_attention
from ._checks import check_input
from ._switch import BackendSwitch


class RoPE3DAttention(BackendSwitch, nn.Module):
    """Multi-head self-attention over ``[text ; video]`` tokens.

    ``qkv``: Linear(hidden -> 3 * hidden) whose output is viewed as [B, S, 3, heads, head_dim], so q,
    k and v reach the op as strided views (no copies). ``norm_q``/``norm_k``: per-head LayerNorm over
    head_dim (eps 1e-6) when ``qk_norm``. ``to_out``: Linear(hidden -> hidden).
    """

    OPS = ("rope3d_attention",)

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6,
                 bias: bool = True, backend: str = "auto"):
        super().__init__()
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be a positive multiple of num_heads={num_heads}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.eps = eps
        self.backend = backend
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)
        self.norm_q = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else None
        self.norm_k = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else None
        self.to_out = nn.Linear(hidden_size, hidden_size)

    @staticmethod
    def _norm_params(norm):
        return None if norm is None else (norm.weight, norm.bias)

    def forward(self, x: torch.Tensor, text_len: int, rope=None) -> torch.Tensor:
        """x [B, S, hidden] (first ``text_len`` tokens text); rope = (cos, sin) [S - text_len, head_dim]
        float32 tables or None. Returns [B, S, hidden]."""
        check_input("RoPE3DAttention", "x", x, self.qkv.weight, ndim=3, width=self.hidden_size,
                    width_name="hidden_size")
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).unbind(2)
        if rope is not None and (not isinstance(rope, (tuple, list)) or len(rope) != 2):
            raise ValueError("rope must be a (cos, sin) pair of [S - text_len, head_dim] tables or None, "
                             f"got {type(rope).__name__}")
        cos, sin = (None, None) if rope is None else rope
        out = rope3d_attention(q, k, v, text_len=text_len, cos=cos, sin=sin,
                               q_norm=self._norm_params(self.norm_q), k_norm=self._norm_params(self.norm_k),
                               eps=self.eps, backend=self.backend)
        return self.to_out(out.reshape(B, S, self.hidden_size))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"


__all__ = ["RoPE3DAttention"]
