"""The extension's fused VAE conv (C++ on CPU tensors, CUDA on GPU tensors).

Exposed as the custom op ``cogvideox_kernels::vae_conv3d`` with a fake implementation, so
``torch.compile(fullgraph=True)`` traces through it. The binding takes raw addresses, sizes and the
stream as integers (the extension is not linked against torch); everything it relies on is checked
here first, and non-contiguous inputs are copied to contiguous ones.

The C++ path covers every input the reference accepts (any kt, odd kh/kw, any dtype). The CUDA
kernel covers bf16/fp16, kh = kw = 3, kt in 1..5, C_in % 16 == 0 (the VAE's 128/256/512-channel
ResNet convs); ``auto`` takes the reference for anything else on a GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..._ext import get_ext
from ..expert_ffn.fp8 import WeightCache
from .reference import (check_vae_conv_inputs, check_zq_index_values, modulation_from_zq, spatial_norm_index,
                        spatial_norm_index_on)

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_PAD_CODES = {"replicate": 0, "zeros": 1}
_STAT_CHUNK = 32768  # elements per block of the statistics pass
_MAX_SPLITS = 1024
_MOD_NAMES = ("zq", "zq_index", "scale_weight", "scale_bias", "shift_weight", "shift_bias")

# The CUDA kernel takes the spatial norm's modulation from zq (its (1,1,1) convs computed once per launch at
# zq's resolution into a small table, gathered by the activation pass) unless this is "0" (default on since
# the H200 run at e054478: 49x480x720 decode 1.171 s vs 1.294 s at equal error). With "0" the CUDA backend
# forms scale / shift first (diffusers' roundings) and runs the pass on them; the C++ CPU path always fuses.
FUSED_MODULATION_CUDA_ENV = "COGVIDEOX_KERNELS_VAE_FUSED_MODULATION_CUDA"


def fused_modulation_cuda() -> bool:
    """Whether the CUDA kernel computes the modulation from zq itself (see FUSED_MODULATION_CUDA_ENV)."""
    return os.environ.get(FUSED_MODULATION_CUDA_ENV, "1") != "0"


def cuda_kernel_supports(x, weight) -> bool:
    """What the CUDA kernel covers (shapes and dtype only, so it traces under torch.compile)."""
    kt, kh, kw = weight.shape[2:]
    return (x.dtype in (torch.bfloat16, torch.float16) and (kh, kw) == (3, 3) and 1 <= kt <= 5
            and x.shape[1] % 16 == 0)


def pack_weight(weight):
    """[C_out, C_in, kt, 3, 3] -> [C_out, kt, C_in/16, 9, 16]: the CUDA kernel's K order (temporal
    tap, 16-channel chunk, spatial tap, channel), one pipeline step = 144 contiguous elements."""
    C_out, C_in, kt, kh, kw = weight.shape
    return weight.reshape(C_out, C_in // 16, 16, kt, kh * kw).permute(0, 3, 1, 4, 2).contiguous()


# Packed weights, one per weight storage and version (fp8.WeightCache with pack_weight as its "quantizer"):
# a decode packs each conv weight once instead of at every call (~1300 small strided copies per
# 49x480x720 decode). The weight a call sees is the module's effective weight after its hooks (weights.py):
# an in-place update (fuse_lora, copy_, load_state_dict) bumps its version, a ``.data`` swap or an onload
# by an offload hook is a new storage; entries die with their storage. Costs one packed copy of each
# cached weight while that weight lives (0.22 GiB for the 5B VAE decoder's 36 ResNet convs in bf16,
# 0.17 GiB for the encoder's 28).
PACKED = WeightCache(lambda w: pack_weight(w.detach()))  # (detached: an entry never holds its weight alive)


def packed_weight(weight):
    """``pack_weight(weight)``, cached per weight version (see PACKED); meta tensors (the memory model's)
    are packed each time."""
    return pack_weight(weight) if weight.device.type == "meta" else PACKED.get(weight)


def _stat_splits(x, num_groups) -> int:
    span = x.numel() // (x.shape[0] * num_groups)
    return max(1, min(_MAX_SPLITS, -(-span // _STAT_CHUNK)))


def cuda_tensors(x, weight, bias=None, norm_weight=None, norm_bias=None, scale=None, shift=None, cache=None,
                 residual=None, num_groups=0, norm_coef=None, y=None, modulation=None):
    """Every tensor one CUDA launch touches, by the binding's names: the inputs, the outputs ``y`` (made
    unless given) and ``new_cache``, the packed weight and the workspaces (also used by the memory model of
    the decode, benchmarks/experiments/vae_decode_memory.py, so it allocates what a launch allocates)."""
    B, C, T, H, W = x.shape
    C_out, _, kt = weight.shape[:3]
    t = {"x": x, "weight": packed_weight(weight), "bias": bias, "norm_weight": norm_weight, "norm_bias": norm_bias,
         "scale": scale, "shift": shift, "cache": cache, "residual": residual, "norm_coef": norm_coef,
         "y": torch.empty((B, C_out, T, H, W), dtype=x.dtype, device=x.device) if y is None else y,
         "new_cache": torch.empty((B, C, kt - 1, H, W), dtype=x.dtype, device=x.device),
         "act": torch.empty((B, T, H, W, C), dtype=x.dtype, device=x.device), **(modulation or {})}
    if cache is not None:
        t["cache_cl"] = torch.empty((B, kt - 1, H, W, C), dtype=x.dtype, device=x.device)
    zq = t.get("zq")
    if zq is not None:  # the modulation table: (scale, shift) per channel and zq pixel (cuda_prep.cuh)
        t["zq_mod"] = torch.empty((B, C, *zq.shape[2:], 2), dtype=x.dtype, device=x.device)
    if num_groups:
        splits = _stat_splits(x, num_groups)
        t["partial"] = torch.empty(B * num_groups * splits * 2, dtype=torch.float64, device=x.device)
        t["coef"] = torch.empty(B * C * 2, dtype=torch.float32, device=x.device)
    return t


def frames_of(t) -> int:
    """The frame count of the contiguous tensor ``t`` is a frame range of (0: ``t`` is contiguous itself),
    or -1 when ``t`` is laid out otherwise (see frame_slice)."""
    if t.is_contiguous():
        return 0
    B, C, T, H, W = t.shape
    s, HW = t.stride(), H * W
    if (H > 1 and W > 1 and C > 1 and s[4] == 1 and s[3] == W and s[2] == HW and s[1] % HW == 0
            and s[1] // HW >= T and (B == 1 or s[0] == C * s[1])):
        return s[1] // HW
    return -1


def frame_slice(t):
    """``t`` itself when the kernels can read / write it in place (contiguous, or T consecutive frames of a
    contiguous [B, C, tc, H, W] tensor), else a contiguous copy."""
    return t if t is None or frames_of(t) >= 0 else t.contiguous()


def _launch(y, x, weight, bias, norm_weight, norm_bias, scale, shift, cache, residual, norm_coef, num_groups, eps,
            silu, pad_mode, backend, modulation):
    """Run the native op into ``y``; returns the new cache. ``modulation``: the zq form's tensors by name
    (contiguous; weights [C, Kz]; see vae_conv3d) or empty."""
    B, C, T, H, W = x.shape
    C_out, _, kt, kh, kw = weight.shape
    sizes = {"batch": B, "c_in": C, "c_out": C_out, "frames": T, "height": H, "width": W, "kt": kt,
             "kh": kh, "kw": kw, "pad_mode": _PAD_CODES[pad_mode], "groups": num_groups, "eps": float(eps),
             "silu": bool(silu), "splits": 1, "x_tc": frames_of(x), "y_tc": frames_of(y),
             "scale_tc": 0 if scale is None else frames_of(scale),
             "res_tc": 0 if residual is None else frames_of(residual)}
    zq = modulation.get("zq")
    if zq is not None:
        sizes.update(zq_c=zq.shape[1], zq_t=zq.shape[2], zq_h=zq.shape[3], zq_w=zq.shape[4])
        index = modulation["zq_index"]
        check_zq_index_values(index, T, H, zq.shape[2:])  # (a CPU tensor: no device sync)
        if x.device.type == "cuda":  # T + H + W ints, kept on the device (no copy per call)
            index = spatial_norm_index_on(index, x.device)
        modulation = dict(modulation, zq_index=index)
    ext = get_ext()
    if backend == "cuda":
        tensors = cuda_tensors(x, weight, bias, norm_weight, norm_bias, scale, shift, cache, residual, num_groups,
                               norm_coef, y, modulation)
        if num_groups:
            sizes["splits"] = _stat_splits(x, num_groups)
        addrs = {k: v.data_ptr() for k, v in tensors.items() if v is not None}
        device = x.device.index if x.device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(x.device).cuda_stream
        ext.vae_conv3d_cuda(addrs, sizes, _DTYPE_CODES[x.dtype], device, stream)
    else:
        tensors = {"x": x, "weight": weight, "bias": bias, "norm_weight": norm_weight, "norm_bias": norm_bias,
                   "scale": scale, "shift": shift, "cache": cache, "residual": residual, "norm_coef": norm_coef,
                   "y": y, "new_cache": torch.empty((B, C, kt - 1, H, W), dtype=x.dtype, device=x.device),
                   **modulation}
        addrs = {k: v.data_ptr() for k, v in tensors.items() if v is not None}
        ext.vae_conv3d_cpu(addrs, sizes, _DTYPE_CODES[x.dtype])
    return tensors["new_cache"]


@torch.library.custom_op("cogvideox_kernels::vae_conv3d", mutates_args=())
def _vae_conv3d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                   scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                   cache: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                   norm_coef: Optional[torch.Tensor], num_groups: int, eps: float, silu: bool, pad_mode: str,
                   backend: str, zq: Optional[torch.Tensor], zq_index: Optional[torch.Tensor],
                   scale_weight: Optional[torch.Tensor], scale_bias: Optional[torch.Tensor],
                   shift_weight: Optional[torch.Tensor], shift_bias: Optional[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, T, H, W = x.shape
    y = torch.empty((B, weight.shape[0], T, H, W), dtype=x.dtype, device=x.device)
    mod = _modulation(zq, zq_index, scale_weight, scale_bias, shift_weight, shift_bias)
    return y, _launch(y, x, weight, bias, norm_weight, norm_bias, scale, shift, cache, residual, norm_coef,
                      num_groups, eps, silu, pad_mode, backend, mod)


def _modulation(*tensors):
    return {k: v for k, v in zip(_MOD_NAMES, tensors) if v is not None}


@_vae_conv3d_op.register_fake
def _vae_conv3d_fake(x, weight, bias, norm_weight, norm_bias, scale, shift, cache, residual, norm_coef,
                     num_groups, eps, silu, pad_mode, backend, *modulation):
    B, C, T, H, W = x.shape
    C_out, _, kt = weight.shape[:3]
    return x.new_empty((B, C_out, T, H, W)), x.new_empty((B, C, kt - 1, H, W))


@torch.library.custom_op("cogvideox_kernels::vae_conv3d_out", mutates_args=("out",))
def _vae_conv3d_out_op(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                       scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                       cache: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                       norm_coef: Optional[torch.Tensor], num_groups: int, eps: float, silu: bool, pad_mode: str,
                       backend: str, zq: Optional[torch.Tensor], zq_index: Optional[torch.Tensor],
                       scale_weight: Optional[torch.Tensor], scale_bias: Optional[torch.Tensor],
                       shift_weight: Optional[torch.Tensor], shift_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The op writing y into ``out`` (in place when out is a frame range of a contiguous tensor)."""
    return _launch(out, x, weight, bias, norm_weight, norm_bias, scale, shift, cache, residual, norm_coef,
                   num_groups, eps, silu, pad_mode, backend,
                   _modulation(zq, zq_index, scale_weight, scale_bias, shift_weight, shift_bias))


@_vae_conv3d_out_op.register_fake
def _vae_conv3d_out_fake(out, x, weight, bias, norm_weight, norm_bias, scale, shift, cache, residual, norm_coef,
                         num_groups, eps, silu, pad_mode, backend, *modulation):
    B, C, T, H, W = x.shape
    return x.new_empty((B, C, weight.shape[2] - 1, H, W))


def _contig(t):
    return None if t is None else t.contiguous()


def vae_conv3d_native(x, weight, bias=None, *, num_groups=0, norm_weight=None, norm_bias=None, eps=1e-6,
                      scale=None, shift=None, silu=False, cache=None, pad_mode="replicate", residual=None,
                      norm_coef=None, out=None, zq=None, zq_index=None, scale_weight=None, scale_bias=None,
                      shift_weight=None, shift_bias=None, backend="cpp"):
    """Native fused VAE conv: ``backend`` "cuda" (GPU tensors) or "cpp" (CPU tensors).

    Returns ``(y, new_cache)`` like ``vae_conv3d_reference`` (y is ``out`` when given). x (without
    GroupNorm statistics to take), scale / shift, residual and out are used in place when contiguous or
    a frame range of a contiguous tensor; other layouts are copied. The zq form of the modulation runs
    fused on the C++ path, and on the CUDA path with fused_modulation_cuda() (the default; else scale / shift
    are formed first by ``modulation_from_zq``).
    """
    if backend not in ("cuda", "cpp"):
        raise ValueError(f"vae_conv3d_native: backend={backend!r}; choose 'cuda' or 'cpp'")
    check_vae_conv_inputs(x, weight, bias, num_groups=num_groups, norm_weight=norm_weight,
                          norm_bias=norm_bias, eps=eps, scale=scale, shift=shift, silu=silu, cache=cache,
                          pad_mode=pad_mode, residual=residual, norm_coef=norm_coef, out=out, zq=zq,
                          zq_index=zq_index, scale_weight=scale_weight, scale_bias=scale_bias,
                          shift_weight=shift_weight, shift_bias=shift_bias)
    want = "cuda" if backend == "cuda" else "cpu"
    if x.device.type != want:
        raise ValueError(f"vae_conv3d backend={backend!r}: x is on {x.device}; this backend needs {want} tensors")
    if backend == "cuda" and not cuda_kernel_supports(x, weight):
        raise ValueError(
            f"vae_conv3d backend='cuda': x {tuple(x.shape)} {x.dtype} with weight {tuple(weight.shape)} is "
            "not covered by the CUDA kernel (bf16/fp16, kh = kw = 3, kt in 1..5, C_in % 16 == 0); "
            "use backend='reference' or 'auto'")
    mod = (None,) * 6
    if zq is not None:
        # the index goes to the op on the CPU (its values are checked there without a sync)
        zq_index = spatial_norm_index(zq.shape[2:], x.shape[2:]) if zq_index is None else zq_index.cpu()
        if backend == "cuda" and not fused_modulation_cuda():
            scale, shift = modulation_from_zq(x, zq, zq_index, scale_weight, scale_bias, shift_weight, shift_bias)
        else:
            C = x.shape[1]
            mod = (zq.contiguous(), zq_index.contiguous(), scale_weight.reshape(C, -1).contiguous(),
                   _contig(scale_bias), shift_weight.reshape(C, -1).contiguous(), _contig(shift_bias))
    x = _contig(x) if num_groups else frame_slice(x)  # (the statistics pass reads each group as one span)
    scale, shift = frame_slice(scale), frame_slice(shift)
    if scale is not None and frames_of(scale) != frames_of(shift):
        scale, shift = scale.contiguous(), shift.contiguous()
    args = (x, _contig(weight), _contig(bias), _contig(norm_weight), _contig(norm_bias), scale, shift,
            _contig(cache), frame_slice(residual), _contig(norm_coef), num_groups, float(eps), silu, pad_mode, backend,
            *mod)
    if out is None:
        return _vae_conv3d_op(*args)
    if frames_of(out) >= 0:
        return out, _vae_conv3d_out_op(out, *args)
    y, new_cache = _vae_conv3d_op(*args)
    return out.copy_(y), new_cache


@torch.library.custom_op("cogvideox_kernels::vae_group_norm_coef", mutates_args=())
def _group_norm_coef_op(x: torch.Tensor, norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                        num_groups: int, eps: float) -> torch.Tensor:
    B, C, T, H, W = x.shape
    splits = _stat_splits(x, num_groups)
    t = {"x": x, "norm_weight": norm_weight, "norm_bias": norm_bias,
         "partial": torch.empty(B * num_groups * splits * 2, dtype=torch.float64, device=x.device),
         "coef": torch.empty((B, C, 2), dtype=torch.float32, device=x.device)}
    sizes = {"batch": B, "c_in": C, "frames": T, "height": H, "width": W, "groups": num_groups, "eps": float(eps),
             "splits": splits}
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    get_ext().vae_gn_coef_cuda({k: v.data_ptr() for k, v in t.items() if v is not None}, sizes,
                               _DTYPE_CODES[x.dtype], device, torch.cuda.current_stream(x.device).cuda_stream)
    return t["coef"]


@_group_norm_coef_op.register_fake
def _group_norm_coef_fake(x, norm_weight, norm_bias, num_groups, eps):
    return x.new_empty((x.shape[0], x.shape[1], 2), dtype=torch.float32)


def group_norm_coef_cuda(x, num_groups, norm_weight=None, norm_bias=None, eps=1e-6):
    """``group_norm_coef`` by the statistics pass of the CUDA kernel (bf16/fp16 CUDA tensors)."""
    return _group_norm_coef_op(_contig(x), _contig(norm_weight), _contig(norm_bias), num_groups, float(eps))


# registry hooks (see ops/registry.py): the op's inputs as keywords
def cuda_supports(x, weight, **_) -> Optional[str]:
    if cuda_kernel_supports(x, weight):
        return None
    return (f"x {tuple(x.shape)} {x.dtype} with weight {tuple(weight.shape)} is not covered by the CUDA kernel "
            "(bf16/fp16, kh = kw = 3, kt in 1..5, C_in % 16 == 0)")


def vae_conv3d_cuda(x, weight, bias=None, **kwargs):
    return vae_conv3d_native(x, weight, bias, backend="cuda", **kwargs)


def vae_conv3d_cpp(x, weight, bias=None, **kwargs):
    return vae_conv3d_native(x, weight, bias, backend="cpp", **kwargs)
