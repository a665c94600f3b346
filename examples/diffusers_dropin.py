"""The diffusers drop-in on a tiny random CogVideoX pipeline on CPU: apply, run, remove.

    pip install -e ".[diffusers]"
    python examples/diffusers_dropin.py                      # patched blocks run the references on CPU
    TRITON_INTERPRET=1 python examples/diffusers_dropin.py   # patched blocks run the Triton kernels

With a real checkpoint on a GPU it is the same two lines around your pipeline:

    pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-5b", torch_dtype=torch.bfloat16).to("cuda")
    cogvideox_kernels.integrations.diffusers.apply(pipe)   # remove(pipe) undoes it
"""
import os

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

from cogvideox_kernels.integrations import diffusers as cvk_diffusers

torch.manual_seed(0)
# A CogVideoX-5B-style transformer (RoPE3D, QK-LayerNorm, expert adaLN) and VAE, shrunk to run in seconds.
transformer = CogVideoXTransformer3DModel(
    num_attention_heads=2, attention_head_dim=32, num_layers=2, in_channels=4, out_channels=4, time_embed_dim=16,
    text_embed_dim=32, sample_height=8, sample_width=8, sample_frames=9, patch_size=2, max_text_seq_length=8,
    use_rotary_positional_embeddings=True)
vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
                             block_out_channels=(8, 8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4)
# No text encoder here: the prompt embeddings are given directly (a T5 encoder makes them in real use).
pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                         scheduler=CogVideoXDDIMScheduler())
pipe.set_progress_bar_config(disable=True)
prompt_embeds, negative_prompt_embeds = torch.randn(1, 8, 32), torch.randn(1, 8, 32)


def generate():  # two denoising steps with classifier-free guidance; the latents, before decoding
    return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, num_frames=9, height=32,
                width=32, num_inference_steps=2, guidance_scale=6.0, output_type="latent",
                generator=torch.Generator().manual_seed(1)).frames


before = generate()
# "auto" takes our kernels on a GPU and the references on CPU tensors; "triton" forces the Triton
# kernels (here through the interpreter). vae=False: under "auto" our VAE kernels take CUDA tensors only
# (on a GPU, apply runs the VAE's ResNet blocks on vae_conv3d and its (1,1,1) convs on our causal conv).
backend = "triton" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "auto"
cvk_diffusers.apply(pipe, backend=backend, vae=False)
assert cvk_diffusers.is_patched(pipe)
patched = generate()
cvk_diffusers.remove(pipe)
assert not cvk_diffusers.is_patched(pipe)
after = generate()

video = pipe.decode_latents(patched)  # the pipeline's own decode: [B, 3, frames, H, W]
err = ((patched - before).norm() / before.norm()).item()
print(f"latents {tuple(before.shape)}, video {tuple(video.shape)}")
print(f"patched (backend={backend}) vs diffusers' own path: rel diff {err:.1e}; after remove(): "
      f"{'bit-identical' if torch.equal(after, before) else 'DIFFERENT'}")
assert err < 1e-4 and torch.equal(after, before) and video.shape == (1, 3, 9, 32, 32)
print("ok")
