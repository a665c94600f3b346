"""Parity with diffusers' CogVideoX (the real model's code), given the same random weights.

* our ``CogVideoXBlock`` (shared_ffn) vs diffusers' ``CogVideoXBlock``, with and without RoPE;
* our RoPE3D tables vs diffusers' ``get_3d_rotary_pos_embed`` (same layout, so checkpoints work);
* the whole transformer vs ``CogVideoXTransformer3DModel``: CogVideoX 1.0 with RoPE (5B-like),
  with 3D sin-cos positions (2B-like) and CogVideoX 1.5 (patch_t = 2).
All in float32; rel = ||ours - theirs|| / ||theirs|| <= 1e-5.
"""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402
from diffusers.models.transformers.cogvideox_transformer_3d import (  # noqa: E402
    CogVideoXBlock as DiffusersBlock, CogVideoXTransformer3DModel)

from cogvideox_kernels.models.transformer import CogVideoXBlock, build_transformer  # noqa: E402
from cogvideox_kernels.ops.rope import rope3d_freqs  # noqa: E402
from helpers import randomize, rel_err

TOL = 1e-5


def load_block(ours: CogVideoXBlock, theirs: DiffusersBlock) -> None:
    """Copy diffusers' block weights into ours (shared-FFN layout)."""
    attn = theirs.attn1
    with torch.no_grad():
        ours.norm1.linear.load_state_dict(theirs.norm1.linear.state_dict())
        ours.norm1.norm.load_state_dict(theirs.norm1.norm.state_dict())
        ours.attn.qkv.weight.copy_(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
        ours.attn.qkv.bias.copy_(torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]))
        ours.attn.norm_q.load_state_dict(attn.norm_q.state_dict())
        ours.attn.norm_k.load_state_dict(attn.norm_k.state_dict())
        ours.attn.to_out.load_state_dict(attn.to_out[0].state_dict())
        ours.ffn.adaln.linear.load_state_dict(theirs.norm2.linear.state_dict())
        ours.ffn.adaln.norm.load_state_dict(theirs.norm2.norm.state_dict())
        ours.ffn.w1[0].copy_(theirs.ff.net[0].proj.weight)
        ours.ffn.b1[0].copy_(theirs.ff.net[0].proj.bias)
        ours.ffn.w2[0].copy_(theirs.ff.net[2].weight)
        ours.ffn.b2[0].copy_(theirs.ff.net[2].bias)


def diffusers_rope(head_dim, grid):
    t, h, w = grid
    cos, sin = get_3d_rotary_pos_embed(head_dim, ((0, 0), (h, w)), (h, w), t)
    return cos.float(), sin.float()


@pytest.mark.parametrize("use_rope", [True, False])
@pytest.mark.parametrize("text_len", [5, 0])
def test_block_matches_diffusers(use_rope, text_len):
    hidden, heads, temb_dim, grid = 64, 2, 24, (2, 3, 4)
    head_dim = hidden // heads
    torch.manual_seed(0)
    theirs = DiffusersBlock(hidden, heads, head_dim, temb_dim, attention_bias=True, qk_norm=True,
                            norm_eps=1e-5).eval()
    randomize(theirs, seed=1)
    ours = CogVideoXBlock(hidden, heads, temb_dim, mlp_ratio=4.0, shared_ffn=True, backend="reference")
    load_block(ours, theirs)

    g = torch.Generator().manual_seed(2)
    n_video = grid[0] * grid[1] * grid[2]
    text = torch.randn(2, text_len, hidden, generator=g)
    video = torch.randn(2, n_video, hidden, generator=g)
    temb = torch.randn(2, temb_dim, generator=g)
    rope = diffusers_rope(head_dim, grid) if use_rope else None

    with torch.no_grad():
        ref_video, ref_text = theirs(video, text, temb, image_rotary_emb=rope)
        out = ours(torch.cat([text, video], dim=1), temb, text_len, rope)
    ref = torch.cat([ref_text, ref_video], dim=1)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("head_dim,grid", [(64, (3, 4, 5)), (32, (2, 3, 2))])
def test_rope_tables_match_diffusers(head_dim, grid):
    sin, cos = rope3d_freqs(*grid, hidden_size=head_dim * 3, num_heads=3)
    ref_cos, ref_sin = diffusers_rope(head_dim, grid)
    assert torch.allclose(cos, ref_cos, atol=1e-5) and torch.allclose(sin, ref_sin, atol=1e-5)


def load_transformer(ours, theirs) -> None:
    """Copy a diffusers CogVideoXTransformer3DModel's weights into our model (shared FFN)."""
    with torch.no_grad():
        proj = theirs.patch_embed.proj
        ours.patch_embed.proj.weight.copy_(proj.weight.reshape(proj.weight.shape[0], -1))
        ours.patch_embed.proj.bias.copy_(proj.bias)
        ours.text_proj.load_state_dict(theirs.patch_embed.text_proj.state_dict())
        ours.time_embed.linear_1.load_state_dict(theirs.time_embedding.linear_1.state_dict())
        ours.time_embed.linear_2.load_state_dict(theirs.time_embedding.linear_2.state_dict())
        for mine, theirs_block in zip(ours.blocks, theirs.transformer_blocks):
            load_block(mine, theirs_block)
        ours.norm_final.load_state_dict(theirs.norm_final.state_dict())
        ours.norm_out.linear.load_state_dict(theirs.norm_out.linear.state_dict())
        ours.norm_out.norm.load_state_dict(theirs.norm_out.norm.state_dict())
        ours.proj_out.load_state_dict(theirs.proj_out.state_dict())


# (name, our options, diffusers options); latents [B, T, C, H, W] with T frames
MODELS = [
    ("1.0-rope", dict(patch_size=(1, 2, 2), use_rope=True),
     dict(patch_size=2, use_rotary_positional_embeddings=True)),
    ("1.0-sincos", dict(patch_size=(1, 2, 2), use_rope=False),
     dict(patch_size=2, use_rotary_positional_embeddings=False)),
    ("1.5-rope", dict(patch_size=(2, 2, 2), use_rope=True),
     dict(patch_size=2, patch_size_t=2, use_rotary_positional_embeddings=True)),
]


@pytest.mark.parametrize("name,ours_opts,theirs_opts", MODELS, ids=[m[0] for m in MODELS])
def test_transformer_matches_diffusers(name, ours_opts, theirs_opts):
    hidden, heads, layers, channels, text_dim, temb_dim, text_len = 64, 2, 2, 4, 24, 32, 3
    T, H, W = 4, 6, 8
    num_frames = (T - 1) * 4 + 1
    theirs = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=channels,
        out_channels=channels, time_embed_dim=temb_dim, text_embed_dim=text_dim, num_layers=layers,
        sample_width=W, sample_height=H, sample_frames=num_frames, max_text_seq_length=text_len,
        **theirs_opts).eval()
    randomize(theirs, seed=3)
    ours = build_transformer(hidden_size=hidden, num_heads=heads, num_layers=layers, num_frames=num_frames,
                             text_hidden_size=text_dim, latent_channels=channels, shared_ffn=True,
                             time_embed_dim=temb_dim, sample_height=H, sample_width=W, backend="reference",
                             **ours_opts)
    load_transformer(ours, theirs)

    g = torch.Generator().manual_seed(4)
    latents = torch.randn(2, T, channels, H, W, generator=g)
    text = torch.randn(2, text_len, text_dim, generator=g)
    timestep = torch.tensor([17.0, 803.0])
    grid = ours.patch_embed.grid(latents.shape)
    rope = diffusers_rope(hidden // heads, grid) if ours_opts["use_rope"] else None
    with torch.no_grad():
        ref = theirs(latents, text, timestep, image_rotary_emb=rope, return_dict=False)[0]
        out = ours(latents, text, timestep)
    assert out.shape == latents.shape
    assert rel_err(out, ref) <= TOL
