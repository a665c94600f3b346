"""pytest-benchmark versions of the ``cogvideox-kernels bench`` cases, for regression tracking:

    pytest benchmarks/ --benchmark-json out.json            # CPU: small preset (interpreter)
    COGVIDEOX_BENCH_PRESET=5b pytest benchmarks/ --benchmark-json out.json   # on a GPU

Each variant is parity-checked against the float32 reference before it is timed, as in the CLI.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cogvideox_kernels.bench.suites import attention_cases, conv_cases, ffn_cases, rel_err  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = os.environ.get("COGVIDEOX_BENCH_PRESET", "small" if DEVICE.type == "cpu" else "5b")


def _cases():
    cases = attention_cases(PRESET, DEVICE, torch.bfloat16)
    cases += ffn_cases(PRESET, DEVICE, torch.bfloat16, compile_baseline=False)
    cases += conv_cases(PRESET, DEVICE, torch.bfloat16)
    return [pytest.param(c, v, id=f"{c.op}-{c.shape}-{v.name}".replace(" ", "_")) for c in cases for v in c.variants]


@pytest.mark.parametrize("case,variant", _cases())
def test_bench(benchmark, case, variant):
    out = variant.fn()
    if variant.compare:
        assert rel_err(out, case.reference()) <= case.abs_budget
    del out

    def run():
        variant.fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
