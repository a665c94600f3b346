"""H200 probe: the LN-modulate pre-pass (``expert_ffn.triton_fwd.modulated_norm_fwd``: norm1 of the fused
attention half and norm2 of the expert FFN, 84 calls per 5B step) at the 5B shape, today's launch (one whole
row per program, 16 warps: 64 registers, two CTAs = two rows in flight per SM) against rows per program x warps
x column chunks (``NORM_LAUNCH``). Each launch's output is checked against a float32 reference and the
default launch's before it is timed; GB/s counts x read + h written.

    PYTHONPATH=$PWD python3 benchmarks/experiments/norm_sweep.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from cogvideox_kernels.bench.common import environment, time_ms  # noqa: E402
from cogvideox_kernels.ops.expert_ffn import triton_fwd as tf  # noqa: E402
from cogvideox_kernels.ops.expert_ffn.reference import modulated_norm_reference  # noqa: E402

LAUNCHES = [None, (1, 8, 0), (1, 4, 0), (2, 8, 0), (2, 16, 0), (1, 4, 1024), (2, 4, 1024), (2, 8, 1024),
            (4, 4, 512), (4, 4, 1024), (4, 8, 1024), (8, 8, 512), (1, 4, 512), (2, 4, 512)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="norm_sweep_out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = environment("cuda")
    B, S, Hd, text_len = 2, 17776, 3072, 226
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(B * S, Hd, device="cuda", generator=g) * 2 + 0.5).bfloat16()
    mod = (torch.randn(B, 6, Hd, device="cuda", generator=g) * 0.3).bfloat16()
    w = (1 + 0.2 * torch.randn(Hd, device="cuda", generator=g)).bfloat16()
    b = (0.1 * torch.randn(Hd, device="cuda", generator=g)).bfloat16()
    ref, _ = modulated_norm_reference(x.float().view(B, S, Hd), mod.float(), text_len, w.float(), b.float(), 1e-5)
    ref = ref.view(B * S, Hd)
    nbytes = 2 * x.numel() * x.element_size()
    rows, lines = [], []
    base = None
    for launch in LAUNCHES:
        tf.NORM_LAUNCH = launch
        try:
            h = tf.modulated_norm_fwd(x, mod, w, b, 1e-5, S, text_len, torch.bfloat16)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            lines.append(f"{launch}: {type(e).__name__}: {str(e)[:150]}")
            print(lines[-1], flush=True)
            continue
        err = ((h.float() - ref).norm() / ref.norm()).item()
        if base is None:
            base = h
        diff = ((h.float() - base.float()).norm() / base.float().norm()).item()
        ms = time_ms(lambda: tf.modulated_norm_fwd(x, mod, w, b, 1e-5, S, text_len, torch.bfloat16), "cuda",
                     rep_ms=300)
        rows.append(dict(launch=launch, ms=ms, gb_s=nbytes / ms / 1e6, err=err, diff_vs_default=diff))
        lines.append(f"{str(launch):16s} {ms:.4f} ms {nbytes / ms / 1e6:6.0f} GB/s err {err:.2e} "
                     f"diff vs default {diff:.1e}")
        print(lines[-1], flush=True)
    tf.NORM_LAUNCH = None
    with open(os.path.join(args.out, "norm_sweep.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1, default=str)
    with open(os.path.join(args.out, "norm_sweep.log"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
