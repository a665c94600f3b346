"""Where a patch lives on a model, so that copies and pickles carry it and ``remove`` finds it.

Nothing is kept outside the model: a patched attention module holds our processor (its
``original`` is the processor it replaced), a patched block or VAE conv holds our forward as an
instance attribute (a picklable object; the module's class is never changed, so diffusers'
``TransformerBlockRegistry`` and everything else that looks classes up still finds it), and the model
holds the options it was patched with under :data:`STATE`. ``copy.deepcopy`` and ``torch.save``
therefore give a model that is patched the same way, and reading the patch back off the modules
keeps ``is_patched`` / ``remove`` truthful after a user's own change (``set_attn_processor``,
``fuse_qkv_projections``): what is no longer ours is never touched.

Hooks that diffusers (``HookRegistry``) or accelerate (``add_hook_to_module``) registered before
``apply`` hold the module's own forward inside their wrapper; our forward goes into that innermost
slot, under the hooks, and ``remove`` puts the module's own forward back there.
"""
from __future__ import annotations

import os
import types

STATE = "_cogvideox_kernels"  # model attribute: {"options": ..., "sequence": ..., "cp_plan": ...}

# ``apply(..., precision=)``: what each patched op runs with, by mode. The one place that maps the
# user's word to each op's own ``precision=`` argument (the attention column belongs to the 8-bit
# attention work; until it lands the attention stays exact in every mode).
# "linear": adaln_linear / gated_linear, the attention half's projections (to_q/k/v, to_out) in the fused
# attention half.
PRECISION_MODES = {
    "bf16": {"rope3d_attention": "bf16", "expert_ffn": "bf16", "linear": "bf16"},  # exact, the default
    "fp8": {"rope3d_attention": "bf16", "expert_ffn": "fp8", "linear": "bf16"},    # FP8 e4m3 FFN GEMMs (lossy)
    # FP8 FFN GEMMs and FP8 attention projections: every large GEMM of a block in FP8 (lossy, opt-in)
    "fp8-all": {"rope3d_attention": "bf16", "expert_ffn": "fp8", "linear": "fp8"},
    "int8": {"rope3d_attention": "int8", "expert_ffn": "bf16", "linear": "bf16"},  # smoothed INT8 Q K^T (lossy)
    "int8+fp8": {"rope3d_attention": "int8", "expert_ffn": "fp8", "linear": "bf16"},  # both 8-bit paths
    "int8-ffn": {"rope3d_attention": "bf16", "expert_ffn": "int8", "linear": "bf16"},  # int8 FFN GEMMs (lossy)
}


# The fused attention half (attention.fused_attention_half): norm1's LN-modulate pre-pass, the to_q/to_k/to_v
# GEMMs, rope3d_attention, to_out's GEMM with bias + gate + residual in its epilogue, inside each patched block's
# forward. On by default (H200, 5B step at f83b370: 1.118 s vs 1.175 s unfused, same error; see
# benchmarks/results/attention_half_notes.md); off with the environment variable set to 0 at import, or by
# setting this attribute (read at every call).
FUSED_ATTENTION_HALF_ENV = "COGVIDEOX_KERNELS_FUSED_ATTENTION_HALF"
FUSED_ATTENTION_HALF = os.environ.get(FUSED_ATTENTION_HALF_ENV, "1").strip() != "0"


def op_precision(precision: str, op: str) -> str:
    """The ``precision=`` that ``op`` gets under ``apply(..., precision=precision)``; a ValueError
    names the modes when ``precision`` is not one."""
    if precision not in PRECISION_MODES:
        raise ValueError(f"precision={precision!r} is not supported; choose one of {tuple(PRECISION_MODES)}")
    return PRECISION_MODES[precision][op]


def _is_own_forward(fn, module) -> bool:
    """``fn`` is ``module``'s class forward bound to ``module`` (what hooks capture when registered)."""
    return getattr(fn, "__self__", None) is module and getattr(fn, "__func__", None) is type(module).forward


def _slots(module):
    """(holder, attribute, kind) of each place that may hold the innermost forward of ``module``."""
    slots = [(module, "forward", "instance")]
    registry = module.__dict__.get("_diffusers_hook")
    if registry is not None and registry._fn_refs:
        ref = registry._fn_refs[0]  # the first hook registered wraps the module's forward itself
        slots.append((ref, "original_forward" if ref.original_forward is not None else "forward", "hook"))
    if "_old_forward" in module.__dict__:  # accelerate's add_hook_to_module
        slots.append((module, "_old_forward", "hook"))
    return slots


def _slot_value(holder, attr, kind):
    return holder.__dict__.get(attr) if kind == "instance" else getattr(holder, attr)


def installed(module, forward_cls):
    """Our forward of class ``forward_cls`` installed on ``module``, or None."""
    for holder, attr, kind in _slots(module):
        value = _slot_value(holder, attr, kind)
        if isinstance(value, forward_cls):
            return value
    return None


def install(module, forward) -> bool:
    """Make ``forward`` the module's own forward, under any hooks already wrapped around it.
    False when the module's forward was replaced by something we do not know (nothing changes)."""
    if "forward" not in module.__dict__:
        module.forward = forward
        return True
    for holder, attr, kind in _slots(module)[1:]:
        if _is_own_forward(getattr(holder, attr), module):
            setattr(holder, attr, forward)
            return True
    return False


def uninstall(module, forward_cls) -> bool:
    """Put the module's own forward back where our forward of class ``forward_cls`` is."""
    for holder, attr, kind in _slots(module):
        if isinstance(_slot_value(holder, attr, kind), forward_cls):
            if kind == "instance":
                del module.__dict__["forward"]
            else:
                setattr(holder, attr, types.MethodType(type(module).forward, module))
            return True
    return False
