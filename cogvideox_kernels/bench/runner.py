"""``cogvideox-kernels bench``: run the chosen ops at a preset, print the table, write the files."""
from __future__ import annotations

import torch

from .common import Progress, Result, environment, measure_ceilings, table, write_outputs
from .suites import attention_cases, conv_cases, ffn_cases, run_cases


def run_bench(preset: str, ops: list[str], out: str, *, quick: bool = False, compile_baselines: bool = True,
              progress: bool = True) -> int:
    """Exit status: 0, or 1 when one of our kernels was wrong or failed."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    env = environment(device)
    if device.type == "cuda":
        print(f"device: {env['gpu']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
        ceilings = measure_ceilings(device, quick=quick)
        print(f"measured ceilings: {ceilings['matmul_dtype']} matmul {ceilings['matmul_tflops']:.2f} TFLOP/s, "
              f"copy {ceilings['copy_gbps']:.0f} GB/s")
    else:
        interp = "on" if env["triton_interpreter"] else "off"
        print(f"device: CPU | torch {env['torch']} | triton {env['triton']} (interpreter {interp}) | "
              f"commit {env['commit']}")
        ceilings = {}
    cases = []
    if "attention" in ops:
        cases += attention_cases(preset, device, dtype)
    if "ffn" in ops:
        cases += ffn_cases(preset, device, dtype, compile_baseline=device.type == "cuda" and compile_baselines)
    if "conv" in ops:
        cases += conv_cases(preset, device, dtype)
    model_ops = [o for o in ops if o in ("step", "vae")]
    bar = Progress(len(cases) + len(model_ops), enabled=progress)
    results = run_cases(cases, device, ceilings, quick, bar)
    for op in model_ops:
        results += _model_bench(op, preset, device, quick, compile_baselines)
        bar.step(op)
    print(table(results, device.type))
    paths = write_outputs(results, env, ceilings, out, preset)
    try:
        from .plots import plot_results
    except ImportError:
        print("(no plots: matplotlib is not installed; pip install 'cogvideox-kernels[bench]')")
    else:
        paths += plot_results(results, out, preset, cpu=device.type != "cuda")
    print("wrote " + ", ".join(paths))
    wrong = [r for r in results if r.status in ("wrong", "error") and r.kind == "ours"]
    return 1 if wrong else 0


def _model_bench(op, preset, device, quick, compile_variants) -> list[Result]:
    try:
        from .model import run_model_bench
    except ImportError as exc:
        return [Result(op, preset, "-", "ours", status="skipped", note=f"model bench unavailable: {exc}")]
    return run_model_bench(op, preset, device, quick=quick, compile_variants=compile_variants)
