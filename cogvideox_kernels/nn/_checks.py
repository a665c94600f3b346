"""Input checks of the nn modules: a ValueError that names the argument and the module, before torch
would raise a RuntimeError from deep inside a matmul or conv."""
from __future__ import annotations

import torch


def check_input(owner: str, name: str, x, like: torch.Tensor, *, ndim: int | None = None,
                width: int | None = None, width_name: str = "") -> None:
    """``x`` must be a tensor (of ``ndim`` dims) whose last dim is ``width`` and whose dtype and device
    are those of the parameter ``like``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{owner}: {name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if width is not None and (x.dim() == 0 or x.shape[-1] != width):
        raise ValueError(f"{owner}: {name} has shape {tuple(x.shape)}; its last dim must be "
                         f"{width_name or 'the width'}={width}")
    if x.dtype != like.dtype:
        raise ValueError(f"{owner}: {name} has dtype {x.dtype} but the module's parameters are {like.dtype}; "
                         f"cast the input or the module (module.to({x.dtype}))")
    if x.device != like.device:
        raise ValueError(f"{owner}: {name} is on {x.device} but the module's parameters are on {like.device}")
