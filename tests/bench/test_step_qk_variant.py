"""bench step's "ours (qk gemm epilogue)" variant: accepted by --variants and by run_step_bench (the extra
variants used to pass the CLI's check and then fail run_step_bench's), never in the default list."""
import pytest
import torch

from cogvideox_kernels.bench import step


def test_qk_variant_is_known_but_not_default():
    assert step.QK_EPILOGUE in step.KNOWN_EXTRA and step.QK_EPILOGUE not in step.STEP_VARIANTS


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-side argument handling only")
@pytest.mark.parametrize("variant", [step.QK_EPILOGUE, *step.FFN_PATH_VARIANTS, step.FUSED_HALF])
def test_extra_variants_pass_run_step_bench_checks(variant, tmp_path):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):  # past the variant check, stopped at the GPU
        step.run_step_bench("5b", tmp_path, variants=("ours", variant))
    with pytest.raises(ValueError, match="bogus"):
        step.run_step_bench("5b", tmp_path, variants=("ours", "bogus"))


def test_count_qk_gemm_calls_restores_the_op():
    from cogvideox_kernels.ops.adaln_linear import qk_gemm

    real = qk_gemm.adaln_qk_gemm
    assert step.count_qk_gemm_calls(lambda **kw: None, {}) == 0
    assert qk_gemm.adaln_qk_gemm is real
