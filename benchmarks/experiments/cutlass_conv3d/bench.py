"""GPU check + timing of the CUTLASS sm90 implicit-GEMM conv3d experiment (issue 14) against cuDNN.

Builds conv3d_sm90.cu + binding.cpp with torch.utils.cpp_extension.load (sm_90a), then for each VAE
shape [1, C, 6+2, H, W] (C = C_out, (3,3,3) filter, padding (0,1,1), bias) and each compiled config:
  * correctness: output NaN-poisoned first, compared with a float32 conv3d (TF32 off) of the same bf16
    inputs by ||out - ref|| / ||ref||, beside cuDNN's own bf16 error; once per shape also with
    non-contiguous x (a frame slice and a channel slice of larger tensors) and weight;
  * timing: CUDA events, median of repeated runs, vs F.conv3d on channels_last_3d tensors (cuDNN).
ratio = cudnn_ms / cutlass_ms (issue 14's bar: >= 0.95).

Needs the nvidia-cutlass wheel's headers: CUTLASS_DIR=<...>/cutlass_library/source, or the wheel
installed (found without importing it). About a minute of compile plus seconds of GPU time:
    python3 benchmarks/experiments/cutlass_conv3d/bench.py [--out DIR] [--configs 0,1,2]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
SHAPES = [(128, 480, 720), (256, 240, 360), (512, 60, 90)]  # (C = C_out, H, W); frames 6 + 2 cache
FRAMES = 6 + 2
PADDING = (0, 1, 1)


def cutlass_dir() -> Path:
    if os.environ.get("CUTLASS_DIR"):
        return Path(os.environ["CUTLASS_DIR"])
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("nvidia-cutlass not found: install its wheel or set CUTLASS_DIR=<...>/cutlass_library/source")
    return Path(list(spec.submodule_search_locations)[0]) / "source"


def build():
    from torch.utils.cpp_extension import load

    src = cutlass_dir()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")  # wgmma / TMA need sm_90a
    build_dir = Path(os.environ.get("CUTLASS_CONV3D_BUILD", "/tmp/cutlass_conv3d_ext"))
    build_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ext = load(
        name="cutlass_conv3d_ext",
        sources=[str(HERE / "binding.cpp"), str(HERE / "conv3d_sm90.cu")],
        extra_include_paths=[str(HERE), str(src / "include"), str(src / "tools" / "util" / "include")],
        extra_cflags=["-O2"],
        extra_cuda_cflags=["-O3", "-DNDEBUG", "-std=c++17", "--expt-relaxed-constexpr", "--expt-extended-lambda",
                           "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                           "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
                           "-Xptxas=-v"],
        build_directory=str(build_dir),
        verbose=False,
    )
    print(f"built in {time.time() - t0:.1f} s (CUTLASS headers {src})", flush=True)
    return ext


def run_ext(ext, x, w, b, config, out=None):
    return ext.conv3d_fprop(x, w, b, list(PADDING), config, torch.cuda.current_stream().cuda_stream, out)


def rel_err(out, ref):
    out = out.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def time_ms(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def inputs(c, h, wd, gen):
    x = torch.randn(1, c, FRAMES, h, wd, device="cuda", generator=gen).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(c, c, 3, 3, 3, device="cuda", generator=gen) / math.sqrt(27 * c)).to(torch.bfloat16)
    w = w.contiguous(memory_format=torch.channels_last_3d)
    b = torch.randn(c, device="cuda", generator=gen).to(torch.bfloat16)
    return x, w, b


def strided_copies(x, w):
    """Same values, non-contiguous views: x as a frame + channel slice, w as a channel slice."""
    n, c, t, h, wd = x.shape
    big = torch.randn(n, 2 * c, t + 1, h, wd, device="cuda").to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d)
    xs = big[:, c:, 1:]
    xs.copy_(x)
    wbig = torch.randn(w.shape[0], 2 * c, *w.shape[2:], device="cuda").to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d)
    ws = wbig[:, :c]
    ws.copy_(w)
    assert not xs.is_contiguous(memory_format=torch.channels_last_3d) and xs.stride(1) == 1
    assert not ws.is_contiguous(memory_format=torch.channels_last_3d) and ws.stride(1) == 1
    return xs, ws


def poisoned_out(x, w):
    n, _, t, h, wd = x.shape
    shape = (n, w.shape[0], t + 2 * PADDING[0] - 2, h, wd)  # (3,3,3) filter, stride 1
    return torch.full(shape, float("nan"), device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None, help="folder for cutlass_conv3d.json / .md")
    ap.add_argument("--configs", default=None, help="comma-separated config indices (default: all)")
    args = ap.parse_args()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    ext = build()
    names = ext.configs()
    configs = [int(i) for i in args.configs.split(",")] if args.configs else list(range(len(names)))
    for i in configs:
        print(f"config {i}: {names[i]}")
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "commit": os.environ.get("COMMIT", "")}
    print(json.dumps(env), flush=True)

    # A wrong-layout input must be refused, not silently misread.
    x0, w0, b0 = inputs(128, 8, 8, torch.Generator("cuda").manual_seed(1))
    try:
        run_ext(ext, x0.contiguous(), w0, b0, configs[0])
        print("ERROR: NCDHW-contiguous x was accepted")
    except ValueError as e:
        print(f"NCDHW x refused: {str(e).splitlines()[0][:100]}")

    rows = []
    gen = torch.Generator("cuda").manual_seed(0)
    for c, h, wd in SHAPES:
        x, w, b = inputs(c, h, wd, gen)
        ref = F.conv3d(x.float(), w.float(), b.float(), padding=PADDING)
        cudnn = lambda: F.conv3d(x, w, b, padding=PADDING)  # noqa: E731
        y_cudnn = cudnn()
        flops = 2 * ref.numel() * c * 27
        cudnn_ms = time_ms(cudnn)
        row0 = dict(shape=f"1x{c}x{FRAMES}x{h}x{wd}", impl="cudnn", ms=cudnn_ms, tflops=flops / cudnn_ms / 1e9,
                    ratio=1.0, rel_err=rel_err(y_cudnn, ref), strided_rel_err=None)
        rows.append(row0)
        xs, ws = strided_copies(x, w)
        for cfg in configs:
            name = names[cfg].split(" ")[0]
            row = dict(shape=row0["shape"], impl=name, ms=None, tflops=None, ratio=None, rel_err=None,
                       strided_rel_err=None)
            try:
                y = run_ext(ext, x, w, b, cfg, out=poisoned_out(x, w))
                torch.cuda.synchronize()
                row["rel_err"] = rel_err(y, ref)
                ys = run_ext(ext, xs, ws, b, cfg, out=poisoned_out(x, w))
                torch.cuda.synchronize()
                row["strided_rel_err"] = rel_err(ys, ref)
                ms = time_ms(lambda: run_ext(ext, x, w, b, cfg))  # noqa: B023
                row.update(ms=ms, tflops=flops / ms / 1e9, ratio=cudnn_ms / ms)
            except Exception as e:  # keep going: report what failed
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
        del x, w, b, ref, y_cudnn, xs, ws
        torch.cuda.empty_cache()

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = ["| shape | impl | ms | TFLOP/s | cudnn_ms / ms | rel_err | strided rel_err | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['impl']} | {f(r['ms'], '.4f')} | {f(r['tflops'], '.1f')} | "
                     f"{f(r['ratio'], '.3f')} | {f(r['rel_err'], '.3e')} | {f(r['strided_rel_err'], '.3e')} | "
                     f"{r.get('error', '')} |")
    table = "\n".join(lines)
    print(table, flush=True)
    # accuracy bar: within 2x cuDNN's own bf16 error against the same float32 reference (NaN fails)
    budget = {r["shape"]: 2 * r["rel_err"] for r in rows if r["impl"] == "cudnn"}
    bad = [r for r in rows if r["impl"] != "cudnn" and (
        r.get("error") or not (r["rel_err"] <= budget[r["shape"]] and r["strided_rel_err"] <= budget[r["shape"]]))]
    print("ACCURACY: " + ("ok (every config within 2x cuDNN's bf16 error, contiguous and strided)" if not bad
                          else "FAILED for " + ", ".join(f"{r['shape']} {r['impl']}" for r in bad)))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cutlass_conv3d.json").write_text(json.dumps({"env": env, "configs": names, "rows": rows},
                                                                 indent=1))
        (args.out / "cutlass_conv3d.md").write_text(f"{json.dumps(env)}\n\n{table}\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
