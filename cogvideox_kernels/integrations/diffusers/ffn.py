"""The second half of each ``CogVideoXBlock`` (norm2 adaLN + ff + gates + residual) as one ``expert_ffn``."""
from __future__ import annotations

import contextlib
import sys

import torch

from ...ops import registry
from . import state, weights
from .attention import fused_attention_half

_ops = sys.modules[__package__]  # ops are looked up on the package, where tests (and users) may wrap them


def check_block_ffn(index: int, block, gelu_cls, block_cls) -> None:
    """Refuse blocks whose second half is not what ``expert_ffn`` computes (LayerNorm-zero, Linear,
    tanh-GELU, Linear). Which Linear (plain, LoRA, behind hooks) is decided at each call."""
    if type(block).forward is not block_cls.forward:
        raise ValueError(f"transformer_blocks[{index}] is a {type(block).__name__} with its own forward; "
                         "expert_ffn would replace it; pass ffn=False")
    net = getattr(getattr(block, "ff", None), "net", None)
    first = net[0] if net is not None and len(net) in (3, 4) else None
    if type(first) is not gelu_cls:
        name = type(first).__name__ if first is not None else type(getattr(block, "ff", None)).__name__
        raise ValueError(f"transformer_blocks[{index}].ff uses {name}; expert_ffn supports only "
                         "activation_fn='gelu-approximate' (Linear, tanh GELU, Linear); pass ffn=False")
    if first.approximate != "tanh":
        raise ValueError(f"transformer_blocks[{index}].ff uses GELU(approximate={first.approximate!r}); "
                         "expert_ffn computes the tanh approximation only "
                         "(activation_fn='gelu-approximate'); pass ffn=False")
    norm = getattr(getattr(block, "norm2", None), "norm", None)
    if not isinstance(norm, torch.nn.LayerNorm) or not hasattr(block.norm2, "linear"):
        raise ValueError(f"transformer_blocks[{index}].norm2 is not a CogVideoXLayerNormZero with a "
                         "LayerNorm; expert_ffn cannot replace it; pass ffn=False")


def _ffn_ok(block) -> bool:
    """The modules whose forwards we skip leave nothing out (see weights.py) and their weights can be had."""
    net = block.ff.net
    return (weights.identity_ok(block.norm2) and weights.layer_norm_ok(block.norm2.norm)
            and weights.identity_ok(block.ff) and weights.identity_ok(net[0])
            and all(weights.identity_ok(m) for m in net[1::2])  # the dropouts
            and weights.linear_ok(net[0].proj) and weights.linear_ok(net[2]))


class KernelBlockForward:
    """``block.forward`` while patched: diffusers' attention half (through ``attn1``, so its processor
    and hooks run; with ``state.FUSED_ATTENTION_HALF`` on, :func:`~.attention.fused_attention_half` where
    it covers the block), then norm2 + ff + gates + residual as one ``expert_ffn`` over ``[text ; video]``.
    Takes diffusers' own forward whenever autograd is needed or a skipped module's weights cannot be
    had exactly (LoRA variants, unknown hooks, quantized weights; see weights.py)."""

    def __init__(self, block, backend: str = "auto", precision: str = "bf16"):
        self.block = block
        self.backend = registry.backend_for("expert_ffn", backend)  # e.g. 'hopper' reaches expert_ffn as 'auto'
        self.precision = precision  # expert_ffn's own value (state.op_precision)

    def __setstate__(self, state):  # pickles made before precision existed
        self.__dict__.update({"precision": "bf16", **state})

    def __call__(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        block = self.block
        if (weights.autograd_needed((hidden_states, encoder_hidden_states, temb), (block,))
                or not _ffn_ok(block)):
            return type(block).forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                       attention_kwargs)
        attention_kwargs = attention_kwargs or {}
        text_len = encoder_hidden_states.size(1)
        tokens = None
        if state.FUSED_ATTENTION_HALF:  # [text ; video] after the attention half, or None: diffusers' way
            tokens = fused_attention_half(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                          attention_kwargs)
        if tokens is None:  # attention half exactly as diffusers writes it (through attn1's processor)
            norm_hidden, norm_encoder, gate_msa, enc_gate_msa = block.norm1(hidden_states, encoder_hidden_states,
                                                                            temb)
            attn_hidden, attn_encoder = block.attn1(hidden_states=norm_hidden, encoder_hidden_states=norm_encoder,
                                                    image_rotary_emb=image_rotary_emb, **attention_kwargs)
            hidden_states = hidden_states + gate_msa * attn_hidden
            encoder_hidden_states = encoder_hidden_states + enc_gate_msa * attn_encoder
            tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        else:
            hidden_states, encoder_hidden_states = tokens[:, text_len:], tokens[:, :text_len]
        # [B, 6*hidden] chunked (shift, scale, gate, enc_shift, enc_scale, enc_gate): our row order.
        norm2 = block.norm2
        modulation = norm2.linear(norm2.silu(temb)).unflatten(1, (6, -1))
        with contextlib.ExitStack() as stack:
            norm = weights.leaf_params(norm2.norm, stack)
            first = weights.linear_params(block.ff.net[0].proj, stack)
            second = weights.linear_params(block.ff.net[2], stack)
            if norm is not None and first is not None and second is not None:
                out = _ops.expert_ffn(tokens, modulation.to(tokens.dtype), first[0].unsqueeze(0), _expert(first[1]),
                                      second[0].unsqueeze(0), _expert(second[1]), text_len=text_len,
                                      norm_weight=norm[0], norm_bias=norm[1], eps=norm2.norm.eps,
                                      num_text_experts=0, precision=self.precision, backend=self.backend)
                return out[:, text_len:], out[:, :text_len]
        # What the hooks left was not a plain float tensor after all: diffusers' second half.
        norm_hidden, norm_encoder, gate_ff, enc_gate_ff = norm2(hidden_states, encoder_hidden_states, temb)
        ff_output = block.ff(torch.cat([norm_encoder, norm_hidden], dim=1))
        return (hidden_states + gate_ff * ff_output[:, text_len:],
                encoder_hidden_states + enc_gate_ff * ff_output[:, :text_len])


def _expert(bias):
    return None if bias is None else bias.unsqueeze(0)
