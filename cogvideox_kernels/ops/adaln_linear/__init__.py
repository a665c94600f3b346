"""The two ends of a block's attention half, as ops around a plain GEMM:

    adaln_linear(x, modulation, W, b)     = (LN(x) * (1 + scale_m) + shift_m) @ W^T + b
    gated_linear(x, a, W, b, modulation)  = x + gate_m * (a @ W^T + b)

m is the token's modality (the first ``text_len`` tokens of a sample are text, the rest video) and
``modulation`` is ``[B, 6, hidden]`` in diffusers' chunk order, as for ``expert_ffn`` (whose pre-pass
and gate + residual epilogue the Triton backend runs: ``expert_ffn/triton_fwd.py``). With W the
concatenated QKV weights and then to_out's, they are a CogVideoX block's norm1 + projections and its
to_out + gate + residual.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import registry
from .._checks import FLOAT_DTYPES, check_int, check_shape, check_tensor
from ..expert_ffn.reference import GATE_T, GATE_V, MODULATION_ROWS, modulated_norm_reference

_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _work(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_common(x, modulation, weight, bias, text_len, k_name, k):
    check_tensor("x", x, ndim=3, dtypes=_DTYPES)
    B, S, Hd = x.shape
    if min(B, S, Hd) == 0:
        raise ValueError(f"x has an empty dimension: shape {tuple(x.shape)} [B, S, hidden]")
    check_tensor("modulation", modulation, ndim=3, device=x.device)
    check_tensor("weight", weight, ndim=2, device=x.device)
    if weight.shape[1] != k:
        raise ValueError(f"weight must be [out_features, {k_name}={k}], got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        check_shape("bias", bias, (weight.shape[0],))
    for name, t in (("modulation", modulation), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    check_int("text_len", text_len, 0, S)


def weight_parts(weight, bias):
    """``(weights, biases, stacked)``: ``weight`` is one ``[out, hidden]`` tensor (``stacked`` False) or a
    list/tuple of equal-shape ones (``stacked`` True; ``bias`` then None or a list of the same length whose
    entries may be None)."""
    if isinstance(weight, torch.Tensor):
        if bias is not None and not isinstance(bias, torch.Tensor):
            raise ValueError(f"bias must be a tensor or None when weight is one tensor, got {type(bias).__name__}")
        return [weight], [bias], False
    if not isinstance(weight, (list, tuple)) or not weight:
        raise ValueError(f"weight must be a tensor or a non-empty list of tensors, got {type(weight).__name__}")
    weights = list(weight)
    biases = [None] * len(weights) if bias is None else bias
    if not isinstance(biases, (list, tuple)) or len(biases) != len(weights):
        raise ValueError(f"bias must be None or a list of {len(weights)} (tensor or None) entries like weight")
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"weight[{i}] must be a tensor, got {type(w).__name__}")
        if w.shape != weights[0].shape:
            raise ValueError(f"weight[{i}] must be a tensor of weight[0]'s shape {tuple(weights[0].shape)}, got "
                             f"{tuple(w.shape)}")
    return weights, list(biases), True


def check_adaln_linear_inputs(x, modulation, weight, bias, text_len, norm_weight, norm_bias, eps):
    check_tensor("x", x, ndim=3, dtypes=_DTYPES)
    for w, b in zip(*weight_parts(weight, bias)[:2]):
        _check_common(x, modulation, w, b, text_len, "hidden", x.shape[-1])
    B, S, Hd = x.shape
    check_shape("modulation", modulation, (B, MODULATION_ROWS, Hd))
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None:
            check_tensor(name, t, ndim=1, device=x.device)
            check_shape(name, t, (Hd,))
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps={eps!r} must be a positive float")


def check_gated_linear_inputs(x, a, weight, bias, modulation, text_len):
    check_tensor("x", x, ndim=3, dtypes=_DTYPES)
    check_tensor("a", a, ndim=3, device=x.device)
    _check_common(x, modulation, weight, bias, text_len, "a's last dim", a.shape[-1])
    B, S, Hd = x.shape
    check_shape("a", a, (B, S, a.shape[-1]))
    check_shape("weight", weight, (Hd, a.shape[-1]))
    check_shape("modulation", modulation, (B, MODULATION_ROWS, Hd))
    if a.dtype != x.dtype:
        raise ValueError(f"a has dtype {a.dtype} but x has {x.dtype}; they must match")


def adaln_linear_reference(x, modulation, weight, bias=None, *, text_len, norm_weight=None, norm_bias=None,
                           eps=1e-5):
    """In float32 (float64 stays float64); returns x's dtype."""
    work = _work(x)
    up = lambda t: None if t is None else t.to(work)  # noqa: E731
    h, _ = modulated_norm_reference(x.to(work), up(modulation), text_len, up(norm_weight), up(norm_bias), eps)
    weights, biases, stacked = weight_parts(weight, bias)
    outs = [F.linear(h, up(w), up(b)).to(x.dtype) for w, b in zip(weights, biases)]
    return torch.stack(outs) if stacked else outs[0]


def gated_linear_reference(x, a, weight, bias, modulation, *, text_len):
    """In float32 (float64 stays float64); returns x's dtype."""
    work = _work(x)
    f = F.linear(a.to(work), weight.to(work), None if bias is None else bias.to(work))
    is_text = (torch.arange(x.shape[1], device=x.device) < text_len)[None, :, None]
    gate = torch.where(is_text, modulation[:, None, GATE_T], modulation[:, None, GATE_V]).to(work)
    return (x.to(work) + gate * f).to(x.dtype)


registry.register_op("adaln_linear", reference=adaln_linear_reference, check=check_adaln_linear_inputs,
                     device_arg="x")
registry.register_op("gated_linear", reference=gated_linear_reference, check=check_gated_linear_inputs,
                     device_arg="x")
for _op in ("adaln_linear", "gated_linear"):
    registry.register_backend(
        _op, "triton", run=f"cogvideox_kernels.ops.adaln_linear.triton_fwd:{_op}_triton",
        supports="cogvideox_kernels.ops.adaln_linear.triton_fwd:supports",
        available=registry.triton_device, auto_devices=("cuda",), layout={"*": registry.CONTIGUOUS})


PRECISIONS = ("bf16", "fp8")


def _fp8_ready(x, weight, precision):
    """Whether ``precision`` asks for the FP8 path; a ValueError for an unknown precision or inputs the
    FP8 path cannot take (so a lossy mode is never half applied silently). ``weight``: a tensor or a list."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; choose one of {PRECISIONS}")
    if precision == "bf16":
        return False
    from . import fp8
    check_tensor("x", x, ndim=3, dtypes=_DTYPES)
    for w in weight_parts(weight, None)[0]:
        check_tensor("weight", w, ndim=2, device=x.device)
        why = fp8.supports(x, w)
        if why is not None:
            raise ValueError(why)
    return True


def adaln_linear(x, modulation, weight, bias=None, *, text_len, norm_weight=None, norm_bias=None, eps=1e-5,
                 backend="auto", precision="bf16"):
    """``(LN(x) * (1 + scale_m) + shift_m) @ weight^T + bias`` for x ``[B, S, hidden]``, weight
    ``[out, hidden]``: ``[B, S, out]``. ``weight`` may also be a list of P equal-shape weights (``bias``
    None or a list of P, entries may be None), e.g. to_q/to_k/to_v: then ``[P, B, S, out]``, the P
    products of the one normalized input (no concatenated weight copy). Triton backend: expert_ffn's
    LN-modulate pre-pass writes the normalized rows once, then a cuBLAS GEMM with its bias per weight.
    ``precision="fp8"`` (lossy, opt-in; bf16 x): the pre-pass quantizes h per row to e4m3 and the GEMMs run
    in FP8 with per-channel weight scales (``fp8.py``); ``backend`` is not used then."""
    if _fp8_ready(x, weight, precision):
        from . import fp8
        check_adaln_linear_inputs(x, modulation, weight, bias, text_len, norm_weight, norm_bias, eps)
        weights, biases, stacked = weight_parts(weight, bias)
        return fp8.adaln_linear_fp8(x, modulation, weights, biases, stacked, text_len=text_len,
                                    norm_weight=norm_weight, norm_bias=norm_bias, eps=eps)
    return registry.dispatch("adaln_linear", backend, x=x, modulation=modulation, weight=weight, bias=bias,
                             text_len=text_len, norm_weight=norm_weight, norm_bias=norm_bias, eps=eps)


def gated_linear(x, a, weight, bias, modulation, *, text_len, backend="auto", precision="bf16"):
    """``x + gate_m * (a @ weight^T + bias)`` for x ``[B, S, hidden]``, a ``[B, S, in]``, weight
    ``[hidden, in]``: a new ``[B, S, hidden]``. Triton backend: the GEMM with expert_ffn's bias + gate +
    residual epilogue (fused in our grouped GEMM, or after cuBLAS, as expert_ffn's shared path is set).
    ``precision="fp8"`` (lossy, opt-in; bf16 x): a quantized per row, the GEMM in FP8 (``fp8.py``), then the
    bias + gate + residual pass; ``backend`` is not used then."""
    if _fp8_ready(x, weight, precision):
        from . import fp8
        check_gated_linear_inputs(x, a, weight, bias, modulation, text_len)
        return fp8.gated_linear_fp8(x, a, weight, bias, modulation, text_len=text_len)
    return registry.dispatch("gated_linear", backend, x=x, a=a, weight=weight, bias=bias, modulation=modulation,
                             text_len=text_len)


__all__ = ["adaln_linear", "gated_linear", "PRECISIONS", "adaln_linear_reference", "gated_linear_reference", "weight_parts"]
