"""``expert_ffn(..., precision="int8")``: the int8 scheme, its reference emulation, the Triton pieces
(pre-pass quantization, int8 GEMMs with dequantizing epilogues, bias + GELU + quantization) and the
weight cache.

CPU tests run every kernel under TRITON_INTERPRET=1 (int8 ``tl.dot`` with int32 sums is exact there).
Two references: ``expert_ffn_reference(precision="int8")`` (float32 maths on int8-rounded operands)
and ``int8.kernel_emulation`` (the same plus the kernels' bf16 roundings of GEMM1's product and the
output), which the kernels match to a few flipped roundings. Error band: a row scaled to its amax
keeps ~0.8% rms per gaussian element; the FFN term passes four such roundings: ~2% vs float32.
"""
import pytest
import torch
import torch.nn.functional as F

from cogvideox_kernels.ops.expert_ffn import expert_ffn, expert_ffn_reference, int8
from cogvideox_kernels.ops.expert_ffn import triton_fwd
from cogvideox_kernels.ops.expert_ffn.reference import modulated_norm_reference
from helpers import rel_err, replaced, strided_view, tensor_args, view_kinds
from test_expert_ffn_fp8 import delta_err, f32, make_case


def gpu_case(*a, **k):
    return make_case(*a, **k, device="cuda")


def check_quantized(q, scale, q_ref, scale_ref):
    """Kernel quantization == reference up to float rounding: scales to 1e-5, values off by at most one
    step and only rarely (a value at a rounding midpoint)."""
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


# ------------------------------------------------------------------------------------ the scheme
def test_quantize_rows_scales_per_row_and_zero_rows():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 333, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1.0, 1e4])[:, None]
    t[3] = 0.0
    t[4, 7] = 500.0  # an outlier sets its row's scale alone
    q, scale = int8.quantize_rows(t)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6,)
    amax = t.abs().amax(dim=1)
    torch.testing.assert_close(scale, torch.where(amax > 0, amax / 127, torch.ones_like(amax)), rtol=0, atol=0)
    assert torch.equal(q[3], torch.zeros(333, dtype=torch.int8)) and scale[3] == 1
    assert torch.equal(q[[0, 1, 2, 4, 5]].int().abs().amax(dim=1), torch.full((5,), 127))  # full range per row
    assert q.int().min() >= -127
    back = int8.dequantize_rows(q, scale)
    assert ((back - t).abs() <= scale[:, None] * (0.5 + 1e-5)).all()  # round to nearest
    assert rel_err(back[[0, 1, 2, 5]], t[[0, 1, 2, 5]]) > 1e-3  # it really is 8-bit
    rest = torch.arange(333) != 7  # the outlier's row: its other values lost their precision (all round to 0)
    assert rel_err(back[4, rest], t[4, rest]) > 50 * rel_err(back[1], t[1])


def test_reference_int8_error_band():
    args, kwargs = make_case(2, 40, 256, 1024, 7, torch.float32, seed=1)
    ref = expert_ffn_reference(**args, **kwargs)
    err8 = delta_err(expert_ffn_reference(**args, **kwargs, precision="int8"), ref, args["x"])
    errf8 = delta_err(expert_ffn_reference(**args, **kwargs, precision="fp8"), ref, args["x"])
    assert 5e-3 < err8 < 4e-2, err8  # four int8 roundings: not zero and not broken
    assert err8 < 0.6 * errf8  # finer than e4m3 on gaussian rows


# ------------------------------------------------------------------------------------ Triton pieces
@pytest.mark.parametrize("text_len", [0, 5, 13])
def test_prepass_quantizes_h_per_token(interpret, text_len):
    args, kwargs = make_case(2, 13, 96, 64, text_len, seed=2)
    x, mod = args["x"].clone(), args["modulation"].clone()
    x[1, 3] = 0.7  # a constant token with no shift and no norm bias: h is an all-zero row
    mod[1, [0, 3]] = 0.0
    B, S, Hd = x.shape
    h_q, h_scale = triton_fwd.modulated_norm_fwd(x.view(B * S, Hd), mod, kwargs["norm_weight"], None, 1e-5, S,
                                                 text_len, torch.int8)
    h, _ = modulated_norm_reference(x.float(), mod.float(), text_len, kwargs["norm_weight"].float(), None, 1e-5)
    check_quantized(h_q, h_scale, *int8.quantize_rows(h.view(B * S, Hd)))
    assert h_scale[S + 3] == 1 and not h_q[S + 3].any()


def test_bias_gelu_quant_rows(interpret):
    from cogvideox_kernels.ops.expert_ffn import fp8

    g = torch.Generator().manual_seed(3)
    y = (torch.randn(9, 200, generator=g) * 2).bfloat16()
    bias = (torch.randn(200, generator=g) * 0.1).bfloat16()
    y[4] = -bias  # gelu(0) = 0: an all-zero row
    q, scale = fp8.bias_gelu_quant_fwd(y, bias, torch.int8)
    check_quantized(q, scale, *int8.quantize_rows(F.gelu(y.float() + bias.float(), approximate="tanh")))
    assert scale[4] == 1 and not q[4].any()
    q2, scale2 = fp8.bias_gelu_quant_fwd(y, None, torch.int8)
    check_quantized(q2, scale2, *int8.quantize_rows(F.gelu(y.float(), approximate="tanh")))


@pytest.mark.parametrize("M,N,K,tma", [(70, 96, 80, True), (33, 40, 72, False), (1, 64, 64, True)])
def test_int8_gemm_epilogues(interpret, M, N, K, tma):
    """Both epilogues against float64 on the same int8 operands; M, N, K off the 32-blocks (masks, TMA
    zero fill); K = 72 is not 16-byte aligned, so that case takes pointer loads whatever the config."""
    g = torch.Generator().manual_seed(M)
    a_q = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    w_q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    a_q[0] = 127  # the largest sums: 127^2 * K, exact in int32
    w_q[0] = 127
    a_scale = torch.rand(M, generator=g) + 0.1
    w_scale = torch.rand(N, generator=g) * 1e-3
    prod = (a_q.double() * a_scale.double()[:, None]) @ (w_q.double() * w_scale.double()[:, None]).t()
    out = torch.empty(M, N, dtype=torch.bfloat16)
    int8.int8_linear_fwd(a_q, a_scale, w_q, w_scale, out, config=dict(tma=tma))
    assert rel_err(out, prod) < 4e-3  # the bf16 store's rounding only
    B, S = (1, M) if M < 2 else (2, M // 2) if M % 2 == 0 else (1, M)
    x = torch.randn(M, N, generator=g).bfloat16()
    mod = torch.randn(B, 6, N, generator=g).bfloat16()
    bias = torch.randn(N, generator=g).bfloat16()
    text_len = min(3, S)
    res = torch.empty(M, N, dtype=torch.bfloat16)
    int8.int8_linear_fwd(a_q, a_scale, w_q, w_scale, res, epilogue=int8.EPILOGUE_GATE_RESIDUAL, bias=bias, x=x,
                         modulation=mod, seq_len=S, text_len=text_len, config=dict(tma=tma))
    is_text = (torch.arange(M) % S < text_len)[:, None]
    sample = torch.arange(M) // S
    gate = torch.where(is_text, mod[sample, 5], mod[sample, 2]).double()
    expected = x.double() + gate * (prod + bias.double())
    assert rel_err(res, expected) < 4e-3


# ------------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("text_len,biases", [(0, True), (5, True), (37, True), (9, False)])
def test_int8_triton_matches_its_emulation(interpret, text_len, biases):
    args, kwargs = make_case(2, 37, 64, 192, text_len, seed=4 + text_len, biases=biases)
    out = expert_ffn(**args, **kwargs, precision="int8", backend="triton")
    assert out.shape == args["x"].shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    x = args["x"]
    ref = expert_ffn_reference(**f32(args), **f32(kwargs))
    ref8 = expert_ffn_reference(**f32(args), **f32(kwargs), precision="int8")
    emulated = int8.kernel_emulation(**args, **kwargs)
    emulation_err = delta_err(ref8, ref, x)
    assert delta_err(out, emulated, x) < 0.1 * emulation_err  # the same function, up to a few flipped roundings
    assert delta_err(out, ref, x) < 4e-2
    bf16 = expert_ffn(**args, **kwargs, backend="triton")
    fp8 = expert_ffn(**args, **kwargs, precision="fp8", backend="triton")
    assert rel_err(bf16, ref) < rel_err(out, ref) < rel_err(fp8, ref)  # really int8: between bf16 and e4m3


def test_int8_channel_outliers_in_h(interpret):
    """(1 + scale) of 50 on every 16th channel: each token's scale is set by its outliers and the other
    channels keep only a few bits (int8's weak spot, unlike e4m3); the kernels still compute the scheme."""
    args, kwargs = make_case(1, 33, 128, 256, 4, seed=5, scale_outliers=50.0)
    out = expert_ffn(**args, **kwargs, precision="int8", backend="triton")
    ref = expert_ffn_reference(**f32(args), **f32(kwargs))
    emulated = int8.kernel_emulation(**args, **kwargs)
    x = args["x"]
    assert delta_err(out, emulated, x) < 0.1 * delta_err(emulated, ref, x)
    assert delta_err(out, ref, x) < 0.2


def test_int8_non_contiguous_inputs(interpret):
    args, kwargs = make_case(2, 11, 64, 96, 3, seed=6)
    inputs = {**args, **kwargs}
    tried = set()
    for name, index, t in tensor_args(inputs):
        for kind in view_kinds(t):
            view = strided_view(t, kind)
            if view.is_contiguous():
                continue
            tried.add(name)
            out = expert_ffn(**replaced(inputs, name, index, view), precision="int8", backend="triton")
            dense = expert_ffn(**replaced(inputs, name, index, view.contiguous()), precision="int8", backend="triton")
            assert torch.equal(out, dense), (name, kind)
    assert tried == {"x", "modulation", "w1", "b1", "w2", "b2", "norm_weight", "norm_bias"}


def test_int8_experts_take_the_reference(interpret):
    g = torch.Generator().manual_seed(8)
    args, kwargs = make_case(1, 9, 32, 64, 4, torch.float32, seed=8)
    args["w1"], args["b1"] = torch.randn(2, 64, 32, generator=g) * 0.2, torch.randn(2, 64, generator=g)
    args["w2"], args["b2"] = torch.randn(2, 32, 64, generator=g) * 0.1, torch.randn(2, 32, generator=g)
    kwargs["num_text_experts"] = 1
    with pytest.raises(ValueError, match="num_text_experts"):
        expert_ffn(**args, **kwargs, precision="int8", backend="triton")
    out = expert_ffn(**args, **kwargs, precision="int8")
    assert torch.equal(out, expert_ffn_reference(**args, **kwargs, precision="int8"))
    with pytest.raises(ValueError, match="bfloat16"):
        expert_ffn(**make_case(1, 9, 32, 64, 4, torch.float16)[0], **kwargs | {"num_text_experts": 0},
                   precision="int8", backend="triton")


# ------------------------------------------------------------------------------------ weight cache
def test_int8_weight_cache_is_its_own():
    """int8 and fp8 keep separate caches: the same weight gets an int8 copy here, an e4m3 one there."""
    from cogvideox_kernels.ops.expert_ffn import fp8

    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(9)).bfloat16()
    cache = fp8.WeightCache(int8.quantize_weight)
    q, scale = cache.get(w)
    assert q.dtype == torch.int8 and torch.equal(scale, int8.quantize_rows(w)[1]) and cache.get(w)[0] is q
    assert int8.WEIGHTS is not fp8.WEIGHTS


def test_op_sees_weight_updates(interpret):
    args, kwargs = make_case(1, 17, 64, 96, 5, seed=10)
    int8.WEIGHTS.clear()
    before = expert_ffn(**args, **kwargs, precision="int8", backend="triton")
    assert torch.equal(expert_ffn(**args, **kwargs, precision="int8", backend="triton"), before)
    quantized = int8.WEIGHTS.quantizations
    args["w1"].add_((torch.randn(args["w1"].shape, generator=torch.Generator().manual_seed(11)) * 0.05).bfloat16())
    after = expert_ffn(**args, **kwargs, precision="int8", backend="triton")
    assert int8.WEIGHTS.quantizations == quantized + 1
    emulated = int8.kernel_emulation(**args, **kwargs)
    ref = expert_ffn_reference(**f32(args), **f32(kwargs))
    assert delta_err(after, emulated, args["x"]) < 0.1 * delta_err(emulated, ref, args["x"])
    assert not torch.equal(after, before)


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("S,hidden,inner,text_len", [(226 + 17550, 3072, 12288, 226), (37, 256, 704, 5)])
def test_gpu_int8_matches_emulation(S, hidden, inner, text_len):
    args, kwargs = gpu_case(2, S, hidden, inner, text_len, seed=S)
    out = expert_ffn(**args, **kwargs, precision="int8", backend="triton")
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = expert_ffn_reference(**f32(args), **f32(kwargs))
    emulated = int8.kernel_emulation(**args, **kwargs)
    x = args["x"]
    emulation_err = delta_err(emulated, ref, x)
    assert delta_err(out, emulated, x) < 0.25 * emulation_err, (delta_err(out, emulated, x), emulation_err)
    assert delta_err(out, ref, x) < 4e-2 and rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_int8_weight_update_and_compile(device, request):
    if device == "cpu":
        request.getfixturevalue("interpret")
    S, hidden, inner = (300, 256, 512) if device == "cuda" else (19, 64, 96)
    args, kwargs = make_case(2, S, hidden, inner, 17, device=device, seed=12)

    def half_block(x, modulation):
        return expert_ffn(x, modulation, args["w1"], args["b1"], args["w2"], args["b2"], **kwargs,
                          precision="int8", backend="triton")

    eager = half_block(args["x"], args["modulation"])
    compiled = torch.compile(half_block, fullgraph=True)
    torch.testing.assert_close(compiled(args["x"], args["modulation"]), eager, rtol=0, atol=0)
    args["w2"].mul_(-1)  # in place: the cached int8 copy must not be reused (int8 rows are sign-symmetric,
    args["b2"].mul_(-1)  # so the FFN term flips sign exactly up to the output's bf16 rounding)
    flipped = half_block(args["x"], args["modulation"])
    torch.testing.assert_close(flipped - args["x"], -(eager - args["x"]), rtol=0.05, atol=0.05)
    torch.testing.assert_close(compiled(args["x"], args["modulation"]), flipped, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ sm_90a, ahead of time
def _compile_sm90(fn, signature: dict, constexprs: dict, **options) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = signature | {name: "constexpr" for name in constexprs}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def sm90_ptx_checks():
    """Compile the 8-bit kernels for sm_90a (needs no GPU; the interpreter never compiles them, and some
    errors, e.g. returns of different types, only show here) and check the PTX."""
    from cogvideox_kernels.ops.expert_ffn import fp8

    cfg = dict(int8.GPU_CONFIG)
    for epilogue in (int8.EPILOGUE_STORE, int8.EPILOGUE_GATE_RESIDUAL):
        ptx = _compile_sm90(int8._int8_gemm_fwd_kernel, {
            "a_ptr": "*i8", "b_ptr": "*i8", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32", "c_ptr": "*bf16",
            "bias_ptr": "*bf16", "x_ptr": "*bf16", "mod_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
            "seq_len": "i32", "text_len": "i32"}, dict(
            EPILOGUE=epilogue, HAS_BIAS=True, TMA=cfg["tma"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], EPILOGUE_SUBTILE=cfg["epilogue_subtile"],
            INTERPRET=False), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        # s8 wgmma into s32 from TMA-loaded tiles
        assert "wgmma.mma_async" in ptx and ".s32.s8.s8" in ptx and "cp.async.bulk.tensor" in ptx, epilogue
    for quant, qtype in ((triton_fwd.QUANT_E4M3, "*fp8e4nv"), (triton_fwd.QUANT_INT8, "*i8")):
        ptx = _compile_sm90(triton_fwd._modulated_norm_fwd_kernel, {
            "x_ptr": "*bf16", "mod_ptr": "*bf16", "norm_w_ptr": "*bf16", "norm_b_ptr": "*bf16", "h_ptr": qtype,
            "h_scale_ptr": "*fp32", "seq_len": "i32", "text_len": "i32", "hidden": "i32", "eps": "fp32",
            "n_rows": "i32"},
            dict(HAS_NORM_W=True, HAS_NORM_B=True, QUANT=quant, BLOCK_R=1, BLOCK_H=4096, CHUNK=0, INTERPRET=False),
            num_warps=16)
        ptx += _compile_sm90(fp8._bias_gelu_quant_fwd_kernel, {
            "y_ptr": "*bf16", "bias_ptr": "*bf16", "q_ptr": qtype, "scale_ptr": "*fp32", "N": "i32"},
            dict(HAS_BIAS=True, QUANT=quant, BLOCK_N=16384, INTERPRET=False), num_warps=32)
        fast = _compile_sm90(fp8._bias_gelu_quant_fwd_kernel, {
            "y_ptr": "*bf16", "bias_ptr": "*bf16", "q_ptr": qtype, "scale_ptr": "*fp32", "N": "i32"},
            dict(HAS_BIAS=True, QUANT=quant, BLOCK_N=16384, INTERPRET=False, FAST=True), num_warps=32)
        assert "div.full.f32" in fast or "div.approx" in fast  # the approximate GELU divide
        ptx += fast
        if quant == triton_fwd.QUANT_INT8:  # libdevice rint in both: round to nearest even, as torch.round
            assert ptx.count("cvt.rni") >= 2
        else:
            assert "cvt.rn.satfinite.e4m3x2" in ptx


def test_8bit_kernels_compile_for_sm90a():
    import os
    import subprocess
    import sys
    from pathlib import Path

    from cogvideox_kernels.ops._triton_utils import interpret_mode

    if not interpret_mode():
        sm90_ptx_checks()
        return
    # the interpreter's jit functions cannot be compiled: a fresh process without it
    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", "import test_expert_ffn_int8 as t; t.sm90_ptx_checks()"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
