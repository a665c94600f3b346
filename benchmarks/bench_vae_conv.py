"""Fused VAE conv (GroupNorm + SiLU + causal (3,3,3) conv + bias + residual) vs diffusers' op sequence
and cuDNN, on one GPU, in one run.

Per shape ([1,128,6,480,720], [1,256,6,240,360], [1,512,6,60,90]; bf16; front frames from a cache
or replicated) it first checks parity against the float32 reference (TF32 off) with every
torch.empty NaN-poisoned, then times (triton do_bench median):

* ``ours_fused``      vae_conv3d: GroupNorm(32) + SiLU + conv + bias + residual
* ``ours_conv``       vae_conv3d with no norm/SiLU/residual (the conv alone, incl. its layout pass)
* ``cudnn_conv``      torch.cat(front, x) + F.conv3d (cuDNN), the conv alone
* ``diffusers_seq``   F.group_norm, F.silu, torch.cat, F.conv3d, + residual: diffusers' ResNet step

with TFLOP/s (2 * out * C_in * 27), GB/s of the minimal traffic, peak memory above the inputs and
speedups (fused vs diffusers_seq, conv vs cuDNN).

    python benchmarks/bench_vae_conv.py --out DIR [--commit SHA]
    python benchmarks/bench_vae_conv.py --sanitize-case      # small cases for compute-sanitizer
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys

import torch

from cogvideox_kernels.bench.common import environment, peak_memory_gib, time_ms
from cogvideox_kernels.bench.presets import VAE_CONV_SHAPES
from cogvideox_kernels.ops.vae_conv import diffusers_sequence, vae_conv3d, vae_conv3d_reference

SHAPES = VAE_CONV_SHAPES
SMOKE_SHAPES = [(1, 32, 3, 8, 10)]  # --smoke: CPU, C++ path, wall-clock timing (checks the script runs)
GROUPS = 32
DEVICE, BACKEND = "cuda", "cuda"


def rel(out, ref):
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty / empty_like return NaN-filled tensors: an unwritten output element shows."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def make_inputs(shape, front, seed, dtype=torch.bfloat16):
    B, C, T, H, W = shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=DEVICE, dtype=torch.float32)  # noqa: E731
    args = dict(
        x=(rnd(B, C, T, H, W) * 1.5 + 0.3).to(dtype),
        weight=(rnd(C, C, 3, 3, 3) / math.sqrt(27 * C)).to(dtype),
        bias=(rnd(C) * 0.1).to(dtype),
        norm_weight=(rnd(C) * 0.3 + 1).to(dtype),
        norm_bias=(rnd(C) * 0.3).to(dtype),
        residual=rnd(B, C, T, H, W).to(dtype),
    )
    cache = rnd(B, C, 2, H, W).to(dtype) if front == "cache" else None
    return args, cache


def variants(a, cache):
    norm = dict(num_groups=GROUPS, norm_weight=a["norm_weight"], norm_bias=a["norm_bias"], silu=True,
                residual=a["residual"], cache=cache)
    x, w, b = a["x"], a["weight"], a["bias"]

    def cudnn():
        front = [cache] if cache is not None else [x[:, :, :1]] * 2
        return torch.nn.functional.conv3d(torch.cat(front + [x], dim=2), w, b, padding=(0, 1, 1))

    return {
        "ours_fused": (lambda: vae_conv3d(x, w, b, backend=BACKEND, **norm)[0], "fused"),
        "ours_conv": (lambda: vae_conv3d(x, w, b, cache=cache, backend=BACKEND)[0], "conv"),
        "cudnn_conv": (cudnn, "conv"),
        "diffusers_seq": (lambda: diffusers_sequence(x, w, b, **norm)[0], "fused"),
    }


def references(a, cache):
    """float32 references (TF32 off): the fused function and the conv alone."""
    f = {k: v.float() for k, v in a.items()}
    c = None if cache is None else cache.float()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        fused = vae_conv3d_reference(f["x"], f["weight"], f["bias"], num_groups=GROUPS, norm_weight=f["norm_weight"],
                                     norm_bias=f["norm_bias"], silu=True, residual=f["residual"], cache=c)[0]
        conv = vae_conv3d_reference(f["x"], f["weight"], f["bias"], cache=c)[0]
        # the new cache in x's dtype: the activated last two frames, rounded once
        ref_cache = vae_conv3d_reference(a["x"], a["weight"], a["bias"], num_groups=GROUPS,
                                         norm_weight=a["norm_weight"], norm_bias=a["norm_bias"], silu=True,
                                         cache=cache)[1]
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return {"fused": fused, "conv": conv}, ref_cache


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_shape(shape, front, seed):
    a, cache = make_inputs(shape, front, seed)
    refs, ref_cache = references(a, cache)
    B, C, T, H, W = shape
    flops = 2.0 * B * C * T * H * W * C * 27
    elem = 2
    rows = []
    for name, (fn, kind) in variants(a, cache).items():
        with poisoned_empty():
            out = fn()
            sync()
        err = rel(out, refs[kind])
        del out
        cache_err = None
        if name == "ours_fused":
            with poisoned_empty():
                from cogvideox_kernels.ops.vae_conv import vae_conv3d as op
                _, new_cache = op(a["x"], a["weight"], a["bias"], num_groups=GROUPS, norm_weight=a["norm_weight"],
                                  norm_bias=a["norm_bias"], silu=True, residual=a["residual"], cache=cache,
                                  backend=BACKEND)
            cache_err = rel(new_cache, ref_cache)
            del new_cache
        ms = time_ms(fn, DEVICE)
        peak = peak_memory_gib(fn, DEVICE)
        # minimal traffic: x, weight, y once (+ residual read for the fused op)
        nbytes = (a["x"].numel() * (2 if kind == "fused" else 1) + a["weight"].numel() + a["x"].numel()) * elem
        rows.append(dict(shape="x".join(map(str, shape)), front=front, impl=name, ms=round(ms, 4),
                         tflops=round(flops / ms / 1e9, 1), gbps=round(nbytes / ms / 1e6, 1),
                         rel_err=float(f"{err:.3e}"), cache_rel_err=None if cache_err is None else float(f"{cache_err:.3e}"),
                         peak_mib=None if peak is None else round(peak * 1024, 1)))
        print(json.dumps(rows[-1]), flush=True)
    by = {r["impl"]: r for r in rows}
    for r in rows:
        base = by["diffusers_seq"] if r["impl"] in ("ours_fused", "diffusers_seq") else by["cudnn_conv"]
        r["speedup"] = round(base["ms"] / r["ms"], 3)
        r["err_vs_diffusers"] = (round(r["rel_err"] / by["diffusers_seq"]["rel_err"], 3)
                                 if r["impl"] == "ours_fused" else None)
    del a, cache, refs
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows


def format_table(rows):
    cols = ["shape", "front", "impl", "ms", "tflops", "gbps", "speedup", "rel_err", "err_vs_diffusers",
            "cache_rel_err", "peak_mib"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_results(rows, env, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    stem = f"vae_conv_bench_{env['commit'][:7]}"
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write("# Fused VAE conv (bf16, GroupNorm 32 + SiLU + (3,3,3) conv + bias + residual)\n\n")
        f.write(json.dumps(env) + "\n\n")
        f.write("speedup: ours_fused and diffusers_seq vs diffusers_seq; ours_conv and cudnn_conv vs cudnn_conv.\n"
                "rel_err vs the float32 reference (TF32 off) of the same function; err_vs_diffusers = "
                "our error / diffusers_seq's bf16 error.\n\n")
        f.write(format_table(rows) + "\n")


def profile_kernels(shape, iters=3):
    """Per-kernel CUDA time (torch.profiler, mean of `iters` calls) of ours_fused and ours_conv."""
    from torch.profiler import ProfilerActivity, profile

    a, cache = make_inputs(shape, "replicate", 0)
    vs = variants(a, cache)
    out = {}
    for name in ("ours_fused", "ours_conv", "diffusers_seq"):
        fn = vs[name][0]
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t and e.count:
                kernels[e.key[:90]] = round(t / iters / 1e3, 4)  # ms per call
        out[name] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:8])
        print(json.dumps({"shape": "x".join(map(str, shape)), "impl": name, "kernels_ms": out[name]}), flush=True)
    return out


def ncu_case():
    """One fused call at [1,256,6,240,360] for ncu (the conv kernel's stall reasons)."""
    a, cache = make_inputs(SHAPES[1], "replicate", 0)
    fn = variants(a, cache)["ours_fused"][0]
    fn()
    torch.cuda.synchronize()
    return 0


def sanitize_case():
    """Small shapes through every CUDA path: bf16/fp16, norm/modulation/cache/residual, odd W (scalar
    stores and the scalar activation pass), partial tiles, C_out not a multiple of 128, zero front frames."""
    worst = 0.0
    cases = [(torch.bfloat16, 32, 40, 3, 20, 24, "replicate", True), (torch.float16, 16, 8, 2, 17, 19, "zeros", False),
             (torch.bfloat16, 48, 136, 1, 9, 33, "replicate", False)]
    for i, (dtype, C, Co, T, H, W, pad_mode, use_cache) in enumerate(cases):
        g = torch.Generator(device="cuda").manual_seed(i)
        rnd = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
        x, w, b = rnd(1, C, T, H, W), rnd(Co, C, 3, 3, 3) / math.sqrt(27 * C), rnd(Co)
        kw = dict(num_groups=8, norm_weight=rnd(C), norm_bias=rnd(C), scale=rnd(1, C, T, H, W), shift=rnd(1, C, T, H, W),
                  silu=True, residual=rnd(1, Co, T, H, W), pad_mode=pad_mode,
                  cache=rnd(1, C, 2, H, W) if use_cache else None)
        ref, _ = vae_conv3d_reference(x, w, b, compute_dtype=torch.float64, **kw)
        y, _ = vae_conv3d(x, w, b, backend=BACKEND, **kw)
        worst = max(worst, rel(y.double(), ref.double()))
    torch.cuda.synchronize()
    print(f"sanitize case done, worst rel err {worst:.2e}")
    return 0 if worst < 1e-2 else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for vae_conv_bench_<commit>.json/.csv/.md")
    ap.add_argument("--commit", default=None, help="the commit to record (default: COGVIDEOX_KERNELS_COMMIT or git)")
    ap.add_argument("--fronts", default="replicate,cache", help="comma-separated: replicate, cache")
    ap.add_argument("--sanitize-case", action="store_true", help="run the small compute-sanitizer case only")
    ap.add_argument("--backend", choices=("cuda", "cudnn"), default="cuda",
                    help="vae_conv3d's backend for the ours_* rows and the sanitizer case: the fused CUDA conv, or "
                         "the cuDNN route (the default of apply(vae) on CUDA tensors)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run at a small shape (C++ path)")
    ap.add_argument("--profile", action="store_true", help="also print per-kernel times (torch.profiler)")
    ap.add_argument("--ncu-case", action="store_true", help="one fused call at the second shape, for ncu")
    args = ap.parse_args(argv)
    global DEVICE, BACKEND
    BACKEND = args.backend
    if args.sanitize_case:
        return sanitize_case()
    if args.ncu_case:
        return ncu_case()
    shapes = SHAPES
    if args.smoke:
        DEVICE, BACKEND, shapes = "cpu", "cpp", SMOKE_SHAPES
    env = environment(DEVICE)
    env["commit"] = args.commit or env["commit"]
    env["backend"] = BACKEND
    print(json.dumps(env), flush=True)
    rows = []
    for i, shape in enumerate(shapes):
        for front in args.fronts.split(","):
            rows += run_shape(shape, front, seed=i)
            if args.out:  # partial results survive a later failure or time-out
                write_results(rows, env, args.out)
    if args.profile and DEVICE == "cuda":
        try:
            prof = {"x".join(map(str, sh)): profile_kernels(sh) for sh in shapes[:2]}
        except Exception as exc:  # the table matters more than the breakdown
            print(f"profile failed: {type(exc).__name__}: {exc}", flush=True)
            prof = {}
        if args.out and prof:
            with open(os.path.join(args.out, f"vae_conv_profile_{env['commit'][:7]}.json"), "w") as f:
                json.dump(dict(env=env, kernels_ms=prof), f, indent=1)
    print(format_table(rows))
    bad = [r for r in rows if not r["rel_err"] < 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
