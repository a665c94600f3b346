"""CPU emulation of the FFN half-block's error in bf16, fp8 and int8 (issue 15): which 8-bit format meets
"error <= 3x the bf16 path's"? Float32 maths with each path's roundings put in by hand:

  bf16 (ours, cuBLAS route): h, gelu(h W1^T + b1), f = inter W2^T and the output rounded to bf16
  fp8  (ours, fp8.py):       h, w1, the GELU output, w2 to e4m3 per row; GEMM outputs rounded to bf16
  int8 (ours, int8.py):      the same with int8 rows (amax / 127, round to nearest); GEMM1's output
                             rounded to bf16 before b1 + GELU; GEMM2's epilogue in float32
  *-emul:                    the reference's own emulation (expert_ffn_reference(precision=...)):
                             no bf16 roundings at all

Inputs: benchmarks/bench_fp8_ffn.py's (the bench CLI's ffn inputs and its hard variants), full widths
(3072 -> 12288), fewer tokens (B 1, 226 + VIDEO). Errors are ||out - ref|| / ||ref|| vs float32.

    python benchmarks/experiments/int8_ffn_emulate.py [--video 1000]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_fp8_ffn as bench  # noqa: E402

from cogvideox_kernels.ops.expert_ffn import expert_ffn_reference, fp8, int8  # noqa: E402
from cogvideox_kernels.ops.expert_ffn.reference import modulated_norm_reference  # noqa: E402

bf = lambda t: t.bfloat16().float()  # noqa: E731
KINDS = ("gaussian", "h_channel_outliers", "x_massive_channels", "heavy_tailed_x", "w_outlier_columns")


def asym_round_trip(t):
    """int8 rows with a zero point: [min, max] of the row mapped onto [-127, 127] (a lead, not shipped)."""
    lo, hi = t.amin(dim=-1, keepdim=True), t.amax(dim=-1, keepdim=True)
    mid, scale = (hi + lo) / 2, ((hi - lo) / 254).clamp_min(1e-30)
    return torch.round((t - mid) / scale).clamp(-127, 127) * scale + mid


def path(a, kind):
    """The output of one path (float32), emulating its roundings."""
    up = {k: v.float() if torch.is_tensor(v) else v for k, v in a.items()}
    x, w1, b1, w2, b2 = up["x"], up["w1"][0], up["b1"][0], up["w2"][0], up["b2"][0]
    h, gate = modulated_norm_reference(x, up["modulation"], a["text_len"], up["norm_weight"], up["norm_bias"], 1e-5)
    if kind == "bf16":
        inter = bf(F.gelu(F.linear(bf(h), w1, b1), approximate="tanh"))
        f = bf(F.linear(inter, w2)) + b2
    elif kind == "int8-asym":  # GELU output with a zero point (mid-range per row): GEMM2 adds zp * sum_k w2
        q = int8.int8_round_trip
        inter = asym_round_trip(F.gelu(bf(F.linear(q(h), q(w1))) + b1, approximate="tanh"))
        f = F.linear(inter, q(w2)) + b2
    else:
        q = fp8.fp8_round_trip if kind == "fp8" else int8.int8_round_trip
        inter = q(F.gelu(bf(F.linear(q(h), q(w1))) + b1, approximate="tanh"))
        f = F.linear(inter, q(w2))
        f = (bf(f) if kind == "fp8" else f) + b2
    return bf(x + gate * f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--video", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[5])
    p.add_argument("--asym", action="store_true", help="only bf16 / int8 / int8 with a zero point on the GELU output")
    args = p.parse_args()
    bench.DEVICE = "cpu"
    if args.asym:
        return asym(args)
    torch.manual_seed(0)
    print("| inputs | seed | bf16 | fp8 | int8 | fp8-emul | int8-emul | fp8 / bf16 | **int8 / bf16** | "
          "int8-emul / bf16 | FFN-term err bf16 / fp8 / int8 | cos int8 |")
    print("| --- " * 12 + "|")
    for seed in args.seeds:
        for kind in KINDS:
            t0 = time.time()
            a = bench.make_inputs(1, 226, args.video, 3072, 12288, seed=seed, kind=kind)
            ref = bench.reference(a)
            x = a["x"].float()
            outs = {k: path(a, k) for k in ("bf16", "fp8", "int8")}
            outs["fp8-emul"] = bench.reference(a, "fp8")
            outs["int8-emul"] = expert_ffn_reference(**{k: v.float() if torch.is_tensor(v) else v
                                                        for k, v in a.items()}, precision="int8")
            m = {k: bench.metrics(v, ref, x) for k, v in outs.items()}
            e = {k: v["rel_err"] for k, v in m.items()}
            print(f"| {kind} | {seed} | {e['bf16']:.2e} | {e['fp8']:.2e} | {e['int8']:.2e} | {e['fp8-emul']:.2e} | "
                  f"{e['int8-emul']:.2e} | {e['fp8'] / e['bf16']:.1f}x | **{e['int8'] / e['bf16']:.2f}x** | "
                  f"{e['int8-emul'] / e['bf16']:.2f}x | {m['bf16']['delta_rel_err']:.1e} / "
                  f"{m['fp8']['delta_rel_err']:.1e} / {m['int8']['delta_rel_err']:.1e} | {m['int8']['cos']:.6f} |",
                  flush=True)
            print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)


def asym(args):
    print("| inputs | seed | int8 / bf16 | int8, GELU output with zero point / bf16 |")
    print("| --- " * 4 + "|")
    for seed in args.seeds:
        for kind in KINDS:
            a = bench.make_inputs(1, 226, args.video, 3072, 12288, seed=seed, kind=kind)
            ref = bench.reference(a)
            e = {k: bench.metrics(path(a, k), ref)["rel_err"] for k in ("bf16", "int8", "int8-asym")}
            print(f"| {kind} | {seed} | {e['int8'] / e['bf16']:.2f}x | {e['int8-asym'] / e['bf16']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
