"""Causal temporal conv (kt, 1, 1): our CUDA kernel vs cuDNN Conv3d, side by side in one run.

Baselines, as a user would write them: ``F.pad`` (zeros) + Conv3d, and the replicate-first-frame
padding through ``torch.cat`` + Conv3d. Reports ms (do_bench median), GB/s and TFLOP/s of the
minimal traffic/work, % of the floor max(bytes / 3.0e12, flops / 790e12), speedups, peak memory.

    python benchmarks/bench_conv.py --out DIR              # the table
    python benchmarks/bench_conv.py --sanitize-case        # small cases for compute-sanitizer

"ours" is the shipped path (the extension picks the kernel per shape class, csrc/causal_conv/cuda_tiles.h;
the ``kernel`` column names it). The tile variants of earlier sweeps are gone from the extension; their
numbers are in benchmarks/results/conv_notes.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch
import torch.nn.functional as F

from cogvideox_kernels.bench.common import environment, peak_memory_gib, time_ms
from cogvideox_kernels.bench.presets import VAE_CONV_LONG, VAE_CONV_SHAPES
from cogvideox_kernels.ops.causal_conv import causal_conv3d_bytes, causal_conv3d_flops, causal_conv3d_reference

DEFAULT_SHAPES = [*VAE_CONV_SHAPES, VAE_CONV_LONG]
BANDWIDTH = 3.0e12  # measured device copy, H100 80GB (CONVENTIONS.md)
MATMUL = 790e12     # measured bf16 matmul


def _ours(x, w, b, stride):
    from cogvideox_kernels.ops.causal_conv import causal_conv3d

    return causal_conv3d(x, w, b, stride=stride, pad_mode="replicate", backend="cuda")[0]


def _kernel_name(x, w, stride) -> str:
    from cogvideox_kernels.ops.causal_conv.native import _max_smem, cuda_kernel

    return cuda_kernel(x.dtype, x.shape[1], w.shape[2], stride, x.shape[3] * x.shape[4],
                       _max_smem(torch.cuda.current_device()))


def _reference_fp32(x, w, b, stride, pad_mode):
    """float32 reference with TF32 off (cuDNN would use TF32 for float32 convs)."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return causal_conv3d_reference(x, w, b, stride=stride, pad_mode=pad_mode, compute_dtype=torch.float32)[0]
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run_conv_bench(shapes=DEFAULT_SHAPES, out_dir=None, *, strides=(1, 2), kt=3, dtype=torch.bfloat16,
                   baselines=True, log=print) -> list[dict]:
    """Time ours (the shipped kernel for each shape) and the cuDNN baselines.

    Returns one dict per (shape, stride, implementation); writes ``conv_bench.csv``/``.md``/``.json``
    under ``out_dir`` when given.
    """
    rows = []
    for shape in shapes:
        B, C, T, H, W = shape
        gen = torch.Generator(device="cuda").manual_seed(0)
        try:
            x = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
        except torch.OutOfMemoryError:
            log(f"skip {shape}: out of memory")
            continue
        w = (torch.randn(C, C, kt, 1, 1, device="cuda", dtype=dtype, generator=gen) / (C * kt) ** 0.5)
        b = torch.randn(C, device="cuda", dtype=dtype, generator=gen)
        for stride in strides:
            impls = {"ours": lambda: _ours(x, w, b, stride)}
            if baselines:
                impls["cudnn_pad_zeros"] = lambda: F.conv3d(F.pad(x, (0, 0, 0, 0, kt - 1, 0)), w, b,
                                                            stride=(stride, 1, 1))
                impls["cudnn_cat_replicate"] = lambda: F.conv3d(
                    torch.cat((x[:, :, :1].expand(-1, -1, kt - 1, -1, -1), x), dim=2), w, b, stride=(stride, 1, 1))
            refs = {mode: _reference_fp32(x, w, b, stride, mode) for mode in ("replicate", "zeros")}
            y = refs["replicate"]  # (shape only: the first implementation may not run this shape)
            nbytes = causal_conv3d_bytes(x, w, y)
            flops = causal_conv3d_flops(w, y)
            floor_ms = max(nbytes / BANDWIDTH, flops / MATMUL) * 1e3
            results, these = {}, []
            for name, fn in impls.items():
                try:
                    out = fn()
                    err = _rel(out, refs["zeros" if name == "cudnn_pad_zeros" else "replicate"])
                    del out
                    ms = time_ms(fn, "cuda")
                    peak = peak_memory_gib(fn, "cuda") * 1024
                except (RuntimeError, ValueError) as exc:  # an implementation that cannot run this shape
                    log(f"  {name} {shape} st{stride}: {type(exc).__name__}: {exc}")
                    continue
                results[name] = ms
                these.append(dict(shape="x".join(map(str, shape)), stride=stride, kt=kt, impl=name,
                                  kernel=_kernel_name(x, w, stride) if name == "ours" else "cudnn", ms=ms,
                                  gbps=nbytes / ms / 1e6, tflops=flops / ms / 1e9, floor_ms=floor_ms,
                                  pct_floor=100 * floor_ms / ms, peak_mib=peak, rel_err=err))
                log(f"  {these[-1]['shape']} st{stride} {name}: {ms:.3f} ms  err {err:.1e}")
            for r in these:
                for base in ("cudnn_pad_zeros", "cudnn_cat_replicate"):
                    if base in results:
                        r[f"speedup_vs_{base}"] = results[base] / r["ms"]
            rows.extend(these)
            del refs, y
        del x
        torch.cuda.empty_cache()
    if out_dir:
        write_results(rows, out_dir)
    return rows


def format_table(rows) -> str:
    head = ("| shape | st | impl | kernel | ms | GB/s | TFLOP/s | % floor | peak MiB | rel err | x cuDNN zeros "
            "| x cuDNN cat |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['stride']} | {r['impl']} | {r.get('kernel', '')} | {r['ms']:.3f} | {r['gbps']:.0f} | "
            f"{r['tflops']:.0f} | "
            f"{r['pct_floor']:.0f} | {r['peak_mib']:.0f} | {r['rel_err']:.1e} | "
            f"{r.get('speedup_vs_cudnn_pad_zeros', float('nan')):.2f} | "
            f"{r.get('speedup_vs_cudnn_cat_replicate', float('nan')):.2f} |")
    return "\n".join(lines)


def write_results(rows, out_dir, stem="conv_bench"):
    os.makedirs(out_dir, exist_ok=True)
    env = environment("cuda")
    with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in rows for k in r)) + list(env)
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **env})
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(f"# Causal temporal conv (kt=3, bf16): ours vs cuDNN\n\n{json.dumps(env)}\n\n")
        f.write("floor = max(bytes / 3.0e12, flops / 790e12); bytes = x + w + y once each\n\n")
        f.write(format_table(rows) + "\n")
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)


def sanitize_case():
    """Small shapes through every CUDA kernel (ring, tap-major, streamed, masked, fma; cache, strides)."""
    torch.manual_seed(0)
    cases = [(torch.bfloat16, 64, 64, 4, 8, 16, 3, 1, True), (torch.float16, 24, 40, 5, 6, 12, 2, 2, False),
             (torch.bfloat16, 20, 48, 5, 6, 20, 2, 2, True), (torch.bfloat16, 17, 9, 3, 5, 7, 5, 2, True),
             (torch.float32, 9, 17, 4, 5, 7, 3, 1, True), (torch.bfloat16, 96, 80, 5, 6, 12, 3, 2, False),
             (torch.bfloat16, 256, 64, 3, 4, 8, 3, 1, True)]
    worst, seen = 0.0, set()
    for dtype, cin, cout, T, H, W, kt, st, use_cache in cases:
        x = torch.randn(1, cin, T, H, W, device="cuda", dtype=dtype)
        w = torch.randn(cout, cin, kt, 1, 1, device="cuda", dtype=dtype) / (cin * kt) ** 0.5
        b = torch.randn(cout, device="cuda", dtype=dtype)
        c = torch.randn(1, cin, kt - 1, H, W, device="cuda", dtype=dtype) if use_cache else None
        ref, _ = causal_conv3d_reference(x.double(), w.double(), b.double(), stride=st,
                                         cache=None if c is None else c.double())
        from cogvideox_kernels.ops.causal_conv import causal_conv3d

        y, _ = causal_conv3d(x, w, b, stride=st, cache=c, backend="cuda")
        seen.add(_kernel_name(x, w, st))
        worst = max(worst, _rel(y.double(), ref))
    torch.cuda.synchronize()
    print(f"sanitize case done ({', '.join(sorted(seen))}), worst rel err {worst:.2e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for conv_bench.csv/.md/.json")
    ap.add_argument("--no-t49", action="store_true", help="skip the [1,128,49,480,720] shape")
    ap.add_argument("--sanitize-case", action="store_true", help="run the small compute-sanitizer case only")
    ap.add_argument("--no-baselines", action="store_true", help="skip cuDNN at the three T=6 shapes")
    args = ap.parse_args(argv)
    if args.sanitize_case:
        sanitize_case()
        return 0
    rows = run_conv_bench(DEFAULT_SHAPES[:3], None, baselines=not args.no_baselines)
    if args.out:  # partial results survive a later failure or time-out
        write_results(rows, args.out)
    if not args.no_t49:  # the long clip
        rows += run_conv_bench(DEFAULT_SHAPES[3:], None)
    if args.out:
        write_results(rows, args.out)
    print(json.dumps(environment("cuda")))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
