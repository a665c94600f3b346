"""The fused VAE conv (GroupNorm-apply + modulation + SiLU + causal (kt,kh,kw) conv + bias + residual):
the reference against diffusers' op sequence, the extension's C++ path (CI) and CUDA kernel (GPU)
against the reference, at odd shapes and every option, non-contiguous inputs, streaming with the
cache, and the errors for bad input."""
import pytest
import torch

from cogvideox_kernels import _ext
from cogvideox_kernels.ops.vae_conv import diffusers_sequence, vae_conv3d, vae_conv3d_reference

needs_ext = pytest.mark.skipif(not _ext.extension_available(),
                               reason="cogvideox_kernels._C is not built" + _ext.extension_error())
needs_cuda_ext = pytest.mark.skipif(not _ext.cuda_available(), reason="extension built without CUDA")

BUDGET = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
CACHE_BUDGET = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 5e-3, torch.float16: 1e-3}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output (unwritten or overflow)"
    return ((out - ref).norm() / ref.norm()).item()


def make_case(B, C, C_out, T, H, W, k=(3, 3, 3), *, dtype=torch.float32, device="cpu", groups=0,
              affine=True, modulation=False, silu=True, cache=False, residual=False, bias=True,
              offset=0.5, seed=0):
    """Inputs and keyword arguments of one call (fresh seeded random data, never zeros)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x = rnd(B, C, T, H, W) + offset
    w = rnd(C_out, C, *k) / (C * k[0] * k[1] * k[2]) ** 0.5
    kw = dict(num_groups=groups, silu=silu)
    if groups and affine:
        kw.update(norm_weight=rnd(C) * 0.5 + 1, norm_bias=rnd(C) * 0.5)
    if modulation:
        kw.update(scale=rnd(B, C, T, H, W) * 0.5 + 1, shift=rnd(B, C, T, H, W) * 0.5)
    if cache:
        kw["cache"] = rnd(B, C, k[0] - 1, H, W)
    if residual:
        kw["residual"] = rnd(B, C_out, T, H, W)
    return x, w, (rnd(C_out) if bias else None), kw


def check(x, w, b, kw, backend, *, own_rule=True, **extra):
    y, new_cache = vae_conv3d(x, w, b, backend=backend, **kw, **extra)
    ref, ref_cache = vae_conv3d_reference(x, w, b, compute_dtype=torch.float64, **kw, **extra)
    assert y.shape == ref.shape and y.dtype == x.dtype and new_cache.shape == ref_cache.shape
    err = rel_err(y, ref)
    assert err <= BUDGET[x.dtype], f"rel err {err:.2e} > {BUDGET[x.dtype]:.0e}"
    if x.dtype in (torch.bfloat16, torch.float16) and own_rule:
        own, _ = diffusers_sequence(x, w, b, **kw, **extra)  # torch's own same-dtype path
        assert err <= 2 * rel_err(own, ref) + 1e-6, f"rel err {err:.2e} vs torch's own {rel_err(own, ref):.2e}"
    if new_cache.numel():
        cerr = rel_err(new_cache, ref_cache)
        assert cerr <= CACHE_BUDGET[x.dtype], f"cache rel err {cerr:.2e}"
    return y, new_cache


# ------------------------------------------------------------------------------------------------
# The reference is diffusers' function
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [dict(), dict(groups=4), dict(groups=2, modulation=True, residual=True),
                                  dict(groups=1, cache=True, affine=False), dict(silu=False, cache=True)])
def test_reference_equals_op_sequence(opts):
    x, w, b, kw = make_case(2, 8, 6, 3, 5, 7, dtype=torch.float64, seed=1, **opts)
    for pad_mode in ("replicate", "zeros"):
        y, c = vae_conv3d_reference(x, w, b, pad_mode=pad_mode, **kw)
        ys, cs = diffusers_sequence(x, w, b, pad_mode=pad_mode, **kw)
        assert rel_err(y, ys) < 1e-13 and rel_err(c, cs) < 1e-13


def test_reference_group_norm_statistics_span_all_frames():
    """GroupNorm statistics come from every frame of the tensor given (nn.GroupNorm on 5-D input)."""
    x, w, b, kw = make_case(1, 8, 4, 4, 3, 3, dtype=torch.float64, groups=2, affine=False, silu=False, seed=2)
    gn = torch.nn.GroupNorm(2, 8, eps=1e-6, affine=False).double()
    y, _ = vae_conv3d_reference(x, w, b, **kw)
    y2, _ = vae_conv3d_reference(gn(x), w, b)
    assert rel_err(y, y2) < 1e-13
    # normalising frame by frame would differ
    per_frame = torch.cat([gn(x[:, :, i:i + 1]) for i in range(4)], dim=2)
    y3, _ = vae_conv3d_reference(per_frame, w, b)
    assert rel_err(y3, y) > 1e-3


# ------------------------------------------------------------------------------------------------
# CPU (CI): the C++ path
# ------------------------------------------------------------------------------------------------
CPP_CASES = [  # (B, C, C_out, T, H, W, k, options)
    (2, 8, 6, 4, 5, 7, (3, 3, 3), dict(groups=4)),
    (1, 6, 5, 1, 3, 4, (3, 3, 3), dict(groups=3, modulation=True, residual=True)),
    (2, 5, 3, 2, 4, 3, (3, 3, 3), dict(groups=5, cache=True, residual=True)),
    (1, 4, 7, 5, 1, 6, (3, 3, 3), dict(silu=False, cache=True)),
    (1, 3, 2, 3, 6, 5, (2, 1, 3), dict(groups=1, affine=False)),
    (1, 4, 4, 2, 5, 5, (1, 5, 5), dict(groups=2, residual=True, bias=False)),
    (1, 16, 8, 3, 7, 9, (5, 3, 3), dict(groups=4, modulation=True, cache=True)),
]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(CPP_CASES)))
def test_cpp_matches_reference(case, dtype):
    B, C, Co, T, H, W, k, opts = CPP_CASES[case]
    x, w, b, kw = make_case(B, C, Co, T, H, W, k, dtype=dtype, seed=10 + case, **opts)
    for pad_mode in ("replicate", "zeros"):
        check(x, w, b, kw, "cpp", pad_mode=pad_mode)


@needs_ext
def test_cpp_large_mean_statistics():
    """|mean| >> std: the shifted sums keep the variance right (a naive E[x^2]-E[x]^2 in fp32 would not)."""
    x, w, b, kw = make_case(1, 8, 4, 3, 6, 6, groups=2, offset=300.0, seed=3)
    check(x, w, b, kw, "cpp")


def noncontig_views(t):
    """Non-contiguous views of t: equal values (stepped slice, transposed, channels_last_3d) and a
    stride-0 expand (other values)."""
    views = {"stepped": torch.stack([t, t], dim=-1)[..., 0]}
    if t.dim() >= 2:
        views["transposed"] = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if t.dim() == 5:
        views["channels_last"] = t.contiguous(memory_format=torch.channels_last_3d)
    views["expand"] = t[..., :1].expand(t.shape)
    return views


@needs_ext
@pytest.mark.parametrize("name", ["x", "weight", "bias", "norm_weight", "norm_bias", "scale", "shift",
                                  "cache", "residual"])
def test_cpp_non_contiguous_inputs(name):
    x, w, b, kw = make_case(1, 6, 4, 3, 4, 5, groups=3, modulation=True, cache=True, residual=True, seed=4)
    args = dict(kw, x=x, weight=w, bias=b)
    for kind, view in noncontig_views(args[name]).items():
        assert not view.is_contiguous(), kind
        yv, cv = vae_conv3d(**dict(args, **{name: view}), backend="cpp")
        yc, cc = vae_conv3d(**dict(args, **{name: view.contiguous()}), backend="cpp")
        assert torch.equal(yv, yc) and torch.equal(cv, cc), f"{name} {kind}"
        assert torch.isfinite(yv).all()


def run_chunked(x, w, b, lengths, backend, **kw):
    outs, cache, t0 = [], None, 0
    for n in lengths:
        y, cache = vae_conv3d(x[:, :, t0:t0 + n], w, b, cache=cache, backend=backend, **kw)
        outs.append(y)
        t0 += n
    return torch.cat(outs, dim=2), cache


@needs_ext
@pytest.mark.parametrize("lengths", [(1, 1, 1, 1, 1), (3, 2), (2, 1, 2)])
def test_cpp_chunked_equals_whole(lengths):
    """Without GroupNorm (whose statistics depend on the chunk), streaming with the cache is exact."""
    x, w, b, _ = make_case(1, 5, 4, 5, 4, 6, seed=5)
    for silu in (False, True):
        whole, whole_cache = vae_conv3d(x, w, b, silu=silu, backend="cpp")
        chunked, chunk_cache = run_chunked(x, w, b, lengths, "cpp", silu=silu)
        assert torch.equal(whole, chunked) and torch.equal(whole_cache, chunk_cache)


@needs_ext
def test_cpp_is_what_auto_picks_on_cpu(monkeypatch):
    monkeypatch.delenv("COGVIDEOX_KERNELS_BACKEND", raising=False)
    import cogvideox_kernels.ops.vae_conv.native as native

    calls = []
    real = native._vae_conv3d_op
    monkeypatch.setattr(native, "_vae_conv3d_op", lambda *a: calls.append(a) or real(*a))
    x, w, b, kw = make_case(1, 4, 4, 2, 3, 3, groups=2, seed=6)
    check(x, w, b, kw, "auto")
    assert len(calls) == 1 and calls[0][14] == "cpp"  # (the backend argument)


def test_bad_inputs_raise():
    x, w, b, kw = make_case(1, 6, 4, 3, 4, 5, groups=3, cache=True, residual=True, seed=7)
    bad = [
        (dict(weight=w[:, :5]), "C_in=5"),
        (dict(weight=w[..., :2]), "odd kh, kw"),
        (dict(bias=b[:3]), "bias must have shape"),
        (dict(num_groups=4), "num_groups=4 must divide"),
        (dict(num_groups=0), "need num_groups > 0"),
        (dict(scale=x), "scale and shift"),
        (dict(cache=kw["cache"][:, :, :1]), "cache must have shape"),
        (dict(residual=kw["residual"][:, :3]), "residual must have shape"),
        (dict(pad_mode="first"), "pad_mode='first'"),
        (dict(norm_weight=kw["norm_weight"].double()), "norm_weight has dtype"),
        (dict(eps=0.0), "eps must be"),
        (dict(silu=1), "silu must be a bool"),
    ]
    for change, match in bad:
        args = {**kw, "x": x, "weight": w, "bias": b, **change}
        with pytest.raises(ValueError, match=match):
            vae_conv3d(**args, backend="reference")
    with pytest.raises(ValueError, match="backend="):
        vae_conv3d(x, w, b, backend="triton", **kw)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='cuda' cannot run on cpu"):
            vae_conv3d(x, w, b, backend="cuda", **kw)


@needs_ext
def test_cuda_backend_refuses_uncovered_inputs():
    from cogvideox_kernels.ops.vae_conv.native import vae_conv3d_native

    x, w, b, kw = make_case(1, 6, 4, 3, 4, 5, seed=8)
    with pytest.raises(ValueError, match="needs cuda tensors"):
        vae_conv3d_native(x, w, b, backend="cuda", **kw)


@needs_ext
def test_cuda_entry_point_matches_build():
    """The CUDA entry point is compiled in exactly when the extension says it was built with CUDA;
    without a GPU it raises a clear error (no crash). On a GPU the gpu tests below run it."""
    if _ext.cuda_available() and torch.cuda.is_available():
        pytest.skip("a GPU is present: test_cuda_matches_reference runs the entry point")
    with pytest.raises(RuntimeError) as info:
        _ext._C.vae_conv3d_cuda({"x": 16, "weight": 16, "y": 16, "new_cache": 16, "act": 16},
                                dict(batch=1, c_in=16, c_out=1, frames=1, height=1, width=1, kt=3,
                                     kh=3, kw=3, pad_mode=0, groups=0, eps=1e-6, silu=False,
                                     splits=1), 3, 0, 0)
    assert ("built without CUDA" in str(info.value)) == (not _ext.cuda_available()), str(info.value)


class _Block(torch.nn.Module):
    def __init__(self, C, device, dtype):
        super().__init__()
        self.conv = torch.nn.Conv3d(C, C, 3, device=device, dtype=dtype)
        self.norm = torch.nn.GroupNorm(4, C, device=device, dtype=dtype)

    def forward(self, x, cache):
        y, new_cache = vae_conv3d(x, self.conv.weight, self.conv.bias, num_groups=4, norm_weight=self.norm.weight,
                                  norm_bias=self.norm.bias, silu=True, cache=cache, residual=x)
        return y * 2, new_cache


@needs_ext
def test_compile_fullgraph_cpu():
    torch._dynamo.reset()
    mod = _Block(8, "cpu", torch.float32)
    x, _, _, kw = make_case(1, 8, 8, 3, 4, 5, cache=True, seed=9)
    with torch.no_grad():
        eager = mod(x, kw["cache"])
        compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")(x, kw["cache"])
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


# ------------------------------------------------------------------------------------------------
# GPU: the CUDA kernel (bf16/fp16, kh = kw = 3, C_in % 16 == 0)
# ------------------------------------------------------------------------------------------------
CUDA_CASES = [  # (B, C, C_out, T, H, W, kt, options): odd sizes, partial tiles, C_out not a multiple of 128
    (1, 16, 8, 1, 5, 7, 3, dict(groups=4)),
    (2, 32, 136, 3, 17, 23, 3, dict(groups=8, residual=True)),
    (1, 48, 64, 2, 33, 18, 3, dict(groups=3, modulation=True, cache=True)),
    (1, 64, 128, 5, 16, 32, 3, dict(silu=False, cache=True, residual=True)),
    (1, 32, 32, 4, 9, 40, 2, dict(groups=32, bias=False)),
    (1, 128, 256, 3, 20, 30, 3, dict(groups=32, residual=True, offset=20.0)),
]


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(CUDA_CASES)))
def test_cuda_matches_reference(case, dtype):
    B, C, Co, T, H, W, kt, opts = CUDA_CASES[case]
    x, w, b, kw = make_case(B, C, Co, T, H, W, (kt, 3, 3), dtype=dtype, device="cuda", seed=20 + case, **opts)
    for pad_mode in ("replicate", "zeros"):
        from cogvideox_kernels.ops.vae_conv.native import vae_conv3d_native

        y, c = vae_conv3d_native(x, w, b, backend="cuda", pad_mode=pad_mode, **kw)
        ref, ref_cache = vae_conv3d_reference(x, w, b, compute_dtype=torch.float64, pad_mode=pad_mode, **kw)
        err = rel_err(y, ref)
        own, _ = diffusers_sequence(x, w, b, pad_mode=pad_mode, **kw)
        assert err <= BUDGET[dtype] and err <= 2 * rel_err(own, ref) + 1e-6, \
            f"rel err {err:.2e}, torch's own {rel_err(own, ref):.2e}"
        if c.numel():
            assert rel_err(c, ref_cache) <= CACHE_BUDGET[dtype]


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_matches_cpp():
    x, w, b, kw = make_case(1, 32, 48, 3, 10, 12, dtype=torch.bfloat16, groups=8, modulation=True,
                            cache=True, residual=True, seed=30)
    y_cpu, c_cpu = vae_conv3d(x, w, b, backend="cpp", **kw)
    to = lambda t: t.cuda() if torch.is_tensor(t) else t  # noqa: E731
    y_gpu, c_gpu = vae_conv3d(to(x), to(w), to(b), backend="cuda", **{k: to(v) for k, v in kw.items()})
    assert rel_err(y_gpu.cpu(), y_cpu) < 5e-3 and rel_err(c_gpu.cpu(), c_cpu) < 5e-3


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("name", ["x", "weight", "scale", "cache", "residual"])
def test_cuda_non_contiguous_inputs(name):
    x, w, b, kw = make_case(1, 32, 32, 3, 8, 16, dtype=torch.bfloat16, device="cuda", groups=8,
                            modulation=True, cache=True, residual=True, seed=31)
    args = dict(kw, x=x, weight=w, bias=b)
    ref = vae_conv3d(**{k: v for k, v in args.items()}, backend="cuda")
    args[name] = noncontig_views(args[name])["stepped"]
    out = vae_conv3d(**args, backend="cuda")
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("lengths", [(1, 1, 1, 1), (3, 1), (2, 2)])
def test_cuda_chunked_equals_whole(lengths):
    x, w, b, _ = make_case(1, 32, 32, 4, 12, 20, dtype=torch.bfloat16, device="cuda", seed=32)
    whole, whole_cache = vae_conv3d(x, w, b, silu=True, backend="cuda")
    chunked, chunk_cache = run_chunked(x, w, b, lengths, "cuda", silu=True)
    assert torch.equal(whole, chunked) and torch.equal(whole_cache, chunk_cache)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_real_shape_512():
    x, w, b, kw = make_case(1, 512, 512, 6, 60, 90, dtype=torch.bfloat16, device="cuda", groups=32,
                            residual=True, seed=33)
    check(x, w, b, kw, "cuda")


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_compile_fullgraph():
    torch._dynamo.reset()
    mod = _Block(32, "cuda", torch.bfloat16)
    x, _, _, kw = make_case(1, 32, 32, 3, 16, 24, dtype=torch.bfloat16, device="cuda", cache=True, seed=34)
    with torch.no_grad():
        eager = mod(x, kw["cache"])
        compiled = torch.compile(mod, fullgraph=True)(x, kw["cache"])
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_uses_current_stream():
    x, w, b, kw = make_case(1, 128, 128, 6, 96, 96, dtype=torch.bfloat16, device="cuda", groups=32, seed=35)
    ref, _ = vae_conv3d(x, w, b, backend="cuda", **kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y, _ = vae_conv3d(x, w, b, backend="cuda", **kw)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(y, ref)


# ------------------------------------------------------------------------------------------------
# norm_coef: GroupNorm statistics of a whole frame batch, the batch run in frame chunks
# ------------------------------------------------------------------------------------------------
from cogvideox_kernels.ops.vae_conv import group_norm_coef_reference, vae_group_norm_coef  # noqa: E402


def run_coef_chunked(x, w, b, kw, lengths, backend):
    """The batch in frame chunks chained by the cache, with the statistics of the whole batch."""
    groups, nw, nb = kw["num_groups"], kw.get("norm_weight"), kw.get("norm_bias")
    coef = vae_group_norm_coef(x, groups, nw, nb, backend="auto" if backend == "cuda" else "reference")
    per_frame = {k: kw[k] for k in ("scale", "shift", "residual") if k in kw}
    outs, cache, t0 = [], kw.get("cache"), 0
    for n in lengths:
        part = {k: v[:, :, t0:t0 + n] for k, v in per_frame.items()}
        y, cache = vae_conv3d(x[:, :, t0:t0 + n], w, b, norm_coef=coef, silu=kw["silu"], cache=cache,
                              backend=backend, **part)
        outs.append(y)
        t0 += n
    return torch.cat(outs, dim=2), cache


@pytest.mark.parametrize("layout", ["contiguous", "stepped"])
def test_group_norm_coef_is_group_norm(layout):
    g = torch.Generator().manual_seed(40)
    x = torch.randn(2, 12, 3, 5, 14, generator=g) * 3 + 7  # |mean| >> std: the statistics must hold
    x = x if layout == "contiguous" else x[..., ::2]
    nw, nb = torch.randn(12, generator=g), torch.randn(12, generator=g)
    coef = vae_group_norm_coef(x, 4, nw, nb, eps=1e-6)
    assert coef.shape == (2, 12, 2) and coef.dtype == torch.float32
    ours = x.double() * coef[..., 0, None, None, None].double() + coef[..., 1, None, None, None].double()
    ref = torch.nn.functional.group_norm(x.double(), 4, nw.double(), nb.double(), 1e-6)
    assert rel_err(ours, ref) < 1e-6


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if _ext.extension_available() else []))
@pytest.mark.parametrize("lengths", [(1, 1, 1, 1, 1), (3, 2), (2, 1, 2)])
def test_norm_coef_chunks_equal_whole_batch(backend, lengths):
    """A frame batch run in chunks with the whole batch's coefficients equals the batch in one call
    (GroupNorm over the batch), with modulation, cache and residual chunked alike."""
    for dtype, budget in ((torch.float64, 1e-7), (torch.float32, 2e-6)):  # (coefficients are float32)
        x, w, b, kw = make_case(2, 8, 6, 5, 4, 7, dtype=dtype, groups=4, modulation=True, cache=True,
                                residual=True, seed=41)
        whole, whole_cache = vae_conv3d(x, w, b, backend=backend, **kw)
        chunked, chunk_cache = run_coef_chunked(x, w, b, kw, lengths, backend)
        assert rel_err(chunked, whole) <= budget and rel_err(chunk_cache, whole_cache) <= budget


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if _ext.extension_available() else []))
def test_norm_coef_non_contiguous(backend):
    x, w, b, kw = make_case(1, 8, 4, 3, 5, 6, groups=2, modulation=True, seed=42)
    coef = vae_group_norm_coef(x, 2, kw["norm_weight"], kw["norm_bias"])
    args = dict(silu=True, scale=kw["scale"], shift=kw["shift"])
    ref = vae_conv3d(x, w, b, norm_coef=coef, backend=backend, **args)
    stepped = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(43))[..., ::2].copy_(coef)
    assert not stepped.is_contiguous()
    out = vae_conv3d(x, w, b, norm_coef=stepped, backend=backend, **args)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_norm_coef_bad_inputs_raise():
    x, w, b, kw = make_case(1, 8, 4, 3, 4, 5, groups=2, seed=44)
    coef = vae_group_norm_coef(x, 2)
    for change, match in [(dict(norm_coef=coef.double()), "norm_coef"), (dict(norm_coef=coef[:, :4]), "norm_coef"),
                          (dict(norm_coef=coef, num_groups=2), "num_groups=0"),
                          (dict(norm_coef=coef, norm_weight=kw["norm_weight"]), "norm_weight")]:
        with pytest.raises(ValueError, match=match):
            vae_conv3d(x, w, b, backend="reference", **change)
    with pytest.raises(ValueError, match="num_groups"):
        vae_group_norm_coef(x, 3)
    with pytest.raises(ValueError, match="norm_weight"):
        vae_group_norm_coef(x, 2, kw["norm_weight"][:3])
    if not _ext.cuda_available():
        with pytest.raises(ValueError, match="backend='cuda'"):
            vae_group_norm_coef(x, 2, backend="cuda")


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("offset", [0.5, 20.0])
def test_cuda_group_norm_coef_matches_reference(offset):
    x, _, _, kw = make_case(2, 64, 8, 5, 30, 46, dtype=torch.bfloat16, device="cuda", groups=32, offset=offset,
                            seed=45)
    ours = vae_group_norm_coef(x, 32, kw["norm_weight"], kw["norm_bias"], backend="cuda")
    ref = group_norm_coef_reference(x, 32, kw["norm_weight"], kw["norm_bias"])
    assert rel_err(ours, ref) < 1e-5
    view = x[..., ::2]  # a stepped view: the statistics of what it shows
    ours = vae_group_norm_coef(view, 32, kw["norm_weight"], kw["norm_bias"], backend="cuda")
    assert rel_err(ours, group_norm_coef_reference(view, 32, kw["norm_weight"], kw["norm_bias"])) < 1e-5


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("lengths", [(1, 1, 1, 1, 1), (3, 2)])
def test_cuda_norm_coef_chunks_equal_whole_batch(lengths):
    x, w, b, kw = make_case(1, 128, 128, 5, 24, 40, dtype=torch.bfloat16, device="cuda", groups=32,
                            modulation=True, cache=True, residual=True, seed=46)
    whole, whole_cache = vae_conv3d(x, w, b, backend="cuda", **kw)
    chunked, chunk_cache = run_coef_chunked(x, w, b, kw, lengths, "cuda")
    # same coefficients up to float32 rounding (two reductions), the rest identical
    assert rel_err(chunked, whole) < 2e-3 and rel_err(chunk_cache, whole_cache) < 2e-3
    ref, _ = vae_conv3d_reference(x, w, b, compute_dtype=torch.float64, **kw)
    assert rel_err(chunked, ref) <= 1.1 * rel_err(whole, ref) + 1e-4


# ------------------------------------------------------------------------------------------------
# Frame slices read and written in place, ``out``
# ------------------------------------------------------------------------------------------------
def test_frames_of_tells_frame_slices():
    from cogvideox_kernels.ops.vae_conv.native import frames_of

    t = torch.randn(2, 4, 7, 3, 5)
    assert frames_of(t) == 0 and frames_of(t[:, :, 2:5]) == 7
    assert frames_of(t[..., ::2]) == -1 and frames_of(t.transpose(1, 2)) == -1
    assert frames_of(t[:, :2, 2:5]) == -1  # a channel range too: not one frame range of [B, C, tc, H, W]


def _frame_slice_case(device="cpu", dtype=torch.float32, seed=47):
    """Inputs of one call as frames 2..4 of 7-frame tensors (x, scale, shift, residual), out likewise."""
    x, w, b, kw = make_case(2, 16, 16, 7, 6, 8, device=device, dtype=dtype, modulation=True, cache=True,
                            residual=True, seed=seed)
    coef = vae_group_norm_coef(x, 4, backend="reference").to(device)
    kw = dict(kw, norm_coef=coef, num_groups=0)
    part = {k: kw[k][:, :, 2:5] for k in ("scale", "shift", "residual")}
    return x, w, b, dict(kw, **part), x[:, :, 2:5]


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if _ext.extension_available() else []))
def test_frame_slices_in_place_equal_contiguous(backend):
    x, w, b, kw, xs = _frame_slice_case()
    ref, ref_cache = vae_conv3d(xs.contiguous(), w, b, backend=backend,
                                **{k: (v.contiguous() if torch.is_tensor(v) and v.dim() == 5 else v)
                                   for k, v in kw.items()})
    container = torch.full((2, 16, 7, 6, 8), float("nan"))
    y, cache = vae_conv3d(xs, w, b, backend=backend, out=container[:, :, 2:5], **kw)
    assert y.data_ptr() == container[:, :, 2:5].data_ptr()
    assert torch.equal(container[:, :, 2:5], ref) and torch.equal(cache, ref_cache)
    assert container[:, :, :2].isnan().all() and container[:, :, 5:].isnan().all()  # nothing else written
    stepped = torch.full((2, 16, 3, 6, 16), float("nan"))[..., ::2]  # not a frame range: written through a copy
    y2, _ = vae_conv3d(xs, w, b, backend=backend, out=stepped, **kw)
    assert y2 is stepped and torch.equal(stepped, ref)


def test_out_bad_shape_raises():
    x, w, b, kw, xs = _frame_slice_case()
    with pytest.raises(ValueError, match="out"):
        vae_conv3d(xs, w, b, backend="reference", out=torch.empty(2, 16, 2, 6, 8), **kw)
    with pytest.raises(ValueError, match="out"):
        vae_conv3d(xs, w, b, backend="reference", out=torch.empty(2, 16, 3, 6, 8, dtype=torch.float64), **kw)


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_frame_slices_in_place_equal_contiguous():
    x, w, b, kw, xs = _frame_slice_case("cuda", torch.bfloat16)
    contiguous = {k: (v.contiguous() if torch.is_tensor(v) and v.dim() == 5 else v) for k, v in kw.items()}
    ref, ref_cache = vae_conv3d(xs.contiguous(), w, b, backend="cuda", **contiguous)
    container = torch.full((2, 16, 7, 6, 8), float("nan"), device="cuda", dtype=torch.bfloat16)
    y, cache = vae_conv3d(xs, w, b, backend="cuda", out=container[:, :, 2:5], **kw)
    assert torch.equal(container[:, :, 2:5], ref) and torch.equal(cache, ref_cache)
    assert container[:, :, :2].isnan().all() and container[:, :, 5:].isnan().all()
    exact, _ = vae_conv3d_reference(xs, w, b, compute_dtype=torch.float64, **kw)
    assert rel_err(y, exact) < 1e-2


# ------------------------------------------------------------------------------------------------
# Packed weights of the CUDA kernel, cached per weight version (native.PACKED)
# ------------------------------------------------------------------------------------------------
def test_packed_weight_cache_reuses_and_invalidates():
    from cogvideox_kernels.ops.vae_conv import native

    conv = torch.nn.Conv3d(32, 24, 3)
    w = conv.weight
    native.PACKED.clear()
    before = native.PACKED.quantizations
    first = native.packed_weight(w)
    assert torch.equal(first, native.pack_weight(w.detach())) and not first.requires_grad
    assert native.packed_weight(w) is first and native.PACKED.quantizations == before + 1  # reused
    with torch.no_grad():
        w.add_(0.25)  # in place (fuse_lora's ``weight += delta``, copy_, load_state_dict): version bumped
    second = native.packed_weight(w)
    assert second is not first and torch.equal(second, native.pack_weight(w.detach()))
    assert not torch.equal(second, first)
    conv.weight.data = torch.randn(24, 32, 3, 3, 3)  # a .data swap (offload onload, LoRA fuse): new storage
    third = native.packed_weight(conv.weight)
    assert torch.equal(third, native.pack_weight(conv.weight.detach())) and not torch.equal(third, second)
    view = torch.randn(24, 64, 3, 3, 3)[:, ::2]  # same storage, another view: not the same entry
    assert torch.equal(native.packed_weight(view), native.pack_weight(view))
    n = len(native.PACKED)
    del view
    assert len(native.PACKED) == n - 1  # an entry dies with its weight's storage
    assert native.cuda_tensors(torch.randn(1, 32, 2, 4, 4), conv.weight)["weight"] is third  # what launches use


def test_packed_weight_cache_equals_uncached_per_call():
    """The cached packing is the one the kernel used per call before: equal for every kt the kernel takes
    and for half dtypes."""
    from cogvideox_kernels.ops.vae_conv import native

    for kt, dtype in ((1, torch.float32), (3, torch.bfloat16), (5, torch.float16)):
        w = torch.randn(8, 48, kt, 3, 3).to(dtype)
        assert torch.equal(native.packed_weight(w), native.pack_weight(w))
        assert native.packed_weight(w).is_contiguous()


# ------------------------------------------------------------------------------------------------
# The spatial norm's modulation from zq (conv_y / conv_b per element, no full-size scale / shift)
# ------------------------------------------------------------------------------------------------
from cogvideox_kernels.ops.vae_conv import modulation_from_zq, spatial_norm_index  # noqa: E402


def zq_case(B, C, T, H, W, zq_size, *, Kz=4, dtype=torch.float32, device="cpu", bias=True, seed=0):
    """zq [B, Kz, *zq_size] and the (1,1,1) convs' weights [C, Kz, 1, 1, 1] / biases (fresh, seeded)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    mod = dict(zq=rnd(B, Kz, *zq_size), scale_weight=rnd(C, Kz, 1, 1, 1) * 0.5,
               shift_weight=rnd(C, Kz, 1, 1, 1) * 0.5)
    if bias:
        mod.update(scale_bias=rnd(C) * 0.3 + 1, shift_bias=rnd(C) * 0.3)
    return mod


def diffusers_resize(zq, size):
    """diffusers' CogVideoXSpatialNorm3D resizing (first frame apart for odd T > 1), by F.interpolate."""
    T = size[0]
    if T > 1 and T % 2 == 1:
        first = torch.nn.functional.interpolate(zq[:, :, :1], size=(1, *size[1:]))
        rest = torch.nn.functional.interpolate(zq[:, :, 1:], size=(T - 1, *size[1:]))
        return torch.cat([first, rest], dim=2)
    return torch.nn.functional.interpolate(zq, size=tuple(size))


ZQ_SIZES = [  # (x's T, H, W), zq's (Tz, Hz, Wz): odd T (split), even T, 2x / non-integer / shrinking ratios
    ((3, 6, 7), (3, 3, 4)), ((2, 5, 8), (2, 5, 4)), ((1, 4, 4), (1, 2, 2)), ((5, 6, 5), (3, 4, 7)),
    ((4, 9, 3), (2, 3, 3)),
]


@pytest.mark.parametrize("sizes", range(len(ZQ_SIZES)))
def test_spatial_norm_index_is_diffusers_resizing(sizes):
    size, zq_size = ZQ_SIZES[sizes]
    zq = torch.randn(1, 2, *zq_size, dtype=torch.float64)
    idx = spatial_norm_index(zq_size, size).long()
    T, H, W = size
    assert torch.equal(zq[:, :, idx[:T]][:, :, :, idx[T:T + H]][..., idx[T + H:]], diffusers_resize(zq, size))


def test_spatial_norm_index_on_keeps_one_device_copy_per_index():
    """The ops read zq_index from a kept device copy (no host -> device copy per conv call, which would queue behind
    the host-cache loads on the copy engine): equal indices share it, other indices get their own, and an index
    already on the device is used as it is."""
    from cogvideox_kernels.ops.vae_conv.reference import spatial_norm_index_on

    idx = spatial_norm_index((3, 3, 4), (5, 6, 7))
    other = spatial_norm_index((3, 3, 4), (5, 6, 8))
    kept = spatial_norm_index_on(idx, "meta")
    assert kept.device.type == "meta" and kept.shape == idx.shape and kept.dtype == idx.dtype
    assert spatial_norm_index_on(idx.clone(), "meta") is kept  # (same values, another tensor)
    strided = torch.stack((idx, idx), dim=1)[:, 0]  # (same values, a stepped view)
    assert not strided.is_contiguous() and spatial_norm_index_on(strided, "meta") is kept
    assert spatial_norm_index_on(other, "meta") is not kept
    assert spatial_norm_index_on(idx, "cpu") is idx
    if torch.cuda.is_available():
        on = spatial_norm_index_on(idx, "cuda")
        assert on.is_cuda and torch.equal(on.cpu(), idx) and spatial_norm_index_on(idx, "cuda") is on


@pytest.mark.parametrize("sizes", range(len(ZQ_SIZES)))
def test_reference_modulation_from_zq_is_diffusers_spatial_norm(sizes):
    """scale / shift = conv_y / conv_b (Conv3d (1,1,1)) of diffusers' resized zq; the op with zq equals the
    op with those tensors as scale / shift (float64: exactly the same function)."""
    size, zq_size = ZQ_SIZES[sizes]
    x, w, b, kw = make_case(2, 8, 6, *size, dtype=torch.float64, groups=4, residual=True, seed=60 + sizes)
    mod = zq_case(2, 8, *size, zq_size, dtype=torch.float64, seed=70 + sizes)
    z = diffusers_resize(mod["zq"], size)
    scale = torch.nn.functional.conv3d(z, mod["scale_weight"], mod["scale_bias"])
    shift = torch.nn.functional.conv3d(z, mod["shift_weight"], mod["shift_bias"])
    got = modulation_from_zq(x, **mod, compute_dtype=torch.float64)
    assert rel_err(got[0], scale) < 1e-14 and rel_err(got[1], shift) < 1e-14
    for pad_mode in ("replicate", "zeros"):
        y, c = vae_conv3d_reference(x, w, b, pad_mode=pad_mode, **kw, **mod)
        ys, cs = vae_conv3d_reference(x, w, b, pad_mode=pad_mode, scale=scale, shift=shift, **kw)
        assert rel_err(y, ys) < 1e-13 and rel_err(c, cs) < 1e-13


def test_reference_modulation_rounds_like_diffusers_convs():
    """In bf16 the conv outputs are rounded to bf16 (diffusers' conv_y / conv_b return bf16 tensors)."""
    x, _, _, _ = make_case(1, 8, 8, 2, 4, 4, dtype=torch.bfloat16, seed=80)
    mod = zq_case(1, 8, 2, 4, 4, (2, 2, 2), dtype=torch.bfloat16, seed=81)
    scale, shift = modulation_from_zq(x, **mod, compute_dtype=torch.float64)
    assert scale.dtype == shift.dtype == torch.bfloat16
    exact, _ = modulation_from_zq(x.double(), **{k: v.double() for k, v in mod.items()}, compute_dtype=torch.float64)
    assert torch.equal(scale, exact.to(torch.bfloat16))


ZQ_CPP_CASES = [  # (B, C, C_out, (T, H, W), zq size, Kz, options)
    (2, 8, 6, (3, 6, 7), (3, 3, 4), 4, dict(groups=4, residual=True)),
    (1, 16, 8, (2, 5, 8), (2, 5, 4), 16, dict(groups=4, cache=True)),
    (1, 6, 5, (1, 3, 4), (1, 2, 2), 3, dict(groups=3, affine=False)),
    (1, 16, 16, (5, 6, 5), (3, 4, 7), 16, dict(groups=8, cache=True, residual=True, silu=False)),
]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(ZQ_CPP_CASES)))
def test_cpp_modulation_from_zq_matches_reference(case, dtype):
    B, C, Co, size, zq_size, Kz, opts = ZQ_CPP_CASES[case]
    x, w, b, kw = make_case(B, C, Co, *size, dtype=dtype, seed=90 + case, **opts)
    mod = zq_case(B, C, *size, zq_size, Kz=Kz, dtype=dtype, bias=case != 2, seed=95 + case)
    for pad_mode in ("replicate", "zeros"):
        y, _ = check(x, w, b, kw, "cpp", pad_mode=pad_mode, **mod)
        # the same as the op given scale / shift formed first (in fp32: within accumulation-order noise)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        scale, shift = modulation_from_zq(x, **mod, compute_dtype=work)
        y2, _ = vae_conv3d(x, w, b, backend="cpp", pad_mode=pad_mode, scale=scale, shift=shift, **kw)
        budget = {torch.float64: 1e-13, torch.float32: 1e-6}.get(dtype, 1e-2)
        assert rel_err(y, y2) <= budget


@needs_ext
@pytest.mark.parametrize("name", ["zq", "zq_index", "scale_weight", "shift_bias", "x"])
def test_cpp_modulation_non_contiguous_inputs(name):
    x, w, b, kw = make_case(1, 8, 4, 3, 6, 7, groups=4, cache=True, seed=100)
    mod = zq_case(1, 8, 3, 6, 7, (3, 3, 4), seed=101)
    mod["zq_index"] = spatial_norm_index((3, 3, 4), (3, 6, 7))
    ref, ref_cache = vae_conv3d(x, w, b, backend="cpp", **kw, **mod)
    args = dict(mod, x=x)
    t = args[name]
    if name == "zq_index":
        view = torch.stack((t, t), dim=1)[:, 0]
    elif name == "shift_bias":
        view = torch.stack((t, t), dim=1)[:, 1]
    elif name == "scale_weight":
        view = t.reshape(8, 4).t().contiguous().t()  # transposed storage, [C, Kz]
    else:
        view = t.transpose(3, 4).contiguous().transpose(3, 4)  # transposed storage
    assert not view.is_contiguous() and torch.equal(view, t.reshape(view.shape))
    args[name] = view
    y, cache = vae_conv3d(args.pop("x"), w, b, backend="cpp", **kw, **args)
    assert torch.equal(y, ref) and torch.equal(cache, ref_cache)


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if _ext.extension_available() else []))
def test_modulation_from_zq_in_frame_chunks_equals_whole_batch(backend):
    """Frame chunks with the batch's norm_coef and the frame part of the batch's zq_index: the batch."""
    from cogvideox_kernels.ops.vae_conv import vae_group_norm_coef

    x, w, b, kw = make_case(1, 8, 6, 5, 6, 7, groups=4, seed=110)
    mod = zq_case(1, 8, 5, 6, 7, (3, 3, 4), seed=111)
    whole, whole_cache = vae_conv3d(x, w, b, backend=backend, **kw, **mod)
    coef = vae_group_norm_coef(x, 4, kw["norm_weight"], kw["norm_bias"], backend="reference")
    idx = spatial_norm_index((3, 3, 4), (5, 6, 7))
    out, cache = torch.full_like(whole, float("nan")), None
    for t0, t1 in ((0, 2), (2, 3), (3, 5)):
        part_idx = torch.cat((idx[t0:t1], idx[5:]))
        _, cache = vae_conv3d(x[:, :, t0:t1], w, b, backend=backend, silu=True, norm_coef=coef, cache=cache,
                              out=out[:, :, t0:t1], zq_index=part_idx, **mod)
    assert rel_err(out, whole) <= 1e-6 and rel_err(cache, whole_cache) <= 1e-6


def test_modulation_bad_inputs_raise():
    x, w, b, kw = make_case(1, 8, 4, 3, 6, 7, groups=4, seed=120)
    mod = zq_case(1, 8, 3, 6, 7, (3, 3, 4), seed=121)
    cases = [
        (dict(mod, scale=torch.randn(1, 8, 3, 6, 7), shift=torch.randn(1, 8, 3, 6, 7)), "not both"),
        ({k: v for k, v in mod.items() if k != "shift_weight"}, "shift_weight is needed"),
        (dict(mod, scale_weight=torch.randn(8, 5, 1, 1, 1)), "scale_weight must be"),
        (dict(mod, shift_bias=torch.randn(7)), "shift_bias must have shape"),
        (dict(mod, zq=mod["zq"].double()), "zq has dtype"),
        (dict(mod, zq=torch.randn(2, 4, 3, 3, 4)), "zq must be"),
        (dict(mod, zq_index=torch.zeros(16, dtype=torch.int64)), "zq_index has dtype"),
        (dict(mod, zq_index=torch.zeros(15, dtype=torch.int32)), "zq_index must have shape"),
        (dict(mod, zq_index=spatial_norm_index((3, 3, 4), (3, 6, 7)).index_fill(0, torch.tensor([3]), 3)),
         "row index is outside"),
        ({"scale_weight": mod["scale_weight"]}, "come with zq"),
    ]
    for extra, match in cases:
        with pytest.raises(ValueError, match=match):
            vae_conv3d(x, w, b, backend="reference", **kw, **extra)
    with pytest.raises(ValueError, match="need num_groups > 0 or norm_coef"):
        vae_conv3d(x, w, b, backend="reference", **mod)
    with pytest.raises(ValueError, match="odd T=3"):
        spatial_norm_index((1, 3, 4), (3, 6, 7))


@needs_ext
def test_compile_fullgraph_cpu_with_zq():
    torch._dynamo.reset()
    x, w, b, kw = make_case(1, 8, 8, 3, 4, 5, groups=4, cache=True, seed=130)
    mod = zq_case(1, 8, 3, 4, 5, (3, 2, 3), seed=131)
    mod["zq_index"] = spatial_norm_index((3, 2, 3), (3, 4, 5))
    fn = lambda x, zq: vae_conv3d(x, w, b, **kw, **dict(mod, zq=zq))  # noqa: E731
    eager = fn(x, mod["zq"])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, mod["zq"])
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


def kernel_modulation(x, zq, zq_index, scale_weight, scale_bias=None, shift_weight=None, shift_bias=None):
    """(scale, shift) exactly as the CUDA kernel forms them: float32 sums over zq's channels k ascending from 0
    (a product of two bf16 / fp16 values is exact in float32, so ``m + w * z`` is the kernel's fmaf), the bias
    last, rounded to x's dtype; then gathered to x's size by the index."""
    B, C, T, H, W = x.shape
    z = zq.float()
    out = []
    for w, bias in ((scale_weight, scale_bias), (shift_weight, shift_bias)):
        w = w.reshape(C, -1).float()
        m = torch.zeros((B, C, *zq.shape[2:]), dtype=torch.float32, device=x.device)
        for k in range(w.shape[1]):
            m = m + w[:, k, None, None, None] * z[:, k:k + 1]
        if bias is not None:
            m = m + bias.float()[:, None, None, None]
        out.append(m.to(x.dtype))
    idx = zq_index.to(x.device).long()
    return tuple(m[:, :, idx[:T]][:, :, :, idx[T:T + H]][..., idx[T + H:]].contiguous() for m in out)


FUSED_CUDA_CASES = [  # (B, C, C_out, (T, H, W), zq size, zq channels): the scalar pass (H*W % 8 != 0), the
    # 16-byte pass at 2x, non-integer and 8x ratios, 4 / 16 / 24 zq channels, odd T with a one-frame-apart index
    (1, 16, 8, (3, 6, 7), (3, 3, 4), 4), (2, 32, 136, (2, 16, 24), (2, 8, 12), 16),
    (1, 128, 128, (5, 40, 60), (3, 10, 15), 16), (1, 32, 16, (3, 8, 12), (2, 4, 6), 4),
    (1, 16, 8, (2, 5, 8), (2, 5, 4), 24), (1, 32, 16, (3, 10, 12), (2, 4, 5), 16),
    (1, 128, 64, (5, 40, 64), (2, 5, 8), 16),
]


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(FUSED_CUDA_CASES)))
def test_cuda_fused_modulation_matches_unfused(case, dtype, monkeypatch):
    """The CUDA activation pass gathering scale / shift from its table of zq's (1,1,1) convs
    (COGVIDEOX_KERNELS_VAE_FUSED_MODULATION_CUDA=1): bit-identical to the unfused kernel given the same
    scale / shift tensors (formed as the kernel forms them), within the budgets of the float64 reference,
    close to the unfused path with scale / shift from modulation_from_zq; zq non-contiguous; one-frame
    chunks with the batch's coefficients and the index's frame part."""
    from cogvideox_kernels.ops.vae_conv import native

    B, C, Co, size, zq_size, Kz = FUSED_CUDA_CASES[case]
    x, w, b, kw = make_case(B, C, Co, *size, device="cuda", dtype=dtype, groups=min(C // 4, 32), cache=True,
                            residual=True, seed=140 + case)
    mod = zq_case(B, C, *size, zq_size, Kz=Kz, device="cuda", dtype=dtype, seed=150 + case)
    monkeypatch.setenv(native.FUSED_MODULATION_CUDA_ENV, "0")
    unfused, unfused_cache = vae_conv3d(x, w, b, backend="cuda", **kw, **mod)
    monkeypatch.setenv(native.FUSED_MODULATION_CUDA_ENV, "1")
    assert native.fused_modulation_cuda()
    fused, fused_cache = check(x, w, b, kw, "cuda", **mod)
    assert rel_err(fused, unfused) <= 2e-3 and rel_err(fused_cache, unfused_cache) <= 2e-3
    idx = spatial_norm_index(zq_size, size)
    scale, shift = kernel_modulation(x, zq_index=idx, **mod)
    same, same_cache = vae_conv3d(x, w, b, backend="cuda", scale=scale, shift=shift, **kw)
    assert torch.equal(fused, same) and torch.equal(fused_cache, same_cache)
    zq = mod["zq"]
    nc_zq = zq.transpose(3, 4).contiguous().transpose(3, 4)
    assert not nc_zq.is_contiguous()
    got, got_cache = vae_conv3d(x, w, b, backend="cuda", **kw, **dict(mod, zq=nc_zq))
    assert torch.equal(got, fused) and torch.equal(got_cache, fused_cache)
    coef = vae_group_norm_coef(x, kw["num_groups"], kw["norm_weight"], kw["norm_bias"])
    out, cache, T = torch.full_like(fused, float("nan")), kw["cache"], size[0]
    for t0 in range(T):
        _, cache = vae_conv3d(x[:, :, t0:t0 + 1], w, b, backend="cuda", silu=True, norm_coef=coef, cache=cache,
                              residual=kw["residual"][:, :, t0:t0 + 1], out=out[:, :, t0:t0 + 1],
                              zq_index=torch.cat((idx[t0:t0 + 1], idx[T:])), **mod)
    assert rel_err(out, fused) <= 2e-3 and torch.isfinite(out).all()
