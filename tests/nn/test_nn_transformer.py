"""The transformer's nn modules (RoPE3DAttention, ExpertAdaLN, ExpertFFN, embeddings) against
independent float64 formulas; backends (state_dict, triton == reference); routing; errors."""
import math

import pytest
import torch

import cogvideox_kernels
from cogvideox_kernels.nn.adaln import AdaLayerNormOut, ExpertAdaLN
from cogvideox_kernels.nn.attention import RoPE3DAttention
from cogvideox_kernels.nn.embeddings import PatchEmbed3D, TimestepEmbedding, sincos_pos_embed_3d, timestep_sinusoid
from cogvideox_kernels.nn.expert_ffn import ExpertFFN
from cogvideox_kernels.ops.rope import rope3d_freqs
from helpers import randomize, rel_err

TOL32 = 1e-5


# ---------------------------------------------------------------- independent float64 formulas

def layer_norm64(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + eps)
    return out if weight is None else out * weight.double() + bias.double()


def rotate_complex(x, cos, sin):
    """RoPE as complex multiplication of pairs (x[2i] + i x[2i+1]) by (cos + i sin)."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2).contiguous())
    turn = torch.complex(cos[:, 0::2].double(), sin[:, 0::2].double())[:, None, :]
    return torch.view_as_real(pairs * turn).flatten(-2)


def attention64(module: RoPE3DAttention, x, text_len, rope):
    B, S, hidden = x.shape
    H, D = module.num_heads, module.head_dim
    W = module.qkv.weight.double()
    qkv = x.double() @ W.T + (0 if module.qkv.bias is None else module.qkv.bias.double())
    q, k, v = (qkv[..., i * hidden:(i + 1) * hidden].reshape(B, S, H, D) for i in range(3))
    if module.norm_q is not None:
        q = layer_norm64(q, module.norm_q.weight, module.norm_q.bias, 1e-6)
        k = layer_norm64(k, module.norm_k.weight, module.norm_k.bias, 1e-6)
    if rope is not None:
        q = torch.cat([q[:, :text_len], rotate_complex(q[:, text_len:], *rope)], dim=1)
        k = torch.cat([k[:, :text_len], rotate_complex(k[:, text_len:], *rope)], dim=1)
    scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(D)
    out = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v).reshape(B, S, hidden)
    return out @ module.to_out.weight.double().T + module.to_out.bias.double()


def adaln_vectors64(adaln: ExpertAdaLN, temb):
    t = temb.double()
    m = (t * torch.sigmoid(t)) @ adaln.linear.weight.double().T + adaln.linear.bias.double()
    return m.reshape(temb.shape[0], 6, -1)  # shift, scale, gate video; shift, scale, gate text


def per_token(vectors, text_len, S, text_row, video_row):
    is_text = (torch.arange(S) < text_len)[None, :, None]
    return torch.where(is_text, vectors[:, None, text_row], vectors[:, None, video_row])


def expert_ffn64(module: ExpertFFN, x, temb, text_len):
    """Every expert on every token, then each token picks its own: no masks, no loops over tokens."""
    B, S, _ = x.shape
    m = adaln_vectors64(module.adaln, temb)
    shift, scale, gate = (per_token(m, text_len, S, 3 + i, i) for i in range(3))
    h = layer_norm64(x.double(), module.adaln.norm.weight, module.adaln.norm.bias, 1e-5) * (1 + scale) + shift
    inner = torch.einsum("bsh,eih->ebsi", h, module.w1.double()) + module.b1.double()[:, None, None]
    all_out = torch.einsum("ebsi,ehi->ebsh", torch.nn.functional.gelu(inner, approximate="tanh"),
                           module.w2.double()) + module.b2.double()[:, None, None]
    expert = torch.zeros(B, S, dtype=torch.long)
    weight = torch.ones(B, S, dtype=torch.float64)
    if not module.shared_ffn:
        nt = module.num_text_experts
        expert[:, text_len:] = nt
        for router, sl, offset in ((module.text_router, slice(0, text_len), 0),
                                   (module.video_router, slice(text_len, S), nt)):
            if router is None:
                continue
            probs = (h[:, sl] @ router.weight.double().T + router.bias.double()).softmax(-1)
            weight[:, sl], idx = probs.max(-1)
            expert[:, sl] = idx + offset
    f = all_out.gather(0, expert[None, :, :, None].expand(1, B, S, all_out.shape[-1]))[0]
    return x.double() + gate * f * weight[..., None], expert


# ---------------------------------------------------------------- attention

@pytest.mark.parametrize("B,S,text_len,hidden,heads,qk_norm,bias,use_rope", [
    (2, 29, 5, 72, 3, True, True, True),     # D = 24, odd S
    (1, 11, 0, 64, 2, True, True, True),     # text_len = 0, D = 32
    (2, 7, 7, 64, 2, False, False, True),    # text_len = S: no video token is rotated
    (1, 17, 4, 96, 2, True, True, False),    # D = 48, no RoPE
])
def test_attention_matches_formula(B, S, text_len, hidden, heads, qk_norm, bias, use_rope):
    torch.manual_seed(0)
    module = RoPE3DAttention(hidden, heads, qk_norm=qk_norm, bias=bias, backend="reference")
    randomize(module, seed=1, scale=0.3)
    x = torch.randn(B, S, hidden)
    rope = None
    if use_rope:
        n = S - text_len
        sin, cos = rope3d_freqs(n, 1, 1, hidden_size=hidden, num_heads=heads) if n else (
            torch.zeros(0, hidden // heads), torch.zeros(0, hidden // heads))
        rope = (cos, sin)
    out = module(x, text_len, rope)
    assert out.shape == (B, S, hidden)
    assert rel_err(out, attention64(module, x, text_len, rope)) <= TOL32


def test_attention_passes_strided_views_and_norm_params():
    """The module's attention function (given here) sees q, k, v as views of the fused projection and
    the module's own norm parameters; replacing it later changes nothing else (no forward patching)."""
    seen = {}

    def spy(q, k, v, **kwargs):
        seen.update(q=q, k=k, v=v, **kwargs)
        return cogvideox_kernels.ops.rope3d_attention(q, k, v, **kwargs)

    module = RoPE3DAttention(64, 4, backend="reference", attention=spy)
    x = torch.randn(2, 9, 64)
    out = module(x, 3)
    q, k, v = seen["q"], seen["k"], seen["v"]
    D, item = 16, q.element_size()
    assert q.shape == (2, 9, 4, D) and q.stride() == (9 * 3 * 64, 3 * 64, D, 1)  # no copy: views of qkv
    assert k.data_ptr() - q.data_ptr() == 64 * item and v.data_ptr() - k.data_ptr() == 64 * item
    assert seen["q_norm"][0] is module.norm_q.weight and seen["k_norm"][1] is module.norm_k.bias
    assert seen["eps"] == 1e-6 and seen["backend"] == "reference" and seen["text_len"] == 3
    module.attention = cogvideox_kernels.ops.rope3d_attention
    assert torch.equal(module(x, 3), out) and "forward" not in module.__dict__
    with pytest.raises(ValueError, match="rope must be RopeTables"):
        module(x, 3, rope=torch.zeros(6, 16))


def test_qkv_attention_fused_or_separate_projections():
    """The projection step written once: a fused [B, S, 3 * hidden] projection and a (q, k, v) tuple of
    separate ones (diffusers' to_q/to_k/to_v) give the same result."""
    from cogvideox_kernels.nn.attention import qkv_attention

    torch.manual_seed(1)
    fused, out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)
    x = torch.randn(2, 7, 32)
    kw = dict(text_len=2, backend="reference")
    separate = lambda t: fused(t).chunk(3, dim=-1)  # noqa: E731
    a = qkv_attention(x, fused, out, 4, cogvideox_kernels.ops.rope3d_attention, **kw)
    b = qkv_attention(x, separate, out, 4, cogvideox_kernels.ops.rope3d_attention, **kw)
    assert a.shape == x.shape and torch.allclose(a, b, atol=1e-6)


def test_attention_reads_rope_tables_by_name():
    """rope3d_freqs returns RopeTables (sin, cos in that order, the seed's API); the module reads them
    by name, so they equal the (cos, sin) pair diffusers passes, and a swap would show."""
    torch.manual_seed(0)
    module = RoPE3DAttention(64, 2, backend="reference")
    x = torch.randn(1, 10, 64)
    tables = rope3d_freqs(2, 2, 2, hidden_size=64, num_heads=2)
    assert tables.sin is tables[0] and tables.cos is tables[1]
    with torch.no_grad():
        named, pair, swapped = module(x, 2, tables), module(x, 2, (tables.cos, tables.sin)), module(x, 2, tuple(tables))
    assert torch.equal(named, pair) and rel_err(swapped, pair) > 1e-3


def test_attention_rope_changes_only_with_video_tokens():
    torch.manual_seed(0)
    module = RoPE3DAttention(64, 2, backend="reference")
    x = torch.randn(1, 10, 64)
    sin, cos = rope3d_freqs(2, 2, 2, hidden_size=64, num_heads=2)
    assert rel_err(module(x, 2, (cos, sin)), module(x, 2)) > 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=64, num_heads=3), "num_heads"),
    (dict(hidden_size=64, num_heads=2, backend="cuda"), "backend"),
])
def test_attention_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoPE3DAttention(**kwargs)


def test_attention_forward_errors():
    module = RoPE3DAttention(64, 2, backend="reference")
    with pytest.raises(ValueError, match="hidden_size=64"):
        module(torch.randn(1, 5, 32), 2)
    with pytest.raises(ValueError, match="rope"):
        module(torch.randn(1, 5, 64), 2, rope=torch.zeros(3, 32))
    with pytest.raises(ValueError, match="cos"):  # the op checks the table shape
        module(torch.randn(1, 5, 64), 2, rope=(torch.ones(4, 32), torch.zeros(4, 32)))


def test_modules_name_the_argument_for_a_wrong_dtype_or_width():
    """A ValueError naming the module and the argument, not torch's RuntimeError from inside a matmul."""
    attn, ffn, adaln = RoPE3DAttention(32, 2), ExpertFFN(32, 16), ExpertAdaLN(16, 32)
    x, temb = torch.randn(1, 4, 32), torch.randn(1, 16)
    bf16 = r"has dtype torch.bfloat16 but the module's parameters are torch.float32"
    with pytest.raises(ValueError, match=rf"RoPE3DAttention: x {bf16}"):
        attn(x.bfloat16(), 1)
    with pytest.raises(ValueError, match=rf"ExpertFFN: x {bf16}"):
        ffn(x.bfloat16(), temb, 1)
    with pytest.raises(ValueError, match=rf"ExpertAdaLN: temb {bf16}"):
        ffn(x, temb.bfloat16(), 1)
    with pytest.raises(ValueError, match=r"ExpertAdaLN: temb has shape \(1, 8\); its last dim must be time_embed_dim=16"):
        ffn(x, torch.randn(1, 8), 1)
    with pytest.raises(ValueError, match="ExpertAdaLN: temb .*time_embed_dim=16"):
        adaln(x, torch.randn(1, 8), 1)
    with pytest.raises(ValueError, match="ExpertAdaLN: x .*hidden_size=32"):
        adaln(torch.randn(1, 4, 31), temb, 1)
    with pytest.raises(ValueError, match="AdaLayerNormOut: temb .*time_embed_dim=16"):
        AdaLayerNormOut(16, 32)(x, torch.randn(1, 9))
    with pytest.raises(ValueError, match="PatchEmbed3D: latents .*bfloat16"):
        PatchEmbed3D(4, 32, (1, 2, 2))(torch.randn(1, 1, 4, 4, 4).bfloat16())


# ---------------------------------------------------------------- adaLN

def test_expert_adaln_order_and_formula():
    torch.manual_seed(0)
    adaln = ExpertAdaLN(12, 40)
    randomize(adaln, seed=2, scale=0.3)
    x, temb, text_len = torch.randn(2, 9, 40), torch.randn(2, 12), 4
    h, modulation = adaln(x, temb, text_len)
    m = adaln_vectors64(adaln, temb)
    assert rel_err(modulation, m) <= TOL32
    shift, scale, gate = (per_token(m, text_len, 9, 3 + i, i) for i in range(3))
    ref = layer_norm64(x.double(), adaln.norm.weight, adaln.norm.bias, 1e-5) * (1 + scale) + shift
    assert rel_err(h, ref) <= TOL32
    update = torch.randn(2, 9, 40)
    assert rel_err(adaln.gated_residual(x, update, modulation, text_len), x.double() + gate * update) <= TOL32


def test_ada_layer_norm_out_formula():
    torch.manual_seed(0)
    norm = AdaLayerNormOut(12, 40)
    randomize(norm, seed=3, scale=0.3)
    x, temb = torch.randn(2, 7, 40), torch.randn(2, 12)
    t = temb.double()
    shift_scale = (t * torch.sigmoid(t)) @ norm.linear.weight.double().T + norm.linear.bias.double()
    shift, scale = shift_scale[:, None, :40], shift_scale[:, None, 40:]
    ref = layer_norm64(x.double(), norm.norm.weight, norm.norm.bias, 1e-5) * (1 + scale) + shift
    assert rel_err(norm(x, temb), ref) <= TOL32


# ---------------------------------------------------------------- expert FFN

FFN_CASES = [  # hidden, ratio, text experts, video experts, shared, B, S, text_len
    (40, 4.0, 1, 1, True, 2, 13, 4),
    (40, 2.5, 1, 1, False, 2, 13, 0),
    (48, 2.0, 2, 3, False, 2, 23, 7),
    (48, 2.0, 1, 2, False, 1, 9, 9),   # all text: the video router sees no token
]


@pytest.mark.parametrize("hidden,ratio,nt,nv,shared,B,S,text_len", FFN_CASES)
def test_expert_ffn_matches_formula(hidden, ratio, nt, nv, shared, B, S, text_len):
    torch.manual_seed(0)
    module = ExpertFFN(hidden, 16, ratio, nt, nv, shared, backend="reference")
    randomize(module, seed=4, scale=0.3)
    assert module.w1.shape == (module.num_experts, int(hidden * ratio), hidden)
    x, temb = torch.randn(B, S, hidden), torch.randn(B, 16)
    ref, _ = expert_ffn64(module, x, temb, text_len)
    assert rel_err(module(x, temb, text_len), ref) <= TOL32


def test_expert_ffn_routing_routes():
    """With several experts, tokens spread over them, and changing expert e's weights changes
    exactly the tokens routed to e."""
    torch.manual_seed(0)
    module = ExpertFFN(48, 16, 2.0, 2, 3, backend="reference")
    randomize(module, seed=5, scale=0.3)
    x, temb, text_len = torch.randn(2, 64, 48), torch.randn(2, 16), 16
    _, expert = expert_ffn64(module, x, temb, text_len)
    assert set(expert[:, :text_len].unique().tolist()) == {0, 1}
    assert set(expert[:, text_len:].unique().tolist()) == {2, 3, 4}
    before = module(x, temb, text_len)
    for e in range(5):
        saved = module.w2[e].detach().clone()
        with torch.no_grad():
            module.w2[e].add_(0.5)
            after = module(x, temb, text_len)
            module.w2[e].copy_(saved)  # exact restore (adding then subtracting 0.5 rounds)
        changed = (after - before).abs().amax(-1) > 1e-6
        assert torch.equal(changed, expert == e), f"expert {e}"


def test_expert_ffn_separate_experts_differ_from_shared():
    torch.manual_seed(0)
    module = ExpertFFN(40, 16, 2.0, 1, 1, shared_ffn=False, backend="reference")
    randomize(module, seed=6, scale=0.3)
    x, temb = torch.randn(1, 10, 40), torch.randn(1, 16)
    before = module(x, temb, 4)
    with torch.no_grad():
        module.w1[0].add_(0.5)  # the text expert
    diff = (module(x, temb, 4) - before).abs().amax(-1)[0]
    assert (diff[:4] > 1e-6).all() and (diff[4:] == 0).all()


def test_expert_ffn_calls_the_op_once(monkeypatch):
    import cogvideox_kernels.nn.expert_ffn as ffn_module

    calls = []
    real = ffn_module.expert_ffn
    monkeypatch.setattr(ffn_module, "expert_ffn", lambda *a, **k: calls.append(k) or real(*a, **k))
    module = ExpertFFN(40, 16, 2.0, 2, 2, backend="reference")
    module(torch.randn(1, 6, 40), torch.randn(1, 16), 2)
    assert len(calls) == 1 and calls[0]["num_text_experts"] == 2
    assert calls[0]["text_router"][0] is module.text_router.weight


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_text_experts=2, shared_ffn=True), "shared_ffn"),
    (dict(num_video_experts=0), "num_video_experts"),
    (dict(mlp_ratio=0.01), "mlp_ratio"),
    (dict(backend="cpp"), "backend"),
    (dict(shared_ffn=1), "shared_ffn"),
])
def test_expert_ffn_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertFFN(40, 16, **kwargs)


# ---------------------------------------------------------------- backends

def _modules(backend):
    torch.manual_seed(0)
    return [RoPE3DAttention(64, 2, backend=backend),
            ExpertFFN(48, 16, 2.0, 2, 3, backend=backend)]


def test_state_dict_does_not_depend_on_backend():
    for ref_module, tri_module in zip(_modules("reference"), _modules("triton")):
        ref_sd, tri_sd = ref_module.state_dict(), tri_module.state_dict()
        assert list(ref_sd) == list(tri_sd)
        assert all(torch.equal(ref_sd[k], tri_sd[k]) for k in ref_sd)
        before = {k: v.clone() for k, v in ref_sd.items()}
        ref_module.backend = "triton"
        assert ref_module.backend == "triton"
        assert all(torch.equal(before[k], v) for k, v in ref_module.state_dict().items())
        with pytest.raises(ValueError, match="backend"):
            ref_module.backend = "fast"


def test_attention_triton_equals_reference(interpret):
    torch.manual_seed(0)
    module = RoPE3DAttention(64, 2, backend="reference")
    randomize(module, seed=7, scale=0.3)
    x = torch.randn(1, 37, 64)
    sin, cos = rope3d_freqs(2, 3, 5, hidden_size=64, num_heads=2)
    with torch.no_grad():  # (kernels have no backward: a named kernel refuses while autograd records)
        ref = module(x, 7, (cos, sin))
        module.backend = "triton"
        out = module(x, 7, (cos, sin))
    assert rel_err(out, ref) <= TOL32
    with pytest.raises(ValueError, match="no backward pass"):
        module(x, 7, (cos, sin))


@pytest.mark.parametrize("nt,nv,shared", [(1, 1, True), (2, 3, False)])
def test_expert_ffn_triton_equals_reference(interpret, nt, nv, shared):
    torch.manual_seed(0)
    module = ExpertFFN(48, 16, 2.0, nt, nv, shared, backend="reference")
    randomize(module, seed=8, scale=0.3)
    x, temb = torch.randn(2, 21, 48), torch.randn(2, 16)
    with torch.no_grad():
        ref = module(x, temb, 5)
        module.backend = "triton"
        out = module(x, temb, 5)
    assert rel_err(out, ref) <= TOL32


# ---------------------------------------------------------------- embeddings

def test_timestep_sinusoid_formula():
    t = torch.tensor([0.0, 3.0, 999.0])
    out = timestep_sinusoid(t, 10)
    j = torch.arange(5, dtype=torch.float64)
    angles = t.double()[:, None] * torch.exp(-math.log(10000.0) * j / 5)
    assert rel_err(out, torch.cat([angles.cos(), angles.sin()], -1)) <= TOL32  # float32 angles
    assert rel_err(timestep_sinusoid(t, 10, flip_sin_to_cos=False),
                   torch.cat([angles.sin(), angles.cos()], -1)) <= TOL32
    odd = timestep_sinusoid(t, 11)
    assert odd.shape == (3, 11) and (odd[:, -1] == 0).all()


def test_timestep_embedding_mlp():
    torch.manual_seed(0)
    emb = TimestepEmbedding(20, 12)
    t = torch.tensor([5.0, 700.0])
    s = timestep_sinusoid(t, 20).double()
    h = s @ emb.linear_1.weight.double().T + emb.linear_1.bias.double()
    ref = (h * torch.sigmoid(h)) @ emb.linear_2.weight.double().T + emb.linear_2.bias.double()
    assert rel_err(emb(t), ref) <= TOL32


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 1, 3)])
def test_patchify_order_and_roundtrip(patch):
    pe = PatchEmbed3D(3, 8, patch)
    pt, ph, pw = patch
    x = torch.randn(2, 2 * pt, 3, 2 * ph, 3 * pw)
    patches = pe.patchify(x)
    assert patches.shape == (2, 2 * 2 * 3, 3 * pt * ph * pw)
    # token (t, h, w) = (1, 1, 2), patch feature (c, i, j, k) = x[t*pt+i, c, h*ph+j, w*pw+k]
    token = (1 * 2 + 1) * 3 + 2
    expected = x[0, pt:2 * pt, :, ph:2 * ph, 2 * pw:3 * pw].permute(1, 0, 2, 3).reshape(-1)
    assert torch.equal(patches[0, token], expected)
    assert torch.equal(pe.unpatchify(patches, pe.grid(x.shape), 3), x)


def test_patch_embed_refuses_sizes_the_patch_does_not_divide():
    pe = PatchEmbed3D(3, 8, (2, 2, 2))
    with pytest.raises(ValueError, match="frames T=3"):
        pe(torch.randn(1, 3, 3, 4, 4))
    with pytest.raises(ValueError, match="width W=5"):
        pe(torch.randn(1, 2, 3, 4, 5))


def test_sincos_pos_embed_layout():
    table = sincos_pos_embed_3d(2, 3, 4, 32)
    assert table.shape == (24, 32) and table.dtype == torch.float32
    t, h, w = 1, 2, 3
    row = table[(t * 3 + h) * 4 + w].double()

    def one_d(pos, dim):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        return torch.cat([torch.sin(pos * omega), torch.cos(pos * omega)])

    ref = torch.cat([one_d(t, 8), one_d(w / 1.875, 12), one_d(h / 1.875, 12)])
    assert rel_err(row, ref) <= 1e-6
    with pytest.raises(ValueError, match="multiple of 16"):
        sincos_pos_embed_3d(1, 1, 1, 40)
