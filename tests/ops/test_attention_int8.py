"""``rope3d_attention(..., precision="int8")``: the quantizing pre-pass, its float32 emulation (the
reference of the 8-bit path) and the 8-bit Hopper kernel.

CPU (TRITON_INTERPRET=1): the Triton pre-pass against the torch quantization (same INT8 values and
scales; FP8 V^T within one e4m3 step, zero padding), on odd shapes and non-contiguous inputs; the
emulation against float64 (error bounded, and K's channel offsets cancelled by the smoothing);
dispatch and argument checks; the Gluon kernel compiles for sm_90a offline without local memory.
GPU (sm_90): the kernel against the emulation and float64 on odd shapes, every config the
benchmark measures, non-contiguous inputs, outputs NaN-poisoned (conftest).
"""
import pytest
import torch

from cogvideox_kernels import ops
from cogvideox_kernels.ops.attention.hopper import hopper_available
from cogvideox_kernels.ops.attention.int8_prepass import (FP8_MAX, K_LO_BITS, K_SPLIT_ENV, LOG2E,
                                                          ROTATE_ENV, Int8Inputs,
                                                          dequantized_k, dequantized_norm_max,
                                                          int8_attention_reference,
                                                          quantize_int8_inputs,
                                                          quantize_int8_reference,
                                                          rotation_matrix, score_bound)
from cogvideox_kernels.ops.attention.reference import (qk_norm_rope_reference,
                                                       rope3d_attention_reference)

from test_attention_hopper import case_args, make_case, rel_err


def cosine(out, ref):
    return torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(),
                                                 dim=0).item()


def _prepass(case, block_n, rotate=False, k_split=False):
    qn = case["q_norm"] or (None, None)
    kn = case["k_norm"] or (None, None)
    return quantize_int8_inputs(case["q"], case["k"], case["v"], case["text_len"], case["cos"],
                                case["sin"], qn[0], qn[1], kn[0], kn[1], case["q_norm"] is not None,
                                case["k_norm"] is not None, 1e-6, block_n=block_n, rotate=rotate,
                                k_split=k_split)


def _check_norm_max(t: Int8Inputs):
    """The pre-pass's per-head max squared norms of the dequantized q and smoothed k rows equal a
    float64 computation from its own 8-bit values and scales (float32 rounding only)."""
    assert t.norm_max.dtype == torch.float32 and t.norm_max.shape == (2, t.q8.shape[0] * t.q8.shape[1])
    # k_split="heads": the norms (and the bound) are k_hi's alone, by design
    want = dequantized_norm_max(t.q8, t.q_scale, t.k8, t.k_scale, t.block_n,
                                None if t.k_lo_heads else t.k8_lo)
    torch.testing.assert_close(t.norm_max.double(), want, rtol=1e-6, atol=0)


def _check_same_quantization(got: Int8Inputs, want: Int8Inputs, S):
    for name in ("q_scale", "k_scale", "v_scale"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=2e-6, atol=0)
    for name in ("q8", "k8"):  # values may differ by one step where x / scale sits on a tie
        diff = (getattr(got, name).int() - getattr(want, name).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, name
    assert (got.k8_lo is None) == (want.k8_lo is None)
    if got.k8_lo is not None:  # k in steps of 2^-7: k8 * 2^7 + k8_lo = round(k / scale * 2^7)
        assert got.k8_lo.dtype == torch.int8 and got.k8_lo.shape == got.k8.shape
        assert got.k8_lo.abs().max() <= 2 ** (K_LO_BITS - 1)
        fine = [t.k8.int() * 2 ** K_LO_BITS + t.k8_lo.int() for t in (got, want)]
        diff = (fine[0] - fine[1]).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 2e-2, diff.float().mean()
    v_got, v_want = got.v8t.float(), want.v8t.float()
    assert torch.isfinite(v_got).all() and (v_got[..., S:] == 0).all()  # padding written, zero
    # one e4m3 step: 2^-3 relative for normals, 2^-9 absolute below 2^-6
    step = torch.maximum(v_want.abs() * 2 ** -3, torch.full_like(v_want, 2 ** -9))
    assert ((v_got - v_want).abs() <= step * 1.001).all()
    assert v_got.abs().max() <= FP8_MAX


# ---------------------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("B,S,H,D,text_len,block_n,norms", [
    (1, 70, 3, 64, 5, 32, True),
    (2, 33, 2, 64, 0, 64, True),      # text_len 0, S not a multiple of the block
    (1, 40, 2, 128, 40, 32, False),   # text_len = S (no rotation), no norms
    (1, 1, 1, 64, 0, 32, True),       # S = 1
])
def test_prepass_matches_torch_quantization(interpret, B, S, H, D, text_len, block_n, norms):
    case = make_case(B, S, H, D, text_len, torch.bfloat16, q_norm=norms, k_norm=norms,
                     seed=S + D)
    got = _prepass(case, block_n)
    want = quantize_int8_reference(case["q"], case["k"], case["v"], block_n=block_n,
                                   **case_args(case))
    _check_same_quantization(got, want, S)
    _check_norm_max(got)
    torch.testing.assert_close(got.norm_max, want.norm_max, rtol=1e-2, atol=0)  # ties may differ
    # smoothing: K's mean over tokens is (close to) zero after the pre-pass
    k = got.k8.float() * got.k_scale.repeat_interleave(block_n, -1)[..., :S, None]
    assert k.mean(2).abs().max() <= k.abs().amax((2, 3)).max() / 127


@pytest.mark.parametrize("B,S,H,D,text_len,block_n", [
    (1, 70, 3, 64, 5, 32),
    (2, 41, 2, 128, 0, 64),  # D 128, S not a multiple of the block, text_len 0
])
def test_prepass_rotated_matches_torch_quantization(interpret, B, S, H, D, text_len, block_n):
    """ROTATE: the Triton pre-pass quantizes q R and (k - mean) R as the torch emulation does, and
    it did rotate: un-rotating the dequantized values gives back the normed, rotated-by-RoPE q
    and smoothed k within the INT8 step, while the unrotated quantization differs."""
    case = make_case(B, S, H, D, text_len, torch.bfloat16, seed=S + D + 1)
    got = _prepass(case, block_n, rotate=True)
    want = quantize_int8_reference(case["q"], case["k"], case["v"], block_n=block_n, rotate=True,
                                   **case_args(case))
    assert got.rotated and want.rotated
    _check_same_quantization(got, want, S)
    _check_norm_max(got)
    plain = quantize_int8_reference(case["q"], case["k"], case["v"], block_n=block_n,
                                    **case_args(case))
    R = rotation_matrix(D).double()
    q_deq = got.q8.double() * got.q_scale.double()[..., None]
    q_plain = plain.q8.double() * plain.q_scale.double()[..., None]
    step = (q_deq.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    assert ((q_deq @ R.T - q_plain).abs() <= 1.5 * step + plain.q_scale.double()[..., None]).all()
    assert (got.q8 != plain.q8).float().mean() > 0.5  # a different basis, not the identity
    k_deq = got.k8.double() * got.k_scale.double().repeat_interleave(block_n, -1)[..., :S, None]
    k_plain = plain.k8.double() * plain.k_scale.double().repeat_interleave(block_n, -1)[..., :S, None]
    assert (k_deq @ R.T - k_plain).abs().max() <= 1.5 * (got.k_scale.max() + plain.k_scale.max())


@pytest.mark.parametrize("B,S,H,D,text_len,block_n,rotate", [
    (1, 70, 3, 64, 5, 32, False),
    (2, 41, 2, 128, 0, 64, True),   # D 128, S not a multiple of the block, text_len 0, rotated
    (1, 1, 1, 64, 0, 32, True),     # S = 1
])
def test_prepass_k_split_matches_torch(interpret, B, S, H, D, text_len, block_n, rotate):
    """k_split: the pre-pass writes k's second INT8 part beside k8 (k8 itself unchanged), equal to
    the torch emulation's, and k_scale * (k8 + k8_lo / 2^7) is the smoothed (rotated) k within
    2^-8 of a step (k8 alone: within half a step, and much further on average); the norms it
    writes for the score bound are those of the two-part k."""
    case = make_case(B, S, H, D, text_len, torch.bfloat16, seed=S + D + 2)
    got = _prepass(case, block_n, rotate=rotate, k_split=True)
    want = quantize_int8_reference(case["q"], case["k"], case["v"], block_n=block_n,
                                   rotate=rotate, k_split=True, **case_args(case))
    _check_same_quantization(got, want, S)
    _check_norm_max(got)
    one = _prepass(case, block_n, rotate=rotate)
    assert one.k8_lo is None and torch.equal(one.k8, got.k8) and torch.equal(one.k_scale, got.k_scale)
    # the float64 smoothed k the parts approximate (torch's normed, rotated-by-RoPE k - its mean)
    kw = qk_norm_rope_reference(case["k"], case["text_len"], case["cos"], case["sin"],
                                case["k_norm"], 1e-6, torch.float32).transpose(1, 2).double()
    kw = kw - kw.mean(2, keepdim=True)
    if rotate:
        kw = kw @ rotation_matrix(D).double()
    step = got.k_scale.double().repeat_interleave(block_n, -1)[..., :S, None]
    err2 = (dequantized_k(got, torch.float64) - kw).abs() / step
    err1 = (dequantized_k(one, torch.float64) - kw).abs() / step
    assert err2.max() <= 2.0 ** -(K_LO_BITS + 1) + 1e-4, err2.max()
    assert err1.max() <= 0.5 + 1e-4 and (S == 1 or err1.mean() > 50 * err2.mean())
    # "heads": the same two parts, the norms (score bound) of k8 alone, as without the split
    heads = _prepass(case, block_n, rotate=rotate, k_split="heads")
    assert heads.k_lo_heads and not got.k_lo_heads
    assert torch.equal(heads.k8, got.k8) and torch.equal(heads.k8_lo, got.k8_lo)
    torch.testing.assert_close(heads.norm_max, one.norm_max, rtol=0, atol=0)
    want_heads = quantize_int8_reference(case["q"], case["k"], case["v"], block_n=block_n,
                                         rotate=rotate, k_split="heads", **case_args(case))
    torch.testing.assert_close(want_heads.norm_max, dequantized_norm_max(
        want_heads.q8, want_heads.q_scale, want_heads.k8, want_heads.k_scale, block_n).float(),
        rtol=0, atol=0)


def test_rotation_matrix_and_switch(monkeypatch):
    """R is orthogonal with entries +-1/sqrt(D) (so q R (k R)^T = q k^T), fixed, and refused for
    head dims it cannot rotate; COGVIDEOX_KERNELS_INT8_ROTATE picks the default of the kernel
    config and of the emulation (off when unset), and a bad value is a clear error."""
    from cogvideox_kernels.ops.attention.hopper_int8_fwd import default_config

    for D in (16, 64, 128):
        R = rotation_matrix(D).double()
        torch.testing.assert_close(R @ R.T, torch.eye(D, dtype=torch.float64), rtol=0, atol=1e-6)
        assert torch.allclose(R.abs(), torch.full_like(R, D ** -0.5))
        assert torch.equal(rotation_matrix(D), rotation_matrix(D))
    assert not torch.equal(rotation_matrix(64).abs().sum(0).sign(), rotation_matrix(64)[0].sign())
    for bad in (40, 8, 96):
        with pytest.raises(ValueError, match=f"head_dim={bad}"):
            rotation_matrix(bad)

    case = make_case(1, 40, 2, 64, 6, torch.float32, seed=13)
    monkeypatch.setenv(ROTATE_ENV, "0")
    assert default_config(64)["ROTATE"] is False
    off = ops.rope3d_attention(**case, precision="int8")
    torch.testing.assert_close(off, int8_attention_reference(**case, rotate=False), rtol=0, atol=0)
    monkeypatch.setenv(ROTATE_ENV, "1")
    assert default_config(64)["ROTATE"] is True
    on = ops.rope3d_attention(**case, precision="int8")
    torch.testing.assert_close(on, int8_attention_reference(**case, rotate=True), rtol=0, atol=0)
    assert not torch.equal(on, off)
    monkeypatch.delenv(ROTATE_ENV)  # unset: on (the default)
    assert default_config(64)["ROTATE"] is True
    torch.testing.assert_close(ops.rope3d_attention(**case, precision="int8"), on, rtol=0, atol=0)
    monkeypatch.setenv(ROTATE_ENV, "yes")
    with pytest.raises(ValueError, match=ROTATE_ENV):
        ops.rope3d_attention(**case, precision="int8")


@pytest.mark.parametrize("D", [8, 96])
def test_default_rotation_skips_head_dims_it_cannot_rotate(monkeypatch, D):
    """The rotation is on by default, but only where a rotation matrix exists (head dims that are
    powers of two >= 16): precision="int8" at head_dim 8 or 96 quantizes unrotated instead of
    raising; asking for the rotation there is a clear error."""
    from cogvideox_kernels.ops.attention.hopper_int8_fwd import default_config
    from cogvideox_kernels.ops.attention.int8_prepass import can_rotate, rotate_default

    monkeypatch.delenv(ROTATE_ENV, raising=False)
    assert not can_rotate(D) and can_rotate(64) and can_rotate(128)
    assert rotate_default(D) is False and rotate_default(64) is True and default_config(D)["ROTATE"] is False
    case = make_case(1, 21, 2, D, 4, torch.float32, seed=21)
    got = ops.rope3d_attention(**case, precision="int8", backend="reference")
    want = int8_attention_reference(**case, rotate=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert rel_err(got, rope3d_attention_reference(**case)) < 5e-2
    with pytest.raises(ValueError, match=f"head_dim={D}"):
        int8_attention_reference(**case, rotate=True)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_prepass_non_contiguous_inputs(interpret, name):
    case = make_case(2, 45, 3, 64, 7, torch.bfloat16, seed=4)
    base = _prepass(case, 32)
    wide = torch.zeros(2, 90, 3, 64, dtype=torch.bfloat16)
    wide[:, ::2] = case[name]
    got = _prepass(dict(case, **{name: wide[:, ::2]}), 32)
    for field in ("q8", "q_scale", "k8", "k_scale", "v_scale", "norm_max"):
        torch.testing.assert_close(getattr(got, field), getattr(base, field), rtol=0, atol=0)
    torch.testing.assert_close(got.v8t.float(), base.v8t.float(), rtol=0, atol=0)


def _hard_case(B, S, H, D, seed, k_offset=10.0):
    """What breaks naive 8-bit attention: K channels offset by ~10 standard deviations,
    heavy-tailed q (Student t, 3 dof), rare V outliers (x30); float32, no norms or rotation."""
    g = torch.Generator().manual_seed(seed)
    q = torch.distributions.StudentT(3.0).sample((B, S, H, D)).clamp(-50, 50)
    k = torch.randn(B, S, H, D, generator=g) + k_offset * torch.randn(1, 1, H, D, generator=g)
    v = torch.randn(B, S, H, D, generator=g)
    v = torch.where(torch.rand(B, S, H, D, generator=g) < 1e-3, v * 30, v)
    return dict(q=q, k=k, v=v, text_len=S, cos=None, sin=None, q_norm=None, k_norm=None)


def test_emulation_error_and_smoothing():
    """The float32 emulation stays within INT8-like error of float64 on random inputs (FP8 P V:
    SageAttention2-like), and K's channel offsets (softmax-invariant) do not raise it: the
    smoothing removes them."""
    torch.manual_seed(0)
    case = make_case(1, 600, 4, 64, 40, torch.float32, seed=1)
    ref = rope3d_attention_reference(**case, compute_dtype=torch.float64)
    out = int8_attention_reference(**case)
    assert rel_err(out, ref) < 2e-2 and cosine(out, ref) > 0.9998
    fp8 = int8_attention_reference(**case, pv_fp8=True)
    assert rel_err(fp8, ref) < 6e-2 and cosine(fp8, ref) > 0.998

    plain = _hard_case(1, 600, 4, 64, seed=2, k_offset=0.0)
    offset = _hard_case(1, 600, 4, 64, seed=2, k_offset=10.0)
    errs = []
    for c in (plain, offset):
        ref = rope3d_attention_reference(**c, compute_dtype=torch.float64)
        errs.append(rel_err(int8_attention_reference(**c), ref))
    assert errs[1] < 1.5 * errs[0], errs  # without smoothing the offsets multiply it (~10x)


def _hard_rope_case(S, H, seed, device="cpu"):
    """``_hard_case`` through RoPE (random angles per token: the rotated K offsets vary with the
    position, so the smoothing cannot take them out), bf16, text_len S // 10."""
    text_len = S // 10
    c = _hard_case(1, S, H, 64, seed=seed)
    r = make_case(1, S, H, 64, text_len, torch.float32, seed=seed)
    return dict(q=c["q"].to(device, torch.bfloat16), k=c["k"].to(device, torch.bfloat16),
                v=c["v"].to(device, torch.bfloat16), text_len=text_len, cos=r["cos"].to(device),
                sin=r["sin"].to(device), q_norm=None, k_norm=None)


def test_emulation_rotation_error_on_hard_inputs():
    """ROTATE in the emulation (the kernel's maths) against float64: on the hard inputs (offset K
    through RoPE, heavy-tailed q) it lowers the error of the unrotated INT8 path (6.2e-2 -> 5.1e-2
    at this seed; 5-6x the bf16 path's 9.5e-3 either way: K's 8 bits are the limit here,
    ``int8_attention_notes.md``), and on model-like inputs it does not hurt."""
    torch.manual_seed(2)
    case = _hard_rope_case(700, 4, seed=2)
    ref = rope3d_attention_reference(**case, compute_dtype=torch.float64)
    e_bf16 = rel_err(rope3d_attention_reference(**case, compute_dtype=torch.bfloat16), ref)
    plain, rot = (int8_attention_reference(**case, rotate=r) for r in (False, True))
    e_plain, e_rot = rel_err(plain, ref), rel_err(rot, ref)
    assert e_rot < 0.9 * e_plain, (e_rot, e_plain)
    assert e_rot < 6 * e_bf16 and cosine(rot, ref) > 0.998, (e_rot, e_bf16, cosine(rot, ref))

    model = make_case(1, 700, 4, 64, 60, torch.bfloat16, seed=4)
    ref = rope3d_attention_reference(**model, compute_dtype=torch.float64)
    e = [rel_err(int8_attention_reference(**model, rotate=r), ref) for r in (False, True)]
    assert e[1] <= 1.02 * e[0] and e[1] < 1.3e-2, e


def test_emulation_k_split_meets_the_bars_on_hard_inputs():
    """K_SPLIT + ROTATE in the emulation against float64 on the hard inputs: error <= 3x the bf16
    path's and cosine >= 0.9995 (issue 15's bars; 2.40x and 0.99972 at this seed), which ROTATE
    alone misses (4.6x, 0.9990) and K_SPLIT alone too (4.4x: q's INT8 share stays); on model-like
    inputs K_SPLIT lowers the error as well (1.17e-2 -> 7.0e-3 with ROTATE)."""
    torch.manual_seed(2)
    case = _hard_rope_case(700, 4, seed=2)
    ref = rope3d_attention_reference(**case, compute_dtype=torch.float64)
    e_bf16 = rel_err(rope3d_attention_reference(**case, compute_dtype=torch.bfloat16), ref)
    out = {(r, s): int8_attention_reference(**case, rotate=r, k_split=s)
           for r in (False, True) for s in (False, True)}
    err = {key: rel_err(o, ref) / e_bf16 for key, o in out.items()}
    cos = {key: cosine(o, ref) for key, o in out.items()}
    assert err[True, True] <= 3.0 and cos[True, True] >= 0.9995, (err, cos)
    assert err[True, False] > 3.0 and cos[True, False] < 0.9995, (err, cos)  # the bar can fail
    assert err[False, True] < 0.9 * err[False, False], err

    model = make_case(1, 700, 4, 64, 60, torch.bfloat16, seed=4)
    ref = rope3d_attention_reference(**model, compute_dtype=torch.float64)
    e = [rel_err(int8_attention_reference(**model, rotate=True, k_split=s), ref) for s in (False, True)]
    assert e[1] < 0.75 * e[0], e


def test_emulation_k_split_heads():
    """K_SPLIT="heads": the heads whose score bound holds (fixed max) multiply k8 alone, the others
    k8 + k8_lo / 2^7; on the tight inputs (both kinds of heads in one call) each head equals the
    one-part or the two-part emulation; on model-like inputs (every head bounded) it is the
    one-part path, on the hard inputs (none bounded) the two-part path."""
    case = _tight_case(1, 300, 64, TIGHT_TARGETS, seed=7)
    t = quantize_int8_reference(case["q"], case["k"], case["v"], **case_args(case))
    _, fixed, _ = score_bound(t.norm_max, 64 ** -0.5 * LOG2E)
    assert fixed.any() and (~fixed).any()
    out = {mode: int8_attention_reference(**case, rotate=False, k_split=mode)
           for mode in (False, True, "heads")}
    for h, f in enumerate(fixed.tolist()):
        torch.testing.assert_close(out["heads"][:, :, h], out[False if f else True][:, :, h],
                                   rtol=0, atol=1e-6)
    assert not torch.equal(out[True], out[False])
    model = make_case(1, 300, 3, 64, 30, torch.bfloat16, seed=8)
    hard = _hard_rope_case(300, 2, seed=9)
    for c, same in ((model, False), (hard, True)):
        a = int8_attention_reference(**c, rotate=True, k_split="heads")
        torch.testing.assert_close(a, int8_attention_reference(**c, rotate=True, k_split=same),
                                   rtol=0, atol=0)


def test_k_split_switch_and_checks(monkeypatch):
    """COGVIDEOX_KERNELS_INT8_K_SPLIT picks K_SPLIT's default in the kernel config and the
    emulation ("heads" when unset; a bad value is a clear error); the kernel's launcher refuses a
    K_SPLIT call without k's second part and a second part without K_SPLIT."""
    from cogvideox_kernels.ops.attention.hopper_int8_fwd import (default_config,
                                                                 hopper_int8_attention_core)

    case = make_case(1, 40, 2, 64, 6, torch.float32, seed=13)
    monkeypatch.delenv(K_SPLIT_ENV, raising=False)
    monkeypatch.delenv(ROTATE_ENV, raising=False)
    assert default_config(64)["K_SPLIT"] == "heads"  # unset: the default
    monkeypatch.setenv(K_SPLIT_ENV, "0")
    assert default_config(64)["K_SPLIT"] is False
    off = ops.rope3d_attention(**case, precision="int8")
    torch.testing.assert_close(off, int8_attention_reference(**case, k_split=False), rtol=0, atol=0)
    monkeypatch.setenv(K_SPLIT_ENV, "1")
    assert default_config(64)["K_SPLIT"] is True and default_config(128)["K_SPLIT"] is True
    on = ops.rope3d_attention(**case, precision="int8")
    torch.testing.assert_close(on, int8_attention_reference(**case, k_split=True), rtol=0, atol=0)
    assert not torch.equal(on, off)
    monkeypatch.setenv(K_SPLIT_ENV, "heads")
    assert default_config(64)["K_SPLIT"] == "heads"
    torch.testing.assert_close(ops.rope3d_attention(**case, precision="int8"),
                               int8_attention_reference(**case, k_split="heads"), rtol=0, atol=0)
    monkeypatch.setenv(K_SPLIT_ENV, "2")
    with pytest.raises(ValueError, match=K_SPLIT_ENV):
        ops.rope3d_attention(**case, precision="int8")
    monkeypatch.delenv(K_SPLIT_ENV)
    from cogvideox_kernels.ops.attention.hopper_int8_fwd import resolve_config
    assert resolve_config(64, dict(K_SPLIT=1))["K_SPLIT"] is True
    for bad in ("yes", 2, None):
        with pytest.raises(ValueError, match="K_SPLIT="):
            resolve_config(64, dict(K_SPLIT=bad))
    with pytest.raises(ValueError, match="k_split="):
        int8_attention_reference(**case, k_split="all")

    t = quantize_int8_reference(case["q"], case["k"], case["v"], k_split=True, **case_args(case))
    out = torch.empty(1, 40, 2, 64, dtype=torch.bfloat16)
    v = case["v"].to(torch.bfloat16).transpose(1, 2).contiguous()
    args = (t.q8, t.q_scale, t.k8, t.k_scale, v, None, out, 0.125)
    with pytest.raises(ValueError, match="k8_lo"):
        hopper_int8_attention_core(*args, dict(K_SPLIT=True), t.norm_max)
    with pytest.raises(ValueError, match="k8_lo"):
        hopper_int8_attention_core(*args, dict(K_SPLIT=False), t.norm_max, k8_lo=t.k8_lo)
    with pytest.raises(ValueError, match="k8_lo"):
        hopper_int8_attention_core(*args, dict(K_SPLIT=True), t.norm_max,
                                   k8_lo=t.k8_lo[:, :, :20])


def _tight_case(B, S, D, targets, seed, device="cpu"):
    """Adversarial for the score bound: Cauchy-Schwarz tight on every row. Keys come in +-x pairs
    plus a per-channel offset of ~10 (so smoothing leaves +-x: the bound must use the smoothed
    norms), every x of norm 4, q = c_h * x on the same tokens: the score of a query with its own
    key is +||q|| ||k||, with the paired key -||q|| ||k||. Head h's c_h puts its bound T near
    targets[h] (0: an all-zero q head). bf16, no norms or rotation, scale D^-0.5."""
    H = len(targets)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, S // 2, H, D, generator=g, device=device)
    x = torch.cat([x, -x], 1) / x.norm(dim=-1, keepdim=True).repeat(1, 2, 1, 1) * 4.0
    if S % 2:
        x = torch.cat([x, torch.zeros(B, 1, H, D, device=device)], 1)
    c = torch.tensor(targets, device=device) / (16.0 * D ** -0.5 * LOG2E * 1.01)
    offset = 10.0 * torch.randn(1, 1, H, D, generator=g, device=device)
    q = (x * c[:, None]).to(torch.bfloat16)
    k = (x + offset).to(torch.bfloat16)
    v = torch.randn(B, S, H, D, generator=g, device=device).to(torch.bfloat16)
    return dict(q=q, k=k, v=v, text_len=S, cos=None, sin=None, q_norm=None, k_norm=None)


TIGHT_TARGETS = [0.0, 10.0, 47.0, 60.0, 78.0, 85.0, 400.0]


def test_score_bound_holds_on_adversarial_inputs(interpret):
    """Every score the kernel computes from the pre-pass's values (exact s32 q8 . k8, times the
    scales, float64) lies within the bound T it derives from the pre-pass's norm_max, the bound is
    tight on these inputs (so the check can fail), heads with T > 80 take the running max, and on
    the fixed-max heads the kernel's float32 exponent argument (the FFMA with the MAGIC_CVT
    offset) stays inside [-96, e]: every numerator a normal float, none above 2^64."""
    block_n, S = 64, 150
    case = _tight_case(2, S, 64, TIGHT_TARGETS, seed=5)
    t = _prepass(case, block_n)
    _check_norm_max(t)
    qk_scale = 64 ** -0.5 * LOG2E
    T, fixed, m = score_bound(t.norm_max, qk_scale)
    s_int = t.q8.double() @ t.k8.double().transpose(-1, -2)  # exact, as the s8 wgmma
    ks = t.k_scale.repeat_interleave(block_n, dim=-1)[..., :S]
    score = s_int * t.q_scale.double()[..., None] * ks.double()[..., None, :] * qk_scale
    top = score.abs().amax((-1, -2)).flatten()
    T_exact = T.double() / 1.01  # the bound without its margin
    assert (top <= T_exact * (1 + 1e-5)).all(), (top, T_exact)
    live = torch.tensor(TIGHT_TARGETS).repeat(2) > 0
    assert (top[live] >= 0.97 * T_exact[live]).all(), (top, T_exact)  # tight: can fail
    torch.testing.assert_close(T_exact.float().view(2, -1)[0], torch.tensor(TIGHT_TARGETS),
                               rtol=0.03, atol=1e-6)
    assert fixed.tolist() == [x <= 80 for x in TIGHT_TARGETS] * 2
    # the kernel's float32 softmax argument on the fixed heads
    rs = (t.q_scale * qk_scale)[..., None] * ks[..., None, :]  # float32, as the kernel rounds
    magic = 12582912.0
    mm = m.view(2, -1)[..., None, None].double()
    bias = (magic * rs.double() + mm).float().double()
    arg = ((magic + s_int) * rs.double() - bias).float().view(-1, S, S)[fixed]
    e = (T - m)[fixed]
    assert (arg.amin((-1, -2)) >= -96).all() and (arg.amax((-1, -2)) <= e).all()
    assert (e > 0).any()  # a head with numerators above 1 is among them


@pytest.mark.parametrize("kind", ["model", "tight"])
def test_emulation_fixed_max_matches_running_max(kind):
    """The emulation with the kernel's fixed max (its default) and with the running max give the
    same attention up to P's bf16 rounding, equally close to float64, on model-like inputs (every
    head bounded, T < 48) and on the tight adversarial inputs (numerators up to ~2^60, and heads
    over the limit on the running max in the same call)."""
    if kind == "model":
        case = make_case(1, 600, 4, 64, 40, torch.bfloat16, seed=6)
    else:
        case = _tight_case(1, 300, 64, TIGHT_TARGETS, seed=7)
    t = quantize_int8_reference(case["q"], case["k"], case["v"], **case_args(case))
    T, fixed, _ = score_bound(t.norm_max, 64 ** -0.5 * LOG2E)
    assert fixed.all() if kind == "model" else (fixed.any() and (~fixed).any() and (T[fixed] > 48).any())
    ref = rope3d_attention_reference(**case, compute_dtype=torch.float64)
    # k in one part for both (the default "heads" would give the running max k's second part)
    out_fixed = int8_attention_reference(**case, k_split=False)
    out_run = int8_attention_reference(**case, fixed_max=False, k_split=False)
    e_fixed, e_run = rel_err(out_fixed, ref), rel_err(out_run, ref)
    assert e_fixed <= 1.1 * e_run + 1e-3, (e_fixed, e_run)
    assert rel_err(out_fixed, out_run) <= 5e-3
    assert not torch.equal(out_fixed, out_run)  # the two emulations do take different paths


def test_precision_dispatch_and_checks():
    case = make_case(1, 20, 2, 64, 4, torch.float32, seed=3)
    out = ops.rope3d_attention(**case, precision="int8")  # auto on CPU: the emulation
    torch.testing.assert_close(out, int8_attention_reference(**case), rtol=0, atol=0)
    exact = ops.rope3d_attention(**case)
    torch.testing.assert_close(exact, rope3d_attention_reference(**case), rtol=0, atol=0)
    with pytest.raises(ValueError, match="precision='fp8'"):
        ops.rope3d_attention(**case, precision="fp8")
    with pytest.raises(ValueError, match="precision='int8'"):
        ops.rope3d_attention(**case, precision="int8", backend="triton")


def test_hopper_int8_fake_impl():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 33, 3, 64, dtype=torch.bfloat16)
        out = torch.ops.cogvideox_kernels.rope3d_attention_hopper_int8(
            q, q, q, 3, None, None, None, None, None, None, False, False, 1e-6, 0.125)
        assert out.shape == q.shape and out.dtype == q.dtype


def test_unknown_int8_config_key_raises():
    from cogvideox_kernels.ops.attention.hopper_int8_fwd import resolve_config

    with pytest.raises(ValueError, match="BLOCK_M"):
        resolve_config(64, dict(BLOCK_M=64))
    with pytest.raises(ValueError, match="NUM_WG=4"):
        resolve_config(64, dict(NUM_WG=4))


_COMPILE_SCRIPT = """
import json, sys
from cogvideox_kernels.ops.attention.hopper_int8_fwd import compile_offline
config, head_dim = json.loads(sys.argv[1])
ptx = compile_offline(config, head_dim).asm["ptx"]
print(json.dumps(dict(s8=".s8.s8" in ptx,
                      e4m3=(".e4m3.e4m3" in ptx) == config.get("PV_FP8", False),
                      tma="cp.async.bulk.tensor" in ptx, local=".local" in ptx)))
"""


@pytest.mark.parametrize("config,D", [
    pytest.param(dict(PV_FP8=True), 64, marks=pytest.mark.slow),
    (dict(), 128),
])
def test_int8_kernel_compiles_for_sm90a_offline(config, D, tmp_path):
    """INT8 Q K^T and FP8 P V lower to wgmma on sm_90a without a GPU, with no local memory
    (Gluon does not build under TRITON_INTERPRET: a subprocess without it)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps([config, D])],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found == dict(s8=True, e4m3=True, tma=True, local=False), found


_K_SPLIT_COMPILE_SCRIPT = r"""
import json, re, sys
from cogvideox_kernels.ops.attention.hopper_int8_fwd import compile_offline
found = []
for config in (dict(K_SPLIT=False), dict(K_SPLIT=True), dict(K_SPLIT="heads")):
    c = compile_offline(config, int(sys.argv[1]))
    ptx = c.asm["ptx"]
    found.append(dict(s8=len(re.findall(r"wgmma\.mma_async[.a-z0-9]*\.s8\.s8", ptx)),
                      local=".local" in ptx, shared=c.metadata.shared))
print(json.dumps(found))
"""


@pytest.mark.parametrize("D", [64, pytest.param(128, marks=pytest.mark.slow)])
def test_k_split_kernel_compiles_for_sm90a_offline(D, tmp_path):
    """K_SPLIT lowers for sm_90a: twice the s8 wgmmas of the default kernel (q8 . k_hi and
    q8 . k_lo), no local memory, and the k_lo ring (STAGES x 128 keys x D bytes) on top of the
    default's shared memory, within the 227 KB of an H100/H200 SM; K_SPLIT="heads" in between
    (two parts in the running-max loop only), with the same shared memory."""
    import json
    import os
    import subprocess
    import sys

    from cogvideox_kernels.ops.attention.hopper_int8_fwd import default_config

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", _K_SPLIT_COMPILE_SCRIPT, str(D)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    base, split, heads = json.loads(run.stdout.strip().splitlines()[-1])
    assert base["s8"] > 0 and split["s8"] == 2 * base["s8"], (base, split)
    assert base["s8"] < heads["s8"] < split["s8"] and heads["shared"] == split["shared"], heads
    assert not base["local"] and not split["local"] and not heads["local"]
    cfg = default_config(D)
    assert split["shared"] == base["shared"] + cfg["STAGES"] * cfg["BLOCK_N"] * D, (base, split)
    assert split["shared"] <= 227 * 1024


_PREPASS_COMPILE_SCRIPT = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cogvideox_kernels.ops.attention.int8_prepass import _quant_int8_kernel
names = ["x_ptr", "y_ptr", "scale_ptr", "mean_ptr", "norm_ptr", "rot_ptr", "S", "H", "text_len",
         "stride_xb", "stride_xs", "stride_xh", "cos_ptr", "sin_ptr", "stride_cs", "weight_ptr",
         "bias_ptr", "eps", "lo_ptr"]
types = ["*bf16", "*i8", "*fp32", "*fp32", "*fp32", "*fp32", "i32", "i32", "i32", "i32", "i32",
         "i32", "*fp32", "*fp32", "i32", "*bf16", "*bf16", "fp32", "*i8"]
found = []
for per_row, block_s in ((True, 64), (False, 128)):
    ce = dict(HAS_NORM=True, HAS_WEIGHT=True, HAS_BIAS=True, HAS_ROPE=True, HAS_MEAN=not per_row,
              ROTATE=True, PER_ROW=per_row, NORM_SQ=True, D=64, BLOCK_S=block_s, BLOCK_D=64,
              SPLIT=not per_row, LO_BITS=7)
    sig = dict(zip(names, types)) | {n: "constexpr" for n in ce}
    ptx = triton.compile(ASTSource(fn=_quant_int8_kernel, signature=sig, constexprs=ce),
                         target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
    found.append(dict(mma=ptx.count("mma.sync") + ptx.count("wgmma.mma_async") >= 3,
                      local=".local" in ptx))
print(json.dumps(found))
"""


def test_rotating_prepass_compiles_for_sm90a_offline(tmp_path):
    """The ROTATE pre-pass (a tf32x3 tl.dot, which the interpreter runs as exact float32) lowers
    for sm_90a: three tensor-core products per tile (float32-accurate), no local memory (k's
    launch with k_split's second INT8 part)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", _PREPASS_COMPILE_SCRIPT], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [dict(mma=True, local=False)] * 2


# ---------------------------------------------------------------------------------------- GPU
def _on_hopper():
    return torch.cuda.is_available() and hopper_available("cuda")[0]


gpu_hopper = pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU (H100/H200)")
GPU_CONFIGS = [dict(), dict(ROTATE=True), dict(ROTATE=True, SCORE_BOUND=False),
               dict(SCORE_BOUND=False), dict(MAGIC_CVT=False), dict(STAGES=3),
               dict(NUM_WG=2), dict(TWO_LEVEL=True), dict(PV_FP8=True),
               dict(PV_FP8=True, TWO_LEVEL=True, MAGIC_CVT=False),
               dict(K_SPLIT=True), dict(K_SPLIT=True, ROTATE=True),
               dict(K_SPLIT=True, SCORE_BOUND=False), dict(K_SPLIT=True, STAGES=3),
               dict(K_SPLIT=True, NUM_WG=2), dict(K_SPLIT="heads")]


def _kernel(case, config=None):
    from cogvideox_kernels.ops.attention.hopper import hopper_int8_attention_fwd

    qn = case["q_norm"] or (None, None)
    kn = case["k_norm"] or (None, None)
    D = case["q"].shape[-1]
    return hopper_int8_attention_fwd(case["q"], case["k"], case["v"], case["text_len"],
                                     case["cos"], case["sin"], qn[0], qn[1], kn[0], kn[1],
                                     case["q_norm"] is not None, case["k_norm"] is not None, 1e-6,
                                     D ** -0.5, config=config)


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("B,S,H,D,text_len,dtype", [
    (1, 1, 1, 64, 0, torch.bfloat16),
    (2, 37, 3, 64, 5, torch.bfloat16),
    (1, 300, 5, 64, 0, torch.bfloat16),
    (2, 333, 3, 64, 333, torch.bfloat16),
    (1, 1000, 7, 128, 17, torch.bfloat16),
    (2, 517, 3, 64, 26, torch.float16),
])
def test_gpu_int8_parity_odd_shapes(B, S, H, D, text_len, dtype):
    case = make_case(B, S, H, D, text_len, dtype, seed=S + D + H, device="cuda")
    out = ops.rope3d_attention(**case, precision="int8", backend="hopper")
    emu = int8_attention_reference(**case)
    ref = rope3d_attention_reference(**case, compute_dtype=torch.float64)
    assert out.shape == case["q"].shape and out.dtype == dtype and out.is_contiguous()
    e_out, e_emu = rel_err(out, ref), rel_err(emu, ref)
    assert e_out <= 1.25 * e_emu + 2e-3, (e_out, e_emu)
    assert rel_err(out, emu) <= 2e-2


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=str)
def test_gpu_int8_configs(config):
    case = make_case(2, 1111, 3, 64, 11, torch.bfloat16, seed=11, device="cuda")
    ref = rope3d_attention_reference(**case, compute_dtype=torch.float64)
    emu = int8_attention_reference(**case, pv_fp8=config.get("PV_FP8", False),
                                   fixed_max=config.get("SCORE_BOUND", True),
                                   rotate=config.get("ROTATE", False),
                                   k_split=config.get("K_SPLIT", False))
    out = _kernel(case, dict(config, ROTATE=config.get("ROTATE", False),
                             K_SPLIT=config.get("K_SPLIT", False)))
    e_emu, e_out = rel_err(emu, ref), rel_err(out, ref)
    assert e_out <= 1.25 * e_emu + 2e-3, (e_out, e_emu)
    # FP8 P: kernel (exp2.approx) and emulation (exp) land on different sides of e4m3 rounding
    # steps (2^-3) here and there: 2.2e-2 apart on the H200 at 909eb62, each 3.9e-2 from float64
    assert rel_err(out, emu) <= (4e-2 if config.get("PV_FP8") else 2e-2)


@pytest.mark.gpu
@gpu_hopper
def test_gpu_int8_non_contiguous_inputs():
    case = make_case(2, 403, 3, 64, 30, torch.bfloat16, seed=3, device="cuda")
    base = ops.rope3d_attention(**case, precision="int8", backend="hopper")
    for name in ("q", "k", "v"):
        wide = torch.zeros(2, 403 * 2, 3, 64, dtype=torch.bfloat16, device="cuda")
        wide[:, ::2] = case[name]
        other = dict(case, **{name: wide[:, ::2]})
        out = ops.rope3d_attention(**other, precision="int8", backend="hopper")
        torch.testing.assert_close(out, base, rtol=0, atol=0)


@pytest.mark.gpu
@gpu_hopper
def test_gpu_int8_compile_fullgraph():
    case = make_case(1, 300, 2, 64, 20, torch.bfloat16, seed=7, device="cuda")
    torch._dynamo.reset()
    with torch.no_grad():  # as the bf16 test: inductor's init makes tensors the conftest poisons
        fn = torch.compile(lambda q, k, v: ops.rope3d_attention(
            q, k, v, **case_args(case), precision="int8", backend="hopper") * 2, fullgraph=True)
        out = fn(case["q"], case["k"], case["v"])
        eager = ops.rope3d_attention(**case, precision="int8", backend="hopper") * 2
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("k_split", [False, True], ids=["one_part", "k_split"])
@pytest.mark.parametrize("norm_gain", [1.0, 2.0, 6.0])
def test_gpu_int8_score_bound_paths(norm_gain, k_split):
    """The fixed-max softmax (default) and the running max (SCORE_BOUND=False) each match their
    emulation and float64; norm weights x norm_gain move the heads' bound T from ~16 (gain 1) to
    ~62 (gain 2: numerators up to 2^28) and > 80 (gain 6: the bounded kernel falls back to the
    running max, the same numbers). k_split: the same with K_SPLIT (bound from the two-part k's
    norms, s32 -> f32 by I2F)."""
    case = make_case(2, 1111, 3, 64, 11, torch.bfloat16, seed=12, device="cuda")
    (qw, qb), (kw, kb) = case["q_norm"], case["k_norm"]
    case = dict(case, q_norm=((qw.float() * norm_gain).to(qw.dtype), qb),
                k_norm=((kw.float() * norm_gain).to(kw.dtype), kb))
    T, fixed, _ = score_bound(_prepass(case, 128, k_split=k_split).norm_max, 64 ** -0.5 * LOG2E)
    if norm_gain == 1.0:
        assert fixed.all() and (T <= 48).all(), T
    if norm_gain == 2.0:
        assert fixed.all() and (T > 48).all(), T
    if norm_gain == 6.0:
        assert not fixed.any(), T
    ref = rope3d_attention_reference(**case, compute_dtype=torch.float64)
    outs = {}
    for bound in (True, False):
        emu = int8_attention_reference(**case, fixed_max=bound, rotate=False, k_split=k_split)
        outs[bound] = _kernel(case, dict(SCORE_BOUND=bound, ROTATE=False, K_SPLIT=k_split))
        e_out, e_emu = rel_err(outs[bound], ref), rel_err(emu, ref)
        assert e_out <= 1.25 * e_emu + 2e-3, (bound, e_out, e_emu)
        assert rel_err(outs[bound], emu) <= 2e-2
    assert rel_err(outs[True], outs[False]) <= (1e-6 if norm_gain == 6.0 else 1e-2)


@pytest.mark.gpu
@gpu_hopper
def test_gpu_int8_score_bound_tight_mixed_heads():
    """The adversarial inputs (Cauchy-Schwarz tight on every row, numerators up to ~2^60 on the
    T ~ 78 head, two heads over the limit on the running max) in one launch: kernel vs its
    emulation and float64."""
    case = _tight_case(2, 700, 64, TIGHT_TARGETS, seed=8, device="cuda")
    _, fixed, _ = score_bound(_prepass(case, 128).norm_max, 64 ** -0.5 * LOG2E)
    assert fixed.tolist() == [x <= 80 for x in TIGHT_TARGETS] * 2
    out = ops.rope3d_attention(**case, precision="int8", backend="hopper")
    emu = int8_attention_reference(**case)
    ref = rope3d_attention_reference(**case, compute_dtype=torch.float64)
    e_out, e_emu = rel_err(out, ref), rel_err(emu, ref)
    assert e_out <= 1.25 * e_emu + 2e-3, (e_out, e_emu)
    assert rel_err(out, emu) <= 2e-2


@pytest.mark.gpu
@gpu_hopper
def test_gpu_int8_prepass_norm_max():
    case = make_case(2, 1000, 5, 64, 40, torch.bfloat16, seed=9, device="cuda")
    _check_norm_max(_prepass(case, 128))


@pytest.mark.gpu
@gpu_hopper
def test_gpu_int8_v_in_place_equals_copied():
    """V read in place (the QKV slice, token-major TMA view) gives bit-identical results to V
    copied head-major first (a token-strided V forces the copy)."""
    case = make_case(2, 1000, 5, 64, 40, torch.bfloat16, seed=14, device="cuda")
    v_strided = torch.empty(2, 2000, 5, 64, dtype=torch.bfloat16, device="cuda")[:, ::2]
    v_strided.copy_(case["v"])
    a = ops.rope3d_attention(**case, precision="int8", backend="hopper")
    b = ops.rope3d_attention(**dict(case, v=v_strided), precision="int8", backend="hopper")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("rotate", [False, True])
def test_gpu_int8_rotation_hard_inputs(rotate):
    """The kernel with and without ROTATE on the hard inputs (offset K through RoPE, heavy-tailed
    q, V outliers) against its emulation and float64; the rotated kernel is more exact than the
    unrotated one, as its emulation is; the pre-pass's rotated values are the torch emulation's."""
    case = _hard_rope_case(1500, 4, seed=21, device="cuda")
    t = _prepass(case, 128, rotate=rotate)
    want = quantize_int8_reference(case["q"], case["k"], case["v"], rotate=rotate,
                                   **case_args(case))
    _check_same_quantization(t, want, 1500)
    ref = rope3d_attention_reference(**case, compute_dtype=torch.float64)
    outs = {r: _kernel(case, dict(ROTATE=r)) for r in (False, True)}
    emu = int8_attention_reference(**case, rotate=rotate)
    e_out, e_emu = rel_err(outs[rotate], ref), rel_err(emu, ref)
    assert e_out <= 1.25 * e_emu + 2e-3, (e_out, e_emu)
    assert rel_err(outs[rotate], emu) <= 3e-2
    assert rel_err(outs[True], ref) < rel_err(outs[False], ref)


@pytest.mark.gpu
@gpu_hopper
@pytest.mark.parametrize("B,S,H,D,text_len,dtype", [
    (1, 1, 1, 64, 0, torch.bfloat16),
    (2, 37, 3, 64, 5, torch.bfloat16),
    (2, 333, 3, 64, 333, torch.bfloat16),
    (1, 1000, 7, 128, 17, torch.bfloat16),
    (2, 517, 3, 64, 26, torch.float16),
])
def test_gpu_int8_k_split_odd_shapes(B, S, H, D, text_len, dtype):
    """K_SPLIT (k as two INT8 parts) against its emulation and float64 at odd shapes, D 128
    (2 stages + the k_lo ring) and fp16 (running max)."""
    case = make_case(B, S, H, D, text_len, dtype, seed=S + D + H + 1, device="cuda")
    out = _kernel(case, dict(K_SPLIT=True, ROTATE=False))
    emu = int8_attention_reference(**case, k_split=True, rotate=False)
    ref = rope3d_attention_reference(**case, compute_dtype=torch.float64)
    assert out.shape == case["q"].shape and out.dtype == dtype and out.is_contiguous()
    e_out, e_emu = rel_err(out, ref), rel_err(emu, ref)
    assert e_out <= 1.25 * e_emu + 2e-3, (e_out, e_emu)
    assert rel_err(out, emu) <= 2e-2


@pytest.mark.gpu
@gpu_hopper
def test_gpu_int8_k_split_hard_inputs():
    """ROTATE + K_SPLIT on the hard inputs (offset K through RoPE, heavy-tailed q, V outliers):
    the pre-pass's k8 / k8_lo equal torch's; the kernel matches its emulation and float64 and
    meets issue 15's bars against our bf16 kernel on the same inputs (error <= 3x, cosine >=
    0.9995; emulation vs the bf16 reference: 2.2x, 0.99971), where ROTATE alone does not
    (emulation 4.2x, 0.99893); non-contiguous q/k/v give the same bits."""
    case = _hard_rope_case(1200, 4, seed=3, device="cuda")
    t = _prepass(case, 128, rotate=True, k_split=True)
    want = quantize_int8_reference(case["q"], case["k"], case["v"], rotate=True, k_split=True,
                                   **case_args(case))
    _check_same_quantization(t, want, 1200)
    _check_norm_max(t)
    ref = rope3d_attention_reference(**case, compute_dtype=torch.float64)
    bf16 = ops.rope3d_attention(**case, backend="hopper")
    out = _kernel(case, dict(ROTATE=True, K_SPLIT=True))
    rot_only = _kernel(case, dict(ROTATE=True, K_SPLIT=False))
    emu = int8_attention_reference(**case, rotate=True, k_split=True)
    e_out, e_emu, e_bf16 = rel_err(out, ref), rel_err(emu, ref), rel_err(bf16, ref)
    assert e_out <= 1.25 * e_emu + 2e-3, (e_out, e_emu)
    assert rel_err(out, emu) <= 2e-2
    assert e_out <= 3 * e_bf16 and cosine(out, ref) >= 0.9995, (e_out, e_bf16, cosine(out, ref))
    assert rel_err(rot_only, ref) > 1.5 * e_out, (rel_err(rot_only, ref), e_out)
    for name in ("q", "k", "v"):
        wide = torch.zeros(1, 2400, 4, 64, dtype=torch.bfloat16, device="cuda")
        wide[:, ::2] = case[name]
        other = _kernel(dict(case, **{name: wide[:, ::2]}), dict(ROTATE=True, K_SPLIT=True))
        torch.testing.assert_close(other, out, rtol=0, atol=0)


@pytest.mark.gpu
@gpu_hopper
def test_gpu_int8_k_split_heads_mixed():
    """K_SPLIT="heads" on the tight inputs (fixed-max heads without k_lo, running-max heads with
    it, in one launch: the loader's two k paths) against its emulation and float64; on the hard
    inputs (no head bounded) the same bits as K_SPLIT=True."""
    case = _tight_case(2, 700, 64, TIGHT_TARGETS, seed=8, device="cuda")
    t = _prepass(case, 128, k_split="heads")
    _check_norm_max(t)
    _, fixed, _ = score_bound(t.norm_max, 64 ** -0.5 * LOG2E)
    assert fixed.tolist() == [x <= 80 for x in TIGHT_TARGETS] * 2
    out = _kernel(case, dict(K_SPLIT="heads", ROTATE=False))
    emu = int8_attention_reference(**case, k_split="heads", rotate=False)
    ref = rope3d_attention_reference(**case, compute_dtype=torch.float64)
    e_out, e_emu = rel_err(out, ref), rel_err(emu, ref)
    assert e_out <= 1.25 * e_emu + 2e-3, (e_out, e_emu)
    assert rel_err(out, emu) <= 2e-2
    hard = _hard_rope_case(1200, 4, seed=3, device="cuda")
    a = _kernel(hard, dict(K_SPLIT="heads", ROTATE=True))
    b = _kernel(hard, dict(K_SPLIT=True, ROTATE=True))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
