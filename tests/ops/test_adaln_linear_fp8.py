"""adaln_linear / gated_linear with precision="fp8" (the attention half's projections in FP8, opt-in): the
Triton pieces under the interpreter (GEMMs emulated in float32 on the dequantized operands) against the
FP8 scheme's reference (same quantization formulas) and the exact float64 chain of test_adaln_linear.py,
odd token counts, one weight and three, text_len 0 and S, non-contiguous arguments, outputs NaN-poisoned
(conftest), the row quantizer, and the checks."""
import pytest
import torch

from cogvideox_kernels import ops
from cogvideox_kernels.ops.adaln_linear import fp8 as lin8
from cogvideox_kernels.ops.expert_ffn import fp8
from helpers import rel_err, strided_view
from test_adaln_linear import adaln_chain, adaln_inputs, gated_chain, gated_inputs

BF16 = torch.bfloat16


def _bf16(d):
    return {k: v.to(BF16) if torch.is_tensor(v) else v for k, v in d.items()}


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("S,text_len", [(13, 4), (9, 0), (7, 7)])
def test_adaln_linear_fp8(interpret, parts, S, text_len):
    d = _bf16(adaln_inputs(B=2, S=S, hidden=32, out=48, text_len=text_len, seed=S + parts))
    g = torch.Generator().manual_seed(parts)
    weights = [d["weight"]] + [(torch.randn(48, 32, generator=g) / 32 ** 0.5).to(BF16) for _ in range(parts - 1)]
    biases = [d["bias"]] + [None if i == 1 else (0.1 * torch.randn(48, generator=g)).to(BF16)
                            for i in range(1, parts)]
    w_arg, b_arg = (weights[0], biases[0]) if parts == 1 else (weights, biases)
    kw = dict(text_len=text_len, norm_weight=d["norm_weight"], norm_bias=d["norm_bias"], eps=d["eps"])
    out = ops.adaln_linear(d["x"], d["modulation"], w_arg, b_arg, precision="fp8", **kw)
    assert out.dtype == BF16 and out.shape == ((2, S, 48) if parts == 1 else (parts, 2, S, 48))
    emul = lin8.adaln_linear_fp8_reference(d["x"], d["modulation"], weights, biases, **kw)
    exact = torch.stack([adaln_chain(d["x"], d["modulation"], w, b, text_len, d["norm_weight"], d["norm_bias"],
                                     d["eps"]) for w, b in zip(weights, biases)])
    out = out if parts > 1 else out[None]
    assert rel_err(out, emul) < 1e-2  # the FP8 scheme: only bf16 roundings and midpoint ties differ
    err = rel_err(out, exact)
    assert 5e-3 < err < 8e-2  # lossy (e4m3: 3 mantissa bits), but the same function


@pytest.mark.parametrize("kind", ["step", "transpose"])
def test_adaln_linear_fp8_strided(interpret, kind):
    d = _bf16(adaln_inputs(B=2, S=11, hidden=32, out=48, text_len=3, seed=5))
    kw = dict(text_len=3, norm_weight=d["norm_weight"], norm_bias=d["norm_bias"], eps=d["eps"])
    dense = ops.adaln_linear(d["x"], d["modulation"], d["weight"], d["bias"], precision="fp8", **kw)
    x = strided_view(d["x"], kind)
    w = strided_view(d["weight"], kind)
    out = ops.adaln_linear(x, strided_view(d["modulation"], kind), w, d["bias"], precision="fp8", **kw)
    assert torch.equal(out, dense)


@pytest.mark.parametrize("S,text_len", [(13, 4), (9, 0), (7, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_gated_linear_fp8(interpret, S, text_len, bias):
    d = _bf16(gated_inputs(B=2, S=S, hidden=32, inner=48, text_len=text_len, seed=S))
    b = d["bias"] if bias else None
    out = ops.gated_linear(d["x"], d["a"], d["weight"], b, d["modulation"], text_len=text_len, precision="fp8")
    assert out.dtype == BF16 and out.shape == d["x"].shape
    emul = lin8.gated_linear_fp8_reference(d["x"], d["a"], d["weight"], b, d["modulation"], text_len=text_len)
    exact = gated_chain(d["x"], d["a"], d["weight"], b, d["modulation"], text_len)
    assert rel_err(out - d["x"], emul - d["x"]) < 2e-2  # the gated branch alone (x dominates the sum)
    assert 2e-3 < rel_err(out - d["x"], exact - d["x"].double()) < 1e-1


def test_gated_linear_fp8_strided_a(interpret):
    d = _bf16(gated_inputs(B=2, S=11, hidden=32, inner=48, text_len=3, seed=1))
    args = (d["weight"], d["bias"], d["modulation"])
    dense = ops.gated_linear(d["x"], d["a"], *args, text_len=3, precision="fp8")
    for kind in ("step", "transpose"):
        a = strided_view(d["a"], kind)
        assert torch.equal(ops.gated_linear(strided_view(d["x"], kind), a, *args, text_len=3, precision="fp8"),
                           dense)


@pytest.mark.parametrize("rows,N", [(5, 48), (3, 100)])
def test_quantize_rows_fwd(interpret, rows, N):
    g = torch.Generator().manual_seed(rows)
    y = (torch.randn(rows, N, generator=g) * torch.linspace(0.1, 20, rows)[:, None]).to(BF16)
    y[1] = 0  # an all-zero row: scale 1
    q, scale = fp8.quantize_rows_fwd(y)
    q_ref, scale_ref = fp8.quantize_rows(y)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert (q.float() != q_ref.float()).float().mean() < 0.02  # reciprocal-scale rounding at ties only
    assert rel_err(fp8.dequantize_rows(q, scale), y.float()) < 4e-2


def test_fp8_precision_checks():
    d = adaln_inputs(B=1, S=5, hidden=32, out=48, text_len=2)
    kw = dict(text_len=2, norm_weight=d["norm_weight"], norm_bias=d["norm_bias"], eps=d["eps"])
    with pytest.raises(ValueError, match="precision='fp8' takes bfloat16"):
        ops.adaln_linear(d["x"], d["modulation"], d["weight"], d["bias"], precision="fp8", **kw)
    with pytest.raises(ValueError, match="precision='int8' is not supported"):
        ops.adaln_linear(d["x"], d["modulation"], d["weight"], d["bias"], precision="int8", **kw)
    g = _bf16(gated_inputs(B=1, S=5, hidden=32, inner=48, text_len=2))
    with pytest.raises(ValueError, match="not supported"):
        ops.gated_linear(g["x"], g["a"], g["weight"], g["bias"], g["modulation"], text_len=2, precision="e5m2")
    with pytest.raises(ValueError, match="a has dtype"):  # the op's own checks still run
        ops.gated_linear(g["x"], g["a"].float(), g["weight"], g["bias"], g["modulation"], text_len=2,
                         precision="fp8")


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_weight_list_of_non_tensors_is_refused(precision):
    x, m = torch.randn(1, 5, 32).to(BF16), torch.randn(1, 6, 32).to(BF16)
    with pytest.raises(ValueError, match=r"weight\[0\] must be a tensor, got int"):
        ops.adaln_linear(x, m, [1, 2], None, text_len=2, precision=precision)
