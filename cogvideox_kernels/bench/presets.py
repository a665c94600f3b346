"""The model shapes every benchmark uses, written once: CogVideoX-2B, -5B and 1.5-5B (DESIGN.md,
"Real shapes"), the VAE conv shapes, and the ``small`` CPU preset of ``cogvideox-kernels bench``.

``MODELS[name]`` describes a model; the ``*_shapes(preset)`` functions give the cases the CLI bench
runs; ``benchmarks/*.py`` and ``bench/step.py`` build their inputs and diffusers configs from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelPreset:
    """One CogVideoX size at its real resolution (CFG batch 2)."""

    name: str
    num_heads: int
    head_dim: int
    num_layers: int
    rope: bool  # 3D RoPE on video tokens (5B, 1.5-5B); 2B uses sin-cos position embeddings
    text_len: int
    latents: tuple[int, int, int]  # VAE latent (frames, height, width) the transformer sees
    patch_t: int = 1  # 1.5-5B patches 2 latent frames together
    batch: int = 2
    mlp_ratio: int = 4
    # diffusers CogVideoXTransformer3DModel options that are not derived from the fields above
    diffusers_extra: dict = field(default_factory=dict)

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def inner(self) -> int:
        return self.mlp_ratio * self.hidden

    @property
    def grid(self) -> tuple[int, int, int]:
        """Video tokens per axis after patchify (t, h, w)."""
        t, h, w = self.latents
        return t // self.patch_t, h // 2, w // 2

    @property
    def video_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def seq_len(self) -> int:
        return self.text_len + self.video_tokens

    def diffusers_config(self, **overrides) -> dict:
        """Options of diffusers' ``CogVideoXTransformer3DModel`` for this size."""
        t, h, w = self.latents
        cfg = dict(num_attention_heads=self.num_heads, attention_head_dim=self.head_dim, num_layers=self.num_layers,
                   use_rotary_positional_embeddings=self.rope, in_channels=16, out_channels=16, time_embed_dim=512,
                   text_embed_dim=4096, patch_size=2, sample_height=h, sample_width=w, sample_frames=(t - 1) * 4 + 1,
                   max_text_seq_length=self.text_len)
        if self.patch_t > 1:
            cfg["patch_size_t"] = self.patch_t
        return {**cfg, **self.diffusers_extra, **overrides}


MODELS = {
    # 226 + 13 * 30 * 45 = 17,776 tokens; FFN 1920 -> 7680
    "2b": ModelPreset("2b", num_heads=30, head_dim=64, num_layers=30, rope=False, text_len=226, latents=(13, 60, 90)),
    # 226 + 17,550 = 17,776 tokens; FFN 3072 -> 12288
    "5b": ModelPreset("5b", num_heads=48, head_dim=64, num_layers=42, rope=True, text_len=226, latents=(13, 60, 90)),
    # 81 x 768 x 1360: 21 latent frames padded to 22 (as CogVideoXPipeline does), patch_t 2:
    # 224 + 11 * 48 * 85 = 45,104 tokens. The RoPE "slice" grid's max size is 300 x 300 latents;
    # no patch bias (the published T2V config, as recalled; neither changes the cost measurably).
    "1.5-5b": ModelPreset("1.5-5b", num_heads=48, head_dim=64, num_layers=42, rope=True, text_len=224,
                          latents=(22, 96, 170), patch_t=2,
                          diffusers_extra=dict(sample_height=300, sample_width=300, sample_frames=81,
                                               patch_bias=False)),
}

# The VAE's causal temporal conv at its three widths (DESIGN.md): [B, C, T, H, W], kt = 3
VAE_CONV_SHAPES = [(1, 128, 6, 480, 720), (1, 256, 6, 240, 360), (1, 512, 6, 60, 90)]
VAE_CONV_LONG = (1, 128, 49, 480, 720)  # a whole 49-frame clip at the first width

BENCH_PRESETS = ("small", *MODELS)


def attention_shapes(preset: str) -> list[tuple]:
    """(B, heads, text_len, (t, h, w) grid, head_dim, rope) per attention case."""
    if preset == "small":  # CPU: the Triton interpreter at shapes it runs in seconds
        return [(1, 2, 13, (2, 5, 7), 64, True), (2, 3, 5, (1, 4, 8), 40, True)]
    m = MODELS[preset]
    frames = (3, 7, m.grid[0]) if preset == "5b" else (m.grid[0],)  # 5b: a time-vs-length curve
    return [(m.batch, m.num_heads, m.text_len, (t, *m.grid[1:]), m.head_dim, m.rope) for t in frames]


def ffn_shapes(preset: str) -> list[tuple]:
    """(B, text_len, video tokens, hidden, inner) per expert-FFN case."""
    if preset == "small":
        return [(2, 7, 57, 64, 256)]
    m = MODELS[preset]
    per_frame = m.grid[1] * m.grid[2]
    frames = (3, 7, m.grid[0]) if preset == "5b" else (m.grid[0],)
    return [(m.batch, m.text_len, per_frame * t, m.hidden, m.inner) for t in frames]


def conv_shapes(preset: str) -> list[tuple]:
    """(B, C, T, H, W, temporal stride) per causal-conv case."""
    if preset == "small":
        return [(1, 8, 5, 16, 24, 1), (1, 12, 6, 9, 13, 2)]
    MODELS[preset]  # a KeyError names an unknown preset
    return [(*shape, stride) for stride in (1, 2) for shape in VAE_CONV_SHAPES]
