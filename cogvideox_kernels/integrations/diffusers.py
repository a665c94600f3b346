"""Swap our kernels into a loaded diffusers CogVideoX model, reversibly.

    pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-5b", torch_dtype=torch.bfloat16).to("cuda")
    cogvideox_kernels.integrations.diffusers.apply(pipe)    # ... remove(pipe) undoes it

What gets patched (nothing is copied: the ops read the model's own parameters through views):

* attention: each ``CogVideoXBlock.attn1`` gets :class:`CogVideoXKernelAttnProcessor`, which runs the
  model's to_q/to_k/to_v (or its fused to_qkv), then QK-LayerNorm + RoPE3D + attention in one
  ``rope3d_attention`` call, then to_out. An attention mask, cross-attention, a non-LayerNorm QK
  norm or autograd fall back to the processor that was there before.
* ffn: each ``CogVideoXBlock`` keeps its attention half and runs its second half (norm2 adaLN + ff +
  gates + residual) as one ``expert_ffn`` call in shared-FFN mode over ``[text ; video]``.
* vae: each ``CogVideoXCausalConv3d`` whose kernel shape our causal conv covers on the current
  device runs ``causal_conv3d`` (frame-0 replicate padding and the chunk cache without torch.cat);
  every other conv keeps cuDNN. diffusers' CogVideoX VAE has 68 (3,3,3) causal convs (ResNets,
  conv_in/conv_out) and 74 (1,1,1) ones (the decoder's spatial norms). Our CUDA conv covers
  kh = kw = 1 today, so only those 74 decoder convs change (on an H100: decode 2.28 -> 2.11 s, peak
  15.4 -> 12.5 GiB at 49x480x720; encode unchanged). Where our conv covers none of them (CPU, no
  CUDA extension), ``vae=True`` leaves the VAE as it is and warns.

Context parallelism (Ulysses, several GPUs): diffusers' own engine hosts it. ``apply`` gives the
transformer a context-parallel plan (:func:`cogvideox_cp_plan`, set as the model's ``_cp_plan``:
diffusers ships none for CogVideoX) and our processor takes the ``_parallel_config`` that
``enable_parallelism`` hands to processors, so the usual diffusers call works::

    apply(pipe)   # first: our processors receive the parallel config
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world, ulysses_anything=True))

The plan cuts the text and the video tokens separately at the first block (so each rank's blocks see
``[text_r ; video_r]``) and gathers after ``proj_out``. In between, the expert adaLN, FFN and gates run
on the local tokens, and our processor runs ``cogvideox_kernels.parallel.ulysses_rope3d_attention``
(all-to-all over the CP group, the fused op on all tokens of heads/world heads with the full RoPE
tables, all-to-all back). diffusers' own ``CogVideoXAttnProcessor2_0`` calls SDPA directly, not
diffusers' attention dispatcher, so without our processor diffusers cannot run CogVideoX context-
parallel at all; our processor does the all-to-alls itself (torch.distributed) because the dispatcher's
Ulysses runs the dispatcher's attention backends, not a custom op. ``ulysses_anything=True`` is needed
unless the text and the video token counts both divide by the degree; ``ring_degree > 1`` and heads not
divisible by the degree are refused. Under context parallelism our processor never falls back (the
fallback would attend over the local tokens only): masks, cross-attention or autograd raise instead.

diffusers is an optional dependency: it is imported only inside these functions.
"""
from __future__ import annotations

import functools
import warnings
import weakref

import torch

from ..ops import causal_conv3d, expert_ffn, rope3d_attention
from ..parallel import sequence_split_sizes, ulysses_rope3d_attention

BACKENDS = ("auto", "triton", "reference")
CONV_BACKENDS = ("auto", "reference", "cuda", "cpp")

# Per patched transformer / VAE: the options it was patched with and how to undo it.
_PATCHED: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _diffusers():
    try:
        import diffusers  # noqa: F401
        from diffusers.models.activations import GELU
        from diffusers.models.attention_processor import (CogVideoXAttnProcessor2_0,
                                                          FusedCogVideoXAttnProcessor2_0)
        from diffusers.models.autoencoders.autoencoder_kl_cogvideox import (AutoencoderKLCogVideoX,
                                                                            CogVideoXCausalConv3d)
        from diffusers.models.transformers.cogvideox_transformer_3d import (CogVideoXBlock,
                                                                            CogVideoXTransformer3DModel)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("cogvideox_kernels.integrations.diffusers needs diffusers "
                          "(pip install 'cogvideox-kernels[diffusers]')") from exc
    return dict(GELU=GELU, CogVideoXAttnProcessor2_0=CogVideoXAttnProcessor2_0,
                FusedCogVideoXAttnProcessor2_0=FusedCogVideoXAttnProcessor2_0,
                AutoencoderKLCogVideoX=AutoencoderKLCogVideoX, CogVideoXCausalConv3d=CogVideoXCausalConv3d,
                CogVideoXBlock=CogVideoXBlock, CogVideoXTransformer3DModel=CogVideoXTransformer3DModel)


# --------------------------------------------------------------------------------------------
# attention


def _autograd_needed(*params) -> bool:
    # Our kernels are forward-only; under autograd diffusers' own path keeps gradients right.
    return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)


def _norm_pair(norm):
    return None if norm is None else (norm.weight, norm.bias)


class CogVideoXKernelAttnProcessor:
    """Drop-in for diffusers' ``CogVideoXAttnProcessor2_0`` that runs ``rope3d_attention``.

    Keeps the processor it replaced in ``original`` for the cases it does not cover. Under diffusers'
    ``enable_parallelism`` (context parallel, Ulysses) it runs the Ulysses attention (module docstring).
    """

    # diffusers' enable_parallelism hands its ParallelConfig to processors that have this attribute.
    _parallel_config = None

    def __init__(self, original, backend: str = "auto", sequence=None):
        self.original = original
        self.backend = backend
        # Global token counts {"text": L, "video": N} of the current forward, recorded before the
        # context-parallel split (see _apply_transformer).
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

    def _covered(self, attn, attention_mask, image_rotary_emb, head_dim) -> bool:
        if attention_mask is not None or attn.is_cross_attention:
            return False
        norms = (attn.norm_q, attn.norm_k)
        if any(n is not None and not isinstance(n, torch.nn.LayerNorm) for n in norms):
            return False  # rms_norm & co: not what our kernel computes
        if (norms[0] is None) != (norms[1] is None):
            return False
        if norms[0] is not None and (norms[0].eps != norms[1].eps
                                     or tuple(norms[0].normalized_shape) != (head_dim,)):
            return False
        if image_rotary_emb is not None and image_rotary_emb[0].shape[-1] != head_dim:
            return False
        weights = [attn.to_out[0].weight]
        weights += [attn.to_qkv.weight] if getattr(attn, "fused_projections", False) else \
            [attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]
        return not _autograd_needed(*weights)

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None,
                 image_rotary_emb=None):
        head_dim = attn.inner_dim // attn.heads
        group = self._context_parallel()
        if not self._covered(attn, attention_mask, image_rotary_emb, head_dim):
            if group is not None:
                raise ValueError("cogvideox_kernels: under context parallelism the attention must be what our "
                                 "kernel computes (no attention_mask, self-attention, LayerNorm QK-norm, no "
                                 "autograd): the original processor would attend over this rank's tokens only")
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask=attention_mask,
                                 image_rotary_emb=image_rotary_emb)
        text_len = encoder_hidden_states.size(1)
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq, _ = tokens.shape
        if getattr(attn, "fused_projections", False):
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
        eps = attn.norm_q.eps if attn.norm_q is not None else 1e-6
        norms = dict(q_norm=_norm_pair(attn.norm_q), k_norm=_norm_pair(attn.norm_k), eps=eps)
        if group is None:
            out = rope3d_attention(q, k, v, text_len=text_len, cos=cos, sin=sin, backend=self.backend, **norms)
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
        return ulysses_rope3d_attention(q, k, v, text_len=text, cos=cos, sin=sin, group=group,
                                        seq_lens=[t + n for t, n in zip(text_lens, video_lens)],
                                        text_lens=text_lens, backend=self.backend, **norms)


def cogvideox_cp_plan(model) -> dict:
    """diffusers context-parallel plan for ``CogVideoXTransformer3DModel`` with our processor: cut the text
    and the video tokens (dim 1) at the first block, gather the sequence after ``proj_out``."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    split = ContextParallelInput(split_dim=1, expected_dims=3)
    return {"transformer_blocks.0": {"hidden_states": split, "encoder_hidden_states": split},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}


def _record_sequence(sequence):
    """Forward pre-hook for the first block: the global token counts, seen before diffusers' split hook."""

    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        sequence["text"], sequence["video"] = encoder.size(1), hidden.size(1)

    return hook


# --------------------------------------------------------------------------------------------
# expert FFN half of each block


def _check_block_ffn(index: int, block, gelu_cls) -> None:
    """Refuse blocks whose FFN is not what ``expert_ffn`` computes (Linear, tanh-GELU, Linear)."""
    net = getattr(getattr(block, "ff", None), "net", None)
    first = net[0] if net is not None and len(net) >= 3 else None
    proj = getattr(first, "proj", None)
    if (not isinstance(first, gelu_cls) or not isinstance(proj, torch.nn.Linear)
            or not isinstance(net[2], torch.nn.Linear)):
        name = type(first).__name__ if first is not None else type(getattr(block, "ff", None)).__name__
        raise ValueError(f"transformer_blocks[{index}].ff uses {name}; expert_ffn supports only "
                         "activation_fn='gelu-approximate' (Linear, tanh GELU, Linear); pass ffn=False")
    if getattr(first, "approximate", None) != "tanh":
        raise ValueError(f"transformer_blocks[{index}].ff uses GELU(approximate={first.approximate!r}); "
                         "expert_ffn computes the tanh approximation only "
                         "(activation_fn='gelu-approximate'); pass ffn=False")
    norm = getattr(getattr(block, "norm2", None), "norm", None)
    if not isinstance(norm, torch.nn.LayerNorm) or not hasattr(block.norm2, "linear"):
        raise ValueError(f"transformer_blocks[{index}].norm2 is not a CogVideoXLayerNormZero with a "
                         "LayerNorm; expert_ffn cannot replace it; pass ffn=False")


def _expert_ffn_half(block, hidden_states, encoder_hidden_states, temb, backend):
    """norm2 + ff + gates + residual of one block, as one ``expert_ffn`` over ``[text ; video]``."""
    text_len = encoder_hidden_states.size(1)
    tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    norm2 = block.norm2
    # [B, 6*hidden] chunked (shift, scale, gate, enc_shift, enc_scale, enc_gate): our row order.
    modulation = norm2.linear(norm2.silu(temb)).unflatten(1, (6, -1)).to(tokens.dtype)
    proj, out_linear = block.ff.net[0].proj, block.ff.net[2]
    unsqueeze = lambda t: None if t is None else t.unsqueeze(0)  # noqa: E731  (views, no copies)
    out = expert_ffn(tokens, modulation, proj.weight.unsqueeze(0), unsqueeze(proj.bias),
                     out_linear.weight.unsqueeze(0), unsqueeze(out_linear.bias), text_len=text_len,
                     norm_weight=norm2.norm.weight, norm_bias=norm2.norm.bias, eps=norm2.norm.eps,
                     num_text_experts=0, backend=backend)
    return out[:, text_len:], out[:, :text_len]


@functools.lru_cache(maxsize=None)
def _kernel_block_class(block_cls):
    """A subclass of diffusers' CogVideoXBlock whose forward ends in ``expert_ffn``.

    Patched blocks get this as their ``__class__`` (same instance, same parameters); ``remove``
    puts the original class back.
    """

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                attention_kwargs=None):
        ff_proj = self.ff.net[0].proj
        if _autograd_needed(ff_proj.weight, self.ff.net[2].weight, self.norm2.linear.weight):
            return block_cls.forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                     attention_kwargs)
        attention_kwargs = attention_kwargs or {}
        # Attention half exactly as diffusers writes it.
        norm_hidden, norm_encoder, gate_msa, enc_gate_msa = self.norm1(hidden_states, encoder_hidden_states,
                                                                        temb)
        attn_hidden, attn_encoder = self.attn1(hidden_states=norm_hidden, encoder_hidden_states=norm_encoder,
                                               image_rotary_emb=image_rotary_emb, **attention_kwargs)
        hidden_states = hidden_states + gate_msa * attn_hidden
        encoder_hidden_states = encoder_hidden_states + enc_gate_msa * attn_encoder
        return _expert_ffn_half(self, hidden_states, encoder_hidden_states, temb,
                                self._cogvideox_kernels_ffn_backend)

    return type(f"Kernel{block_cls.__name__}", (block_cls,), {"forward": forward, "__module__": __name__})


# --------------------------------------------------------------------------------------------
# VAE causal convs


def _conv_shape_supported(module) -> bool:
    """Convs whose padding/stride/dilation are what ``causal_conv3d`` computes."""
    conv = module.conv
    kt, kh, kw = conv.kernel_size
    return (module.pad_mode != "replicate"  # diffusers' "replicate" also pads H, W by replication
            and kh == kw and kh % 2 == 1
            and tuple(conv.padding) == (0, kh // 2, kw // 2)
            and conv.stride[1:] == (1, 1) and tuple(conv.dilation) == (1, 1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros")


def _native_conv_covers(x, weight, stride, backend="auto") -> bool:
    """Whether our native conv kernel covers this conv (cuDNN keeps the rest).

    ``auto`` asks for the CUDA kernel on CUDA tensors; ``cuda``/``cpp`` for that kernel anywhere.
    """
    if backend == "auto" and x.device.type != "cuda":
        return False
    try:
        from .._ext import cuda_available, extension_available
        from ..ops.causal_conv.native import native_supports
    except ImportError:
        return False
    built = cuda_available() if backend in ("auto", "cuda") else extension_available()
    if not built:
        return False
    try:
        return bool(native_supports(x, weight, stride))
    except (TypeError, ValueError):  # a shape the probe itself rejects: not covered
        return False


@functools.lru_cache(maxsize=None)
def _kernel_conv_class(conv_cls):
    def forward(self, inputs, conv_cache=None):
        backend = self._cogvideox_kernels_conv_backend
        weight, bias, stride = self.conv.weight, self.conv.bias, self.conv.stride[0]
        use_ours = backend == "reference" or _native_conv_covers(inputs, weight, stride, backend)
        if not use_ours or _autograd_needed(weight, bias):
            return conv_cls.forward(self, inputs, conv_cache)
        kt = self.time_kernel_size
        # For kt == 1 diffusers passes (and keeps) a clone of the whole input as "cache": not needed.
        cache = conv_cache if kt > 1 else None
        if backend != "reference":  # the native kernels take contiguous tensors
            inputs = inputs.contiguous()
            cache = None if cache is None else cache.contiguous()
        out, new_cache = causal_conv3d(inputs, weight, bias, stride=stride, pad_mode="replicate", cache=cache,
                                       backend=backend)
        return out, (new_cache if kt > 1 else None)

    return type(f"Kernel{conv_cls.__name__}", (conv_cls,), {"forward": forward, "__module__": __name__})


def _vae_coverage_note(convs) -> str:
    shapes = sorted({tuple(m.conv.kernel_size) for m in convs})
    return f"{len(convs)} CogVideoXCausalConv3d with kernel shapes {shapes}"


def _native_covers_any(convs, backend) -> bool:
    """Probe our native conv with each conv's kernel on a tiny input of the VAE's device/dtype."""
    for m in convs:
        w = m.conv.weight
        probe = torch.zeros(1, w.shape[1], 2, 4, 4, device=w.device, dtype=w.dtype)
        if _native_conv_covers(probe, w, m.conv.stride[0], backend):
            return True
    return False


# --------------------------------------------------------------------------------------------
# apply / remove


def _check_backend(name, backend, allowed):
    if backend not in allowed:
        raise ValueError(f"{name}={backend!r} is not supported; choose one of {allowed}")


def _apply_transformer(model, attention, ffn, backend, classes):
    options = {"attention": attention, "ffn": ffn, "backend": backend}
    if model in _PATCHED:
        if _PATCHED[model]["options"] == options:
            return model  # already patched the same way
        raise ValueError(f"{type(model).__name__} is already patched with {_PATCHED[model]['options']}; "
                         "call cogvideox_kernels.integrations.diffusers.remove() before patching again "
                         f"with {options}")
    blocks = list(model.transformer_blocks)
    for i, block in enumerate(blocks):
        if not isinstance(block, classes["CogVideoXBlock"]):
            raise TypeError(f"transformer_blocks[{i}] is a {type(block).__name__}, not a CogVideoXBlock")
        if ffn:
            _check_block_ffn(i, block, classes["GELU"])
    known = (classes["CogVideoXAttnProcessor2_0"], classes["FusedCogVideoXAttnProcessor2_0"])
    undo = {"processors": [], "classes": [], "hooks": [], "attrs": []}
    skipped = []
    sequence = {}  # global text/video token counts of the current forward (context parallelism)
    if attention and blocks:
        # torch pre-hooks run before diffusers' hook registry wraps forward, so this sees the full sequence
        undo["hooks"].append(blocks[0].register_forward_pre_hook(_record_sequence(sequence), with_kwargs=True))
        if getattr(model, "_cp_plan", None) is None:
            model._cp_plan = cogvideox_cp_plan(model)
            undo["attrs"].append((model, "_cp_plan"))
    for i, block in enumerate(blocks):
        if attention:
            if isinstance(block.attn1.processor, known):
                undo["processors"].append((block.attn1, block.attn1.processor))
                block.attn1.processor = CogVideoXKernelAttnProcessor(block.attn1.processor, backend, sequence)
                block.attn1.processor._parallel_config = getattr(model, "_parallel_config", None)
            else:
                skipped.append(f"{i}: {type(block.attn1.processor).__name__}")
        if ffn:
            undo["classes"].append((block, type(block)))
            block._cogvideox_kernels_ffn_backend = backend
            block.__class__ = _kernel_block_class(type(block))
    if skipped:
        warnings.warn("cogvideox_kernels: left attention processors it does not know in place "
                      f"(block: processor) {skipped}", stacklevel=3)
    _PATCHED[model] = {"options": options, "undo": undo}
    return model


def _apply_vae(vae, backend, classes):
    options = {"vae": True, "backend": backend}
    if vae in _PATCHED:
        if _PATCHED[vae]["options"] == options:
            return vae
        raise ValueError(f"{type(vae).__name__} is already patched with {_PATCHED[vae]['options']}; "
                         f"call remove() before patching again with {options}")
    conv_cls = classes["CogVideoXCausalConv3d"]
    convs = [m for m in vae.modules() if isinstance(m, conv_cls)]
    covered = [m for m in convs if _conv_shape_supported(m)]
    if backend != "reference":  # only the convs our native kernel takes; the rest stay untouched
        covered = [m for m in covered if _native_covers_any([m], backend)]
    undo = {"processors": [], "classes": []}
    if not covered:
        warnings.warn("cogvideox_kernels: vae=True changes nothing here: our causal conv kernel covers none "
                      f"of this VAE's {_vae_coverage_note(convs)} on {next(vae.parameters()).device} "
                      f"(backend={backend!r}); "
                      "the VAE keeps cuDNN", stacklevel=3)
    else:
        for m in covered:
            undo["classes"].append((m, type(m)))
            m._cogvideox_kernels_conv_backend = backend
            m.__class__ = _kernel_conv_class(type(m))
    _PATCHED[vae] = {"options": options, "undo": undo}
    return vae


def apply(obj, *, attention: bool = True, ffn: bool = True, vae: bool = True, backend: str = "auto"):
    """Patch a diffusers CogVideoX pipeline, transformer or VAE in place with our kernels; returns ``obj``.

    obj: a ``CogVideoXPipeline`` (anything with ``.transformer`` / ``.vae``), a
    ``CogVideoXTransformer3DModel`` or an ``AutoencoderKLCogVideoX``.
    attention / ffn: patch each block's attention processor / FFN half (transformer).
    vae: route the VAE's causal convs that our conv kernel covers to it (see the module docstring).
    backend: ``"auto"`` (kernels on a supported GPU, references elsewhere), ``"triton"`` or
    ``"reference"`` for the transformer ops; for the VAE ``"auto"`` (our CUDA conv where it covers
    the shape, cuDNN elsewhere) or ``"reference"``/``"cuda"``/``"cpp"`` (that backend for every conv
    of a supported shape). A backend one part lacks means ``"auto"`` there. Applying twice with the
    same options changes nothing; other options raise until :func:`remove`.
    """
    classes = _diffusers()
    transformer_cls, vae_cls = classes["CogVideoXTransformer3DModel"], classes["AutoencoderKLCogVideoX"]
    _check_backend("backend", backend, tuple(dict.fromkeys(BACKENDS + CONV_BACKENDS)))
    obj_or_inner = getattr(obj, "_orig_mod", obj)  # torch.compile'd model: patch the module inside
    if isinstance(obj_or_inner, (transformer_cls, vae_cls)):
        obj = obj_or_inner
    if isinstance(obj, transformer_cls):
        parts = [(obj, "transformer")]
    elif isinstance(obj, vae_cls):
        parts = [(obj, "vae")]
    elif isinstance(obj, torch.nn.Module) or not (hasattr(obj, "transformer") or hasattr(obj, "vae")):
        raise TypeError(f"cogvideox_kernels.integrations.diffusers.apply: {type(obj).__name__} is not supported; "
                        "pass a CogVideoXPipeline (with .transformer/.vae), a CogVideoXTransformer3DModel "
                        "or an AutoencoderKLCogVideoX")
    else:
        parts = []
        for attr in ("transformer", "vae"):
            part = getattr(obj, attr, None)
            part = getattr(part, "_orig_mod", part)
            if part is None:
                continue
            expected = transformer_cls if attr == "transformer" else vae_cls
            if not isinstance(part, expected):
                raise TypeError(f"{type(obj).__name__}.{attr} is a {type(part).__name__}; "
                                f"apply supports {expected.__name__} there")
            parts.append((part, attr))
    for part, kind in parts:
        # A backend an op family lacks ("triton" for the VAE conv, "cuda"/"cpp" for the
        # transformer ops) means "auto" for that family.
        if kind == "transformer" and (attention or ffn):
            _apply_transformer(part, attention, ffn, backend if backend in BACKENDS else "auto", classes)
        elif kind == "vae" and vae:
            _apply_vae(part, backend if backend in CONV_BACKENDS else "auto", classes)
    return obj


def remove(obj):
    """Undo :func:`apply` on ``obj`` (and its ``.transformer`` / ``.vae``); returns ``obj``."""
    parts = [getattr(obj, "_orig_mod", obj)] + [getattr(obj, a, None) for a in ("transformer", "vae")
                                                if not isinstance(obj, torch.nn.Module)]
    parts = [getattr(p, "_orig_mod", p) for p in parts]
    for part in parts:
        if part is None or part not in _PATCHED:
            continue
        if getattr(getattr(part, "_parallel_config", None), "context_parallel_config", None) is not None:
            raise ValueError(f"{type(part).__name__} runs context-parallel (enable_parallelism): remove() would "
                             "put back diffusers' processor, which attends over each rank's tokens only; "
                             "diffusers cannot undo enable_parallelism, so keep the patch")
        undo = _PATCHED.pop(part)["undo"]
        for handle in undo.get("hooks", ()):
            handle.remove()
        for module, attr in undo.get("attrs", ()):
            module.__dict__.pop(attr, None)
        for attn, processor in undo["processors"]:
            attn.processor = processor
        for module, cls in undo["classes"]:
            module.__class__ = cls
            for attr in ("_cogvideox_kernels_ffn_backend", "_cogvideox_kernels_conv_backend"):
                module.__dict__.pop(attr, None)
    return obj


def is_patched(obj) -> bool:
    """True when ``obj`` (or its ``.transformer`` / ``.vae``) is patched by :func:`apply`."""
    parts = [obj] + [getattr(obj, a, None) for a in ("transformer", "vae")]
    parts = [getattr(p, "_orig_mod", p) for p in parts]
    return any(p is not None and p in _PATCHED for p in parts)


__all__ = ["apply", "remove", "is_patched", "CogVideoXKernelAttnProcessor", "cogvideox_cp_plan"]
