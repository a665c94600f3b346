"""CogVideoX built from the modules in ``cogvideox_kernels.nn``."""
from .cogvideox import CogVideoX, build, recommended_defaults
from .transformer import CogVideoXBlock, CogVideoXTransformer, build_transformer, param_count
from .vae import Decoder, Encoder, build_vae, decode_latent, encode_video

__all__ = ["build_vae", "build_transformer", "build", "encode_video", "decode_latent", "param_count",
           "recommended_defaults", "CogVideoX", "CogVideoXTransformer", "CogVideoXBlock", "Encoder", "Decoder"]
