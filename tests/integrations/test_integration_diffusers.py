"""diffusers drop-in: tiny random CogVideoX transformers (2B-, 5B- and 1.5-style configs) and a tiny
VAE on the CPU, patched vs unpatched, plus remove(), no weight copies and clear refusals."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402
from tiny import (BACKENDS, CONFIGS, HEIGHT, TEXT_LEN, TRITON_READY, WIDTH, OpSpy, make_transformer,  # noqa: E402
                  make_vae, rel_err, transformer_inputs)

from cogvideox_kernels.integrations import diffusers as integration  # noqa: E402


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformer_parity(name, backend, monkeypatch, request):
    if backend == "triton":
        request.getfixturevalue("interpret")
    model = make_transformer(name)
    inputs = transformer_inputs(model)
    with torch.no_grad():
        ref = model(**inputs)[0]
        spy = OpSpy(monkeypatch)
        integration.apply(model, backend=backend)
        out = model(**inputs)[0]
    # every block took both of our ops (the fallbacks were not used)
    assert len(spy.attention_calls) == 2 and len(spy.ffn_calls) == 2
    assert all(kw["backend"] == backend for _, kw in spy.attention_calls + spy.ffn_calls)
    rope_given = model.config.use_rotary_positional_embeddings
    assert all((kw["cos"] is not None) == rope_given for _, kw in spy.attention_calls)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5


def test_remove_restores_bit_identical_outputs():
    model = make_transformer("5b")
    inputs = transformer_inputs(model)
    classes = [type(b) for b in model.transformer_blocks]
    processors = [b.attn1.processor for b in model.transformer_blocks]
    with torch.no_grad():
        ref = model(**inputs)[0]
        integration.apply(model, backend="reference")
        assert integration.is_patched(model)
        patched = model(**inputs)[0]
        integration.remove(model)
        back = model(**inputs)[0]
    assert not integration.is_patched(model)
    wrapped = torch.compile(model)  # a compiled wrapper is unwrapped, not refused
    integration.apply(wrapped, backend="reference")
    assert integration.is_patched(model) and integration.is_patched(wrapped)
    integration.remove(wrapped)
    assert not integration.is_patched(model)
    assert [type(b) for b in model.transformer_blocks] == classes
    assert all(b.attn1.processor is p for b, p in zip(model.transformer_blocks, processors))
    assert torch.equal(back, ref)
    assert not torch.equal(patched, torch.zeros_like(patched))


def test_no_weight_copies(monkeypatch):
    model = make_transformer("5b")
    params_before = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    inputs = transformer_inputs(model)
    spy = OpSpy(monkeypatch)
    with torch.no_grad():
        integration.apply(model, backend="reference")
        model(**inputs)
    params_after = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    assert params_after.keys() == params_before.keys()
    assert all(params_after[n][0] is params_before[n][0] and params_after[n][1] == params_before[n][1]
               for n in params_before)
    for block, (args, kwargs) in zip(model.transformer_blocks, spy.ffn_calls):
        x, modulation, w1, b1, w2, b2 = args
        assert w1.data_ptr() == block.ff.net[0].proj.weight.data_ptr()
        assert b1.data_ptr() == block.ff.net[0].proj.bias.data_ptr()
        assert w2.data_ptr() == block.ff.net[2].weight.data_ptr()
        assert b2.data_ptr() == block.ff.net[2].bias.data_ptr()
        assert kwargs["norm_weight"] is block.norm2.norm.weight and kwargs["num_text_experts"] == 0
    for block, (args, kwargs) in zip(model.transformer_blocks, spy.attention_calls):
        assert kwargs["q_norm"][0] is block.attn1.norm_q.weight
        assert kwargs["k_norm"][1] is block.attn1.norm_k.bias
        assert kwargs["eps"] == block.attn1.norm_q.eps
    assert model.state_dict().keys() == make_transformer("5b").state_dict().keys()


def test_fused_qkv_projection_is_used(monkeypatch):
    model = make_transformer("5b")
    inputs = transformer_inputs(model)
    with torch.no_grad():
        ref = model(**inputs)[0]
        model.fuse_qkv_projections()
        spy = OpSpy(monkeypatch)
        integration.apply(model, backend="reference")
        out = model(**inputs)[0]
    q, k, v = spy.attention_calls[0][0]
    # q, k, v are strided views of one fused projection output
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert rel_err(out, ref) <= 1e-5


def test_attention_only_and_ffn_only():
    model = make_transformer("2b")
    inputs = transformer_inputs(model)
    with torch.no_grad():
        ref = model(**inputs)[0]
        integration.apply(model, attention=True, ffn=False, backend="reference")
        assert type(model.transformer_blocks[0]).__name__ == "CogVideoXBlock"
        attention_only = model(**inputs)[0]
        integration.remove(model)
        integration.apply(model, attention=False, ffn=True, backend="reference")
        assert not isinstance(model.transformer_blocks[0].attn1.processor,
                              integration.CogVideoXKernelAttnProcessor)
        ffn_only = model(**inputs)[0]
    assert rel_err(attention_only, ref) <= 1e-5 and rel_err(ffn_only, ref) <= 1e-5


def test_attention_mask_and_autograd_fall_back(monkeypatch):
    model = make_transformer("5b")
    inputs = transformer_inputs(model)
    integration.apply(model, backend="reference")
    spy = OpSpy(monkeypatch)
    out = model(**inputs)[0]  # grad enabled, parameters require grad: diffusers' path
    assert not spy.attention_calls and not spy.ffn_calls
    out.square().mean().backward()
    assert model.transformer_blocks[0].ff.net[0].proj.weight.grad is not None
    attn = model.transformer_blocks[0].attn1
    tokens = torch.randn(2, 5, attn.inner_dim)
    with torch.no_grad():
        mask = torch.ones(2, 5 + TEXT_LEN, dtype=torch.bool)
        attn(hidden_states=tokens, encoder_hidden_states=torch.randn(2, TEXT_LEN, attn.inner_dim),
             attention_mask=mask)
    assert not spy.attention_calls


def test_apply_twice_is_idempotent_or_refused():
    model = make_transformer("2b")
    integration.apply(model, backend="reference")
    processors = [b.attn1.processor for b in model.transformer_blocks]
    integration.apply(model, backend="reference")  # same options: nothing changes
    assert [b.attn1.processor for b in model.transformer_blocks] == processors
    assert all(not isinstance(p.original, integration.CogVideoXKernelAttnProcessor) for p in processors)
    with pytest.raises(ValueError, match="already patched"):
        integration.apply(model, ffn=False, backend="reference")
    integration.remove(model)
    integration.apply(model, ffn=False, backend="reference")


def test_refuses_unknown_objects_and_activations():
    with pytest.raises(TypeError, match="Linear is not supported"):
        integration.apply(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="object is not supported"):
        integration.apply(object())

    class FakePipeline:
        transformer = torch.nn.Linear(2, 2)
        vae = None

    with pytest.raises(TypeError, match="FakePipeline.transformer is a Linear"):
        integration.apply(FakePipeline())
    with pytest.raises(ValueError, match="approximate='none'"):
        integration.apply(make_transformer("2b", activation_fn="gelu"))
    with pytest.raises(ValueError, match="backend='fast'"):
        integration.apply(make_transformer("2b"), backend="fast")
    model = make_transformer("2b")
    integration.apply(model, ffn=False)  # attention only never needs the FFN's activation
    integration.remove(model)


def test_pipeline_like_object(monkeypatch):
    class Pipeline:  # what apply() needs from CogVideoXPipeline: .transformer and .vae
        def __init__(self):
            self.transformer = make_transformer("2b")
            self.vae = make_vae()

    pipe = Pipeline()
    inputs = transformer_inputs(pipe.transformer)
    with torch.no_grad():
        ref = pipe.transformer(**inputs)[0]
        integration.apply(pipe, backend="reference")
        assert integration.is_patched(pipe.transformer) and integration.is_patched(pipe.vae)
        out = pipe.transformer(**inputs)[0]
        integration.remove(pipe)
        assert not integration.is_patched(pipe)
    assert rel_err(out, ref) <= 1e-5


# ------------------------------------------------------------------------------------------------
# VAE


def test_vae_parity_with_streaming_caches(monkeypatch):
    vae = make_vae()
    g = torch.Generator().manual_seed(3)
    video = torch.randn(1, 3, 9, 16, 24, generator=g)
    latents = torch.randn(1, 4, 5, 2, 3, generator=g)  # 5 latent frames: decoded in 2 chunks with caches
    with torch.no_grad():
        ref_z = vae.encode(video).latent_dist.mode()
        ref_x = vae.decode(latents).sample
        spy = OpSpy(monkeypatch)
        integration.apply(vae, backend="reference")
        z = vae.encode(video).latent_dist.mode()
        x = vae.decode(latents).sample
    assert spy.conv_calls, "no conv went through causal_conv3d"
    assert any(kw.get("cache") is not None for _, kw in spy.conv_calls), "the chunk cache was never passed"
    kernel_shapes = {tuple(args[1].shape[2:]) for args, _ in spy.conv_calls}
    assert kernel_shapes == {(3, 3, 3), (1, 1, 1)}
    assert rel_err(z, ref_z) <= 1e-5 and rel_err(x, ref_x) <= 1e-5
    with torch.no_grad():
        integration.remove(vae)
        assert torch.equal(vae.decode(latents).sample, ref_x)
    assert not any(type(m).__name__.startswith("Kernel") for m in vae.modules())


def test_vae_auto_without_covering_kernel_warns_and_changes_nothing():
    vae = make_vae()
    with pytest.warns(UserWarning, match="changes nothing"):
        integration.apply(vae)  # CPU tensors: no CUDA conv kernel covers any conv here
    assert not any(type(m).__name__.startswith("Kernel") for m in vae.modules())
    integration.remove(vae)


@pytest.mark.skipif(not TRITON_READY, reason="Triton kernels (custom ops) not in the tree yet")
def test_patched_block_compiles_without_graph_breaks(interpret):
    # Our ops are custom ops with fake implementations: dynamo traces a patched block in one graph.
    model = make_transformer("5b")
    inputs = transformer_inputs(model)
    integration.apply(model, backend="triton")
    block = model.transformer_blocks[0]
    g = torch.Generator().manual_seed(4)
    frames = CONFIGS["5b"][1]
    hidden = torch.randn(2, frames * (HEIGHT // 2) * (WIDTH // 2), 48, generator=g)
    text = torch.randn(2, TEXT_LEN, 48, generator=g)
    temb = torch.randn(2, 24, generator=g)
    rope = inputs["image_rotary_emb"]
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    with torch.no_grad():
        ref = block(hidden, text, temb, rope)
        out = compiled(hidden, text, temb, rope)
    assert all(rel_err(o, r) <= 1e-6 for o, r in zip(out, ref))


def test_vae_cpp_backend_takes_the_convs_it_covers(monkeypatch):
    from cogvideox_kernels._ext import extension_available

    if not extension_available():
        pytest.skip("the C++ extension is not built")
    vae = make_vae()
    latents = torch.randn(1, 4, 5, 2, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = vae.decode(latents).sample
        spy = OpSpy(monkeypatch)
        integration.apply(vae, backend="cpp")
        out = vae.decode(latents).sample
    kernel_shapes = {tuple(args[1].shape[2:]) for args, _ in spy.conv_calls}
    assert kernel_shapes == {(1, 1, 1)}  # the spatial norms' convs; the (3,3,3) ones stay on torch
    assert rel_err(out, ref) <= 1e-5


def test_package_imports_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import cogvideox_kernels, cogvideox_kernels.integrations.diffusers as d\n"
            "try:\n    d.apply(object())\nexcept ImportError as e:\n    print('ImportError', e)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs diffusers" in result.stdout


def test_no_warning_noise_on_transformer_apply():
    model = make_transformer("5b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        integration.apply(model, vae=False, backend="reference")


@pytest.mark.gpu
def test_gpu_bf16_patched_step_and_compile():
    # auto picks the Triton kernels on the GPU; error vs a float32 run within 2x diffusers' bf16 error.
    model = make_transformer("5b", num_attention_heads=2, attention_head_dim=64).cuda()
    inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in transformer_inputs(model).items()}
    inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(embed_dim=64, crops_coords=((0, 0), (2, 3)),
                                                         grid_size=(2, 3), temporal_size=CONFIGS["5b"][1],
                                                         device="cuda")
    with torch.no_grad():
        ref = model(**inputs)[0].float()
        model.to(torch.bfloat16)
        bf16 = {**inputs, "hidden_states": inputs["hidden_states"].bfloat16(),
                "encoder_hidden_states": inputs["encoder_hidden_states"].bfloat16()}
        eager_err = rel_err(model(**bf16)[0].float(), ref)
        integration.apply(model)
        ours_err = rel_err(model(**bf16)[0].float(), ref)
        for block in model.transformer_blocks:
            block.compile(fullgraph=True)
        compiled_err = rel_err(model(**bf16)[0].float(), ref)
    budget = max(1e-2, 2 * eager_err)
    assert ours_err <= budget and compiled_err <= budget, (eager_err, ours_err, compiled_err)
