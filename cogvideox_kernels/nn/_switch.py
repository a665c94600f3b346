"""The one ``backend`` switch every module shares: validated, and handed down to sub-modules."""
from __future__ import annotations


def check_backend(owner: str, backend, supported: tuple) -> str:
    if backend not in supported:
        raise ValueError(f"{owner}: backend={backend!r} is not supported; choose one of {supported}")
    return backend


class BackendSwitch:
    """Mixin for an ``nn.Module`` whose ops take ``backend=``. Setting ``module.backend`` checks the
    value against ``BACKENDS`` and sets the same value on every ``BackendSwitch`` below it; the
    parameters (and so the state_dict) never change."""

    BACKENDS: tuple = ("auto", "reference")

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(type(self).__name__, value, self.BACKENDS)
        for child in self.modules():
            if child is not self and isinstance(child, BackendSwitch):
                child._backend = check_backend(type(child).__name__, value, child.BACKENDS)
