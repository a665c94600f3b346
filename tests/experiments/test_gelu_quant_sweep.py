"""CPU checks (Triton interpreter) of benchmarks/experiments/gelu_quant_sweep.py: its chunked launch (rows per
program, column chunks; measured slower on the H200 and kept as the experiment) gives the shipped one-row
kernel's bits, rows and N off the blocks, with and without bias, int8 and e4m3."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "experiments"))

import gelu_quant_sweep as sweep  # noqa: E402
from cogvideox_kernels.ops.expert_ffn import fp8  # noqa: E402


@pytest.mark.parametrize("out_dtype", [torch.int8, fp8.E4M3], ids=["int8", "e4m3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("rows,N,config", [(9, 200, (4, 64, 4)), (6, 96, (1, 32, 1))])
def test_chunked_launch_equals_row(interpret, out_dtype, bias, rows, N, config):
    g = torch.Generator().manual_seed(rows * N)
    y = (torch.randn(rows, N, generator=g) * 3).bfloat16()
    b = (torch.randn(N, generator=g) * 0.3).bfloat16() if bias else None
    y[rows - 1, N - 1] = 40.0  # the row's max in the last (partial) chunk
    old = fp8.bias_gelu_quant_fwd(y, b, out_dtype, config="row")
    new = sweep.chunked_fwd(y, b, out_dtype, config)
    assert torch.equal(new[0].view(torch.uint8), old[0].view(torch.uint8))
    assert torch.equal(new[1], old[1])
    broken = sweep.chunked_fwd(y * 2, b, out_dtype, config)  # a different input must not match
    assert not torch.equal(broken[1], old[1])
