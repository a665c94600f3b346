"""The reference ops against independent formulas (float64), and their input checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from cogvideox_kernels import ops
from cogvideox_kernels.ops.attention import apply_rope_interleaved
from cogvideox_kernels.ops.rope import rope3d_axis_dims
from helpers import rel_err


# ---------------------------------------------------------------- RoPE3D tables
@pytest.mark.parametrize("D", [40, 64, 128, 6])
def test_rope_axis_dims_follow_design(D):
    d_t, d_h, d_w = rope3d_axis_dims(D)
    assert (d_t, d_h, d_w) == tuple(n - n % 2 for n in (D // 4, 3 * D // 8, 3 * D // 8))
    assert d_t + d_h + d_w <= D and all(d % 2 == 0 for d in (d_t, d_h, d_w))
    if D == 64:
        assert (d_t, d_h, d_w) == (16, 24, 24)


@pytest.mark.parametrize("D", [40, 64])
def test_rope3d_freqs_match_the_definition(D):
    T, H, W = 3, 4, 5
    sin, cos = ops.rope3d_freqs(T, H, W, hidden_size=D * 2, num_heads=2)
    assert sin.shape == cos.shape == (T * H * W, D) and sin.dtype == torch.float32
    d_t, d_h, d_w = rope3d_axis_dims(D)
    for n in (0, 7, T * H * W - 1):
        t, h, w = n // (H * W), (n // W) % H, n % W
        for col in range(D):
            if col < d_t:
                pos, j, d = t, col // 2, d_t
            elif col < d_t + d_h:
                pos, j, d = h, (col - d_t) // 2, d_h
            elif col < d_t + d_h + d_w:
                pos, j, d = w, (col - d_t - d_h) // 2, d_w
            else:  # leftover dims are not rotated
                assert cos[n, col] == 1 and sin[n, col] == 0
                continue
            angle = pos / 10000.0 ** (2 * j / d)
            assert cos[n, col].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert sin[n, col].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_rope_rotation_matches_complex_multiplication():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 3, 16, generator=g, dtype=torch.float64)
    angles = torch.rand(11, 8, generator=g, dtype=torch.float64) * 6
    cos = angles.cos().repeat_interleave(2, 1)
    sin = angles.sin().repeat_interleave(2, 1)
    got = apply_rope_interleaved(x, cos, sin)
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    want = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, None, :]).flatten(-2)
    assert rel_err(got, want) < 1e-14


def test_rope3d_freqs_errors():
    with pytest.raises(ValueError, match="num_heads"):
        ops.rope3d_freqs(2, 2, 2, hidden_size=64, num_heads=3)
    with pytest.raises(ValueError, match="even"):
        ops.rope3d_freqs(2, 2, 2, hidden_size=9, num_heads=3)
    with pytest.raises(ValueError, match="time_dim"):
        ops.rope3d_freqs(0, 2, 2, hidden_size=64, num_heads=1)


# ---------------------------------------------------------------- attention
def naive_attention(q, k, v, text_len, cos, sin, q_norm, k_norm, eps, scale):
    """Independent float64 formula: explicit LayerNorm, explicit pair rotation, explicit softmax."""
    q, k, v = q.double(), k.double(), v.double()
    D = q.shape[-1]

    def norm(x, wb):
        if wb is None:
            return x
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * wb[0].double() + wb[1].double()

    def rot(x):
        if cos is None:
            return x
        x = x.clone()
        c, s = cos.double()[:, None, :], sin.double()[:, None, :]
        v_ = x[:, text_len:]
        even, odd = v_[..., 0::2], v_[..., 1::2]
        out = torch.empty_like(v_)
        out[..., 0::2] = even * c[..., 0::2] - odd * s[..., 0::2]
        out[..., 1::2] = odd * c[..., 1::2] + even * s[..., 1::2]
        x[:, text_len:] = out
        return x

    q, k = rot(norm(q, q_norm)), rot(norm(k, k_norm))
    scale = D ** -0.5 if scale is None else scale
    scores = torch.einsum("bshd,bthd->bhst", q, k) * scale
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhst,bthd->bshd", p, v)


@pytest.mark.parametrize("S,text_len", [(1, 0), (1, 1), (37, 5), (37, 0), (37, 37), (130, 17)])
@pytest.mark.parametrize("D", [40, 64])
@pytest.mark.parametrize("norms,rope", [(True, True), (False, True), (True, False)])
def test_attention_reference_matches_float64_formula(S, text_len, D, norms, rope):
    g = torch.Generator().manual_seed(S * 100 + D + text_len)
    B, H = 2, 3
    qkv = torch.randn(B, S, 3, H, D, generator=g)
    q, k, v = qkv.unbind(2)  # strided views, as from a fused QKV projection
    cos = sin = None
    if rope:
        sin_t, cos_t = ops.rope3d_freqs(1, 1, max(S - text_len, 1), hidden_size=D, num_heads=1)
        cos, sin = cos_t[: S - text_len], sin_t[: S - text_len]
    qn = (torch.randn(D, generator=g), torch.randn(D, generator=g)) if norms else None
    kn = (torch.randn(D, generator=g), torch.randn(D, generator=g)) if norms else None
    out = ops.rope3d_attention(q, k, v, text_len=text_len, cos=cos, sin=sin, q_norm=qn, k_norm=kn,
                               backend="reference")
    want = naive_attention(q, k, v, text_len, cos, sin, qn, kn, 1e-6, None)
    assert out.shape == (B, S, H, D) and out.dtype == torch.float32
    assert rel_err(out, want) < 1e-5


def test_attention_reference_custom_scale_and_bf16():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 20, 2, 64, generator=g) for _ in range(3))
    want = naive_attention(q, k, v, 0, None, None, None, None, 1e-6, 0.3)
    out = ops.rope3d_attention(q, k, v, text_len=0, scale=0.3, backend="reference")
    assert rel_err(out, want) < 1e-5
    out16 = ops.rope3d_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), text_len=0, scale=0.3,
                                 backend="reference")
    assert out16.dtype == torch.bfloat16 and rel_err(out16, want) < 1e-2


def test_attention_errors_are_clear():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="text_len"):
        ops.rope3d_attention(q, q, q, text_len=9)
    with pytest.raises(ValueError, match="k has dtype"):
        ops.rope3d_attention(q, q.double(), q, text_len=0)
    with pytest.raises(ValueError, match="cos and sin"):
        ops.rope3d_attention(q, q, q, text_len=0, cos=torch.ones(8, 16))
    with pytest.raises(ValueError, match="cos must have shape"):
        ops.rope3d_attention(q, q, q, text_len=2, cos=torch.ones(8, 16), sin=torch.ones(8, 16))
    with pytest.raises(ValueError, match="backend"):
        ops.rope3d_attention(q, q, q, text_len=0, backend="cudnn")
    with pytest.raises(ValueError, match="q_norm"):
        ops.rope3d_attention(q, q, q, text_len=0, q_norm=(torch.ones(15), torch.ones(15)))


# ---------------------------------------------------------------- expert FFN
def naive_expert_ffn(x, mod, w1, b1, w2, b2, text_len, nw, nb, eps, nt, text_router, video_router):
    """Independent float64 formula, token by token."""
    x, mod = x.double(), mod.double()
    B, S, Hd = x.shape
    out = x.clone()
    E = w1.shape[0]
    for b in range(B):
        for s in range(S):
            is_text = s < text_len
            shift, scale, gate = (mod[b, 3], mod[b, 4], mod[b, 5]) if is_text else (mod[b, 0], mod[b, 1], mod[b, 2])
            xs = x[b, s]
            mu, var = xs.mean(), ((xs - xs.mean()) ** 2).mean()
            h = (xs - mu) / math.sqrt(var + eps)
            if nw is not None:
                h = h * nw.double()
            if nb is not None:
                h = h + nb.double()
            h = h * (1 + scale) + shift
            weight = 1.0
            if nt == 0:
                e = 0
            else:
                lo, n, router = (0, nt, text_router) if is_text else (nt, E - nt, video_router)
                if n == 1:
                    e = lo
                else:
                    logits = router[0].double() @ h + (0 if router[1] is None else router[1].double())
                    probs = torch.softmax(logits, 0)
                    e = lo + int(probs.argmax())
                    weight = probs.max().item()
            a = w1[e].double() @ h + (0 if b1 is None else b1[e].double())
            a = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
            f = w2[e].double() @ a + (0 if b2 is None else b2[e].double())
            out[b, s] = xs + gate * weight * f
    return out


@pytest.mark.parametrize("nt,nv,text_len", [(0, 0, 3), (1, 1, 3), (2, 3, 4), (1, 2, 0), (3, 1, 7)])
def test_expert_ffn_reference_matches_token_formula(nt, nv, text_len):
    g = torch.Generator().manual_seed(nt * 10 + nv)
    B, S, Hd, Fi = 2, 7, 12, 20
    E = 1 if nt == 0 else nt + nv
    x = torch.randn(B, S, Hd, generator=g)
    mod = torch.randn(B, 6, Hd, generator=g) * 0.5
    w1, b1 = torch.randn(E, Fi, Hd, generator=g) * 0.3, torch.randn(E, Fi, generator=g)
    w2, b2 = torch.randn(E, Hd, Fi, generator=g) * 0.3, torch.randn(E, Hd, generator=g)
    nw, nb = torch.randn(Hd, generator=g), torch.randn(Hd, generator=g)
    tr = (torch.randn(nt, Hd, generator=g), torch.randn(nt, generator=g)) if nt > 1 else None
    vr = (torch.randn(nv, Hd, generator=g), None) if nv > 1 else None
    out = ops.expert_ffn(x, mod, w1, b1, w2, b2, text_len=text_len, norm_weight=nw, norm_bias=nb,
                         num_text_experts=nt, text_router=tr, video_router=vr, backend="reference")
    want = naive_expert_ffn(x, mod, w1, b1, w2, b2, text_len, nw, nb, 1e-5, nt, tr, vr)
    assert rel_err(out, want) < 1e-5


def test_expert_ffn_routing_uses_several_experts():
    from cogvideox_kernels.ops.expert_ffn import expert_assignment

    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 30, 8, generator=g)
    expert, weight = expert_assignment(h, 10, 5, 2, (torch.randn(2, 8, generator=g), None),
                                       (torch.randn(3, 8, generator=g), None))
    assert set(expert[:, :10].unique().tolist()) == {0, 1}
    assert set(expert[:, 10:].unique().tolist()) == {2, 3, 4}
    assert bool(((weight > 1 / 3) & (weight <= 1)).all())


def test_expert_ffn_errors_are_clear():
    x, mod = torch.randn(1, 4, 8), torch.randn(1, 6, 8)
    w1, w2 = torch.randn(2, 16, 8), torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match="shared FFN"):
        ops.expert_ffn(x, mod, w1, None, w2, None, text_len=1)
    with pytest.raises(ValueError, match="modulation must have shape"):
        ops.expert_ffn(x, mod[:, :3], w1[:1], None, w2[:1], None, text_len=1)
    with pytest.raises(ValueError, match="w2 must have shape"):
        ops.expert_ffn(x, mod, w1[:1], None, w2[:1, :, :8], None, text_len=1)
    with pytest.raises(ValueError, match="video_router"):
        ops.expert_ffn(x, mod, torch.randn(3, 16, 8), None, torch.randn(3, 8, 16), None, text_len=1,
                       num_text_experts=1)
    with pytest.raises(ValueError, match="text_router was given"):
        ops.expert_ffn(x, mod, w1, None, w2, None, text_len=1, num_text_experts=1,
                       text_router=(torch.randn(1, 8), None))


# ---------------------------------------------------------------- causal conv
def padded_by_hand(x, kt, pad_mode, cache):
    frames = list(x.unbind(2))
    if cache is not None:
        front = list(cache.unbind(2))
    elif pad_mode == "replicate":
        front = [frames[0]] * (kt - 1)
    else:
        front = [torch.zeros_like(frames[0])] * (kt - 1)
    return torch.stack(front + frames, dim=2)


@pytest.mark.parametrize("kt,stride,pad_mode", [(1, 1, "replicate"), (3, 1, "replicate"), (3, 2, "zeros"),
                                                (5, 2, "replicate"), (2, 1, "zeros")])
@pytest.mark.parametrize("T", [1, 6, 9])
def test_causal_conv_reference_matches_padded_conv3d(kt, stride, pad_mode, T):
    g = torch.Generator().manual_seed(kt * 7 + T)
    x = torch.randn(2, 5, T, 7, 9, generator=g, dtype=torch.float64)
    w = torch.randn(3, 5, kt, 3, 1, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    y, cache = ops.causal_conv3d(x, w, b, stride=stride, pad_mode=pad_mode, backend="reference")
    xp = padded_by_hand(x, kt, pad_mode, None)
    want = F.conv3d(xp, w, b, stride=(stride, 1, 1), padding=(0, 1, 0))
    assert y.shape == (2, 3, (T - 1) // stride + 1, 7, 9)
    assert rel_err(y, want) < 1e-12
    assert torch.equal(cache, xp[:, :, xp.shape[2] - (kt - 1):])
    # causality: output frame t does not change when a later input frame changes
    if T > 2:
        x2 = x.clone()
        x2[:, :, -1] += 1
        y2, _ = ops.causal_conv3d(x2, w, b, stride=stride, pad_mode=pad_mode, backend="reference")
        last_dep = [(t * stride) <= T - 2 for t in range(y.shape[2])]
        for t, unchanged in enumerate(last_dep):
            if unchanged:
                assert torch.equal(y[:, :, t], y2[:, :, t])


@pytest.mark.parametrize("stride", [1, 2])
def test_causal_conv_reference_streams_with_cache(stride):
    g = torch.Generator().manual_seed(stride)
    x = torch.randn(1, 4, 13, 5, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 1, 1, generator=g, dtype=torch.float64)
    whole, _ = ops.causal_conv3d(x, w, stride=stride, backend="reference")
    pieces, cache = [], None
    for lo, hi in ((0, 4), (4, 8), (8, 12), (12, 13)):
        y, cache = ops.causal_conv3d(x[:, :, lo:hi], w, stride=stride, cache=cache, backend="reference")
        pieces.append(y)
    assert torch.equal(torch.cat(pieces, 2), whole) or rel_err(torch.cat(pieces, 2), whole) < 1e-14


def test_causal_conv_errors_are_clear():
    x, w = torch.randn(1, 4, 3, 5, 5), torch.randn(2, 4, 3, 1, 1)
    with pytest.raises(ValueError, match="C=4"):
        ops.causal_conv3d(x, torch.randn(2, 3, 3, 1, 1))
    with pytest.raises(ValueError, match="pad_mode"):
        ops.causal_conv3d(x, w, pad_mode="reflect")
    with pytest.raises(ValueError, match="cache must have shape"):
        ops.causal_conv3d(x, w, cache=torch.randn(1, 4, 1, 5, 5))
    with pytest.raises(ValueError, match="odd kh, kw"):
        ops.causal_conv3d(x, torch.randn(2, 4, 3, 2, 2))
    with pytest.raises(ValueError, match="stride"):
        ops.causal_conv3d(x, w, stride=0)
