"""Attention: our processor for diffusers' CogVideoX attention, and the context-parallel plan."""
from __future__ import annotations

import contextlib
import sys

import torch

from ...parallel import sequence_split_sizes
from ...ops import registry
from . import weights

_ops = sys.modules[__package__]  # ops are looked up on the package, where tests (and users) may wrap them


class CogVideoXKernelAttnProcessor:
    """Drop-in for diffusers' ``CogVideoXAttnProcessor2_0`` / ``FusedCogVideoXAttnProcessor2_0`` that runs
    ``rope3d_attention``: the module's own projections (called, so LoRA and hooks on them run), then
    QK-LayerNorm + RoPE3D + attention in one op, then ``to_out``.

    ``original`` is the processor it replaced; it decides the projections (``to_qkv`` when it was the
    fused one, as diffusers would) and runs whatever we do not cover: an attention mask,
    cross-attention, a QK-norm that is not a LayerNorm, autograd (grad mode with an input or a weight
    that requires grad) and an active TorchFunctionMode (diffusers' LayerSkip ``skip_attention_scores``).
    A LayerNorm QK-norm behind hooks we do not know is called as a module before our op.
    Under diffusers' ``enable_parallelism`` (Ulysses) it runs the Ulysses attention and never falls back.
    """

    # diffusers' enable_parallelism hands its ParallelConfig to processors that have this attribute.
    _parallel_config = None

    def __init__(self, original, backend: str = "auto", sequence=None, fused: bool = False,
                 precision: str = "bf16"):
        self.original = original
        self.precision = precision  # rope3d_attention's: "bf16" (exact) or "int8" (opt-in 8-bit)
        self.backend = registry.backend_for("rope3d_attention", backend)  # e.g. 'hopper' reaches expert_ffn as 'auto'
        self.fused = fused  # original is diffusers' FusedCogVideoXAttnProcessor2_0: q, k, v from to_qkv
        # Global token counts {"text": L, "video": N} of the current forward, recorded before the
        # context-parallel split (SequenceRecorder on the first block).
        self._sequence = {} if sequence is None else sequence

    def _context_parallel(self):
        """The CP process group when diffusers' context parallelism is on, else None."""
        cp = getattr(self._parallel_config, "context_parallel_config", None)
        if cp is None:
            return None
        if cp.ring_degree != 1:
            raise ValueError(f"ContextParallelConfig(ring_degree={cp.ring_degree}): cogvideox_kernels' processor "
                             "supports Ulysses only (ring_degree=1, ulysses_degree > 1)")
        return cp._flattened_mesh.get_group()

    def _covered(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                 head_dim) -> bool:
        if attention_mask is not None or attn.is_cross_attention:
            return False
        if self.fused and getattr(attn, "to_qkv", None) is None:
            return False
        norms = (attn.norm_q, attn.norm_k)
        if any(n is not None and type(n) is not torch.nn.LayerNorm for n in norms):
            return False  # rms_norm & co: not what our kernel computes
        if (norms[0] is None) != (norms[1] is None):
            return False
        if norms[0] is not None and (norms[0].eps != norms[1].eps
                                     or tuple(norms[0].normalized_shape) != (head_dim,)
                                     or tuple(norms[1].normalized_shape) != (head_dim,)):
            return False
        if image_rotary_emb is not None and image_rotary_emb[0].shape[-1] != head_dim:
            return False
        if weights.function_mode_active():
            return False
        return not weights.autograd_needed((hidden_states, encoder_hidden_states, image_rotary_emb), (attn,))

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None,
                 image_rotary_emb=None):
        head_dim = attn.inner_dim // attn.heads
        group = self._context_parallel()
        if not self._covered(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                             head_dim):
            if group is not None:
                raise ValueError("cogvideox_kernels: under context parallelism the attention must be what our "
                                 "kernel computes (no attention_mask, self-attention, LayerNorm QK-norm, no "
                                 "autograd): the original processor would attend over this rank's tokens only")
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask=attention_mask,
                                 image_rotary_emb=image_rotary_emb)
        text_len = encoder_hidden_states.size(1)
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq, _ = tokens.shape
        if self.fused:
            # One GEMM; q, k, v become strided [B, S, H, D] views of its output.
            q, k, v = attn.to_qkv(tokens).view(batch, seq, 3, attn.heads, head_dim).unbind(2)
        else:
            q = attn.to_q(tokens).view(batch, seq, attn.heads, head_dim)
            k = attn.to_k(tokens).view(batch, seq, attn.heads, head_dim)
            v = attn.to_v(tokens).view(batch, seq, attn.heads, head_dim)
        cos = sin = None
        if image_rotary_emb is not None:
            # diffusers' tables: (cos, sin) [N_video, D], pairs interleaved, as our op expects.
            cos, sin = (t.to(device=q.device, dtype=torch.float32) for t in image_rotary_emb)
        with contextlib.ExitStack() as stack:
            norms = dict(q_norm=None, k_norm=None, eps=1e-6)
            if attn.norm_q is not None:
                q_norm = k_norm = None
                if weights.layer_norm_ok(attn.norm_q) and weights.layer_norm_ok(attn.norm_k):
                    q_norm = weights.leaf_params(attn.norm_q, stack)
                    k_norm = weights.leaf_params(attn.norm_k, stack)
                if q_norm is None or k_norm is None:
                    q, k = attn.norm_q(q), attn.norm_k(k)  # through the modules (their hooks run)
                else:
                    norms = dict(q_norm=q_norm, k_norm=k_norm, eps=attn.norm_q.eps)
            if group is None:
                out = _ops.rope3d_attention(q, k, v, text_len=text_len, cos=cos, sin=sin, backend=self.backend,
                                            precision=self.precision, **norms)
            else:
                out = self._ulysses(q, k, v, text_len, hidden_states.size(1), cos, sin, norms, group)
        out = attn.to_out[0](out.reshape(batch, seq, attn.heads * head_dim))
        out = attn.to_out[1](out)
        return out[:, text_len:], out[:, :text_len]

    def _ulysses(self, q, k, v, local_text, local_video, cos, sin, norms, group):
        """This rank holds [text_r ; video_r] (cogvideox_cp_plan's split): Ulysses over the whole sequence."""
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        text, video = self._sequence.get("text"), self._sequence.get("video")
        text_lens = video_lens = None
        if text is not None:
            text_lens, video_lens = sequence_split_sizes(text, world), sequence_split_sizes(video, world)
        if text_lens is None or (text_lens[rank], video_lens[rank]) != (local_text, local_video):
            raise ValueError(f"cogvideox_kernels: rank {rank} holds {local_text} text + {local_video} video tokens, "
                             f"not its share of the global {text} text + {video} video tokens; enable "
                             "context parallelism with cogvideox_cp_plan (apply() sets it as the model's _cp_plan)")
        return _ops.ulysses_rope3d_attention(q, k, v, text_len=text, cos=cos, sin=sin, group=group,
                                             seq_lens=[t + n for t, n in zip(text_lens, video_lens)],
                                             text_lens=text_lens, backend=self.backend,
                                             precision=self.precision, **norms)


def cogvideox_cp_plan(model) -> dict:
    """diffusers context-parallel plan for ``CogVideoXTransformer3DModel`` with our processor: cut the text
    and the video tokens (dim 1) at the first block, gather the sequence after ``proj_out``."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    split = ContextParallelInput(split_dim=1, expected_dims=3)
    return {"transformer_blocks.0": {"hidden_states": split, "encoder_hidden_states": split},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}


class SequenceRecorder:
    """Forward pre-hook (with kwargs) for the first block: the global token counts of this forward, seen
    before diffusers' context-parallel split hook (torch pre-hooks run before diffusers' hook registry)."""

    def __init__(self, sequence: dict):
        self.sequence = sequence

    def __call__(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        self.sequence["text"], self.sequence["video"] = encoder.size(1), hidden.size(1)
