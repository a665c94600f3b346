"""bench step's extra variants (KNOWN_EXTRA: the fused/unfused half, the FFN paths): accepted by --variants and by
run_step_bench (they used to pass the CLI's check and then fail run_step_bench's), never in the default list."""
import pytest
import torch

from cogvideox_kernels.bench import step


def test_extra_variants_are_known_but_not_default():
    assert step.KNOWN_EXTRA and not set(step.KNOWN_EXTRA) & set(step.STEP_VARIANTS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-side argument handling only")
@pytest.mark.parametrize("variant", step.KNOWN_EXTRA)
def test_extra_variants_pass_run_step_bench_checks(variant, tmp_path):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):  # past the variant check, stopped at the GPU
        step.run_step_bench("5b", tmp_path, variants=("ours", variant))
    with pytest.raises(ValueError, match="bogus"):
        step.run_step_bench("5b", tmp_path, variants=("ours", "bogus"))
