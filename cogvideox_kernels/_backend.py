"""Backend selection shared by every op.

`backend="auto"` takes a kernel when the tensors live on a GPU that supports it and the plain
PyTorch reference otherwise. The environment variable ``COGVIDEOX_KERNELS_BACKEND`` overrides
``auto`` for every op (for example ``reference`` to rule our kernels out while debugging).
Triton kernels run on CPU tensors only under ``TRITON_INTERPRET=1`` (what CI does).
"""
from __future__ import annotations

import functools
import os

import torch

BACKEND_ENV = "COGVIDEOX_KERNELS_BACKEND"


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing on some platforms
        return False
    return True


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


def triton_can_run(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of this device right now."""
    if device.type == "cpu":
        return interpret_mode() and triton_available()
    return gpu_supports_triton(device)


def resolve_backend(op: str, backend: str, device: torch.device, kernels: tuple[str, ...]) -> str:
    """Map ``backend`` to a concrete one for an op whose kernel backends are ``kernels``.

    ``auto``: the env override if set, else the first kernel that can run on ``device``,
    else ``reference``. A named kernel that cannot run raises a ValueError that says why.
    """
    allowed = ("auto", "reference") + kernels
    if backend not in allowed:
        raise ValueError(f"{op}: backend={backend!r} is not supported; choose one of {allowed}")
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "").strip()
        if forced and forced != "auto":
            backend = forced if forced in allowed else "auto"
    if backend == "auto":
        for kernel in kernels:
            if kernel_can_run(kernel, device, auto=True):
                return kernel
        return "reference"
    if backend != "reference" and not kernel_can_run(backend, device, auto=False):
        raise ValueError(
            f"{op}: backend={backend!r} cannot run on {device} tensors "
            f"({why_not(backend, device)}); use backend='reference' or 'auto'"
        )
    return backend


def kernel_can_run(kernel: str, device: torch.device, *, auto: bool) -> bool:
    if kernel == "triton":
        # auto never picks the (slow) interpreter; forcing backend="triton" on CPU tensors does.
        return gpu_supports_triton(device) if auto else triton_can_run(device)
    if kernel == "cuda":
        from ._ext import cuda_available

        return device.type == "cuda" and cuda_available()
    if kernel == "cpp":
        from ._ext import extension_available

        return device.type == "cpu" and extension_available()
    return False


def why_not(kernel: str, device: torch.device) -> str:
    if kernel == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type == "cpu":
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        return "the GPU is older than sm_80"
    if kernel == "cuda":
        from ._ext import cuda_available, extension_error

        if device.type != "cuda":
            return "the CUDA kernel needs CUDA tensors"
        if not cuda_available():
            return "the extension was built without CUDA" + extension_error()
    if kernel == "cpp":
        from ._ext import extension_error

        if device.type != "cpu":
            return "the C++ path needs CPU tensors"
        return "the compiled extension could not be loaded" + extension_error()
    return "unknown reason"
