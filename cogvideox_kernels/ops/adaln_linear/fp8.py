"""``precision="fp8"`` of ``adaln_linear`` / ``gated_linear``: expert_ffn's FP8 scheme
(``expert_ffn/fp8.py``: e4m3 activations with one scale per token, e4m3 weights with one scale per
output channel, cached per weight version, ``torch._scaled_mm`` row-wise with float32 accumulation)
around the attention half's projections:

* ``adaln_linear``: the LN-modulate pre-pass writes h quantized per row (its QUANTIZE form, as for
  the FFN's GEMM1), then one ``_scaled_mm`` per weight with the bias in its epilogue, each into its
  slice of the ``[P, B*S, out]`` result (P = 1 for one weight);
* ``gated_linear``: ``a`` quantized per row (``fp8.quantize_rows_fwd``), ``_scaled_mm``, then the bias
  + gate + residual pass of the bf16 path (``gate_residual_fwd``).

Off the GPU the GEMMs are emulated in float32 on the dequantized operands (``fp8.fp8_linear``), so
CI tests the pieces under the interpreter. Lossy and opt-in (``apply(..., precision="fp8-all")``).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..expert_ffn import fp8
from ..expert_ffn.triton_fwd import gate_residual_fwd, modulated_norm_fwd


def supports(x, weight) -> Optional[str]:
    """Why the FP8 path cannot take x / weights of this shape (None: it can)."""
    if x.dtype != torch.bfloat16:
        return f"precision='fp8' takes bfloat16 x, not {x.dtype}"
    n, k = weight.shape
    if x.is_cuda:
        if torch.cuda.get_device_capability(x.device) < (9, 0):
            return "precision='fp8' needs row-wise FP8 GEMMs: a GPU of sm_90 or newer"
        if n % 16 or k % 16:
            return f"FP8 GEMMs need in ({k}) and out ({n}) features divisible by 16"
    return None


def adaln_linear_fp8_fwd(x, modulation, weights, biases, text_len, norm_weight, norm_bias, eps, cache=fp8.WEIGHTS):
    B, S, Hd = x.shape
    h_q, h_scale = modulated_norm_fwd(x.view(B * S, Hd), modulation, norm_weight, norm_bias, eps, S, text_len,
                                      fp8.E4M3)
    out = torch.empty((len(weights), B * S, weights[0].shape[0]), dtype=x.dtype, device=x.device)
    for i, (w, b) in enumerate(zip(weights, biases)):
        w_q, w_scale = cache.get(w)
        fp8.fp8_linear(h_q, h_scale, w_q, w_scale, x.dtype, bias=b, out=out[i])
    return out.view(len(weights), B, S, -1)


def gated_linear_fp8_fwd(x, a, weight, bias, modulation, text_len, cache=fp8.WEIGHTS):
    B, S, Hd = x.shape
    a_q, a_scale = fp8.quantize_rows_fwd(a.reshape(B * S, a.shape[-1]).contiguous())
    w_q, w_scale = cache.get(weight)
    f = fp8.fp8_linear(a_q, a_scale, w_q, w_scale, x.dtype)
    return gate_residual_fwd(x.reshape(B * S, Hd), f, modulation, bias, S, text_len).view(B, S, Hd)


@torch.library.custom_op("cogvideox_kernels::adaln_linear_fp8", mutates_args=())
def adaln_linear_fp8_op(x: torch.Tensor, modulation: torch.Tensor, weights: List[torch.Tensor],
                        biases: List[Optional[torch.Tensor]], text_len: int, norm_weight: Optional[torch.Tensor],
                        norm_bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return adaln_linear_fp8_fwd(x, modulation, weights, biases, text_len, norm_weight, norm_bias, eps)


@adaln_linear_fp8_op.register_fake
def _adaln_linear_fp8_fake(x, modulation, weights, biases, text_len, norm_weight, norm_bias, eps):
    return x.new_empty(len(weights), *x.shape[:2], weights[0].shape[0])


@torch.library.custom_op("cogvideox_kernels::gated_linear_fp8", mutates_args=())
def gated_linear_fp8_op(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        modulation: torch.Tensor, text_len: int) -> torch.Tensor:
    return gated_linear_fp8_fwd(x, a, weight, bias, modulation, text_len)


@gated_linear_fp8_op.register_fake
def _gated_linear_fp8_fake(x, a, weight, bias, modulation, text_len):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def adaln_linear_fp8(x, modulation, weights, biases, stacked, *, text_len, norm_weight, norm_bias, eps):
    out = adaln_linear_fp8_op(x.contiguous(), modulation.contiguous(), [w.contiguous() for w in weights],
                              [None if b is None else b.contiguous() for b in biases], int(text_len),
                              norm_weight, norm_bias, float(eps))
    return out if stacked else out[0]


def gated_linear_fp8(x, a, weight, bias, modulation, *, text_len):
    return gated_linear_fp8_op(x.contiguous(), a, weight.contiguous(), None if bias is None else bias.contiguous(),
                               modulation.contiguous(), int(text_len))


# The reference of the FP8 scheme (float32 on the dequantized operands, the same quantization formulas): what
# the tests compare the kernels against, beside the exact float reference.
def adaln_linear_fp8_reference(x, modulation, weights, biases, *, text_len, norm_weight, norm_bias, eps):
    from ..expert_ffn.reference import modulated_norm_reference

    h, _ = modulated_norm_reference(x.float(), modulation.float(), text_len,
                                    None if norm_weight is None else norm_weight.float(),
                                    None if norm_bias is None else norm_bias.float(), eps)
    h = fp8.fp8_round_trip(h)  # (the pre-pass quantizes its float32 h)
    outs = []
    for w, b in zip(weights, biases):
        y = h @ fp8.fp8_round_trip(w).float().t()
        outs.append((y if b is None else y + b.float()).to(x.dtype))
    return torch.stack(outs)


def gated_linear_fp8_reference(x, a, weight, bias, modulation, *, text_len):
    from . import gated_linear_reference

    a_rt = fp8.fp8_round_trip(a)
    return gated_linear_reference(x.float(), a_rt.float(), fp8.fp8_round_trip(weight).float(),
                                  None if bias is None else bias.float(), modulation.float(),
                                  text_len=text_len).to(x.dtype)
