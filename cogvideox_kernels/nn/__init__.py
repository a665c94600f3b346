"""Thin torch.nn modules over the ops: same parameters and state_dict whatever the backend."""
from .adaln import AdaLayerNormOut, ExpertAdaLN
from .attention import RoPE3DAttention
from .causal_conv import CausalConv3d
from .embeddings import PatchEmbed3D, TimestepEmbedding
from .expert_ffn import ExpertFFN
from .vae_blocks import (FactorizedConv3d, FrameConv2d, FrameGroupNorm, ResnetBlock, SpatialDownsample,
                         SpatialUpsample, StreamCache, TemporalDownsample, TemporalUpsample)

__all__ = ["RoPE3DAttention", "ExpertAdaLN", "AdaLayerNormOut", "ExpertFFN", "CausalConv3d", "PatchEmbed3D",
           "TimestepEmbedding", "FactorizedConv3d", "FrameConv2d", "FrameGroupNorm", "ResnetBlock",
           "SpatialDownsample", "SpatialUpsample", "TemporalDownsample", "TemporalUpsample", "StreamCache"]
