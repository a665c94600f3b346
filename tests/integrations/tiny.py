"""Tiny random diffusers CogVideoX models (2B-, 5B- and 1.5-style transformers, a VAE) and helpers shared
by the integration tests."""
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from cogvideox_kernels.integrations import diffusers as integration

OPS = Path(__file__).resolve().parents[2] / "cogvideox_kernels" / "ops"
TRITON_READY = (OPS / "attention" / "triton_fwd.py").exists() and (OPS / "expert_ffn" / "triton_fwd.py").exists()

TEXT_LEN, HEIGHT, WIDTH = 7, 4, 6
# name -> (model config, latent frames)
CONFIGS = {
    # CogVideoX-2B: no RoPE (sincos positional embeddings need hidden % 16 == 0), head_dim 40
    "2b": (dict(num_attention_heads=4, attention_head_dim=40, use_rotary_positional_embeddings=False), 3),
    # CogVideoX-5B: RoPE3D on video tokens (diffusers' tables need head_dim % 16 == 0), 3 heads
    "5b": (dict(num_attention_heads=3, attention_head_dim=16, use_rotary_positional_embeddings=True), 5),
    # CogVideoX1.5-5B: temporal patches of 2, "slice" RoPE grid, ofs embedding
    "1.5-5b": (dict(num_attention_heads=3, attention_head_dim=16, use_rotary_positional_embeddings=True,
                    patch_size_t=2, ofs_embed_dim=24), 4),
}


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_transformer(name, seed=0, **overrides):
    config, frames = CONFIGS[name]
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        in_channels=4, out_channels=4, time_embed_dim=24, text_embed_dim=12, num_layers=2,
        sample_width=WIDTH, sample_height=HEIGHT, sample_frames=(frames - 1) * 4 + 1, patch_size=2,
        max_text_seq_length=TEXT_LEN, **{**config, **overrides}).eval()
    with torch.no_grad():  # random weights large enough that every part matters
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def transformer_inputs(model, seed=1):
    cfg = model.config
    frames = CONFIGS_BY_FRAMES[cfg.sample_frames]
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(2, frames, cfg.in_channels, HEIGHT, WIDTH, generator=g),
        encoder_hidden_states=torch.randn(2, TEXT_LEN, cfg.text_embed_dim, generator=g),
        timestep=torch.tensor([17, 503]), return_dict=False)
    if cfg.ofs_embed_dim:
        inputs["ofs"] = torch.tensor([2.0, 2.0])
    if cfg.use_rotary_positional_embeddings:
        grid = (HEIGHT // cfg.patch_size, WIDTH // cfg.patch_size)
        if cfg.patch_size_t is None:  # as CogVideoXPipeline builds them
            rope = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=((0, 0), grid),
                                           grid_size=grid, temporal_size=frames)
        else:
            rope = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=grid,
                                           temporal_size=(frames + cfg.patch_size_t - 1) // cfg.patch_size_t,
                                           grid_type="slice", max_size=grid)
        inputs["image_rotary_emb"] = rope
    return inputs


CONFIGS_BY_FRAMES = {(f - 1) * 4 + 1: f for _, f in CONFIGS.values()}


class OpSpy:
    """Counts the op calls the integration makes and records the weights they were handed."""

    def __init__(self, monkeypatch):
        self.attention_calls, self.ffn_calls, self.conv_calls, self.vae_conv_calls = [], [], [], []
        for name, log in (("rope3d_attention", self.attention_calls), ("expert_ffn", self.ffn_calls),
                          ("causal_conv3d", self.conv_calls), ("vae_conv3d", self.vae_conv_calls)):
            real = getattr(integration, name)

            def spy(*args, _real=real, _log=log, **kwargs):
                _log.append((args, kwargs))
                return _real(*args, **kwargs)

            monkeypatch.setattr(integration, name, spy)


BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_READY, reason="Triton kernels for attention / expert FFN not in the tree yet"))]


def make_vae(seed=2):
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 16, 16), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae
