"""The whole CogVideoX: causal VAE (encoder, decoder) + expert transformer, built from one option set."""
from __future__ import annotations

import inspect

import torch.nn as nn

from ..ops import registry
from .transformer import MODEL_OPS, TRANSFORMER_DEFAULTS, build_transformer

VIDEO_DEFAULTS = {"height": 480, "width": 720, "num_frames": 49}


def _vae_builder():
    from .vae import build_vae  # imported here: the transformer works without the VAE module

    return build_vae


def _vae_defaults() -> dict:
    """build_vae's options with their defaults (read from its signature, so the two never drift).
    ``device``/``dtype`` are left out: they would reach the VAE only; move the model with ``.to()``."""
    params = inspect.signature(_vae_builder()).parameters
    return {name: p.default for name, p in params.items()
            if name not in ("backend", "device", "dtype") and p.default is not inspect.Parameter.empty}


def recommended_defaults(part: str | None = None) -> dict:
    """The seed defaults as the flat option set ``build`` takes: ``build(**recommended_defaults())``
    builds the default model (a CogVideoX-5B-sized transformer and the 49 x 480 x 720 VAE).

    ``part="vae"`` / ``part="transformer"`` split that set as ``build`` does, so
    ``build_vae(**recommended_defaults("vae"))`` and ``build_transformer(**recommended_defaults("transformer"))``
    make the same parts; the transformer's ``sample_height`` / ``sample_width`` / ``temporal_compression``
    are derived from the video size and the VAE, as ``build`` derives them (so they are not in the flat set).
    """
    derived = ("sample_height", "sample_width", "temporal_compression")
    flat = {**_vae_defaults(), **{k: v for k, v in TRANSFORMER_DEFAULTS.items() if k not in derived},
            **VIDEO_DEFAULTS}
    if part is None:
        return flat
    if part not in ("vae", "transformer"):
        raise ValueError(f"recommended_defaults: part={part!r} is not supported; choose None, 'vae' or 'transformer'")
    vae, transformer, _ = _split_options(flat)
    return vae if part == "vae" else transformer


class CogVideoX(nn.Module):
    """``encoder`` / ``decoder`` (video [B, T, 3, H, W] <-> latents [B, T', C, H/8, W/8]) and
    ``transformer`` (the denoiser on those latents). ``config`` holds the options it was built with."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, transformer: nn.Module, config: dict):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.transformer = transformer
        self.config = dict(config)


def _split_options(opts: dict) -> tuple[dict, dict, dict]:
    """(vae options, transformer options, video size) from one flat option dict."""
    vae_defaults = _vae_defaults()
    known = set(vae_defaults) | set(TRANSFORMER_DEFAULTS) | set(VIDEO_DEFAULTS) | {"backend"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"build: unknown option(s) {unknown}; supported: {sorted(known)}")
    vae = {k: opts[k] for k in vae_defaults if k in opts}
    transformer = {k: opts[k] for k in TRANSFORMER_DEFAULTS if k in opts}
    video = {k: opts.get(k, v) for k, v in VIDEO_DEFAULTS.items()}

    # The transformer's latent grid follows from the VAE and the video size; an explicit option
    # that contradicts an explicit source is an error, never silently overridden.
    sd = opts.get("spatial_downsample", vae_defaults.get("spatial_downsample", 8))
    td = opts.get("temporal_downsample", vae_defaults.get("temporal_downsample", 4))
    derived = {"temporal_compression": (td, "temporal_downsample" in opts)}
    for key, size_key in (("sample_height", "height"), ("sample_width", "width")):
        size = video[size_key]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % sd:
            raise ValueError(f"{size_key}={size!r} must be a positive multiple of spatial_downsample={sd}")
        derived[key] = (size // sd, size_key in opts or "spatial_downsample" in opts)
    for key, (value, explicit_source) in derived.items():
        if key not in transformer:
            transformer[key] = value
        elif explicit_source and transformer[key] != value:
            raise ValueError(f"{key}={transformer[key]!r} contradicts the VAE/video options, which give {value}")
    return vae, transformer, video


def build(**opts) -> CogVideoX:
    """Build the whole model from the union of ``build_vae`` and ``build_transformer`` options plus
    ``height``/``width`` (video size) and ``backend``. Shared keys (``num_frames``, ``latent_channels``)
    go to both parts; the transformer's ``temporal_compression`` and ``sample_height``/``sample_width``
    follow from ``temporal_downsample``, ``spatial_downsample`` and the video size unless given.
    ``backend`` goes to every part that has it ("auto"/"reference" everywhere; a kernel name to the
    part that has that kernel, "auto" to the other). Unknown keys raise ValueError."""
    backend = opts.pop("backend", "auto")
    vae_backends, transformer_backends = registry.backends("causal_conv3d"), registry.backends(*MODEL_OPS)
    if backend not in vae_backends and backend not in transformer_backends:
        supported = tuple(dict.fromkeys(vae_backends + transformer_backends))
        raise ValueError(f"build: backend={backend!r} is not supported; choose one of {supported}")
    vae_opts, transformer_opts, video = _split_options(opts)
    encoder, decoder = _vae_builder()(**vae_opts, backend=backend if backend in vae_backends else "auto")
    transformer = build_transformer(**transformer_opts,
                                    backend=backend if backend in transformer_backends else "auto")
    config = {**_vae_defaults(), **vae_opts, **transformer.config, **video, "backend": backend}
    return CogVideoX(encoder, decoder, transformer, config)


__all__ = ["CogVideoX", "build", "recommended_defaults"]
