"""adaln_linear / gated_linear (the fused attention half's two ends): every CPU backend (reference,
Triton in the interpreter; gated_linear's two GEMM paths) against a float64 torch chain written out
here, odd shapes, text_len 0 and S, each tensor argument non-contiguous, outputs NaN-poisoned
(tests/conftest.py), and the input checks."""
import pytest
import torch
import torch.nn.functional as F

from cogvideox_kernels import ops
from cogvideox_kernels.ops import registry
from helpers import rel_err, replaced, strided_view, tensor_args, view_kinds


def backends(op):
    return ["reference"] + [k for k, why in registry.availability(op, "cpu").items() if why is None]


def adaln_inputs(B=2, S=11, hidden=24, out=40, text_len=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(dtype)  # noqa: E731
    return dict(x=rnd(B, S, hidden), modulation=rnd(B, 6, hidden, std=0.5), weight=rnd(out, hidden, std=hidden ** -0.5),
                bias=rnd(out, std=0.1), text_len=text_len, norm_weight=1 + 0.3 * rnd(hidden),
                norm_bias=0.2 * rnd(hidden), eps=1e-5)


def gated_inputs(B=2, S=11, hidden=24, inner=40, text_len=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(dtype)  # noqa: E731
    return dict(x=rnd(B, S, hidden), a=rnd(B, S, inner), weight=rnd(hidden, inner, std=inner ** -0.5),
                bias=rnd(hidden, std=0.1), modulation=rnd(B, 6, hidden, std=0.5), text_len=text_len)


def split(t, text_len):
    return t[:, :text_len], t[:, text_len:]


def adaln_chain(x, modulation, weight, bias, text_len, norm_weight, norm_bias, eps):
    """diffusers' way in float64: LayerNorm, then text and video modulated separately, then the Linear."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    h = F.layer_norm(d(x), (x.shape[-1],), d(norm_weight), d(norm_bias), eps)
    m = d(modulation)
    text, video = split(h, text_len)
    h = torch.cat([text * (1 + m[:, 4, None]) + m[:, 3, None], video * (1 + m[:, 1, None]) + m[:, 0, None]], 1)
    return F.linear(h, d(weight), d(bias))


def gated_chain(x, a, weight, bias, modulation, text_len):
    f = F.linear(a.double(), weight.double(), None if bias is None else bias.double())
    m = modulation.double()
    (xt, xv), (ft, fv) = split(x.double(), text_len), split(f, text_len)
    return torch.cat([xt + m[:, 5, None] * ft, xv + m[:, 2, None] * fv], 1)


OPS = {"adaln_linear": (ops.adaln_linear, adaln_inputs, adaln_chain),
       "gated_linear": (ops.gated_linear, gated_inputs, gated_chain)}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", [dict(), dict(B=1, S=1, text_len=0), dict(S=13, text_len=13),
                                   dict(S=37, text_len=0, hidden=48, seed=3), dict(B=3, S=70, hidden=40, seed=5)])
def test_matches_float64_chain(op, shape):
    fn, make, chain = OPS[op]
    kw = {"out": 72} if op == "adaln_linear" and "hidden" in shape else ({"inner": 72} if "hidden" in shape else {})
    inputs = make(**shape, **kw)
    want = chain(**inputs)
    for backend in backends(op):
        with torch.no_grad():
            got = fn(**inputs, backend=backend)
        assert got.dtype == inputs["x"].dtype and got.shape == want.shape
        assert rel_err(got, want) <= 1e-5, backend


@pytest.mark.parametrize("op", list(OPS))
def test_without_optional_params(op):
    fn, make, chain = OPS[op]
    inputs = make(seed=2)
    inputs["bias"] = None
    if op == "adaln_linear":
        inputs.update(norm_weight=None, norm_bias=None)
    want = chain(**inputs)
    for backend in backends(op):
        assert rel_err(fn(**inputs, backend=backend), want) <= 1e-5, backend


@pytest.mark.parametrize("path", ["cublas", "triton"])
def test_gated_linear_both_gemm_paths(interpret, path):
    from cogvideox_kernels.ops.adaln_linear.triton_fwd import gated_linear_fwd

    inputs = gated_inputs(S=45, inner=72, seed=4)  # several 32-row tiles, a ragged one
    want = gated_chain(**inputs)
    got = gated_linear_fwd(inputs["x"], inputs["a"], inputs["weight"], inputs["bias"], inputs["modulation"],
                           inputs["text_len"], path=path)
    assert rel_err(got, want) <= 1e-5


def test_bf16_within_torch_bf16_error(interpret):
    for op, (fn, make, chain) in OPS.items():
        inputs = make(S=33, seed=6)
        want = chain(**inputs)
        low = {k: v.bfloat16() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        got = fn(**low, backend="triton")
        # torch's own bf16 chain (diffusers' way in bf16)
        torch_bf16 = chain(**low).bfloat16()
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) <= max(1e-2, 2 * rel_err(torch_bf16, want)), op


def stride_cases():
    for op, (_, make, _) in OPS.items():
        for name, index, t in tensor_args(make()):
            for kind in view_kinds(t):
                yield pytest.param(op, name, kind, id=f"{op}-{name}-{kind}")


@pytest.mark.parametrize("op,name,kind", list(stride_cases()))
def test_each_argument_non_contiguous(op, name, kind):
    fn, make, chain = OPS[op]
    inputs = make(seed=len(name))
    strided = strided_view(inputs[name], kind)
    assert not strided.is_contiguous() and strided.shape == inputs[name].shape
    want = chain(**replaced(inputs, name, None, strided.contiguous()))
    for backend in backends(op):
        with torch.no_grad():
            got = fn(**replaced(inputs, name, None, strided), backend=backend)
        assert rel_err(got, want) <= 1e-5, backend


@pytest.mark.parametrize("op,change,match", [
    ("adaln_linear", dict(weight=torch.zeros(40, 23)), "weight"),
    ("adaln_linear", dict(modulation=torch.zeros(2, 5, 24)), "modulation"),
    ("adaln_linear", dict(text_len=12), "text_len"),
    ("adaln_linear", dict(norm_weight=torch.zeros(23)), "norm_weight"),
    ("adaln_linear", dict(bias=torch.zeros(40, dtype=torch.float64)), "bias"),
    ("adaln_linear", dict(eps=0.0), "eps"),
    ("gated_linear", dict(a=torch.zeros(2, 10, 40)), "a"),
    ("gated_linear", dict(weight=torch.zeros(24, 41)), "weight"),
    ("gated_linear", dict(modulation=torch.zeros(2, 6, 25)), "modulation"),
    ("gated_linear", dict(x=torch.zeros(2, 11)), "x"),
])
def test_clear_errors(op, change, match):
    fn, make, _ = OPS[op]
    with pytest.raises(ValueError, match=match):
        fn(**{**make(), **change})


@pytest.mark.parametrize("biases", ["all", "none", "mixed"])
def test_adaln_linear_weight_parts(biases):
    """A list of P weights (to_q/to_k/to_v): [P, B, S, out], part i = the float64 chain with weight i and
    bias i (None entries: no bias); a transposed (non-contiguous) part; every backend; under the
    interpreter the Triton backend's per-part GEMMs write into one NaN-poisoned result."""
    inputs = adaln_inputs(S=19, out=40, seed=8)
    g = torch.Generator().manual_seed(9)
    weights = [torch.randn(40, 24, generator=g) * 24 ** -0.5 for _ in range(2)]
    weights.append((torch.randn(24, 40, generator=g) * 24 ** -0.5).t())  # strided part
    bias_list = {"all": [torch.randn(40, generator=g) for _ in range(3)], "none": None,
                 "mixed": [torch.randn(40, generator=g), None, torch.randn(40, generator=g)]}[biases]
    args = {k: v for k, v in inputs.items() if k not in ("weight", "bias")}
    want = torch.stack([adaln_chain(weight=w, bias=None if bias_list is None else bias_list[i], **args)
                        for i, w in enumerate(weights)])
    for backend in backends("adaln_linear"):
        with torch.no_grad():
            got = ops.adaln_linear(weight=weights, bias=bias_list, backend=backend, **args)
        assert got.shape == (3, 2, 19, 40) and rel_err(got, want) <= 1e-5, backend


@pytest.mark.parametrize("weight,bias,match", [
    ([], None, "weight"),
    ([torch.zeros(40, 24), torch.zeros(41, 24)], None, r"weight\[1\]"),
    ([torch.zeros(40, 24), torch.zeros(40, 23)], None, r"weight\[1\]"),
    ([torch.zeros(40, 24)] * 2, [torch.zeros(40)], "bias"),
    ([torch.zeros(40, 24)] * 2, [torch.zeros(40), torch.zeros(41)], "bias"),
    (torch.zeros(40, 24), [torch.zeros(40)], "bias"),
])
def test_adaln_linear_weight_parts_errors(weight, bias, match):
    args = {k: v for k, v in adaln_inputs().items() if k not in ("weight", "bias")}
    with pytest.raises(ValueError, match=match):
        ops.adaln_linear(weight=weight, bias=bias, backend="reference", **args)
