"""Attention: our processor for diffusers' CogVideoX attention, and the context-parallel plan."""
from __future__ import annotations

import contextlib
import sys

import torch

from ...parallel import sequence_split_sizes
from ...ops import registry
from ...ops.adaln_linear.fp8 import supports as fp8_supports
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
    # adaln_linear / gated_linear's precision in the fused attention half (class default: pickles made before it)
    linear_precision = "bf16"

    def __init__(self, original, backend: str = "auto", sequence=None, fused: bool = False,
                 precision: str = "bf16", linear_precision: str = "bf16"):
        self.original = original
        self.precision = precision  # rope3d_attention's: "bf16" (exact) or "int8" (opt-in 8-bit)
        self.linear_precision = linear_precision  # the fused half's projections: "bf16" or "fp8" (opt-in)
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


# ------------------------------------------------------------------------------ fused attention half


def _plain_forward(module) -> bool:
    """``module``'s forward is its class's, or what the hooks that ``weights.hooks_known`` checks wrap."""
    return ("forward" not in module.__dict__ or "_diffusers_hook" in module.__dict__
            or "_hf_hook" in module.__dict__)


def _attention_half_ok(block, fused: bool) -> bool:
    """Every module whose forward the fused half skips is plain (weights.py) and what it computes."""
    attn, norm1 = block.attn1, block.norm1
    projections = [attn.to_qkv] if fused else [attn.to_q, attn.to_k, attn.to_v]
    norms_ok = attn.norm_q is None or (weights.layer_norm_ok(attn.norm_q) and weights.layer_norm_ok(attn.norm_k))
    return (isinstance(getattr(norm1, "norm", None), torch.nn.LayerNorm) and hasattr(norm1, "linear")
            and weights.identity_ok(norm1) and weights.layer_norm_ok(norm1.norm)
            and _plain_forward(attn) and weights.identity_ok(attn) and norms_ok
            and all(weights.linear_ok(p) for p in projections)
            and len(attn.to_out) == 2 and weights.identity_ok(attn.to_out)
            and weights.linear_ok(attn.to_out[0]) and weights.identity_ok(attn.to_out[1]))


def join_tokens(encoder_hidden_states, hidden_states):
    """``[text ; video]`` as one ``[B, S, hidden]`` tensor: a view when the two are the adjacent halves of
    one packed tensor (what the previous patched block returned), else ``torch.cat``. Read only."""
    enc, hid = encoder_hidden_states, hidden_states
    B, L, Hd = enc.shape
    S = L + hid.size(1)
    if (not torch.compiler.is_compiling() and hid.dtype == enc.dtype and hid.device == enc.device
            and enc.stride() == hid.stride() == (S * Hd, Hd, 1) and hid.shape[::2] == (B, Hd)
            and hid.untyped_storage().data_ptr() == enc.untyped_storage().data_ptr()
            and hid.storage_offset() == enc.storage_offset() + L * Hd):
        return enc.as_strided((B, S, Hd), (S * Hd, Hd, 1), enc.storage_offset())
    return torch.cat([enc, hid], dim=1)


def fused_attention_half(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs):
    """The attention half of a ``CogVideoXBlock`` (norm1 + attn1 + gates + residual) as three ops over
    ``[text ; video]``: ``adaln_linear`` (norm1's LN-modulate pre-pass + the to_q/to_k/to_v GEMMs),
    ``rope3d_attention`` on strided q/k/v views of its output, ``gated_linear`` (to_out's GEMM, bias,
    gate and residual). Returns the residual stream ``[B, text + video, hidden]`` after it, or None
    where anything is not ours or not plain (the caller runs diffusers' norm1 and ``attn1``): a
    processor that is not our unfallen one, hooks on attn1 or its submodules that weights.py does not
    know (PyramidAttentionBroadcast, FasterCache), LoRA variants, context parallelism, attention kwargs,
    anything ``CogVideoXKernelAttnProcessor`` itself would not cover."""
    attn = block.attn1
    processor = attn.processor
    if type(processor) is not CogVideoXKernelAttnProcessor or attention_kwargs:
        return None
    head_dim = attn.inner_dim // attn.heads
    if (processor._context_parallel() is not None or not _attention_half_ok(block, processor.fused)
            or not processor._covered(attn, hidden_states, encoder_hidden_states, None, image_rotary_emb, head_dim)):
        return None
    norm1 = block.norm1
    text_len = encoder_hidden_states.size(1)
    tokens = join_tokens(encoder_hidden_states, hidden_states)
    batch, seq, _ = tokens.shape
    modulation = norm1.linear(norm1.silu(temb)).unflatten(1, (6, -1)).to(tokens.dtype)
    cos = sin = None
    if image_rotary_emb is not None:
        cos, sin = (t.to(device=tokens.device, dtype=torch.float32) for t in image_rotary_emb)
    with contextlib.ExitStack() as stack:
        for container in (norm1, attn, attn.to_out):  # what calls of them would run (offload, casting)
            weights.enter_hooks(container, stack)
        norm = weights.leaf_params(norm1.norm, stack)
        projections = [weights.linear_params(p, stack)
                       for p in ([attn.to_qkv] if processor.fused else [attn.to_q, attn.to_k, attn.to_v])]
        out_proj = weights.linear_params(attn.to_out[0], stack)
        norms = dict(q_norm=None, k_norm=None, eps=1e-6)
        if attn.norm_q is not None:
            norms = dict(q_norm=weights.leaf_params(attn.norm_q, stack),
                         k_norm=weights.leaf_params(attn.norm_k, stack), eps=attn.norm_q.eps)
        if any(p is None for p in [norm, out_proj, *projections]) or (
                attn.norm_q is not None and (norms["q_norm"] is None or norms["k_norm"] is None)):
            return None  # what the hooks left is not a plain float tensor after all
        if any(w.dtype != tokens.dtype for w, _ in [*projections, out_proj]):
            return None  # diffusers' modules decide what mixed dtypes do
        if len({tuple(w.shape) for w, _ in projections}) != 1:
            return None  # to_q/to_k/to_v of different shapes: not in diffusers' configs
        backend = registry.backend_for("adaln_linear", processor.backend)
        precision = processor.linear_precision
        if precision != "bf16" and any(fp8_supports(tokens, w) for w, _ in [*projections, out_proj]):
            precision = "bf16"  # shapes / device the FP8 GEMMs do not take: the exact projections
        norm_args = dict(text_len=text_len, norm_weight=norm[0], norm_bias=norm[1], eps=norm1.norm.eps,
                         backend=backend, precision=precision)
        if processor.fused:  # one to_qkv Linear: [B, S, 3 * inner]
            qkv = _ops.adaln_linear(tokens, modulation, *projections[0], **norm_args)
            q, k, v = qkv.view(batch, seq, 3, attn.heads, head_dim).unbind(2)
        else:  # to_q, to_k, to_v as they are (no concatenated copy): [3, B, S, inner]
            qkv = _ops.adaln_linear(tokens, modulation, [w for w, _ in projections], [b for _, b in projections],
                                    **norm_args)
            q, k, v = qkv.view(3, batch, seq, attn.heads, head_dim).unbind(0)
        out = _ops.rope3d_attention(q, k, v, text_len=text_len, cos=cos, sin=sin, backend=processor.backend,
                                    precision=processor.precision, **norms)
        return _ops.gated_linear(tokens, out.reshape(batch, seq, attn.heads * head_dim), out_proj[0], out_proj[1],
                                 modulation, text_len=text_len, backend=backend, precision=precision)


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
