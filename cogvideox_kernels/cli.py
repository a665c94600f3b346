"""The ``cogvideox-kernels`` command: ``info`` and ``bench``.

Arguments are parsed and checked before torch or triton is imported, so ``--help`` and argument
errors answer at once; each command imports what it needs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

PRESETS = ("small", "2b", "5b", "1.5-5b")
OPS = ("attention", "ffn", "conv", "step", "vae")
DEFAULT_OPS = ("attention", "ffn", "conv")

BENCH_HELP = f"""\
Times our kernels against PyTorch / cuDNN / diffusers baselines on the same inputs, after checking
each variant's parity against a float32 reference (a wrong kernel is reported, never timed).

By default it runs the kernel ops {', '.join(DEFAULT_OPS)}; step (one diffusers CogVideoX denoising
step) and vae (the diffusers VAE) need a CUDA GPU and diffusers and run only when named in --ops.
Without a GPU it runs the 'small' preset on the CPU (Triton kernels in the interpreter, the C++ conv
path): parity and errors are real, the timings are CPU figures and not the product's speed.

Writes bench_<preset>.csv/.json/.md to --out, and PNG plots when matplotlib is installed
(pip install 'cogvideox-kernels[bench]')."""


def _ops(text: str) -> list[str]:
    ops = [o.strip() for o in text.split(",") if o.strip()]
    if not ops:
        raise argparse.ArgumentTypeError(f"no op given; choose from {', '.join(OPS)}")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown op(s) {', '.join(map(repr, unknown))}; choose from {', '.join(OPS)}")
    return list(dict.fromkeys(ops))


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot take the output files, or None when it can (it is created if missing)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvideox-kernels", description="CogVideoX GPU kernels: 'info' shows the "
                                     "device and the backends each op can use, 'bench' benchmarks the kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="device, versions, and which backend each op can use")
    b = sub.add_parser("bench", help="benchmark our kernels against the PyTorch/cuDNN/diffusers baselines",
                       description=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--preset", choices=PRESETS, default="small",
                   help="model shapes (default: small; the others need a GPU)")
    b.add_argument("--ops", type=_ops, default=list(DEFAULT_OPS),
                   help=f"comma list from {','.join(OPS)} (default: {','.join(DEFAULT_OPS)})")
    b.add_argument("--out", default=None, help="folder for CSV/JSON/markdown/PNG (default: bench-out/<preset>)")
    b.add_argument("--quick", action="store_true", help="fewer repetitions")
    b.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def cmd_info(args) -> int:
    import torch

    from . import __version__
    from ._backend import interpret_mode, triton_available
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
    from .ops import registry

    print("backends each op can use (besides 'reference'), from the op registry:")
    print("\n".join("  " + line for line in registry.describe().splitlines()))
    from .ops.attention.reference import PRECISIONS as ATTENTION_PRECISIONS
    from .ops.expert_ffn.reference import PRECISIONS as FFN_PRECISIONS

    print(f"precision= of the ops (bf16 exact, the others lossy and opt-in): rope3d_attention "
          f"{', '.join(ATTENTION_PRECISIONS)}; expert_ffn {', '.join(FFN_PRECISIONS)}")
    try:
        from .integrations.diffusers.state import PRECISION_MODES
    except ImportError:  # pragma: no cover - the integration imports without diffusers
        return 0
    modes = "; ".join(f"{mode} (attention {ops['rope3d_attention']}, FFN {ops['expert_ffn']})"
                      for mode, ops in PRECISION_MODES.items())
    print(f"apply(..., precision=) modes: {modes}")
    return 0


def cmd_bench(args, argv: list[str] | None) -> int:
    import torch

    preset = args.preset
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            # Triton kernels run on CPU tensors only in its interpreter, which is chosen when the
            # kernels are defined: switch it on before triton loads, or run in a child process.
            if argv is None and "triton" not in sys.modules:
                os.environ["TRITON_INTERPRET"] = "1"
            else:  # called from Python (leave the caller's environment alone) or triton already loaded
                sys.stdout.flush()
                child = [sys.executable, "-m", "cogvideox_kernels.cli", *(sys.argv[1:] if argv is None else argv)]
                return subprocess.call(child, env={**os.environ, "TRITON_INTERPRET": "1"})
        if preset != "small":
            print(f"no GPU here: preset {preset!r} needs one; running the 'small' preset on the CPU instead")
            preset = "small"
    from .bench.runner import run_bench

    return run_bench(preset, args.ops, args.out or os.path.join("bench-out", preset), quick=args.quick,
                     compile_baselines=not args.no_compile, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    """Entry point. ``argv`` (without the program name) defaults to the command line."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    out = args.out or "bench-out"  # the default is bench-out/<preset>: check the folder that holds it
    why = _unwritable(out)
    if why:
        parser.exit(2, f"cogvideox-kernels bench: error: --out {out}: cannot write there ({why})\n")
    return cmd_bench(args, None if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
