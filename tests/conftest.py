"""Test-wide rules.

* Every ``torch.empty``/``torch.empty_like`` of a floating dtype made while a test runs is filled
  with NaN, so a kernel output element that is never written fails the comparison.
* Tests marked ``gpu`` skip cleanly on a machine without CUDA.
"""
import os

import pytest
import torch

_real_empty = torch.empty
_real_empty_like = torch.empty_like
try:  # `with torch.device(...)` recognises factories from a set it caches on first use: build it now,
    # with the real functions in it, so device contexts (meta builds) keep working while we patch.
    from torch.utils._device import _device_constructors

    _device_constructors()
except ImportError:  # pragma: no cover - older torch
    pass


def _poisoned(t):
    if t.is_floating_point() and t.numel() and not t.is_meta:
        with torch.no_grad():  # also torch.empty(..., requires_grad=True) (inductor's pattern init makes some)
            t.fill_(float("nan"))
    return t


def _nan_empty(*args, **kwargs):
    return _poisoned(_real_empty(*args, **kwargs))


def _nan_empty_like(*args, **kwargs):
    return _poisoned(_real_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    if torch.compiler.is_compiling():  # pragma: no cover
        yield
        return
    monkeypatch.setattr(torch, "empty", _nan_empty)
    monkeypatch.setattr(torch, "empty_like", _nan_empty_like)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def interpret():
    """Skip unless Triton kernels can run on CPU tensors (TRITON_INTERPRET=1)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1")
    return True
