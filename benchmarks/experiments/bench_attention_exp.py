"""Benchmark: packed 16-bit softmax exponentials (``exp_x2``) in the Triton attention kernel.

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python3 benchmarks/experiments/bench_attention_exp.py --out DIR

(Run 3 of benchmarks/results/attention_notes.md; the option now lives in attention_variants.py here.)

``exp_x2=1`` computes P = 2^(s - m) as ``ex2.approx.ftz.bf16x2`` (fp16 inputs: ``ex2.approx.f16x2``)
on the fp32 argument rounded to 16 bits, instead of one fp32 ``ex2.approx`` per element;
``exp_x2=2`` does it in fp16 for bf16 inputs too (P cast back to bf16 for the PV dot). For each
shape (5B, 2B, 1.5-5B of DESIGN.md) this times, in one process and alternating the modes:

* the attention kernel alone on head-major q/k/v made once by the pre-pass (forced configs:
  128x64 blocks, 8 warps, 3/4 stages, TMA and pointer loads),
* the whole fused path (pre-passes + autotuned kernel) with exp_x2 0 and 1,
* cuDNN SDPA alone (reference time),

and checks every output against a float64 reference on sampled query rows (plus, at 5B, the
diffusers-style bf16 path's error for the "<= 2x PyTorch's own error" rule). At the end it counts
MUFU instructions in the cubins Triton compiled in this run. Writes attention_exp.{json,md} to --out.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, ".."), os.path.join(HERE, "..", "..")]

from attention_variants import _exp2_x2  # noqa: E402
from attention_variants import attention_variant_fwd as rope3d_attention_fwd  # noqa: E402
from bench_attention import (SHAPES, diffusers_style_path, make_inputs, reference_rows, rel_error,  # noqa: E402
                             sample_rows, sdpa_alone)
from cogvideox_kernels.bench.common import environment, time_ms  # noqa: E402
from cogvideox_kernels.ops.attention.reference import attention_flops  # noqa: E402
from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd  # noqa: E402


@triton.jit
def _mufu_probe_kernel(x_ptr, o_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr):
    """ITERS rounds of y = 2^-y on BLOCK independent elements per program: MUFU-bound.
    MODE 0: float32 exp2; 1: ex2.approx.ftz.bf16x2; 2: ex2.approx.f16x2."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(x_ptr + offs)
    if MODE == 0:
        for _ in range(ITERS):
            y = tl.math.exp2(-y)
    else:
        z = y.to(tl.bfloat16) if MODE == 1 else y.to(tl.float16)
        for _ in range(ITERS):
            z = _exp2_x2(-z, 1)
        y = z.to(tl.float32)
    tl.store(o_ptr + offs, y)


def mufu_probe(log=print):
    """Exponentials per second of the three forms on the whole GPU (one number each)."""
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    block, iters, grid = 8192, 512, n_sm * 16
    x = torch.rand(grid * block, device="cuda")
    o = torch.empty_like(x)
    rows = []
    for mode, name in ((0, "fp32 ex2.approx.ftz.f32"), (1, "ex2.approx.ftz.bf16x2"),
                       (2, "ex2.approx.f16x2")):
        fn = lambda m=mode: _mufu_probe_kernel[(grid,)](x, o, ITERS=iters, BLOCK=block, MODE=m,  # noqa: E731
                                                       num_warps=8)
        try:
            fn()
            torch.cuda.synchronize()
            ms = time_ms(fn, "cuda")
            rate = grid * block * iters / ms / 1e6  # exponentials per nanosecond
            row = dict(kind="mufu_probe", variant=name, ms=round(ms, 4),
                       gexp_per_s=round(rate, 1),
                       per_sm_per_clk_at_1980mhz=round(rate / (n_sm * 1.98), 2),
                       finite=bool(torch.isfinite(o).all()))
        except Exception as e:
            row = dict(kind="mufu_probe", variant=name, error=f"{type(e).__name__}: {e}"[:200])
        log(json.dumps(row))
        rows.append(row)
    return rows


def cfg(stages, tma, exp_x2):
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=stages, USE_TMA=tma,
                WARP_SPECIALIZE=False, POLY_EXP=False, EXP_X2=exp_x2)


# (label, stages, tma, exp_x2); pairs run back to back so drift hits both modes alike
KERNEL_VARIANTS = {
    "5b": [("tma s3", 3, True, 0), ("tma s3", 3, True, 1), ("tma s3", 3, True, 2),
           ("tma s4", 4, True, 0), ("tma s4", 4, True, 1),
           ("ptr s3", 3, False, 0), ("ptr s3", 3, False, 1),
           ("ptr s4", 4, False, 0), ("ptr s4", 4, False, 1),
           ("tma s3 (again)", 3, True, 0), ("tma s3 (again)", 3, True, 1)],
    "2b": [("tma s3", 3, True, 0), ("tma s3", 3, True, 1),
           ("ptr s3", 3, False, 0), ("ptr s3", 3, False, 1)],
    "1.5-5b": [("tma s3", 3, True, 0), ("tma s3", 3, True, 1),
               ("tma s4", 4, True, 0), ("tma s4", 4, True, 1)],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="5b,2b,1.5-5b")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="start no new measurement after this many seconds")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    env = environment("cuda")
    print(json.dumps(env), flush=True)
    results = []
    for row in mufu_probe(log=lambda r: print(r, flush=True)):
        results.append(dict(shape="-", **row))

    def save():
        with open(os.path.join(args.out, "attention_exp.json"), "w") as f:
            json.dump(dict(env=env, results=results), f, indent=1)

    def record(shape_name, kind, name, fn, ref_rows, rows, flops, rep, **extra):
        row = dict(shape=shape_name, kind=kind, variant=name, **extra)
        if time.time() - t_start > args.budget_s:
            row["error"] = "skipped: time budget spent"
        else:
            try:
                t0 = time.time()
                out = fn()
                torch.cuda.synchronize()
                row["first_call_s"] = round(time.time() - t0, 1)
                if ref_rows is not None:
                    row["rel_err"] = rel_error(out, ref_rows, rows)
                del out
                ms = time_ms(fn, "cuda", rep_ms=rep)
                row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
            except Exception as e:  # keep going: record why a variant failed
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(json.dumps(row), flush=True)
        results.append(row)
        save()
        return row

    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        B, H, S, D = shape["B"], shape["H"], shape["S"], shape["D"]
        flops = attention_flops(B, S, H, D)
        rep = 300 if S < 30000 else 600
        if time.time() - t_start > args.budget_s:
            print(f"{shape_name}: skipped, time budget spent", flush=True)
            continue
        inp = make_inputs(shape)
        rows = sample_rows(S, shape["text_len"])
        ref = reference_rows(inp, rows)
        q, k, v, t = inp["q"], inp["k"], inp["v"], inp["text_len"]
        qn, kn, cos, sin, scale = inp["q_norm"], inp["k_norm"], inp["cos"], inp["sin"], inp["scale"]
        # the pre-pass once: head-major, normed and rotated q/k, head-major v
        q2 = qk_norm_rope_fwd(q, t, cos, sin, qn[0], qn[1], True, 1e-6)
        k2 = qk_norm_rope_fwd(k, t, cos, sin, kn[0], kn[1], True, 1e-6)
        v2 = qk_norm_rope_fwd(v, 0, None, None, None, None, False, 1e-6)
        torch.cuda.synchronize()

        for label, stages, tma, x2 in KERNEL_VARIANTS[shape_name]:
            c = cfg(stages, tma, x2)
            record(shape_name, "kernel", f"kernel 128x64 w8 {label} exp_x2={x2}",
                   lambda c=c: rope3d_attention_fwd(q2, k2, v2, t, None, None, None, None, None,
                                                    None, False, False, 1e-6, scale,
                                                    relayout_kv=False, config=c),
                   ref, rows, flops, rep, exp_x2=x2, config=label)
        for x2 in (0, 1):
            record(shape_name, "full", f"full fused path (pre-passes + autotuned) exp_x2={x2}",
                   lambda x2=x2: rope3d_attention_fwd(q, k, v, t, cos, sin, qn[0], qn[1], kn[0],
                                                      kn[1], True, True, 1e-6, scale, exp_x2=x2),
                   ref, rows, flops, rep, exp_x2=x2)
        record(shape_name, "baseline", "SDPA cuDNN alone (no norm/rope)",
               lambda: sdpa_alone(q, k, v, scale, "cudnn"), None, rows, flops, rep)
        if shape_name == "5b":
            row = dict(shape=shape_name, kind="parity", variant="diffusers-style bf16 path (error only)")
            try:
                row["rel_err"] = rel_error(diffusers_style_path(q, k, v, text_len=t, cos=cos, sin=sin,
                                                                q_norm=qn, k_norm=kn, scale=scale),
                                           ref, rows)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            print(json.dumps(row), flush=True)
            results.append(row)
            save()
        del inp, ref, q, k, v, q2, k2, v2
        torch.cuda.empty_cache()

    # fp16 inputs take ex2.approx.f16x2: a small parity check of that path (scale 0.125 = 64^-0.5)
    if time.time() - t_start < args.budget_s + 15:
        from cogvideox_kernels.ops.attention.reference import rope3d_attention_reference

        g = torch.Generator(device="cuda").manual_seed(5)
        for dtype in (torch.float16,):
            qkv = torch.randn(2, 1000, 3, 3, 64, device="cuda", generator=g).to(dtype)
            a, b_, c_ = qkv.unbind(2)
            want = rope3d_attention_reference(a, b_, c_, text_len=0, compute_dtype=torch.float64)
            for x2 in (0, 1):
                try:
                    got = rope3d_attention_fwd(a, b_, c_, 0, None, None, None, None, None, None,
                                               False, False, 1e-6, 0.125, config=cfg(3, False, x2))
                    err = ((got.double() - want).norm() / want.norm()).item()
                    row = dict(shape="small B2 S1000 H3 D64", kind="parity", dtype=str(dtype),
                               variant=f"kernel 128x64 w8 ptr s3 exp_x2={x2}", exp_x2=x2, rel_err=err)
                except Exception as e:
                    row = dict(shape="small", kind="parity", dtype=str(dtype), exp_x2=x2,
                               error=f"{type(e).__name__}: {e}"[:200])
                print(json.dumps(row), flush=True)
                results.append(row)
        save()

    # MUFU instructions in this run's compiled attention kernels (does ptxas pack the pairs?)
    sass_lines = []
    cuobjdump = None
    try:
        import triton

        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
        for path in sorted(glob.glob(os.path.join(cache, "*", "_attention_variant_kernel.cubin"))):
            sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
            mufu = {}
            for op in re.findall(r"MUFU\.[A-Z0-9.]+", sass):
                mufu[op] = mufu.get(op, 0) + 1
            n = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, re.M))
            sass_lines.append(f"{os.path.basename(os.path.dirname(path))[:12]} instructions {n} {mufu}")
    except Exception as e:
        sass_lines.append(f"sass count failed: {type(e).__name__}: {e}")
    print("\n".join(["compiled attention kernels (MUFU counts):"] + sass_lines), flush=True)

    write_table(results, env, sass_lines, args.out)
    save()


def write_table(results, env, sass_lines, out_dir):
    lines = [f"GPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, "
             f"commit {env['commit']}", "",
             "| shape | variant | ms | TFLOP/s | rel err vs fp64 | first call s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r.get('variant', '')} | {r['error']} | | | |")
            continue
        ms = f"{r['ms']:.3f}" if "ms" in r else ""
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        if r.get("kind") == "mufu_probe":
            tf = f"{r['gexp_per_s']} Gexp/s = {r['per_sm_per_clk_at_1980mhz']}/clk/SM at 1.98 GHz"
        err = f"{r['rel_err']:.2e}" if r.get("rel_err") is not None else ""
        dt = f" ({r['dtype']})" if "dtype" in r else ""
        lines.append(f"| {r['shape']} | {r['variant']}{dt} | {ms} | {tf} | {err} | "
                     f"{r.get('first_call_s', '')} |")
    lines += ["", "Compiled attention kernels in this run, MUFU instruction counts:", ""]
    lines += [f"    {s}" for s in sass_lines]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "attention_exp.md"), "w") as f:
        f.write(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
