"""Hopper (sm_90a) backend of ``rope3d_attention``: the public function, its checks and custom op.

``rope3d_attention_hopper`` computes exactly ``rope3d_attention_reference`` (QK LayerNorm, RoPE3D
on the video tokens, softmax attention) with the Triton pre-pass ``qk_norm_rope_fwd`` (norm +
rotation, head-major q/k/v) and the Gluon kernel of ``hopper_fwd.py`` (TMA K/V ring, warp
specialized, ``warpgroup_mma``). It runs only on sm_90 GPUs (H100/H200) with bf16/fp16 inputs and
head_dim 64 or 128; ``hopper_supports`` says whether a call can take it and ``hopper_available``
whether a device can. The Gluon module is imported lazily, so this file imports anywhere (CPU CI).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .reference import check_attention_inputs

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
MAX_ROWS = 2 ** 31 - 1  # TMA coordinates are int32: B * H * S rows of the head-major view


@functools.lru_cache(maxsize=None)
def gluon_import_error() -> Optional[str]:
    """None when the Gluon kernel module imports, else the reason it does not."""
    try:
        from . import hopper_fwd  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the installed triton
        return f"the Gluon kernel does not import ({type(e).__name__}: {e})"
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    """(major, minor) of a CUDA device, None for other devices."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def unsupported_reason(dtype: torch.dtype, head_dim: int, capability: Optional[tuple[int, int]],
                       rows: int = 0) -> Optional[str]:
    """Why the Hopper kernel cannot take such a call (None: it can). ``capability`` is the
    device's compute capability (None: not a CUDA device); ``rows`` = B * H * S."""
    if capability is None:
        return "it needs a CUDA device (sm_90)"
    if capability != (9, 0):
        return f"it needs compute capability 9.0 (H100/H200); the device has {capability}"
    if dtype not in SUPPORTED_DTYPES:
        return f"q has dtype {dtype}; supported: bfloat16, float16"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim={head_dim}; supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}"
    if rows > MAX_ROWS:
        return f"B*H*S={rows} rows exceed the int32 TMA coordinates"
    return gluon_import_error()


# torch.compile cannot trace the device queries and caches below; the answers are fixed for a
# device, so dynamo evaluates them once while tracing and keeps the result (no graph break).
@torch.compiler.assume_constant_result
def _device_ok(device: torch.device) -> bool:
    return device_capability(device) == (9, 0) and gluon_import_error() is None


@torch.compiler.assume_constant_result
def _call_reason(dtype: torch.dtype, head_dim: int, device: torch.device, rows: int) -> str:
    return unsupported_reason(dtype, head_dim, device_capability(device), rows) or ""


def available(device) -> Optional[str]:
    """Registry hook: None when the kernel can run on ``device``, else why not."""
    return _call_reason(torch.bfloat16, 64, torch.device(device), 0) or None


def supports(q, k, v, precision="bf16", **_) -> Optional[str]:
    """Registry hook: None when the kernel takes these inputs, else why not (both precisions
    take the same inputs)."""
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v have dtypes {q.dtype}, {k.dtype}, {v.dtype}; the kernel needs one dtype"
    B, S, H, D = q.shape
    return _call_reason(q.dtype, D, q.device, B * H * S) or None


def hopper_available(device) -> tuple[bool, str]:
    """(True, "") when the Hopper kernel can run on ``device``, else (False, why)."""
    device = torch.device(device)
    reason = unsupported_reason(torch.bfloat16, 64, device_capability(device))
    return reason is None, reason or ""


def hopper_supports(q, k, v, *args, **kwargs) -> bool:
    """Whether ``rope3d_attention_hopper`` takes these tensors (dtype, head_dim, device sm_90,
    Gluon importable). The other arguments of the op do not change the answer."""
    if not _device_ok(q.device):
        return False
    B, S, H, D = q.shape
    return (q.dtype in SUPPORTED_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and D in SUPPORTED_HEAD_DIMS and B * H * S <= MAX_ROWS)


# ----------------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------------
# The pre-pass's launch for this path (programs over tokens of one head, so that the per-head
# max row norm is one atomic per program; ``benchmarks/experiments/prepass_sweep.py``).
PREPASS_CONFIG = dict(head_rows=True, block_r=64, num_warps=4)
# bf16 with the score bound: the pre-pass writes q * scale * log2(e), so the kernel's bounded heads
# take P = 2^(q.k) straight from the accumulator (one FFMA per score less; ``hopper_fwd``'s
# PRESCALED). Config key ``PRESCALE_Q`` overrides it (benchmarks).
PRESCALE_Q = True


def hopper_attention_fwd(q, k, v, text_len, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight,
                         k_norm_bias, apply_q_norm, apply_k_norm, eps, scale, *, config=None):
    """Pre-pass (LayerNorm + RoPE, head-major q/k/v, max row norms of q and k per head) then the
    Gluon attention kernel. ``config``: kernel config keys (``hopper_fwd.default_config``) plus
    ``SCORE_BOUND`` (default True; False: every head keeps the running-max softmax) and
    ``PRESCALE_Q`` (default ``PRESCALE_Q``; with the bound only)."""
    from .hopper_fwd import hopper_attention_core, v_token_major_ok
    from .triton_fwd import LOG2E, qk_norm_rope_fwd

    B, S, H, D = q.shape
    config = dict(config or {})
    # The score bound (a softmax without a running max, ``hopper_fwd._score_bound``) needs the max
    # row norms of q and k per head: the pre-pass reduces them per program (one head, a block of
    # tokens) into norm_max by atomic max. bf16 only: fp16 P has too little exponent range for it.
    norm_max = None
    if config.pop("SCORE_BOUND", True) and q.dtype == torch.bfloat16:
        norm_max = torch.zeros((2, B * H), dtype=torch.float32, device=q.device)
    prescale = bool(config.pop("PRESCALE_Q", PRESCALE_Q)) and norm_max is not None
    if cos is not None and (cos.stride(-1) != 1 or sin.stride() != cos.stride()):
        cos, sin = cos.contiguous(), sin.contiguous()  # the pre-pass indexes both with cos's stride
    pre = dict(PREPASS_CONFIG)
    qh = qk_norm_rope_fwd(q, text_len, cos, sin, q_norm_weight, q_norm_bias, apply_q_norm, eps,
                          norm_max=None if norm_max is None else norm_max[0],
                          out_scale=scale * LOG2E if prescale else None, **pre)
    kh = qk_norm_rope_fwd(k, text_len, cos, sin, k_norm_weight, k_norm_bias, apply_k_norm, eps,
                          norm_max=None if norm_max is None else norm_max[1], **pre)
    # V is read in place when its layout allows (the model's QKV slice does), else copied head-major
    v_in_place = v_token_major_ok(v)
    vh = v if v_in_place else qk_norm_rope_fwd(v, 0, None, None, None, None, False,
                                               eps).transpose(1, 2)
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    # the pre-pass returns [B, S, H, D] views of [B, H, S, D] storage
    return hopper_attention_core(qh.transpose(1, 2), kh.transpose(1, 2), vh, out, scale,
                                 config or None, norm_max, v_token_major=v_in_place,
                                 q_prescaled=prescale)


@torch.library.custom_op("cogvideox_kernels::rope3d_attention_hopper", mutates_args=())
def rope3d_attention_hopper_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int,
                               cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                               q_norm_weight: Optional[torch.Tensor],
                               q_norm_bias: Optional[torch.Tensor],
                               k_norm_weight: Optional[torch.Tensor],
                               k_norm_bias: Optional[torch.Tensor], apply_q_norm: bool,
                               apply_k_norm: bool, eps: float, scale: float) -> torch.Tensor:
    return hopper_attention_fwd(q, k, v, text_len, cos, sin, q_norm_weight, q_norm_bias,
                                k_norm_weight, k_norm_bias, apply_q_norm, apply_k_norm, eps, scale)


@rope3d_attention_hopper_op.register_fake
def _(q, k, v, text_len, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
      apply_q_norm, apply_k_norm, eps, scale):
    return q.new_empty(q.shape)  # contiguous [B, S, H, D], as the kernel writes it


def rope3d_attention_hopper(q, k, v, *, text_len, cos=None, sin=None, q_norm=None, k_norm=None,
                            eps=1e-6, scale=None, precision="bf16"):
    """``rope3d_attention`` on the Hopper kernel; same arguments and result as
    ``rope3d_attention_reference`` (q, k, v ``[B, S, H, D]`` strided views with unit last stride,
    q_norm/k_norm ``(weight, bias)`` pairs or None, cos/sin ``[S - text_len, D]`` float32).
    ``precision="int8"`` runs the 8-bit kernel (``hopper_int8_fwd.py``), whose reference is the
    float32 emulation ``int8_prepass.int8_attention_reference``.
    Raises ValueError when the kernel cannot take the call (see ``hopper_supports``)."""
    check_attention_inputs(q, k, v, text_len, cos, sin, q_norm, k_norm, eps, scale, precision)
    B, S, H, D = q.shape
    reason = _call_reason(q.dtype, D, q.device, B * H * S)
    if reason:
        raise ValueError(f"rope3d_attention_hopper: {reason}")
    scale = D ** -0.5 if scale is None else float(scale)
    q_w, q_b = q_norm if q_norm is not None else (None, None)
    k_w, k_b = k_norm if k_norm is not None else (None, None)
    if precision == "int8":
        return rope3d_attention_hopper_int8_op(q, k, v, int(text_len), cos, sin, q_w, q_b, k_w,
                                               k_b, q_norm is not None, k_norm is not None,
                                               float(eps), scale)
    return rope3d_attention_hopper_op(q, k, v, int(text_len), cos, sin, q_w, q_b, k_w, k_b,
                                      q_norm is not None, k_norm is not None, float(eps), scale)


# ----------------------------------------------------------------------------------------------
# precision="int8": quantizing pre-pass (int8_prepass.py) + 8-bit Gluon kernel (hopper_int8_fwd.py)
# ----------------------------------------------------------------------------------------------
def hopper_int8_attention_fwd(q, k, v, text_len, cos, sin, q_norm_weight, q_norm_bias,
                              k_norm_weight, k_norm_bias, apply_q_norm, apply_k_norm, eps, scale,
                              *, config=None):
    """Pre-pass (LayerNorm + RoPE, K smoothing, with ROTATE the rotation of q and k, INT8 q/k
    (with K_SPLIT k's second INT8 part), the dequantized rows' max norms per head; FP8 V^T with
    PV_FP8) then the 8-bit kernel. 16-bit V is read in place when its layout allows (the QKV
    slice), else copied head-major."""
    from .hopper_fwd import v_token_major_ok
    from .hopper_int8_fwd import bound_applies, hopper_int8_attention_core, resolve_config
    from .int8_prepass import quantize_int8_inputs
    from .triton_fwd import qk_norm_rope_fwd

    B, S, H, D = q.shape
    cfg = resolve_config(D, config)
    bounded = bound_applies(cfg, v.dtype)
    if cos is not None and (cos.stride(-1) != 1 or sin.stride() != cos.stride()):
        cos, sin = cos.contiguous(), sin.contiguous()
    t = quantize_int8_inputs(q, k, v, text_len, cos, sin, q_norm_weight, q_norm_bias,
                             k_norm_weight, k_norm_bias, apply_q_norm, apply_k_norm, eps,
                             block_n=cfg["BLOCK_N"], fp8_v=cfg["PV_FP8"], norms=bounded,
                             rotate=bool(cfg["ROTATE"]), k_split=cfg["K_SPLIT"])
    v_in, v_in_place = t.v8t, False
    if not cfg["PV_FP8"]:  # P V in 16 bits: V in place, or head-major in its own dtype
        v_in_place = v_token_major_ok(v)
        v_in = v if v_in_place else qk_norm_rope_fwd(v, 0, None, None, None, None, False,
                                                     eps).transpose(1, 2)
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    return hopper_int8_attention_core(t.q8, t.q_scale, t.k8, t.k_scale, v_in, t.v_scale, out,
                                      scale, cfg, t.norm_max, v_token_major=v_in_place,
                                      k8_lo=t.k8_lo)


@torch.library.custom_op("cogvideox_kernels::rope3d_attention_hopper_int8", mutates_args=())
def rope3d_attention_hopper_int8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    text_len: int, cos: Optional[torch.Tensor],
                                    sin: Optional[torch.Tensor],
                                    q_norm_weight: Optional[torch.Tensor],
                                    q_norm_bias: Optional[torch.Tensor],
                                    k_norm_weight: Optional[torch.Tensor],
                                    k_norm_bias: Optional[torch.Tensor], apply_q_norm: bool,
                                    apply_k_norm: bool, eps: float, scale: float) -> torch.Tensor:
    return hopper_int8_attention_fwd(q, k, v, text_len, cos, sin, q_norm_weight, q_norm_bias,
                                     k_norm_weight, k_norm_bias, apply_q_norm, apply_k_norm, eps,
                                     scale)


@rope3d_attention_hopper_int8_op.register_fake
def _(q, k, v, text_len, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
      apply_q_norm, apply_k_norm, eps, scale):
    return q.new_empty(q.shape)


__all__ = ["rope3d_attention_hopper", "rope3d_attention_hopper_op",
           "rope3d_attention_hopper_int8_op", "hopper_int8_attention_fwd", "hopper_available",
           "hopper_supports", "unsupported_reason", "hopper_attention_fwd"]
