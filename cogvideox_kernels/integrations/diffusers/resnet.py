"""VAE: each ``CogVideoXResnetBlock3D`` runs as two ``vae_conv3d`` calls.

diffusers' block (0.42, ``autoencoder_kl_cogvideox.py``) computes, for one frame batch::

    h   = conv1(silu(norm1(x [, zq])), cache["conv1"])           # norm1: GroupNorm, or the spatial norm
    h   = h + temb_proj(silu(temb))                               # only with temb (the VAE passes none)
    out = conv2(dropout(silu(norm2(h [, zq]))), cache["conv2"]) + shortcut(x)

Patched, each line without temb is one fused op: GroupNorm-apply (statistics over the frame batch it
is given, as ``nn.GroupNorm`` takes them), the spatial norm's ``* conv_y(zq') + conv_b(zq')``, SiLU,
the causal (3,3,3) conv with its cache or replicated first frame, bias, and the shortcut as the fused
residual. The spatial norm's ``conv_y`` / ``conv_b`` ((1,1,1) convs of zq resized to the feature map)
are computed inside the op per element from zq at its own resolution and their weights (``zq=``, no
full-size scale / shift; their kt = 1 "caches", the whole resized zq that diffusers clones and never
reads, come back as None) where they are plain convs (hooks we know, no LoRA) and the backend fuses it:
the C++ path and the reference always, the CUDA kernel unless
``COGVIDEOX_KERNELS_VAE_FUSED_MODULATION_CUDA=0``; otherwise they are
diffusers' module calls on zq interpolated as diffusers does it. ``conv_shortcut`` stays a module call.

Memory: a decoder frame batch larger than ``CHUNK_ABOVE`` (the full-resolution blocks: 8-9 frames of
128-256 channels at 480x720 and above) runs each line in frame chunks of about ``CHUNK_BYTES``: the
GroupNorm statistics of the whole batch first (``vae_group_norm_coef``), then one fused call per chunk
chained by the conv cache, with that chunk's ``conv_y`` / ``conv_b`` / ``conv_shortcut`` outputs only.
So the spatial norm's scale and shift, the kernel's channels-last activation and the shortcut exist
for one chunk at a time, not for the batch; the result is the same function (same statistics, same
cache chain; only the kernel's rounding points are shared with the unchunked call). The skipped modules' weights come from
``weights.py`` (their hooks run; a LoRA'd or quantized conv is not read). The new conv caches come
back in diffusers' dict format, so diffusers' frame-batch loop carries them either way.

``COGVIDEOX_KERNELS_VAE_CONV_CUDNN_CHANNELS`` (read once at import; e.g. ``256,512`` or ``256+``, see
``ops/vae_conv/cudnn_route.parse_cudnn_channels``; ``off``/``0``/empty: none; unset: ``128+`` on CUDA tensors,
none elsewhere) runs the convs whose input channels it names on ``vae_conv3d``'s ``"cudnn"`` backend (our
activation pass + a transpose-add kernel around cuDNN's channels-last conv: faster than our fused conv at
128-512 channels on the H200) instead of the block's kernel backend, where that backend can run the call
(else the block's backend).

diffusers' forward runs instead whenever anything is not exactly what the op computes: autograd,
``temb`` given, dropout active, a non-SiLU activation, a norm or conv that is not the plain diffusers
module (LoRA, quantized, a forward replaced), hooks we do not know, weights whose dtype differs from
the input's, and inputs the backend does not take (``auto``: our CUDA kernel on CUDA tensors it covers:
bf16/fp16, channels % 16 == 0; never the reference on a GPU).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch
import torch.nn.functional as F

from ...ops import registry
from ...ops.vae_conv import spatial_norm_index, vae_group_norm_coef
from ...ops.vae_conv.cudnn_route import (CUDNN_CHANNELS_ENV, channels_match, cudnn_channels_from_env,
                                         parse_cudnn_channels)
from ...ops.vae_conv.native import fused_modulation_cuda
from . import cache_offload, state, weights
from .vae import KernelConvForward, conv_shape_supported

_ops = sys.modules[__package__]  # ops are looked up on the package, where tests (and users) may wrap them


def _diffusers_classes():
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import (CogVideoXCausalConv3d,
                                                                        CogVideoXResnetBlock3D,
                                                                        CogVideoXSpatialNorm3D)
    return CogVideoXResnetBlock3D, CogVideoXCausalConv3d, CogVideoXSpatialNorm3D


# ------------------------------------------------------------------------------------ structure


def _causal_conv_ok(conv, causal_cls) -> bool:
    """A diffusers causal conv the op computes: plain (Safe)Conv3d, stride 1, kt >= 2, 'first' padding."""
    return (type(conv) is causal_cls and conv_shape_supported(conv) and tuple(conv.conv.stride) == (1, 1, 1)
            and conv.time_kernel_size == conv.conv.kernel_size[0] >= 2)


def _norm_kind(norm, spatial_cls):
    """"group" (nn.GroupNorm), "spatial" (diffusers' spatial norm around an nn.GroupNorm) or None."""
    if type(norm) is torch.nn.GroupNorm:
        return "group"
    if type(norm) is spatial_cls and type(getattr(norm, "norm_layer", None)) is torch.nn.GroupNorm:
        return "spatial"
    return None


def _structure_why_not(block):
    """None when ``block`` is built the way our forward computes it, else why not (no backend asked)."""
    block_cls, causal_cls, spatial_cls = _diffusers_classes()
    if type(block).forward is not block_cls.forward:
        return f"{type(block).__name__} has its own forward"
    if type(block.nonlinearity) is not torch.nn.SiLU:
        return f"nonlinearity is {type(block.nonlinearity).__name__}; only SiLU is fused"
    for name in ("conv1", "conv2"):
        if not _causal_conv_ok(getattr(block, name), causal_cls):
            return f"{name} is not a plain stride-1 causal conv with 'first' padding and kt >= 2"
    kinds = {_norm_kind(block.norm1, spatial_cls), _norm_kind(block.norm2, spatial_cls)}
    if None in kinds or len(kinds) != 1:
        return "norm1/norm2 are not both nn.GroupNorm or both CogVideoXSpatialNorm3D"
    return None


def why_not_covered(block, backend: str):
    """None when ``block`` (a CogVideoXResnetBlock3D) is one our forward computes with ``backend``,
    else why not. Checked at ``apply``; the per-call checks (hooks, dtypes, devices) come on top."""
    why = _structure_why_not(block)
    if why is None and backend in ("auto", "cuda"):  # the CUDA kernel's channel rule, shape-only probes
        for conv in (block.conv1.conv, block.conv2.conv):
            why = _kernel_why_not((1, conv.in_channels, 2, 4, 4), torch.bfloat16, conv.weight.shape, "cuda")
            if why is not None:
                break
    return why


def _kernel_why_not(shape, dtype, weight_shape, kernel):
    x = torch.empty(shape, dtype=dtype, device="meta")
    w = torch.empty(weight_shape, dtype=dtype, device="meta")
    return registry.why_unsupported("vae_conv3d", kernel, x=x, weight=w)


def _takes(inputs, block, backend) -> bool:
    """Whether ``backend`` runs both of the block's convs on ``inputs`` (else diffusers' forward).
    ``auto`` takes our CUDA kernel on CUDA tensors it covers, never the reference on a GPU."""
    if backend == "reference":
        return True
    if backend == "auto" and inputs.device.type != "cuda":
        return False
    kernel = "cuda" if backend == "auto" else backend
    if registry.availability("vae_conv3d", inputs.device)[kernel] is not None:
        return False
    B, _, T, H, W = inputs.shape
    return all(_kernel_why_not((B, conv.in_channels, T, H, W), inputs.dtype, conv.weight.shape, kernel) is None
               for conv in (block.conv1.conv, block.conv2.conv))


# ------------------------------------------------------------------------ per-call checks


def _forward_untouched(module, ours=()) -> bool:
    """Nothing replaced ``module``'s forward: the innermost one (under any hooks) is its class's or ours."""
    holder, attr, kind = state._slots(module)[-1]
    fn = state._slot_value(holder, attr, kind)
    return fn is None or state._is_own_forward(fn, module) or isinstance(fn, ours)


def _skippable(module, ours=()) -> bool:
    """We may skip ``module``'s forward: known hooks only (run by weights.enter_hooks) and its own forward."""
    return weights.hooks_known(module) and _forward_untouched(module, ours)


def _skipped_modules(block, spatial: bool) -> list:
    mods = [block.nonlinearity, block.dropout, block.conv1, block.conv2, block.conv1.conv, block.conv2.conv]
    for norm in (block.norm1, block.norm2):
        mods += [norm, norm.norm_layer] if spatial else [norm]
    return mods


def _cache_tensors(cache):
    if isinstance(cache, dict):
        return [t for v in cache.values() for t in _cache_tensors(v)]
    return [cache] if isinstance(cache, torch.Tensor) else []


def _call_ok(block, inputs, temb, zq, conv_cache) -> bool:
    if temb is not None or weights.autograd_needed((inputs, zq, _cache_tensors(conv_cache)), (block,)):
        return False
    if _structure_why_not(block) is not None:  # a module swapped since apply (a LoRA'd conv, GELU, ...)
        return False
    if zq is not None and zq.dtype != inputs.dtype:
        return False
    _, _, spatial_cls = _diffusers_classes()
    spatial = type(block.norm1) is spatial_cls
    if spatial != (zq is not None):  # diffusers' own forward raises its own error here
        return False
    if not (isinstance(block.dropout, torch.nn.Dropout) and weights.identity_ok(block.dropout)):
        return False
    if not all(_skippable(m, (KernelConvForward,)) for m in _skipped_modules(block, spatial)):
        return False
    return not weights.function_mode_active()


# --------------------------------------------------------------------------------- forward


CUDNN_CHANNELS = cudnn_channels_from_env()  # in-channel ranges whose convs take backend "cudnn": the variable's
# The default on CUDA tensors while the variable is unset: every ResNet conv of 128 or more input channels (all of
# the 5B VAE's). H200 (h200_s7, 747418c): 81x768x1360 decode 4.773 s vs 6.015 with the variable off, 49x480x720
# 0.927 vs 1.171 s, error 0.86x diffusers' bf16 (9.632e-3 vs 9.037e-3 off); encode 2.39x / 2.31x diffusers.
CUDNN_DEFAULT_CUDA = parse_cudnn_channels("128+") if CUDNN_CHANNELS_ENV not in os.environ else ()


def _conv_backend(backend, x, w):
    """``"cudnn"`` for a conv of x with w when CUDNN_CHANNELS (or, on CUDA with the variable unset,
    CUDNN_DEFAULT_CUDA) names its input channels and that backend runs these inputs; else ``backend`` (the
    block's)."""
    ranges = CUDNN_CHANNELS or (CUDNN_DEFAULT_CUDA if x.device.type == "cuda" else ())
    if (not ranges or backend == "reference" or not channels_match(ranges, x.shape[1])
            or registry.availability("vae_conv3d", x.device)["cudnn"] is not None):
        return backend
    return "cudnn" if registry.why_unsupported("vae_conv3d", "cudnn", x=x, weight=w) is None else backend


CHUNK_ABOVE = 512 << 20  # a decoder frame batch larger than this runs in frame chunks ...
CHUNK_BYTES = 256 << 20  # ... of about this size (at least one frame)


def _chunks(x, chunked=True):
    """Frame ranges the fused op runs ``x`` in: one, or (``chunked`` and x above CHUNK_ABOVE) chunks of
    about CHUNK_BYTES. Only the decoder chunks (its full-resolution up blocks hold the peak); the encoder's
    batches run whole: chunking costs time (more, smaller launches) and encode memory is not its peak."""
    T = x.shape[2]
    if not chunked or x.numel() * x.element_size() <= CHUNK_ABOVE:
        return [(0, T)]
    step = max(1, CHUNK_BYTES // max(1, x[:, :, :1].numel() * x.element_size()))
    return [(t0, min(T, t0 + step)) for t0 in range(0, T, step)]


def _pointwise_conv_ok(module, causal_cls) -> bool:
    """A spatial norm's conv_y / conv_b the op computes from zq: a plain (1,1,1) causal conv, hooks we run."""
    if type(module) is not causal_cls or module.time_kernel_size != 1 or not conv_shape_supported(module):
        return False
    conv = module.conv
    return (tuple(conv.kernel_size) == (1, 1, 1) and tuple(conv.stride) == (1, 1, 1)
            and _skippable(module, (KernelConvForward,)) and _skippable(conv))


@functools.lru_cache(maxsize=64)
def _zq_index(zq_size, size):
    """spatial_norm_index (a CPU tensor, read only) per pair of sizes: a decode has a handful."""
    return spatial_norm_index(zq_size, size)


def _interpolate_zq(zq, f):
    """diffusers' CogVideoXSpatialNorm3D resizing of zq to f (the first frame apart for odd T > 1)."""
    if f.shape[2] > 1 and f.shape[2] % 2 == 1:
        z_first = F.interpolate(zq[:, :, :1], size=f[:, :, :1].shape[-3:])
        z_rest = F.interpolate(zq[:, :, 1:], size=f[:, :, 1:].shape[-3:])
        return torch.cat([z_first, z_rest], dim=2)
    return F.interpolate(zq, size=f.shape[-3:])


class _Consumed:
    def __repr__(self):
        return "<conv cache consumed by a patched CogVideoXResnetBlock3D>"

    def __reduce__(self):
        return (_consumed, ())


def _consumed():
    return CONSUMED


CONSUMED = _Consumed()


def _consume(cache):
    """Replace every tensor of a used cache dict by CONSUMED (frees it unless held elsewhere)."""
    for key, value in cache.items():
        if isinstance(value, dict):
            _consume(value)
        elif isinstance(value, torch.Tensor):
            cache[key] = CONSUMED


def _has_consumed(cache) -> bool:
    if isinstance(cache, dict):
        return any(_has_consumed(v) for v in cache.values())
    return cache is CONSUMED


class KernelResnetForward:
    """``CogVideoXResnetBlock3D.forward`` while patched (see the module docstring). A picklable
    instance attribute of the block; diffusers' forward runs whatever it does not cover."""

    def __init__(self, block, backend: str = "auto"):
        self.block = block
        self.backend = registry.backend_for("vae_conv3d", backend)

    def __call__(self, inputs, temb=None, zq=None, conv_cache=None):
        return self.owned([inputs], temb, zq, conv_cache)

    def owned(self, box, temb=None, zq=None, conv_cache=None, exclusive=False, after_first_conv=None):
        """The block's forward on ``box[0]``, taking it out of ``box``: when the caller keeps no other
        reference (KernelDecoderForward), the input is freed as soon as the block no longer needs it
        (after the shortcut, for a block that changes the channel count). ``exclusive``: nothing else
        holds the input or a view of its memory (the previous ResNet block's output, handed on by
        KernelDecoderForward): a block that keeps the channel count then writes its output over its input,
        frame chunk by frame chunk, as the residual of that chunk is read (one full-size tensor less).
        ``after_first_conv``: called with the block's new caches so far (a dict it may change in place) once the
        first fused line is queued (KernelDecoderForward sends those caches to the host there and issues the next
        stage's copies, after this block's largest allocations)."""
        block = self.block
        if _has_consumed(conv_cache):
            raise ValueError("this conv_cache was already used by a patched CogVideoXResnetBlock3D (its tensors "
                             "are freed once read): pass the cache the previous call returned")
        if _call_ok(block, box[0], temb, zq, conv_cache) and _takes(box[0], block, self.backend):
            out = self._ours(box, zq, conv_cache or {}, exclusive, after_first_conv)
            if out is not None:
                if conv_cache:
                    _consume(conv_cache)
                return out
        return type(block).forward(block, box.pop(), temb, zq, conv_cache)

    def _conv(self, x, norm, conv, zq, cache, new_cache, key, skipped=(), residual=None, out_buffer=None):
        """One fused line (norm + modulation + SiLU + conv [+ residual]) with the hooks of the modules it
        skips run around it and the spatial norm's convs called (``new_cache`` filled); or None when a
        weight is not one the op can take (then no op was called).
        ``residual``: None or a function of a frame range (t0, t1) giving that range of the residual (the
        shortcut, computed chunk by chunk), or None to add none. ``out_buffer``: the tensor a chunked line
        writes its output into (else a new one)."""
        spatial = zq is not None
        group_norm = norm.norm_layer if spatial else norm
        zq_index = self._fused_modulation_index(norm, x, zq) if spatial else None
        mod_convs = [norm.conv_y, norm.conv_y.conv, norm.conv_b, norm.conv_b.conv] if zq_index is not None else []
        with contextlib.ExitStack() as stack:
            for m in ([norm, group_norm] if spatial else [norm]) + [self.block.nonlinearity, *skipped, conv,
                                                                    conv.conv, *mod_convs]:
                weights.enter_hooks(m, stack)  # as their calls would
            gn = (group_norm.weight, group_norm.bias) if group_norm.affine else (None, None)
            w, b = conv.conv.weight, conv.conv.bias
            fused = {}
            if zq_index is not None:
                fused = dict(zq=zq, scale_weight=norm.conv_y.conv.weight, scale_bias=norm.conv_y.conv.bias,
                             shift_weight=norm.conv_b.conv.weight, shift_bias=norm.conv_b.conv.bias)
            if not all(self._takes_tensor(t, x) for t in (*gn, w, b, *fused.values())):
                return None
            ranges = _chunks(x, spatial)
            chunked = len(ranges) > 1
            if spatial and not fused:
                zq = _interpolate_zq(zq, x)
                norm_cache = cache.get(key) or {}
                cy, cb = norm_cache.get("conv_y"), norm_cache.get("conv_b")
            if chunked:
                coef_backend = "reference" if self.backend in ("reference", "cpp") else "auto"
                coef = vae_group_norm_coef(x, group_norm.num_groups, *gn, eps=float(group_norm.eps),
                                           backend=coef_backend)
                norm_args = dict(norm_coef=coef)
                y = out_buffer if out_buffer is not None else torch.empty((x.shape[0], w.shape[0], *x.shape[2:]),
                                                                          dtype=x.dtype, device=x.device)
            else:
                norm_args = dict(num_groups=group_norm.num_groups, norm_weight=gn[0], norm_bias=gn[1],
                                 eps=float(group_norm.eps))
            conv_key = key.replace("norm", "conv")
            conv_cache = cache.get(conv_key)
            backend = _conv_backend(self.backend, x, w)
            for t0, t1 in ranges:
                part = (lambda t: t[:, :, t0:t1]) if chunked else (lambda t: t)
                mod = {}
                if fused:  # scale / shift computed in the op from zq: this range's frames of the index
                    T = x.shape[2]
                    mod = dict(fused, zq_index=torch.cat((zq_index[t0:t1], zq_index[T:])) if chunked else zq_index)
                elif spatial:
                    zs = part(zq)
                    scale, cy = norm.conv_y(zs, conv_cache=cy)
                    shift, cb = norm.conv_b(zs, conv_cache=cb)
                    del zs
                    if not (self._takes_tensor(scale, x) and self._takes_tensor(shift, x)):
                        if t0 == 0:
                            return None
                        raise RuntimeError("the spatial norm's conv_y / conv_b changed dtype between frame chunks")
                    mod = dict(scale=scale, shift=shift)
                res = None if residual is None else residual(t0, t1)
                out, conv_cache = _ops.vae_conv3d(part(x), weight=w, bias=b, silu=True, cache=conv_cache, residual=res,
                                                  out=part(y) if chunked else None, backend=backend,
                                                  **norm_args, **mod)  # (frame slices: read / written in place)
                del mod, res
                if chunked and t0 == 0 and isinstance(cache.get(conv_key), torch.Tensor):
                    cache[conv_key] = CONSUMED  # the batch's cache is read by the first chunk only: free it now
                if not chunked:
                    y = out
                del out
            if fused:  # (the (1,1,1) convs' "cache", their whole input, is never read)
                new_cache[key] = {"conv_y": None, "conv_b": None}
            elif spatial:
                if chunked:  # a (1,1,1) conv's "cache" is its whole input, never read: not the last chunk's
                    cy = None if norm.conv_y.time_kernel_size == 1 else cy
                    cb = None if norm.conv_b.time_kernel_size == 1 else cb
                new_cache[key] = {"conv_y": cy, "conv_b": cb}
            new_cache[key.replace("norm", "conv")] = conv_cache
        return y

    def _fused_modulation_index(self, norm, x, zq):
        """zq_index (diffusers' resizing of zq to x) when the op computes the spatial norm's conv_y / conv_b
        itself (see the module docstring), else None (they are called as modules)."""
        if self.backend not in ("reference", "cpp") and not fused_modulation_cuda():
            return None
        _, causal_cls, _ = _diffusers_classes()
        if not (_pointwise_conv_ok(norm.conv_y, causal_cls) and _pointwise_conv_ok(norm.conv_b, causal_cls)):
            return None
        if zq.shape[0] != x.shape[0] or norm.conv_y.conv.in_channels != zq.shape[1]:
            return None  # (diffusers' own calls raise their errors)
        try:
            return _zq_index(tuple(zq.shape[2:]), tuple(x.shape[2:]))
        except ValueError:  # an odd frame count with a one-frame zq: diffusers' behaviour, whatever it is
            return None

    @staticmethod
    def _takes_tensor(t, x):
        return t is None or (weights._plain(t) and t.dtype == x.dtype and t.device == x.device)

    def _ours(self, box, zq, cache, exclusive=False, after_first_conv=None):
        block = self.block
        new_cache = {}
        h = self._conv(box[0], block.norm1, block.conv1, zq, cache, new_cache, "norm1")
        if h is None:
            return None
        if after_first_conv is not None:
            after_first_conv(new_cache)
        src = {"x": box.pop()}  # the block's input: the only reference this frame keeps (released below)
        projected = block.in_channels != block.out_channels
        shortcut_cache = [cache.get("conv_shortcut")]
        late = []  # shortcut parts in another dtype than h: added after the op, as diffusers' add promotes

        def shortcut(t0, t1):
            """Frames t0..t1 of the shortcut: diffusers' own conv_shortcut module call (hooks, LoRA, ...),
            chunk by chunk with its cache chained, or the block's input."""
            x = src["x"][:, :, t0:t1]
            if not projected:
                return x
            if block.use_conv_shortcut:
                part, shortcut_cache[0] = block.conv_shortcut(x, conv_cache=shortcut_cache[0])
                return part
            return block.conv_shortcut(x)

        ranges = _chunks(h, zq is not None)
        if projected and len(ranges) > 1:  # the whole (narrower) shortcut now: the wider input can go
            parts = {t0: shortcut(t0, t1) for t0, t1 in ranges}
            src.clear()
            shortcut = lambda t0, t1: parts.pop(t0)  # noqa: E731

        def residual(t0, t1):
            part = shortcut(t0, t1)
            if part.dtype == h.dtype:
                return part
            late.append(part)
            return None

        # the output over the input (see owned): chunk t0..t1 of the output is written where that chunk of the
        # residual was read, after the read (each element by the thread that read it)
        in_place = (exclusive and not projected and len(ranges) > 1 and src["x"].dtype == h.dtype
                    and src["x"].shape == h.shape[:1] + (block.out_channels,) + h.shape[2:] and src["x"].is_contiguous())
        out = self._conv(h, block.norm2, block.conv2, zq, cache, new_cache, "norm2", skipped=(block.dropout,),
                         residual=residual, out_buffer=src["x"] if in_place else None)
        if out is None:  # (rare: a hook left the second conv's weights in another dtype)
            if "x" in src and cache.get("conv1") is not CONSUMED:  # (diffusers' forward can still run)
                box.append(src["x"])
                return None
            raise RuntimeError("the second conv of a CogVideoXResnetBlock3D changed its weights' dtype mid-call")
        del h
        if late:
            out = out + torch.cat(late, dim=2)
        if projected and block.use_conv_shortcut:
            new_cache["conv_shortcut"] = shortcut_cache[0]
        return out, new_cache


class KernelSpatialNormForward:
    """``CogVideoXSpatialNorm3D.forward`` of a spatial norm outside the ResNet blocks (the decoder's
    ``norm_out``) while patched: for frame batches above CHUNK_BYTES, ``GroupNorm(f) * conv_y(zq') +
    conv_b(zq')`` frame chunk by frame chunk with the batch's statistics (``vae_group_norm_coef``), so
    that only the output is full-size (diffusers holds conv_y, conv_b, the normalised f and the product
    at once). The same roundings as diffusers (the normalised f, the product, the sum, each in f's dtype).
    diffusers' forward runs for smaller batches and whatever is not plain (autograd, unknown hooks or a
    replaced norm layer, weights in another dtype)."""

    def __init__(self, norm, backend: str = "auto"):
        self.norm = norm
        self.backend = registry.backend_for("vae_conv3d", backend)

    def _runs(self, f, zq):
        norm = self.norm
        gn = getattr(norm, "norm_layer", None)
        return (type(gn) is torch.nn.GroupNorm and zq is not None and zq.dtype == f.dtype and len(_chunks(f)) > 1
                and not weights.autograd_needed((f, zq), (norm,)) and _skippable(gn)
                and not weights.function_mode_active()
                and (self.backend != "auto" or f.device.type == "cuda"))

    def __call__(self, f, zq, conv_cache=None):
        norm = self.norm
        if _has_consumed(conv_cache):
            raise ValueError("this conv_cache was already used by a patched CogVideoXSpatialNorm3D")
        if self._runs(f, zq):
            out = self._ours(f, zq, conv_cache or {})
            if out is not None:
                return out
        return type(norm).forward(norm, f, zq, conv_cache)

    def _ours(self, f, zq, cache):
        norm, gn = self.norm, self.norm.norm_layer
        with contextlib.ExitStack() as stack:  # (norm's own hooks ran: this is its forward)
            weights.enter_hooks(gn, stack)
            w, b = (gn.weight, gn.bias) if gn.affine else (None, None)
            if not all(KernelResnetForward._takes_tensor(t, f) for t in (w, b)):
                return None
            zq = _interpolate_zq(zq, f)
            coef = vae_group_norm_coef(f, gn.num_groups, w, b, eps=float(gn.eps),
                                       backend="reference" if self.backend in ("reference", "cpp") else "auto")
            a, d = (coef[..., i].to(f.device)[:, :, None, None, None] for i in (0, 1))
            out = torch.empty_like(f)
            cy, cb = cache.get("conv_y"), cache.get("conv_b")
            for t0, t1 in _chunks(f):
                zs = zq[:, :, t0:t1]
                scale, cy = norm.conv_y(zs, conv_cache=cy)
                shift, cb = norm.conv_b(zs, conv_cache=cb)
                normed = (f[:, :, t0:t1].float() * a + d).to(f.dtype)
                out[:, :, t0:t1] = normed * scale + shift
                del zs, scale, shift, normed
        cy = None if norm.conv_y.time_kernel_size == 1 else cy  # (the kt = 1 "cache" is never read)
        cb = None if norm.conv_b.time_kernel_size == 1 else cb
        if cache:
            _consume(cache)
        return out, {"conv_y": cy, "conv_b": cb}


def _no_hooks(module) -> bool:
    """Nothing would run around ``module``'s forward if it were called (no torch, diffusers or accelerate
    hook on it, no global module hook) and its forward is its class's or ours."""
    from torch.nn.modules import module as torch_module

    registry = module.__dict__.get("_diffusers_hook")
    return (not module._forward_hooks and not module._forward_pre_hooks and "_hf_hook" not in module.__dict__
            and (registry is None or not registry.hooks) and not torch_module._global_forward_hooks
            and not torch_module._global_forward_pre_hooks)


class KernelDecoderForward:
    """``CogVideoXDecoder3D.forward`` while patched: diffusers' sequence (conv_in, mid block, up blocks,
    norm_out, SiLU, conv_out; the same module calls and caches), except that an up block without hooks
    is run here and hands its input to its first ResNet block by ownership (``KernelResnetForward.owned``)
    instead of as an argument, and each of its later ResNet blocks its output to the next as an exclusive
    input (written over in place, see ``owned``). In diffusers the decoder's and the up block's frames hold
    each up block's input until the block returns: the last up block's input (256 channels at full
    resolution, the largest tensor of the decode) lived through all of that block. Owned, it is freed once
    the first ResNet block has its shortcut.

    ``cache="host"`` (``apply(vae, vae_cache="host")``, CUDA tensors): the conv caches carried to the next
    frame batch wait in pinned host memory (cache_offload.py): each stage's new caches are copied out when the
    stage returns, and in the next batch each stage's caches are copied back while the stage before it runs.
    Same values, bit for bit. diffusers' forward runs under autograd or gradient checkpointing (with any host
    caches brought back first)."""

    def __init__(self, decoder, cache: str = "device"):
        if cache not in CACHE_PLACES:
            raise ValueError(f"vae_cache={cache!r}: choose one of {CACHE_PLACES}")
        self.decoder = decoder
        self.cache = cache

    def __call__(self, sample, temb=None, conv_cache=None):
        d = self.decoder
        if (weights.autograd_needed((sample, temb), (d,)) or weights.function_mode_active()
                or (torch.is_grad_enabled() and d.gradient_checkpointing)):
            if cache_offload.holds_host(conv_cache):
                conv_cache = cache_offload.load(conv_cache)
            return type(d).forward(d, sample, temb, conv_cache)
        drive = [type(up).__name__ == "CogVideoXUpBlock3D" and "forward" not in up.__dict__ and _no_hooks(up)
                 for up in d.up_blocks]
        paths = [("conv_in",), ("mid_block",)]
        for i, up in enumerate(d.up_blocks):
            paths += [(f"up_block_{i}", f"resnet_{j}") for j in range(len(up.resnets))] if drive[i] else [
                (f"up_block_{i}",)]
        paths += [("norm_out",), ("conv_out",)]
        st = _Stages(conv_cache or {}, paths, self.cache == "host" and cache_offload.offload_device(sample.device))
        new = {}
        h, new["conv_in"] = st.run(("conv_in",), lambda c: d.conv_in(sample, conv_cache=c))
        h, new["mid_block"] = st.run(("mid_block",), lambda c: d.mid_block(h, temb, sample, conv_cache=c))
        for i, up in enumerate(d.up_blocks):
            key = f"up_block_{i}"
            if drive[i]:
                box = [h]
                del h
                h, new[key] = self._up_block(up, box, temb, sample, st, key)
            else:
                h, new[key] = st.run((key,), lambda c: up(h, temb, sample, conv_cache=c))
        h, new["norm_out"] = st.run(("norm_out",), lambda c: d.norm_out(h, sample, conv_cache=c))
        h = d.conv_act(h)
        h, new["conv_out"] = st.run(("conv_out",), lambda c: d.conv_out(h, conv_cache=c))
        return h, new

    @staticmethod
    def _up_block(up, box, temb, zq, st, key):
        """diffusers' CogVideoXUpBlock3D.forward (no gradient checkpointing) on ``box[0]``, owned."""
        new = {}
        exclusive = False  # the up block's input may be held elsewhere (an upsampler's hook); its outputs not
        for j, resnet in enumerate(up.resnets):
            ours = resnet.__dict__.get("forward")
            if isinstance(ours, KernelResnetForward) and _no_hooks(resnet):
                h, new[f"resnet_{j}"] = st.run((key, f"resnet_{j}"),
                                               lambda c, mid: ours.owned(box, temb, zq, c, exclusive, mid), mid=True)
                exclusive = True
            else:
                h, new[f"resnet_{j}"] = st.run((key, f"resnet_{j}"),
                                               lambda c: resnet(box.pop(), temb, zq, conv_cache=c))
                exclusive = False  # (a module call: its hooks may keep the output)
            box.append(h)
            del h
        h = box.pop()
        if up.upsamplers is not None:
            for upsampler in up.upsamplers:
                h = upsampler(h)
        return h, new


CACHE_PLACES = ("device", "host")


class _Stages:
    """The decoder's stages in order (``paths`` into the cache dict), for ``cache="host"``: a stage's caches are
    brought back to the device (their copies issued while the stage before it ran) and its new caches sent to the
    host as it returns; otherwise the dict's entries as they are. ``run(..., mid=True)``: the stage (a ResNet
    block) calls back after its first conv, which sends that conv's new caches to the host and issues the next
    stage's copies there (the next stage's device buffers are then allocated after the first conv's input,
    output and activation chunks, and the first conv's new cache is not held through the second: at 49x480x720
    the decode's peak, in up_blocks.3.resnets.0, is 0.4 GiB lower); otherwise the next stage's copies are issued
    as the stage starts."""

    def __init__(self, cache, paths, host):
        self.cache, self.paths, self.host, self.next = cache, paths, host, 0

    def _get(self, path):
        node = self.cache
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        return node

    def run(self, path, fn, mid=False):
        i = self.paths.index(path, self.next)
        self.next = i + 1
        sub = self._get(path)
        nxt = self.paths[i + 1] if i + 1 < len(self.paths) else None

        def prefetch_next(new_so_far=None):  # the next stage's copies run beside (the rest of) this stage
            if self.host and isinstance(new_so_far, dict):  # (finished caches go out now, not at the stage's end)
                for k, v in list(new_so_far.items()):
                    new_so_far[k] = cache_offload.store(v)
            if nxt is not None:
                cache_offload.prefetch(self._get(nxt))

        if cache_offload.holds_host(sub) or (self.host and nxt is not None):
            if not mid:
                prefetch_next()
            if isinstance(sub, dict):
                sub = cache_offload.load(sub)  # (in place: the blocks consume the dict they are handed)
            elif isinstance(sub, cache_offload.HostCache):
                sub = sub.tensor()
        if mid:
            out, new_cache = fn(sub, prefetch_next)
            prefetch_next()  # (issued already unless the stage ran diffusers' forward)
        else:
            out, new_cache = fn(sub)
        del sub
        return out, (cache_offload.store(new_cache) if self.host else new_cache)


__all__ = ["KernelDecoderForward", "KernelResnetForward", "KernelSpatialNormForward", "why_not_covered"]
