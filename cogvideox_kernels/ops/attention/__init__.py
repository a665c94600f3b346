"""``rope3d_attention``: QK-norm + RoPE3D on video tokens + softmax attention, [B, S, H, D] in and out."""
from __future__ import annotations

from ..._backend import resolve_backend
from .reference import (apply_rope_interleaved, attention_flops, check_attention_inputs,
                        rope3d_attention_reference)

KERNELS = ("triton",)


def rope3d_attention(q, k, v, *, text_len, cos=None, sin=None, q_norm=None, k_norm=None,
                     eps=1e-6, scale=None, backend="auto"):
    """Attention over ``[text ; video]`` tokens with optional per-head LayerNorm on q and k and
    interleaved 3D RoPE on the video tokens (index >= ``text_len``).

    q, k, v: ``[B, S, H, D]`` (strided views allowed, last dim contiguous), fp16/bf16/fp32.
    cos, sin: ``[S - text_len, D]`` float32 tables (see ``rope3d_freqs``) or None for no rotation.
    q_norm, k_norm: ``(weight, bias)`` of shape ``[D]`` or None. Returns ``[B, S, H, D]``.
    backend: ``"auto"`` (Triton on a supported GPU, else the reference), ``"triton"``, ``"reference"``.
    """
    check_attention_inputs(q, k, v, text_len, cos, sin, q_norm, k_norm, eps, scale)
    chosen = resolve_backend("rope3d_attention", backend, q.device, KERNELS)
    if chosen == "triton":
        from .triton_fwd import rope3d_attention_triton

        return rope3d_attention_triton(q, k, v, text_len=text_len, cos=cos, sin=sin, q_norm=q_norm,
                                       k_norm=k_norm, eps=eps, scale=scale)
    return rope3d_attention_reference(q, k, v, text_len=text_len, cos=cos, sin=sin, q_norm=q_norm,
                                      k_norm=k_norm, eps=eps, scale=scale)


__all__ = ["rope3d_attention", "rope3d_attention_reference", "apply_rope_interleaved",
           "attention_flops", "check_attention_inputs"]
