"""cogvideox-kernels: fast GPU kernels for CogVideoX with exact PyTorch references."""

__version__ = "0.1.0"

_MODEL_API = ("build_vae", "build_transformer", "build", "encode_video", "decode_latent", "param_count",
              "recommended_defaults")


def __getattr__(name):
    # Everything loads on first use, so `import cogvideox_kernels` (and `cogvideox-kernels --help`)
    # does not pay for torch and triton, and `import cogvideox_kernels.ops` stays light.
    import importlib

    if name == "ops":
        return importlib.import_module(f"{__name__}.ops")
    if name == "rope3d_freqs":
        return importlib.import_module(f"{__name__}.ops.rope").rope3d_freqs
    if name in _MODEL_API:
        return getattr(importlib.import_module(f"{__name__}.models"), name)
    raise AttributeError(f"module 'cogvideox_kernels' has no attribute {name!r}")


__all__ = ["ops", "rope3d_freqs", *_MODEL_API]
