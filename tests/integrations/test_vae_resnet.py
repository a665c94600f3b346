"""``apply(vae)`` runs each diffusers ``CogVideoXResnetBlock3D`` as two ``vae_conv3d`` calls
(integrations/diffusers/resnet.py): equal to diffusers' own block and whole VAE (encoder with GroupNorm,
decoder with the spatial norm and zq) over diffusers' frame batches with the conv caches carried,
2 op calls per block per frame batch, removable bit for bit, copyable; diffusers' forward wherever the
fused op would not compute exactly what diffusers does (autograd, temb, dropout, other activations,
LoRA'd convs, hooks or forwards we do not know)."""
import copy

import pytest
import torch

from cogvideox_kernels import _ext

pytest.importorskip("diffusers")
diffusers_vae = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_cogvideox")
from helpers import copy_of  # noqa: E402
from tiny import OpSpy, make_vae, rel_err  # noqa: E402

from cogvideox_kernels.integrations import diffusers as integration  # noqa: E402
from cogvideox_kernels.integrations.diffusers.resnet import KernelResnetForward  # noqa: E402

BACKENDS = ["reference"] + (["cpp"] if _ext.extension_available() else [])
BUDGET = 1e-5
ENCODER_BLOCKS, DECODER_BLOCKS = 6, 10  # tiny.make_vae: 4 down x 1 + mid 2; 4 up x 2 + mid 2


def make_block(C_in, C_out, *, spatial_norm_dim=None, conv_shortcut=False, temb_channels=0, seed=0,
               device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    block = diffusers_vae.CogVideoXResnetBlock3D(C_in, C_out, temb_channels=temb_channels, groups=4, eps=1e-6,
                                                 conv_shortcut=conv_shortcut, spatial_norm_dim=spatial_norm_dim,
                                                 pad_mode="first")
    with torch.no_grad():  # non-trivial norm affine parameters
        for m in block.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return block.eval().to(device=device, dtype=dtype)


def compare_caches(ours, ref, budget):
    assert list(ours) == list(ref)  # diffusers' keys, in diffusers' order
    for key, value in ref.items():
        if isinstance(value, dict):
            compare_caches(ours[key], value, budget)
        elif value is None:
            assert ours[key] is None, key
        elif key in ("conv_y", "conv_b") and ours[key] is None:
            pass  # the spatial norm's (1,1,1) convs, fused into the op: their never-read "cache" (zq') dropped
        else:
            assert ours[key].shape == value.shape and rel_err(ours[key], value) <= budget, key


def run_batches(forward, x, zq, lengths, cache=None):
    """diffusers' frame-batch loop over one block: outputs and caches of each batch."""
    results, t0 = [], 0
    for n in lengths:
        zs = None if zq is None else zq[:, :, t0:t0 + n]
        with torch.no_grad():
            out, cache = forward(x[:, :, t0:t0 + n], zq=zs, conv_cache=cache)
        results.append((out, _snapshot(cache)))  # (a patched block consumes the caches it is handed)
        t0 += n
    return results


def _snapshot(cache):
    if isinstance(cache, dict):
        return {k: _snapshot(v) for k, v in cache.items()}
    return cache.clone() if torch.is_tensor(cache) else cache


BLOCKS = {  # name: (C_in, C_out, options)
    "groupnorm": (8, 8, {}),
    "groupnorm 1x1 shortcut": (8, 12, {}),
    "groupnorm causal conv shortcut": (8, 12, {"conv_shortcut": True}),
    "spatial norm": (8, 8, {"spatial_norm_dim": 4}),
    "spatial norm 1x1 shortcut": (8, 12, {"spatial_norm_dim": 4}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_matches_diffusers_over_frame_batches(backend, name, monkeypatch):
    C_in, C_out, options = BLOCKS[name]
    block = make_block(C_in, C_out, seed=1, **options)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, C_in, 5, 6, 7, generator=g) + 0.3
    zq = torch.randn(2, 4, 5, 3, 4, generator=g) if "spatial_norm_dim" in options else None
    ref = run_batches(block, x, zq, (3, 2))
    spy = OpSpy(monkeypatch)
    ours = run_batches(KernelResnetForward(block, backend), x, zq, (3, 2))
    assert len(spy.vae_conv_calls) == 4  # 2 per frame batch
    assert [kw.get("cache") is None for _, kw in spy.vae_conv_calls] == [True, True, False, False]
    # the spatial norm's modulation from zq inside the op (C++ / reference fuse it), never full-size tensors
    assert all((kw.get("zq") is not None) == (zq is not None) and kw.get("scale") is None
               for _, kw in spy.vae_conv_calls)
    for (out, cache), (ref_out, ref_cache) in zip(ours, ref):
        assert rel_err(out, ref_out) <= BUDGET
        compare_caches(cache, ref_cache, BUDGET)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["inputs", "zq", "cache"])
def test_block_takes_non_contiguous_views(backend, which):
    block = make_block(8, 12, spatial_norm_dim=4, conv_shortcut=True, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 8, 3, 6, 7, generator=g)
    zq = torch.randn(1, 4, 3, 3, 4, generator=g)
    with torch.no_grad():
        _, cache = block(torch.randn(1, 8, 2, 6, 7, generator=g), zq=zq[:, :, :2])
    if which == "inputs":  # a stepped slice
        x = torch.randn(1, 8, 3, 6, 14, generator=g)[..., ::2]
    elif which == "zq":  # transposed storage
        zq = torch.randn(1, 4, 3, 4, 3, generator=g).transpose(3, 4)
    else:  # channels_last_3d caches
        cache = {k: (v.to(memory_format=torch.channels_last_3d) if torch.is_tensor(v) else v)
                 for k, v in cache.items()}
    assert not {"inputs": x, "zq": zq, "cache": cache["conv1"]}[which].is_contiguous()
    with torch.no_grad():
        ref, ref_cache = block(x, zq=zq, conv_cache=cache)
        out, new_cache = KernelResnetForward(block, backend)(x, zq=zq, conv_cache=cache)
    assert rel_err(out, ref) <= BUDGET
    compare_caches(new_cache, ref_cache, BUDGET)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_in_frame_chunks_matches_diffusers(backend, name, monkeypatch):
    """Decoder batches above CHUNK_ABOVE: each fused line runs in frame chunks with the batch's GroupNorm
    statistics (norm_coef), the spatial norm's convs and the shortcut per chunk, caches chained: still
    diffusers' block over its frame batches, outputs and every cache entry (GroupNorm blocks: whole)."""
    from cogvideox_kernels.integrations.diffusers import resnet

    C_in, C_out, options = BLOCKS[name]
    block = make_block(C_in, C_out, seed=11, **options)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, C_in, 5, 6, 7, generator=g) + 0.3
    zq = torch.randn(2, 4, 5, 3, 4, generator=g) if "spatial_norm_dim" in options else None
    ref = run_batches(block, x, zq, (3, 2))
    monkeypatch.setattr(resnet, "CHUNK_ABOVE", 0)
    monkeypatch.setattr(resnet, "CHUNK_BYTES", 1)  # one frame per chunk
    spy = OpSpy(monkeypatch)
    ours = run_batches(KernelResnetForward(block, backend), x, zq, (3, 2))
    if zq is None:  # GroupNorm blocks (the encoder's) run their batches whole
        assert len(spy.vae_conv_calls) == 2 * 2
    else:
        assert len(spy.vae_conv_calls) == 2 * (3 + 2)  # one call per frame and line
        assert all(kw.get("norm_coef") is not None and kw.get("num_groups", 0) == 0 for _, kw in spy.vae_conv_calls)
    for (out, cache), (ref_out, ref_cache) in zip(ours, ref):
        assert rel_err(out, ref_out) <= BUDGET
        for key in ("norm1", "norm2"):  # the (1,1,1) convs' "cache" (their whole input, never read): None
            if key in ref_cache:
                assert cache[key] == {"conv_y": None, "conv_b": None}
                ref_cache[key] = cache[key]
        compare_caches(cache, ref_cache, BUDGET)


def test_consumed_cache_fails_loudly():
    """A patched block frees the caches it was handed (replaced by CONSUMED): handing them in again
    raises, in our forward and in diffusers' own, never a silent replicate padding."""
    from cogvideox_kernels.integrations.diffusers.resnet import CONSUMED

    block, x, zq = _spatial_block(seed=13)
    with torch.no_grad():
        _, cache = block(x, zq=zq)
        ref, _ = block(x, zq=zq, conv_cache=cache)  # diffusers reads and keeps the cache
        out, _ = KernelResnetForward(block, "reference")(x, zq=zq, conv_cache=cache)
    assert rel_err(out, ref) <= BUDGET
    assert cache["conv1"] is CONSUMED and cache["norm1"]["conv_y"] is CONSUMED
    with pytest.raises(ValueError, match="already used"), torch.no_grad():
        KernelResnetForward(block, "reference")(x, zq=zq, conv_cache=cache)
    with pytest.raises(TypeError), torch.no_grad():
        block(x, zq=zq, conv_cache=cache)


# ------------------------------------------------------------------------------------ whole VAE


def vae_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(1, 3, 17, 16, 24, generator=g)  # encoded in 2 frame batches (9, 8)
    latents = torch.randn(1, 4, 5, 2, 3, generator=g)  # decoded in 2 frame batches (3, 2)
    return video, latents


def encode_decode(vae, video, latents):
    with torch.no_grad():
        return vae.encode(video).latent_dist.mode(), vae.decode(latents).sample


@pytest.mark.parametrize("backend", BACKENDS)
def test_vae_decode_in_frame_chunks_matches_diffusers(backend, monkeypatch):
    """The whole tiny VAE with every frame batch above CHUNK_BYTES: ResNet lines and the decoder's
    norm_out in frame chunks (one per frame), caches consumed batch to batch, still diffusers' decode
    and encode."""
    from cogvideox_kernels.integrations.diffusers import resnet

    vae = make_vae()
    video, latents = vae_inputs()
    ref_z, ref_x = encode_decode(vae, video, latents)
    integration.apply(vae, backend=backend)
    norm_out = vae.decoder.norm_out.forward
    assert isinstance(norm_out, resnet.KernelSpatialNormForward)
    monkeypatch.setattr(resnet, "CHUNK_ABOVE", 0)
    monkeypatch.setattr(resnet, "CHUNK_BYTES", 1)
    spy = OpSpy(monkeypatch)
    chunks = []
    real = norm_out._ours
    monkeypatch.setattr(norm_out, "_ours", lambda f, *a: chunks.append(f.shape[2]) or real(f, *a))
    z, x = encode_decode(vae, video, latents)
    assert chunks == [9, 8]  # norm_out ran ours on both frame batches (9 and 8 frames)
    from cogvideox_kernels.integrations.diffusers.vae import KernelUpsampleForward

    ups = [b.upsamplers[0] for b in vae.decoder.up_blocks if b.upsamplers is not None]
    assert ups and all(isinstance(u.forward, KernelUpsampleForward) for u in ups)
    assert len(spy.vae_conv_calls) > 2 * (2 * ENCODER_BLOCKS + 2 * DECODER_BLOCKS)
    assert rel_err(z, ref_z) <= BUDGET and rel_err(x, ref_x) <= BUDGET
    integration.remove(vae)
    assert "forward" not in vae.decoder.norm_out.__dict__ and not any("forward" in u.__dict__ for u in ups)


@pytest.mark.parametrize("compress_time", [False, True])
@pytest.mark.parametrize("frames", [1, 2, 3, 4])
def test_upsampler_in_frame_chunks_equals_diffusers(compress_time, frames, monkeypatch):
    """diffusers' CogVideoXUpsample3D, patched: frame by frame into a contiguous output, each repeated
    frame through the conv once; the same values as diffusers' (permuted, whole-batch) output."""
    from diffusers.models.upsampling import CogVideoXUpsample3D

    from cogvideox_kernels.integrations.diffusers import resnet
    from cogvideox_kernels.integrations.diffusers.vae import KernelUpsampleForward

    torch.manual_seed(14)
    up = CogVideoXUpsample3D(6, 5, compress_time=compress_time).eval()
    x = torch.randn(2, 6, frames, 3, 4)
    with torch.no_grad():
        ref = up(x)
        monkeypatch.setattr(resnet, "CHUNK_BYTES", 1)
        convs = []
        up.conv.register_forward_hook(lambda m, args, out: convs.append(args[0].shape[0]))
        out = KernelUpsampleForward(up)(x)
    assert out.is_contiguous() and out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-6
    assert sum(convs) == 2 * frames  # each input frame once (B = 2), repeated output frames copied


def test_decoder_frees_the_up_block_input_after_the_shortcut(monkeypatch):
    """KernelDecoderForward hands each up block's input to its first ResNet block by ownership: a block
    that changes the channel count (tiny VAE: 32 -> 16 in up_blocks[2]) frees it once its shortcut is
    computed, before its second conv; the decode still equals diffusers'."""
    import weakref

    from cogvideox_kernels.integrations.diffusers import resnet

    vae = make_vae()
    _, latents = vae_inputs()
    with torch.no_grad():
        ref = vae.decode(latents).sample
    integration.apply(vae, backend="reference")
    assert isinstance(vae.decoder.forward, resnet.KernelDecoderForward)
    monkeypatch.setattr(resnet, "CHUNK_ABOVE", 0)
    monkeypatch.setattr(resnet, "CHUNK_BYTES", 1)
    inputs, alive = [], []
    real_up, real_conv = resnet.KernelDecoderForward._up_block, resnet.KernelResnetForward._conv

    def up_block(up, box, *args):
        inputs.append(weakref.ref(box[0]))
        return real_up(up, box, *args)

    def conv(self, x, norm, *args, **kwargs):
        block = self.block
        if norm is block.norm2 and block.in_channels != block.out_channels:
            alive.append(inputs[-1]() is not None)
        return real_conv(self, x, norm, *args, **kwargs)

    monkeypatch.setattr(resnet.KernelDecoderForward, "_up_block", staticmethod(up_block))
    monkeypatch.setattr(resnet.KernelResnetForward, "_conv", conv)
    with torch.no_grad():
        out = vae.decode(latents).sample
    assert alive and not any(alive)  # 2 frame batches x the projecting first blocks
    assert rel_err(out, ref) <= BUDGET
    integration.remove(vae)
    assert "forward" not in vae.decoder.__dict__


def test_norm_out_takes_diffusers_path_when_not_plain(monkeypatch):
    from cogvideox_kernels.integrations.diffusers import resnet

    vae = make_vae()
    _, latents = vae_inputs()
    with torch.no_grad():
        ref = vae.decode(latents).sample
    integration.apply(vae, backend="reference")
    monkeypatch.setattr(resnet, "CHUNK_ABOVE", 0)
    monkeypatch.setattr(resnet, "CHUNK_BYTES", 1)
    handle = vae.decoder.norm_out.norm_layer.register_forward_hook(lambda m, args, out: out * 1.5)
    calls = []
    monkeypatch.setattr(vae.decoder.norm_out.forward, "_ours", lambda *a: calls.append(1))
    with torch.no_grad():
        hooked = vae.decode(latents).sample
    assert not calls and rel_err(hooked, ref) > 1e-3  # diffusers' forward ran the hook
    handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_vae_encode_decode_match_diffusers(backend, monkeypatch):
    vae = make_vae()
    video, latents = vae_inputs()
    ref_z, ref_x = encode_decode(vae, video, latents)
    integration.apply(vae, backend=backend)
    assert integration.patch_report(vae)["vae_resnet"] == ENCODER_BLOCKS + DECODER_BLOCKS
    assert all(type(b) is diffusers_vae.CogVideoXResnetBlock3D for b in vae.modules()
               if isinstance(b, diffusers_vae.CogVideoXResnetBlock3D))  # no class swap
    spy = OpSpy(monkeypatch)
    with torch.no_grad():
        z = vae.encode(video).latent_dist.mode()
        encode_calls = list(spy.vae_conv_calls)
        x = vae.decode(latents).sample
    decode_calls = spy.vae_conv_calls[len(encode_calls):]
    assert len(encode_calls) == 2 * ENCODER_BLOCKS * 2 and len(decode_calls) == 2 * DECODER_BLOCKS * 2
    assert not any(kw.get("scale") is not None or kw.get("zq") is not None for _, kw in encode_calls)  # GroupNorm
    assert all(kw.get("zq") is not None for _, kw in decode_calls)  # spatial norm, modulation fused
    assert sum(kw.get("cache") is not None for _, kw in decode_calls) == 2 * DECODER_BLOCKS  # 2nd batch
    assert rel_err(z, ref_z) <= BUDGET and rel_err(x, ref_x) <= BUDGET
    integration.remove(vae)
    assert integration.patch_report(vae)["vae_resnet"] == 0
    assert not any("forward" in m.__dict__ for m in vae.modules())
    again_z, again_x = encode_decode(vae, video, latents)
    assert torch.equal(again_z, ref_z) and torch.equal(again_x, ref_x)


def test_uncovered_block_keeps_diffusers_forward(monkeypatch):
    vae = make_vae()
    vae.decoder.mid_block.resnets[0].nonlinearity = torch.nn.GELU()  # not what the op fuses
    _, latents = vae_inputs()
    _, ref = encode_decode(vae, *vae_inputs())
    integration.apply(vae, backend="reference")
    assert integration.patch_report(vae)["vae_resnet"] == ENCODER_BLOCKS + DECODER_BLOCKS - 1
    spy = OpSpy(monkeypatch)
    with torch.no_grad():
        out = vae.decode(latents).sample
    assert len(spy.vae_conv_calls) == 2 * (DECODER_BLOCKS - 1) * 2 and rel_err(out, ref) <= BUDGET


@pytest.mark.parametrize("how", ["deepcopy", "torch_save"])
def test_copies_are_patched_and_removable(how, monkeypatch):
    vae = make_vae()
    video, latents = vae_inputs()
    ref_z, ref_x = encode_decode(vae, video, latents)
    integration.apply(vae, backend="reference")
    copied = copy_of(vae, how)
    assert integration.patch_report(copied)["vae_resnet"] == ENCODER_BLOCKS + DECODER_BLOCKS
    blocks = [m for m in copied.modules() if isinstance(m, diffusers_vae.CogVideoXResnetBlock3D)]
    assert all(b.forward.block is b for b in blocks)  # the copy's forward runs the copy
    spy = OpSpy(monkeypatch)
    z, x = encode_decode(copied, video, latents)
    assert len(spy.vae_conv_calls) == 2 * (2 * ENCODER_BLOCKS + 2 * DECODER_BLOCKS)
    assert rel_err(z, ref_z) <= BUDGET and rel_err(x, ref_x) <= BUDGET
    integration.remove(copied)
    assert integration.patch_report(copied)["vae_resnet"] == 0
    assert integration.patch_report(vae)["vae_resnet"] == ENCODER_BLOCKS + DECODER_BLOCKS
    assert torch.equal(encode_decode(copied, video, latents)[1], ref_x)


# ------------------------------------------------------------------------------ diffusers' path


def test_autograd_takes_diffusers_path(monkeypatch):
    vae = make_vae().requires_grad_(True)
    _, latents = vae_inputs()
    ref = vae.decode(latents).sample
    integration.apply(vae, backend="reference")
    spy = OpSpy(monkeypatch)
    out = vae.decode(latents).sample
    assert not spy.vae_conv_calls and torch.equal(out, ref)
    out.square().mean().backward()
    assert vae.decoder.up_blocks[0].resnets[0].conv1.conv.weight.grad is not None
    vae.requires_grad_(False)
    latents.requires_grad_(True)  # gradient wrt the latents only (guidance-style)
    out = vae.decode(latents).sample
    assert not spy.vae_conv_calls and torch.equal(out.detach(), ref.detach())
    with torch.no_grad():
        vae.decode(latents)
    assert len(spy.vae_conv_calls) == 2 * DECODER_BLOCKS * 2


def _spatial_block(seed=5, **options):
    block = make_block(8, 12, spatial_norm_dim=4, seed=seed, **options)
    g = torch.Generator().manual_seed(seed)
    return block, torch.randn(1, 8, 3, 6, 7, generator=g), torch.randn(1, 4, 3, 3, 4, generator=g)


def _falls_back(block, monkeypatch, *args, **kwargs):
    """The patched forward equals diffusers' and made no op call."""
    torch.manual_seed(0)
    with torch.no_grad():
        ref = type(block).forward(block, *args, **kwargs)[0]
    spy = OpSpy(monkeypatch)
    torch.manual_seed(0)
    with torch.no_grad():
        out = KernelResnetForward(block, "reference")(*args, **kwargs)[0]
    assert not spy.vae_conv_calls
    assert torch.equal(out, ref)
    return out


def test_temb_takes_diffusers_path(monkeypatch):
    block, x, zq = _spatial_block(temb_channels=6)
    temb = torch.randn(1, 6)
    out = _falls_back(block, monkeypatch, x, temb, zq)
    with torch.no_grad():
        assert rel_err(out, block(x, None, zq)[0]) > 1e-3  # temb mattered


def test_active_dropout_takes_diffusers_path(monkeypatch):
    block, x, zq = _spatial_block()
    block.dropout.p = 0.5
    block.train()
    _falls_back(block, monkeypatch, x, None, zq)


def test_activation_swapped_after_apply_takes_diffusers_path(monkeypatch):
    block, x, zq = _spatial_block()
    block.nonlinearity = torch.nn.GELU()
    _falls_back(block, monkeypatch, x, None, zq)


def test_unknown_hook_or_forward_takes_diffusers_path(monkeypatch):
    block, x, zq = _spatial_block()
    handle = block.norm2.norm_layer.register_forward_hook(lambda m, args, out: out * 1.5)
    _falls_back(block, monkeypatch, x, None, zq)
    handle.remove()
    conv2_forward = block.conv2.forward
    block.conv2.forward = lambda inputs, conv_cache=None: tuple(
        o * 0.5 if torch.is_tensor(o) and o.shape[2] == inputs.shape[2] else o
        for o in conv2_forward(inputs, conv_cache))
    _falls_back(block, monkeypatch, x, None, zq)


def test_lora_on_a_conv_takes_diffusers_path_for_that_block(monkeypatch):
    pytest.importorskip("peft")
    from peft import LoraConfig, inject_adapter_in_model

    target = "decoder.mid_block.resnets.0.conv1.conv"

    def lora_vae():
        vae = make_vae()
        torch.manual_seed(7)
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=[target], init_lora_weights=False), vae)
        return vae.eval()

    _, latents = vae_inputs()
    with torch.no_grad():
        ref = lora_vae().decode(latents).sample
        assert rel_err(ref, make_vae().decode(latents).sample) > 1e-4  # the LoRA matters
    for order in ("lora_then_apply", "apply_then_lora"):
        if order == "lora_then_apply":
            vae = lora_vae()
            integration.apply(vae, backend="reference")
        else:
            vae = make_vae()
            integration.apply(vae, backend="reference")
            torch.manual_seed(7)
            inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=[target],
                                               init_lora_weights=False), vae)
        spy = OpSpy(monkeypatch)
        with torch.no_grad():
            out = vae.decode(latents).sample
        assert len(spy.vae_conv_calls) == 2 * (DECODER_BLOCKS - 1) * 2, order
        assert rel_err(out, ref) <= BUDGET, order


# ------------------------------------------------- the spatial norm's modulation fused (zq= in the op)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["hook on conv_y", "conv_b replaced", "LoRA on conv_y"])
def test_spatial_convs_not_plain_are_module_calls(backend, how, monkeypatch):
    """conv_y / conv_b with an unknown hook, a replaced forward or a LoRA adapter are not fused: they run as
    modules (hook, forward, adapter included) and the op gets their outputs as scale / shift; still
    diffusers' block."""
    block, x, zq = _spatial_block(seed=21)
    if how == "hook on conv_y":
        block.norm1.conv_y.register_forward_pre_hook(lambda m, args: (args[0] * 1.5,))
    elif how == "conv_b replaced":
        real = block.norm2.conv_b.forward
        block.norm2.conv_b.forward = lambda inputs, conv_cache=None: (real(inputs, conv_cache)[0] - 0.25, None)
    else:
        pytest.importorskip("peft")
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(7)
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["norm1.conv_y.conv"],
                                           init_lora_weights=False), block)
        assert type(block.norm1.conv_y.conv).__module__.startswith("peft")
    with torch.no_grad():
        ref, _ = block(x, zq=zq)
        spy = OpSpy(monkeypatch)
        out, _ = KernelResnetForward(block, backend)(x, zq=zq)
    assert len(spy.vae_conv_calls) == 2
    fused = [kw.get("zq") is not None for _, kw in spy.vae_conv_calls]
    assert fused == ([True, False] if how == "conv_b replaced" else [False, True])
    assert rel_err(out, ref) <= BUDGET


def test_fused_modulation_switch_for_cuda(monkeypatch):
    """The CUDA kernel's fused modulation runs by default and not when switched off ("0");
    the C++ path and the reference always fuse."""
    from cogvideox_kernels.ops.vae_conv import native

    block, x, zq = _spatial_block(seed=22)
    fwd = KernelResnetForward(block, "reference")
    monkeypatch.delenv(native.FUSED_MODULATION_CUDA_ENV, raising=False)
    assert fwd._fused_modulation_index(block.norm1, x, zq) is not None
    fwd.backend = "cuda"  # (what the switch decides; nothing runs here)
    assert native.fused_modulation_cuda() and fwd._fused_modulation_index(block.norm1, x, zq) is not None
    monkeypatch.setenv(native.FUSED_MODULATION_CUDA_ENV, "0")
    assert not native.fused_modulation_cuda() and fwd._fused_modulation_index(block.norm1, x, zq) is None
    fwd.backend = "reference"
    assert fwd._fused_modulation_index(block.norm1, x, zq) is not None
    monkeypatch.setenv(native.FUSED_MODULATION_CUDA_ENV, "1")
    fwd.backend = "cuda"
    assert native.fused_modulation_cuda() and fwd._fused_modulation_index(block.norm1, x, zq) is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_modulation_sees_in_place_weight_updates(backend):
    """The fused path reads conv_y / conv_b's weights at each call (nothing stale after fuse_lora-style
    in-place updates)."""
    block, x, zq = _spatial_block(seed=23)
    fwd = KernelResnetForward(block, backend)
    with torch.no_grad():
        before, _ = fwd(x, zq=zq)
        block.norm1.conv_y.conv.weight.add_(0.5)
        block.norm2.conv_b.conv.bias.sub_(0.5)
        ref, _ = block(x, zq=zq)
        out, _ = fwd(x, zq=zq)
    assert rel_err(out, ref) <= BUDGET and rel_err(before, ref) > 1e-3


# ------------------------------------------------------------------------------------------ GPU

@pytest.mark.parametrize("spatial", [False, True, "fused"])
@pytest.mark.gpu
@pytest.mark.skipif(not _ext.cuda_available(), reason="extension built without CUDA")
def test_cuda_block_bf16_within_diffusers_own_error(spatial, monkeypatch):
    """bf16 through the CUDA kernel vs diffusers' own bf16 forward, both against diffusers in float32:
    ours no worse than 1.25x diffusers' own bf16 error. "fused": the spatial norm's modulation computed in
    the kernel's activation pass (the default; COGVIDEOX_KERNELS_VAE_FUSED_MODULATION_CUDA=0 turns it
    off), also within 1e-2 of the unfused kernel path."""
    from cogvideox_kernels.ops.vae_conv import native

    monkeypatch.setenv(native.FUSED_MODULATION_CUDA_ENV, "1" if spatial == "fused" else "0")
    block32 = make_block(128, 128, spatial_norm_dim=16 if spatial else None, seed=4, device="cuda")
    block16 = make_block(128, 128, spatial_norm_dim=16 if spatial else None, seed=4, device="cuda",
                         dtype=torch.bfloat16)
    x = torch.randn(1, 128, 3, 40, 60, device="cuda")
    zq = torch.randn(1, 16, 3, 10, 15, device="cuda") if spatial else None
    with torch.no_grad():
        ref, _ = block32(x, zq=zq)
        own, _ = block16(x.bfloat16(), zq=None if zq is None else zq.bfloat16())
        spy = OpSpy(monkeypatch)
        ours, _ = KernelResnetForward(block16, "cuda")(x.bfloat16(), zq=None if zq is None else zq.bfloat16())
        assert all((kw.get("zq") is not None) == (spatial == "fused") for _, kw in spy.vae_conv_calls)
        if spatial == "fused":
            monkeypatch.setenv(native.FUSED_MODULATION_CUDA_ENV, "0")
            unfused, _ = KernelResnetForward(block16, "cuda")(x.bfloat16(), zq=zq.bfloat16())
            assert rel_err(ours, unfused) <= 1e-2
    assert rel_err(ours, ref) <= 1.25 * rel_err(own, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not _ext.cuda_available(), reason="extension built without CUDA")
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_modulation"])
def test_cuda_5b_vae_bf16_patched_within_2x_diffusers_error(monkeypatch, chunked, fused):
    """The CogVideoX-5B VAE config (diffusers' defaults) in bf16 on the GPU, apply(vae) with 'auto':
    every ResNet block runs our CUDA kernel (2 calls per block; ``chunked``: frame chunks of one frame
    wherever a frame is above 256 KiB, the CUDA statistics pass first), decode and encode within 2x
    diffusers' own bf16 error against a float32 run of the same weights."""
    from diffusers import AutoencoderKLCogVideoX

    from cogvideox_kernels.integrations.diffusers import resnet
    from cogvideox_kernels.ops.vae_conv import native

    monkeypatch.setenv(native.FUSED_MODULATION_CUDA_ENV, "1" if fused else "0")
    if chunked:
        monkeypatch.setattr(resnet, "CHUNK_ABOVE", 0)
        monkeypatch.setattr(resnet, "CHUNK_BYTES", 256 << 10)

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae32 = AutoencoderKLCogVideoX().eval().requires_grad_(False)
    vae16 = copy.deepcopy(vae32).to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(1)
    latents = torch.randn(1, 16, 3, 8, 12, device="cuda", generator=g)  # one decoder frame batch
    video = torch.rand(1, 3, 9, 64, 96, device="cuda", generator=g) * 2 - 1  # one encoder frame batch
    with torch.no_grad():
        ref_x, ref_z = vae32.decode(latents).sample, vae32.encode(video).latent_dist.mode()
        own_x = vae16.decode(latents.bfloat16()).sample
        own_z = vae16.encode(video.bfloat16()).latent_dist.mode()
        integration.apply(vae16)
        assert integration.patch_report(vae16)["vae_resnet"] == 32
        spy = OpSpy(monkeypatch)
        ours_x = vae16.decode(latents.bfloat16()).sample
        assert len(spy.vae_conv_calls) == 2 * 18 or chunked and len(spy.vae_conv_calls) > 2 * 18
        assert all((kw.get("zq") is not None) == fused for _, kw in spy.vae_conv_calls)
        n = len(spy.vae_conv_calls)
        ours_z = vae16.encode(video.bfloat16()).latent_dist.mode()
        assert len(spy.vae_conv_calls) - n == 2 * 14  # (the encoder never chunks)
    for ours, own, ref in ((ours_x, own_x, ref_x), (ours_z, own_z, ref_z)):
        assert rel_err(ours, ref) <= 2 * rel_err(own, ref), (rel_err(ours, ref), rel_err(own, ref))


@pytest.mark.gpu
@pytest.mark.skipif(not _ext.cuda_available(), reason="extension built without CUDA")
def test_cuda_decode_packs_weights_once(monkeypatch):
    """The CUDA kernel's packed weights are cached per weight version: a second decode packs nothing and
    gives the same output; an in-place weight update repacks that weight; the cache cleared (per-call
    packing as before) gives the same output (1e-6: cuDNN's convs around ours need not be bitwise
    deterministic)."""
    from diffusers import AutoencoderKLCogVideoX

    from cogvideox_kernels.ops.vae_conv import native

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLCogVideoX().eval().requires_grad_(False).to(torch.bfloat16)
    integration.apply(vae)
    latents = torch.randn(1, 16, 3, 8, 12, device="cuda", dtype=torch.bfloat16)
    native.PACKED.clear()
    with torch.no_grad():
        first = vae.decode(latents).sample
        packed = native.PACKED.quantizations
        assert len(native.PACKED) == 2 * 18  # conv1 and conv2 of the decoder's 18 ResNet blocks
        second = vae.decode(latents).sample
        assert native.PACKED.quantizations == packed and rel_err(second, first) <= 1e-6
        vae.decoder.mid_block.resnets[0].conv1.conv.weight.mul_(1.5)  # in place: version bumped
        changed = vae.decode(latents).sample
        assert native.PACKED.quantizations == packed + 1 and rel_err(changed, first) > 1e-3
        native.PACKED.clear()
        assert rel_err(vae.decode(latents).sample, changed) <= 1e-6
