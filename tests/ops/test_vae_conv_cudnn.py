"""vae_conv3d backend "cudnn" (ops/vae_conv/cudnn_route.py: Triton activation pass + conv3d on channels_last_3d +
residual add): the reference's function for every option the C++ path's tests cover (the same cases: GroupNorm
statistics or norm_coef, scale / shift, the spatial norm's zq modulation, SiLU, cache / replicate / zeros, kt 1..5,
bias, residual, ``out``), float32 and bf16 under the Triton interpreter with NaN-poisoned outputs (conftest.py),
each tensor argument non-contiguous, torch.compile fullgraph; never picked by ``auto``; on a GPU: equal to the
CUDA kernel within bf16 noise at 256 channels. The route's own kernels: the zq modulation formed at zq's resolution
and gathered equals the former per-element form bit for bit; the transpose-add equals torch.add exactly for each
y / residual / out layout; the op with a channels-last conv output (as cuDNN's on a GPU)."""
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
    """The spatial norm's modulation from zq (formed at zq's resolution, gathered; odd T split index, non-integer
    ratios, Kz 3-16, with / without biases): within budget of the reference, and (float32) equal within
    accumulation noise to the op given scale / shift formed first."""
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


# ------------------------------------------------------------------------ the zq modulation at zq's resolution
def _act_case(B, C, size, dtype, seed):
    """x [B, C, *size] and float32 GroupNorm-like coefficients [B, C, 2] (fresh, seeded)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, C, *size, generator=g) * 1.5 + 0.3).to(dtype)
    coef = torch.stack((torch.rand(B, C, generator=g) + 0.5, torch.randn(B, C, generator=g) * 0.3), dim=-1)
    return x, coef


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_zq_modulation_at_zq_resolution(interpret, dtype, bias):
    """zq_modulation_fwd's scale / shift [B, C, Tz, Hz, Wz] (NaN-poisoned outputs) equal, bit for bit, the
    former arithmetic at zq's own positions (``base.kernel_modulation`` through the identity index): B 2, C 37
    (not a multiple of the 32-channel block), Tz * Hz * Wz = 3 * 5 * 9 (not a multiple of the 64 block), Kz 7."""
    size = (3, 5, 9)
    mod = zq_case(2, 37, *size, size, Kz=7, dtype=dtype, bias=bias, seed=430)
    like = torch.empty((2, 37, *size), dtype=dtype)
    want = base.kernel_modulation(like, zq_index=spatial_norm_index(size, size), **mod)
    got = cudnn_route.zq_modulation_fwd(mod["zq"], dtype, mod["scale_weight"], mod.get("scale_bias"),
                                        mod["shift_weight"], mod.get("shift_bias"))
    assert all(g.is_contiguous() and g.dtype == dtype for g in got)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", range(len(base.ZQ_SIZES)))
def test_act_pass_zq_equals_per_element_form(interpret, case, dtype):
    """The pass with zq (scale / shift formed once at zq's resolution, then gathered through zq_index) equals,
    bit for bit, the pass given full-size scale / shift formed per element by the former arithmetic
    (``base.kernel_modulation``: float32 sums over zq's channels in order, bias last, rounded to x's dtype; the
    interpreter's float32 mul + add are torch's): B 2, C 70 (not a multiple of the 64-channel block), odd
    H * W, T 1..5 (odd T: the split index), Kz 5, with / without biases, cache / replicate / zeros fronts."""
    size, zq_size = base.ZQ_SIZES[case]
    B, C = 2, 70
    x, coef = _act_case(B, C, size, dtype, seed=400 + case)
    mod = zq_case(B, C, *size, zq_size, Kz=5, dtype=dtype, bias=case % 2 == 0, seed=410 + case)
    mod["zq_index"] = spatial_norm_index(zq_size, size)
    scale, shift = base.kernel_modulation(x, **mod)  # the former per-element arithmetic, as the reference
    cache = torch.randn(B, C, 2, *size[1:], generator=torch.Generator().manual_seed(420 + case)).to(dtype)
    for front in (dict(cache=cache), dict(pad_mode="replicate"), dict(pad_mode="zeros")):
        act, new_cache = cudnn_route.act_cl_fwd(x, coef, silu=True, kt=3, **front, **mod)
        want, want_cache = cudnn_route.act_cl_fwd(x, coef, silu=True, kt=3, scale=scale, shift=shift, **front)
        assert torch.equal(act, want) and torch.equal(new_cache, want_cache), front.keys()


# ------------------------------------------------------------------------ the transpose(-add) kernel
def _y_views(y):
    """y's values in the layouts the kernel takes: channels_last_3d (the GPU conv's output), contiguous NCDHW (the
    CPU conv's), frames of a longer channels-last clip (batch / frame strides not the default); and one it leaves
    to torch (H and W transposed in memory: no single pixel stride)."""
    B, C, T, H, W = y.shape
    longer = torch.full((B, C, T + 2, H, W), float("nan"), dtype=y.dtype).contiguous(
        memory_format=torch.channels_last_3d)
    longer[:, :, 1:T + 1] = y
    return {"cl": y.contiguous(memory_format=torch.channels_last_3d), "nc": y.contiguous(),
            "cl_frames": longer[:, :, 1:T + 1], "hw_transposed": y.transpose(3, 4).contiguous().transpose(3, 4)}


def _out_views(shape, dtype):
    """(out, the container it lies in): None; frames 1.. of a longer NaN tensor (dense planes, frame / batch
    strides not the default); every other channel of a NaN tensor (channel stride 2x); columns stepped by 2
    (planes not dense: torch writes it)."""
    B, C, T, H, W = shape
    nan = lambda *s: torch.full(s, float("nan"), dtype=dtype)  # noqa: E731
    frames, channels, stepped = nan(B, C, T + 3, H, W), nan(B, 2 * C, T, H, W), nan(B, C, T, H, 2 * W)
    return {"none": (None, None), "frames": (frames[:, :, 1:T + 1], frames),
            "channels": (channels[:, ::2], channels), "stepped": (stepped[..., ::2], stepped)}


class _CountingLaunches:
    """A Triton kernel that counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 70, 3, 5, 7), (2, 33, 1, 9, 11), (1, 5, 2, 1, 3)],
                         ids=["C70_T3", "C33_T1", "C5_H1"])
@pytest.mark.parametrize("residual", ["none", "dense", "transposed"])
def test_cl_to_nc_equals_torch(interpret, monkeypatch, dtype, shape, residual):
    """cl_to_nc_fwd(y, residual, out) holds exactly torch.add(y, residual) (or y) in every y layout, residual
    (none / contiguous / a non-dense-plane view, copied first) and out (none: a new contiguous tensor; dense
    planes with frame / channel strides not the default; stepped columns: torch's fallback); out is returned
    and nothing outside it written; the kernel runs where y's pixels have one stride and out's planes are
    dense. C not a multiple of the 64-channel block, H * W not of the 64-pixel block, T = 1, B = 2, H = 1."""
    g = torch.Generator().manual_seed(sum(shape))
    y = (torch.randn(*shape, generator=g) * 3).to(dtype)
    res = {"none": None, "dense": torch.randn(*shape, generator=g).to(dtype)}.get(residual)
    if residual == "transposed":
        res = torch.randn(*shape, generator=g).to(dtype).transpose(3, 4).contiguous().transpose(3, 4)
    want = y if res is None else torch.add(y, res)
    kernel = _CountingLaunches(cudnn_route._cl_to_nc_fwd_kernel)
    monkeypatch.setattr(cudnn_route, "_cl_to_nc_fwd_kernel", kernel)
    for y_kind, yv in _y_views(y).items():
        for out_kind, (out, container) in _out_views(shape, dtype).items():
            launches = kernel.launches
            got = cudnn_route.cl_to_nc_fwd(yv, res, out)
            assert torch.equal(got, want), (y_kind, out_kind)
            flat = y_kind != "hw_transposed" or shape[3] == 1  # (one row: H x W planes are flat however laid)
            assert kernel.launches == launches + (flat and out_kind != "stepped"), (y_kind, out_kind)
            if out is None:
                assert got.is_contiguous()
            else:
                assert got is out
                assert container.isnan().sum() == container.numel() - out.numel(), (y_kind, out_kind)


@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cudnn_op_with_channels_last_conv_output(interpret, monkeypatch, dtype, residual):
    """The op as on a GPU, where cuDNN's conv output is channels_last_3d (the CPU conv returns NCDHW; here made
    channels-last): y, ``out`` with dense planes and non-default strides, ``out`` with stepped columns, all
    within budget of the float64 reference and equal to each other."""
    real_conv = cudnn_route.F.conv3d
    conv_cl = lambda *a, **k: real_conv(*a, **k).contiguous(memory_format=torch.channels_last_3d)  # noqa: E731
    monkeypatch.setattr(cudnn_route.F, "conv3d", conv_cl)
    x, w, b, kw = make_case(2, 12, 70, 3, 5, 7, dtype=dtype, groups=4, cache=True, residual=residual, seed=500)
    y, _ = check(x, w, b, kw, "cudnn")
    assert y.is_contiguous()
    for kind, (out, container) in _out_views(y.shape, dtype).items():
        if out is not None:
            got, _ = vae_conv3d(x, w, b, backend="cudnn", out=out, **kw)
            assert got is out and torch.equal(out, y), kind
            assert container.isnan().sum() == container.numel() - out.numel(), kind
