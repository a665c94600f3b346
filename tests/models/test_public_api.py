"""The package's public API: the seed design's names are importable from the top level and work."""
import importlib
import subprocess
import sys

import torch

import cogvideox_kernels as cvk


def test_top_level_model_api_exists():
    for name in ("build_vae", "build_transformer", "build", "encode_video", "decode_latent", "param_count",
                 "recommended_defaults", "rope3d_freqs"):
        assert callable(getattr(cvk, name)), name


def test_tiny_end_to_end_through_top_level_api():
    torch.manual_seed(0)
    model = cvk.build(num_layers=1, hidden_size=48, num_heads=2, text_hidden_size=24, time_embed_dim=32,
                      base_channels=8, latent_channels=4, num_frames=5, backend="reference")
    video = torch.randn(1, 5, 3, 16, 16)
    latents = cvk.encode_video(model.encoder, video)
    assert latents.shape == (1, 2, 4, 2, 2)
    out = model.transformer(latents, torch.randn(1, 3, 24), torch.tensor([10]))
    assert out.shape == latents.shape and torch.isfinite(out).all()
    assert cvk.decode_latent(model.decoder, latents).shape == video.shape
    opts = dict(num_layers=1, hidden_size=48, num_heads=2, text_hidden_size=24, time_embed_dim=32, latent_channels=4)
    assert cvk.param_count(**opts) == sum(p.numel() for p in cvk.build_transformer(**opts).parameters())
    assert cvk.recommended_defaults()["num_frames"] == 49


def test_package_imports_without_extension_diffusers_or_gpu():
    # ops and the model import even when the compiled extension and diffusers are missing.
    code = ("import sys; sys.modules['cogvideox_kernels._C'] = None; sys.modules['diffusers'] = None; "
            "import cogvideox_kernels as c, cogvideox_kernels.ops as o; from cogvideox_kernels._ext import "
            "extension_available as e; import torch; assert not e(); "
            "y, _ = o.causal_conv3d(torch.randn(1, 2, 3, 4, 4), torch.randn(2, 2, 3, 1, 1)); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    importlib.import_module("cogvideox_kernels.integrations.diffusers")
