"""Plain-PyTorch reference of the fused QK-norm + RoPE3D + attention, and its input checks."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .._checks import FLOAT_DTYPES, check_int, check_shape, check_tensor


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of the last dim. x [..., N, H, D]; cos/sin [N, D] (float32/64).

    y[2i] = x[2i] cos - x[2i+1] sin, y[2i+1] = x[2i+1] cos + x[2i] sin, computed in cos's dtype
    (or x's, if wider); returns that dtype.
    """
    work = torch.promote_types(x.dtype, cos.dtype)
    xw = x.to(work)
    pairs = xw.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    c = cos.to(work)[:, None, :]
    s = sin.to(work)[:, None, :]
    return xw * c + rotated * s


PRECISIONS = ("bf16", "int8")


def check_attention_inputs(q, k, v, text_len, cos, sin, q_norm, k_norm, eps, scale,
                           precision="bf16"):
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; choose one of {PRECISIONS} "
                         "('bf16': exact attention in the inputs' dtype; 'int8': 8-bit Q K^T and "
                         "P V with smoothed K)")
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES + (torch.float64,))
    device = q.device
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, device=device)
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k, v must share a dtype")
        check_shape(name, t, q.shape)
    B, S, H, D = q.shape
    if min(B, S, H, D) == 0:
        raise ValueError(f"q has an empty dimension: shape {tuple(q.shape)} [B, S, H, D]")
    check_int("text_len", text_len, 0, S)
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (or both None for no rotation)")
    if cos is not None:
        if D % 2:
            raise ValueError(f"head_dim={D} must be even to apply RoPE")
        for name, t in (("cos", cos), ("sin", sin)):
            check_tensor(name, t, ndim=2, dtypes=(torch.float32, torch.float64), device=device)
            check_shape(name, t, (S - text_len, D))
    for name, norm in (("q_norm", q_norm), ("k_norm", k_norm)):
        if norm is None:
            continue
        if not isinstance(norm, (tuple, list)) or len(norm) != 2:
            raise ValueError(f"{name} must be a (weight, bias) pair of [head_dim] tensors or None")
        for part, t in zip(("weight", "bias"), norm):
            if t is None:
                continue
            check_tensor(f"{name} {part}", t, ndim=1, device=device)
            check_shape(f"{name} {part}", t, (D,))
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps={eps!r} must be a positive float")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale={scale!r} must be a positive float or None (head_dim ** -0.5)")


def qk_norm_rope_reference(x, text_len, cos, sin, norm, eps, work_dtype):
    """LayerNorm over D (optional) then RoPE on the video tokens, in ``work_dtype``."""
    x = x.to(work_dtype)
    if norm is not None:
        weight, bias = norm
        weight = None if weight is None else weight.to(work_dtype)
        bias = None if bias is None else bias.to(work_dtype)
        x = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if cos is not None and x.shape[1] > text_len:
        video = apply_rope_interleaved(x[:, text_len:], cos, sin).to(work_dtype)
        x = torch.cat((x[:, :text_len], video), dim=1)
    return x


def rope3d_attention_reference(q, k, v, *, text_len, cos=None, sin=None, q_norm=None, k_norm=None,
                               eps=1e-6, scale=None, compute_dtype=None, precision="bf16"):
    """Reference: upcast to float32 (float64 stays float64), norm, rotate, softmax(q k^T s) v.

    ``compute_dtype`` overrides the working precision (e.g. torch.float64 for tests).
    ``precision="int8"``: the 8-bit path's quantization emulated in float32
    (``int8_prepass.int8_attention_reference``). Returns ``[B, S, H, D]`` in q's dtype.
    """
    if precision == "int8":
        from .int8_prepass import int8_attention_reference

        return int8_attention_reference(q, k, v, text_len=text_len, cos=cos, sin=sin,
                                        q_norm=q_norm, k_norm=k_norm, eps=eps, scale=scale)
    work = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    qw = qk_norm_rope_reference(q, text_len, cos, sin, q_norm, eps, work)
    kw = qk_norm_rope_reference(k, text_len, cos, sin, k_norm, eps, work)
    vw = v.to(work)
    # [B, H, S, D] for SDPA; the math is the exact softmax attention in `work` precision.
    out = F.scaled_dot_product_attention(qw.transpose(1, 2), kw.transpose(1, 2), vw.transpose(1, 2),
                                         scale=scale)
    return out.transpose(1, 2).to(q.dtype)


def attention_flops(B: int, S: int, H: int, D: int) -> float:
    """FLOPs of one forward attention (two matmuls of 2*S*S*D each), the figure we report."""
    return 4.0 * B * H * S * S * D


__all__ = ["apply_rope_interleaved", "check_attention_inputs", "rope3d_attention_reference",
           "qk_norm_rope_reference", "attention_flops"]
