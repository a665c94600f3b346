"""Public ops. Each has one function with a ``backend=`` argument and a plain-PyTorch reference;
``registry`` knows every op's backends and picks one per call."""
from . import registry
from .adaln_linear import adaln_linear, adaln_linear_reference, gated_linear, gated_linear_reference
from .attention import attention_flops, rope3d_attention, rope3d_attention_reference
from .causal_conv import causal_conv3d, causal_conv3d_reference
from .expert_ffn import expert_ffn, expert_ffn_reference
from .rope import RopeTables, rope3d_axis_dims, rope3d_freqs
from .vae_conv import vae_conv3d, vae_conv3d_reference, vae_group_norm_coef

__all__ = ["registry", "rope3d_attention", "rope3d_attention_reference", "attention_flops", "expert_ffn",
           "expert_ffn_reference", "causal_conv3d", "causal_conv3d_reference", "rope3d_freqs",
           "rope3d_axis_dims", "RopeTables", "vae_conv3d", "vae_conv3d_reference", "vae_group_norm_coef",
           "adaln_linear", "adaln_linear_reference", "gated_linear", "gated_linear_reference"]

