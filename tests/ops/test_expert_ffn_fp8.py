"""``expert_ffn(..., precision="fp8")``: the e4m3 scheme, its reference emulation, the Triton pieces
(pre-pass quantization, bias + GELU + quantization) and the weight cache.

CPU tests run the Triton kernels under TRITON_INTERPRET=1 with the two GEMMs emulated in float32 on
the dequantized operands (``fp8.fp8_linear`` off the GPU); tests marked ``gpu`` run torch._scaled_mm.
Error bands: e4m3 keeps 3 mantissa bits, so one quantization costs ~2.5% rms per element; the FFN
term gate * f(h) passes four of them (h, w1, GELU output, w2): ~5% vs float32, against ~0.3% for bf16.
"""
import gc

import pytest
import torch
import torch.nn.functional as F

from cogvideox_kernels.ops.expert_ffn import expert_ffn, expert_ffn_reference, fp8
from cogvideox_kernels.ops.expert_ffn import triton_fwd
from cogvideox_kernels.ops.expert_ffn.reference import modulated_norm_reference
from helpers import rel_err, strided_view, tensor_args, replaced, view_kinds

E4M3 = torch.float8_e4m3fn


def make_case(B, S, hidden, inner, text_len, dtype=torch.bfloat16, *, device="cpu", seed=0, biases=True,
              scale_outliers=0.0):
    """Random shared-FFN inputs (weights scaled so f(h) is O(1)). ``scale_outliers``: 1 + scale of
    every 16th channel of the modulation set to that value (channel outliers in h)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g, device=device) * std

    mod = rnd(B, 6, hidden, std=0.5)
    if scale_outliers:
        mod[:, [1, 4], ::16] = scale_outliers - 1
    args = dict(x=rnd(B, S, hidden), modulation=mod, w1=rnd(1, inner, hidden, std=hidden ** -0.5),
                b1=rnd(1, inner, std=0.1) if biases else None, w2=rnd(1, hidden, inner, std=inner ** -0.5),
                b2=rnd(1, hidden, std=0.1) if biases else None)
    args = {k: None if v is None else v.to(dtype) for k, v in args.items()}
    kwargs = dict(text_len=text_len, norm_weight=(rnd(hidden, std=0.2) + 1).to(dtype),
                  norm_bias=rnd(hidden, std=0.1).to(dtype))
    return args, kwargs


def f32(d):
    return {k: v.float() if torch.is_tensor(v) else v for k, v in d.items()}


def delta_err(out, ref, x):
    """Relative error of the FFN term (out - x): the residual does not hide it."""
    return rel_err(out.double() - x.double(), ref.double() - x.double())


# ------------------------------------------------------------------------------------ the scheme
def test_quantize_rows_scales_per_row_and_zero_rows():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 333, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1.0, 1e4])[:, None]
    t[3] = 0.0
    t[4, 7] = 500.0  # an outlier sets its row's scale alone
    q, scale = fp8.quantize_rows(t)
    assert q.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (6,)
    amax = t.abs().amax(dim=1)
    expected = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    torch.testing.assert_close(scale, expected, rtol=0, atol=0)
    qf = q.float()
    assert torch.isfinite(qf).all() and qf.abs().max() <= 448
    assert torch.equal(qf[3], torch.zeros(333)) and scale[3] == 1
    nonzero = [0, 1, 2, 4, 5]
    assert torch.equal(qf[nonzero].abs().amax(dim=1), torch.full((5,), 448.0))  # each row uses the full range
    # round to nearest on 3 mantissa bits: |error| <= 2^-4 relative (2^-10 * scale in the subnormals)
    back = fp8.dequantize_rows(q, scale)
    bound = torch.maximum(t.abs() * 2 ** -4, scale[:, None] * 2 ** -10) * (1 + 1e-6)
    assert ((back - t).abs() <= bound).all()
    assert rel_err(back, t) > 1e-3  # it really is 8-bit


def test_reference_fp8_error_band_and_bf16_default():
    args, kwargs = make_case(2, 40, 256, 1024, 7, torch.float32, seed=1)
    ref = expert_ffn_reference(**args, **kwargs)
    assert torch.equal(expert_ffn_reference(**args, **kwargs, precision="bf16"), ref)
    ref8 = expert_ffn_reference(**args, **kwargs, precision="fp8")
    err = delta_err(ref8, ref, args["x"])
    assert 1e-2 < err < 8e-2, err  # four e4m3 roundings, not zero and not broken


# ------------------------------------------------------------------------------------ Triton pieces
@pytest.mark.parametrize("text_len", [0, 5, 13])
def test_prepass_quantizes_h_per_token(interpret, text_len):
    args, kwargs = make_case(2, 13, 96, 64, text_len, seed=2)
    x = args["x"].clone()
    x[1, 3] = 0.7  # a constant token: LN gives 0, so with no shift and no norm bias h is all zero
    mod = args["modulation"].clone()
    mod[1, [0, 3]] = 0.0
    B, S, Hd = x.shape
    h_q, h_scale = triton_fwd.modulated_norm_fwd(x.view(B * S, Hd), mod, kwargs["norm_weight"], None, 1e-5, S,
                                                 text_len, E4M3)
    h, _ = modulated_norm_reference(x.float(), mod.float(), text_len, kwargs["norm_weight"].float(), None, 1e-5)
    q_ref, scale_ref = fp8.quantize_rows(h.view(B * S, Hd))
    torch.testing.assert_close(h_scale, scale_ref, rtol=1e-5, atol=0)
    assert h_scale[S + 3] == 1 and torch.equal(h_q[S + 3].float(), torch.zeros(Hd))
    # the same e4m3 values except where LN's float rounding lands on the other side of a midpoint
    assert (h_q.float() != q_ref.float()).float().mean() < 0.01
    assert rel_err(fp8.dequantize_rows(h_q, h_scale), fp8.dequantize_rows(q_ref, scale_ref)) < 5e-3


@pytest.mark.parametrize("launch", [(2, 4, 0), (4, 4, 0), (8, 8, 0), (1, 4, 32), (4, 4, 64), (2, 4, 128)])
@pytest.mark.parametrize("out", ["bf16", "e4m3", "int8"])
def test_prepass_rows_per_program(interpret, monkeypatch, launch, out):
    """The LN-modulate pre-pass with several rows per program and/or the row in column chunks
    (``NORM_LAUNCH``; rows past the end and the last chunk's columns past hidden=96 masked) gives the
    one-whole-row-per-program result: the same quantized values and scales (the chunked form falls back
    to whole rows for them), bf16 within rounding."""
    args, kwargs = make_case(2, 13, 96, 64, 5, seed=3)
    x, mod = args["x"], args["modulation"]
    B, S, Hd = x.shape
    dtype = {"bf16": torch.bfloat16, "e4m3": E4M3, "int8": torch.int8}[out]
    call = lambda: triton_fwd.modulated_norm_fwd(x.view(B * S, Hd), mod, kwargs["norm_weight"],  # noqa: E731
                                                 kwargs["norm_bias"], 1e-5, S, 5, dtype)
    want = call()
    monkeypatch.setattr(triton_fwd, "NORM_LAUNCH", launch)
    got = call()
    if out == "bf16":
        h, _ = modulated_norm_reference(x.float(), mod.float(), 5, kwargs["norm_weight"].float(),
                                        kwargs["norm_bias"].float(), 1e-5)
        assert rel_err(got.float(), h.view(B * S, Hd)) < 5e-3
        assert rel_err(got.float(), want.float()) < 1e-6
    else:
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)
        assert (got[0].float() != want[0].float()).float().mean() < 1e-3


def test_bias_gelu_quant_rows(interpret):
    g = torch.Generator().manual_seed(3)
    y = (torch.randn(9, 200, generator=g) * 2).bfloat16()
    bias = (torch.randn(200, generator=g) * 0.1).bfloat16()
    y[4] = -bias  # gelu(0) = 0: an all-zero row
    q, scale = fp8.bias_gelu_quant_fwd(y, bias)
    v = F.gelu(y.float() + bias.float(), approximate="tanh")
    q_ref, scale_ref = fp8.quantize_rows(v)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    assert scale[4] == 1 and torch.equal(q[4].float(), torch.zeros(200))
    assert (q.float() != q_ref.float()).float().mean() < 0.01
    assert rel_err(fp8.dequantize_rows(q, scale), fp8.dequantize_rows(q_ref, scale_ref)) < 5e-3
    q2, scale2 = fp8.bias_gelu_quant_fwd(y, None)
    torch.testing.assert_close(scale2, fp8.quantize_rows(F.gelu(y.float(), approximate="tanh"))[1], rtol=1e-5, atol=0)


def _gelu_quant_reference(y, bias, out_dtype):
    """float64 gelu_tanh(y + bias), its row scales and values quantized from float64."""
    v = y.double() + (0 if bias is None else bias.double())
    v = 0.5 * v * (1 + torch.tanh(0.7978845608028654 * (v + 0.044715 * v ** 3)))
    qmax = 127.0 if out_dtype == torch.int8 else 448.0
    amax = v.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    x = v / scale[:, None]
    q = torch.round(x).clamp(-127, 127).to(torch.int8) if out_dtype == torch.int8 else x.float().to(E4M3)
    return v, q, scale


@pytest.mark.parametrize("out_dtype", [torch.int8, E4M3], ids=["int8", "e4m3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("config", ["row", "row_fast"])
@pytest.mark.parametrize("rows,N", [(9, 200), (3, 100), (6, 96)])
def test_bias_gelu_quant_launches(interpret, monkeypatch, out_dtype, bias, config, rows, N):
    """Both launches of the pass ("row" and its FAST form) against float64 (N off the power of 2, an all-zero
    row, an outlier in the last column, large negative inputs where GELU's denominator is clamped);
    outputs poisoned (int8: -128, which the kernel never writes)."""
    empty = torch.empty

    def poisoned_empty(*a, **k):
        t = empty(*a, **k)
        return t.fill_(-128) if t.dtype == torch.int8 else t
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    g = torch.Generator().manual_seed(rows * N)
    y = (torch.randn(rows, N, generator=g) * torch.linspace(0.5, 6, rows)[:, None]).bfloat16()
    b = (torch.randn(N, generator=g) * 0.3).bfloat16() if bias else None
    y[1] = -b if bias else 0  # gelu(0) = 0: an all-zero row, scale 1
    y[rows - 1, N - 1] = 40.0  # the row's max in the last column
    y[rows - 1, 0] = -200.0    # gelu ~ 0: exp overflows, the denominator is clamped (FAST)
    q, scale = fp8.bias_gelu_quant_fwd(y, b, out_dtype, config=config)
    assert q.dtype == out_dtype and not scale.isnan().any()
    if out_dtype == torch.int8:
        assert (q != -128).all()
    else:
        assert not q.float().isnan().any()
    v, q_ref, scale_ref = _gelu_quant_reference(y, b, out_dtype)
    torch.testing.assert_close(scale.double(), scale_ref, rtol=1e-5, atol=0)
    assert scale[1] == 1 and not q[1].float().any()
    assert (q.float() != q_ref.float()).float().mean() < 0.01  # float32 vs float64 at rounding midpoints
    # one quantization step (int8: the outlier row has coarse steps); a broken kernel is off by O(1)
    assert rel_err(q.double() * scale.double()[:, None], v) < (2e-2 if out_dtype == torch.int8 else 4e-2)


def test_bias_gelu_quant_unknown_launch():
    with pytest.raises(ValueError, match="config must be one of"):
        fp8.bias_gelu_quant_fwd(torch.randn(4, 64).bfloat16(), None, torch.int8, config=(1, 64, 4))


def test_bias_gelu_quant_checks_arguments():
    y = torch.randn(4, 64).bfloat16()
    with pytest.raises(ValueError, match="y must be a contiguous"):
        fp8.bias_gelu_quant_fwd(y.t(), None)
    with pytest.raises(ValueError, match="y must be a contiguous"):
        fp8.bias_gelu_quant_fwd(y[:, ::2], None)
    with pytest.raises(ValueError, match="bias must be"):
        fp8.bias_gelu_quant_fwd(y, torch.zeros(32).bfloat16())
    with pytest.raises(ValueError, match="out_dtype"):
        fp8.bias_gelu_quant_fwd(y, None, torch.bfloat16)


# ------------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("text_len,biases", [(0, True), (5, True), (37, True), (9, False)])
def test_fp8_triton_matches_its_emulation(interpret, text_len, biases):
    args, kwargs = make_case(2, 37, 64, 192, text_len, seed=4 + text_len, biases=biases)
    out = expert_ffn(**args, **kwargs, precision="fp8", backend="triton")
    assert out.shape == args["x"].shape and out.dtype == torch.bfloat16
    ref = expert_ffn_reference(**f32(args), **f32(kwargs))
    ref8 = expert_ffn_reference(**f32(args), **f32(kwargs), precision="fp8")
    x = args["x"]
    emulation_err = delta_err(ref8, ref, x)
    # the kernels compute the emulated function: far closer to it than the emulation is to float32
    # (left: GEMM outputs rounded to bf16 before GELU / gate, moving a few e4m3 roundings by one step)
    assert delta_err(out, ref8, x) < 0.4 * emulation_err
    assert delta_err(out, ref, x) < 8e-2
    bf16 = expert_ffn(**args, **kwargs, backend="triton")
    assert rel_err(out, ref) > rel_err(bf16, ref)  # it really ran in fp8


def test_fp8_channel_outliers_in_h(interpret):
    """(1 + scale) of 50 on every 16th channel: the per-token scale is set by the outliers, but e4m3
    is floating point, so the other channels keep their 3 mantissa bits."""
    args, kwargs = make_case(1, 33, 128, 256, 4, seed=5, scale_outliers=50.0)
    out = expert_ffn(**args, **kwargs, precision="fp8", backend="triton")
    ref = expert_ffn_reference(**f32(args), **f32(kwargs))
    assert delta_err(out, ref, args["x"]) < 8e-2


def test_fp8_non_contiguous_inputs(interpret):
    args, kwargs = make_case(2, 11, 64, 96, 3, seed=6)
    inputs = {**args, **kwargs}
    tried = set()
    for name, index, t in tensor_args(inputs):
        for kind in view_kinds(t):
            view = strided_view(t, kind)
            if view.is_contiguous():  # e.g. "transpose" of [1, N, K] leaves a contiguous layout
                continue
            tried.add(name)
            strided = replaced(inputs, name, index, view)
            dense = replaced(inputs, name, index, view.contiguous())
            out = expert_ffn(**strided, precision="fp8", backend="triton")
            assert torch.equal(out, expert_ffn(**dense, precision="fp8", backend="triton")), (name, kind)
    assert tried == {"x", "modulation", "w1", "b1", "w2", "b2", "norm_weight", "norm_bias"}


def test_precision_argument_checked():
    args, kwargs = make_case(1, 5, 32, 64, 2, seed=7)
    for bad in ("int4", "FP8", None, 8):
        with pytest.raises(ValueError, match="precision"):
            expert_ffn(**args, **kwargs, precision=bad)


def test_fp8_experts_take_the_reference(interpret):
    """Separate experts in fp8: no kernel path; 'triton' by name says so, 'auto' takes the emulation."""
    g = torch.Generator().manual_seed(8)
    args, kwargs = make_case(1, 9, 32, 64, 4, torch.float32, seed=8)
    args["w1"], args["b1"] = torch.randn(2, 64, 32, generator=g) * 0.2, torch.randn(2, 64, generator=g)
    args["w2"], args["b2"] = torch.randn(2, 32, 64, generator=g) * 0.1, torch.randn(2, 32, generator=g)
    kwargs["num_text_experts"] = 1
    with pytest.raises(ValueError, match="num_text_experts"):
        expert_ffn(**args, **kwargs, precision="fp8", backend="triton")
    out = expert_ffn(**args, **kwargs, precision="fp8")
    assert torch.equal(out, expert_ffn_reference(**args, **kwargs, precision="fp8"))
    with pytest.raises(ValueError, match="bfloat16"):  # the kernel path is bf16 only
        expert_ffn(**make_case(1, 9, 32, 64, 4, torch.float16)[0], **kwargs | {"num_text_experts": 0},
                   precision="fp8", backend="triton")


# ------------------------------------------------------------------------------------ weight cache
def test_weight_cache_reuses_and_invalidates():
    cache = fp8.WeightCache()
    g = torch.Generator().manual_seed(9)
    weight = torch.nn.Parameter(torch.randn(48, 32, generator=g).bfloat16(), requires_grad=False)
    first = cache.get(weight.unsqueeze(0)[0])  # a fresh view each call, as the op gets it
    assert cache.get(weight.unsqueeze(0)[0]) is first and cache.quantizations == 1
    with torch.no_grad():
        weight.mul_(2)  # in place (fuse_lora, copy_, load_state_dict): version bump
    second = cache.get(weight)
    assert cache.quantizations == 2 and torch.equal(second[1], 2 * first[1])
    weight.data = torch.randn(48, 32, generator=g).bfloat16()  # offloading / LoRA fuse: new storage
    third = cache.get(weight)
    assert cache.quantizations == 3 and torch.equal(third[1], fp8.quantize_rows(weight)[1])
    assert torch.equal(cache.get(weight[8:])[1], third[1][8:]) and cache.quantizations == 4  # another view
    assert len(cache) == 1  # one entry per storage: the old storage's entry went with it
    del weight, first, second, third
    gc.collect()
    assert len(cache) == 0  # nothing outlives its weight (a reused address can never hit a stale entry)


def test_op_sees_weight_updates(interpret):
    """A LoRA-style in-place update of w1 between calls: the FP8 output follows the new weight."""
    args, kwargs = make_case(1, 17, 64, 96, 5, seed=10)
    fp8.WEIGHTS.clear()
    before = expert_ffn(**args, **kwargs, precision="fp8", backend="triton")
    assert torch.equal(expert_ffn(**args, **kwargs, precision="fp8", backend="triton"), before)
    quantized = fp8.WEIGHTS.quantizations
    delta = torch.randn(args["w1"].shape, generator=torch.Generator().manual_seed(11)) * 0.05
    args["w1"].add_(delta.bfloat16())
    after = expert_ffn(**args, **kwargs, precision="fp8", backend="triton")
    assert fp8.WEIGHTS.quantizations == quantized + 1
    ref8 = expert_ffn_reference(**f32(args), **f32(kwargs), precision="fp8")
    ref = expert_ffn_reference(**f32(args), **f32(kwargs))
    assert delta_err(after, ref8, args["x"]) < 0.4 * delta_err(ref8, ref, args["x"])
    assert not torch.equal(after, before)


# ------------------------------------------------------------------------------------ GPU
def _gpu_case(S, hidden, inner, text_len, seed):
    return make_case(2, S, hidden, inner, text_len, device="cuda", seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("S,hidden,inner,text_len", [(226 + 17550, 3072, 12288, 226), (37, 256, 704, 5)])
def test_gpu_fp8_matches_emulation(S, hidden, inner, text_len):
    args, kwargs = _gpu_case(S, hidden, inner, text_len, seed=S)
    out = expert_ffn(**args, **kwargs, precision="fp8", backend="triton")
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = expert_ffn_reference(**f32(args), **f32(kwargs))
    ref8 = expert_ffn_reference(**f32(args), **f32(kwargs), precision="fp8")
    x = args["x"]
    emulation_err = delta_err(ref8, ref, x)
    assert delta_err(out, ref8, x) < 0.4 * emulation_err, (delta_err(out, ref8, x), emulation_err)
    assert delta_err(out, ref, x) < 8e-2 and rel_err(out, ref) < 3e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_weight_update_and_compile(device, request):
    if device == "cpu":
        request.getfixturevalue("interpret")
    S, hidden, inner = (300, 256, 512) if device == "cuda" else (19, 64, 96)
    args, kwargs = make_case(2, S, hidden, inner, 17, device=device, seed=12)

    def half_block(x, modulation):
        return expert_ffn(x, modulation, args["w1"], args["b1"], args["w2"], args["b2"], **kwargs,
                          precision="fp8", backend="triton")

    eager = half_block(args["x"], args["modulation"])
    compiled = torch.compile(half_block, fullgraph=True)
    torch.testing.assert_close(compiled(args["x"], args["modulation"]), eager, rtol=0, atol=0)
    args["w2"].mul_(-1)  # in place: the cached FP8 copy must not be reused (e4m3 is sign-symmetric,
    args["b2"].mul_(-1)  # so the FFN term flips sign exactly)
    flipped = half_block(args["x"], args["modulation"])
    torch.testing.assert_close(flipped - args["x"], -(eager - args["x"]), rtol=0.05, atol=0.05)
    torch.testing.assert_close(compiled(args["x"], args["modulation"]), flipped, rtol=0, atol=0)


def test_prepass_default_launch():
    """The measured defaults: chunked rows for bf16 out at hidden >= 2048, whole rows when quantizing
    (the row scale needs the whole row) and for narrow rows; NORM_LAUNCH overrides."""
    assert triton_fwd.norm_launch(3072, False) == (4, 4, 1024)
    assert triton_fwd.norm_launch(3072, True) == (1, 16, 0)
    assert triton_fwd.norm_launch(1920, False) == (1, 8, 0)
    assert triton_fwd.norm_launch(96, False) == (1, 4, 0)


@pytest.mark.parametrize("out", ["bf16", "int8"])
def test_prepass_wide_rows_default(interpret, out):
    """hidden 2176 (> 2048, not a multiple of the 1024-column chunk: the last chunk masked) through the
    default launch: bf16 out against the float32 reference; int8 out (whole rows) dequantizes to it."""
    args, kwargs = make_case(2, 5, 2176, 64, 2, seed=5)
    x, mod = args["x"], args["modulation"]
    B, S, Hd = x.shape
    h, _ = modulated_norm_reference(x.float(), mod.float(), 2, kwargs["norm_weight"].float(),
                                    kwargs["norm_bias"].float(), 1e-5)
    h = h.view(B * S, Hd)
    if out == "bf16":
        got = triton_fwd.modulated_norm_fwd(x.view(B * S, Hd), mod, kwargs["norm_weight"], kwargs["norm_bias"],
                                            1e-5, S, 2, torch.bfloat16)
        assert rel_err(got.float(), h) < 5e-3
    else:
        q, scale = triton_fwd.modulated_norm_fwd(x.view(B * S, Hd), mod, kwargs["norm_weight"],
                                                 kwargs["norm_bias"], 1e-5, S, 2, torch.int8)
        assert rel_err(q.float() * scale[:, None], h) < 2e-2
