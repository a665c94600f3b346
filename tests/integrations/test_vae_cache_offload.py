"""``apply(vae, vae_cache="host")``: the decoder's conv caches wait in host memory between frame batches
(integrations/diffusers/cache_offload.py), the output bit for bit the output with the caches on the device;
each offloaded cache read once; diffusers' forward never sees a HostCache. Also the decoder's other memory
rules: a ResNet block handed an exclusive input writes its output over it (frame chunks), and a chunked line
frees the batch's conv cache after its first chunk.

On the CPU the device <-> host copies are replaced by clones (``_streams``) and CPU tensors count as
offloadable (``offload_device``): that checks the decoder's bookkeeping; the CUDA streams are checked on the GPU
(marker gpu)."""
import pytest
import torch

from cogvideox_kernels import _ext

pytest.importorskip("diffusers")
from tiny import make_vae, rel_err  # noqa: E402

from cogvideox_kernels.integrations import diffusers as integration  # noqa: E402
from cogvideox_kernels.integrations.diffusers import cache_offload, resnet  # noqa: E402

BACKENDS = ["reference"] + (["cpp"] if _ext.extension_available() else [])


class CloneStreams:
    """CPU stand-in of cache_offload._Streams: copies are clones, and every copy is recorded."""

    def __init__(self):
        self.log = []

    def store(self, t):
        self.log.append(("store", tuple(t.shape)))
        return cache_offload.HostCache(t.clone(), tuple(t.shape), t.dtype, t.device, None)

    def load(self, hc):
        self.log.append(("load", hc.shape))
        return hc.host.clone(), None


@pytest.fixture
def cpu_offload(monkeypatch):
    streams = CloneStreams()
    monkeypatch.setattr(cache_offload, "_streams", lambda device: streams)
    monkeypatch.setattr(cache_offload, "offload_device", lambda device: True)
    monkeypatch.setattr(cache_offload, "MIN_BYTES", 0)
    return streams


def vae_latents(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 5, 8, 12, generator=g)  # 5 latent frames: diffusers' decode in 2 frame batches


def decode(vae, latents):
    with torch.no_grad():
        return vae.decode(latents).sample


def leaves(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in leaves(v)]
    return [tree]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_host_caches_decode_bit_identical(backend, chunked, cpu_offload, monkeypatch):
    vae = make_vae()
    latents = vae_latents()
    with torch.no_grad():
        ref = vae.decode(latents).sample
    if chunked:
        monkeypatch.setattr(resnet, "CHUNK_ABOVE", 0)
        monkeypatch.setattr(resnet, "CHUNK_BYTES", 1)
    integration.apply(vae, backend=backend)
    device_out = decode(vae, latents)
    integration.remove(vae)
    assert not cpu_offload.log  # (vae_cache="device": nothing copied)
    integration.apply(vae, backend=backend, vae_cache="host")
    host_out = decode(vae, latents)
    assert torch.equal(host_out, device_out)
    assert rel_err(host_out, ref) <= 1e-5
    stores = [e for e in cpu_offload.log if e[0] == "store"]
    loads = [e for e in cpu_offload.log if e[0] == "load"]
    assert stores and loads and len(loads) <= len(stores)
    integration.remove(vae)


def test_decoder_returns_host_caches_read_once(cpu_offload):
    vae = make_vae()
    integration.apply(vae, backend="reference", vae_cache="host")
    z = vae_latents()[:, :, :2]
    dec = vae.decoder
    with torch.no_grad():
        _, cache = dec(z)
        kinds = {type(x) for x in leaves(cache)}
        assert cache_offload.HostCache in kinds and torch.Tensor not in kinds  # (MIN_BYTES 0: all of them)
        out1, cache2 = dec(z[:, :, 1:], conv_cache=cache)
        assert all(isinstance(x, (cache_offload.HostCache, type(None))) for x in leaves(cache2))
        spent = [x for x in leaves(cache) if isinstance(x, cache_offload.HostCache)]
        assert spent and all(x.loaded == (None, None) for x in spent)
        with pytest.raises(ValueError, match="read once|already used"):
            dec(z[:, :, 1:], conv_cache=cache)
    integration.remove(vae)
    with torch.no_grad():  # the same batches with diffusers' own decoder and caches
        _, ref_cache = dec(z)
        ref1, _ = dec(z[:, :, 1:], conv_cache=ref_cache)
    assert rel_err(out1, ref1) <= 1e-5


def test_copies_scheduled_around_each_resnet_blocks_first_conv(cpu_offload, monkeypatch):
    """A ResNet block of an up block starts with its own caches loaded (their copies issued while the stage
    before it ran); after its first conv the first conv's new cache goes to the host and the next stage's copies
    are issued (not at the block's start: the next stage's device buffers would add to the first conv's peak)."""
    vae = make_vae()
    integration.apply(vae, backend="reference", vae_cache="host")
    z = vae_latents()[:, :, :2]
    dec = vae.decoder
    seen = []  # (loads at the block's start, loads / stores after its first conv, stores at the start)
    real = resnet.KernelResnetForward.owned
    count = lambda kind: len([e for e in cpu_offload.log if e[0] == kind])  # noqa: E731

    def owned(self, box, temb=None, zq=None, conv_cache=None, exclusive=False, after_first_conv=None):
        if after_first_conv is None:  # (the mid block's ResNet blocks: module calls)
            return real(self, box, temb, zq, conv_cache, exclusive)
        start = (count("load"), count("store"))

        def mid(new_cache):
            assert new_cache and all(isinstance(v, torch.Tensor) for v in leaves(new_cache) if v is not None)
            before = count("load")
            after_first_conv(new_cache)
            assert all(isinstance(v, cache_offload.HostCache) for v in leaves(new_cache) if v is not None)
            seen.append((start[0], before, count("load"), start[1], count("store")))

        return real(self, box, temb, zq, conv_cache, exclusive, mid)

    monkeypatch.setattr(resnet.KernelResnetForward, "owned", owned)
    with torch.no_grad():
        _, cache = dec(z)
        assert not [e for e in cpu_offload.log if e[0] == "load"] and len(seen) == sum(
            len(up.resnets) for up in dec.up_blocks)
        assert all(stores_after > stores_start for *_, stores_start, stores_after in seen)
        seen.clear()
        dec(z[:, :, 1:], conv_cache=cache)
    n = sum(len(up.resnets) for up in dec.up_blocks)
    assert len(seen) == n
    for k, (at_start, before, after, _, _) in enumerate(seen):
        assert before == at_start  # nothing issued between the block's start and its first conv's end
        if k + 1 < n:  # (after the last block: norm_out, whose caches are none)
            assert after > before  # the next block's copies issued here ...
            assert seen[k + 1][0] == after  # ... all of them, before it started
    integration.remove(vae)


def test_autograd_brings_host_caches_back(cpu_offload):
    """diffusers' own forward (here: under autograd) gets device tensors, never a HostCache."""
    vae = make_vae()
    integration.apply(vae, backend="reference", vae_cache="host")
    z = vae_latents()[:, :, :2]
    dec = vae.decoder
    with torch.no_grad():
        _, cache = dec(z)
    out, _ = dec(z[:, :, 1:].requires_grad_(True), conv_cache=cache)
    out.sum().backward()
    integration.remove(vae)
    with torch.no_grad():
        _, ref_cache = dec(z)
        ref, _ = dec(z[:, :, 1:], conv_cache=ref_cache)
    assert rel_err(out.detach(), ref) <= 1e-5


def test_vae_cache_option_checked():
    vae = make_vae()
    with pytest.raises(ValueError, match="vae_cache"):
        integration.apply(vae, backend="reference", vae_cache="disk")
    integration.apply(vae, backend="reference", vae_cache="host")
    assert vae.decoder.forward.cache == "host"
    with pytest.raises(ValueError, match="already patched"):
        integration.apply(vae, backend="reference")
    integration.remove(vae)
    with pytest.raises(ValueError, match="vae_cache"):
        resnet.KernelDecoderForward(vae.decoder, "disk")


def test_host_cache_on_cpu_tensors_changes_nothing():
    """Without the stand-ins CPU caches are not offloaded (they are host memory already)."""
    vae = make_vae()
    integration.apply(vae, backend="reference", vae_cache="host")
    with torch.no_grad():
        _, cache = vae.decoder(vae_latents()[:, :, :2])
    assert not any(isinstance(x, cache_offload.HostCache) for x in leaves(cache))
    integration.remove(vae)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusive_input_is_written_over(backend, monkeypatch):
    """In the decoder, ResNet blocks after the first of an up block take the previous block's output as an
    exclusive input: with frame chunks, a block that keeps the channel count writes its output into the
    input's memory; the decode still equals diffusers'. A block called as a module never does."""
    vae = make_vae()
    latents = vae_latents()
    ref = decode(vae, latents)
    monkeypatch.setattr(resnet, "CHUNK_ABOVE", 0)
    monkeypatch.setattr(resnet, "CHUNK_BYTES", 1)
    integration.apply(vae, backend=backend)
    written_over, flags = [], []
    real = resnet.KernelResnetForward.owned

    def owned(self, box, temb=None, zq=None, conv_cache=None, exclusive=False, after_first_conv=None):
        flags.append(exclusive)
        if exclusive:  # (the caller's only reference: compare addresses)
            ptr = box[0].data_ptr()
            out = real(self, box, temb, zq, conv_cache, exclusive, after_first_conv)
            written_over.append(out[0].data_ptr() == ptr)
            return out
        # not exclusive: the input keeps its values (held here, so that its memory cannot be reused either)
        x, keep = box[0], box[0].clone()
        out = real(self, box, temb, zq, conv_cache, exclusive, after_first_conv)
        assert torch.equal(x, keep) and out[0].data_ptr() != x.data_ptr()
        return out

    monkeypatch.setattr(resnet.KernelResnetForward, "owned", owned)
    out = decode(vae, latents)
    assert rel_err(out, ref) <= 1e-5
    assert any(flags) and not all(flags)
    assert any(written_over)
    # a module call: the caller's tensor is left alone
    block = vae.decoder.up_blocks[0].resnets[1]
    x = torch.randn(1, block.in_channels, 3, 4, 6)
    zq = torch.randn(1, 4, 3, 2, 3)
    keep = x.clone()
    with torch.no_grad():
        block(x, zq=zq)
    assert torch.equal(x, keep)
    integration.remove(vae)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_line_frees_the_batch_cache_after_its_first_chunk(backend, monkeypatch):
    """A chunked line reads the batch's conv cache in its first chunk only, and frees it then (the dict entry is
    CONSUMED before the block's second line runs); the block still equals diffusers'."""
    from test_vae_resnet import BLOCKS, make_block

    C_in, C_out, opts = BLOCKS["spatial norm"]  # (only the decoder's lines, with the spatial norm, chunk)
    block = make_block(C_in, C_out, **opts)
    monkeypatch.setattr(resnet, "CHUNK_ABOVE", 0)
    monkeypatch.setattr(resnet, "CHUNK_BYTES", 1)
    fwd = resnet.KernelResnetForward(block, backend)
    x = torch.randn(1, C_in, 3, 4, 6)
    zq = torch.randn(1, 4, 3, 2, 3)
    with torch.no_grad():
        _, cache = fwd(x[:, :, :1], zq=zq[:, :, :1])
        states = []
        real = resnet.KernelResnetForward._conv

        def conv(self, xx, norm, conv_mod, zq, c, new_cache, key, *a, **k):
            if key == "norm2":
                states.append(c.get("conv1") is resnet.CONSUMED)
            return real(self, xx, norm, conv_mod, zq, c, new_cache, key, *a, **k)

        monkeypatch.setattr(resnet.KernelResnetForward, "_conv", conv)
        out, _ = fwd(x[:, :, 1:], zq=zq[:, :, 1:], conv_cache=cache)
    assert states == [True]  # consumed before the second line ran
    with torch.no_grad():
        _, ref_cache = block(x[:, :, :1], zq=zq[:, :, :1])
        ref, _ = block(x[:, :, 1:], zq=zq[:, :, 1:], conv_cache=ref_cache)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not _ext.cuda_available(), reason="extension built without CUDA")
def test_cuda_host_caches_bit_identical_and_smaller(monkeypatch):
    """The 5B VAE config in bf16 on the GPU over 3 frame batches: with vae_cache="host" (every cache offloaded:
    MIN_BYTES 0) the decode is bit for bit the decode with the caches on the device (cuDNN deterministic),
    a second decode pins nothing new (the last batch's never-read caches gave their buffers back), the pool holds
    the buffers afterwards, and release() empties it."""
    from diffusers import AutoencoderKLCogVideoX

    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    monkeypatch.setattr(cache_offload, "MIN_BYTES", 0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLCogVideoX().eval().requires_grad_(False).to(torch.bfloat16)
    latents = torch.randn(1, 16, 7, 16, 24, device="cuda", dtype=torch.bfloat16)
    integration.apply(vae)
    a = decode(vae, latents)
    b = decode(vae, latents)
    assert torch.equal(a, b)  # (deterministic)
    integration.remove(vae)
    integration.apply(vae, vae_cache="host")
    c = decode(vae, latents)
    made = cache_offload.made_bytes()
    d = decode(vae, latents)  # (a second decode: the pool's buffers reused, none pinned anew)
    torch.cuda.synchronize()
    assert made > 0 and cache_offload.made_bytes() == made
    assert (c - a).abs().max().item() == 0, (c - a).abs().max().item()
    assert torch.equal(d, a)
    assert cache_offload.pooled_bytes() > 0
    cache_offload.release()
    assert cache_offload.pooled_bytes() == 0
    integration.remove(vae)
