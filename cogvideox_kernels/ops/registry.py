"""One registry of the ops and their backends: what ``backend="auto"`` may pick, and why not.

Every op has a reference (plain PyTorch, differentiable, runs anywhere), an input check and an
ordered list of kernel backends. A kernel backend declares

* ``available(device)``: may it run on tensors of this device at all (``None``, or the reason not);
* ``supports(**inputs)``: can it take these inputs: dtype, head dim, kernel shape (``None``, or why not);
* ``layout``: which tensor arguments it needs ``CONTIGUOUS`` or with a ``UNIT_LAST_STRIDE`` (``"*"``:
  every argument not named). The dispatcher copies the arguments that are not so: a kernel never sees
  strides it does not handle, whatever view the caller passes;
* ``auto_devices``: the device types ``auto`` may pick it on (the Triton interpreter runs CPU tensors,
  but only when asked for by name).

``backend="auto"`` takes the first kernel that is available, allowed on the device type and supports
the inputs, else the reference. With grad mode on and any tensor input requiring grad, ``auto``
takes the reference (the kernels have no backward) and a named kernel raises at the call. A named
kernel that cannot run these inputs raises a ValueError that says why. The environment variable ``COGVIDEOX_KERNELS_BACKEND`` overrides ``auto`` for every op that
has that backend (``reference`` rules every kernel out); a value no op knows raises.

Adding a kernel backend is its own file (or folder) next to the op plus one call, for example in
``ops/attention/__init__.py``::

    registry.register_backend(
        "rope3d_attention", "hopper",
        run="cogvideox_kernels.ops.attention.hopper:rope3d_attention_hopper",  # (**inputs) -> output
        supports="cogvideox_kernels.ops.attention.hopper:supports",           # (**inputs) -> None | why not
        available=registry.cuda_arch(9, 0),
        layout={"q": UNIT_LAST_STRIDE, "k": UNIT_LAST_STRIDE, "v": UNIT_LAST_STRIDE, "*": CONTIGUOUS},
        before="triton")                                                      # auto tries it first

``run`` and ``supports`` take the op's inputs as keywords (the public function's arguments without
``backend``); ``run`` returns what the reference returns. nn modules, models, ``parallel`` and the CLI
read the backend names from here (``backends``, ``kernels``, ``describe``).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .._backend import BACKEND_ENV, gpu_supports_triton, interpret_mode, triton_available

CONTIGUOUS = "contiguous"
UNIT_LAST_STRIDE = "unit_last_stride"
ANY_STRIDES = "any"

Reason = Optional[str]  # None: fine; else a sentence saying why not


@dataclass
class Backend:
    """A kernel backend of one op (see the module docstring)."""
    name: str
    run: Callable
    available: Callable[[torch.device], Reason]
    supports: Optional[Callable[..., Reason]] = None
    layout: dict = field(default_factory=dict)
    auto_devices: Optional[tuple] = None
    import_error: Reason = None  # the kernel's module could not be imported

    def why_unavailable(self, device: torch.device) -> Reason:
        if self.import_error is not None:
            return self.import_error
        if device.type == "meta":
            return ("meta tensors hold no data, so no kernel runs on them (backend='auto' or 'reference' "
                    "propagates shapes)")
        return self.available(device)

    def why_unsupported(self, inputs: dict) -> Reason:
        return None if self.supports is None else self.supports(**inputs)

    def __call__(self, inputs: dict):
        return self.run(**_conform(inputs, self.layout))


@dataclass
class Op:
    name: str
    reference: Callable
    check: Callable[..., None]
    device_arg: str  # the input whose device decides where it runs
    kernels: list = field(default_factory=list)


_OPS: dict[str, Op] = {}
_NAMES: dict[tuple, tuple] = {}  # backends(*ops), cached until a registration changes


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------
def register_op(name: str, *, reference: Callable, check: Callable[..., None], device_arg: str) -> None:
    """Declare an op: its reference (takes the inputs as keywords), its input check (raises
    ValueError) and the input whose device decides where it runs."""
    if name in _OPS:
        raise ValueError(f"op {name!r} is registered already")
    _OPS[name] = Op(name, reference, check, device_arg)
    _NAMES.clear()


def register_backend(op: str, name: str, *, run, available, supports=None, layout=None, auto_devices=None,
                     before: str | None = None) -> Backend:
    """Add a kernel backend to ``op``; ``auto`` tries kernels in order (``before`` puts this one ahead
    of the named one, else it goes last). ``run``/``supports``: callables or ``"module:function"``
    strings, imported here; a module that fails to import leaves the backend unavailable, saying why.
    See the module docstring."""
    entry = _op(op)
    names = [k.name for k in entry.kernels]
    if name in ("auto", "reference") or name in names:
        raise ValueError(f"{op}: a backend named {name!r} exists already")
    if before is not None and before not in names:
        raise ValueError(f"{op}: before={before!r} is not one of its kernels {tuple(names)}")
    error = None
    try:
        run, supports = _load(run), _load(supports)
    except ImportError as exc:
        error = f"its module could not be imported ({type(exc).__name__}: {exc})"
    backend = Backend(name, run, available, supports, dict(layout or {}), auto_devices, error)
    entry.kernels.insert(names.index(before) if before is not None else len(names), backend)
    _NAMES.clear()
    return backend


def unregister_backend(op: str, name: str) -> None:
    entry = _op(op)
    entry.kernels = [k for k in entry.kernels if k.name != name]
    _NAMES.clear()


# ------------------------------------------------------------------------------------------------
# queries
# ------------------------------------------------------------------------------------------------
def ops() -> tuple[str, ...]:
    return tuple(_OPS)


def kernels(op: str) -> tuple[str, ...]:
    """The kernel backends of ``op``, in the order ``auto`` tries them."""
    return tuple(k.name for k in _op(op).kernels)


def backends(*op_names: str) -> tuple[str, ...]:
    """Every value ``backend=`` accepts for any of ``op_names`` (all ops when none is given):
    ``"auto"``, ``"reference"``, then the kernels."""
    if op_names not in _NAMES:
        names = ["auto", "reference"]
        for op in op_names or tuple(_OPS):
            names += [k for k in kernels(op) if k not in names]
        _NAMES[op_names] = tuple(names)
    return _NAMES[op_names]


def availability(op: str, device) -> dict[str, Reason]:
    """{kernel: None if it may run on tensors of ``device``, else why not}."""
    device = torch.device(device)
    return {k.name: k.why_unavailable(device) for k in _op(op).kernels}


def auto_allowed(op: str, kernel: str, device) -> bool:
    """Whether ``auto`` may pick ``kernel`` on tensors of ``device``'s type at all."""
    return _auto_allowed(_kernel(op, kernel), torch.device(device))


def auto_choice(op: str, device) -> str:
    """What ``auto`` runs on ``device`` for inputs every kernel supports and that need no grad."""
    device = torch.device(device)
    for k in _op(op).kernels:
        if _auto_allowed(k, device) and k.why_unavailable(device) is None:
            return k.name
    return "reference"


def why_unsupported(op: str, kernel: str, **inputs) -> Reason:
    """``kernel``'s own verdict on these inputs (shapes, dtypes, options; no data is read, so meta
    tensors work): None when it takes them, else why not. Availability on a device is not asked."""
    return _kernel(op, kernel).why_unsupported(inputs)


def backend_for(op: str, backend: str) -> str:
    """``backend`` where ``op`` has it, else ``"auto"``: one name chosen for several ops (say "hopper"
    for a transformer) reaches each op as something it accepts."""
    return backend if backend in backends(op) else "auto"


def resolve(op: str, backend: str = "auto", **inputs) -> str:
    """The backend ``op(**inputs, backend=backend)`` would run ("reference" or a kernel name); raises
    the ValueError the call would raise."""
    entry = _op(op)
    entry.check(**inputs)
    chosen = _select(entry, backend, inputs)
    return "reference" if chosen is None else chosen.name


def dispatch(op: str, backend: str, **inputs):
    """Check the inputs, pick the backend, conform the layouts it needs, run it."""
    entry = _op(op)
    entry.check(**inputs)
    chosen = _select(entry, backend, inputs)
    return entry.reference(**inputs) if chosen is None else chosen(inputs)


def describe(devices=None) -> str:
    """What each op can run on each device (for ``cogvideox-kernels info``)."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = []
    for op in _OPS:
        lines.append(f"{op} (kernels: {', '.join(kernels(op)) or 'none'}; 'reference' always runs)")
        for device in map(torch.device, devices):
            why = availability(op, device)
            usable = [k if _auto_allowed(_kernel(op, k), device) else f"{k} (when named)"
                      for k, reason in why.items() if reason is None]
            lines.append(f"  {device.type}: usable {', '.join(usable) or 'none'}; auto -> {auto_choice(op, device)}")
            lines += [f"    {k}: {reason}" for k, reason in why.items() if reason is not None]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# availability helpers for registrations
# ------------------------------------------------------------------------------------------------
def triton_device(device: torch.device) -> Reason:
    """Triton kernels: CUDA GPUs of sm_80 or newer; CPU tensors under TRITON_INTERPRET=1."""
    if not triton_available():
        return "triton is not installed"
    if device.type == "cpu":
        return None if interpret_mode() else "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    if device.type != "cuda":
        return f"Triton kernels need CUDA tensors, not {device.type}"
    if not gpu_supports_triton(device):
        return "the Triton kernels need a GPU of sm_80 or newer"
    return None


def cuda_arch(major: int, minor: int = 0) -> Callable[[torch.device], Reason]:
    """``available`` for a kernel that needs CUDA tensors on a GPU of at least sm_{major}{minor}."""

    def available(device: torch.device) -> Reason:
        if device.type != "cuda":
            return f"this kernel needs CUDA tensors, not {device.type}"
        index = device.index if device.index is not None else torch.cuda.current_device()
        if torch.cuda.get_device_capability(index) < (major, minor):
            return f"this kernel needs a GPU of sm_{major}{minor} or newer"
        return None

    return available


def extension_cuda(device: torch.device) -> Reason:
    """``available`` for the extension's CUDA kernels: CUDA tensors and an extension built with CUDA."""
    from .. import _ext

    if device.type != "cuda":
        return "the CUDA kernel needs CUDA tensors"
    return None if _ext.cuda_available() else "the extension was built without CUDA" + _ext.extension_error()


def extension_cpp(device: torch.device) -> Reason:
    """``available`` for the extension's C++ CPU path: CPU tensors and a loadable extension."""
    from .. import _ext

    if device.type != "cpu":
        return "the C++ path needs CPU tensors"
    return None if _ext.extension_available() else "the compiled extension could not be loaded" + _ext.extension_error()


# ------------------------------------------------------------------------------------------------
# internals
# ------------------------------------------------------------------------------------------------
def _op(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; registered: {tuple(_OPS)}") from None


def _load(spec):
    """A callable, or ``"package.module:function"`` imported now (not per call: torch.compile cannot
    trace an import)."""
    if not isinstance(spec, str):
        return spec
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _kernel(op: str, name: str) -> Backend:
    return next(k for k in _op(op).kernels if k.name == name)


def _auto_allowed(kernel: Backend, device: torch.device) -> bool:
    return kernel.auto_devices is None or device.type in kernel.auto_devices


def _tensors(inputs: dict):
    """(name, tensor) of every tensor input, including those inside tuples such as q_norm."""
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    yield f"{name}[{i}]", item


def _grad_input(inputs: dict) -> str | None:
    """The first input autograd would track through this call, or None."""
    if not torch.is_grad_enabled():
        return None
    return next((name for name, t in _tensors(inputs) if t.requires_grad), None)


def _forced(op: Op) -> str:
    """``COGVIDEOX_KERNELS_BACKEND``: the backend ``auto`` means for this op."""
    forced = os.environ.get(BACKEND_ENV, "").strip()
    if not forced or forced == "auto":
        return "auto"
    valid = backends()
    if forced not in valid:
        raise ValueError(f"{BACKEND_ENV}={forced!r} is not a backend; choose one of {valid} (or unset it)")
    return forced if forced in backends(op.name) else "auto"


def _select(op: Op, backend: str, inputs: dict) -> Backend | None:
    """The kernel to run, or None for the reference."""
    valid = backends(op.name)
    if backend not in valid:
        raise ValueError(f"{op.name}: backend={backend!r} is not supported; choose one of {valid}")
    if backend == "auto":
        backend = _forced(op)
    if backend == "reference":
        return None
    device = inputs[op.device_arg].device
    grad = _grad_input(inputs)
    if backend == "auto":
        if grad is not None:
            return None  # the reference has the backward pass
        for k in op.kernels:
            if (_auto_allowed(k, device) and k.why_unavailable(device) is None
                    and k.why_unsupported(inputs) is None):
                return k
        return None
    kernel = _kernel(op.name, backend)
    why = kernel.why_unavailable(device)
    if why is not None:
        raise ValueError(f"{op.name}: backend={backend!r} cannot run on {device} tensors ({why}); "
                         "use backend='reference' or 'auto'")
    why = kernel.why_unsupported(inputs)
    if why is not None:
        raise ValueError(f"{op.name}: backend={backend!r} does not support these inputs: {why}; "
                         "use backend='auto' (it falls back to the reference) or 'reference'")
    if grad is not None:
        raise ValueError(f"{op.name}: backend={backend!r} has no backward pass, but {grad} requires grad and "
                         "grad mode is on; run it under torch.no_grad() or torch.inference_mode(), or use "
                         "backend='auto' (it takes the differentiable reference) or 'reference'")
    return kernel


def _conform_tensor(t: torch.Tensor, need: str) -> torch.Tensor:
    if need == CONTIGUOUS and not t.is_contiguous():
        return t.contiguous()
    if need == UNIT_LAST_STRIDE and t.dim() and t.stride(-1) != 1 and t.shape[-1] != 1:
        return t.contiguous()
    return t


def _conform(inputs: dict, layout: dict) -> dict:
    """Copies of the tensor inputs whose strides the kernel does not handle (see ``layout``)."""
    if not layout:
        return inputs
    out = dict(inputs)
    default = layout.get("*", ANY_STRIDES)
    for name, value in inputs.items():
        need = layout.get(name, default)
        if need == ANY_STRIDES:
            continue
        if isinstance(value, torch.Tensor):
            out[name] = _conform_tensor(value, need)
        elif isinstance(value, (tuple, list)):
            out[name] = type(value)(_conform_tensor(v, need) if isinstance(v, torch.Tensor) else v for v in value)
    return out


__all__ = ["register_op", "register_backend", "unregister_backend", "ops", "kernels", "backends", "availability",
           "auto_allowed", "auto_choice", "resolve", "dispatch", "describe", "triton_device", "cuda_arch", "Backend",
           "CONTIGUOUS", "UNIT_LAST_STRIDE", "ANY_STRIDES"]
