"""CPU checks (Triton interpreter) of the experiment benchmarks/experiments/qk_gemm_epilogue.py: the q/k GEMM
whose epilogue does the attention pre-pass's QK-LayerNorm + RoPE + per-head max row norm.

Against a float64 reference on fresh random inputs (outputs NaN-poisoned by conftest): tiles straddling
two and three samples, the text/video boundary and the q/k boundary of a stacked weight; S not a multiple
of the tile; text_len 0, > 0 and = S; H not a power of two; every tensor argument non-contiguous once; the
norm maxima against a float64 computation from the output. The fused error must be no worse than the
unfused path's (bf16 GEMM output, then the shipped pre-pass ``qk_norm_rope_fwd``).
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "experiments"))

import qk_gemm_epilogue as qk  # noqa: E402
from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd  # noqa: E402

D = 64


def make_case(B, S, text_len, H, P, K=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = P * H * D
    # a per-row offset in w gives each head a non-zero mean, so the LayerNorm's centring matters
    w = torch.randn(N, K, generator=g) * K ** -0.5 + 0.05 * torch.randn(N, 1, generator=g)
    angles = 6.0 * torch.rand(S - text_len, D // 2, generator=g)
    return dict(
        h=torch.randn(B * S, K, generator=g).bfloat16(), weight=w.bfloat16(),
        bias=(0.5 * torch.randn(N, generator=g)).bfloat16(),
        norm_weight=(1 + 0.1 * torch.randn(P, D, generator=g)).bfloat16(),
        norm_bias=(0.1 * torch.randn(P, D, generator=g)).bfloat16(),
        cos=angles.cos().repeat_interleave(2, -1), sin=angles.sin().repeat_interleave(2, -1))


def unfused(case, S, text_len, H):
    """Today's path: bf16 GEMM output (addmm), then the shipped pre-pass per projection. [P, B, H, S, D]"""
    t = torch.addmm(case["bias"], case["h"], case["weight"].T)
    P = case["norm_weight"].shape[0]
    B = t.shape[0] // S
    outs = []
    for p in range(P):
        x = t[:, p * H * D:(p + 1) * H * D].reshape(B, S, H, D)
        y = qk_norm_rope_fwd(x, text_len, case["cos"], case["sin"], case["norm_weight"][p], case["norm_bias"][p],
                             True, 1e-6, head_rows=True, block_r=32)
        outs.append(y.transpose(1, 2))
    return torch.stack(outs)


CASES = [
    # B, S, text_len, H, P, config: what it covers
    (2, 45, 7, 3, 2, dict(BLOCK_M=32, BLOCK_N=128)),  # tiles over both samples, text/video and q/k boundaries
    (1, 37, 0, 3, 1, dict(BLOCK_M=32, BLOCK_N=64)),   # text_len 0, one head per tile
    (3, 13, 5, 5, 1, dict(BLOCK_M=32, BLOCK_N=128)),  # S < BLOCK_M: a tile over three samples; half-empty n-tile
    (2, 20, 20, 2, 2, dict(BLOCK_M=32, BLOCK_N=128, num_programs=1)),  # text_len = S (no RoPE rows)
]


@pytest.mark.parametrize("B,S,text_len,H,P,config", CASES)
def test_fused_matches_float64(interpret, B, S, text_len, H, P, config):
    case = make_case(B, S, text_len, H, P, seed=B * S + H)
    norm_max = torch.zeros((P, B * H), dtype=torch.float32)
    y = qk.qk_gemm_fwd(**case, seq_len=S, num_heads=H, text_len=text_len, norm_max=norm_max, config=config)
    assert y.shape == (P, B, H, S, D) and y.dtype == torch.bfloat16 and y.is_contiguous()
    assert not y.isnan().any()
    ref = qk.qk_gemm_reference(**case, seq_len=S, num_heads=H, text_len=text_len)
    err = qk.rel_err(y, ref)
    err_unfused = qk.rel_err(unfused(case, S, text_len, H), ref)
    assert err < 4e-3, err
    assert err <= err_unfused, (err, err_unfused)  # one bf16 rounding fewer
    # norm maxima of the stored rows: exact up to float32 summation of 64 exact squares
    expect = qk.norm_max_of(y)
    assert (expect > 0).all()
    torch.testing.assert_close(norm_max.double(), expect, rtol=4e-6, atol=0)


def _strided(t):
    """The same values as a non-contiguous view (every other element of the last dim of a wider tensor)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("name", ["h", "weight", "bias", "norm_weight", "norm_bias", "cos", "sin"])
def test_non_contiguous_arguments(interpret, name):
    B, S, text_len, H, P = 2, 45, 7, 3, 2
    case = make_case(B, S, text_len, H, P, seed=1)
    kw = dict(seq_len=S, num_heads=H, text_len=text_len)
    ref_max = torch.zeros((P, B * H))
    ref = qk.qk_gemm_fwd(**case, **kw, norm_max=ref_max)
    view = case[name].T.contiguous().T if name == "weight" else _strided(case[name])
    assert not view.is_contiguous()
    norm_max = torch.zeros((P, B * H))
    y = qk.qk_gemm_fwd(**{**case, name: view}, **kw, norm_max=norm_max)
    assert torch.equal(y, ref) and torch.equal(norm_max, ref_max)


def test_plain_bias_epilogue(interpret):
    B, S, H = 2, 45, 5  # N = 320: the last n-tile half empty
    case = make_case(B, S, 7, H, 1, seed=2)
    y = qk.qk_gemm_fwd(case["h"], case["weight"], case["bias"], seq_len=S, num_heads=H,
                       epilogue=qk.EPILOGUE_BIAS)
    assert y.shape == (B * S, H * D) and not y.isnan().any()
    ref = case["h"].double() @ case["weight"].double().T + case["bias"].double()
    torch_err = qk.rel_err(torch.addmm(case["bias"], case["h"], case["weight"].T), ref)
    assert qk.rel_err(y, ref) <= 1.05 * torch_err + 1e-6


def test_bad_arguments():
    B, S, text_len, H, P = 1, 8, 2, 2, 2
    case = make_case(B, S, text_len, H, P, K=32)
    kw = dict(seq_len=S, num_heads=H, text_len=text_len)
    bad = [
        (dict(h=case["h"].float()), "h has dtype"),
        (dict(weight=case["weight"][:, :16]), "weight has shape"),
        (dict(bias=case["bias"][:5]), "bias has shape"),
        (dict(norm_weight=case["norm_weight"][:1]), "norm_weight has shape"),
        (dict(cos=case["cos"][1:]), "cos has shape"),
        (dict(sin=None), "cos and sin"),
        (dict(seq_len=5), "seq_len"),
        (dict(text_len=S + 1), "text_len"),
        (dict(num_heads=3), "num_heads"),
        (dict(head_dim=48), "head_dim"),
        (dict(config=dict(BLOCK_N=96)), "BLOCK_N"),
        (dict(norm_max=torch.zeros(P, B * H + 1)), "norm_max"),
        (dict(epilogue=7), "epilogue"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            qk.qk_gemm_fwd(**{**case, **kw, **change})
