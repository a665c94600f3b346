"""Triton rope3d_attention vs the float32/float64 reference.

CPU (TRITON_INTERPRET=1): small odd shapes, strided views of a [B, S, 3, H, D] QKV tensor,
NaN-poisoned outputs (conftest). GPU (marker ``gpu``): the real CogVideoX-5B shape against a
float64 reference on sampled query rows, other dtypes/head dims, and torch.compile(fullgraph=True).
"""
import pytest
import torch

from cogvideox_kernels.ops import rope3d_attention, rope3d_freqs
from cogvideox_kernels.ops.attention.reference import (qk_norm_rope_reference,
                                                       rope3d_attention_reference)
from helpers import rel_err

BUDGET = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
GPU_BUDGET = {torch.float32: 5e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # fp32 dot is TF32


def make_case(B, S, H, D, text_len, dtype, *, rope=True, q_norm=True, k_norm=True, k_bias=True,
              seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    qkv = rand(B, S, 3, H, D).to(dtype)
    q, k, v = qkv.unbind(2)  # strided [B, S, H, D] views
    cos = sin = None
    if rope:
        angles = (rand(S - text_len, D // 2) * 3.0).double().repeat_interleave(2, dim=1)
        cos, sin = angles.cos().float(), angles.sin().float()
    qn = ((1 + 0.2 * rand(D)).to(dtype), (0.2 * rand(D)).to(dtype)) if q_norm else None
    kn = ((1 + 0.2 * rand(D)).to(dtype), (0.2 * rand(D)).to(dtype) if k_bias else None) if k_norm else None
    return dict(q=q, k=k, v=v, text_len=text_len, cos=cos, sin=sin, q_norm=qn, k_norm=kn)


def run_both(case, scale=None, backend="triton"):
    args = dict(text_len=case["text_len"], cos=case["cos"], sin=case["sin"],
                q_norm=case["q_norm"], k_norm=case["k_norm"], scale=scale)
    out = rope3d_attention(case["q"], case["k"], case["v"], backend=backend, **args)
    ref = rope3d_attention_reference(case["q"], case["k"], case["v"], compute_dtype=torch.float64,
                                     **args)
    return out, ref


# ---------------------------------------------------------------------------- CPU (interpreter)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", [1, 37, 130])
@pytest.mark.parametrize("text_len", [0, 5, "S"])
@pytest.mark.parametrize("D,H", [(40, 3), (64, 1)])
def test_parity_interpreter(interpret, dtype, S, text_len, D, H):
    text_len = S if text_len == "S" else min(text_len, S)
    case = make_case(2 if S == 37 else 1, S, H, D, text_len, dtype, seed=S * 7 + D + text_len)
    out, ref = run_both(case)
    assert out.shape == case["q"].shape and out.dtype == dtype and out.is_contiguous()
    assert rel_err(out, ref.to(torch.float64)) <= BUDGET[dtype]


@pytest.mark.parametrize("rope,q_norm,k_norm,k_bias", [
    (False, False, False, True),   # plain attention
    (True, False, False, True),    # rope only
    (False, True, True, False),    # norms only, k bias None (CogVideoX-2B style: no rope)
    (True, True, False, True),     # q norm only
    (True, False, True, True),     # k norm only
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optional_parts_interpreter(interpret, rope, q_norm, k_norm, k_bias, dtype):
    case = make_case(1, 70, 2, 64, 9, dtype, rope=rope, q_norm=q_norm, k_norm=k_norm,
                     k_bias=k_bias, seed=3)
    out, ref = run_both(case, scale=0.37)  # a custom scale
    assert rel_err(out, ref) <= BUDGET[dtype]


def test_norm_without_affine_interpreter(interpret):
    case = make_case(1, 45, 2, 40, 4, torch.float32, seed=5)
    case["q_norm"], case["k_norm"] = (None, None), (case["k_norm"][0], None)
    out, ref = run_both(case)
    assert rel_err(out, ref) <= BUDGET[torch.float32]


def test_fp16_and_contiguous_inputs_interpreter(interpret):
    case = make_case(1, 50, 2, 64, 6, torch.float16, seed=11)
    for name in ("q", "k", "v"):
        case[name] = case[name].contiguous()
    out, ref = run_both(case)
    assert rel_err(out, ref) <= BUDGET[torch.float16]


@pytest.mark.parametrize("config", [dict(BLOCK_M=32, BLOCK_N=64), dict(BLOCK_M=64, BLOCK_N=32)])
def test_other_configs_interpreter(interpret, config):
    from cogvideox_kernels.ops.attention.triton_fwd import rope3d_attention_fwd

    c = make_case(1, 150, 2, 64, 11, torch.bfloat16, seed=29)
    cfg = dict(USE_TMA=False, WARP_SPECIALIZE=False, **config)
    out = rope3d_attention_fwd(c["q"], c["k"], c["v"], c["text_len"], c["cos"], c["sin"],
                               *c["q_norm"], *c["k_norm"], True, True, 1e-6, 0.125, config=cfg)
    ref = rope3d_attention_reference(c["q"], c["k"], c["v"], text_len=11, cos=c["cos"],
                                     sin=c["sin"], q_norm=c["q_norm"], k_norm=c["k_norm"],
                                     compute_dtype=torch.float64)
    assert rel_err(out, ref) <= BUDGET[torch.bfloat16]


def test_pre_pass_interpreter(interpret):
    from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd

    c = make_case(2, 33, 3, 40, 4, torch.float32, seed=17)
    want = qk_norm_rope_reference(c["k"], 4, c["cos"], c["sin"], c["k_norm"], 1e-6, torch.float64)
    for head_major in (True, False):
        got = qk_norm_rope_fwd(c["k"], 4, c["cos"], c["sin"], *c["k_norm"], True, 1e-6,
                               head_major=head_major)
        assert got.shape == c["k"].shape
        assert rel_err(got, want) <= 1e-6
    copy = qk_norm_rope_fwd(c["v"], 0, None, None, None, None, False, 1e-6)
    assert torch.equal(copy, c["v"])


def test_pre_pass_norm_sq_interpreter(interpret):
    """norm_sq[b, s, h] = ||y[b, s, h]||^2 (the Hopper kernel's score bound takes its max per
    head), on a non-contiguous input with heads of very different scales, with and without norm."""
    from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd

    c = make_case(2, 45, 3, 64, 5, torch.float32, seed=23)
    k = c["k"] * torch.tensor([1.0, 30.0, 0.01])[None, None, :, None]  # no norm: scale survives
    for norm in (True, False):
        norm_sq = torch.full((2, 45, 3), float("nan"))
        w, b = c["k_norm"]
        y = qk_norm_rope_fwd(k, 5, c["cos"], c["sin"], w, b, norm, 1e-6, norm_sq=norm_sq)
        torch.testing.assert_close(norm_sq.double(), y.double().pow(2).sum(-1), rtol=1e-5, atol=0)


def test_pre_pass_head_rows_norm_max_interpreter(interpret):
    """head_rows (programs over tokens of one head) writes the same y as the (token, head) rows;
    norm_max[b * H + h] = max over s of ||y[b, s, h]||^2 exactly (atomic max per program), on a
    strided input with heads of very different scales and S not a multiple of the rows per program;
    a norm_max of the wrong size or dtype is refused."""
    from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd

    c = make_case(2, 45, 3, 64, 5, torch.float32, seed=29)
    k = c["k"] * torch.tensor([1.0, 30.0, 0.01])[None, None, :, None]
    w, b = c["k_norm"]
    for norm in (True, False):
        want = qk_norm_rope_fwd(k, 5, c["cos"], c["sin"], w, b, norm, 1e-6)
        norm_max = torch.zeros(2 * 3)
        got = qk_norm_rope_fwd(k, 5, c["cos"], c["sin"], w, b, norm, 1e-6, norm_max=norm_max,
                               block_r=16)
        assert torch.equal(got, want)
        sq = torch.full((2, 45, 3), float("nan"))
        qk_norm_rope_fwd(k, 5, c["cos"], c["sin"], w, b, norm, 1e-6, norm_sq=sq, head_rows=True,
                         block_r=16)
        torch.testing.assert_close(sq.double(), want.double().pow(2).sum(-1), rtol=1e-5, atol=0)
        assert torch.equal(norm_max, sq.amax(dim=1).reshape(-1))
    with pytest.raises(ValueError, match="norm_max"):
        qk_norm_rope_fwd(k, 5, c["cos"], c["sin"], w, b, True, 1e-6, norm_max=torch.zeros(5))
    with pytest.raises(ValueError, match="norm_max"):
        qk_norm_rope_fwd(k, 5, c["cos"], c["sin"], w, b, True, 1e-6,
                         norm_max=torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="head_rows"):
        qk_norm_rope_fwd(k, 5, c["cos"], c["sin"], w, b, True, 1e-6, norm_max=torch.zeros(6),
                         head_rows=False)


def test_pre_pass_out_scale_interpreter(interpret):
    """out_scale (the Hopper path's q with scale * log2(e) folded in): y = out_scale * rope(ln(x))
    against the float64 reference, in bf16 and float32, with the norm maxima of the scaled y; a
    wrong scale (or none) fails it."""
    from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd

    scale = 0.125 * 1.4426950408889634
    for dtype in (torch.float32, torch.bfloat16):
        c = make_case(2, 45, 3, 64, 5, dtype, seed=31)
        q = c["q"]  # a strided view of a QKV tensor
        assert not q.is_contiguous()
        want = qk_norm_rope_reference(q, 5, c["cos"], c["sin"], c["q_norm"], 1e-6, torch.float64)
        want = want * scale
        norm_max = torch.zeros(2 * 3)
        got = qk_norm_rope_fwd(q, 5, c["cos"], c["sin"], *c["q_norm"], True, 1e-6,
                               norm_max=norm_max, out_scale=scale)
        budget = 1e-6 if dtype == torch.float32 else 8e-3
        assert rel_err(got, want) <= budget
        plain = qk_norm_rope_fwd(q, 5, c["cos"], c["sin"], *c["q_norm"], True, 1e-6)
        assert rel_err(plain, want) > 0.5   # the scale really is applied
        expect_max = got.double().pow(2).sum(-1).amax(dim=1).reshape(-1)
        torch.testing.assert_close(norm_max.double(), expect_max, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                                   atol=0)


def test_compile_fullgraph_interpreter(interpret):
    """The custom op and the dispatcher trace into one graph (CPU tensors, interpreter)."""
    c = make_case(1, 20, 2, 64, 3, torch.float32, seed=19)

    def f(q, k, v):
        return rope3d_attention(q, k, v, text_len=3, cos=c["cos"], sin=c["sin"], q_norm=c["q_norm"],
                                k_norm=c["k_norm"], backend="triton")

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(c["q"], c["k"], c["v"])
    assert rel_err(out, f(c["q"], c["k"], c["v"])) <= 1e-6


# head dims and dtypes the kernel does not take: tests/ops/test_registry.py


# ---------------------------------------------------------------------------- GPU
def _rows_reference(case, rows, scale):
    """float64 output [B, R, H, D] for query rows ``rows`` over all keys (the full S x S float64
    score matrix of the real shape would not fit)."""
    args = (case["text_len"], case["cos"], case["sin"])
    qw = qk_norm_rope_reference(case["q"], *args, case["q_norm"], 1e-6, torch.float64)
    kw = qk_norm_rope_reference(case["k"], *args, case["k_norm"], 1e-6, torch.float64)
    outs = []
    for b in range(qw.shape[0]):
        p = torch.softmax(torch.einsum("rhd,shd->hrs", qw[b, rows], kw[b]) * scale, dim=-1)
        outs.append(torch.einsum("hrs,shd->rhd", p, case["v"][b].double()))
    return torch.stack(outs)


def _diffusers_style(case, scale):
    """diffusers' bf16 path: bf16 LayerNorm, rope in float32 cast back to bf16, bf16 SDPA."""
    import torch.nn.functional as F

    from cogvideox_kernels.ops.attention.reference import apply_rope_interleaved

    D, t = case["q"].shape[-1], case["text_len"]

    def prep(x, norm):
        x = F.layer_norm(x, (D,), norm[0], norm[1], 1e-6)
        x = x.clone()
        x[:, t:] = apply_rope_interleaved(x[:, t:], case["cos"], case["sin"]).to(x.dtype)
        return x.transpose(1, 2)

    out = F.scaled_dot_product_attention(prep(case["q"], case["q_norm"]),
                                         prep(case["k"], case["k_norm"]),
                                         case["v"].transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


@pytest.mark.gpu
def test_gpu_parity_cogvideox_5b_shape():
    B, H, S, D, text_len = 2, 48, 17776, 64, 226
    case = make_case(B, S, H, D, text_len, torch.bfloat16, rope=False, seed=23, device="cuda")
    sin, cos = rope3d_freqs(13, 30, 45, hidden_size=H * D, num_heads=H, device="cuda")
    case["cos"], case["sin"] = cos, sin
    scale = D ** -0.5
    rows = torch.unique(torch.cat((torch.tensor([0, text_len - 1, text_len, S - 1]),
                                   torch.randint(0, S, (200,))))).cuda()
    ref = _rows_reference(case, rows, scale)
    out = rope3d_attention(case["q"], case["k"], case["v"], text_len=text_len, cos=cos, sin=sin,
                           q_norm=case["q_norm"], k_norm=case["k_norm"])  # backend auto
    ours = rel_err(out[:, rows], ref)
    theirs = rel_err(_diffusers_style(case, scale)[:, rows], ref)
    print(f"5B shape: ours {ours:.3e}, diffusers-style bf16 path {theirs:.3e}")
    assert ours <= BUDGET[torch.bfloat16] and ours <= 2 * theirs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 40), (torch.bfloat16, 128),
                                     (torch.float16, 64), (torch.float32, 64)])
def test_gpu_parity_dtypes_head_dims(dtype, D):
    case = make_case(2, 1000, 3, D, 37, dtype, seed=D, device="cuda")
    out, ref = run_both(case, backend="auto")
    assert rel_err(out, ref) <= GPU_BUDGET[dtype]


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    class Attn(torch.nn.Module):
        def __init__(self, D):
            super().__init__()
            self.qw, self.qb = torch.nn.Parameter(torch.ones(D)), torch.nn.Parameter(torch.zeros(D))
            self.kw, self.kb = torch.nn.Parameter(torch.ones(D)), torch.nn.Parameter(torch.zeros(D))

        def forward(self, qkv, cos, sin):
            q, k, v = qkv.unbind(2)
            return rope3d_attention(q, k, v, text_len=8, cos=cos, sin=sin,
                                    q_norm=(self.qw, self.qb), k_norm=(self.kw, self.kb))

    D = 64
    mod = Attn(D).cuda().to(torch.bfloat16)
    qkv = torch.randn(2, 200, 3, 4, D, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(192, D, device="cuda")
    cos, sin = angles.cos(), angles.sin()
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(mod, fullgraph=True)
        out = compiled(qkv, cos, sin)
        eager = mod(qkv, cos, sin)
    assert rel_err(out, eager) <= 1e-6
