"""Plain-PyTorch reference of the expert-adaLN FFN half-block of CogVideoX, and its input checks.

    h   = LayerNorm(x) * (1 + scale_m) + shift_m          (one shared LayerNorm, eps 1e-5)
    out = x + gate_m * f_e(h),  f_e(h) = W2_e gelu_tanh(W1_e h + b1_e) + b2_e

m is the token's modality (the first ``text_len`` tokens of each sample are text, the rest video)
and e its expert. ``modulation`` is ``[B, 6, hidden]`` in the order diffusers'
``CogVideoXLayerNormZero`` chunks it: (shift, scale, gate) for video, then for text.
Experts are stacked along dim 0 of w1/b1/w2/b2: with ``num_text_experts == 0`` there is one FFN
shared by both modalities (real checkpoints); otherwise experts ``[0, nt)`` serve text and
``[nt, E)`` video. A modality with more than one expert has a router ``(weight [n, hidden], bias)``
on h; each token takes its top-1 expert, whose output is scaled by the router's softmax probability.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import FLOAT_DTYPES, check_int, check_shape, check_tensor

# precision=: "bf16" is the exact path in the input dtype (the default), "fp8" the e4m3 GEMMs of fp8.py,
# "int8" the int8 GEMMs of int8.py
PRECISIONS = ("bf16", "fp8", "int8")

# The rows of the [B, 6, hidden] modulation: the one definition (nn.adaln and the Triton kernels read it).
SHIFT_V, SCALE_V, GATE_V, SHIFT_T, SCALE_T, GATE_T = range(6)
MODULATION_ROWS = 6


def check_expert_ffn_inputs(x, modulation, w1, b1, w2, b2, text_len, norm_weight, norm_bias, eps,
                            num_text_experts, text_router, video_router, precision="bf16"):
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; choose one of {PRECISIONS}")
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    device = x.device
    B, S, Hd = x.shape
    if min(B, S, Hd) == 0:
        raise ValueError(f"x has an empty dimension: shape {tuple(x.shape)} [B, S, hidden]")
    check_tensor("modulation", modulation, ndim=3, device=device)
    check_shape("modulation", modulation, (B, MODULATION_ROWS, Hd))
    check_tensor("w1", w1, ndim=3, device=device)
    E, F_, hid = w1.shape
    if hid != Hd:
        raise ValueError(f"w1 must be [experts, inner, hidden={Hd}], got {tuple(w1.shape)}")
    check_tensor("w2", w2, ndim=3, device=device)
    check_shape("w2", w2, (E, Hd, F_))
    if b1 is not None:
        check_tensor("b1", b1, ndim=2, device=device)
        check_shape("b1", b1, (E, F_))
    if b2 is not None:
        check_tensor("b2", b2, ndim=2, device=device)
        check_shape("b2", b2, (E, Hd))
    for name, t in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2), ("modulation", modulation)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None:
            check_tensor(name, t, ndim=1, device=device)
            check_shape(name, t, (Hd,))
    check_int("text_len", text_len, 0, S)
    check_int("num_text_experts", num_text_experts, 0)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps={eps!r} must be a positive float")
    if num_text_experts == 0:
        if E != 1:
            raise ValueError(f"num_text_experts=0 means one shared FFN, but w1 stacks {E} experts")
        counts = {"text": 1, "video": 1}
    else:
        if E <= num_text_experts:
            raise ValueError(f"w1 stacks {E} experts but num_text_experts={num_text_experts}: "
                             "at least one video expert is needed")
        counts = {"text": num_text_experts, "video": E - num_text_experts}
    for name, router, n in (("text_router", text_router, counts["text"]),
                            ("video_router", video_router, counts["video"])):
        if n > 1:
            if router is None or not isinstance(router, (tuple, list)) or len(router) != 2:
                raise ValueError(f"{name} must be a (weight [{n}, {Hd}], bias [{n}] or None) pair: "
                                 f"that modality has {n} experts")
            check_tensor(f"{name} weight", router[0], ndim=2, device=device)
            check_shape(f"{name} weight", router[0], (n, Hd))
            if router[1] is not None:
                check_tensor(f"{name} bias", router[1], ndim=1, device=device)
                check_shape(f"{name} bias", router[1], (n,))
        elif router is not None:
            raise ValueError(f"{name} was given but that modality has a single expert (no routing)")


def modulated_norm_reference(x, modulation, text_len, norm_weight, norm_bias, eps):
    """LN(x) * (1 + scale_m) + shift_m, in x's dtype (callers upcast first)."""
    Hd = x.shape[-1]
    h = F.layer_norm(x, (Hd,), norm_weight, norm_bias, eps)
    is_text = (torch.arange(x.shape[1], device=x.device) < text_len)[None, :, None]
    shift = torch.where(is_text, modulation[:, None, SHIFT_T], modulation[:, None, SHIFT_V])
    scale = torch.where(is_text, modulation[:, None, SCALE_T], modulation[:, None, SCALE_V])
    gate = torch.where(is_text, modulation[:, None, GATE_T], modulation[:, None, GATE_V])
    return h * (1 + scale) + shift, gate


def route_top1(h, router, expert_offset):
    """Top-1 routing of tokens h [N, hidden]: (expert index [N] (global), probability [N])."""
    weight, bias = router
    logits = F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype))
    probs = logits.float().softmax(dim=-1)
    prob, idx = probs.max(dim=-1)
    return idx + expert_offset, prob.to(h.dtype)


def expert_assignment(h, text_len, num_experts, num_text_experts, text_router, video_router):
    """Expert index [B, S] and output scale [B, S] of every token (scale 1 without routing)."""
    B, S, Hd = h.shape
    expert = torch.zeros(B, S, dtype=torch.long, device=h.device)
    weight = torch.ones(B, S, dtype=h.dtype, device=h.device)
    if num_text_experts == 0:
        return expert, weight
    nt, nv = num_text_experts, num_experts - num_text_experts
    for sl, n, router, offset in ((slice(0, text_len), nt, text_router, 0),
                                  (slice(text_len, S), nv, video_router, nt)):
        tokens = h[:, sl]
        if tokens.shape[1] == 0:
            continue
        if n == 1:
            expert[:, sl] = offset
        else:
            idx, prob = route_top1(tokens.reshape(-1, Hd), router, offset)
            expert[:, sl] = idx.view(B, -1)
            weight[:, sl] = prob.view(B, -1)
    return expert, weight


def expert_ffn_reference(x, modulation, w1, b1, w2, b2, *, text_len, norm_weight=None, norm_bias=None,
                         eps=1e-5, num_text_experts=0, text_router=None, video_router=None,
                         precision="bf16", compute_dtype=None):
    """Reference in float32 (float64 stays float64, or ``compute_dtype``); returns x's dtype.

    ``precision="fp8"`` emulates the FP8 path (fp8.py) in that working precision: h and the GELU
    output quantized to e4m3 per token row, w1/w2 per output channel, each dequantized at once, so
    only the e4m3 rounding differs from ``"bf16"``. ``precision="int8"`` does the same with int8.py's
    rounding (row amax / 127, round to nearest). Routers see the unquantized h."""
    work = compute_dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    up = lambda t: None if t is None else t.to(work)  # noqa: E731
    up_pair = lambda p: None if p is None else (up(p[0]), up(p[1]))  # noqa: E731
    q = {"fp8": _fp8_round_trip, "int8": _int8_round_trip}.get(precision, lambda t: t)
    xw = x.to(work)
    h, gate = modulated_norm_reference(xw, up(modulation), text_len, up(norm_weight), up(norm_bias), eps)

    def ffn(tokens, e):
        inner = F.gelu(F.linear(q(tokens), q(up(w1[e])), None if b1 is None else up(b1[e])), approximate="tanh")
        return F.linear(q(inner), q(up(w2[e])), None if b2 is None else up(b2[e]))

    if num_text_experts == 0:  # one FFN for every token
        f = ffn(h, 0)
    elif text_router is None and video_router is None:  # one expert per modality: chosen by position
        f = torch.cat((ffn(h[:, :text_len], 0), ffn(h[:, text_len:], num_text_experts)), dim=1)
    else:  # routed: the reference may loop over experts; the kernel is one grouped GEMM
        E = w1.shape[0]
        expert, token_scale = expert_assignment(h, text_len, E, num_text_experts, up_pair(text_router),
                                                up_pair(video_router))
        f = torch.zeros_like(h)
        for e in range(E):
            mask = expert == e
            if bool(mask.any()):
                f[mask] = ffn(h[mask], e)
        f = f * token_scale[..., None]
    out = xw + gate * f
    return out.to(x.dtype)


def _fp8_round_trip(t):
    from .fp8 import fp8_round_trip  # fp8.py imports the Triton kernels: only when asked for

    return fp8_round_trip(t)


def _int8_round_trip(t):
    from .int8 import int8_round_trip

    return int8_round_trip(t)


def expert_ffn_flops(tokens: int, hidden: int, inner: int) -> float:
    """FLOPs of the two GEMMs (2 * tokens * hidden * inner each)."""
    return 4.0 * tokens * hidden * inner
