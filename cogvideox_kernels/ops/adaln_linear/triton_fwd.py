"""Triton backend of ``adaln_linear`` / ``gated_linear``: expert_ffn's kernels around a GEMM (imported,
one definition). Custom ops, so ``torch.compile(fullgraph=True)`` sees one opaque call each."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from ..expert_ffn import triton_fwd as ffn


def supports(x, **_) -> str | None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x has dtype {x.dtype}; the Triton kernels take float16, bfloat16 and float32"
    return None


def adaln_linear_fwd(x, modulation, weight, bias, text_len, norm_weight, norm_bias, eps):
    B, S, Hd = x.shape
    h = ffn.modulated_norm_fwd(x.view(B * S, Hd), modulation, norm_weight, norm_bias, eps, S, text_len, x.dtype)
    return F.linear(h, weight, bias).view(B, S, -1)


def adaln_linear_parts_fwd(x, modulation, weights, biases, text_len, norm_weight, norm_bias, eps):
    """One pre-pass, then one GEMM per weight into its slice of a [P, B*S, out] result (measured on the
    H200 at 5B: 3 GEMMs 3.12 ms vs 3.61 ms for one F.linear over the concatenated weights)."""
    B, S, Hd = x.shape
    h = ffn.modulated_norm_fwd(x.view(B * S, Hd), modulation, norm_weight, norm_bias, eps, S, text_len, x.dtype)
    out = torch.empty((len(weights), B * S, weights[0].shape[0]), dtype=x.dtype, device=x.device)
    for i, (w, b) in enumerate(zip(weights, biases)):
        if b is None:
            torch.mm(h, w.t(), out=out[i])
        else:
            torch.addmm(b, h, w.t(), out=out[i])
    return out.view(len(weights), B, S, -1)


def gated_linear_fwd(x, a, weight, bias, modulation, text_len, path=None):
    """path: expert_ffn's shared-FFN GEMM2 choice ("cublas": cuBLAS GEMM then the fused bias + gate +
    residual kernel; "triton"/"cublaslt": our GEMM with that epilogue fused). Default: as expert_ffn."""
    B, S, Hd = x.shape
    x2d, a2d = x.view(B * S, Hd), a.reshape(B * S, a.shape[-1])
    path = path or (ffn._shared_path() if x.is_cuda else "triton")
    if path == "cublas":
        return ffn.gate_residual_fwd(x2d, torch.mm(a2d, weight.t()), modulation, bias, S, text_len).view(B, S, Hd)
    out = torch.empty_like(x2d)
    ffn.grouped_gemm_fwd(a2d, weight.unsqueeze(0), None if bias is None else bias.unsqueeze(0), out,
                         epilogue=ffn.EPILOGUE_GATE_RESIDUAL, x=x2d, modulation=modulation, seq_len=S,
                         text_len=text_len)
    return out.view(B, S, Hd)


@torch.library.custom_op("cogvideox_kernels::adaln_linear", mutates_args=())
def adaln_linear_op(x: torch.Tensor, modulation: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    text_len: int, norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                    eps: float) -> torch.Tensor:
    return adaln_linear_fwd(x, modulation, weight, bias, text_len, norm_weight, norm_bias, eps)


@adaln_linear_op.register_fake
def _adaln_linear_fake(x, modulation, weight, bias, text_len, norm_weight, norm_bias, eps):
    return x.new_empty(*x.shape[:2], weight.shape[0])


@torch.library.custom_op("cogvideox_kernels::adaln_linear_parts", mutates_args=())
def adaln_linear_parts_op(x: torch.Tensor, modulation: torch.Tensor, weights: List[torch.Tensor],
                          biases: List[Optional[torch.Tensor]], text_len: int, norm_weight: Optional[torch.Tensor],
                          norm_bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return adaln_linear_parts_fwd(x, modulation, weights, biases, text_len, norm_weight, norm_bias, eps)


@adaln_linear_parts_op.register_fake
def _adaln_linear_parts_fake(x, modulation, weights, biases, text_len, norm_weight, norm_bias, eps):
    return x.new_empty(len(weights), *x.shape[:2], weights[0].shape[0])


@torch.library.custom_op("cogvideox_kernels::gated_linear", mutates_args=())
def gated_linear_op(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    modulation: torch.Tensor, text_len: int) -> torch.Tensor:
    return gated_linear_fwd(x, a, weight, bias, modulation, text_len)


@gated_linear_op.register_fake
def _gated_linear_fake(x, a, weight, bias, modulation, text_len):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def adaln_linear_triton(x, modulation, weight, bias=None, *, text_len, norm_weight=None, norm_bias=None, eps=1e-5):
    from . import weight_parts

    weights, biases, stacked = weight_parts(weight, bias)
    if stacked:
        return adaln_linear_parts_op(x, modulation, weights, biases, int(text_len), norm_weight, norm_bias,
                                     float(eps))
    return adaln_linear_op(x, modulation, weight, bias, int(text_len), norm_weight, norm_bias, float(eps))


def gated_linear_triton(x, a, weight, bias, modulation, *, text_len):
    return gated_linear_op(x, a, weight, bias, modulation, int(text_len))
