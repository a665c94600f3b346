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


# ------------------------------------------------------------------------------------------------
# For callers that predate ops.registry (kernel names without an op); new code asks the registry.
# ------------------------------------------------------------------------------------------------
def kernel_can_run(kernel: str, device: torch.device, *, auto: bool) -> bool:
    """Whether some op's kernel backend ``kernel`` may run on ``device`` (``auto``: would ``auto``
    consider it there)."""
    from .ops import registry

    device = torch.device(device)
    for op in registry.ops():
        if kernel in registry.kernels(op) and registry.availability(op, device)[kernel] is None:
            if not auto or registry.auto_allowed(op, kernel, device):
                return True
    return False


def resolve_backend(op: str, backend: str, device: torch.device, kernels: tuple[str, ...] = ()) -> str:
    """The backend ``op`` runs on ``device`` for inputs its kernels support. For a registered op the
    registry decides (``kernels`` is ignored); an op not registered yet names its ``kernels``, each
    judged by the registered kernel of the same name (``cuda``, ``cpp``, ``triton``)."""
    from .ops import registry

    if op not in registry.ops():
        return _resolve_unregistered(op, backend, torch.device(device), tuple(kernels))
    if backend == "auto":
        return registry.auto_choice(op, device)
    if backend not in registry.backends(op):
        raise ValueError(f"{op}: backend={backend!r} is not supported; choose one of {registry.backends(op)}")
    why = registry.availability(op, device).get(backend)
    if why is not None:
        raise ValueError(f"{op}: backend={backend!r} cannot run on {device} tensors ({why}); "
                         "use backend='reference' or 'auto'")
    return backend


def _resolve_unregistered(op: str, backend: str, device: torch.device, kernels: tuple[str, ...]) -> str:
    allowed = ("auto", "reference") + kernels
    if backend not in allowed:
        raise ValueError(f"{op}: backend={backend!r} is not supported; choose one of {allowed}")
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "").strip()
        if forced and forced != "auto":
            from .ops import registry

            valid = tuple(dict.fromkeys(registry.backends() + kernels))
            if forced not in valid:
                raise ValueError(f"{BACKEND_ENV}={forced!r} is not a backend; choose one of {valid} (or unset it)")
            backend = forced if forced in allowed else "auto"
    if backend == "auto":
        return next((k for k in kernels if kernel_can_run(k, device, auto=True)), "reference")
    if backend != "reference" and not kernel_can_run(backend, device, auto=False):
        raise ValueError(f"{op}: backend={backend!r} cannot run on {device} tensors; use backend='reference' or 'auto'")
    return backend
