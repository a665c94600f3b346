"""CPU check of the FMA-pipe exp2 of benchmarks/experiments/hopper_attention_next.py
(``_exp2_poly``, the POLY variants of the Hopper attention's fixed-max loop): its exact instruction
sequence emulated in float32 (FMNMX, 3 FADD, 3 FFMA, one integer add of round(x) << 23), against
2^x in float64.

The FFMAs are emulated as a float64 multiply-add rounded once to float32: the float32 x float32
product is exact in float64, so only the add may round twice (at most 1 float32 ulp, rare).
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "experiments"))

from hopper_attention_next import POLY_COEFFS, POLY_MAGIC  # noqa: E402

F32 = torch.float32


def _ffma(a, b, c):
    return (a.double() * b + c).to(F32)


def exp2_poly_emulated(x: torch.Tensor, clamp: bool) -> torch.Tensor:
    """The kernel's sequence on float32 x, step by step."""
    c1, c2, c3 = (torch.tensor(c, dtype=F32).double() for c in POLY_COEFFS)
    magic = torch.tensor(POLY_MAGIC, dtype=F32)
    x = x.to(F32)
    if clamp:
        x = torch.maximum(x, torch.tensor(-127.0, dtype=F32))
    shifted = x + magic  # FADD, round to nearest even: magic + round(x)
    f = x - (shifted - magic)  # 2 FADD, both exact
    p = _ffma(f, c3, c2)
    p = _ffma(p, f, c1)
    p = _ffma(p, f, 1.0)
    # IMAD / LEA: p's bits + (shifted's bits << 23), modulo 2^32
    bits = (p.view(torch.int32).long() + (shifted.view(torch.int32).long() << 23)) & 0xFFFFFFFF
    bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits)
    return bits.to(torch.int32).view(F32)


def _rel_err(x):
    out = exp2_poly_emulated(x, clamp=False).double()
    ref = torch.exp2(x.double())
    return ((out - ref).abs() / ref)


def test_max_relative_error_over_the_score_range():
    g = torch.Generator().manual_seed(0)
    # a dense grid over [-64, 64] (every round(x) and the rounding ties at j + 0.5) plus fresh
    # random float32 scores
    x = torch.cat([torch.linspace(-64.0, 64.0, 2_000_001, dtype=torch.float64).to(F32),
                   (torch.rand(1_000_000, generator=g, dtype=torch.float64) * 128 - 64).to(F32),
                   torch.arange(-64, 64, dtype=F32) + 0.5])
    err = _rel_err(x)
    worst = err.max().item()
    # the float64 minimax fit gives 1.013e-4; float32 evaluation adds a few 1e-7. bf16's rounding of
    # P is 2^-9 = 2.0e-3, 19x more.
    assert 9.0e-5 < worst < 1.03e-4, worst
    assert torch.isfinite(err).all()
    # the same bound with the clamp (the masked blocks' sequence)
    out = exp2_poly_emulated(x, clamp=True).double()
    assert ((out - torch.exp2(x.double())).abs() / torch.exp2(x.double())).max().item() < 1.03e-4


def test_exact_at_integers_and_continuous_at_the_ties():
    j = torch.arange(-64, 65, dtype=F32)
    # p(0) = 1 exactly, so 2^j is exact
    assert torch.equal(exp2_poly_emulated(j, clamp=False), torch.exp2(j))
    # both sides of each rounding tie j + 0.5 (j = round(x) switches there): no jump beyond the
    # polynomial's error
    t = torch.arange(-64, 64, dtype=F32) + 0.5
    lo = exp2_poly_emulated(torch.nextafter(t, t - 1), clamp=False).double()
    hi = exp2_poly_emulated(torch.nextafter(t, t + 1), clamp=False).double()
    assert ((hi - lo).abs() / lo).max().item() < 2e-5  # seen 5.3e-6


def test_masked_scores_give_exact_zero_only_with_the_clamp():
    x = torch.tensor([float("-inf")] * 4 + [-127.0, -200.0], dtype=F32)
    out = exp2_poly_emulated(x, clamp=True)
    assert torch.equal(out.view(torch.int32), torch.zeros(6, dtype=torch.int32))  # +0.0 bits
    # without it -inf gives NaN (-inf - -inf): the unmasked blocks may skip the clamp only because
    # their scores are bounded (|s| <= 64)
    assert torch.isnan(exp2_poly_emulated(x[:1], clamp=False)).all()


def test_row_sums_of_a_mixed_tile_match_float64():
    """3/8 of a [64, 128] score tile by the polynomial (as POLY 3 splits it: columns 0-47), the rest
    exact: the softmax row sums and the bf16-rounded P stay within the polynomial's error."""
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(64, 128, generator=g, dtype=torch.float64) * 12).clamp(-64, 64).to(F32)
    p = torch.exp2(s)
    p[:, :48] = exp2_poly_emulated(s[:, :48], clamp=False)
    ref = torch.exp2(s.double())
    rel = ((p.double().sum(1) - ref.sum(1)).abs() / ref.sum(1)).max().item()
    assert rel < 1.03e-4, rel
    pb = p.to(torch.bfloat16).double()
    rb = ref.to(torch.bfloat16).double()
    # where the bf16 roundings differ, by one bf16 ulp (2^-7 relative at most); seen on 0.3%
    assert ((pb - rb).abs() / rb).max().item() <= 2.0 ** -7
    assert (pb != rb).double().mean().item() < 0.02
