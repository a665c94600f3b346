"""Loads the compiled extension ``cogvideox_kernels._C`` if it is there.

The package imports without it (a source checkout on PYTHONPATH, or a failed build): the C++ and
CUDA backends then report themselves unavailable and ``auto`` falls back to the references.
"""
from __future__ import annotations

_C = None
_error = ""
try:
    from . import _C  # type: ignore[attr-defined]  # noqa: F811
except Exception as exc:  # pragma: no cover - depends on the build
    _C = None
    _error = f"{type(exc).__name__}: {exc}"


def extension_available() -> bool:
    return _C is not None


# Read once: a plain bool keeps torch.compile(fullgraph=True) from tracing into a pybind call.
_CUDA_BUILT = _C is not None and bool(_C.cuda_available())


def cuda_available() -> bool:
    """True when the extension was compiled with CUDA kernels (not whether a GPU exists)."""
    return _CUDA_BUILT


def extension_error() -> str:
    return f" ({_error})" if _error else ""


def get_ext():
    if _C is None:
        raise RuntimeError("cogvideox_kernels._C is not built" + extension_error()
                           + "; install with `pip install --no-build-isolation -e .`")
    return _C
