"""Input checks shared by the ops: each raises a ValueError that names the argument, what it was
and what is supported."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {names}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={value} is out of range; it must be in {bound}")
    return value


def check_conv_weight(weight, x) -> tuple[int, int, int, int]:
    """A conv weight ``[C_out, C_in, kt, kh, kw]`` for ``x [B, C, T, H, W]``: same device and dtype,
    C_in == C, kt >= 1, odd kh and kw. Returns ``(C_out, kt, kh, kw)``."""
    check_tensor("weight", weight, ndim=5, device=x.device)
    if weight.dtype != x.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but x has {x.dtype}; they must match")
    C_out, C_in, kt, kh, kw = weight.shape
    if C_in != x.shape[1]:
        raise ValueError(f"weight is [C_out, C_in={C_in}, kt, kh, kw] but x has C={x.shape[1]} channels")
    if min(C_out, kt) == 0 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"weight shape {tuple(weight.shape)}: kt >= 1 and odd kh, kw are supported")
    return C_out, kt, kh, kw
