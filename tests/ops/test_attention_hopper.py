"""Hopper (Gluon, sm_90a) rope3d_attention vs the float32/float64 reference.

Gluon kernels do not run under the Triton interpreter, so on CPU only the wrapper is checked:
input checks, the support/dispatch decisions, the fake implementation (what torch.compile traces)
and that the kernel module imports and compiles for sm_90a offline. GPU tests (marker ``gpu``,
H100/H200 only): parity against a float64 reference on odd shapes, strided/non-contiguous inputs,
NaN-poisoned outputs (conftest), error at most 1.25x a diffusers-style bf16 path, the 5B shape on
sampled rows, the kernel configs the shipped kernel takes, and torch.compile(fullgraph=True).
"""
import pytest
import torch

from cogvideox_kernels.ops.attention import hopper
from cogvideox_kernels.ops.attention.hopper import (hopper_available, hopper_supports,
                                                    rope3d_attention_hopper, unsupported_reason)
from cogvideox_kernels.ops.attention.reference import (qk_norm_rope_reference,
                                                       rope3d_attention_reference)


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output (unwritten or overflowed elements)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_case(B, S, H, D, text_len, dtype, *, rope=True, q_norm=True, k_norm=True, k_bias=True,
              seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    qkv = rand(B, S, 3, H, D).to(dtype)
    q, k, v = qkv.unbind(2)  # strided [B, S, H, D] views of the QKV projection
    cos = sin = None
    if rope:
        angles = (rand(S - text_len, D // 2) * 3.0).double().repeat_interleave(2, dim=1)
        cos, sin = angles.cos().float(), angles.sin().float()
    qn = ((1 + 0.2 * rand(D)).to(dtype), (0.2 * rand(D)).to(dtype)) if q_norm else None
    kn = (((1 + 0.2 * rand(D)).to(dtype), (0.2 * rand(D)).to(dtype) if k_bias else None)
          if k_norm else None)
    return dict(q=q, k=k, v=v, text_len=text_len, cos=cos, sin=sin, q_norm=qn, k_norm=kn)


def case_args(case):
    return dict(text_len=case["text_len"], cos=case["cos"], sin=case["sin"],
                q_norm=case["q_norm"], k_norm=case["k_norm"])


# ---------------------------------------------------------------------------------------- CPU
def test_unsupported_reasons():
    assert unsupported_reason(torch.bfloat16, 64, (9, 0)) is None
    assert unsupported_reason(torch.float16, 128, (9, 0)) is None
    assert "CUDA" in unsupported_reason(torch.bfloat16, 64, None)
    assert "9.0" in unsupported_reason(torch.bfloat16, 64, (8, 0))
    assert "9.0" in unsupported_reason(torch.bfloat16, 64, (10, 0))
    assert "dtype" in unsupported_reason(torch.float32, 64, (9, 0))
    assert "head_dim=40" in unsupported_reason(torch.bfloat16, 40, (9, 0))
    assert "int32" in unsupported_reason(torch.bfloat16, 64, (9, 0), rows=2 ** 31)


def test_cpu_is_not_supported():
    case = make_case(1, 8, 2, 64, 2, torch.bfloat16)
    assert not hopper_supports(case["q"], case["k"], case["v"])
    ok, why = hopper_available("cpu")
    assert not ok and "CUDA" in why
    with pytest.raises(ValueError, match="rope3d_attention_hopper: it needs a CUDA device"):
        rope3d_attention_hopper(case["q"], case["k"], case["v"], **case_args(case))


def test_input_checks_run_first():
    case = make_case(1, 8, 2, 64, 2, torch.bfloat16)
    with pytest.raises(ValueError, match="text_len"):
        rope3d_attention_hopper(case["q"], case["k"], case["v"], text_len=9)
    with pytest.raises(ValueError, match="cos must have shape"):
        rope3d_attention_hopper(case["q"], case["k"], case["v"], text_len=2,
                                cos=case["cos"][:3], sin=case["sin"][:3])


def test_fake_impl_shape_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 33, 3, 64, dtype=torch.bfloat16)
        cos = torch.empty(30, 64)
        out = torch.ops.cogvideox_kernels.rope3d_attention_hopper(
            q, q, q, 3, cos, cos, None, None, None, None, False, False, 1e-6, 0.125)
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()


def test_unknown_config_key_raises():
    from cogvideox_kernels.ops.attention.hopper_fwd import hopper_attention_core

    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="PINGPONG"):
        hopper_attention_core(q, q, q, torch.empty(1, 8, 2, 64, dtype=torch.bfloat16), 0.125,
                              dict(PINGPONG=True))


_COMPILE_SCRIPT = """
import json, sys
from cogvideox_kernels.ops.attention.hopper_fwd import compile_offline
config, head_dim, dtype = json.loads(sys.argv[1])
ptx = compile_offline(config, head_dim, dtype).asm["ptx"]
print(json.dumps(dict(wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                      setmaxnreg="setmaxnreg" in ptx, local=".local" in ptx)))
"""


@pytest.mark.parametrize("config,D,dtype", [
    pytest.param({}, 64, "bf16", marks=pytest.mark.slow),
    ({}, 128, "fp16"),
    pytest.param(dict(NUM_WG=2, BLOCK_M=128, BLOCK_N=64, STAGES=4), 64, "bf16", marks=pytest.mark.slow),
])
def test_kernel_compiles_for_sm90a_offline(config, D, dtype, tmp_path):
    """The Gluon kernel lowers to sm_90a PTX without a GPU: warpgroup MMAs, TMA, register
    reallocation, nothing in local memory. Gluon does not build under TRITON_INTERPRET, so this
    runs in a subprocess without it (and with an empty Triton cache, so it really compiles)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps([config, D, dtype])],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found == dict(wgmma=True, tma=True, setmaxnreg=True, local=False), found


def test_v_token_major_ok():
    from cogvideox_kernels.ops.attention.hopper_fwd import v_token_major_ok

    qkv = torch.randn(2, 10, 3, 4, 64).to(torch.bfloat16)
    assert v_token_major_ok(qkv[:, :, 2])                         # the model's QKV slice
    assert v_token_major_ok(torch.randn(2, 10, 4, 64))            # contiguous
    assert v_token_major_ok(qkv[:, ::2, 2])                       # token step: still one 2D view
    assert v_token_major_ok(qkv[:1, :5, 2])                       # B = 1: any batch stride
    assert not v_token_major_ok(qkv[:, :5, 2])                    # batches not adjacent
    assert not v_token_major_ok(torch.randn(2, 4, 10, 64).transpose(1, 2))  # head-major storage
    assert not v_token_major_ok(torch.randn(2, 10, 4, 128)[..., :64])       # D not unit-merged
    assert not v_token_major_ok(torch.randn(2, 10, 4, 65)[..., :64])        # 16-byte rows


def test_core_rejects_bad_v_and_fp16_bound():
    """The launcher's own checks (before any launch, so they run on CPU tensors)."""
    from cogvideox_kernels.ops.attention.hopper_fwd import hopper_attention_core

    qh = torch.randn(1, 2, 8, 64).to(torch.bfloat16)
    out = torch.empty(1, 8, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="token-major V"):
        hopper_attention_core(qh, qh, torch.randn(1, 8, 2, 128).bfloat16()[..., :64], out, 0.1,
                              v_token_major=True)
    with pytest.raises(ValueError, match="vh must be contiguous"):
        hopper_attention_core(qh, qh, qh.transpose(1, 2), out, 0.1)
    with pytest.raises(ValueError, match="norm_max must be"):
        hopper_attention_core(qh, qh, qh, out, 0.1, norm_max=torch.zeros(3))
    q16 = qh.half()
    with pytest.raises(ValueError, match="bf16"):
        hopper_attention_core(q16, q16, q16, out.half(), 0.1, norm_max=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="config keys"):
        hopper_attention_core(qh, qh, qh, out, 0.1, dict(POLY=1))


@pytest.mark.slow
def test_next_experiments_still_compile(tmp_path):
    """benchmarks/experiments/hopper_attention_next.py builds on this module's internals
    (alloc_shared, mma_layout, store_rows, _consumer_loop, ...): it must keep compiling for sm_90a
    so the next GPU probe can run it (all of its options at once; the ROWSUM_MMA kernel, whose
    64x8 row-sum wgmma must be there; its POLY 3/8 variant, whose polynomial exp2 must be there:
    the 1.5 * 2^23 rounding constant beside the remaining ex2.approx)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = ("import json, sys; sys.path.insert(0, 'benchmarks/experiments'); "
              "from hopper_attention_next import compile_offline, compile_rowsum_offline; "
              "ptx = compile_offline(True, True, persist=True, lazy_sum=True).asm['ptx']; "
              "ptx += compile_rowsum_offline(64).asm['ptx']; "
              "poly = compile_rowsum_offline(64, False, poly=3).asm['ptx']; "
              "print(json.dumps(dict(wgmma='wgmma.mma_async' in ptx, local='.local' in ptx + poly, "
              "n8='wgmma.mma_async.sync.aligned.m64n8k16' in ptx, "
              "poly='0f4B400000' in poly and 'ex2.approx' in poly, "
              "no_poly='0f4B400000' not in ptx)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=root, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == dict(wgmma=True, local=False, n8=True,
                                                                   poly=True, no_poly=True)


# ---------------------------------------------------------------------------------------- GPU
def _on_hopper():
    return torch.cuda.is_available() and hopper_available("cuda")[0]


gpu_hopper = pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU (H100/H200)")


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("B,S,H,D,text_len,dtype", [
    (1, 1, 1, 64, 0, torch.bfloat16),        # S = 1
    (2, 37, 3, 64, 5, torch.bfloat16),       # S below one block
    (1, 300, 5, 64, 0, torch.bfloat16),      # text_len 0, S not a multiple of 64/128/192
    (2, 333, 3, 64, 333, torch.bfloat16),    # text_len = S (no video tokens)
    (1, 1000, 7, 128, 17, torch.bfloat16),   # head_dim 128, odd H
    (2, 517, 3, 64, 26, torch.float16),
    (1, 777, 2, 128, 100, torch.float16),
])
def test_gpu_parity_odd_shapes(B, S, H, D, text_len, dtype):
    case = make_case(B, S, H, D, text_len, dtype, seed=S + D + H, device="cuda")
    out = rope3d_attention_hopper(case["q"], case["k"], case["v"], **case_args(case))
    ref = rope3d_attention_reference(case["q"], case["k"], case["v"], compute_dtype=torch.float64,
                                     **case_args(case))
    assert out.shape == case["q"].shape and out.dtype == dtype and out.is_contiguous()
    assert rel_err(out, ref) <= 1e-2


def _diffusers_style(case, scale):
    """LayerNorm in the input dtype, RoPE in float32 cast back, SDPA in the input dtype."""
    import torch.nn.functional as F

    def prep(x, norm):
        x = x.transpose(1, 2)
        if norm is not None:
            x = F.layer_norm(x, (x.shape[-1],), norm[0], norm[1], 1e-6)
        if case["cos"] is not None:
            t = case["text_len"]
            video = x[:, :, t:]
            pairs = video.float().unflatten(-1, (-1, 2))
            rot = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
            video = (video.float() * case["cos"] + rot * case["sin"]).to(x.dtype)
            x = torch.cat((x[:, :, :t], video), dim=2)
        return x

    q, k = prep(case["q"], case["q_norm"]), prep(case["k"], case["k_norm"])
    out = F.scaled_dot_product_attention(q, k, case["v"].transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_error_vs_diffusers_style(D):
    """Error vs float64 at most 1.25x the error of the diffusers-style bf16 path (same inputs)."""
    case = make_case(2, 2000, 4, D, 226, torch.bfloat16, seed=D, device="cuda")
    ref = rope3d_attention_reference(case["q"], case["k"], case["v"], compute_dtype=torch.float64,
                                     **case_args(case))
    ours = rel_err(rope3d_attention_hopper(case["q"], case["k"], case["v"], **case_args(case)), ref)
    theirs = rel_err(_diffusers_style(case, D ** -0.5), ref)
    assert ours <= 1.25 * theirs, (ours, theirs)


@pytest.mark.gpu
@gpu_hopper
def test_gpu_non_contiguous_inputs():
    """Each of q, k, v (and cos/sin) also as a non-contiguous view; results equal the contiguous run."""
    case = make_case(2, 403, 3, 64, 30, torch.bfloat16, seed=3, device="cuda")
    base = rope3d_attention_hopper(case["q"], case["k"], case["v"], **case_args(case))
    ref = rope3d_attention_reference(case["q"], case["k"], case["v"], compute_dtype=torch.float64,
                                     **case_args(case))
    assert rel_err(base, ref) <= 1e-2
    for name in ("q", "k", "v"):
        wide = torch.zeros(2, 403 * 2, 3, 64, dtype=torch.bfloat16, device="cuda")
        wide[:, ::2] = case[name]
        other = dict(case, **{name: wide[:, ::2]})  # stepped slice along S
        assert not other[name].is_contiguous()
        out = rope3d_attention_hopper(other["q"], other["k"], other["v"], **case_args(other))
        torch.testing.assert_close(out, base, rtol=0, atol=0)
    cos_t = case["cos"].t().contiguous().t()  # column-major cos/sin tables
    sin_t = case["sin"].t().contiguous().t()
    out = rope3d_attention_hopper(case["q"], case["k"], case["v"],
                                  **dict(case_args(case), cos=cos_t, sin=sin_t))
    torch.testing.assert_close(out, base, rtol=0, atol=0)


@pytest.mark.gpu
@gpu_hopper
def test_gpu_cogvideox_5b_shape_sampled_rows():
    B, S, H, D, text_len = 2, 17776, 48, 64, 226
    case = make_case(B, S, H, D, text_len, torch.bfloat16, seed=5, device="cuda")
    out = rope3d_attention_hopper(case["q"], case["k"], case["v"], **case_args(case))
    assert torch.isfinite(out).all()
    rows = torch.unique(torch.cat((torch.tensor([0, text_len - 1, text_len, S - 1]),
                                   torch.randint(0, S, (96,))))).cuda()
    args = (text_len, case["cos"], case["sin"])
    qw = qk_norm_rope_reference(case["q"], *args, case["q_norm"], 1e-6, torch.float64)
    kw = qk_norm_rope_reference(case["k"], *args, case["k_norm"], 1e-6, torch.float64)
    ref = []
    for b in range(B):
        p = torch.softmax(torch.einsum("rhd,shd->hrs", qw[b, rows], kw[b]) * D ** -0.5, dim=-1)
        ref.append(torch.einsum("hrs,shd->rhd", p, case["v"][b].double()))
    assert rel_err(out[:, rows], torch.stack(ref)) <= 1e-2


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("D,config", [
    (64, dict(NUM_WG=2)), (64, dict(STAGES=2)), (64, dict(STAGES=4)),
    (64, dict(BLOCK_M=128, BLOCK_N=64, STAGES=4)), (64, dict(NUM_WG=2, BLOCK_M=128, BLOCK_N=64)),
    (64, dict(BLOCK_N=64)), (128, dict(NUM_WG=2)), (128, dict(BLOCK_N=128, STAGES=2)),
    (64, dict(STAGES=3)), (64, dict(BLOCK_N=64, STAGES=8)),
])
def test_gpu_kernel_configs(D, config):
    """Every config the benchmark measures computes the same function (S not a multiple of any
    block, so the masked last block and the partial last query tile are exercised)."""
    from cogvideox_kernels.ops.attention.hopper import hopper_attention_fwd

    case = make_case(2, 1111, 3, D, 11, torch.bfloat16, seed=11, device="cuda")
    qn, kn = case["q_norm"], case["k_norm"]
    out = hopper_attention_fwd(case["q"], case["k"], case["v"], 11, case["cos"], case["sin"],
                               qn[0], qn[1], kn[0], kn[1], True, True, 1e-6, 0.125, config=config)
    ref = rope3d_attention_reference(case["q"], case["k"], case["v"], compute_dtype=torch.float64,
                                     scale=0.125, **case_args(case))
    assert rel_err(out, ref) <= 1e-2


def _rounded_input_reference(q, k, v, case, dtype, scale, q_prescaled=False):
    """float64 attention of the pre-pass's values rounded to the input dtype (LN + RoPE in
    float64 first): the kernel's own error only. With peaky scores (large norm weights) the bf16
    rounding of q/k alone moves the logits by more than the 1e-2 budget, in any bf16 kernel.
    ``q_prescaled``: q rounded as the bf16 path's pre-pass writes it, times scale * log2(e)."""
    args = (case["text_len"], case["cos"], case["sin"])
    qr = qk_norm_rope_reference(q, *args, case["q_norm"], 1e-6, torch.float64)
    if q_prescaled:
        c = scale * 1.4426950408889634
        qr = (qr * c).to(dtype).double() / c
    else:
        qr = qr.to(dtype).double()
    kr = qk_norm_rope_reference(k, *args, case["k_norm"], 1e-6, torch.float64).to(dtype).double()
    p = torch.softmax(torch.einsum("bshd,bthd->bhst", qr, kr) * scale, dim=-1)
    return torch.einsum("bhst,bthd->bshd", p, v.double())


def _score_bound_t(q, k, case):
    """The kernel's bound T (log2 units) per (b, h), from the pre-pass's row norms."""
    from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd

    B, S, H, _ = q.shape
    sq = torch.empty(2, B, S, H, device=q.device)
    for i, (x, norm) in enumerate(((q, case["q_norm"]), (k, case["k_norm"]))):
        w, b = norm if norm is not None else (None, None)
        qk_norm_rope_fwd(x, case["text_len"], case["cos"], case["sin"], w, b, norm is not None,
                         1e-6, norm_sq=sq[i])
    m = sq.amax(dim=2)
    return (m[0] * m[1]).sqrt() * case["scale"] * 1.4426950408889634 * 1.01


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("prescale", [True, False])
@pytest.mark.parametrize("norm_gain", [1.0, 1.95, 2.4, 2.6, 6.0])
def test_gpu_score_bound_paths(norm_gain, prescale):
    """The fixed-max softmax (heads whose Cauchy-Schwarz score bound T is <= 80, or <= 64 with q
    prescaled: no shift) and the running-max softmax (SCORE_BOUND off, or T over the limit) give
    the same result, within the kernel's own error of a float64 attention on the rounded pre-pass
    values. The norm weights are scaled by norm_gain: gain 1 gives T ~ 15, ~1.95 T in (48, 64]
    (prescaled: numerators up to 2^T unshifted), ~2.4 T in (64, 80] (shifted: numerators up to 2^e;
    prescaled: the running max), large gains T > 80 (the running max)."""
    from cogvideox_kernels.ops.attention.hopper import hopper_attention_fwd

    case = make_case(2, 1111, 3, 64, 11, torch.bfloat16, seed=12, device="cuda")
    (qw, qb), (kw, kb) = case["q_norm"], case["k_norm"]
    qw, kw = (qw.float() * norm_gain).to(qw.dtype), (kw.float() * norm_gain).to(kw.dtype)
    case = dict(case, q_norm=(qw, qb), k_norm=(kw, kb), scale=0.125)
    t = _score_bound_t(case["q"], case["k"], case)
    if norm_gain == 1.0:
        assert t.max() <= 48
    if norm_gain == 1.95:
        assert (t > 48).any() and t.max() <= 64, t
    if norm_gain == 6.0:
        assert t.min() > 80
    outs = {}
    for bound_on in (True, False):
        outs[bound_on] = hopper_attention_fwd(
            case["q"], case["k"], case["v"], 11, case["cos"], case["sin"], qw, qb, kw, kb, True,
            True, 1e-6, 0.125,
            config=dict(PRESCALE_Q=prescale) if bound_on else dict(SCORE_BOUND=False))
    ref = _rounded_input_reference(case["q"], case["k"], case["v"], case, torch.bfloat16, 0.125)
    ref_p = _rounded_input_reference(case["q"], case["k"], case["v"], case, torch.bfloat16, 0.125,
                                     q_prescaled=prescale)
    assert rel_err(outs[True], ref_p) <= 1e-2
    assert rel_err(outs[False], ref) <= 1e-2
    if not prescale or norm_gain < 2.4:  # same q rounding, or scores not peaky enough to show it
        assert rel_err(outs[True], outs[False].double()) <= 1e-2


@pytest.mark.gpu
@gpu_hopper
def test_gpu_score_bound_mixed_heads():
    """One launch where some heads take the fixed-max path and others the running max (their q
    scaled up without a norm, so the bound passes the limit), all equal to the reference."""
    case = make_case(2, 700, 4, 64, 30, torch.bfloat16, seed=13, device="cuda", q_norm=False)
    q = case["q"].clone()
    q[:, :, 1] *= 40.0   # head 1: bound >> 80 -> running max
    q[1, :, 3] *= 12.0   # batch 1, head 3: bound ~ 100 -> running max
    case = dict(case, scale=0.125)
    t = _score_bound_t(q, case["k"], case)
    assert (t <= 80).any() and (t > 80).any(), t
    out = rope3d_attention_hopper(q, case["k"], case["v"], scale=0.125, **case_args(case))
    # bf16 with the bound: the pre-pass writes q * scale * log2(e) (hopper.PRESCALE_Q)
    ref = _rounded_input_reference(q, case["k"], case["v"], case, torch.bfloat16, 0.125,
                                   q_prescaled=True)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_v_in_place_equals_copied(dtype):
    """V read in place through the token-major TMA view (the QKV slice) gives bit-identical
    results to V copied head-major first (a token-strided V forces the copy)."""
    case = make_case(2, 1000, 5, 64, 40, dtype, seed=14, device="cuda")
    v_strided = torch.empty(2, 2000, 5, 64, dtype=dtype, device="cuda")[:, ::2]
    v_strided.copy_(case["v"])
    a = rope3d_attention_hopper(case["q"], case["k"], case["v"], **case_args(case))
    b = rope3d_attention_hopper(case["q"], case["k"], v_strided, **case_args(case))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@gpu_hopper
def test_gpu_compile_fullgraph():
    case = make_case(1, 300, 2, 64, 20, torch.bfloat16, seed=7, device="cuda")
    torch._dynamo.reset()
    with torch.no_grad():  # inductor's init makes tensors the conftest poisons; as the Triton test
        fn = torch.compile(lambda q, k, v: rope3d_attention_hopper(q, k, v, **case_args(case)) * 2,
                           fullgraph=True)
        out = fn(case["q"], case["k"], case["v"])
        eager = rope3d_attention_hopper(case["q"], case["k"], case["v"], **case_args(case)) * 2
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
