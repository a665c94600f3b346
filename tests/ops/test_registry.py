"""ops.registry: one place decides which backend runs. A stub kernel registered here (test only) shows
how a backend is added and what auto / named / unsupported / unavailable do."""
import pytest
import torch

from cogvideox_kernels import ops
from cogvideox_kernels.nn.attention import RoPE3DAttention
from cogvideox_kernels.ops import registry
from helpers import rel_err


def _inputs(D=16, dtype=torch.float32, S=8):
    g = torch.Generator().manual_seed(D)
    q, k, v = (torch.randn(1, S, 2, D, generator=g, dtype=dtype) for _ in range(3))
    return dict(q=q, k=k, v=v, text_len=0, cos=None, sin=None, q_norm=None, k_norm=None, eps=1e-6, scale=None)


@pytest.fixture
def stub():
    """A CPU 'kernel' of rope3d_attention that takes float32 with head_dim <= 16 and records its calls."""
    calls = []

    def run(**inputs):
        calls.append(inputs)
        return ops.rope3d_attention_reference(**inputs) * 1.0

    def supports(q, **_):
        if q.dtype != torch.float32:
            return f"q has dtype {q.dtype}; the stub takes float32"
        return None if q.shape[-1] <= 16 else f"head_dim={q.shape[-1]} > 16"

    registry.register_backend("rope3d_attention", "stub", run=run, supports=supports,
                              available=lambda d: None if d.type == "cpu" else "the stub runs on CPU only",
                              before="triton")
    try:
        yield calls
    finally:
        registry.unregister_backend("rope3d_attention", "stub")
    assert "stub" not in registry.backends("rope3d_attention")


def test_stub_backend_auto_named_unsupported(stub, monkeypatch):
    monkeypatch.delenv("COGVIDEOX_KERNELS_BACKEND", raising=False)
    assert registry.kernels("rope3d_attention") == ("hopper", "stub", "triton")
    assert "stub" in registry.backends() and "stub" not in registry.backends("expert_ffn")
    a = _inputs()
    want = ops.rope3d_attention(**a, backend="reference")
    # auto: the first available kernel that supports the inputs
    assert registry.resolve("rope3d_attention", **a) == "stub"
    assert rel_err(ops.rope3d_attention(**a), want) == 0 and len(stub) == 1
    # named: the same kernel
    assert rel_err(ops.rope3d_attention(**a, backend="stub"), want) == 0 and len(stub) == 2
    # inputs it does not support: auto falls back to the reference, the named kernel says why
    for bad in (_inputs(D=32), _inputs(dtype=torch.float64)):
        assert registry.resolve("rope3d_attention", **bad) == "reference"
        ops.rope3d_attention(**bad)
        with pytest.raises(ValueError, match=r"backend='stub' does not support these inputs: (head_dim=32|q has dtype)"):
            ops.rope3d_attention(**bad, backend="stub")
    assert len(stub) == 2
    # a device it does not run on: auto skips it, the named kernel says why
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    assert registry.resolve("rope3d_attention", **meta) == "reference"
    with pytest.raises(ValueError, match="backend='stub' cannot run on meta tensors .*hold no data"):
        ops.rope3d_attention(**meta, backend="stub")
    # the environment override picks it by name too, and 'reference' rules it out
    monkeypatch.setenv("COGVIDEOX_KERNELS_BACKEND", "reference")
    ops.rope3d_attention(**a)
    assert len(stub) == 2
    monkeypatch.setenv("COGVIDEOX_KERNELS_BACKEND", "stub")
    ops.rope3d_attention(**a)
    assert len(stub) == 3
    # nn modules take their backend names from the registry
    module = RoPE3DAttention(32, 2, backend="stub")
    with torch.no_grad():
        module(torch.randn(1, 5, 32), 2)
    assert len(stub) == 4
    # the input check runs before any backend
    with pytest.raises(ValueError, match="text_len"):
        ops.rope3d_attention(**{**a, "text_len": 99}, backend="stub")


def test_backend_names_and_errors(monkeypatch):
    monkeypatch.delenv("COGVIDEOX_KERNELS_BACKEND", raising=False)
    a = _inputs()
    with pytest.raises(ValueError, match=r"backend='cudnn' is not supported; choose one of \('auto', 'reference', 'hopper', 'triton'\)"):
        ops.rope3d_attention(**a, backend="cudnn")
    with pytest.raises(ValueError, match="backend='cpp' is not supported"):  # a kernel of another op
        ops.rope3d_attention(**a, backend="cpp")
    monkeypatch.setenv("COGVIDEOX_KERNELS_BACKEND", "refrence")
    with pytest.raises(ValueError, match=r"COGVIDEOX_KERNELS_BACKEND='refrence' is not a backend; choose one of .*'reference'"):
        ops.rope3d_attention(**a)
    monkeypatch.setenv("COGVIDEOX_KERNELS_BACKEND", "cpp")  # another op's kernel: auto for this op
    assert registry.resolve("rope3d_attention", **a) == "reference"
    with pytest.raises(ValueError, match="exists already"):
        registry.register_backend("rope3d_attention", "triton", run=print, available=lambda d: None)
    with pytest.raises(ValueError, match="unknown op"):
        registry.kernels("conv2d")


def test_wide_heads_and_float64_fall_back_from_triton(monkeypatch):
    """auto asks the kernel's supports(): float64 and head_dim > 128 take the reference; naming the
    Triton kernel raises a ValueError that says why (not an error from inside the kernel)."""
    monkeypatch.delenv("COGVIDEOX_KERNELS_BACKEND", raising=False)
    from cogvideox_kernels.ops.attention import triton_fwd
    from cogvideox_kernels.ops.expert_ffn import triton_fwd as ffn_triton

    assert triton_fwd.supports(**_inputs(D=256)) is not None and triton_fwd.supports(**_inputs(D=64)) is None
    assert "float64" in triton_fwd.supports(**_inputs(dtype=torch.float64))
    assert "float64" in ffn_triton.supports(x=torch.zeros(1, 1, 1, dtype=torch.float64))
    for D, dtype in ((256, torch.float32), (130, torch.float32), (41, torch.float32), (64, torch.float64)):
        a = _inputs(D=D, dtype=dtype, S=4)
        with pytest.raises(ValueError, match="backend='triton' (does not support these inputs: (head_dim|q has dtype)|cannot run)"):
            ops.rope3d_attention(**a, backend="triton")


def test_describe_lists_every_op():
    text = registry.describe(["cpu", "meta"])
    for op in ("rope3d_attention", "expert_ffn", "causal_conv3d"):
        assert op in text
    assert "auto -> reference" in text and "hold no data" in text


def test_autograd_takes_the_reference_or_refuses_at_the_call(monkeypatch):
    """Kernels have no backward: with grad mode on and any tensor input requiring grad, auto takes the
    reference (so backward works) and a named kernel raises at the call, not at backward()."""
    monkeypatch.delenv("COGVIDEOX_KERNELS_BACKEND", raising=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, 5, 6, generator=g)
    w = torch.randn(4, 3, 3, 1, 1, generator=g)
    kernel = registry.auto_choice("causal_conv3d", "cpu")
    for needs_grad in ("x", "weight"):
        xs, ws = x.clone().requires_grad_(needs_grad == "x"), w.clone().requires_grad_(needs_grad == "weight")
        assert registry.resolve("causal_conv3d", x=xs, weight=ws, bias=None, stride=1, pad_mode="replicate",
                                cache=None) == "reference"
        y, _ = ops.causal_conv3d(xs, ws)
        y.square().sum().backward()
        leaf = xs if needs_grad == "x" else ws
        ref_leaf = leaf.detach().clone().requires_grad_()
        y_ref, _ = ops.causal_conv3d(ref_leaf if needs_grad == "x" else x, ref_leaf if needs_grad == "weight" else w,
                                     backend="reference")
        y_ref.square().sum().backward()
        assert torch.equal(leaf.grad, ref_leaf.grad)
        if kernel != "reference":
            with pytest.raises(ValueError, match=rf"backend='{kernel}' has no backward pass, but {needs_grad} requires grad"):
                ops.causal_conv3d(xs, ws, backend=kernel)
            with torch.no_grad():  # no grad mode: the kernel runs
                assert registry.resolve("causal_conv3d", x=xs, weight=ws, bias=None, stride=1, pad_mode="replicate",
                                        cache=None) == kernel
                ops.causal_conv3d(xs, ws, backend=kernel)
    # a tensor inside a tuple argument counts too (q_norm's weight)
    a = _inputs()
    a["q_norm"] = (torch.ones(16, requires_grad=True), None)
    assert registry.resolve("rope3d_attention", **a) == "reference"
    with pytest.raises(ValueError, match=r"q_norm\[0\] requires grad"):
        ops.rope3d_attention(**a, backend="triton")
    with torch.inference_mode():
        assert registry.resolve("rope3d_attention", **a) == "reference"  # (auto skips the interpreter)


def test_meta_tensors_propagate_shapes_and_kernels_say_why_not():
    """auto on meta tensors runs the reference (shapes only); a named kernel says that meta tensors hold
    no data, not that the GPU is too old."""
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in _inputs().items()}
    assert ops.rope3d_attention(**meta).shape == meta["q"].shape
    for kernel in registry.kernels("rope3d_attention"):
        with pytest.raises(ValueError, match="cannot run on meta tensors") as info:
            ops.rope3d_attention(**meta, backend=kernel)
        assert "sm_80" not in str(info.value)
    x = torch.randn(1, 3, 4, 5, 6, device="meta")
    w = torch.randn(4, 3, 3, 1, 1, device="meta")
    y, cache = ops.causal_conv3d(x, w)
    assert y.shape == (1, 4, 4, 5, 6) and cache.shape == (1, 3, 2, 5, 6)
    for kernel in registry.kernels("causal_conv3d"):
        with pytest.raises(ValueError, match="cannot run on meta tensors"):
            ops.causal_conv3d(x, w, backend=kernel)
    x, mod = torch.randn(1, 5, 8, device="meta"), torch.randn(1, 6, 8, device="meta")
    w1, w2 = torch.randn(2, 16, 8, device="meta"), torch.randn(2, 8, 16, device="meta")
    assert ops.expert_ffn(x, mod, w1, None, w2, None, text_len=2, num_text_experts=1).shape == x.shape


@pytest.mark.parametrize("value,expect", [("1", True), (" 1 ", True), ("0", False), (" 0", False), ("", None),
                                          ("  ", None), (None, None)])
def test_env_switch_values(monkeypatch, value, expect):
    """_backend.env_switch (the on/off environment variables, e.g. COGVIDEOX_KERNELS_INT8_ROTATE): "1"/"0" with
    spaces ignored; unset or empty gives the default."""
    from cogvideox_kernels._backend import env_switch, parse_switch

    name = "COGVIDEOX_KERNELS_TEST_SWITCH"
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    for default in (False, True):
        assert env_switch(name, default) is (default if expect is None else expect)
    if value is not None:
        assert parse_switch(name, value) is bool(expect)


@pytest.mark.parametrize("value", ["2", "true", "on", "yes", "-1"])
def test_env_switch_bad_value_names_the_variable(monkeypatch, value):
    from cogvideox_kernels._backend import env_switch, parse_switch

    name = "COGVIDEOX_KERNELS_TEST_SWITCH"
    monkeypatch.setenv(name, value)
    for call in (lambda: env_switch(name, False), lambda: parse_switch(name, value)):
        with pytest.raises(ValueError, match=f"{name}='{value}'"):
            call()
