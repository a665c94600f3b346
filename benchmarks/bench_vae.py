"""Whole-VAE benchmark of the seed-design causal VAE (``cogvideox_kernels.build_vae``): encode and
decode of a 49 x 480 x 720 clip with the causal convs as a user writes them (torch.cat of the padding
frames + Conv3d in bf16, cuDNN) against
ours (the CUDA causal conv), each as one pass over the whole clip and streamed in frame chunks with
the conv caches: time, peak memory, and the difference from the baseline's whole-clip output.

    PYTHONPATH=$PWD python3 benchmarks/bench_vae.py --out DIR [--tiny] [--deadline-s 200]

``--tiny`` runs a small VAE on the CPU (C++ conv path) to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import cogvideox_kernels.nn.causal_conv as causal_conv_module
from cogvideox_kernels import build_vae, decode_latent, encode_video
from cogvideox_kernels.bench.common import environment, peak_memory_gib, time_ms
from cogvideox_kernels.ops.causal_conv import causal_conv3d_reference

OUR_OP = causal_conv_module.causal_conv3d


def cudnn_same_dtype(x, weight, bias=None, *, stride=1, pad_mode="replicate", cache=None, backend="auto"):
    """The baseline a user writes: torch.cat of the padding frames + Conv3d in the input dtype (cuDNN)."""
    return causal_conv3d_reference(x, weight, bias, stride=stride, pad_mode=pad_mode, cache=cache,
                                   compute_dtype=x.dtype)


def timed(fn, device, reps):
    """(median ms over ``reps`` runs after the first, peak GiB of one run above the start, first output)."""
    out = fn()
    ms = time_ms(fn, device, reps=reps, warmup=0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ms, peak_memory_gib(fn, device), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--deadline-s", type=float, default=240.0)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    stop_at = time.time() + a.deadline_s
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kernel = "cuda" if device.type == "cuda" else "cpp"
    if a.tiny:
        opts, (T, H, W), enc_chunk, dec_chunk, reps = dict(base_channels=8, num_frames=9), (9, 16, 24), 4, 1, 1
    else:
        opts, (T, H, W), enc_chunk, dec_chunk, reps = {}, (49, 480, 720), 8, 2, 1
    torch.manual_seed(0)
    encoder, decoder = build_vae(**opts)
    encoder = encoder.to(device, dtype).eval().requires_grad_(False)
    decoder = decoder.to(device, dtype).eval().requires_grad_(False)
    g = torch.Generator(device="cpu").manual_seed(1)
    video = (torch.rand(1, T, 3, H, W, generator=g) * 2 - 1).to(device, dtype)
    env = environment(device)
    rows, refs = [], {}
    print(f"{env.get('gpu')} | torch {env['torch']} | commit {env['commit']} | clip {T}x{H}x{W} {dtype}")

    def record(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(a.out, "vae_seed_bench.json"), "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)

    cases = [(what, backend, chunk) for what in ("encode", "decode") for backend in ("cat+Conv3d", kernel)
             for chunk in (None, enc_chunk if what == "encode" else dec_chunk)]
    latent = None
    for what, backend, chunk in cases:
        label = f"{what} {backend} {'whole clip' if chunk is None else f'chunks of {chunk}'}"
        if time.time() > stop_at:
            record(case=label, status="skipped (deadline)")
            continue
        try:
            # the baseline swaps the op the CausalConv3d modules call; ours uses the module backend
            causal_conv_module.causal_conv3d = cudnn_same_dtype if backend == "cat+Conv3d" else OUR_OP
            encoder.backend = decoder.backend = "reference" if backend == "cat+Conv3d" else backend
            with torch.no_grad():
                if what == "encode":
                    fn = lambda: encode_video(encoder, video, chunk_frames=chunk)  # noqa: E731
                else:
                    fn = lambda: decode_latent(decoder, latent, chunk_frames=chunk)  # noqa: E731
                ms, peak, out = timed(fn, device, reps)
            key = what
            if backend == "cat+Conv3d" and chunk is None:
                refs[key] = out.float()
                if what == "encode":
                    latent = out
            diff = ((out.float() - refs[key]).norm() / refs[key].norm()).item() if key in refs else None
            record(case=label, ms=round(ms, 1), peak_gib=None if peak is None else round(peak, 2),
                   rel_diff_vs_baseline_whole=diff, out_shape=list(out.shape), status="ok")
            del out
        except Exception as exc:  # keep going; report
            record(case=label, status=f"error: {type(exc).__name__}: {str(exc)[:200]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with open(os.path.join(a.out, "vae_seed_bench.md"), "w") as f:
        f.write(f"# Seed-design VAE, {T}x{H}x{W}, {dtype}\n\n{env}\n\n| case | ms | peak GiB | rel diff vs cat+Conv3d whole clip | status |\n|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['case']} | {r.get('ms', '')} | {r.get('peak_gib', '')} | "
                    f"{'' if r.get('rel_diff_vs_baseline_whole') is None else format(r['rel_diff_vs_baseline_whole'], '.2e')} | {r['status']} |\n")


if __name__ == "__main__":
    main()
