"""``rope3d_attention``: QK-norm + RoPE3D on video tokens + softmax attention, [B, S, H, D] in and out."""
from __future__ import annotations

from .. import registry
from . import hopper as _hopper
from .reference import (apply_rope_interleaved, attention_flops, check_attention_inputs,
                        rope3d_attention_reference)

registry.register_op("rope3d_attention", reference=rope3d_attention_reference, check=check_attention_inputs,
                     device_arg="q")
registry.register_backend(
    "rope3d_attention", "triton",
    run="cogvideox_kernels.ops.attention.triton_fwd:rope3d_attention_triton",
    supports="cogvideox_kernels.ops.attention.triton_fwd:supports",
    available=registry.triton_device, auto_devices=("cuda",),
    # q, k, v are read through their strides; the small tables and norm vectors as packed rows
    layout={"q": registry.UNIT_LAST_STRIDE, "k": registry.UNIT_LAST_STRIDE, "v": registry.UNIT_LAST_STRIDE,
            "*": registry.CONTIGUOUS})

# The Hopper (sm_90a) Gluon kernel: auto tries it first where it runs (measured faster than the
# Triton kernel on the H200 at the 5B and 1.5-5B shapes; benchmarks/results/hopper_attention_notes.md).
registry.register_backend(
    "rope3d_attention", "hopper",
    run="cogvideox_kernels.ops.attention.hopper:rope3d_attention_hopper",
    supports="cogvideox_kernels.ops.attention.hopper:supports",
    available=_hopper.available, auto_devices=("cuda",),
    layout={"q": registry.UNIT_LAST_STRIDE, "k": registry.UNIT_LAST_STRIDE, "v": registry.UNIT_LAST_STRIDE,
            "*": registry.CONTIGUOUS},
    before="triton")


def rope3d_attention(q, k, v, *, text_len, cos=None, sin=None, q_norm=None, k_norm=None,
                     eps=1e-6, scale=None, precision="bf16", backend="auto"):
    """Attention over ``[text ; video]`` tokens with optional per-head LayerNorm on q and k and
    interleaved 3D RoPE on the video tokens (index >= ``text_len``).

    q, k, v: ``[B, S, H, D]``, fp16/bf16/fp32/fp64, any strides (a kernel gets copies of what it
    cannot read in place).
    cos, sin: ``[S - text_len, D]`` float32 tables (see ``rope3d_freqs``) or None for no rotation.
    q_norm, k_norm: ``(weight, bias)`` of shape ``[D]`` or None. Returns ``[B, S, H, D]``.
    backend: ``"auto"`` (a kernel where one runs and supports the inputs, else the reference),
    ``"reference"`` or a kernel (``registry.kernels("rope3d_attention")``: ``"hopper"`` on sm_90, ``"triton"``).
    precision: ``"bf16"`` (default: exact attention in the inputs' dtype) or ``"int8"`` (opt-in:
    smoothed INT8 Q K^T and FP8 P V, SageAttention2-style; the ``hopper`` kernel runs it, the
    reference emulates it in float32; error figures in benchmarks/results/int8_attention_notes.md).
    """
    return registry.dispatch("rope3d_attention", backend, q=q, k=k, v=v, text_len=text_len, cos=cos, sin=sin,
                             q_norm=q_norm, k_norm=k_norm, eps=eps, scale=scale, precision=precision)


__all__ = ["rope3d_attention", "rope3d_attention_reference", "apply_rope_interleaved",
           "attention_flops", "check_attention_inputs"]
