"""The extension's causal temporal conv (C++ on CPU tensors, CUDA on GPU tensors).

Exposed as the custom op ``cogvideox_kernels::causal_conv3d`` with a fake implementation, so
``torch.compile(fullgraph=True)`` traces through it. The binding takes raw addresses, sizes and
the stream as integers (the extension is not linked against torch); everything it relies on is
checked here first. Covers weight [C_out, C_in, kt, 1, 1] with kt 1..5 and stride 1 or 2.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._ext import get_ext
from .reference import check_causal_conv_inputs

MAX_KT = 5
STRIDES = (1, 2)

# Default CUDA variant per shape class, picked from the H100 sweep at commit 0ec08ba
# (benchmarks/results/conv_notes.md; bf16, kt=3, do_bench medians):
#  * C_in <= 128: variant 17, the frame-ring kernel (128 C_out x 128 pixels, weights resident,
#    each input frame of a pixel tile loaded once): 0.942 ms at [1,128,6,480,720] stride 1 and
#    0.588 ms stride 2, vs 1.226 / 0.697 (variant 13) and 1.561 / 0.843 (variant 1, the old default).
#  * larger C_in: variant 13 (tap-major streamed 128x128 tiles): 1.099 / 0.590 ms at
#    [1,256,6,240,360] and 0.258 / 0.142 ms at [1,512,6,60,90] (variant 1: 1.490 / 0.784 and
#    0.345 / 0.180). The ring variants were not measured at C_in 256/512 (that part of the sweep
#    failed), so they are not chosen there.
# The ring needs C_in % 32 == 0 and kt >= stride and must fit shared memory; variant 13 needs
# C_in % 8 == 0. Both need H*W % 8 == 0; misaligned tensors fall back inside the extension.
RING_VARIANT = 17
TAPMAJOR_VARIANT = 13
_SMEM_OPTIN = 227 * 1024  # Hopper's opt-in shared memory per block (the extension builds for sm_90a)
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_PAD_CODES = {"replicate": 0, "zeros": 1}


def _kernel_supports(x, weight, stride) -> bool:
    kt, kh, kw = weight.shape[2:]
    return (kh, kw) == (1, 1) and 1 <= kt <= MAX_KT and stride in STRIDES and x.dtype in _DTYPE_CODES


def _why_unsupported(x, weight, stride) -> str | None:
    if not _kernel_supports(x, weight, stride):
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
    return _kernel_supports(x, weight, stride)


def output_frames(frames: int, stride: int) -> int:
    return (frames - 1) // stride + 1


def _ring_fits(c_in: int, kt: int) -> bool:
    # variant 17: resident weights [128][C_in*kt + 8] + kt ring slots [C_in][128 + 8], 2-byte elements
    return 2 * (128 * (c_in * kt + 8) + kt * c_in * (128 + 8)) <= _SMEM_OPTIN


def auto_cuda_variant(x, weight, stride) -> int:
    """The CUDA variant ``variant=0`` runs for these inputs (0 = the extension's general default)."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return 0
    c_in, hw, kt = x.shape[1], x.shape[3] * x.shape[4], weight.shape[2]
    if hw % 8 != 0:
        return 0
    if c_in <= 128 and c_in % 32 == 0 and kt >= stride and _ring_fits(c_in, kt):
        return RING_VARIANT
    if c_in % 8 == 0:
        return TAPMAJOR_VARIANT
    return 0


def _check_native(x, weight, bias, cache, stride, backend):
    if not _kernel_supports(x, weight, stride):  # (contiguity gets its own message below)
        raise ValueError(
            f"causal_conv3d backend={backend!r}: weight shape {tuple(weight.shape)} with stride={stride} "
            f"is not supported by the native kernel (kt in 1..{MAX_KT}, kh = kw = 1, stride in {STRIDES}); "
            "use backend='reference' or 'auto'")
    want = "cuda" if backend == "cuda" else "cpu"
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("cache", cache)):
        if t is None:
            continue
        if t.device.type != want:
            raise ValueError(f"causal_conv3d backend={backend!r}: {name} is on {t.device}; "
                             f"this backend needs {want} tensors")
        if not t.is_contiguous():
            raise ValueError(f"causal_conv3d backend={backend!r}: {name} must be contiguous "
                             f"(got strides {t.stride()} for shape {tuple(t.shape)}); call .contiguous()")


@torch.library.custom_op("cogvideox_kernels::causal_conv3d", mutates_args=())
def _causal_conv3d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      cache: Optional[torch.Tensor], stride: int, pad_mode: str, backend: str,
                      variant: int) -> tuple[torch.Tensor, torch.Tensor]:
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
        if variant > 0 and "tapmajor" in ext.causal_conv_cuda_variants()[variant - 1]:
            # tap-major variants read the weight as [C_out, kt, C_in]
            packed = weight.reshape(C_out, C, kt).transpose(1, 2).contiguous()
        ext.causal_conv3d_cuda(*args, device, stream, variant, 0 if packed is None else packed.data_ptr())
    else:
        ext.causal_conv3d_cpu(*args)
    return y, new_cache


@_causal_conv3d_op.register_fake
def _causal_conv3d_fake(x, weight, bias, cache, stride, pad_mode, backend, variant):
    B, C, T, H, W = x.shape
    C_out, _, kt = weight.shape[:3]
    y = x.new_empty((B, C_out, output_frames(T, stride), H, W))
    return y, x.new_empty((B, C, kt - 1, H, W))


def causal_conv3d_cpp(x, weight, bias=None, *, stride=1, pad_mode="replicate", cache=None):
    """Registry ``run`` of the C++ path (inputs checked, supported, contiguous)."""
    return _causal_conv3d_op(x, weight, bias, cache, stride, pad_mode, "cpp", 0)


def causal_conv3d_cuda(x, weight, bias=None, *, stride=1, pad_mode="replicate", cache=None):
    """Registry ``run`` of the CUDA kernel (inputs checked, supported, contiguous)."""
    return _causal_conv3d_op(x, weight, bias, cache, stride, pad_mode, "cuda", auto_cuda_variant(x, weight, stride))


def causal_conv3d_native(x, weight, bias=None, *, stride=1, pad_mode="replicate", cache=None,
                         backend="cpp", variant=0):
    """Native causal conv: ``backend`` "cuda" (GPU tensors) or "cpp" (CPU tensors).

    Returns ``(y, new_cache)`` exactly like ``causal_conv3d_reference``. ``variant`` (CUDA only)
    forces a tile configuration for benchmarks; 0 picks the measured-fastest for the shape class
    (``auto_cuda_variant``).
    """
    if backend not in ("cuda", "cpp"):
        raise ValueError(f"causal_conv3d_native: backend={backend!r}; choose 'cuda' or 'cpp'")
    check_causal_conv_inputs(x, weight, bias, stride, pad_mode, cache)
    _check_native(x, weight, bias, cache, stride, backend)
    if variant != 0:  # (only then: the pybind call would break torch.compile's graph)
        n = len(get_ext().causal_conv_cuda_variants())
        if not 0 <= variant <= n:
            raise ValueError(f"causal_conv3d_native: variant={variant} is out of range [0, {n}]")
    if variant == 0 and backend == "cuda":  # shapes and dtype only: no graph break under torch.compile
        variant = auto_cuda_variant(x, weight, stride)
    return _causal_conv3d_op(x, weight, bias, cache, stride, pad_mode, backend, variant)
