"""The weights a diffusers module computes with, had the way its own forward would have them.

Our ops take weights as tensors, so a patched forward skips some modules' forwards (``norm2``, ``ff``,
``norm_q``, a VAE ``conv``) and reads their parameters instead. That is exact only when nothing the
skipped forward would have done is lost. Three things can sit between a module and its parameters:

* **hooks** that move or cast the parameters around the forward: diffusers' group offloading
  (onload from CPU, memory or disk) and layerwise casting (storage -> compute dtype), accelerate's
  sequential / model offload (``AlignDevicesHook``, ``CpuOffload``) and layerwise casting. We run
  their ``pre_forward`` before reading and their ``post_forward`` after our op (an ``ExitStack``).
  Any other hook (diffusers' ``FeedForwardSkipHook``, a cache, a user's torch forward hook) is not
  known to leave the output alone, so the module is not skipped: the caller takes diffusers' path.
* **peft LoRA** (``peft.tuners.lora.Linear``): the effective weight is the base weight plus
  ``scaling[a] * B_a @ A_a`` for each active, unmerged adapter (and ``scaling * B.bias`` for a
  ``lora_bias``), exactly what its forward adds on the activations. Merged adapters are already in
  the base weight; disabled adapters add nothing. DoRA and the other LoRA variants, a dropout that is
  not the identity (training mode) and "disabled but merged" (peft unmerges inside its forward) are
  not had cheaply and exactly: diffusers' path.
* **tensor subclasses** (quantized weights, GGUF, bitsandbytes) and weights still on ``meta``: never
  read; diffusers' path.

Checks come in two steps: ``*_ok`` functions look at types and hooks without running anything, so
the caller can choose diffusers' path before a hook has run; ``*_params`` functions then run the hooks
onto an ``ExitStack`` and return ``(weight, bias)`` (``None`` if what the hooks left is still not a
plain floating tensor).
"""
from __future__ import annotations

import contextlib

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ------------------------------------------------------------------------------------------ hooks


_KNOWN_HOOKS: tuple = ()


def _known_hook_types() -> tuple:
    """Hook classes whose pre/post_forward only onload, offload or cast the module's own tensors
    (or, for peft's input-autocast switch, touch nothing we read). Found once; a plain global (not
    lru_cache) so that torch.compile reads it as a constant."""
    global _KNOWN_HOOKS
    if not _KNOWN_HOOKS:
        _KNOWN_HOOKS = _find_known_hook_types()
    return _KNOWN_HOOKS


def _find_known_hook_types() -> tuple:
    known = []
    try:
        from diffusers.hooks.group_offloading import GroupOffloadingHook, LayerExecutionTrackerHook
        from diffusers.hooks.layerwise_casting import LayerwiseCastingHook, PeftInputAutocastDisableHook

        known += [GroupOffloadingHook, LayerExecutionTrackerHook, LayerwiseCastingHook,
                  PeftInputAutocastDisableHook]
    except ImportError:  # pragma: no cover - diffusers is optional
        pass
    try:
        from accelerate import hooks as acc

        known += [getattr(acc, name) for name in ("AlignDevicesHook", "CpuOffload", "LayerwiseCastingHook")
                  if hasattr(acc, name)]
    except ImportError:  # pragma: no cover - accelerate is optional
        pass
    return tuple(known)


def _accelerate_hooks(hook) -> list:
    sequence = getattr(hook, "hooks", None)  # accelerate's SequentialHook
    return list(sequence) if type(hook).__name__ == "SequentialHook" and sequence is not None else [hook]


def hooks_known(module) -> bool:
    """Every hook on ``module`` is one whose effect on its parameters we reproduce (see module doc)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    known = _known_hook_types()
    registry = module.__dict__.get("_diffusers_hook")
    diffusers_hooks = list(registry.hooks.values()) if registry is not None else []
    accelerate_hook = module.__dict__.get("_hf_hook")
    if diffusers_hooks and accelerate_hook is not None:
        return False  # their nesting order is not recorded anywhere we can read
    hooks = diffusers_hooks + (_accelerate_hooks(accelerate_hook) if accelerate_hook is not None else [])
    return all(type(h) in known for h in hooks)


def enter_hooks(module, stack: contextlib.ExitStack) -> None:
    """Run ``module``'s hooks' pre_forward now (outermost first) and their post_forward when ``stack``
    closes, as a call of ``module`` would around its forward. Assumes :func:`hooks_known`."""
    registry = module.__dict__.get("_diffusers_hook")
    if registry is not None:
        for name in reversed(registry._hook_order):  # the last registered hook is the outermost
            hook = registry.hooks[name]
            hook.pre_forward(module)
            stack.callback(hook.post_forward, module, None)
    accelerate_hook = module.__dict__.get("_hf_hook")
    if accelerate_hook is not None:
        accelerate_hook.pre_forward(module)
        stack.callback(accelerate_hook.post_forward, module, None)


# ------------------------------------------------------------------------------------ module kinds


def _plain(t) -> bool:
    """A parameter we may hand to a kernel: a plain tensor (no quantized subclass), float, materialised."""
    return t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype in FLOAT_DTYPES
                         and t.device.type != "meta")


def identity_ok(module) -> bool:
    """A module we skip whose forward is the identity here (dropout in eval or p=0) or a container."""
    if isinstance(module, torch.nn.Dropout) and module.training and module.p > 0:
        return False
    return hooks_known(module)


def _lora_linear_type():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - peft is optional
        return None
    return Linear


def _lora_terms(module) -> list:
    """The adapters whose ``B @ A`` a forward of this peft LoRA Linear adds (no checks)."""
    if module.disable_adapters or module.merged:
        return []
    return [a for a in module.active_adapters if a in module.lora_A]


def linear_ok(module) -> bool:
    """``module`` is an ``nn.Linear`` or a peft LoRA Linear whose effective weight we can form exactly."""
    if not hooks_known(module):
        return False
    if type(module) is torch.nn.Linear:
        return True
    if _lora_linear_type() is None or type(module) is not _lora_linear_type():
        return False
    if getattr(module, "fan_in_fan_out", False) or (module.disable_adapters and module.merged):
        return False  # (peft unmerges inside forward in the second case)
    for a in _lora_terms(module):
        if (a in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(a, False)
                or type(module.lora_A[a]) is not torch.nn.Linear or type(module.lora_B[a]) is not torch.nn.Linear
                or not linear_ok(module.lora_A[a]) or not linear_ok(module.lora_B[a])):
            return False
        dropout = module.lora_dropout[a]
        if not (isinstance(dropout, (torch.nn.Identity, torch.nn.Dropout)) and identity_ok(dropout)):
            return False
    return linear_ok(module.base_layer)


def linear_params(module, stack: contextlib.ExitStack):
    """(weight, bias) of the Linear that ``module`` computes (after :func:`linear_ok`), or None."""
    if type(module) is torch.nn.Linear:
        return leaf_params(module, stack)
    enter_hooks(module, stack)
    base = linear_params(module.base_layer, stack)
    if base is None:
        return None
    weight, bias = base
    for a in _lora_terms(module):
        A = leaf_params(module.lora_A[a], stack)
        B = leaf_params(module.lora_B[a], stack)
        if A is None or B is None:
            return None
        scaling = module.scaling[a]
        # what forward adds, lora_B(lora_A(x)) * scaling, in the LoRA weights' dtype
        delta = (B[0] @ A[0].to(B[0].dtype)) * scaling
        weight = weight + delta.to(weight.dtype)
        if B[1] is not None:
            lora_bias = (B[1] * scaling).to(weight.dtype)
            bias = lora_bias if bias is None else bias + lora_bias
    return weight, bias


def leaf_params(module, stack: contextlib.ExitStack):
    """(weight, bias) of a leaf (Linear, LayerNorm, Conv3d) once its hooks have run, or None."""
    enter_hooks(module, stack)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (weight, bias) if _plain(weight) and _plain(bias) else None


def layer_norm_ok(module) -> bool:
    return type(module) is torch.nn.LayerNorm and hooks_known(module)


# --------------------------------------------------------------------------------------- autograd


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from _tensors(v)


def autograd_needed(inputs=(), modules=()) -> bool:
    """Grad mode is on and an input or a parameter requires grad: our kernels are forward-only, so
    diffusers' path keeps gradients right (training, gradient guidance on latents, ...)."""
    if not torch.is_grad_enabled():
        return False
    return (any(t.requires_grad for t in _tensors(inputs))
            or any(p.requires_grad for m in modules for p in m.parameters()))


def function_mode_active() -> bool:
    """A TorchFunctionMode that may rewrite torch calls is active (e.g. diffusers' LayerSkip replaces
    scaled_dot_product_attention's output this way); our kernel would not see it."""
    if torch.compiler.is_compiling():
        return False
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._device import DeviceContext

    return any(not isinstance(mode, DeviceContext) for mode in _get_current_function_mode_stack())
