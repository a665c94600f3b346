"""Run our kernels inside a loaded diffusers CogVideoX model, reversibly, with diffusers' features on.

    pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-5b", torch_dtype=torch.bfloat16).to("cuda")
    cogvideox_kernels.integrations.diffusers.apply(pipe)    # ... remove(pipe) undoes it

What gets patched (nothing is copied; classes are not changed):

* attention: each ``CogVideoXBlock.attn1`` gets :class:`CogVideoXKernelAttnProcessor`, which calls the
  module's own to_q/to_k/to_v (or to_qkv when it replaced diffusers' fused processor), then QK-LayerNorm +
  RoPE3D + attention in one ``rope3d_attention`` call, then to_out.
* ffn: each ``CogVideoXBlock`` gets an instance ``forward`` (:class:`~.ffn.KernelBlockForward`) that runs
  diffusers' attention half and then norm2 adaLN + ff + gates + residual as one ``expert_ffn`` call.
  With ``state.FUSED_ATTENTION_HALF`` on (the default; environment variable
  ``COGVIDEOX_KERNELS_FUSED_ATTENTION_HALF=0`` turns it off) the attention half runs fused too, where attn1
  is ours and plain (``attention.fused_attention_half``): ``adaln_linear`` (norm1's LN-modulate pre-pass +
  the to_q/to_k/to_v GEMMs on the effective weights), ``rope3d_attention`` on views of its output,
  ``gated_linear`` (to_out's GEMM + bias + gate + residual), all over ``[text ; video]``.
* vae: each ``CogVideoXResnetBlock3D`` of encoder and decoder gets an instance ``forward``
  (:class:`~.resnet.KernelResnetForward`) that runs the block as two ``vae_conv3d`` calls (GroupNorm or
  spatial norm + SiLU + causal (3,3,3) conv with its cache, the second with the shortcut as fused
  residual), per frame batch as diffusers runs it. Each ``CogVideoXCausalConv3d`` whose kernel shape our
  causal conv covers gets an instance ``forward`` that runs ``causal_conv3d`` (frame-0 replicate padding
  and the chunk cache without torch.cat). Both take the tensors where the kernel does (``auto``: CUDA
  tensors it covers), diffusers' modules elsewhere. diffusers' CogVideoX VAE has 32 ResNet blocks (64 of
  its 68 (3,3,3) causal convs) and 74 (1,1,1) convs (the decoder's spatial norms); our causal conv covers
  kh = kw = 1. Where nothing can be taken (no CUDA GPU or build), ``vae=True`` leaves the VAE as it is
  and warns. For decode memory (resnet.py, vae.py): the decoder's large frame batches run in frame
  chunks (ResNet blocks, ``norm_out``, the upsamplers), patched blocks free the conv caches they were
  handed, and the decoder hands each up block's input on by ownership (``KernelDecoderForward``).

Composes with diffusers' features, in either order with ``apply`` (tests/integrations/test_features.py):
peft LoRA (``add_adapter``/``load_lora_weights``, ``set_adapters`` with weights, disable, ``fuse_lora``),
group offloading (block or leaf level, memory or disk), model / sequential CPU offload (accelerate hooks),
layerwise casting, caches (FirstBlockCache, MagCache, PAB, FasterCache, LayerSkip ...), fused QKV,
``set_attn_processor``, ``torch.compile``, ``torch.save`` / ``copy.deepcopy``. Weights reach our ops only
through the modules' own calls or as their *effective* weights (hooks run, LoRA deltas added; see
``weights.py``); where that cannot be had exactly, that module takes diffusers' path. Grad mode with
any input or weight that requires grad takes diffusers' path too (our kernels are forward-only).
Patch state lives on the model and its modules (``state.py``), so ``is_patched`` and ``remove`` read
what is really there: a processor the user set after ``apply`` is theirs and stays.

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
parallel at all. ``ulysses_anything=True`` is needed unless the text and the video token counts both
divide by the degree; ``ring_degree > 1`` and heads not divisible by the degree are refused. Under
context parallelism our processor never falls back (the fallback would attend over the local tokens
only): masks, cross-attention or autograd raise instead.

diffusers is an optional dependency: it is imported only inside these functions.
"""
from __future__ import annotations

import warnings

import torch

# The ops, looked up here by the patched modules at each call (tests wrap them to count calls).
from ...ops import (adaln_linear, causal_conv3d, expert_ffn, gated_linear, rope3d_attention,  # noqa: F401
                    vae_conv3d)
from ...ops import registry
from ...parallel import ulysses_rope3d_attention  # noqa: F401
from . import state
from .attention import CogVideoXKernelAttnProcessor, SequenceRecorder, cogvideox_cp_plan
from .ffn import KernelBlockForward, check_block_ffn
from .resnet import CACHE_PLACES, KernelDecoderForward, KernelResnetForward, KernelSpatialNormForward, why_not_covered
from .vae import (KernelConvForward, KernelUpsampleForward, backend_can_run_here, conv_shape_supported,
                  coverage_note, kernel_shape_covered)

# backend names come from the op registry: the transformer's ops, and the VAE's conv
BACKENDS = registry.backends("rope3d_attention", "expert_ffn")
CONV_BACKENDS = registry.backends("causal_conv3d")


def _diffusers():
    try:
        from diffusers.models.activations import GELU
        from diffusers.models.attention_processor import (CogVideoXAttnProcessor2_0,
                                                          FusedCogVideoXAttnProcessor2_0)
        from diffusers.models.autoencoders.autoencoder_kl_cogvideox import (AutoencoderKLCogVideoX,
                                                                            CogVideoXCausalConv3d,
                                                                            CogVideoXResnetBlock3D)
        from diffusers.models.transformers.cogvideox_transformer_3d import (CogVideoXBlock,
                                                                            CogVideoXTransformer3DModel)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("cogvideox_kernels.integrations.diffusers needs diffusers "
                          "(pip install 'cogvideox-kernels[diffusers]')") from exc
    return dict(GELU=GELU, CogVideoXAttnProcessor2_0=CogVideoXAttnProcessor2_0,
                FusedCogVideoXAttnProcessor2_0=FusedCogVideoXAttnProcessor2_0,
                AutoencoderKLCogVideoX=AutoencoderKLCogVideoX, CogVideoXCausalConv3d=CogVideoXCausalConv3d,
                CogVideoXResnetBlock3D=CogVideoXResnetBlock3D,
                CogVideoXBlock=CogVideoXBlock, CogVideoXTransformer3DModel=CogVideoXTransformer3DModel)


def _check_options(model, options):
    patched = model.__dict__.get(state.STATE)
    if patched is not None and patched["options"] != options:
        raise ValueError(f"{type(model).__name__} is already patched with {patched['options']}; "
                         "call cogvideox_kernels.integrations.diffusers.remove() before patching again "
                         f"with {options}")
    return patched


def _apply_transformer(model, attention, ffn, backend, precision, classes):
    options = {"attention": attention, "ffn": ffn, "backend": backend, "precision": precision}
    patched = _check_options(model, options)
    blocks = list(model.transformer_blocks)
    for i, block in enumerate(blocks):
        if not isinstance(block, classes["CogVideoXBlock"]):
            raise TypeError(f"transformer_blocks[{i}] is a {type(block).__name__}, not a CogVideoXBlock")
        if ffn:
            check_block_ffn(i, block, classes["GELU"], classes["CogVideoXBlock"])
    patched = patched or {"options": options, "sequence": {}, "cp_plan": None}
    sequence = patched["sequence"]  # global text/video token counts of the current forward (CP)
    if attention and blocks:
        if not any(isinstance(h, SequenceRecorder) for h in blocks[0]._forward_pre_hooks.values()):
            blocks[0].register_forward_pre_hook(SequenceRecorder(sequence), with_kwargs=True)
        if getattr(model, "_cp_plan", None) is None:
            model._cp_plan = patched["cp_plan"] = cogvideox_cp_plan(model)
    known = (classes["CogVideoXAttnProcessor2_0"], classes["FusedCogVideoXAttnProcessor2_0"])
    skipped = []
    for i, block in enumerate(blocks):
        processor = block.attn1.processor
        if attention and not isinstance(processor, CogVideoXKernelAttnProcessor):
            if type(processor) in known:
                ours = CogVideoXKernelAttnProcessor(
                    processor, backend, sequence, fused=type(processor) is classes["FusedCogVideoXAttnProcessor2_0"],
                    precision=state.op_precision(precision, "rope3d_attention"),
                    linear_precision=state.op_precision(precision, "linear"))
                ours._parallel_config = getattr(model, "_parallel_config", None)
                block.attn1.set_processor(ours)
            else:
                skipped.append(f"{i}.attn1: {type(processor).__name__}")
        if ffn and state.installed(block, KernelBlockForward) is None:
            forward = KernelBlockForward(block, backend, state.op_precision(precision, "expert_ffn"))
            if not state.install(block, forward):
                skipped.append(f"{i}.forward: {type(block.forward).__name__}")
    if skipped:
        warnings.warn("cogvideox_kernels: left in place what it does not know (module: what is there) "
                      f"{skipped}", stacklevel=3)
    model.__dict__[state.STATE] = patched
    return model


def _apply_vae(vae, backend, classes, vae_cache="device"):
    options = {"vae": True, "backend": backend, "vae_cache": vae_cache}
    patched = _check_options(vae, options)
    here = backend_can_run_here(backend)
    convs = [m for m in vae.modules() if isinstance(m, classes["CogVideoXCausalConv3d"])]
    covered = [m for m in convs if here and conv_shape_supported(m) and kernel_shape_covered(m, backend)]
    blocks = [m for m in vae.modules() if isinstance(m, classes["CogVideoXResnetBlock3D"])]
    covered_blocks = [b for b in blocks if here and why_not_covered(b, backend) is None]
    if not covered and not covered_blocks:
        warnings.warn("cogvideox_kernels: vae=True changes nothing here: our kernels cover none of this VAE's "
                      f"{len(blocks)} ResNet blocks and {coverage_note(convs)} (backend={backend!r}; 'auto' "
                      "needs a CUDA GPU and the CUDA build of the extension); the VAE keeps diffusers' modules",
                      stacklevel=3)
        return vae
    for m in covered:
        if state.installed(m, KernelConvForward) is None:
            state.install(m, KernelConvForward(m, backend))
    for b in covered_blocks:
        if state.installed(b, KernelResnetForward) is None:
            state.install(b, KernelResnetForward(b, backend))
    if covered_blocks:  # spatial norms outside the ResNet blocks (the decoder's norm_out): frame chunks
        inner = {id(m) for b in blocks for m in b.modules()}
        for m in vae.modules():
            if type(m).__name__ == "CogVideoXSpatialNorm3D" and id(m) not in inner \
                    and state.installed(m, KernelSpatialNormForward) is None:
                state.install(m, KernelSpatialNormForward(m, backend))
            if type(m).__name__ == "CogVideoXUpsample3D" and state.installed(m, KernelUpsampleForward) is None:
                state.install(m, KernelUpsampleForward(m))  # frame chunks, contiguous output
            if type(m).__name__ == "CogVideoXDecoder3D" and state.installed(m, KernelDecoderForward) is None:
                state.install(m, KernelDecoderForward(m, vae_cache))  # activations handed on by ownership
    vae.__dict__[state.STATE] = patched or {"options": options}
    return vae


def _parts(obj):
    """The transformer / VAE modules ``obj`` is or holds (unwrapping ``torch.compile``)."""
    inner = getattr(obj, "_orig_mod", obj)
    if isinstance(inner, torch.nn.Module):
        return [inner]
    parts = [getattr(obj, a, None) for a in ("transformer", "vae")]
    return [getattr(p, "_orig_mod", p) for p in parts if p is not None]


def apply(obj, *, attention: bool = True, ffn: bool = True, vae: bool = True, backend: str = "auto",
          precision: str = "bf16", vae_cache: str = "device"):
    """Patch a diffusers CogVideoX pipeline, transformer or VAE in place with our kernels; returns ``obj``.

    obj: a ``CogVideoXPipeline`` (anything with ``.transformer`` / ``.vae``), a
    ``CogVideoXTransformer3DModel`` or an ``AutoencoderKLCogVideoX``.
    attention / ffn: patch each block's attention processor / FFN half (transformer).
    vae: route the VAE's ResNet blocks to ``vae_conv3d`` and its causal convs to ``causal_conv3d``
    where our kernels cover them (see the module docstring).
    backend: ``"auto"`` (kernels on a supported GPU, references elsewhere), ``"triton"`` or
    ``"reference"`` for the transformer ops; for the VAE ``"auto"`` (our CUDA conv where it covers
    the shape, cuDNN elsewhere) or ``"reference"``/``"cuda"``/``"cpp"`` (that backend for every conv
    of a supported shape). A backend one part lacks means ``"auto"`` there.
    vae_cache: where the VAE decoder's conv caches wait between frame batches: ``"device"`` (default, as in
    diffusers) or ``"host"`` (pinned host memory, copied out and back on side streams beside the decode: the
    same output bit for bit at less GPU memory, for ~one cache set of pinned host memory; see
    ``cache_offload.py``; H200 figures in benchmarks/results/vae_decode_notes.md).
    precision: an entry of ``state.PRECISION_MODES`` (what each op runs in it): ``"bf16"``
    (default, exact); ``"fp8"``: the FFN GEMMs in FP8 e4m3 (lossy, opt-in,
    benchmarks/results/fp8_ffn_notes.md); ``"int8"``: the attention with smoothed INT8 Q K^T
    (``rope3d_attention(..., precision="int8")``, lossy, opt-in,
    benchmarks/results/int8_attention_notes.md); ``"int8+fp8"``: both; ``"int8-ffn"``: the FFN GEMMs
    in int8 (``expert_ffn(..., precision="int8")``, lossy, opt-in); ``"fp8-all"``: the FFN GEMMs and the
    fused attention half's projections (to_q/k/v, to_out: ``adaln_linear`` / ``gated_linear`` with
    ``precision="fp8"``) in FP8 (lossy, opt-in). Applying again with the
    same options puts our processor back where diffusers' own CogVideoX processor returned since
    (``fuse_qkv_projections()``, ``set_attn_processor``) and changes nothing else; other options raise
    until :func:`remove`.
    """
    classes = _diffusers()
    transformer_cls, vae_cls = classes["CogVideoXTransformer3DModel"], classes["AutoencoderKLCogVideoX"]
    state.op_precision(precision, "expert_ffn")  # a ValueError for an unknown mode, before anything changes
    if vae_cache not in CACHE_PLACES:
        raise ValueError(f"vae_cache={vae_cache!r} is not supported; choose one of {CACHE_PLACES}")
    allowed = tuple(dict.fromkeys(BACKENDS + CONV_BACKENDS))
    if backend not in allowed:
        raise ValueError(f"backend={backend!r} is not supported; choose one of {allowed}")
    inner = getattr(obj, "_orig_mod", obj)  # torch.compile'd model: patch the module inside
    if isinstance(inner, (transformer_cls, vae_cls)):
        parts = [(inner, "transformer" if isinstance(inner, transformer_cls) else "vae")]
    elif isinstance(inner, torch.nn.Module) or not (hasattr(obj, "transformer") or hasattr(obj, "vae")):
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
            _apply_transformer(part, attention, ffn, backend if backend in BACKENDS else "auto", precision, classes)
        elif kind == "vae" and vae:
            _apply_vae(part, backend if backend in CONV_BACKENDS else "auto", classes, vae_cache)
    return obj


def patch_report(obj) -> dict:
    """How many modules of ``obj`` (and its ``.transformer`` / ``.vae``) run our kernels now:
    ``{"attention": processors, "ffn": blocks, "vae": convs, "vae_resnet": ResNet blocks}``, read off
    the modules themselves."""
    report = {"attention": 0, "ffn": 0, "vae": 0, "vae_resnet": 0}
    for part in _parts(obj):
        for module in part.modules():
            report["attention"] += isinstance(getattr(module, "processor", None), CogVideoXKernelAttnProcessor)
            report["ffn"] += state.installed(module, KernelBlockForward) is not None
            report["vae"] += state.installed(module, KernelConvForward) is not None
            report["vae_resnet"] += state.installed(module, KernelResnetForward) is not None
    return report


def is_patched(obj) -> bool:
    """True when some module of ``obj`` (or of its ``.transformer`` / ``.vae``) runs our kernels now."""
    return any(patch_report(obj).values())


def remove(obj):
    """Undo :func:`apply` on ``obj`` (and its ``.transformer`` / ``.vae``); returns ``obj``.
    Only what is still ours is undone: a processor set after ``apply`` stays."""
    for part in _parts(obj):
        if getattr(getattr(part, "_parallel_config", None), "context_parallel_config", None) is not None \
                and is_patched(part):
            raise ValueError(f"{type(part).__name__} runs context-parallel (enable_parallelism): remove() would "
                             "put back diffusers' processor, which attends over each rank's tokens only; "
                             "diffusers cannot undo enable_parallelism, so keep the patch")
        for module in part.modules():
            processor = getattr(module, "processor", None)
            if isinstance(processor, CogVideoXKernelAttnProcessor):
                module.set_processor(processor.original)
            state.uninstall(module, KernelBlockForward)
            state.uninstall(module, KernelConvForward)
            state.uninstall(module, KernelResnetForward)
            state.uninstall(module, KernelSpatialNormForward)
            state.uninstall(module, KernelUpsampleForward)
            state.uninstall(module, KernelDecoderForward)
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, SequenceRecorder):
                    del module._forward_pre_hooks[key]
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
        patched = part.__dict__.pop(state.STATE, None)
        plan = patched.get("cp_plan") if patched else None
        if plan is not None and part.__dict__.get("_cp_plan") is plan:
            del part.__dict__["_cp_plan"]
    return obj


__all__ = ["apply", "remove", "is_patched", "patch_report", "CogVideoXKernelAttnProcessor", "cogvideox_cp_plan"]
