"""Facts about this process that decide which kernels may run: the Triton interpreter, Triton on a GPU.

Which backend an op runs is decided in one place, ``cogvideox_kernels.ops.registry``. The environment
variable ``COGVIDEOX_KERNELS_BACKEND`` (read there) overrides ``auto`` for every op, for example
``reference`` to rule our kernels out while debugging. Triton kernels run on CPU tensors only under
``TRITON_INTERPRET=1`` (what CI does), which must be set before Python starts.
"""
from __future__ import annotations

import functools
import os

import torch

BACKEND_ENV = "COGVIDEOX_KERNELS_BACKEND"


def parse_switch(name: str, value: str) -> bool:
    """An on/off environment variable's value: "1"/"0" (surrounding spaces ignored; empty means "0"); anything
    else is a ValueError that names the variable."""
    value = value.strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{name}={value!r}: set it to 1 (on) or 0 (off), or unset it")
    return value == "1"


def env_switch(name: str, default: bool) -> bool:
    """``parse_switch`` of the environment variable ``name``, ``default`` where it is unset or empty."""
    value = os.environ.get(name, "")
    return default if not value.strip() else parse_switch(name, value)


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


try:  # (torch imports triton itself where it is installed)
    import triton  # noqa: F401

    _TRITON = True
except Exception:  # pragma: no cover - triton missing on some platforms
    _TRITON = False


def triton_available() -> bool:
    return _TRITON


@functools.lru_cache(maxsize=None)
def cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# torch.compile cannot trace the CUDA device queries; the answer is fixed for a device, so dynamo
# evaluates it once while tracing and keeps the result as a constant (no graph break).
@torch.compiler.assume_constant_result
def gpu_supports_triton(device: torch.device) -> bool:
    """Triton kernels here are tuned for Hopper and correct on Ampere and newer (sm_80+)."""
    if device.type != "cuda" or not triton_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return cuda_capability(index) >= (8, 0)
