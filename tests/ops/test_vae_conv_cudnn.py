"""vae_conv3d backend "cudnn" (ops/vae_conv/cudnn_route.py: Triton activation pass + conv3d on channels_last_3d +
residual add): the reference's function for every option the C++ path's tests cover (the same cases: GroupNorm
statistics or norm_coef, scale / shift, the spatial norm's zq modulation, SiLU, cache / replicate / zeros, kt 1..5,
bias, residual, ``out``), float32 and bf16 under the Triton interpreter with NaN-poisoned outputs (conftest.py),
each tensor argument non-contiguous, torch.compile fullgraph; never picked by ``auto``; on a GPU: equal to the
CUDA kernel within bf16 noise at 256 channels."""
import pytest
import torch

import test_vae_conv as base  # (tests/ops: the C++ path's cases and helpers)
from cogvideox_kernels import _ext
from cogvideox_kernels.ops import registry
from cogvideox_kernels.ops.vae_conv import (spatial_norm_index, vae_conv3d, vae_conv3d_reference,
                                            vae_group_norm_coef)
from cogvideox_kernels.ops.vae_conv import cudnn_route

rel_err, make_case, check, zq_case = base.rel_err, base.make_case, base.check, base.zq_case
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", range(len(base.CPP_CASES)))
def test_cudnn_matches_reference(interpret, case, dtype):
    """Within the op's budgets of the float64 reference (bf16: also <= 2x torch's own sequence), new cache too,
    for both pad modes (the cases: B 1-2, odd C / C_out / H / W, T 1..5, k (3,3,3) / (2,1,3) / (1,5,5) / (5,3,3),
    GroupNorm with / without affine, scale / shift, cache, residual, no bias, no SiLU)."""
    B, C, Co, T, H, W, k, opts = base.CPP_CASES[case]
    x, w, b, kw = make_case(B, C, Co, T, H, W, k, dtype=dtype, seed=10 + case, **opts)
    for pad_mode in ("replicate", "zeros"):
        check(x, w, b, kw, "cudnn", pad_mode=pad_mode)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", range(len(base.ZQ_CPP_CASES)))
def test_cudnn_modulation_from_zq_matches_reference(interpret, case, dtype):
    """The spatial norm's modulation computed per element from zq (odd T split index, non-integer ratios, Kz 3-16,
    with / without biases): within budget of the reference, and (float32) equal within accumulation noise to the
    op given scale / shift formed first."""
    B, C, Co, size, zq_size, Kz, opts = base.ZQ_CPP_CASES[case]
    x, w, b, kw = make_case(B, C, Co, *size, dtype=dtype, seed=90 + case, **opts)
    mod = zq_case(B, C, *size, zq_size, Kz=Kz, dtype=dtype, bias=case != 2, seed=95 + case)
    for pad_mode in ("replicate", "zeros"):
        y, _ = check(x, w, b, kw, "cudnn", pad_mode=pad_mode, **mod)
        if dtype == torch.float32:
            scale, shift = base.modulation_from_zq(x, **mod)
            y2, _ = vae_conv3d(x, w, b, backend="cudnn", pad_mode=pad_mode, scale=scale, shift=shift, **kw)
            assert rel_err(y, y2) <= 1e-6


def test_cudnn_modulation_rounds_scale_and_shift(interpret):
    """bf16: scale / shift are rounded to bf16 before use (as diffusers' conv outputs and the CUDA kernel): the
    op with zq equals the op given the rounded tensors bit for bit in the activation (checked through the cache,
    which is the activation itself)."""
    x, w, b, kw = make_case(1, 16, 8, 3, 6, 7, dtype=torch.bfloat16, groups=4, seed=200)
    mod = zq_case(1, 16, 3, 6, 7, (3, 3, 4), Kz=4, dtype=torch.bfloat16, seed=201)
    idx = spatial_norm_index((3, 3, 4), (3, 6, 7))
    scale, shift = base.kernel_modulation(x, zq_index=idx, **mod)
    _, c1 = vae_conv3d(x, w, b, backend="cudnn", **kw, **mod)
    _, c2 = vae_conv3d(x, w, b, backend="cudnn", scale=scale, shift=shift, **kw)
    differ = (c1 != c2).float().mean().item()
    assert differ < 0.01, differ  # (a rare one-ulp difference where float32 sums order differently)


@pytest.mark.parametrize("name", ["x", "weight", "bias", "norm_weight", "norm_bias", "scale", "shift", "cache",
                                  "residual"])
def test_cudnn_non_contiguous_inputs(interpret, name):
    """Each tensor argument as a stepped slice, transposed, channels_last_3d or stride-0 expand view gives the
    result of its contiguous copy."""
    x, w, b, kw = make_case(1, 6, 4, 3, 4, 5, groups=3, modulation=True, cache=True, residual=True, seed=4)
    args = dict(kw, x=x, weight=w, bias=b)
    for kind, view in base.noncontig_views(args[name]).items():
        assert not view.is_contiguous(), kind
        yv, cv = vae_conv3d(**dict(args, **{name: view}), backend="cudnn")
        yc, cc = vae_conv3d(**dict(args, **{name: view.contiguous()}), backend="cudnn")
        assert rel_err(yv, yc) <= 1e-6 and rel_err(cv, cc) <= 1e-6, f"{name} {kind}"


@pytest.mark.parametrize("name", ["zq", "zq_index", "scale_weight", "shift_bias", "norm_coef"])
def test_cudnn_modulation_non_contiguous_inputs(interpret, name):
    x, w, b, kw = make_case(1, 8, 4, 3, 6, 7, groups=4, cache=True, seed=100)
    mod = zq_case(1, 8, 3, 6, 7, (3, 3, 4), seed=101)
    mod["zq_index"] = spatial_norm_index((3, 3, 4), (3, 6, 7))
    if name == "norm_coef":
        coef = vae_group_norm_coef(x, 4, kw.pop("norm_weight"), kw.pop("norm_bias"))
        kw = dict(kw, num_groups=0, norm_coef=coef)
    ref = vae_conv3d(x, w, b, backend="cudnn", **kw, **mod)
    args = dict(mod, norm_coef=kw.pop("norm_coef", None))
    t = args[name]
    if name in ("zq_index", "shift_bias"):
        view = torch.stack((t, t), dim=1)[:, 0]
    elif name == "scale_weight":
        view = t.reshape(8, 4).t().contiguous().t()
    elif name == "norm_coef":
        view = torch.stack((t, t), dim=-1)[..., 1]
    else:
        view = t.transpose(3, 4).contiguous().transpose(3, 4)
    assert not view.is_contiguous() and torch.equal(view, t.reshape(view.shape))
    args[name] = view
    out = vae_conv3d(x, w, b, backend="cudnn", **kw, **args)
    assert rel_err(out[0], ref[0]) <= 1e-6 and torch.equal(out[1], ref[1])


def test_cudnn_out_written_in_place(interpret):
    """``out`` as frames 2..4 of a 7-frame tensor: written there (nothing else), returned as y; a stepped
    ``out`` is written too; with and without residual."""
    x, w, b, kw, xs = base._frame_slice_case()
    for residual in (True, False):
        args = dict(kw) if residual else {k: v for k, v in kw.items() if k != "residual"}
        ref, ref_cache = vae_conv3d_reference(xs, w, b, compute_dtype=torch.float64, **args)
        container = torch.full((2, 16, 7, 6, 8), float("nan"))
        y, cache = vae_conv3d(xs, w, b, backend="cudnn", out=container[:, :, 2:5], **args)
        assert y.data_ptr() == container[:, :, 2:5].data_ptr()
        assert rel_err(container[:, :, 2:5], ref) <= 1e-5 and rel_err(cache, ref_cache) <= 1e-6
        assert container[:, :, :2].isnan().all() and container[:, :, 5:].isnan().all()
        stepped = torch.full((2, 16, 3, 6, 16), float("nan"))[..., ::2]
        y2, _ = vae_conv3d(xs, w, b, backend="cudnn", out=stepped, **args)
        assert y2 is stepped and rel_err(stepped, ref) <= 1e-5


@pytest.mark.parametrize("lengths", [(1, 1, 1, 1, 1), (3, 2)])
def test_cudnn_chunks_equal_whole(interpret, lengths):
    """Streaming with the cache: without GroupNorm chunked == whole; with the batch's norm_coef (modulation,
    cache, residual chunked alike) too, within float32 noise."""
    x, w, b, _ = make_case(1, 5, 4, 5, 4, 6, seed=5)
    whole, whole_cache = vae_conv3d(x, w, b, silu=True, backend="cudnn")
    chunked, chunk_cache = base.run_chunked(x, w, b, lengths, "cudnn", silu=True)
    assert rel_err(chunked, whole) <= 1e-6 and torch.equal(chunk_cache, whole_cache)
    x, w, b, kw = make_case(2, 8, 6, 5, 4, 7, groups=4, modulation=True, cache=True, residual=True, seed=41)
    whole, whole_cache = vae_conv3d(x, w, b, backend="cudnn", **kw)
    chunked, chunk_cache = base.run_coef_chunked(x, w, b, kw, lengths, "cudnn")
    assert rel_err(chunked, whole) <= 2e-6 and rel_err(chunk_cache, whole_cache) <= 2e-6


def test_cudnn_compile_fullgraph_cpu(interpret):
    torch._dynamo.reset()
    x, w, b, kw = make_case(1, 8, 8, 3, 4, 5, groups=4, cache=True, residual=True, seed=130)
    mod = zq_case(1, 8, 3, 4, 5, (3, 2, 3), seed=131)
    mod["zq_index"] = spatial_norm_index((3, 2, 3), (3, 4, 5))
    fn = lambda x, zq: vae_conv3d(x, w, b, backend="cudnn", **kw, **dict(mod, zq=zq))  # noqa: E731
    eager = fn(x, mod["zq"])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, mod["zq"])
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
    out = torch.full_like(eager[0], float("nan"))
    fn_out = lambda x, out: vae_conv3d(x, w, b, backend="cudnn", out=out, **kw, **mod)[1]  # noqa: E731
    cache = torch.compile(fn_out, fullgraph=True, backend="aot_eager")(x, out)
    assert torch.equal(out, eager[0]) and torch.equal(cache, eager[1])


def test_cudnn_is_never_auto(interpret, monkeypatch):
    monkeypatch.delenv("COGVIDEOX_KERNELS_BACKEND", raising=False)
    assert "cudnn" in registry.kernels("vae_conv3d") and not registry.auto_allowed("vae_conv3d", "cudnn", "cpu")
    assert not registry.auto_allowed("vae_conv3d", "cudnn", "cuda")
    assert registry.auto_choice("vae_conv3d", "cpu") != "cudnn"
    x, w, b, kw = make_case(1, 4, 4, 2, 3, 3, groups=2, seed=6)
    assert registry.resolve("vae_conv3d", "auto", x=x, weight=w) != "cudnn"
    assert registry.resolve("vae_conv3d", "cudnn", x=x, weight=w) == "cudnn"


def test_cudnn_refuses_what_it_does_not_take(monkeypatch):
    x, w, b, kw = make_case(1, 4, 4, 2, 3, 3, dtype=torch.float64, seed=7)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (availability reads it per call)
    with pytest.raises(ValueError, match="float64"):
        vae_conv3d(x, w, b, backend="cudnn")
    from types import SimpleNamespace  # (a float32 CUDA tensor's device and dtype, no GPU needed)

    gpu_fp32 = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    assert "bf16 / fp16" in cudnn_route.cudnn_supports(gpu_fp32, w)
    assert cudnn_route.cudnn_supports(SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16), w) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        vae_conv3d(x.float(), w.float(), b.float(), backend="cudnn")


@pytest.mark.parametrize("value,want", [("", ()), ("0", ()), (" off ", ()), ("256", ((256, 256),)),
                                        ("256,512", ((256, 256), (512, 512))), (" 512 , 256+ ", ((256, None), (512, 512))),
                                        ("256+", ((256, None),)), ("128,128", ((128, 128),))])
def test_parse_cudnn_channels(value, want):
    assert cudnn_route.parse_cudnn_channels(value) == want


@pytest.mark.parametrize("value", ["abc", "256-", "-1", "0+", "256,,512", "2.5", "+"])
def test_parse_cudnn_channels_rejects(value):
    with pytest.raises(ValueError, match=cudnn_route.CUDNN_CHANNELS_ENV):
        cudnn_route.parse_cudnn_channels(value)


def test_channels_match():
    r = cudnn_route.parse_cudnn_channels("128,512+")
    assert [c for c in (64, 128, 256, 512, 1024) if cudnn_route.channels_match(r, c)] == [128, 512, 1024]
    assert not cudnn_route.channels_match((), 256)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not _ext.cuda_available(), reason="extension built without CUDA")
@pytest.mark.parametrize("spatial", [False, True], ids=["groupnorm", "zq"])
def test_cudnn_matches_cuda_at_256_channels(spatial):
    """bf16 [1,256,4,40,60] with cache and residual (GroupNorm 32, or the spatial norm's zq): both backends
    within budget of the float64 reference and <= 2x torch's own error; the route vs the fused kernel within
    bf16 noise; NaN-poisoned outputs."""
    x, w, b, kw = make_case(1, 256, 256, 4, 40, 60, dtype=torch.bfloat16, device="cuda", groups=32, cache=True,
                            residual=True, seed=300)
    mod = zq_case(1, 256, 4, 40, 60, (2, 10, 15), Kz=16, device="cuda", dtype=torch.bfloat16, seed=301) \
        if spatial else {}
    y_cuda, c_cuda = check(x, w, b, kw, "cuda", **mod)
    y, c = check(x, w, b, kw, "cudnn", **mod)
    assert rel_err(y, y_cuda) < 5e-3 and rel_err(c, c_cuda) < 5e-3
