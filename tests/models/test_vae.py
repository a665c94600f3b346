"""The causal 3D VAE: blocks against independent formulas, causality, streaming == one pass,
shapes (49 -> 13 -> 49, 1 -> 1 -> 1), every build option, backends, and input errors."""
import copy

import pytest
import torch
import torch.nn.functional as F

from cogvideox_kernels._ext import cuda_available, extension_available
from cogvideox_kernels.models.vae import build_vae, decode_latent, encode_video
from cogvideox_kernels.nn.causal_conv import CausalConv3d
from cogvideox_kernels.nn.vae_blocks import (FrameConv2d, FrameGroupNorm, SpatialDownsample,
                                             StreamCache, TemporalDownsample, TemporalUpsample,
                                             frame_group_norm, group_count, repeat_frames)
from helpers import rel_err

HAS_NATIVE = extension_available()

TINY = dict(base_channels=8, latent_channels=4, layers_per_block=1, num_frames=13, backend="reference")
# For float32 comparisons: a latent of only 2 x 1 pixels makes per-frame GroupNorm over a group of
# 2 values, which amplifies rounding up to ~1e-3; 4x downsampling of 16 x 24 keeps 24 per group.
NUMERIC = dict(TINY, spatial_downsample=4)


def tiny_vae(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_vae(**{**TINY, **overrides})


def randomize_norms(module):
    """GroupNorm starts at weight 1, bias 0; random affine values make the tests see them."""
    for m in module.modules():
        if isinstance(m, FrameGroupNorm):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


# ---- blocks ------------------------------------------------------------------------------------

def test_group_count_rule():
    assert [group_count(c) for c in (128, 256, 512, 8, 12, 48, 3)] == [32, 32, 32, 8, 4, 16, 1]


def test_frame_group_norm_is_group_norm_per_frame():
    torch.manual_seed(1)
    x = torch.randn(2, 12, 5, 4, 3) * 3 + 1
    weight, bias = torch.randn(12), torch.randn(12)
    y = frame_group_norm(x, weight, bias, 4, 1e-6)
    folded = x.double().transpose(1, 2).reshape(10, 12, 4, 3)
    ref = F.group_norm(folded, 4, weight.double(), bias.double(), 1e-6)
    ref = ref.reshape(2, 5, 12, 4, 3).transpose(1, 2)
    assert rel_err(y, ref) <= 1e-6
    y16 = frame_group_norm(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), 4, 1e-6)
    assert y16.dtype == torch.bfloat16 and rel_err(y16, ref) <= 1e-2


def test_frame_conv2d_is_conv2d_per_frame():
    torch.manual_seed(2)
    conv = FrameConv2d(3, 5, 3, stride=2)
    x = torch.randn(2, 3, 4, 8, 6)
    ref = F.conv2d(x.double().transpose(1, 2).reshape(8, 3, 8, 6), conv.weight.double(),
                   conv.bias.double(), stride=2, padding=1)
    ref = ref.reshape(2, 4, 5, 4, 3).transpose(1, 2)
    assert rel_err(conv(x), ref) <= 1e-6


def test_repeat_frames():
    x = torch.randn(1, 2, 4, 1, 1)
    assert torch.equal(repeat_frames(x), x[:, :, [0, 1, 1, 2, 2, 3, 3]])
    assert torch.equal(repeat_frames(x, first_chunk=False), x[:, :, [0, 0, 1, 1, 2, 2, 3, 3]])


def test_temporal_down_and_upsample_frame_counts():
    torch.manual_seed(3)
    down = TemporalDownsample(4, backend="reference")
    up = TemporalUpsample(4, backend="reference")
    x = torch.randn(1, 4, 13, 2, 3)
    assert down(x).shape[2] == 7 and up(down(x)).shape[2] == 13
    assert SpatialDownsample(4)(x).shape[3:] == (1, 2)


# ---- shapes ------------------------------------------------------------------------------------

def test_one_frame_roundtrip_shape():
    encoder, decoder = tiny_vae(4)
    video = torch.randn(2, 1, 3, 16, 24)
    latent = encode_video(encoder, video)
    assert latent.shape == (2, 1, 4, 2, 3) and torch.isfinite(latent).all()
    out = decode_latent(decoder, latent)
    assert out.shape == video.shape and torch.isfinite(out).all()


def test_49_frames_to_13_and_back_streamed():
    torch.manual_seed(5)
    encoder, decoder = build_vae(base_channels=8, latent_channels=4, backend="reference")  # num_frames 49
    randomize_norms(encoder), randomize_norms(decoder)
    video = torch.randn(1, 49, 3, 8, 8)
    with torch.no_grad():
        latent = encode_video(encoder, video)
        assert latent.shape == (1, 13, 4, 1, 1)
        # chunks of 8 frames and the leftover frame last: 6 * 8 + 1
        assert rel_err(encode_video(encoder, video, chunk_frames=8), latent) <= 1e-5
        out = decode_latent(decoder, latent)
        assert out.shape == (1, 49, 3, 8, 8) and torch.isfinite(out).all()
        assert rel_err(decode_latent(decoder, latent, chunk_frames=5), out) <= 1e-5


# ---- causality ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0, 3, 6, 11])
def test_encoder_is_causal(t):
    """Perturbing frame t+1 leaves latent frames j with 4j <= t bit-identical and changes the next."""
    encoder, _ = tiny_vae(6)
    randomize_norms(encoder)
    video = torch.randn(1, 13, 3, 16, 24)
    perturbed = video.clone()
    perturbed[:, t + 1] += torch.randn_like(perturbed[:, t + 1])
    with torch.no_grad():
        a, b = encode_video(encoder, video), encode_video(encoder, perturbed)
    unchanged = t // 4 + 1
    assert torch.equal(a[:, :unchanged], b[:, :unchanged])
    assert not torch.allclose(a[:, unchanged], b[:, unchanged])


@pytest.mark.parametrize("s", [0, 1, 2])
def test_decoder_is_causal(s):
    """Perturbing latent frame s+1 leaves video frames <= 4s bit-identical and changes frame 4s+1."""
    _, decoder = tiny_vae(7)
    randomize_norms(decoder)
    latent = torch.randn(1, 4, 4, 2, 3)
    perturbed = latent.clone()
    perturbed[:, s + 1] += torch.randn_like(perturbed[:, s + 1])
    with torch.no_grad():
        a, b = decode_latent(decoder, latent), decode_latent(decoder, perturbed)
    assert torch.equal(a[:, :4 * s + 1], b[:, :4 * s + 1])
    assert not torch.allclose(a[:, 4 * s + 1], b[:, 4 * s + 1])


# ---- streaming ---------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_frames", [4, 8, 12])
def test_chunked_encode_equals_one_pass(chunk_frames):
    encoder, _ = tiny_vae(8, **NUMERIC)
    randomize_norms(encoder)
    video = torch.randn(2, 13, 3, 16, 24)
    with torch.no_grad():
        whole = encode_video(encoder, video)
        assert rel_err(encode_video(encoder, video, chunk_frames=chunk_frames), whole) <= 1e-5


@pytest.mark.parametrize("chunk_frames", [1, 2, 3])
def test_chunked_decode_equals_one_pass(chunk_frames):
    _, decoder = tiny_vae(9, **NUMERIC)
    randomize_norms(decoder)
    latent = torch.randn(2, 4, 4, 4, 6)
    with torch.no_grad():
        whole = decode_latent(decoder, latent)
        assert rel_err(decode_latent(decoder, latent, chunk_frames=chunk_frames), whole) <= 1e-5


def test_stream_cache_holds_every_causal_conv():
    encoder, _ = tiny_vae(10)
    stream = StreamCache()
    with torch.no_grad():
        encoder(torch.randn(1, 3, 4, 16, 24), stream)
    convs = [m for m in encoder.modules() if isinstance(m, CausalConv3d)]
    assert set(stream.conv) == set(convs)


@pytest.mark.parametrize("half", ["encoder", "decoder"])
def test_streamed_activations_are_chunk_sized(half):
    """Peak memory follows the chunk: no activation inside a streamed pass spans more frames than
    the chunk (encoder: 4 frames; decoder: 1 latent frame -> at most 4 video frames)."""
    encoder, decoder = tiny_vae(19, **NUMERIC)
    module = encoder if half == "encoder" else decoder
    frames = []
    for m in module.modules():
        m.register_forward_hook(lambda m, args, out: frames.append(
            (out[0] if isinstance(out, tuple) else out).shape[2]))
    with torch.no_grad():
        if half == "encoder":
            encode_video(encoder, torch.randn(1, 13, 3, 16, 24), chunk_frames=4)
        else:
            decode_latent(decoder, torch.randn(1, 4, 4, 4, 6), chunk_frames=1)
    assert frames and max(frames) == 4


def test_num_frames_sets_default_streaming():
    """Clips longer than num_frames stream in chunks (of 4 frames for num_frames=5): same result."""
    encoder, decoder = tiny_vae(11, **{**NUMERIC, "num_frames": 5})
    randomize_norms(encoder), randomize_norms(decoder)
    calls = []
    encoder.conv_in.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[2]))
    decoder.conv_in.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[2]))
    video = torch.randn(1, 13, 3, 16, 16)
    with torch.no_grad():
        latent = encode_video(encoder, video)
        assert calls == [4, 4, 4, 1]
        assert rel_err(latent, encode_video(encoder, video, chunk_frames=12)) <= 1e-5
        calls.clear()
        out = decode_latent(decoder, latent)  # latent_frames = 2
        assert calls == [2, 2]
        assert rel_err(out, decode_latent(decoder, latent, chunk_frames=4)) <= 1e-5


def test_sample_uses_mean_logvar_and_generator():
    encoder, _ = tiny_vae(12)
    video = torch.randn(1, 5, 3, 16, 8)
    with torch.no_grad():
        mean = encode_video(encoder, video)
        s1 = encode_video(encoder, video, sample=True, generator=torch.Generator().manual_seed(0))
        s2 = encode_video(encoder, video, sample=True, generator=torch.Generator().manual_seed(0))
        moments = encoder(video.transpose(1, 2)).transpose(1, 2)
    assert torch.equal(s1, s2) and not torch.allclose(s1, mean)
    logvar = moments[:, :, 4:]
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    assert rel_err(s1, mean + torch.exp(0.5 * logvar) * noise) <= 1e-6


# ---- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spatial,temporal", [(1, 1), (2, 2), (4, 1), (8, 4), (8, 2)])
def test_downsample_factors_shape_the_model(spatial, temporal):
    encoder, decoder = tiny_vae(13, spatial_downsample=spatial, temporal_downsample=temporal)
    count = lambda module, kind: sum(isinstance(m, kind) for m in module.modules())  # noqa: E731
    assert count(encoder, SpatialDownsample) == spatial.bit_length() - 1
    assert count(encoder, TemporalDownsample) == count(decoder, TemporalUpsample) == temporal.bit_length() - 1
    video = torch.randn(1, 9, 3, 8, 8)
    with torch.no_grad():
        latent = encode_video(encoder, video)
        assert latent.shape == (1, 8 // temporal + 1, 4, 8 // spatial, 8 // spatial)
        assert decode_latent(decoder, latent).shape == video.shape


def _signature(encoder, decoder):
    shapes = {name: tuple(p.shape) for half in (encoder, decoder) for name, p in half.state_dict().items()}
    return shapes, encoder.num_frames, decoder.latent_frames, encoder.backend


@pytest.mark.parametrize("option,value", [
    ("in_channels", 1), ("latent_channels", 8), ("num_frames", 9), ("spatial_downsample", 4),
    ("temporal_downsample", 2), ("base_channels", 16), ("backend", "auto"),
    ("channel_multipliers", (1, 2, 4, 4)), ("layers_per_block", 2),
])
def test_every_option_changes_the_model(option, value):
    base = _signature(*tiny_vae(14))
    changed = _signature(*tiny_vae(14, **{option: value}))
    assert changed != base


def test_backend_reaches_every_causal_conv_and_can_change():
    encoder, decoder = tiny_vae(15, backend="reference")
    other, _ = tiny_vae(15, backend="auto")
    assert encoder.state_dict().keys() == other.state_dict().keys()
    for half in (encoder, decoder):
        convs = [m for m in half.modules() if isinstance(m, CausalConv3d)]
        assert convs and all(c.backend == "reference" for c in convs)
        half.backend = "auto"
        assert half.backend == "auto" and all(c.backend == "auto" for c in convs)
        with pytest.raises(ValueError, match="backend='nope'"):
            half.backend = "nope"


def test_default_vae_trains_on_cpu():
    """build_vae() with the default backend: autograd records, so every causal conv takes the
    differentiable reference; gradients equal a backend="reference" VAE's."""
    encoder, decoder = tiny_vae(21, backend="auto")
    ref_encoder, ref_decoder = tiny_vae(21)
    video = torch.randn(1, 5, 3, 16, 16)
    for enc, dec in ((encoder, decoder), (ref_encoder, ref_decoder)):
        decode_latent(dec, encode_video(enc, video)).square().mean().backward()
    for ours, ref in ((encoder, ref_encoder), (decoder, ref_decoder)):
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert p.grad is not None and torch.equal(p.grad, q.grad), name


@pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension's causal conv is not built")
def test_cpp_backend_vae_matches_reference():
    """backend="cpp" == reference in float64 (same maths), and in float32 no worse than 2x the
    float32 reference's own error against float64 (the tiny VAE's per-frame norms amplify rounding)."""
    encoder, decoder = tiny_vae(16, **NUMERIC)
    randomize_norms(encoder), randomize_norms(decoder)
    video = torch.randn(1, 9, 3, 16, 24)
    with torch.no_grad():
        encoder64, decoder64 = copy.deepcopy(encoder).double(), copy.deepcopy(decoder).double()
        latent64 = encode_video(encoder64, video.double())
        out64 = decode_latent(decoder64, latent64)
        latent_ref = encode_video(encoder, video)
        out_ref = decode_latent(decoder, latent64.float())
        encoder.backend = decoder.backend = encoder64.backend = decoder64.backend = "cpp"
        assert rel_err(encode_video(encoder64, video.double(), chunk_frames=4), latent64) <= 1e-10
        assert rel_err(decode_latent(decoder64, latent64, chunk_frames=2), out64) <= 1e-10
        for chunk in (None, 4):
            latent = encode_video(encoder, video, chunk_frames=chunk)
            assert rel_err(latent, latent64) <= 2 * rel_err(latent_ref, latent64) + 1e-6
        for chunk in (None, 2):
            out = decode_latent(decoder, latent64.float(), chunk_frames=chunk)
            assert rel_err(out, out64) <= 2 * rel_err(out_ref, out64) + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_NATIVE or not cuda_available(), reason="the extension has no CUDA kernels")
@pytest.mark.parametrize("dtype,budget", [(torch.float32, 5e-3), (torch.bfloat16, 1e-2)])
def test_cuda_backend_vae_matches_reference(dtype, budget):
    """backend="cuda" against a float64 reference: within the dtype's budget (tf32 for float32) or
    2x the same-dtype reference's own error, whole and streamed."""
    encoder, decoder = tiny_vae(20, **NUMERIC)
    randomize_norms(encoder), randomize_norms(decoder)
    video = torch.randn(1, 9, 3, 16, 24, device="cuda")
    with torch.no_grad():
        encoder64, decoder64 = copy.deepcopy(encoder).cuda().double(), copy.deepcopy(decoder).cuda().double()
        latent64 = encode_video(encoder64, video.double())
        out64 = decode_latent(decoder64, latent64)
        encoder, decoder = encoder.cuda().to(dtype), decoder.cuda().to(dtype)
        latent_ref = encode_video(encoder, video.to(dtype))
        out_ref = decode_latent(decoder, latent64.to(dtype))
        encoder.backend = decoder.backend = "cuda"
        for chunk in (None, 4):
            latent = encode_video(encoder, video.to(dtype), chunk_frames=chunk)
            assert rel_err(latent, latent64) <= max(2 * rel_err(latent_ref, latent64), budget)
        for chunk in (None, 2):
            out = decode_latent(decoder, latent64.to(dtype), chunk_frames=chunk)
            assert rel_err(out, out64) <= max(2 * rel_err(out_ref, out64), budget)


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,kwargs,match", [
    ((1, 5, 4, 16, 24), {}, "C=4"),
    ((1, 10, 3, 16, 24), {}, "T=10"),
    ((1, 5, 3, 12, 24), {}, "12 x 24"),
    ((1, 5, 3, 16, 20), {}, "16 x 20"),
    ((5, 3, 16, 24), {}, "5-dim"),
    ((1, 5, 3, 16, 24), dict(chunk_frames=6), "chunk_frames=6"),
    ((1, 5, 3, 16, 24), dict(chunk_frames=0), "chunk_frames=0"),
])
def test_encode_errors(shape, kwargs, match):
    encoder, _ = tiny_vae(17)
    with pytest.raises(ValueError, match=match):
        encode_video(encoder, torch.randn(shape), **kwargs)


def test_decode_and_dtype_errors():
    encoder, decoder = tiny_vae(18)
    with pytest.raises(ValueError, match="C=3"):
        decode_latent(decoder, torch.randn(1, 2, 3, 2, 3))
    with pytest.raises(ValueError, match="chunk_frames=0"):
        decode_latent(decoder, torch.randn(1, 2, 4, 2, 3), chunk_frames=0)
    with pytest.raises(ValueError, match="float64"):
        encode_video(encoder, torch.randn(1, 1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="encode_video takes the Encoder .* got Decoder"):
        encode_video(decoder, torch.randn(1, 5, 3, 16, 24))
    with pytest.raises(ValueError, match="decode_latent takes the Decoder .* got Encoder"):
        decode_latent(encoder, torch.randn(1, 2, 4, 2, 3))
    with pytest.raises(ValueError, match="Encoder: x has dtype torch.bfloat16"):  # the module called directly
        encoder(torch.randn(1, 3, 5, 16, 24).bfloat16())
    with pytest.raises(ValueError, match="Decoder: z has C=3"):
        decoder(torch.randn(1, 3, 2, 2, 3))


@pytest.mark.parametrize("kwargs,match", [
    (dict(spatial_downsample=3), "spatial_downsample=3"),
    (dict(temporal_downsample=6), "temporal_downsample=6"),
    (dict(num_frames=10), "num_frames=10"),
    (dict(base_channels=0), "base_channels=0"),
    (dict(in_channels=2.0), "in_channels=2.0"),
    (dict(channel_multipliers=()), "channel_multipliers"),
    (dict(spatial_downsample=16), "spatial_downsample=16"),
    (dict(backend="fast"), "backend='fast'"),
])
def test_build_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_vae(**{**TINY, **kwargs})
