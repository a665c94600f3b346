"""``expert_ffn``: expert adaLN (LayerNorm + per-modality modulate) + FFN experts + gate + residual."""
from __future__ import annotations

from .. import registry
from .reference import (PRECISIONS, check_expert_ffn_inputs, expert_assignment, expert_ffn_flops,
                        expert_ffn_reference, modulated_norm_reference)

registry.register_op("expert_ffn", reference=expert_ffn_reference, check=check_expert_ffn_inputs, device_arg="x")
registry.register_backend(
    "expert_ffn", "triton",
    run="cogvideox_kernels.ops.expert_ffn.triton_fwd:expert_ffn_triton",
    supports="cogvideox_kernels.ops.expert_ffn.triton_fwd:supports",
    available=registry.triton_device, auto_devices=("cuda",), layout={"*": registry.CONTIGUOUS})


def expert_ffn(x, modulation, w1, b1, w2, b2, *, text_len, norm_weight=None, norm_bias=None, eps=1e-5,
               num_text_experts=0, text_router=None, video_router=None, precision="bf16", backend="auto"):
    """The FFN half of a CogVideoX block: returns ``x + gate_m * f(LN(x) * (1 + scale_m) + shift_m)``.

    x: ``[B, S, hidden]`` with the first ``text_len`` tokens text. modulation: ``[B, 6, hidden]``
    (shift, scale, gate for video, then for text). w1 ``[E, inner, hidden]``, b1 ``[E, inner]``,
    w2 ``[E, hidden, inner]``, b2 ``[E, hidden]`` (b1/b2 may be None). ``num_text_experts=0``: one
    FFN shared by text and video (E = 1); else the first ``num_text_experts`` experts serve text,
    the rest video, with a top-1 router ``(weight, bias)`` for a modality that has several.
    See ``reference.py`` for the exact maths. precision: ``"bf16"`` (default: the exact path in x's
    dtype) or ``"fp8"`` (both GEMMs in e4m3 with per-token activation scales and per-output-channel
    weight scales, the weights quantized once per version; see ``fp8.py``; lossy, opt-in) or ``"int8"``
    (the same with int8 operands and int32 sums, ``int8.py``). backend: ``"auto"``, ``"reference"`` or a kernel
    (``registry.kernels("expert_ffn")``: ``"triton"``).
    """
    return registry.dispatch("expert_ffn", backend, x=x, modulation=modulation, w1=w1, b1=b1, w2=w2, b2=b2,
                             text_len=text_len, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps,
                             num_text_experts=num_text_experts, text_router=text_router,
                             video_router=video_router, precision=precision)


__all__ = ["expert_ffn", "PRECISIONS", "expert_ffn_reference", "check_expert_ffn_inputs", "expert_assignment",
           "expert_ffn_flops", "modulated_norm_reference"]
