"""Streaming the causal VAE over frame chunks gives the clip's result: chunked == whole.

    python examples/streaming_vae.py

First one causal temporal conv fed chunk by chunk with its cache, then the whole VAE: encode and
decode in chunks of frames against one pass over the whole clip. Streaming keeps peak memory set by
the chunk, not the clip (on a GPU at 49 x 480 x 720: 40 -> 8.5 GiB to encode, 36 -> 6.7 GiB to decode).
"""
import torch

import cogvideox_kernels as cvk
from cogvideox_kernels import ops


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


torch.manual_seed(0)

# --- one causal conv, chunk by chunk --------------------------------------------------------------
x = torch.randn(1, 8, 12, 6, 10)  # [B, C, T, H, W]: 12 frames
weight, bias = torch.randn(8, 8, 3, 1, 1) / 24**0.5, 0.1 * torch.randn(8)
whole, _ = ops.causal_conv3d(x, weight, bias)  # frame 0 repeated in front (replicate padding)
pieces, cache = [], None
for start in range(0, 12, 5):  # chunks of 5, 5 and 2 frames
    chunk = x[:, :, start:start + 5].contiguous()
    y, cache = ops.causal_conv3d(chunk, weight, bias, cache=cache)  # cache: the last kt-1 frames seen
    pieces.append(y)
err = rel_err(torch.cat(pieces, dim=2), whole)
print(f"causal_conv3d: 3 chunks vs the whole clip: rel diff {err:.1e}")
assert err < 1e-6

# --- the whole VAE --------------------------------------------------------------------------------
encoder, decoder = cvk.build_vae(base_channels=8, latent_channels=4, num_frames=17)  # sized for 17-frame clips
encoder.eval(), decoder.eval()
video = torch.rand(1, 17, 3, 16, 24) * 2 - 1  # [B, T, 3, H, W]
with torch.no_grad():
    latents = cvk.encode_video(encoder, video)  # one pass (longer clips than num_frames stream by default)
    streamed = cvk.encode_video(encoder, video, chunk_frames=4)  # 4 frames at a time, caches carried over
    frames = cvk.decode_latent(decoder, latents)  # one pass over the 5 latent frames
    frames_streamed = cvk.decode_latent(decoder, latents, chunk_frames=1)  # one latent frame at a time
print(f"encode: video {tuple(video.shape)} -> latents {tuple(latents.shape)}; chunks of 4 frames vs one pass: "
      f"rel diff {rel_err(streamed, latents):.1e}")
print(f"decode: latents -> video {tuple(frames.shape)}; one latent frame at a time vs one pass: "
      f"rel diff {rel_err(frames_streamed, frames):.1e}")
assert latents.shape == (1, 5, 4, 2, 3) and frames.shape == video.shape
assert rel_err(streamed, latents) < 1e-5 and rel_err(frames_streamed, frames) < 1e-5
print("ok")
