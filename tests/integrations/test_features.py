"""The drop-in composes with diffusers' features (issue 12): each feature, in both orders (feature then
``apply``, ``apply`` then feature), against the unpatched model with the same feature on the same inputs:
fp32 rel err <= 1e-5, and our ops ran exactly where diffusers computes (our op calls == the unpatched
model's SDPA / GELU calls), or the feature is refused / taken by diffusers' path as documented.

CPU, tiny 5B-style transformer (RoPE, 2 blocks) and tiny VAE; the "GPU" of group offloading is the CPU.
Features that change which weights the ops see (LoRA, disk offload, fp8 casting) also run the Triton
kernels in the interpreter."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,  # noqa: E402
                       PyramidAttentionBroadcastConfig)
from diffusers.hooks import LayerSkipConfig, apply_layer_skip  # noqa: E402
from diffusers.models.attention_processor import (CogVideoXAttnProcessor2_0,  # noqa: E402
                                                  FusedCogVideoXAttnProcessor2_0)
from helpers import copy_of  # noqa: E402
from tiny import BACKENDS, OpSpy, make_transformer, make_vae, rel_err, transformer_inputs  # noqa: E402

from cogvideox_kernels.integrations import diffusers as integration  # noqa: E402

BUDGET = 1e-5
ORDERS = ["feature_then_apply", "apply_then_feature"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm2.linear"]
CPU = torch.device("cpu")


def needs(*modules):
    for name in modules:
        pytest.importorskip(name)


# ------------------------------------------------------------------------------------------ features


def add_lora(model, name="default", seed=11, **config):
    """A LoRA on the attention and FFN linears (and an adaLN linear) with a non-zero delta."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    options = dict(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    model.add_adapter(LoraConfig(**{**options, **config}), adapter_name=name)


def lora(model, tmp):
    add_lora(model)


def lora_two_adapters_weighted(model, tmp):
    add_lora(model, "a", seed=12)
    add_lora(model, "b", seed=13, r=2, lora_alpha=3, target_modules=["to_v", "ff.net.2"])
    model.set_adapters(["a", "b"], weights=[0.5, 1.5])


def lora_disabled(model, tmp):
    add_lora(model)
    model.disable_lora()


def lora_fused(model, tmp):
    add_lora(model)
    model.fuse_lora(lora_scale=0.7)


def lora_fused_unfused(model, tmp):
    add_lora(model)
    model.fuse_lora(lora_scale=0.7)
    model.unfuse_lora()


def lora_bias(model, tmp):
    add_lora(model, lora_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                p.normal_()


def group_offload(offload_type, disk):
    def feature(model, tmp):
        needs("accelerate")
        extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
        model.enable_group_offload(onload_device=CPU, offload_type=offload_type,
                                   offload_to_disk_path=str(tmp) if disk else None, **extra)
    return feature


def layerwise_casting(model, tmp):
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)


def lora_layerwise_casting(model, tmp):
    add_lora(model)
    layerwise_casting(model, tmp)


def lora_group_offload_disk(model, tmp):
    add_lora(model)
    group_offload("leaf_level", True)(model, tmp)


def sequential_cpu_offload(model, tmp):  # what enable_sequential_cpu_offload installs, minus the GPU
    needs("accelerate")
    from accelerate import cpu_offload

    cpu_offload(model, execution_device=CPU)


def model_cpu_offload(model, tmp):  # what enable_model_cpu_offload installs, minus the GPU
    needs("accelerate")
    from accelerate import cpu_offload_with_hook

    cpu_offload_with_hook(model, execution_device=CPU)


TIMESTEP = {"t": 0}  # what the pipeline's current timestep would be, for PAB / FasterCache


def first_block_cache(model, tmp):
    model.enable_cache(FirstBlockCacheConfig(threshold=0.3))


def pyramid_attention_broadcast(model, tmp):
    model.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: TIMESTEP["t"]))


def faster_cache(model, tmp):
    model.enable_cache(FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
        unconditional_batch_skip_range=2, attention_weight_callback=lambda _: 0.5,
        current_timestep_callback=lambda: TIMESTEP["t"], is_guidance_distilled=False, tensor_format="BFCHW"))


def mag_cache(model, tmp):
    model.enable_cache(MagCacheConfig(threshold=1.0, num_inference_steps=3, retention_ratio=0.0,
                                      mag_ratios=[1.0] * 3))


def layer_skip_ff(model, tmp):  # a FeedForwardSkipHook on block 0's ff: our FFN must not skip past it
    apply_layer_skip(model, LayerSkipConfig(indices=[0], skip_ff=True, skip_attention=False))


def layer_skip_block(model, tmp):
    apply_layer_skip(model, LayerSkipConfig(indices=[1], skip_attention=True, skip_ff=True))


def fused_qkv(model, tmp):
    model.fuse_qkv_projections()


# name -> (feature, denoising steps run, backends)
FEATURES = {
    "lora": (lora, 1, BACKENDS),
    "lora_two_adapters_weighted": (lora_two_adapters_weighted, 1, ["reference"]),
    "lora_disabled": (lora_disabled, 1, ["reference"]),
    "lora_fused": (lora_fused, 1, ["reference"]),
    "lora_fused_unfused": (lora_fused_unfused, 1, ["reference"]),
    "lora_bias": (lora_bias, 1, ["reference"]),
    "group_offload_leaf": (group_offload("leaf_level", False), 1, ["reference"]),
    "group_offload_leaf_disk": (group_offload("leaf_level", True), 1, BACKENDS),
    "group_offload_block": (group_offload("block_level", False), 1, ["reference"]),
    "group_offload_block_disk": (group_offload("block_level", True), 1, ["reference"]),
    "layerwise_casting_fp8": (layerwise_casting, 1, BACKENDS),
    "lora_layerwise_casting": (lora_layerwise_casting, 1, ["reference"]),
    "lora_group_offload_leaf_disk": (lora_group_offload_disk, 1, ["reference"]),
    "sequential_cpu_offload": (sequential_cpu_offload, 1, ["reference"]),
    "model_cpu_offload": (model_cpu_offload, 1, ["reference"]),
    "first_block_cache": (first_block_cache, 4, ["reference"]),
    "pyramid_attention_broadcast": (pyramid_attention_broadcast, 4, ["reference"]),
    "faster_cache": (faster_cache, 4, ["reference"]),
    "mag_cache": (mag_cache, 3, ["reference"]),
    "layer_skip_ff": (layer_skip_ff, 1, ["reference"]),
    "layer_skip_block": (layer_skip_block, 1, ["reference"]),
    "fused_qkv": (fused_qkv, 1, ["reference"]),
}


def _case(name, order, backend):
    marks = getattr(backend, "marks", ())
    backend = backend.values[0] if marks else backend
    return pytest.param(name, order, backend, marks=marks, id=f"{name}-{order}-{backend}")


# features that leave diffusers' own output as it was (the others must change it, or the test proves nothing)
KEEPS_OUTPUT = {"lora_disabled", "group_offload_leaf", "group_offload_leaf_disk",
                "group_offload_block", "group_offload_block_disk", "sequential_cpu_offload", "model_cpu_offload",
                "fused_qkv"}
CASES = [_case(name, order, backend) for name, (_, _, backends) in FEATURES.items() for order in ORDERS
         for backend in backends]


class DiffusersCalls:
    """Counts the SDPA and tanh-GELU calls of diffusers' own path (the unpatched model's)."""

    def __init__(self, monkeypatch):
        self.attention = self.ffn = 0
        sdpa, gelu = F.scaled_dot_product_attention, F.gelu

        def count_sdpa(*args, **kwargs):
            self.attention += 1
            return sdpa(*args, **kwargs)

        def count_gelu(*args, **kwargs):
            self.ffn += 1
            return gelu(*args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", count_sdpa)
        monkeypatch.setattr(F, "gelu", count_gelu)


def denoise(model, inputs, steps, fixed_timestep=False):
    """``steps`` calls as a pipeline makes them (cache context, timestep moving, latents changing a little)."""
    outs = []
    for i, t in enumerate([900, 700, 500, 300][:steps]):
        TIMESTEP["t"] = t
        step = dict(inputs, hidden_states=inputs["hidden_states"] * (1 + 0.01 * i))
        if not fixed_timestep:
            step["timestep"] = torch.tensor([t, t])
        with model.cache_context("cond"):
            outs.append(model(**step)[0])
    return torch.stack(outs)


@pytest.mark.parametrize("name, order, backend", CASES)
def test_feature(name, order, backend, tmp_path, monkeypatch, request):
    if backend == "triton":
        request.getfixturevalue("interpret")
    if name.startswith("lora"):
        needs("peft")
    feature, steps, _ = FEATURES[name]
    fixed = name == "first_block_cache"  # FBC caches when the first block's residual barely moves
    reference = make_transformer("5b")
    inputs = transformer_inputs(reference)
    feature(reference, tmp_path / "reference")
    with torch.no_grad():
        with monkeypatch.context() as m:
            expected = DiffusersCalls(m)
            ref = denoise(reference, inputs, steps, fixed)
        plain = denoise(make_transformer("5b"), inputs, steps, fixed)
    if name in KEEPS_OUTPUT:
        assert rel_err(ref, plain) <= BUDGET
    else:
        assert rel_err(ref, plain) > 1e-4, "the feature changes nothing here: the check would prove nothing"

    model = make_transformer("5b")
    if order == "feature_then_apply":
        feature(model, tmp_path / "model")
        integration.apply(model, backend=backend)
    else:
        integration.apply(model, backend=backend)
        feature(model, tmp_path / "model")
        if name == "fused_qkv":  # diffusers put its fused processor back: not ours until applied again
            assert integration.patch_report(model) == {"attention": 0, "ffn": 2, "vae": 0, "vae_resnet": 0}
            integration.apply(model, backend=backend)
    spy = OpSpy(monkeypatch)
    with torch.no_grad():
        out = denoise(model, inputs, steps, fixed)
    assert rel_err(out, ref) <= BUDGET
    # our ops ran wherever diffusers computes an attention / an FFN (a skipped FFN stays skipped)
    assert len(spy.attention_calls) == expected.attention > 0
    assert len(spy.ffn_calls) == expected.ffn > 0
    assert all(kw["backend"] == backend for _, kw in spy.attention_calls + spy.ffn_calls)
    if name == "fused_qkv":
        q, k, v = spy.attention_calls[0][0]  # views of the one to_qkv output
        assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()


# ------------------------------------------------------------------------ refusals and fallbacks


def test_lora_variant_and_training_dropout_take_diffusers_path(monkeypatch):
    needs("peft")
    inputs = transformer_inputs(make_transformer("5b"))
    for config in (dict(use_dora=True), dict(lora_dropout=0.5)):
        reference, model = make_transformer("5b"), make_transformer("5b")
        for m in (reference, model):
            add_lora(m, target_modules=["to_q", "ff.net.0.proj"], **config)
        integration.apply(model, backend="reference")
        if "lora_dropout" in config:  # dropout is the identity in eval: ours; in training mode it is not
            model.train(), reference.train()
        spy = OpSpy(monkeypatch)
        with torch.no_grad():
            torch.manual_seed(0)
            ref = reference(**inputs)[0]
            torch.manual_seed(0)
            out = model(**inputs)[0]
        assert not spy.ffn_calls, config  # the FFN half: diffusers' path (peft's own forward)
        assert rel_err(out, ref) <= BUDGET


def test_unknown_hook_on_a_skipped_module_takes_diffusers_path(monkeypatch):
    reference, model = make_transformer("5b"), make_transformer("5b")
    inputs = transformer_inputs(model)
    integration.apply(model, backend="reference")
    for m in (reference, model):  # a user's hooks that change the FFN output and block 0's normed keys
        m.transformer_blocks[1].ff.register_forward_hook(lambda mod, args, out: out * 0.5)
        m.transformer_blocks[0].attn1.norm_k.register_forward_hook(lambda mod, args, out: out * 2.0)
    spy = OpSpy(monkeypatch)
    with torch.no_grad():
        ref, out = reference(**inputs)[0], model(**inputs)[0]
    assert len(spy.ffn_calls) == 1  # block 0 ours, block 1 diffusers'
    # block 0's attention is still ours, with q/k normed by calling the norm modules (the hook runs)
    assert len(spy.attention_calls) == 2 and spy.attention_calls[0][1]["k_norm"] is None
    assert spy.attention_calls[1][1]["k_norm"] is not None
    assert rel_err(out, ref) <= BUDGET


def test_function_mode_takes_diffusers_attention(monkeypatch):
    # diffusers' LayerSkip(skip_attention_scores=True) rewrites SDPA's output with a TorchFunctionMode
    from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode

    reference, model = make_transformer("5b"), make_transformer("5b")
    inputs = transformer_inputs(model)
    integration.apply(model, backend="reference")
    spy = OpSpy(monkeypatch)
    with torch.no_grad(), AttentionScoreSkipFunctionMode():
        ref, out = reference(**inputs)[0], model(**inputs)[0]
    assert not spy.attention_calls and len(spy.ffn_calls) == 2
    assert rel_err(out, ref) <= BUDGET
    with torch.no_grad(), torch.device("cpu"):  # torch's own device mode changes nothing: ours
        model(**inputs)
    assert len(spy.attention_calls) == 2


@pytest.mark.parametrize("what", ["latents", "lora_weights"])
def test_autograd_takes_diffusers_path(what, monkeypatch):
    """Gradient guidance on the latents (weights frozen) or LoRA training (only adapters train)."""
    if what == "lora_weights":
        needs("peft")
    reference, model = make_transformer("5b"), make_transformer("5b")
    for m in (reference, model):
        m.requires_grad_(False)
        if what == "lora_weights":
            add_lora(m)  # adapter weights require grad
    integration.apply(model, backend="reference")
    inputs = transformer_inputs(model)
    grads = []
    spy = OpSpy(monkeypatch)
    for m in (reference, model):
        latents = inputs["hidden_states"].clone().requires_grad_(what == "latents")
        out = m(**dict(inputs, hidden_states=latents))[0]
        out.square().mean().backward()
        grads.append(latents.grad if what == "latents" else
                     m.transformer_blocks[0].ff.net[2].lora_A["default"].weight.grad)
    assert not spy.attention_calls and not spy.ffn_calls
    assert grads[1] is not None and rel_err(grads[1], grads[0]) <= BUDGET
    with torch.no_grad():  # and without grad mode: ours again
        model(**inputs)
    assert len(spy.ffn_calls) == 2


# ------------------------------------------------------------------ fused QKV, processors, state


def test_fuse_and_set_attn_processor_after_apply_keep_state_truthful(monkeypatch):
    model = make_transformer("5b")
    inputs = transformer_inputs(model)
    with torch.no_grad():
        ref = model(**inputs)[0]
    integration.apply(model, backend="reference")
    assert integration.patch_report(model) == {"attention": 2, "ffn": 2, "vae": 0, "vae_resnet": 0}
    model.fuse_qkv_projections()  # diffusers puts its fused processor on every attention
    assert integration.patch_report(model) == {"attention": 0, "ffn": 2, "vae": 0, "vae_resnet": 0}
    integration.apply(model, backend="reference")  # ours again, now over to_qkv
    assert integration.patch_report(model)["attention"] == 2
    spy = OpSpy(monkeypatch)
    with torch.no_grad():
        out = model(**inputs)[0]
    q, k, v = spy.attention_calls[0][0]
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert rel_err(out, ref) <= BUDGET
    model.unfuse_qkv_projections()  # diffusers restores the processors it saw at fuse time: ours
    assert integration.patch_report(model)["attention"] == 2
    assert all(isinstance(b.attn1.processor.original, CogVideoXAttnProcessor2_0) for b in model.transformer_blocks)

    mine = CogVideoXAttnProcessor2_0()
    model.transformer_blocks[0].attn1.set_processor(mine)  # the user's own change
    assert integration.patch_report(model) == {"attention": 1, "ffn": 2, "vae": 0, "vae_resnet": 0}
    integration.remove(model)
    assert not integration.is_patched(model)
    assert model.transformer_blocks[0].attn1.processor is mine  # remove never undoes the user's change
    assert type(model.transformer_blocks[1].attn1.processor) is CogVideoXAttnProcessor2_0
    assert all("forward" not in b.__dict__ for b in model.transformer_blocks)
    model.set_attn_processor(CogVideoXAttnProcessor2_0())
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], make_transformer("5b")(**inputs)[0])


def test_user_processor_set_before_apply_is_left_alone(monkeypatch):
    class Mine(CogVideoXAttnProcessor2_0):  # a user's own processor: not ours to replace
        pass

    model = make_transformer("5b")
    inputs = transformer_inputs(model)
    with torch.no_grad():
        ref = model(**inputs)[0]
    mine = Mine()
    model.transformer_blocks[1].attn1.set_processor(mine)
    with pytest.warns(UserWarning, match=r"1.attn1: Mine"):
        integration.apply(model, backend="reference")
    assert integration.patch_report(model) == {"attention": 1, "ffn": 2, "vae": 0, "vae_resnet": 0}
    spy = OpSpy(monkeypatch)
    with torch.no_grad():
        out = model(**inputs)[0]
    assert len(spy.attention_calls) == 1 and rel_err(out, ref) <= BUDGET
    integration.remove(model)
    assert model.transformer_blocks[1].attn1.processor is mine


def test_fused_before_apply_remove_restores_diffusers_fused_processor():
    model = make_transformer("5b")
    model.fuse_qkv_projections()
    integration.apply(model, backend="reference")
    assert all(b.attn1.processor.fused for b in model.transformer_blocks)
    integration.remove(model)
    assert all(type(b.attn1.processor) is FusedCogVideoXAttnProcessor2_0 for b in model.transformer_blocks)


def test_blocks_keep_their_class_and_registry():
    from diffusers.hooks._helpers import TransformerBlockRegistry
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    model = make_transformer("5b")
    integration.apply(model, backend="reference")
    assert all(type(b) is CogVideoXBlock for b in model.transformer_blocks)
    TransformerBlockRegistry.get(type(model.transformer_blocks[0]))


@pytest.mark.parametrize("how", ["deepcopy", "torch_save"])
def test_copies_are_patched_and_removable(how, monkeypatch):
    model = make_transformer("5b")
    inputs = transformer_inputs(model)
    integration.apply(model, backend="reference")
    copied = copy_of(model, how)
    assert integration.patch_report(copied) == {"attention": 2, "ffn": 2, "vae": 0, "vae_resnet": 0}
    integration.apply(copied, backend="reference")  # no second wrap
    assert not any(isinstance(b.attn1.processor.original, integration.CogVideoXKernelAttnProcessor)
                   for b in copied.transformer_blocks)
    assert all(b.forward.block is b for b in copied.transformer_blocks)  # the copy's forward runs the copy
    spy = OpSpy(monkeypatch)
    with torch.no_grad():
        ref, out = model(**inputs)[0], copied(**inputs)[0]
    assert len(spy.ffn_calls) == 4 and torch.equal(out, ref)
    with pytest.raises(ValueError, match="already patched"):
        integration.apply(copied, ffn=False, backend="reference")
    integration.remove(copied)
    assert not integration.is_patched(copied) and integration.is_patched(model)
    assert copied._cp_plan is None and "_cogvideox_kernels" not in copied.__dict__
    with torch.no_grad():
        assert torch.equal(copied(**inputs)[0], make_transformer("5b")(**inputs)[0])


def test_remove_after_hooks_puts_diffusers_forward_under_them(monkeypatch):
    needs("accelerate")
    model = make_transformer("5b")
    inputs = transformer_inputs(model)
    integration.apply(model, backend="reference")
    model.enable_group_offload(onload_device=CPU, offload_type="block_level", num_blocks_per_group=1)
    integration.remove(model)
    assert not integration.is_patched(model)
    spy = OpSpy(monkeypatch)
    with torch.no_grad():
        out = model(**inputs)[0]
        assert not spy.ffn_calls and not spy.attention_calls
        integration.apply(model, backend="reference")  # and back in, under the offload hooks
        again = model(**inputs)[0]
    assert len(spy.ffn_calls) == 2 and rel_err(again, out) <= BUDGET


# ------------------------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("feature", ["group_offload_leaf_disk", "group_offload_block", "layerwise_casting_fp8"])
def test_vae_features(feature, order, tmp_path, monkeypatch):
    # The ResNet blocks run vae_conv3d (2 calls per block per frame batch: 10 decoder blocks, latents of
    # 3 frames = 1 batch) with the weights the feature's hooks give; the causal convs causal_conv3d.
    needs("accelerate")

    def enable(vae, where):
        if feature == "layerwise_casting_fp8":
            vae.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        elif feature == "group_offload_block":
            vae.enable_group_offload(onload_device=CPU, offload_type="block_level", num_blocks_per_group=1)
        else:
            vae.enable_group_offload(onload_device=CPU, offload_type="leaf_level", offload_to_disk_path=str(where))

    latents = torch.randn(1, 4, 3, 2, 3, generator=torch.Generator().manual_seed(6))
    reference = make_vae()
    enable(reference, tmp_path / "reference")
    vae = make_vae()
    if order == "feature_then_apply":
        enable(vae, tmp_path / "vae")
        integration.apply(vae, backend="reference")
    else:
        integration.apply(vae, backend="reference")
        enable(vae, tmp_path / "vae")
    assert integration.patch_report(vae)["vae_resnet"] == 16
    spy = OpSpy(monkeypatch)
    seen_dtypes, op = set(), integration.vae_conv3d
    monkeypatch.setattr(integration, "vae_conv3d", lambda *a, **k: (seen_dtypes.add(k["weight"].dtype), op(*a, **k))[1])
    with torch.no_grad():
        ref, out = reference.decode(latents).sample, vae.decode(latents).sample
    assert len(spy.conv_calls) > 0 and len(spy.vae_conv_calls) == 2 * 10 and rel_err(out, ref) <= BUDGET
    assert rel_err(ref, make_vae().decode(latents).sample) > 1e-4 or feature != "layerwise_casting_fp8"
    assert seen_dtypes == {torch.float32}  # the compute dtype, never the fp8 storage
    integration.remove(vae)
    with torch.no_grad():
        assert rel_err(vae.decode(latents).sample, ref) <= BUDGET
    assert len(spy.vae_conv_calls) == 2 * 10
