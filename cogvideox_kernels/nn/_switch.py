"""The one ``backend`` switch every module shares: validated against the registry, handed down."""
from __future__ import annotations

from ..ops import registry


def check_backend(owner: str, backend, supported: tuple) -> str:
    if backend not in supported:
        raise ValueError(f"{owner}: backend={backend!r} is not supported; choose one of {supported}")
    return backend


class BackendSwitch:
    """Mixin for an ``nn.Module`` whose ops take ``backend=``. ``OPS`` names the ops it (or anything
    below it) calls; the backends it accepts are theirs (``registry.backends(*OPS)``). Setting
    ``module.backend`` checks the value and sets it on every ``BackendSwitch`` below it (``"auto"`` on
    one whose ops lack that kernel); the parameters (and so the state_dict) never change."""

    OPS: tuple = ()

    @classmethod
    def supported_backends(cls) -> tuple:
        return registry.backends(*cls.OPS)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(type(self).__name__, value, self.supported_backends())
        for child in self.modules():
            if child is not self and isinstance(child, BackendSwitch):
                child._backend = value if value in child.supported_backends() else "auto"
