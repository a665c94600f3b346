"""The CogVideoX transformer model: shapes, exact param_count, every option changes the model,
backend switching, input errors; and ``models.cogvideox.build`` / ``recommended_defaults``."""
import inspect

import pytest
import torch

from cogvideox_kernels.models.transformer import (TRANSFORMER_DEFAULTS, CogVideoXTransformer, build_transformer,
                                                  param_count)
from cogvideox_kernels.nn.attention import RoPE3DAttention
from cogvideox_kernels.nn.expert_ffn import ExpertFFN
from helpers import rel_err

# A tiny model: hidden 48 (3 heads of 16), 2 layers, 4 latent channels, 6 x 8 latents, 3 latent frames.
TINY = dict(hidden_size=48, num_heads=3, num_layers=2, num_frames=9, text_hidden_size=20, latent_channels=4,
            time_embed_dim=24, sample_height=6, sample_width=8, mlp_ratio=2.0, backend="reference")


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_transformer(**{**TINY, **overrides})


def inputs(model, B=2, T=3, H=6, W=8, text_len=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(B, T, model.latent_channels, H, W, generator=g)
    text = torch.randn(B, text_len, model.text_proj.in_features, generator=g)
    timestep = torch.randint(0, 1000, (B,), generator=g).float()
    return latents, text, timestep


def counted(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- shapes and inputs

@pytest.mark.parametrize("shape,text_len", [((2, 3, 6, 8), 5), ((1, 1, 4, 2), 0), ((2, 5, 2, 6), 1)])
def test_forward_shape_and_any_grid(shape, text_len):
    model = tiny()
    B, T, H, W = shape
    latents, text, timestep = inputs(model, B, T, H, W, text_len)
    with torch.no_grad():
        out = model(latents, text, timestep)
    assert out.shape == latents.shape and out.dtype == latents.dtype
    assert torch.isfinite(out).all()
    assert (T, H // 2, W // 2) == model.patch_embed.grid(latents.shape)


def test_every_input_matters():
    model = tiny()
    latents, text, timestep = inputs(model)
    with torch.no_grad():
        base = model(latents, text, timestep)
        assert rel_err(model(latents + 0.1 * torch.randn_like(latents), text, timestep), base) > 1e-4
        assert rel_err(model(latents, text + 0.1 * torch.randn_like(text), timestep), base) > 1e-4
        assert rel_err(model(latents, text, timestep + 100), base) > 1e-4


def test_video_tokens_see_their_position():
    """Swapping two latent frames must not just swap the outputs: positions are encoded."""
    for use_rope in (True, False):
        model = tiny(use_rope=use_rope)
        latents, text, timestep = inputs(model)
        swapped = latents[:, [1, 0, 2]]
        with torch.no_grad():
            out, out_swapped = model(latents, text, timestep), model(swapped, text, timestep)
        assert rel_err(out_swapped[:, [1, 0, 2]], out) > 1e-4


def test_patch_t_groups_frames_and_refuses_odd_counts():
    model = tiny(patch_size=(2, 2, 2), num_frames=13)  # 4 latent frames -> 2 token frames
    assert model.default_grid == (2, 3, 4)
    latents, text, timestep = inputs(model, T=4)
    with torch.no_grad():
        assert model(latents, text, timestep).shape == latents.shape
    with pytest.raises(ValueError, match="frames T=3"):
        model(*inputs(model, T=3))


def test_low_precision_runs_close_to_float32():
    model = tiny()
    latents, text, timestep = inputs(model)
    with torch.no_grad():
        ref = model(latents, text, timestep)
        out = model.to(torch.bfloat16)(latents.bfloat16(), text.bfloat16(), timestep)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 5e-2


@pytest.mark.parametrize("make_bad,match", [
    (lambda l, t, s: (l[:, :, :3], t, s), "latent_channels=4"),
    (lambda l, t, s: (l[0], t, s), r"\[B, T, C, H, W\]"),
    (lambda l, t, s: (l[..., :5], t, s), "width W=5"),
    (lambda l, t, s: (l, t[..., :7], s), "text_hidden_size=20"),
    (lambda l, t, s: (l, t[:1], s), "text_embeddings"),
    (lambda l, t, s: (l, t, s[:1]), "timestep"),
    (lambda l, t, s: (l, t, 5.0), "timestep"),
])
def test_forward_errors(make_bad, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        model(*make_bad(*inputs(model)))


# ---------------------------------------------------------------- param_count

PARAM_SETS = [
    {},
    dict(shared_ffn=True),
    dict(num_text_experts=2, num_video_experts=3),
    dict(num_video_experts=4, qk_norm=False, mlp_ratio=2.5),
    dict(patch_size=(2, 2, 2), use_rope=False, num_layers=3),
    dict(patch_size=(1, 1, 3), hidden_size=64, num_heads=4, time_embed_dim=40, latent_channels=5, sample_width=9),
]


@pytest.mark.parametrize("opts", PARAM_SETS)
def test_param_count_is_exact(opts):
    options = {**TINY, **opts}
    assert param_count(**options) == counted(tiny(**opts))


@pytest.mark.parametrize("opts", [{}, dict(hidden_size=3072, shared_ffn=True),  # seed defaults, CogVideoX-5B
                                  dict(hidden_size=1920, num_heads=30, num_layers=30, shared_ffn=True,
                                       use_rope=False, qk_norm=True)])  # CogVideoX-2B
def test_param_count_is_exact_at_real_sizes(opts, monkeypatch):
    monkeypatch.undo()  # conftest's NaN-poisoned torch.empty would bypass the meta-device context
    with torch.device("meta"):  # parameters without memory: only their shapes are counted
        if not torch.nn.Linear(2, 2).weight.is_meta:
            pytest.skip("torch.empty is patched: a meta-device build would allocate billions of floats")
        model = build_transformer(**opts)
    assert param_count(**opts) == counted(model)


def test_param_count_checks_options():
    with pytest.raises(ValueError, match="unknown transformer option"):
        param_count(hidden=12)
    with pytest.raises(ValueError, match="num_heads"):
        param_count(hidden_size=50, num_heads=3)


# ---------------------------------------------------------------- every option changes the model

def signature(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


OPTION_CHANGES = [  # option, a value different from TINY / the default
    ("patch_size", (1, 3, 2)), ("hidden_size", 96), ("num_heads", 2), ("num_layers", 1),
    ("text_hidden_size", 12), ("mlp_ratio", 3.0), ("num_text_experts", 2), ("num_video_experts", 2),
    ("latent_channels", 3), ("shared_ffn", True), ("use_rope", False), ("qk_norm", False),
    ("time_embed_dim", 16), ("num_frames", 5), ("sample_height", 4), ("sample_width", 10),
    ("temporal_compression", 2),
]


def test_option_list_covers_every_option():
    options = set(inspect.signature(build_transformer).parameters) - {"backend"}
    assert options == set(TRANSFORMER_DEFAULTS) == {name for name, _ in OPTION_CHANGES}


@pytest.mark.parametrize("name,value", OPTION_CHANGES, ids=[n for n, _ in OPTION_CHANGES])
def test_every_option_changes_the_model(name, value):
    base, variant = tiny(), tiny(**{name: value})
    assert variant.config[name] == value and base.config[name] != value
    if signature(base) != signature(variant):
        return  # different parameters
    if base.default_grid != variant.default_grid:  # the precomputed position tables' grid
        assert len(variant.position_tables(variant.default_grid, torch.device("cpu"))[0]) != \
            len(base.position_tables(base.default_grid, torch.device("cpu"))[0])
        return
    # same parameters (same seed, same shapes): the computation itself must differ
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), variant.state_dict().values()))
    latents, text, timestep = inputs(base)
    with torch.no_grad():
        assert rel_err(variant(latents, text, timestep), base(latents, text, timestep)) > 1e-4


def test_default_grid_follows_num_frames_and_compression():
    assert tiny().default_grid == (3, 3, 4)                          # (9 - 1) // 4 + 1 = 3
    assert tiny(num_frames=49, sample_height=60, sample_width=90).default_grid == (13, 30, 45)
    assert tiny(num_frames=9, temporal_compression=2).default_grid == (5, 3, 4)
    assert tiny(patch_size=(2, 2, 2), num_frames=81).default_grid == (11, 3, 4)  # 21 frames, padded to 22


def test_routed_experts_route_in_the_model():
    model = tiny(num_text_experts=2, num_video_experts=3)
    ffn = model.blocks[0].ffn
    assert ffn.text_router is not None and ffn.video_router is not None and ffn.w1.shape[0] == 5
    latents, text, timestep = inputs(model)
    with torch.no_grad():
        base = model(latents, text, timestep)
        ffn.w2[3].add_(0.5)  # one video expert: only the tokens routed to it change
        changed = (model(latents, text, timestep) - base).abs().flatten(2).amax(-1)
    assert (changed > 1e-6).any()


@pytest.mark.parametrize("opts,match", [
    (dict(num_heads=5), "num_heads"),
    (dict(shared_ffn=True, num_video_experts=2), "shared_ffn"),
    (dict(hidden_size=54, num_heads=6), "head_dim=9"),
    (dict(hidden_size=40, num_heads=2, use_rope=False), "multiple of 16"),
    (dict(patch_size=(2, 2)), "patch_size"),
    (dict(patch_size=(1, 0, 2)), "patch_size"),
    (dict(sample_height=7), "sample_height=7"),
    (dict(num_layers=0), "num_layers"),
    (dict(mlp_ratio=0.001), "mlp_ratio"),
    (dict(use_rope="yes"), "use_rope"),
    (dict(num_text_experts=0), "num_text_experts"),
    (dict(backend="cuda"), "backend"),
])
def test_invalid_options_raise(opts, match):
    with pytest.raises(ValueError, match=match):
        tiny(**opts)
    with pytest.raises(ValueError, match="unknown transformer option"):
        CogVideoXTransformer(**TINY, heads=3)


# ---------------------------------------------------------------- backends

def test_backend_reaches_every_module_and_never_changes_state():
    ref, auto = tiny(backend="reference"), tiny(backend="auto")
    assert [(k, torch.equal(v, auto.state_dict()[k])) for k, v in ref.state_dict().items()] == \
        [(k, True) for k in ref.state_dict()]
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ref.backend = "triton"
    kernels = [m for m in ref.modules() if isinstance(m, (RoPE3DAttention, ExpertFFN))]
    assert len(kernels) == 2 * TINY["num_layers"] and all(m.backend == "triton" for m in kernels)
    assert all(b.backend == "triton" for b in ref.blocks)
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    with pytest.raises(ValueError, match="backend"):
        ref.backend = "tensorrt"


def test_triton_model_equals_reference(interpret):
    model = tiny(num_layers=1, num_text_experts=1, num_video_experts=2)
    latents, text, timestep = inputs(model, B=1, T=2, H=4, W=6, text_len=3)
    with torch.no_grad():
        ref = model(latents, text, timestep)
        model.backend = "triton"
        out = model(latents, text, timestep)
    assert rel_err(out, ref) <= 1e-5


# ---------------------------------------------------------------- the whole model: build()

def _vae_ready():
    from cogvideox_kernels.models import cogvideox

    return cogvideox


TINY_BUILD = dict(hidden_size=48, num_heads=3, num_layers=1, text_hidden_size=20, latent_channels=4,
                  time_embed_dim=24, num_frames=9, height=32, width=48, base_channels=8, mlp_ratio=2.0)


def test_recommended_defaults_are_the_seed_defaults():
    cogvideox = _vae_ready()
    d = cogvideox.recommended_defaults()
    assert all(not isinstance(v, dict) for v in d.values())  # one flat option set, as build takes
    vae, transformer = cogvideox.recommended_defaults("vae"), cogvideox.recommended_defaults("transformer")
    assert {k: vae[k] for k in ("in_channels", "latent_channels", "num_frames", "spatial_downsample",
                                "temporal_downsample", "base_channels")} == dict(
        in_channels=3, latent_channels=16, num_frames=49, spatial_downsample=8, temporal_downsample=4, base_channels=128)
    assert transformer == {name: p.default for name, p in inspect.signature(build_transformer).parameters.items()
                           if name != "backend"}
    assert (d["height"], d["width"], d["num_frames"]) == (480, 720, 49)
    assert transformer["sample_height"] == d["height"] // vae["spatial_downsample"]
    assert set(d) == set(vae) | set(transformer) - {"sample_height", "sample_width", "temporal_compression"} | {
        "height", "width"}
    assert param_count(**transformer) == 3_605_791_872
    with pytest.raises(ValueError, match="part='unet'"):
        cogvideox.recommended_defaults("unet")


def test_recommended_defaults_round_trip_through_build():
    """build(**recommended_defaults()) and the split parts build the same model (on meta: no memory)."""
    cogvideox = _vae_ready()
    from cogvideox_kernels.models import build_vae

    with torch.device("meta"):
        model = cogvideox.build(**cogvideox.recommended_defaults())
        encoder, decoder = build_vae(**cogvideox.recommended_defaults("vae"))
        transformer = build_transformer(**cogvideox.recommended_defaults("transformer"))
    assert model.transformer.config == transformer.config
    assert counted(model.transformer) == counted(transformer) == 3_605_791_872
    for ours, theirs in ((model.encoder, encoder), (model.decoder, decoder), (model.transformer, transformer)):
        assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    for key, value in cogvideox.recommended_defaults().items():  # every default reached the model
        assert model.config[key] == value, key
    changed = cogvideox.recommended_defaults()
    changed.update(num_layers=1, hidden_size=96, height=96, width=160, base_channels=8)
    with torch.device("meta"):
        small = cogvideox.build(**changed)
    assert small.transformer.config["sample_height"] == 12 and small.transformer.config["num_layers"] == 1


def test_build_shares_options_between_vae_and_transformer():
    cogvideox = _vae_ready()
    model = cogvideox.build(**TINY_BUILD, backend="reference")
    assert isinstance(model, torch.nn.Module)
    assert {"encoder", "decoder", "transformer"} <= dict(model.named_children()).keys()
    t = model.transformer
    assert t.latent_channels == 4 and t.config["num_frames"] == 9 and t.backend == "reference"
    assert t.default_grid == (3, 32 // 8 // 2, 48 // 8 // 2)  # latent grid of a 9 x 32 x 48 video
    assert model.encoder.backend == "reference"
    assert param_count(**{k: v for k, v in t.config.items()}) == counted(t)
    # latents of the VAE's shape go through the transformer
    latents = torch.randn(1, 3, 4, 4, 6)
    with torch.no_grad():
        assert t(latents, torch.randn(1, 2, 20), torch.tensor([10.0])).shape == latents.shape
    other = cogvideox.build(**{**TINY_BUILD, "latent_channels": 6})
    assert other.transformer.latent_channels == 6
    assert other.config["latent_channels"] == 6


def test_build_derives_the_latent_grid_and_refuses_contradictions():
    cogvideox = _vae_ready()
    model = cogvideox.build(**{**TINY_BUILD, "temporal_downsample": 2}, backend="triton")
    assert model.transformer.config["temporal_compression"] == 2 and model.transformer.backend == "triton"
    assert model.encoder.backend == "auto"  # the VAE has no Triton kernel: it keeps choosing itself
    with pytest.raises(ValueError, match="sample_height"):
        cogvideox.build(**{**TINY_BUILD, "sample_height": 3})
    with pytest.raises(ValueError, match="height=30"):
        cogvideox.build(**{**TINY_BUILD, "height": 30})


@pytest.mark.parametrize("opts,match", [(dict(heads=3), "unknown option"), (dict(backend="tpu"), "backend"),
                                        (dict(device="cpu"), "unknown option")])
def test_build_errors(opts, match):
    cogvideox = _vae_ready()
    with pytest.raises(ValueError, match=match):
        cogvideox.build(**{**TINY_BUILD, **opts})


def test_position_tables_are_cached_per_grid_and_device():
    model = tiny()
    cpu = torch.device("cpu")
    default = model.position_tables(model.default_grid, cpu)  # made at build time
    assert model.position_tables(model.default_grid, cpu) is default
    cos, sin = default
    assert cos.shape == (3 * 3 * 4, 16) and cos.dtype == torch.float32
    other = model.position_tables((1, 2, 2), cpu)
    assert other[0].shape == (4, 16) and model.position_tables((1, 2, 2), cpu) is other
    sincos = tiny(use_rope=False).position_tables((1, 2, 2), cpu)
    assert sincos.shape == (4, 48)


def test_meta_model_propagates_shapes():
    """On meta tensors auto runs the references (no kernel runs without data): shapes come out right."""
    with torch.device("meta"):
        model = tiny(backend="auto", num_video_experts=1)
    latents = torch.randn(1, 3, 4, 6, 8, device="meta")
    out = model(latents, torch.randn(1, 5, 20, device="meta"), torch.tensor([3.0], device="meta"))
    assert out.shape == latents.shape and out.is_meta
