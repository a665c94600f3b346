"""adaln_qk_gemm (ops/adaln_linear/qk_gemm.py): norm1's LN-modulate pre-pass, q and k through the GEMM whose
epilogue is the attention's pre-pass (QK-LayerNorm, RoPE on video tokens, head-major store, per-head max row
norm), v by addmm. In the Triton interpreter against a float64 reference of the whole chain, outputs
NaN-poisoned (conftest), separate to_q/to_k/to_v and one to_qkv, head_dim 64 and 128, text_len 0 / > 0 / = S,
no RoPE, every tensor argument non-contiguous; today's path (adaln_linear's parts, then the shipped
pre-pass) on the same inputs is the bar the fused q/k must not be worse than, and v must equal it bit for bit."""
import pytest
import torch

from cogvideox_kernels import ops
from cogvideox_kernels.ops.adaln_linear import qk_gemm
from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd
from helpers import rel_err, strided_view


def make_inputs(B=2, S=45, text_len=7, H=3, D=64, hidden=96, fused=False, rope=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).bfloat16()  # noqa: E731
    inner = H * D
    # a per-row offset in the weights gives each head a non-zero mean: the QK-LayerNorm's centring matters
    w = [(torch.randn(inner, hidden, generator=g) * hidden ** -0.5
          + 0.05 * torch.randn(inner, 1, generator=g)).bfloat16() for _ in range(3)]
    b = [rnd(inner, std=0.5) for _ in range(3)]
    angles = 6.0 * torch.rand(S - text_len, D // 2, generator=g)
    return dict(
        x=rnd(B, S, hidden), modulation=rnd(B, 6, hidden, std=0.5),
        weights=[torch.cat(w)] if fused else w, biases=[torch.cat(b)] if fused else b, text_len=text_len,
        norm_weight=1 + 0.3 * rnd(hidden), norm_bias=0.2 * rnd(hidden), eps=1e-5, num_heads=H,
        qk_norm_weight=1 + 0.1 * rnd(2, D), qk_norm_bias=0.1 * rnd(2, D), qk_eps=1e-6,
        cos=angles.cos().repeat_interleave(2, -1) if rope else None,
        sin=angles.sin().repeat_interleave(2, -1) if rope else None)


def todays_path(inp):
    """The fused attention half's front today: adaln_linear over the three weights (one pre-pass, addmm each),
    then the Hopper path's pre-pass on q and k. (qk [2, B, H, S, D], v [B, S, inner])"""
    w = inp["weights"] if len(inp["weights"]) == 3 else list(inp["weights"][0].chunk(3))
    b = inp["biases"] if len(inp["biases"]) == 3 else list(inp["biases"][0].chunk(3))
    qkv = ops.adaln_linear(inp["x"], inp["modulation"], w, b, text_len=inp["text_len"],
                           norm_weight=inp["norm_weight"], norm_bias=inp["norm_bias"], eps=inp["eps"],
                           backend="triton")
    B, S, _ = inp["x"].shape
    H = inp["num_heads"]
    qk = [qk_norm_rope_fwd(qkv[p].view(B, S, H, -1), inp["text_len"], inp["cos"], inp["sin"],
                           inp["qk_norm_weight"][p], inp["qk_norm_bias"][p], True, inp["qk_eps"], head_rows=True,
                           block_r=32).transpose(1, 2) for p in range(2)]
    return torch.stack(qk), qkv[2]


def run(inp):
    return qk_gemm.adaln_qk_gemm(inp["x"], inp["modulation"], inp["weights"], inp["biases"],
                                 **{k: v for k, v in inp.items() if k not in ("x", "modulation", "weights", "biases")})


CASES = [  # what each covers
    dict(),                                      # tiles over both samples, the text/video and q/k boundaries
    dict(fused=True),                            # one to_qkv weight: q and k one launch over its first rows
    dict(B=1, S=37, text_len=0, seed=1),         # text_len 0
    dict(B=3, S=13, text_len=5, H=5, seed=2),    # S < BLOCK_M: a tile over three samples; H 5
    dict(S=20, text_len=20, seed=3),             # text_len = S: no video token
    dict(rope=False, seed=4),                    # no RoPE tables
    dict(H=2, D=128, S=33, text_len=4, seed=5),  # head_dim 128 (one head per tile)
]


@pytest.mark.parametrize("case", CASES)
def test_against_float64(interpret, case):
    inp = make_inputs(**case)
    B, S, _ = inp["x"].shape
    H, D = inp["num_heads"], inp["qk_norm_weight"].shape[1]
    qk, norm_max, v = run(inp)
    assert qk.shape == (2, B, H, S, D) and qk.dtype == torch.bfloat16 and qk.is_contiguous()
    assert norm_max.shape == (2, B * H) and norm_max.dtype == torch.float32 and v.shape == (B, S, H * D)
    ref_qk, ref_v = qk_gemm.adaln_qk_gemm_reference(
        inp["x"], inp["modulation"], inp["weights"], inp["biases"],
        **{k: val for k, val in inp.items() if k not in ("x", "modulation", "weights", "biases")})
    today_qk, today_v = todays_path(inp)
    err, err_today = rel_err(qk, ref_qk), rel_err(today_qk, ref_qk)
    assert err < 1e-2 and err <= 1.02 * err_today, (err, err_today)  # one bf16 rounding fewer than today
    if len(inp["weights"]) == 3:
        assert torch.equal(v, today_v)  # the same pre-pass and addmm as adaln_linear
    else:
        assert rel_err(v, ref_v) <= 1.05 * rel_err(today_v, ref_v)
    assert rel_err(v, ref_v) < 1e-2
    # norm maxima of the stored rows, every (k or q, sample, head) written
    expect = qk_gemm.norm_max_of(qk)
    assert (expect > 0).all()
    torch.testing.assert_close(norm_max.double(), expect, rtol=4e-6, atol=0)


def test_reference_is_what_the_model_computes():
    """The float64 reference equals diffusers' order of operations written out: adaLN, Linear, per-head
    LayerNorm, RoPE on video tokens (so the kernel's comparison is against the right function)."""
    import torch.nn.functional as F

    from cogvideox_kernels.ops.attention.reference import apply_rope_interleaved

    inp = make_inputs(S=12, text_len=3, seed=7)
    d = lambda t: t.double()  # noqa: E731
    x, m = d(inp["x"]), d(inp["modulation"])
    h = F.layer_norm(x, (x.shape[-1],), d(inp["norm_weight"]), d(inp["norm_bias"]), inp["eps"])
    t = inp["text_len"]
    h = torch.cat([h[:, :t] * (1 + m[:, 4, None]) + m[:, 3, None], h[:, t:] * (1 + m[:, 1, None]) + m[:, 0, None]], 1)
    B, S, _ = x.shape
    H, D = inp["num_heads"], inp["qk_norm_weight"].shape[1]
    outs = []
    for p in range(2):
        y = F.linear(h, d(inp["weights"][p]), d(inp["biases"][p])).view(B, S, H, D)
        y = F.layer_norm(y, (D,), d(inp["qk_norm_weight"][p]), d(inp["qk_norm_bias"][p]), inp["qk_eps"])
        y = torch.cat([y[:, :t], apply_rope_interleaved(y[:, t:], inp["cos"].double(), inp["sin"].double())], 1)
        outs.append(y.transpose(1, 2))
    ref_qk, ref_v = qk_gemm.adaln_qk_gemm_reference(
        inp["x"], inp["modulation"], inp["weights"], inp["biases"],
        **{k: val for k, val in inp.items() if k not in ("x", "modulation", "weights", "biases")})
    assert rel_err(ref_qk, torch.stack(outs)) < 1e-12
    assert rel_err(ref_v, F.linear(h, d(inp["weights"][2]), d(inp["biases"][2]))) < 1e-12


ARGS = ["x", "modulation", "weights.0", "weights.1", "weights.2", "biases.0", "biases.2", "norm_weight",
        "norm_bias", "qk_norm_weight", "qk_norm_bias", "cos", "sin"]


@pytest.mark.parametrize("name", ARGS)
def test_non_contiguous_arguments(interpret, name):
    inp = make_inputs(B=2, S=21, text_len=5, seed=8)
    base = run(inp)
    key, _, index = name.partition(".")
    t = inp[key][int(index)] if index else inp[key]
    view = strided_view(t, "step")
    assert not view.is_contiguous() and torch.equal(view, t)
    changed = dict(inp)
    if index:
        changed[key] = [view if i == int(index) else u for i, u in enumerate(inp[key])]
    else:
        changed[key] = view
    for out, expect in zip(run(changed), base):
        assert torch.equal(out, expect)


def test_bad_arguments():
    inp = make_inputs(B=1, S=8, text_len=2, seed=9)
    bad = [
        (dict(x=inp["x"].float(), modulation=inp["modulation"].float(),
              weights=[w.float() for w in inp["weights"]], biases=[b.float() for b in inp["biases"]]), "x has dtype"),
        (dict(weights=inp["weights"][:2], biases=inp["biases"][:2]), "weights must be"),
        (dict(weights=[inp["weights"][0][:-1]] * 3, biases=[None] * 3), "num_heads"),
        (dict(num_heads=5), "num_heads"),
        (dict(num_heads=4, qk_norm_weight=None, qk_norm_bias=None, cos=None, sin=None), "head_dim=48"),
        (dict(sin=None), "cos and sin"),
        (dict(qk_norm_weight=inp["qk_norm_weight"][:1]), "qk_norm_weight"),
        (dict(cos=inp["cos"][1:]), "cos must be"),
        (dict(sin=inp["sin"].double()), "sin must be"),
        (dict(modulation=inp["modulation"][:, :5]), "modulation"),
        (dict(text_len=9), "text_len"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            run({**inp, **change})


@pytest.mark.parametrize("fused", [False, True])
def test_custom_op_fake_matches(interpret, fused):
    """The fake implementation (what torch.compile traces with) gives the real outputs' shapes, dtypes, strides."""
    inp = make_inputs(B=2, S=21, text_len=5, fused=fused, seed=10)
    args = (inp["x"], inp["modulation"], inp["weights"], inp["biases"], inp["text_len"], inp["norm_weight"],
            inp["norm_bias"], inp["eps"], inp["num_heads"], inp["qk_norm_weight"], inp["qk_norm_bias"], inp["qk_eps"],
            inp["cos"], inp["sin"])
    torch.library.opcheck(qk_gemm.adaln_qk_gemm_op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_front_and_attention_against_float64(D):
    """On the H200 (compiled GEMM, bf16 wgmma): the front at a 5B-like shape (48 x 64 or 24 x 128 heads, hidden
    3072, 226 text + 2 x 30 x 45 video tokens, B 2) against float64, no worse than today's path; then the Hopper
    kernel on its output against float32 attention on the float64 q/k/v, within 1.25x today's
    ``rope3d_attention(backend="hopper")`` on the same inputs (and the 1e-2 floor)."""
    from cogvideox_kernels.ops.attention.hopper import hopper_available

    ok, why = hopper_available("cuda")
    if not ok:
        pytest.skip(why)
    H = 3072 // D
    inp = make_inputs(B=2, S=226 + 2 * 30 * 45, text_len=226, H=H, D=D, hidden=3072, seed=20)
    inp = {k: (v.cuda() if torch.is_tensor(v) else [t.cuda() for t in v] if isinstance(v, list) else v)
           for k, v in inp.items()}
    qk, norm_max, v = run(inp)
    rest = {k: val for k, val in inp.items() if k not in ("x", "modulation", "weights", "biases")}
    ref_qk, ref_v = qk_gemm.adaln_qk_gemm_reference(inp["x"], inp["modulation"], inp["weights"], inp["biases"],
                                                    **rest)
    today_qk, today_v = todays_path(inp)
    err, err_today = rel_err(qk, ref_qk), rel_err(today_qk, ref_qk)
    assert err <= 1.02 * err_today and err < 1e-2, (err, err_today)
    assert rel_err(v, ref_v) <= 1.01 * rel_err(today_v, ref_v)  # the same pre-pass and cuBLAS GEMM as today
    torch.testing.assert_close(norm_max.double(), qk_gemm.norm_max_of(qk), rtol=1e-5, atol=0)
    # the attention on the GEMM's output vs float32 attention of the float64 inputs
    B, S = inp["x"].shape[:2]
    q32, k32 = ref_qk[0].float(), ref_qk[1].float()
    v32 = ref_v.view(B, S, H, D).transpose(1, 2).float()
    ref_out = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32).transpose(1, 2)
    out = qk_gemm.hopper_attention_headmajor(qk, norm_max, v)
    qkv = ops.adaln_linear(inp["x"], inp["modulation"], inp["weights"], inp["biases"], text_len=inp["text_len"],
                           norm_weight=inp["norm_weight"], norm_bias=inp["norm_bias"], eps=inp["eps"], backend="triton")
    today = ops.rope3d_attention(*(t.view(B, S, H, D) for t in qkv.unbind(0)), text_len=inp["text_len"],
                                 cos=inp["cos"], sin=inp["sin"], q_norm=tuple(t[0] for t in (inp["qk_norm_weight"],
                                                                                             inp["qk_norm_bias"])),
                                 k_norm=tuple(t[1] for t in (inp["qk_norm_weight"], inp["qk_norm_bias"])),
                                 eps=inp["qk_eps"], backend="hopper")
    att_err, att_today = rel_err(out, ref_out), rel_err(today, ref_out)
    assert att_err <= max(1e-2, 1.25 * att_today), (att_err, att_today)
