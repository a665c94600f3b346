"""CPU checks (Triton interpreter + torch's CPU conv3d) of benchmarks/experiments/vae_conv_cudnn_route.py: the
route (statistics, the Triton channels-last activation pass, conv3d on channels_last_3d, residual add) computes
vae_conv3d's function: front frames from the cache, replicated frame 0 or zeros, GroupNorm statistics or given
coefficients, residual, bias, both output layouts, odd shapes, non-contiguous arguments; outputs NaN-poisoned
(tests/conftest.py)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "experiments"))

import vae_conv_cudnn_route as exp  # noqa: E402
from cogvideox_kernels.ops.vae_conv import group_norm_coef_reference, vae_conv3d, vae_conv3d_reference  # noqa: E402
from cogvideox_kernels.ops.vae_conv.reference import activate  # noqa: E402

CONFIG = (32, 32, 4)


def rel(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def inputs(shape, kt=3, dtype=torch.float32, seed=0, C_out=None):
    B, C, T, H, W = shape
    C_out = C_out or C
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=(rnd(B, C, T, H, W) * 1.5 + 0.3).to(dtype),
                weight=(rnd(C_out, C, kt, 3, 3) / (27 * C) ** 0.5).to(dtype),
                bias=(rnd(C_out) * 0.1).to(dtype), norm_weight=(rnd(C) * 0.3 + 1).to(dtype),
                norm_bias=(rnd(C) * 0.3).to(dtype), residual=rnd(B, C_out, T, H, W).to(dtype),
                cache=(rnd(B, C, kt - 1, H, W) * 0.5).to(dtype))


def kwargs(a, front, residual=True, groups=4):
    return dict(num_groups=groups, norm_weight=a["norm_weight"], norm_bias=a["norm_bias"], silu=True,
                cache=a["cache"] if front == "cache" else None, pad_mode="zeros" if front == "zeros" else "replicate",
                residual=a["residual"] if residual else None)


def f64(a):
    return {k: v.double() for k, v in a.items()}


@pytest.mark.parametrize("front", ["cache", "replicate", "zeros"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_pass_is_the_padded_activation(interpret, front, dtype):
    """act_cl holds cat(front, act(x) rounded once) channels-last; new_cache is its last kt-1 frames (NCDHW)."""
    a = inputs((2, 40, 3, 5, 7), dtype=dtype)
    coef = group_norm_coef_reference(a["x"], 4, a["norm_weight"], a["norm_bias"])
    kw = kwargs(a, front)
    act, new_cache = exp.act_cl_fwd(a["x"], coef, silu=True, kt=3, cache=kw["cache"], pad_mode=kw["pad_mode"],
                                    config=CONFIG)
    assert act.shape == (2, 40, 5, 5, 7) and act.is_contiguous(memory_format=torch.channels_last_3d)
    h = activate(a["x"], norm_coef=coef, silu=True).to(dtype)
    front_t = {"cache": a["cache"], "replicate": h[:, :, :1].expand(-1, -1, 2, -1, -1),
               "zeros": torch.zeros_like(h[:, :, :2])}[front]
    want = torch.cat((front_t, h), dim=2)
    if dtype == torch.float32:
        torch.testing.assert_close(act, want, rtol=1e-6, atol=1e-6)
    else:  # at most one bf16 ulp apart where exp rounds differently; most elements equal
        assert (act.float() - want.float()).abs().le(want.float().abs() * 2**-7 + 1e-6).all()
        assert (act == want).float().mean() > 0.95
    if front == "cache":
        assert torch.equal(act[:, :, :2], a["cache"])  # copied as given, not activated again
    if front == "zeros":
        assert torch.equal(act[:, :, :2], torch.zeros_like(act[:, :, :2]))
    assert new_cache.is_contiguous() and torch.equal(new_cache, act[:, :, -2:])


@pytest.mark.parametrize("front", ["cache", "replicate", "zeros"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("layout", ["nc", "cl"])
@pytest.mark.parametrize("shape,kt,C_out", [((1, 40, 3, 5, 7), 3, 40), ((2, 16, 1, 4, 3), 3, 24),
                                             ((1, 32, 4, 6, 5), 2, 16)])
def test_route_equals_reference(interpret, front, residual, layout, shape, kt, C_out):
    a = inputs(shape, kt=kt, C_out=C_out, seed=shape[1] + kt)
    kw = kwargs(a, front, residual)
    y, cache = exp.route(a["x"], a["weight"], a["bias"], out_layout=layout, config=CONFIG, **kw)
    ref, ref_cache = vae_conv3d_reference(*(f64(a)[k] for k in ("x", "weight", "bias")),
                                          **kwargs(f64(a), front, residual))
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert y.is_contiguous() if layout == "nc" else y.is_contiguous(memory_format=torch.channels_last_3d)
    assert rel(y, ref) < 1e-5 and rel(cache, ref_cache) < 1e-5
    assert cache.is_contiguous() and cache.shape == (shape[0], shape[1], kt - 1, *shape[3:])


def test_route_with_norm_coef_and_without_norm(interpret):
    a = inputs((1, 24, 3, 6, 4))
    coef = group_norm_coef_reference(a["x"], 4, a["norm_weight"], a["norm_bias"])
    y, c = exp.route(a["x"], a["weight"], a["bias"], norm_coef=coef, silu=True, cache=a["cache"],
                     residual=a["residual"], config=CONFIG)
    ref, ref_c = vae_conv3d_reference(a["x"].double(), a["weight"].double(), a["bias"].double(), norm_coef=coef,
                                      silu=True, cache=a["cache"].double(), residual=a["residual"].double())
    assert rel(y, ref) < 1e-5 and rel(c, ref_c) < 1e-5
    y, c = exp.route(a["x"], a["weight"], None, config=CONFIG)  # no norm, no SiLU, no bias: the conv alone
    ref, ref_c = vae_conv3d_reference(a["x"].double(), a["weight"].double())
    assert rel(y, ref) < 1e-6 and rel(c, ref_c) < 1e-6


@pytest.mark.parametrize("arg", ["x", "cache", "residual", "weight", "x_cl"])
def test_route_non_contiguous(interpret, arg):
    """Each tensor argument as a non-contiguous view gives the contiguous call's result."""
    a = inputs((1, 24, 3, 6, 5), seed=3)
    kw = kwargs(a, "cache")
    want, want_c = exp.route(a["x"], a["weight"], a["bias"], config=CONFIG, **kw)
    x, w = a["x"], a["weight"]
    if arg == "x":  # a frame range (planes dense: read in place) of a longer clip
        x = torch.cat((x, torch.randn_like(x)), dim=2)[:, :, :3]
    elif arg == "x_cl":  # channels-last: planes not dense, copied by the launcher
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif arg == "cache":
        kw["cache"] = torch.cat((a["cache"], torch.randn_like(a["cache"])), dim=2)[:, :, ::2]
        kw["cache"][:] = a["cache"]
    elif arg == "residual":
        kw["residual"] = a["residual"].transpose(3, 4).contiguous().transpose(3, 4)
    else:
        w = w.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (x.is_contiguous() and w.is_contiguous() and all(
        t is None or t.is_contiguous() for t in (kw["cache"], kw["residual"])))
    y, c = exp.route(x, w, a["bias"], config=CONFIG, **kw)
    assert rel(y, want) < 1e-6 and torch.equal(c, want_c)


def test_route_bf16_within_2x_of_the_fused_op(interpret):
    """bf16: the route (conv output rounded, then the residual add rounded again) stays within 2x of the fused
    op's error (C++ path: one rounding) against float64."""
    a = inputs((1, 32, 4, 8, 6), dtype=torch.bfloat16, seed=7)
    kw = kwargs(a, "cache")
    ref, _ = vae_conv3d_reference(*(f64(a)[k] for k in ("x", "weight", "bias")), **kwargs(f64(a), "cache"))
    ours, _ = vae_conv3d(a["x"], a["weight"], a["bias"], backend="cpp", **kw)
    y, _ = exp.route(a["x"], a["weight"], a["bias"], config=CONFIG, **kw)
    assert y.dtype == torch.bfloat16
    assert rel(y, ref) <= 2 * rel(ours, ref) and rel(y, ref) < 1e-2


def test_route_sees_the_front(interpret):
    """The test can fail: cache, replicate and zeros give different first frames; later frames agree."""
    a = inputs((1, 16, 4, 5, 5), seed=11)
    ys = {f: exp.route(a["x"], a["weight"], a["bias"], config=CONFIG, **kwargs(a, f))[0] for f in
          ("cache", "replicate", "zeros")}
    for f, g in (("cache", "replicate"), ("cache", "zeros"), ("replicate", "zeros")):
        assert rel(ys[f][:, :, :2], ys[g][:, :, :2]) > 1e-2
        torch.testing.assert_close(ys[f][:, :, 2:], ys[g][:, :, 2:])


def test_route_errors():
    a = inputs((1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="out_layout"):
        exp.route(a["x"], a["weight"], out_layout="nhwc")
    with pytest.raises(ValueError, match="cache"):
        exp.route(a["x"], a["weight"], cache=a["cache"][:, :, :1])
    with pytest.raises(ValueError, match="pad_mode"):
        exp.route(a["x"], a["weight"], pad_mode="reflect")
    with pytest.raises(ValueError, match="dtype"):
        exp.route(a["x"].double(), a["weight"].double())
