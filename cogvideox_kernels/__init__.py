"""cogvideox-kernels: fast GPU kernels for CogVideoX with exact PyTorch references."""
from . import ops
from .ops.rope import rope3d_freqs

__version__ = "0.1.0"

_MODEL_API = ("build_vae", "build_transformer", "build", "encode_video", "decode_latent", "param_count",
              "recommended_defaults")


def __getattr__(name):  # the model API loads lazily so `import cogvideox_kernels.ops` stays light
    if name in _MODEL_API:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'cogvideox_kernels' has no attribute {name!r}")


__all__ = ["ops", "rope3d_freqs", *_MODEL_API]
