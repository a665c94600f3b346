"""The ``cogvideox-kernels`` command: ``info`` and ``bench``."""
from __future__ import annotations

import argparse
import os
import sys

PRESETS = ("small", "2b", "5b", "1.5-5b")
OPS = ("attention", "ffn", "conv", "step", "vae")


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cmd_info(args) -> int:
    import torch

    from . import __version__
    from ._backend import interpret_mode, kernel_can_run, triton_available
    from ._ext import cuda_available, extension_available, extension_error

    print(f"cogvideox-kernels {__version__}")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}")
    if triton_available():
        import triton

        print(f"triton {triton.__version__} (interpreter {'on' if interpret_mode() else 'off'})")
    else:
        print("triton: not installed")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
              f"{p.multi_processor_count} SMs, CUDA {torch.version.cuda}")
    else:
        print("GPU: none (kernels run through the Triton interpreter and the C++ CPU path only)")
    print(f"extension _C: {'built' if extension_available() else 'missing' + extension_error()}; "
          f"CUDA kernels in it: {'yes' if cuda_available() else 'no'}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    kernels = {"rope3d_attention": ("triton",), "expert_ffn": ("triton",), "causal_conv3d": ("cuda", "cpp")}
    print("backends each op can use (besides 'reference'):")
    for op, ks in kernels.items():
        parts = []
        for dev in devices:
            usable = [k for k in ks if kernel_can_run(k, dev, auto=False)]
            auto = next((k for k in ks if kernel_can_run(k, dev, auto=True)), "reference")
            parts.append(f"{dev.type}: {', '.join(usable) or 'none'} (auto -> {auto})")
        print(f"  {op:<17} " + "; ".join(parts))
    return 0


def cmd_bench(args) -> int:
    import torch

    device = _device()
    preset = args.preset
    if device.type == "cpu":
        if preset != "small":
            print(f"no GPU here: preset {preset!r} needs one; running the 'small' preset on the CPU instead")
            preset = "small"
        # Triton kernels run on CPU tensors only in the interpreter, which must be switched on before
        # triton is first imported (torch imports it early): run this command again with it set.
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            os.environ["TRITON_INTERPRET"] = "1"
            sys.stdout.flush()
            os.execv(sys.executable, [sys.executable, "-m", "cogvideox_kernels.cli", *sys.argv[1:]])
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        print(f"unknown --ops {bad}; choose from {', '.join(OPS)}", file=sys.stderr)
        return 2

    from .bench.common import Progress, environment, measure_ceilings, table, write_outputs
    from .bench.suites import attention_cases, conv_cases, ffn_cases, run_cases

    dtype = torch.bfloat16
    env = environment(device)
    print(f"device: {env.get('gpu')} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    ceilings = measure_ceilings(device, quick=args.quick)
    print(f"measured ceilings: {ceilings['matmul_dtype']} matmul {ceilings['matmul_tflops']:.2f} TFLOP/s, "
          f"copy {ceilings['copy_gbps']:.0f} GB/s")
    cases = []
    if "attention" in ops:
        cases += attention_cases(preset, device, dtype)
    if "ffn" in ops:
        cases += ffn_cases(preset, device, dtype, compile_baseline=device.type == "cuda" and not args.no_compile)
    if "conv" in ops:
        cases += conv_cases(preset, device, dtype)
    extra_ops = [o for o in ops if o in ("step", "vae")]
    progress = Progress(len(cases) + len(extra_ops), enabled=not args.no_progress)
    results = run_cases(cases, device, ceilings, args.quick, progress)
    for op in extra_ops:
        results += run_model_bench(op, preset, device, args)
        progress.step(op)
    print(table(results))
    print("* partial baselines: SDPA without QK-norm/RoPE, GEMMs without norm/gate, zero instead of replicate "
          "padding; they are timed but not compared. speedup = baseline ms / ours ms.")
    if device.type == "cpu":
        print("\nCPU run: parity is real, timings are CPU (Triton interpreter / C++ path) and NOT comparable "
              "with GPU figures. Run on a GPU for the real benchmark.")
    out = args.out or os.path.join("bench-out", preset)
    paths = write_outputs(results, env, ceilings, out, preset)
    try:
        from .bench.plots import plot_results

        paths += plot_results(results, out, preset)
    except ImportError:
        print("(matplotlib not installed: no plots)")
    print("wrote " + ", ".join(paths))
    wrong = [r for r in results if r.status in ("wrong", "error") and r.kind == "ours"]
    return 1 if wrong else 0


def run_model_bench(op, preset, device, args):
    from .bench.common import Result

    try:
        from .bench.model import run_model_bench as run
    except ImportError as exc:
        return [Result(op, preset, "-", "ours", status="skipped", note=f"model bench unavailable: {exc}")]
    return run(op, preset, device, quick=args.quick, compile_variants=not args.no_compile)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cogvideox-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="device, versions, and which backend each op can use")
    b = sub.add_parser("bench", help="benchmark our kernels against the PyTorch/cuDNN/diffusers baselines")
    b.add_argument("--preset", choices=PRESETS, default="small", help="model shapes (default: small)")
    b.add_argument("--ops", default="attention,ffn,conv", help=f"comma list from {','.join(OPS)}")
    b.add_argument("--out", default=None, help="folder for CSV/JSON/markdown/PNG (default bench-out/<preset>)")
    b.add_argument("--quick", action="store_true", help="fewer repetitions")
    b.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    return cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
