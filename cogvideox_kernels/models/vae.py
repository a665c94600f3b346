"""The causal 3D VAE of CogVideoX's design: factorized convs, per-frame GroupNorm, streaming.

Encoder: conv_in, one stage of ResNet blocks per width in ``channel_multipliers``; between stages
a stride-2 spatial conv (the first log2(spatial_downsample) gaps) and a stride-2 causal temporal
conv (the first log2(temporal_downsample) gaps); a middle of two ResNet blocks; GroupNorm, SiLU and
conv_out to 2 * latent_channels (mean, log-variance). 49 frames -> 13, H x W -> H/8 x W/8.
Decoder: the mirror image, with nearest 2x upsampling in space and frame repetition in time
(frame 0 once: T -> 2T - 1), 13 -> 25 -> 49.

Every block is per frame or causal in time, so latent frame j depends on video frames <= j * t_down
only, and a clip can stream through in frame chunks (``chunk_frames``) with each causal conv
keeping its cache: the same result as one pass, with peak activation memory set by the chunk.
Videos and latents are ``[B, T, C, H, W]`` at the API; the modules work on ``[B, C, T, H, W]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn._checks import check_input
from ..nn._switch import BackendSwitch, check_backend
from ..nn.causal_conv import CausalConv3d
from ..nn.vae_blocks import (FactorizedConv3d, FrameGroupNorm, ResnetBlock, SpatialDownsample,
                             SpatialUpsample, StreamCache, TemporalDownsample, TemporalUpsample)

LOGVAR_RANGE = (-30.0, 20.0)  # keeps exp(logvar / 2) finite when sampling


class _CausalVaeHalf(BackendSwitch, nn.Module):
    """What Encoder and Decoder share: their sizes, and one ``backend`` for all causal convs."""

    OPS = CausalConv3d.OPS

    def __init__(self, *, in_channels, latent_channels, num_frames, spatial_downsample,
                 temporal_downsample, backend):
        super().__init__()
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.num_frames = num_frames
        self.spatial_downsample, self.temporal_downsample = spatial_downsample, temporal_downsample
        self._backend = check_backend(type(self).__name__, backend, self.supported_backends())

    @property
    def latent_frames(self) -> int:
        """Latent frames of a ``num_frames`` clip: (num_frames - 1) / temporal_downsample + 1."""
        return (self.num_frames - 1) // self.temporal_downsample + 1


class Encoder(_CausalVaeHalf):
    """``forward(x [B, C, T, H, W], stream=None) -> moments [B, 2 * latent, T', H/s, W/s]``."""

    def __init__(self, *, in_channels, latent_channels, num_frames, spatial_downsample,
                 temporal_downsample, widths, layers_per_block, backend="auto", device=None,
                 dtype=None):
        super().__init__(in_channels=in_channels, latent_channels=latent_channels,
                         num_frames=num_frames, spatial_downsample=spatial_downsample,
                         temporal_downsample=temporal_downsample, backend=backend)
        factory = {"backend": backend, "device": device, "dtype": dtype}
        spatial_levels = spatial_downsample.bit_length() - 1
        temporal_levels = temporal_downsample.bit_length() - 1
        self.conv_in = FactorizedConv3d(in_channels, widths[0], **factory)
        self.stages = nn.ModuleList()
        previous = widths[0]
        for level, width in enumerate(widths):
            blocks = [ResnetBlock(previous if i == 0 else width, width, **factory)
                      for i in range(layers_per_block)]
            if level < spatial_levels:
                blocks.append(SpatialDownsample(width, device=device, dtype=dtype))
            if level < temporal_levels:
                blocks.append(TemporalDownsample(width, **factory))
            self.stages.append(nn.ModuleList(blocks))
            previous = width
        self.mid = nn.ModuleList([ResnetBlock(previous, previous, **factory) for _ in range(2)])
        self.norm_out = FrameGroupNorm(previous, device=device, dtype=dtype)
        self.conv_out = FactorizedConv3d(previous, 2 * latent_channels, **factory)

    def forward(self, x, stream: StreamCache | None = None):
        check_input("Encoder", "x", x, self.conv_in.spatial.weight, ndim=5)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"Encoder: x has C={x.shape[1]} (dim 1 of [B, C, T, H, W]); in_channels={self.in_channels}")
        h = self.conv_in(x, stream)
        for stage in self.stages:
            for block in stage:
                h = block(h, stream)
        for block in self.mid:
            h = block(h, stream)
        return self.conv_out(F.silu(self.norm_out(h)), stream)


class Decoder(_CausalVaeHalf):
    """``forward(z [B, latent, T', h, w], stream=None) -> video [B, in_channels, T, h*s, w*s]``."""

    def __init__(self, *, in_channels, latent_channels, num_frames, spatial_downsample,
                 temporal_downsample, widths, layers_per_block, backend="auto", device=None,
                 dtype=None):
        super().__init__(in_channels=in_channels, latent_channels=latent_channels,
                         num_frames=num_frames, spatial_downsample=spatial_downsample,
                         temporal_downsample=temporal_downsample, backend=backend)
        factory = {"backend": backend, "device": device, "dtype": dtype}
        spatial_levels = spatial_downsample.bit_length() - 1
        temporal_levels = temporal_downsample.bit_length() - 1
        previous = widths[-1]
        self.conv_in = FactorizedConv3d(latent_channels, previous, **factory)
        self.mid = nn.ModuleList([ResnetBlock(previous, previous, **factory) for _ in range(2)])
        self.stages = nn.ModuleList()
        for level in reversed(range(len(widths))):  # mirror of the encoder, deepest level first
            width = widths[level]
            blocks = [ResnetBlock(previous if i == 0 else width, width, **factory)
                      for i in range(layers_per_block + 1)]
            # Undo the encoder's downsampling at this level in reverse order: time, then space.
            if level < temporal_levels:
                blocks.append(TemporalUpsample(width, **factory))
            if level < spatial_levels:
                blocks.append(SpatialUpsample(width, device=device, dtype=dtype))
            self.stages.append(nn.ModuleList(blocks))
            previous = width
        self.norm_out = FrameGroupNorm(previous, device=device, dtype=dtype)
        self.conv_out = FactorizedConv3d(previous, in_channels, **factory)

    def forward(self, z, stream: StreamCache | None = None):
        check_input("Decoder", "z", z, self.conv_in.spatial.weight, ndim=5)
        if z.shape[1] != self.latent_channels:
            raise ValueError(f"Decoder: z has C={z.shape[1]} (dim 1 of [B, C, T, H, W]); "
                             f"latent_channels={self.latent_channels}")
        h = self.conv_in(z, stream)
        for block in self.mid:
            h = block(h, stream)
        for stage in self.stages:
            for block in stage:
                h = block(h, stream)
        return self.conv_out(F.silu(self.norm_out(h)), stream)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not supported; it must be an int >= 1")
    return value


def _power_of_two(name, value):
    _positive_int(name, value)
    if value & (value - 1):
        raise ValueError(f"{name}={value} is not supported; it must be a power of 2 (1, 2, 4, 8, ...)")
    return value.bit_length() - 1


def build_vae(in_channels=3, latent_channels=16, num_frames=49, spatial_downsample=8,
              temporal_downsample=4, base_channels=128, backend="auto", *,
              channel_multipliers=(1, 2, 2, 4), layers_per_block=3, device=None, dtype=None):
    """Build the causal VAE; returns ``(encoder, decoder)``.

    in_channels: video channels. latent_channels: latent channels (the encoder outputs twice as
    many: mean and log-variance). spatial_downsample / temporal_downsample: powers of 2, one
    stride-2 spatial / causal temporal conv per factor of 2 (8 -> three, 4 -> two, 1 -> none);
    each needs that many gaps between stages: log2 <= len(channel_multipliers) - 1.
    num_frames: the clip length the VAE is sized for ((num_frames - 1) % temporal_downsample == 0).
    Clips up to that length run in one pass; ``encode_video`` / ``decode_latent`` stream longer
    ones in chunks of about that length (encoder: the largest multiple of temporal_downsample
    <= num_frames; decoder: ``latent_frames``) unless ``chunk_frames`` says otherwise.
    base_channels: width of the first stage; stage i is base_channels * channel_multipliers[i]
    wide. layers_per_block: ResNet blocks per encoder stage (the decoder has one more, as in
    CogVideoX). backend: handed to every causal temporal conv ("auto", "reference", "cuda",
    "cpp"); the parameters never depend on it and ``encoder.backend = ...`` changes it later.
    """
    for name, value in (("in_channels", in_channels), ("latent_channels", latent_channels),
                        ("num_frames", num_frames), ("base_channels", base_channels),
                        ("layers_per_block", layers_per_block)):
        _positive_int(name, value)
    spatial_levels = _power_of_two("spatial_downsample", spatial_downsample)
    temporal_levels = _power_of_two("temporal_downsample", temporal_downsample)
    if (num_frames - 1) % temporal_downsample:
        raise ValueError(f"num_frames={num_frames} is not supported with temporal_downsample="
                         f"{temporal_downsample}; it must be 1 more than a multiple of it (e.g. 49)")
    multipliers = tuple(channel_multipliers) if isinstance(channel_multipliers, (tuple, list)) else ()
    if not multipliers or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in multipliers):
        raise ValueError(f"channel_multipliers={channel_multipliers!r} is not supported; "
                         "give a non-empty tuple of ints >= 1")
    for name, value, levels in (("spatial_downsample", spatial_downsample, spatial_levels),
                                ("temporal_downsample", temporal_downsample, temporal_levels)):
        if levels > len(multipliers) - 1:
            raise ValueError(f"{name}={value} needs {levels} downsampling steps but "
                             f"channel_multipliers={multipliers} has only {len(multipliers) - 1} "
                             "gaps between stages; give more stages")
    check_backend("build_vae", backend, CausalConv3d.supported_backends())
    options = dict(in_channels=in_channels, latent_channels=latent_channels, num_frames=num_frames,
                   spatial_downsample=spatial_downsample, temporal_downsample=temporal_downsample,
                   widths=[base_channels * m for m in multipliers], layers_per_block=layers_per_block,
                   backend=backend, device=device, dtype=dtype)
    return Encoder(**options), Decoder(**options)


def _frame_chunks(num: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, num)) for start in range(0, num, chunk)]


def _check_input(name, x, module, channels, channels_name):
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 5-dim tensor [B, T, C, H, W], got {shape}")
    if min(x.shape) == 0:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)} [B, T, C, H, W]")
    if x.shape[2] != channels:
        raise ValueError(f"{name} has C={x.shape[2]} channels (shape {tuple(x.shape)} [B, T, C, H, W]) "
                         f"but the VAE has {channels_name}={channels}")
    weight = module.conv_in.spatial.weight
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"{name} is {x.dtype} on {x.device} but the VAE's parameters are "
                         f"{weight.dtype} on {weight.device}; they must match")


def _check_chunk(chunk_frames, multiple_of, what):
    if chunk_frames is None:
        return
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
        raise ValueError(f"chunk_frames={chunk_frames!r} is not supported; it must be an int >= 1")
    if chunk_frames % multiple_of:
        raise ValueError(f"chunk_frames={chunk_frames} is not supported; {what} chunks must be a "
                         f"multiple of temporal_downsample={multiple_of} frames (e.g. "
                         f"{2 * multiple_of}); the clip's leftover frame goes last")


def _run_chunked(module, x, chunk):
    """[B, T, C, H, W] in and out (contiguous); the module sees [B, C, T, H, W] views. One pass
    when the clip fits in one chunk, else chunk by chunk with one StreamCache."""
    frames = x.transpose(1, 2)
    if x.shape[1] <= chunk:
        return module(frames).transpose(1, 2).contiguous()
    stream = StreamCache()
    return torch.cat([module(frames[:, :, a:b], stream).transpose(1, 2)
                      for a, b in _frame_chunks(x.shape[1], chunk)], dim=1)


def encode_video(encoder: Encoder, video, *, sample=False, generator=None, chunk_frames=None):
    """video ``[B, T, C, H, W]`` -> latents ``[B, (T-1)/t_down + 1, latent_channels, H/s, W/s]``.

    Returns the posterior mean, or a sample mean + exp(logvar / 2) * noise when ``sample=True``
    (noise from ``generator``). ``chunk_frames`` (a multiple of temporal_downsample) streams the
    clip in chunks of that many frames, the leftover last; the default streams only clips longer
    than ``encoder.num_frames``, in chunks of the largest multiple of temporal_downsample that fits.
    """
    if not isinstance(encoder, Encoder):
        raise ValueError(f"encode_video takes the Encoder (build_vae returns (encoder, decoder)), got "
                         f"{type(encoder).__name__}")
    _check_input("video", video, encoder, encoder.in_channels, "in_channels")
    B, T, C, H, W = video.shape
    t_down, s_down = encoder.temporal_downsample, encoder.spatial_downsample
    if (T - 1) % t_down:
        raise ValueError(f"video has T={T} frames; the VAE needs T = k * {t_down} + 1 "
                         f"(temporal_downsample={t_down}), e.g. {t_down * ((T - 1) // t_down) + 1}")
    if H % s_down or W % s_down:
        raise ValueError(f"video is {H} x {W} (H x W); both must be divisible by "
                         f"spatial_downsample={s_down}")
    _check_chunk(chunk_frames, t_down, "encoder")
    chunk = chunk_frames
    if chunk is None:  # clips up to num_frames in one pass, longer ones streamed
        chunk = T if T <= encoder.num_frames else max(encoder.num_frames // t_down * t_down, t_down)
    moments = _run_chunked(encoder, video, chunk)
    mean, logvar = moments.chunk(2, dim=2)
    latent = mean
    if sample:
        std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
        latent = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device,
                                          dtype=mean.dtype)
    return latent.contiguous()


def decode_latent(decoder: Decoder, latent, *, chunk_frames=None):
    """latent ``[B, T', latent_channels, h, w]`` -> video ``[B, (T'-1)*t_down + 1, C, h*s, w*s]``.

    ``chunk_frames`` (any size >= 1) streams the latent in chunks of that many latent frames; the
    default streams only latents longer than ``decoder.latent_frames``, in chunks of that length.
    """
    if not isinstance(decoder, Decoder):
        raise ValueError(f"decode_latent takes the Decoder (build_vae returns (encoder, decoder)), got "
                         f"{type(decoder).__name__}")
    _check_input("latent", latent, decoder, decoder.latent_channels, "latent_channels")
    _check_chunk(chunk_frames, 1, "decoder")
    return _run_chunked(decoder, latent, chunk_frames or decoder.latent_frames)


__all__ = ["Encoder", "Decoder", "build_vae", "encode_video", "decode_latent"]
