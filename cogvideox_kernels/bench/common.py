"""Timing, ceilings, environment and output helpers of the benchmark suite.

Benchmarks are not tests: on a GPU they time with ``triton.testing.do_bench`` (median after
warm-up; Triton autotuning runs inside the warm-up call before timing); on a CPU they time with a
median of wall-clock repeats and are marked as CPU figures, not comparable with GPU ones.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Result:
    op: str
    shape: str
    variant: str
    kind: str  # "ours" or "baseline"
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    pct_ceiling: float | None = None  # % of the measured ceiling that bounds this op (FLOPs or bytes)
    rel_err: float | None = None
    budget: float | None = None
    peak_mem_gib: float | None = None
    status: str = "ok"  # ok | wrong | error | skipped
    note: str = ""
    speedups: dict = field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, quick: bool = False) -> float:
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        fn()  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                             return_mode="median"))
    fn()
    times = []
    reps = 3 if quick else 5
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profiled_kernel_ms(prof) -> list[tuple[float, str]]:
    """(GPU ms, name) of every kernel a ``torch.profiler`` run recorded (profiler steps left out)."""
    kernels = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:  # older torch
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if us and not evt.key.startswith("ProfilerStep"):
            kernels.append((us / 1e3, evt.key))
    return kernels


def peak_memory_gib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def measure_ceilings(device: torch.device, quick: bool = False) -> dict:
    """Matmul TFLOP/s (bf16 on GPU, fp32 on CPU) and copy bandwidth (read + write), measured here."""
    if device.type == "cuda":
        n = 4096 if quick else 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        ms = time_ms(lambda: a @ b, device, quick=True)
        src = torch.empty(2**28, device=device, dtype=torch.uint8).random_()  # 256 MiB
        dst = torch.empty_like(src)
        copy_ms = time_ms(lambda: dst.copy_(src), device, quick=True)
        return {"matmul_tflops": 2 * n**3 / ms / 1e9, "copy_gbps": 2 * src.numel() / copy_ms / 1e6,
                "matmul_dtype": "bfloat16"}
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = time_ms(lambda: a @ b, device, quick=True)
    src = torch.randn(2**22)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, quick=True)
    return {"matmul_tflops": 2 * n**3 / ms / 1e9, "copy_gbps": 2 * src.numel() * 4 / copy_ms / 1e6,
            "matmul_dtype": "float32"}


def git_commit() -> str:
    """The commit of this checkout (``COGVIDEOX_KERNELS_COMMIT`` wins: a copied tree has no .git)."""
    if os.environ.get("COGVIDEOX_KERNELS_COMMIT"):
        return os.environ["COGVIDEOX_KERNELS_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "python": sys.version.split()[0], "torch": torch.__version__,
        "commit": git_commit(), "platform": platform.platform(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "missing"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=str(torch.backends.cudnn.version()))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            env["driver"] = "unknown"
    else:
        env["gpu"] = "none (CPU timings: not comparable with GPU figures)"
    return env


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 28
        filled = int(width * self.done / self.total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label[:60]:<60}")
        sys.stderr.flush()
        if self.done >= self.total:
            sys.stderr.write("\n")


def fmt(v, spec=".2f", empty="-"):
    return empty if v is None else format(v, spec)


def table(results: list[Result]) -> str:
    """Terminal table: one row per (op, shape, variant)."""
    head = ["op", "shape", "variant", "ms", "TFLOP/s", "GB/s", "%ceil", "rel err", "peak GiB", "speedup", "status"]
    rows = []
    for r in results:
        sp = " | ".join(f"{v:.2f}x {k}" for k, v in r.speedups.items())
        rows.append([r.op, r.shape, r.variant, fmt(r.ms, ".3f"), fmt(r.tflops, ".1f"), fmt(r.gbps, ".0f"),
                     fmt(r.pct_ceiling, ".0f"), fmt(r.rel_err, ".1e"), fmt(r.peak_mem_gib, ".2f"), sp or "-",
                     r.status + (f" ({r.note})" if r.note and r.status != "ok" else "")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def write_outputs(results: list[Result], env: dict, ceilings: dict, out_dir: str, tag: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    csv_path = os.path.join(out_dir, f"bench_{tag}.csv")
    meta = {**env, **{f"ceiling_{k}": v for k, v in ceilings.items()}}
    with open(csv_path, "w", newline="") as f:
        for k, v in meta.items():
            f.write(f"# {k}: {v}\n")
        fields = [k for k in asdict(results[0]).keys()] if results else []
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results:
            row = asdict(r)
            row["speedups"] = ";".join(f"{k}={v:.3f}" for k, v in r.speedups.items())
            writer.writerow(row)
    paths.append(csv_path)
    json_path = os.path.join(out_dir, f"bench_{tag}.json")
    with open(json_path, "w") as f:
        json.dump({"environment": env, "ceilings": ceilings, "results": [asdict(r) for r in results]}, f, indent=1)
    paths.append(json_path)
    md_path = os.path.join(out_dir, f"bench_{tag}.md")
    with open(md_path, "w") as f:
        f.write(f"# cogvideox-kernels bench ({tag})\n\n")
        for k, v in meta.items():
            f.write(f"- {k}: {v}\n")
        f.write("\n```\n" + table(results) + "\n```\n")
    paths.append(md_path)
    return paths
