"""The FFN half of a CogVideoX block: expert adaLN, modality experts (optionally routed), gate and
residual, all in one call of ``ops.expert_ffn``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.expert_ffn import expert_ffn
from ._checks import check_input
from .adaln import ExpertAdaLN
from ._switch import BackendSwitch


def ffn_inner_size(hidden_size: int, mlp_ratio: float) -> int:
    """Inner width of each expert FFN (int(mlp_ratio * hidden), as diffusers' FeedForward)."""
    return int(hidden_size * mlp_ratio)


def check_expert_options(num_text_experts, num_video_experts, shared_ffn) -> None:
    for name, n in (("num_text_experts", num_text_experts), ("num_video_experts", num_video_experts)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}={n!r} must be an int >= 1")
    if not isinstance(shared_ffn, bool):
        raise ValueError(f"shared_ffn={shared_ffn!r} must be a bool")
    if shared_ffn and (num_text_experts, num_video_experts) != (1, 1):
        raise ValueError(f"shared_ffn=True means one FFN shared by text and video, so it needs "
                         f"num_text_experts=num_video_experts=1; got {num_text_experts} and {num_video_experts}")


class ExpertFFN(BackendSwitch, nn.Module):
    """``x + gate_m * f_e(LN(x) * (1 + scale_m) + shift_m)`` with f_e = W2 gelu_tanh(W1 h + b1) + b2.

    Experts are stacked: ``w1 [E, inner, hidden]``, ``b1 [E, inner]``, ``w2 [E, hidden, inner]``,
    ``b2 [E, hidden]``. ``shared_ffn``: one FFN for both modalities (E = 1, real checkpoints). Else
    experts [0, num_text_experts) serve text and the rest video; a modality with several experts
    routes each token to its top-1 expert with ``text_router``/``video_router`` (Linear to n experts).
    """

    OPS = ("expert_ffn",)

    def __init__(self, hidden_size: int, time_embed_dim: int, mlp_ratio: float = 4.0,
                 num_text_experts: int = 1, num_video_experts: int = 1, shared_ffn: bool = False,
                 eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        check_expert_options(num_text_experts, num_video_experts, shared_ffn)
        inner = ffn_inner_size(hidden_size, mlp_ratio)
        if inner < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio!r} gives an FFN inner size of {inner} for "
                             f"hidden_size={hidden_size}; it must give at least 1")
        self.hidden_size = hidden_size
        self.inner_size = inner
        self.shared_ffn = shared_ffn
        self.num_text_experts = num_text_experts
        self.num_video_experts = num_video_experts
        self.num_experts = 1 if shared_ffn else num_text_experts + num_video_experts
        self.backend = backend
        self.adaln = ExpertAdaLN(time_embed_dim, hidden_size, eps=eps)
        E = self.num_experts
        self.w1 = nn.Parameter(torch.empty(E, inner, hidden_size))
        self.b1 = nn.Parameter(torch.empty(E, inner))
        self.w2 = nn.Parameter(torch.empty(E, hidden_size, inner))
        self.b2 = nn.Parameter(torch.empty(E, hidden_size))
        routed = not shared_ffn
        self.text_router = nn.Linear(hidden_size, num_text_experts) if routed and num_text_experts > 1 else None
        self.video_router = nn.Linear(hidden_size, num_video_experts) if routed and num_video_experts > 1 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert initialised like an nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        with torch.no_grad():
            for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
                bound = 1.0 / math.sqrt(weight.shape[-1])
                weight.uniform_(-bound, bound)
                bias.uniform_(-bound, bound)

    @staticmethod
    def _router_params(router):
        return None if router is None else (router.weight, router.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, text_len: int) -> torch.Tensor:
        """x [B, S, hidden] (first ``text_len`` tokens text), temb [B, time_embed_dim] -> new x."""
        check_input("ExpertFFN", "x", x, self.w1, ndim=3, width=self.hidden_size, width_name="hidden_size")
        return expert_ffn(x, self.adaln.modulation(temb), self.w1, self.b1, self.w2, self.b2,
                          text_len=text_len, norm_weight=self.adaln.norm.weight,
                          norm_bias=self.adaln.norm.bias, eps=self.adaln.norm.eps,
                          num_text_experts=0 if self.shared_ffn else self.num_text_experts,
                          text_router=self._router_params(self.text_router),
                          video_router=self._router_params(self.video_router), backend=self.backend)

    def extra_repr(self) -> str:
        layout = "shared" if self.shared_ffn else f"text={self.num_text_experts}, video={self.num_video_experts}"
        return (f"hidden={self.hidden_size}, inner={self.inner_size}, experts=({layout}), "
                f"backend={self.backend!r}")


__all__ = ["ExpertFFN", "ffn_inner_size", "check_expert_options"]
