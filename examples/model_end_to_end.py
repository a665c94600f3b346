"""The whole model at a tiny size on CPU: build it, encode a video, run the transformer, decode.

    python examples/model_end_to_end.py                      # the references (and the C++ conv in the VAE)
    TRITON_INTERPRET=1 python examples/model_end_to_end.py   # also the transformer on the Triton kernels

Random weights: the numbers mean nothing, the shapes and the backend switch are the point.
``cvk.build(**cvk.recommended_defaults())`` builds the real size (a CogVideoX-5B-sized transformer).
"""
import os

import torch

import cogvideox_kernels as cvk

torch.manual_seed(0)
opts = dict(num_layers=2, hidden_size=128, num_heads=2, text_hidden_size=32, time_embed_dim=64,
            base_channels=16, latent_channels=4, num_frames=9, height=32, width=48)
model = cvk.build(**opts).eval()  # .encoder, .decoder, .transformer; backend="auto" everywhere
n_transformer = cvk.param_count(**model.transformer.config)  # exact, by formula, without building
assert n_transformer == sum(p.numel() for p in model.transformer.parameters())
print(f"built: {sum(p.numel() for p in model.parameters()):,} parameters, {n_transformer:,} in the transformer")

video = torch.rand(1, 9, 3, 32, 48) * 2 - 1  # [B, T, 3, H, W] in [-1, 1]
text_embeddings = torch.randn(1, 5, 32)  # [B, text tokens, text_hidden_size], e.g. from a T5 encoder
timestep = torch.tensor([500])

with torch.no_grad():
    latents = cvk.encode_video(model.encoder, video)  # [1, (9-1)/4 + 1 = 3, 4, 32/8, 48/8]
    noisy = latents + torch.randn_like(latents)
    noise_pred = model.transformer(noisy, text_embeddings, timestep)  # same shape as the latents
    decoded = cvk.decode_latent(model.decoder, latents)  # back to [1, 9, 3, 32, 48]
print(f"video {tuple(video.shape)} -> latents {tuple(latents.shape)} -> noise prediction "
      f"{tuple(noise_pred.shape)}; decoded {tuple(decoded.shape)}")
assert latents.shape == (1, 3, 4, 4, 6) and noise_pred.shape == latents.shape and decoded.shape == video.shape
assert torch.isfinite(noise_pred).all() and torch.isfinite(decoded).all()

# Switching a backend keeps the weights: the same model on another backend gives the same output.
backends = ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else [])
for backend in backends:
    model.transformer.backend = backend
    with torch.no_grad():
        out = model.transformer(noisy, text_embeddings, timestep)
    err = ((out - noise_pred).norm() / noise_pred.norm()).item()
    print(f"transformer backend={backend:<9} rel diff from backend='auto': {err:.1e}")
    assert err < 1e-4
print("ok")
