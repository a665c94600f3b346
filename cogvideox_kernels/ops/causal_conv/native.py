"""The extension's causal temporal conv (C++ on CPU tensors, CUDA on GPU tensors).

Exposed as the custom op ``cogvideox_kernels::causal_conv3d`` with a fake implementation, so
``torch.compile(fullgraph=True)`` traces through it. The binding takes raw addresses, sizes and
the stream as integers (the extension is not linked against torch); everything it relies on is
checked first (the registry: shapes, dtypes, packed layout). Covers weight [C_out, C_in, kt, 1, 1]
with kt 1..5 and stride 1 or 2. Which CUDA kernel runs is the extension's choice
(csrc/causal_conv/cuda_tiles.h), not this file's.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..._ext import get_ext

MAX_KT = 5
STRIDES = (1, 2)

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_PAD_CODES = {"replicate": 0, "zeros": 1}


def _why_unsupported(x, weight, stride) -> str | None:
    kt, kh, kw = weight.shape[2:]
    if (kh, kw) != (1, 1) or not 1 <= kt <= MAX_KT or stride not in STRIDES or x.dtype not in _DTYPE_CODES:
        return (f"weight shape {tuple(weight.shape)} with stride={stride} is not supported by the native kernel "
                f"(kt in 1..{MAX_KT}, kh = kw = 1, stride in {STRIDES})")
    return None


def cpp_supports(x, weight, bias, stride, pad_mode, cache) -> str | None:
    """Registry ``supports`` of the C++ path: None, or why these inputs are not covered."""
    return _why_unsupported(x, weight, stride)


def cuda_supports(x, weight, bias, stride, pad_mode, cache) -> str | None:
    """Registry ``supports`` of the CUDA kernel (its new-cache copy launches one grid row per frame)."""
    why = _why_unsupported(x, weight, stride)
    frames = x.shape[0] * x.shape[1] * (weight.shape[2] - 1)
    if why is None and frames > 65535:
        why = f"B * C * (kt - 1) = {frames} cache frames; the CUDA kernel copies at most 65535"
    return why


def native_supports(x, weight, stride) -> bool:
    """What the native kernels cover: kh = kw = 1, kt <= 5, stride 1 or 2, float dtypes (any strides:
    the registry hands them contiguous tensors)."""
    return _why_unsupported(x, weight, stride) is None


def output_frames(frames: int, stride: int) -> int:
    return (frames - 1) // stride + 1


@functools.lru_cache(maxsize=None)
def _max_smem(device: int) -> int:
    return get_ext().causal_conv3d_cuda_max_smem(device)


def cuda_kernel(dtype: torch.dtype, c_in: int, kt: int, stride: int, hw: int, max_smem: int,
                aligned: bool = True) -> str:
    """The CUDA kernel the extension runs for this shape ("ring", "tapmajor", "streamed", "masked",
    "fma"): its one choice (csrc/causal_conv/cuda_tiles.h), asked here only to give the tap-major
    kernel its [C_out, kt, C_in] weight copy."""
    return get_ext().causal_conv3d_cuda_kernel(_DTYPE_CODES[dtype], c_in, kt, stride, hw, max_smem, aligned)


@torch.library.custom_op("cogvideox_kernels::causal_conv3d", mutates_args=())
def _causal_conv3d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      cache: Optional[torch.Tensor], stride: int, pad_mode: str,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("cache", cache)):
        if t is not None and not t.is_contiguous():  # the binding reads packed memory by address
            raise ValueError(f"causal_conv3d ({backend}): {name} must be contiguous (got strides {t.stride()} "
                             f"for shape {tuple(t.shape)}); ops.causal_conv3d makes the copies")
    B, C, T, H, W = x.shape
    C_out, _, kt = weight.shape[:3]
    y = torch.empty((B, C_out, output_frames(T, stride), H, W), dtype=x.dtype, device=x.device)
    new_cache = torch.empty((B, C, kt - 1, H, W), dtype=x.dtype, device=x.device)
    ext = get_ext()
    args = (x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
            0 if cache is None else cache.data_ptr(), y.data_ptr(), new_cache.data_ptr(),
            B, C, C_out, T, H, W, kt, stride, _PAD_CODES[pad_mode], _DTYPE_CODES[x.dtype])
    if backend == "cuda":
        device = x.device.index if x.device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(x.device).cuda_stream
        packed = None
        if cuda_kernel(x.dtype, C, kt, stride, H * W, _max_smem(device)) == "tapmajor":
            packed = weight.reshape(C_out, C, kt).transpose(1, 2).contiguous()  # [C_out, kt, C_in]
        ext.causal_conv3d_cuda(*args, device, stream, 0 if packed is None else packed.data_ptr())
    else:
        ext.causal_conv3d_cpu(*args)
    return y, new_cache


@_causal_conv3d_op.register_fake
def _causal_conv3d_fake(x, weight, bias, cache, stride, pad_mode, backend):
    B, C, T, H, W = x.shape
    C_out, _, kt = weight.shape[:3]
    y = x.new_empty((B, C_out, output_frames(T, stride), H, W))
    return y, x.new_empty((B, C, kt - 1, H, W))


def causal_conv3d_cpp(x, weight, bias=None, *, stride=1, pad_mode="replicate", cache=None):
    """Registry ``run`` of the C++ path (inputs checked, supported, contiguous)."""
    return _causal_conv3d_op(x, weight, bias, cache, stride, pad_mode, "cpp")


def causal_conv3d_cuda(x, weight, bias=None, *, stride=1, pad_mode="replicate", cache=None):
    """Registry ``run`` of the CUDA kernels (inputs checked, supported, contiguous)."""
    return _causal_conv3d_op(x, weight, bias, cache, stride, pad_mode, "cuda")
