"""The CogVideoX expert transformer (diffusion backbone), built from ``cogvideox_kernels.nn``.

    temb   = MLP(sinusoid(timestep))
    x      = [text_proj(text) ; patch_embed(latents) (+ 3D sin-cos positions without RoPE)]
    block  : x = x + gate_m * Attn(adaLN_m(x))         (QK-norm, 3D RoPE on video tokens)
             x = x + gate_m * FFN_e(adaLN_m(x))        (modality experts, one op call)
    out    = unpatchify(proj_out(AdaLN_out(LN(x_video), temb)))
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn.adaln import AdaLayerNormOut, ExpertAdaLN
from ..nn._switch import BackendSwitch, check_backend
from ..nn.attention import RoPE3DAttention
from ..nn.embeddings import PatchEmbed3D, TimestepEmbedding, sincos_pos_embed_3d
from ..nn.expert_ffn import ExpertFFN, check_expert_options, ffn_inner_size
from ..ops.rope import rope3d_freqs

MODEL_OPS = ("rope3d_attention", "expert_ffn")

TRANSFORMER_DEFAULTS = dict(
    patch_size=(1, 2, 2), hidden_size=1920, num_heads=48, num_layers=42, num_frames=49,
    text_hidden_size=4096, mlp_ratio=4.0, num_text_experts=1, num_video_experts=1, latent_channels=16,
    shared_ffn=False, use_rope=True, qk_norm=True, time_embed_dim=512, sample_height=60, sample_width=90,
    temporal_compression=4,
)


class CogVideoXBlock(BackendSwitch, nn.Module):
    """Attention half (expert adaLN, RoPE3D attention, gated residual) then the ``ExpertFFN`` half."""

    OPS = MODEL_OPS

    def __init__(self, hidden_size: int, num_heads: int, time_embed_dim: int, mlp_ratio: float = 4.0,
                 num_text_experts: int = 1, num_video_experts: int = 1, shared_ffn: bool = False,
                 qk_norm: bool = True, backend: str = "auto"):
        super().__init__()
        self.norm1 = ExpertAdaLN(time_embed_dim, hidden_size)
        self.attn = RoPE3DAttention(hidden_size, num_heads, qk_norm=qk_norm)
        self.ffn = ExpertFFN(hidden_size, time_embed_dim, mlp_ratio, num_text_experts, num_video_experts,
                             shared_ffn)
        self.backend = backend  # checked here, handed to attn and ffn

    def forward(self, x: torch.Tensor, temb: torch.Tensor, text_len: int, rope=None) -> torch.Tensor:
        h, modulation = self.norm1(x, temb, text_len)
        x = self.norm1.gated_residual(x, self.attn(h, text_len, rope), modulation, text_len)
        return self.ffn(x, temb, text_len)


def _check_options(o: dict) -> None:
    """Raise a ValueError naming the first invalid option (or combination of options)."""
    patch = o["patch_size"]
    if (not isinstance(patch, (tuple, list)) or len(patch) != 3
            or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in patch)):
        raise ValueError(f"patch_size={patch!r} must be three positive ints (patch_t, patch_h, patch_w)")
    for name in ("hidden_size", "num_heads", "num_layers", "num_frames", "text_hidden_size",
                 "latent_channels", "time_embed_dim", "sample_height", "sample_width", "temporal_compression"):
        v = o[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an int >= 1")
    for name in ("use_rope", "qk_norm"):
        if not isinstance(o[name], bool):
            raise ValueError(f"{name}={o[name]!r} must be a bool")
    check_expert_options(o["num_text_experts"], o["num_video_experts"], o["shared_ffn"])
    hidden, heads = o["hidden_size"], o["num_heads"]
    if hidden % heads:
        raise ValueError(f"hidden_size={hidden} is not divisible by num_heads={heads}")
    if o["use_rope"] and (hidden // heads) % 2:
        raise ValueError(f"head_dim={hidden // heads} (hidden_size // num_heads) must be even for RoPE "
                         "(use_rope=True)")
    if not o["use_rope"] and hidden % 16:
        raise ValueError(f"hidden_size={hidden} must be a multiple of 16 for the sin-cos position "
                         "embedding used when use_rope=False")
    ratio = o["mlp_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ffn_inner_size(hidden, ratio) < 1:
        raise ValueError(f"mlp_ratio={ratio!r} must be a number with int(hidden_size * mlp_ratio) >= 1")
    for name, size, p in (("sample_height", o["sample_height"], patch[1]),
                          ("sample_width", o["sample_width"], patch[2])):
        if size % p:
            raise ValueError(f"{name}={size} is not a multiple of the patch size {p} (patch_size={tuple(patch)})")
    check_backend("build_transformer", o["backend"], CogVideoXTransformer.supported_backends())


class CogVideoXTransformer(BackendSwitch, nn.Module):
    """forward(latents [B, T, C, H, W], text_embeddings [B, L, text_hidden_size], timestep [B])
    -> [B, T, C, H, W] (the model's prediction for the latents). Build with ``build_transformer``."""

    OPS = MODEL_OPS

    def __init__(self, **options):
        super().__init__()
        o = {**TRANSFORMER_DEFAULTS, "backend": "auto", **options}
        unknown = sorted(set(o) - set(TRANSFORMER_DEFAULTS) - {"backend"})
        if unknown:
            raise ValueError(f"unknown transformer option(s) {unknown}; supported: "
                             f"{sorted(TRANSFORMER_DEFAULTS) + ['backend']}")
        _check_options(o)
        self.config = {k: (tuple(v) if k == "patch_size" else v) for k, v in o.items() if k != "backend"}
        hidden, te = o["hidden_size"], o["time_embed_dim"]
        self.hidden_size, self.num_heads = hidden, o["num_heads"]
        self.latent_channels = o["latent_channels"]
        self.use_rope = o["use_rope"]

        self.patch_embed = PatchEmbed3D(o["latent_channels"], hidden, tuple(o["patch_size"]))
        self.text_proj = nn.Linear(o["text_hidden_size"], hidden)
        self.time_embed = TimestepEmbedding(hidden, te)
        self.blocks = nn.ModuleList(
            CogVideoXBlock(hidden, o["num_heads"], te, o["mlp_ratio"], o["num_text_experts"],
                           o["num_video_experts"], o["shared_ffn"], o["qk_norm"], backend=o["backend"])
            for _ in range(o["num_layers"]))
        self.norm_final = nn.LayerNorm(hidden, eps=1e-5)
        self.norm_out = AdaLayerNormOut(te, hidden)
        pt, ph, pw = o["patch_size"]
        self.proj_out = nn.Linear(hidden, o["latent_channels"] * pt * ph * pw)
        self.backend = o["backend"]

        # Default token grid: the latent frames the VAE makes of num_frames video frames (grouped by
        # patch_t, rounding up as CogVideoX 1.5 pads them) at sample_height x sample_width latents.
        latent_frames = (o["num_frames"] - 1) // o["temporal_compression"] + 1
        self.default_grid = (-(-latent_frames // pt), o["sample_height"] // ph, o["sample_width"] // pw)
        self._position_cache: dict = {}
        if not self.proj_out.weight.is_meta:  # (a meta-device build only counts parameters)
            self.position_tables(self.default_grid, torch.device("cpu"))  # ready for the default size

    def position_tables(self, grid: tuple[int, int, int], device: torch.device):
        """``RopeTables`` [N, head_dim] when use_rope, else the sin-cos table [N, hidden]; float32,
        cached per grid and device."""
        key = (tuple(grid), str(device))
        if key not in self._position_cache:
            if self.use_rope:
                tables = rope3d_freqs(*grid, hidden_size=self.hidden_size, num_heads=self.num_heads, device=device)
            else:
                tables = sincos_pos_embed_3d(*grid, self.hidden_size).to(device)
            self._position_cache[key] = tables
        return self._position_cache[key]

    def _check_inputs(self, latents, text_embeddings, timestep):
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a [B, T, C, H, W] tensor, got {shape}")
        B, _, C, _, _ = latents.shape
        if C != self.latent_channels:
            raise ValueError(f"latents have C={C} channels (dim 2 of [B, T, C, H, W]); the model was built "
                             f"with latent_channels={self.latent_channels}")
        text_dim = self.text_proj.in_features
        if (not isinstance(text_embeddings, torch.Tensor) or text_embeddings.dim() != 3
                or text_embeddings.shape[0] != B or text_embeddings.shape[2] != text_dim):
            shape = tuple(text_embeddings.shape) if isinstance(text_embeddings, torch.Tensor) else None
            raise ValueError(f"text_embeddings must be [B={B}, L, text_hidden_size={text_dim}], got {shape}")
        if not isinstance(timestep, torch.Tensor) or tuple(timestep.shape) != (B,):
            shape = tuple(timestep.shape) if isinstance(timestep, torch.Tensor) else type(timestep).__name__
            raise ValueError(f"timestep must be a [B={B}] tensor, got {shape}")

    def forward(self, latents: torch.Tensor, text_embeddings: torch.Tensor,
                timestep: torch.Tensor) -> torch.Tensor:
        self._check_inputs(latents, text_embeddings, timestep)
        grid = self.patch_embed.grid(latents.shape)
        text_len = text_embeddings.shape[1]
        dtype = self.proj_out.weight.dtype

        temb = self.time_embed(timestep.to(latents.device))
        video = self.patch_embed(latents.to(dtype))
        positions = self.position_tables(grid, latents.device)
        if not self.use_rope:
            video = video + positions.to(video.dtype)
        x = torch.cat((self.text_proj(text_embeddings.to(dtype)), video), dim=1)

        rope = positions if self.use_rope else None
        for block in self.blocks:
            x = block(x, temb, text_len, rope)

        video = self.norm_out(self.norm_final(x[:, text_len:]), temb)
        out = self.patch_embed.unpatchify(self.proj_out(video), grid, self.latent_channels)
        return out.to(latents.dtype)


def build_transformer(patch_size=(1, 2, 2), hidden_size=1920, num_heads=48, num_layers=42, num_frames=49,
                      text_hidden_size=4096, mlp_ratio=4.0, num_text_experts=1, num_video_experts=1,
                      latent_channels=16, shared_ffn=False, use_rope=True, qk_norm=True, time_embed_dim=512,
                      sample_height=60, sample_width=90, temporal_compression=4,
                      backend="auto") -> CogVideoXTransformer:
    """Build the CogVideoX transformer. ``backend`` ("auto" | "reference" | a kernel of the attention or
    expert-FFN op, e.g. "triton") goes to every attention and expert-FFN module that has it ("auto" to
    one that does not) and can be changed later through ``model.backend``."""
    options = dict(locals())
    return CogVideoXTransformer(**options)


def param_count(**transformer_opts) -> int:
    """Exact parameter count of ``build_transformer(**transformer_opts)``, by formula (nothing is built)."""
    o = {**TRANSFORMER_DEFAULTS, "backend": "auto", **transformer_opts}
    unknown = sorted(set(o) - set(TRANSFORMER_DEFAULTS) - {"backend"})
    if unknown:
        raise ValueError(f"unknown transformer option(s) {unknown}; supported: "
                         f"{sorted(TRANSFORMER_DEFAULTS) + ['backend']}")
    _check_options(o)
    hidden, te = o["hidden_size"], o["time_embed_dim"]
    head_dim = hidden // o["num_heads"]
    pt, ph, pw = o["patch_size"]
    patch_values = o["latent_channels"] * pt * ph * pw
    inner = ffn_inner_size(hidden, o["mlp_ratio"])
    linear = lambda fan_in, fan_out: fan_in * fan_out + fan_out  # noqa: E731  (weight + bias)
    layer_norm = 2 * hidden

    expert_adaln = linear(te, 6 * hidden) + layer_norm
    attention = linear(hidden, 3 * hidden) + linear(hidden, hidden) + (4 * head_dim if o["qk_norm"] else 0)
    nt, nv = o["num_text_experts"], o["num_video_experts"]
    experts = 1 if o["shared_ffn"] else nt + nv
    routers = sum(linear(hidden, n) for n in (nt, nv) if n > 1 and not o["shared_ffn"])
    ffn = expert_adaln + experts * (linear(hidden, inner) + linear(inner, hidden)) + routers
    block = expert_adaln + attention + ffn

    embeddings = linear(patch_values, hidden) + linear(o["text_hidden_size"], hidden) \
        + linear(hidden, te) + linear(te, te)
    head = layer_norm + linear(te, 2 * hidden) + layer_norm + linear(hidden, patch_values)
    return embeddings + o["num_layers"] * block + head


__all__ = ["CogVideoXTransformer", "CogVideoXBlock", "build_transformer", "param_count",
           "TRANSFORMER_DEFAULTS", "MODEL_OPS"]
