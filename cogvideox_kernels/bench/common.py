"""The harness of every benchmark here (``cogvideox-kernels bench``, ``bench/step.py`` and the
``benchmarks/*.py`` scripts): one timer, one environment record, peak memory, ceilings, and the
table / CSV / JSON / markdown writers of the CLI.

Benchmarks are not tests: on a GPU kernels are timed with ``triton.testing.do_bench`` (median after
warm-up; Triton autotuning runs inside the first, untimed call) and model-scale calls with CUDA events;
on a CPU with wall-clock medians, which are marked as CPU figures and are not the product's speed.
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
from importlib import metadata

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
    backend: str = ""  # what ran: "triton", "triton (interpreter)", "cuda", "cpp", "torch", ...


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Marks on the device's timeline: CUDA events on the current stream (GPU) or ``perf_counter``
    (CPU). ``ms(start, stop)`` is valid once the work between the two marks is done (after a sync)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, stop) -> float:
        return start.elapsed_time(stop) if self.cuda else (stop - start) * 1e3


def time_ms(fn, device, *, quick: bool = False, rep_ms: float | None = None, reps: int | None = None,
            warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` on ``device``: the one timer of every benchmark here.

    GPU, kernel scale (``reps`` not given): one untimed call (compilation and autotuning stay out of
    the timed region), then ``triton.testing.do_bench`` over ``rep_ms`` of repetitions (100 ms, 30
    with ``quick``), L2 flushed between them. GPU, model scale (``reps`` given, for calls of seconds):
    ``warmup`` untimed calls, then the median of ``reps`` calls, each timed with CUDA events.
    CPU: ``warmup`` untimed calls, then the median of ``reps`` wall-clock calls (5, 3 with ``quick``).
    """
    device = torch.device(device)
    if device.type == "cuda" and reps is None:
        import triton.testing

        fn()
        torch.cuda.synchronize(device)
        rep = rep_ms or (30 if quick else 100)
        return float(triton.testing.do_bench(fn, warmup=max(10 if quick else 25, rep // 5), rep=rep,
                                             return_mode="median"))
    for _ in range(warmup):
        fn()
    watch = Stopwatch(device)
    times = []
    for _ in range(reps or (3 if quick else 5)):
        sync(device)
        start = watch.mark()
        fn()
        stop = watch.mark()
        sync(device)
        times.append(watch.ms(start, stop))
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


def peak_memory_gib(fn, device) -> float | None:
    """GiB that one call of ``fn`` allocates above what was allocated before it (None on CPU)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def measure_ceilings(device, quick: bool = False) -> dict:
    """bf16 matmul TFLOP/s and copy bandwidth (read + write) measured on this GPU; {} on a CPU,
    where such ceilings would say nothing about the product."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    n = 4096 if quick else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device, quick=True)
    src = torch.empty(2**28, device=device, dtype=torch.uint8).random_()  # 256 MiB
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, quick=True)
    return {"matmul_tflops": 2 * n**3 / ms / 1e9, "copy_gbps": 2 * src.numel() / copy_ms / 1e6,
            "matmul_dtype": "bfloat16"}


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


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device=None) -> dict:
    """Where a figure comes from: date, commit, host, versions, the GPU (``gpu`` is None on a CPU)
    and the command line. The one environment record of every benchmark here."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    from .._ext import cuda_available

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "device": str(device), "gpu": None, "sm": None,
        "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
        "diffusers": _version("diffusers"), "extension_cuda": cuda_available(),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "cuda": torch.version.cuda, "cudnn": None, "nccl": None, "driver": None,
        "platform": platform.platform(), "host": platform.node(),
        "package": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm=f"{props.major}.{props.minor}", cudnn=str(torch.backends.cudnn.version()))
        try:
            env["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:
            pass
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            env["driver"] = "unknown"
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


GPU_NOTE = ("* partial baselines (SDPA without QK-norm/RoPE, GEMMs without norm/gate, zero instead of replicate "
            "padding) compute a different function: timed, not parity-checked; speedup = baseline ms / ours ms.")
CPU_NOTE = ("CPU run: parity and errors are real (each variant against a float32 reference; ours within its budget).\n"
            "CPU ms are CPU timings of the Triton interpreter, the C++ CPU path and PyTorch on the CPU: they are NOT "
            "the product's speed,\nand say nothing about speedups. Run on a GPU for the benchmark "
            "(cogvideox-kernels bench --preset 5b).")


def _parity(r: Result) -> str:
    if r.status == "error":
        return f"ERROR ({r.note})"
    if r.status == "skipped":
        return f"skipped ({r.note})" if r.note else "skipped"
    if r.status == "wrong":
        return f"WRONG ({r.note})"
    if r.kind == "ours":
        return "ok" if r.budget is not None else "ok (not compared)"
    return "baseline" if r.rel_err is not None else "not compared"


def table(results: list[Result], device_type: str = "cuda") -> str:
    """Terminal table, one row per (op, shape, variant). On a GPU: time, throughput, share of the
    measured ceiling, error, memory, speedups. On a CPU only what a CPU run can tell: which backend
    ran, its error against the float32 reference and the budget, parity, and CPU milliseconds."""
    if device_type == "cuda":
        head = ["op", "shape", "variant", "ms", "TFLOP/s", "GB/s", "%ceil", "rel err", "peak GiB", "speedup", "status"]
        rows = []
        for r in results:
            sp = " | ".join(f"{v:.2f}x {k}" for k, v in r.speedups.items())
            rows.append([r.op, r.shape, r.variant, fmt(r.ms, ".3f"), fmt(r.tflops, ".1f"), fmt(r.gbps, ".0f"),
                         fmt(r.pct_ceiling, ".0f"), fmt(r.rel_err, ".1e"), fmt(r.peak_mem_gib, ".2f"), sp or "-",
                         r.status + (f" ({r.note})" if r.note and r.status != "ok" else "")])
    else:
        head = ["op", "shape", "variant", "backend", "rel err", "budget", "parity", "CPU ms*"]
        rows = [[r.op, r.shape, r.variant, r.backend or "-", fmt(r.rel_err, ".1e"), fmt(r.budget, ".1e"), _parity(r),
                 fmt(r.ms, ".1f")] for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    body = "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
    return body + "\n\n" + (GPU_NOTE if device_type == "cuda" else "* " + CPU_NOTE)


def write_outputs(results: list[Result], env: dict, ceilings: dict, out_dir: str, tag: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    device_type = "cuda" if env.get("gpu") else "cpu"
    paths = []
    csv_path = os.path.join(out_dir, f"bench_{tag}.csv")
    meta = {**env, **{f"ceiling_{k}": v for k, v in ceilings.items()}}
    if device_type == "cpu":
        meta["note"] = "CPU timings: not the product's speed"
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
        json.dump({"environment": meta, "ceilings": ceilings, "results": [asdict(r) for r in results]}, f, indent=1)
    paths.append(json_path)
    md_path = os.path.join(out_dir, f"bench_{tag}.md")
    with open(md_path, "w") as f:
        f.write(f"# cogvideox-kernels bench ({tag})\n\n")
        for k, v in meta.items():
            f.write(f"- {k}: {v}\n")
        f.write("\n```\n" + table(results, device_type) + "\n```\n")
    paths.append(md_path)
    return paths
