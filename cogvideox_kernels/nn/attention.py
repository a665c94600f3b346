"""Self-attention of a CogVideoX block: fused QKV projection, QK-norm, 3D RoPE on the video tokens,
softmax attention and the output projection. Everything between the two projections is one call of
an attention function: ``ops.rope3d_attention`` by default, or one the module is given (context
parallelism hands in its Ulysses attention, see ``cogvideox_kernels.parallel``)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..ops.attention import rope3d_attention
from ..ops.rope import RopeTables
from ._checks import check_input
from ._switch import BackendSwitch


def rope_pair(rope) -> tuple:
    """``(cos, sin)`` of ``rope``: ``RopeTables`` (read by name), a plain ``(cos, sin)`` pair (diffusers'
    order) or None (no rotation)."""
    if rope is None:
        return None, None
    if isinstance(rope, RopeTables):
        return rope.cos, rope.sin
    if isinstance(rope, (tuple, list)) and len(rope) == 2:
        return rope[0], rope[1]
    raise ValueError("rope must be RopeTables, a (cos, sin) pair of [S - text_len, head_dim] tables or None, "
                     f"got {type(rope).__name__}")


def qkv_attention(x: torch.Tensor, qkv: Callable, to_out: Callable, num_heads: int, attention: Callable,
                  **attention_kwargs) -> torch.Tensor:
    """The step every attention path shares: project, view the heads, attend, project back.

    x ``[B, S, hidden]``. ``qkv(x)``: the fused projection ``[B, S, 3 * hidden]`` (q, k, v then reach
    ``attention`` as strided views, no copies) or a ``(q, k, v)`` tuple of ``[B, S, hidden]``.
    ``attention(q, k, v, **attention_kwargs)``: ``[B, S, H, D]`` in, ``[B, S, H, D]`` out (e.g.
    ``ops.rope3d_attention``). ``to_out``: ``[B, S, hidden]`` -> the result.
    """
    projected = qkv(x)
    if isinstance(projected, torch.Tensor):
        q, k, v = projected.unflatten(-1, (3, num_heads, -1)).unbind(2)
    else:
        q, k, v = (t.unflatten(-1, (num_heads, -1)) for t in projected)
    return to_out(attention(q, k, v, **attention_kwargs).flatten(2))


class RoPE3DAttention(BackendSwitch, nn.Module):
    """Multi-head self-attention over ``[text ; video]`` tokens.

    ``qkv``: Linear(hidden -> 3 * hidden) whose output is viewed as [B, S, 3, heads, head_dim], so q,
    k and v reach the op as strided views (no copies). ``norm_q``/``norm_k``: per-head LayerNorm over
    head_dim (eps 1e-6) when ``qk_norm``. ``to_out``: Linear(hidden -> hidden). ``attention``: the
    function between the projections, with ``ops.rope3d_attention``'s arguments (the default); it may
    be replaced at any time (``module.attention = ...``) without touching parameters or forward.
    """

    OPS = ("rope3d_attention",)

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6,
                 bias: bool = True, backend: str = "auto", attention: Callable | None = None):
        super().__init__()
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be a positive multiple of num_heads={num_heads}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.eps = eps
        self.backend = backend
        self.attention = rope3d_attention if attention is None else attention
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)
        self.norm_q = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else None
        self.norm_k = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else None
        self.to_out = nn.Linear(hidden_size, hidden_size)

    @staticmethod
    def _norm_params(norm):
        return None if norm is None else (norm.weight, norm.bias)

    def forward(self, x: torch.Tensor, text_len: int, rope=None) -> torch.Tensor:
        """x [B, S, hidden] (first ``text_len`` tokens text); rope: ``RopeTables`` or a (cos, sin) pair
        of [S - text_len, head_dim] float32 tables, or None. Returns [B, S, hidden]."""
        check_input("RoPE3DAttention", "x", x, self.qkv.weight, ndim=3, width=self.hidden_size,
                    width_name="hidden_size")
        cos, sin = rope_pair(rope)
        return qkv_attention(x, self.qkv, self.to_out, self.num_heads, self.attention, text_len=text_len, cos=cos,
                             sin=sin, q_norm=self._norm_params(self.norm_q), k_norm=self._norm_params(self.norm_k),
                             eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"


__all__ = ["RoPE3DAttention", "qkv_attention", "rope_pair"]
