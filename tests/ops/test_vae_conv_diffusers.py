"""``resnet_block_forward`` runs a diffusers CogVideoXResnetBlock3D (encoder style with GroupNorm,
decoder style with the spatial norm and zq) through ``vae_conv3d`` and equals the block's own
forward, conv caches included, over diffusers-style frame batches."""
import pytest
import torch

from cogvideox_kernels import _ext
from cogvideox_kernels.ops.vae_conv.resnet import resnet_block_forward

diffusers_vae = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_cogvideox")

BACKENDS = ["reference"] + (["cpp"] if _ext.extension_available() else [])


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def make_block(C_in, C_out, *, spatial_norm_dim=None, conv_shortcut=False, seed=0, device="cpu",
               dtype=torch.float32):
    torch.manual_seed(seed)
    block = diffusers_vae.CogVideoXResnetBlock3D(C_in, C_out, temb_channels=0, groups=4, eps=1e-6,
                                                 conv_shortcut=conv_shortcut, spatial_norm_dim=spatial_norm_dim,
                                                 pad_mode="first")
    with torch.no_grad():  # non-trivial norm affine parameters
        for m in block.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return block.eval().to(device=device, dtype=dtype)


def compare_over_batches(block, x, zq, lengths, backend, budget):
    """Run diffusers' frame-batch loop (caches carried) through both forwards."""
    cache_ref = cache_ours = None
    t0 = 0
    for n in lengths:
        xs = x[:, :, t0:t0 + n]
        zs = None if zq is None else zq[:, :, t0:t0 + n]
        with torch.no_grad():
            ref, cache_ref_new = block(xs, zq=zs, conv_cache=cache_ref)
            ours, cache_ours_new = resnet_block_forward(block, xs, zq=zs, conv_cache=cache_ours, backend=backend)
        assert rel_err(ours, ref) <= budget
        assert set(cache_ours_new) == set(cache_ref_new)
        for key, value in cache_ref_new.items():
            if isinstance(value, dict):
                for k2, v2 in value.items():
                    assert (v2 is None) == (cache_ours_new[key][k2] is None)
                    if v2 is not None:
                        assert rel_err(cache_ours_new[key][k2], v2) <= budget
            elif value is not None:
                assert rel_err(cache_ours_new[key], value) <= budget, key
        cache_ref, cache_ours = cache_ref_new, cache_ours_new
        t0 += n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C_in, C_out, conv_shortcut", [(8, 8, False), (8, 12, False), (8, 12, True)])
def test_encoder_block_matches_diffusers(backend, C_in, C_out, conv_shortcut):
    block = make_block(C_in, C_out, conv_shortcut=conv_shortcut, seed=1)
    x = torch.randn(1, C_in, 5, 6, 7) + 0.3
    compare_over_batches(block, x, None, (3, 2), backend, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_block_with_spatial_norm_matches_diffusers(backend):
    block = make_block(8, 8, spatial_norm_dim=4, seed=2)
    x = torch.randn(2, 8, 5, 6, 8)
    zq = torch.randn(2, 4, 5, 3, 4)  # interpolated to x's size by the spatial norm
    compare_over_batches(block, x, zq, (3, 2), backend, 1e-5)


def test_refuses_what_it_cannot_honour():
    block = make_block(8, 8, seed=3)
    x = torch.randn(1, 8, 2, 4, 4)
    block.nonlinearity = torch.nn.GELU()
    with pytest.raises(ValueError, match="only SiLU is fused"):
        resnet_block_forward(block, x)
    block = make_block(8, 8, seed=3).train()
    block.dropout.p = 0.1
    with pytest.raises(ValueError, match="dropout"):
        resnet_block_forward(block, x)


@pytest.mark.gpu
@pytest.mark.skipif(not _ext.cuda_available(), reason="extension built without CUDA")
@pytest.mark.parametrize("spatial", [False, True])
def test_cuda_block_bf16_within_diffusers_own_error(spatial):
    """bf16 through the CUDA kernel vs diffusers' own bf16 forward, both against diffusers in float32:
    ours no worse than 1.25x diffusers' own bf16 error."""
    block32 = make_block(128, 128, spatial_norm_dim=16 if spatial else None, seed=4, device="cuda")
    block16 = make_block(128, 128, spatial_norm_dim=16 if spatial else None, seed=4, device="cuda",
                         dtype=torch.bfloat16)
    x = torch.randn(1, 128, 3, 40, 60, device="cuda")
    zq = torch.randn(1, 16, 3, 10, 15, device="cuda") if spatial else None
    with torch.no_grad():
        ref, _ = block32(x, zq=zq)
        own, _ = block16(x.bfloat16(), zq=None if zq is None else zq.bfloat16())
        ours, _ = resnet_block_forward(block16, x.bfloat16(), zq=None if zq is None else zq.bfloat16(),
                                       backend="cuda")
    assert rel_err(ours, ref) <= 1.25 * rel_err(own, ref)
