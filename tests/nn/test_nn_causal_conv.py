"""CausalConv3d (the module) against an independent frame-by-frame formula, with streaming,
causality, backend switching and argument errors."""
import pytest
import torch
import torch.nn.functional as F

from cogvideox_kernels._ext import extension_available
from cogvideox_kernels.nn.causal_conv import CausalConv3d
from helpers import rel_err

HAS_NATIVE = extension_available()


def causal_conv_by_frames(x, weight, bias, stride, pad_mode):
    """y[t] = bias + sum_k conv2d(frame(t*stride + k - (kt-1)), W[:, :, k]) in float64, where frames
    before 0 are frame 0 (replicate) or zeros."""
    x, weight = x.double(), weight.double()
    kt, kh, kw = weight.shape[2:]

    def frame(i):
        if i >= 0:
            return x[:, :, i]
        return x[:, :, 0] if pad_mode == "replicate" else torch.zeros_like(x[:, :, 0])

    frames = []
    for t in range((x.shape[2] - 1) // stride + 1):
        acc = sum(F.conv2d(frame(t * stride + k - (kt - 1)), weight[:, :, k], padding=(kh // 2, kw // 2))
                  for k in range(kt))
        frames.append(acc + bias.double().view(1, -1, 1, 1))
    return torch.stack(frames, dim=2)


@pytest.mark.parametrize("kernel_size", [3, (3, 3, 3), (2, 1, 3), 1])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pad_mode", ["replicate", "zeros"])
@pytest.mark.parametrize("frames", [1, 6, 9])
def test_matches_frame_by_frame_formula(kernel_size, stride, pad_mode, frames):
    torch.manual_seed(frames * 10 + stride)
    conv = CausalConv3d(5, 7, kernel_size, stride=stride, pad_mode=pad_mode, backend="reference")
    x = torch.randn(2, 5, frames, 5, 3)
    y, cache = conv(x)
    ref = causal_conv_by_frames(x, conv.weight, conv.bias, stride, pad_mode)
    assert y.shape == ref.shape == (2, 7, (frames - 1) // stride + 1, 5, 3)
    assert rel_err(y, ref) <= 1e-5
    kt = conv.kernel_size[0]
    assert cache.shape == (2, 5, kt - 1, 5, 3)


@pytest.mark.parametrize("stride,chunks", [(1, [3, 1, 4, 2]), (2, [4, 2, 6, 3]), (2, [8, 1])])
def test_streaming_with_cache_equals_one_pass(stride, chunks):
    torch.manual_seed(stride)
    conv = CausalConv3d(4, 6, 3, stride=stride, backend="reference")
    x = torch.randn(1, 4, sum(chunks), 6, 5)
    whole, _ = conv(x)
    pieces, cache, start = [], None, 0
    for n in chunks:
        y, cache = conv(x[:, :, start:start + n], cache)
        pieces.append(y)
        start += n
    assert rel_err(torch.cat(pieces, dim=2), whole) <= 1e-6


def test_output_frame_sees_only_earlier_frames():
    torch.manual_seed(3)
    conv = CausalConv3d(3, 4, (3, 3, 3), stride=2, backend="reference")
    x = torch.randn(1, 3, 9, 6, 6)
    y, _ = conv(x)
    x2 = x.clone()
    x2[:, :, 5] += torch.randn_like(x2[:, :, 5])
    y2, _ = conv(x2)
    # output t sees frames <= 2t: frame 5 first reaches output 3
    assert torch.equal(y[:, :, :3], y2[:, :, :3])
    assert not torch.allclose(y[:, :, 3], y2[:, :, 3])


def test_state_dict_and_backend_switch():
    torch.manual_seed(4)
    a = CausalConv3d(4, 6, 3, backend="reference")
    b = CausalConv3d(4, 6, 3, backend="auto")
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert list(a.state_dict()) == ["weight", "bias"] and a.weight.shape == (6, 4, 3, 1, 1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 5, 3, 7)
    assert rel_err(b(x)[0], a(x)[0]) <= 1e-6
    b.backend = "reference"
    assert torch.equal(b(x)[0], a(x)[0])
    with pytest.raises(ValueError, match="backend='bogus'"):
        b.backend = "bogus"


def test_no_bias():
    torch.manual_seed(5)
    conv = CausalConv3d(3, 2, 3, bias=False, backend="reference")
    x = torch.randn(1, 3, 4, 2, 2)
    assert conv.bias is None and list(conv.state_dict()) == ["weight"]
    ref = causal_conv_by_frames(x, conv.weight, torch.zeros(2), 1, "replicate")
    assert rel_err(conv(x)[0], ref) <= 1e-5


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=(3, 2, 1)), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=(3, 1)), "kernel_size"),
    (dict(stride=0), "stride=0"),
    (dict(pad_mode="reflect"), "pad_mode='reflect'"),
    (dict(backend="triton3"), "backend='triton3'"),
    (dict(in_channels=0), "in_channels=0"),
])
def test_bad_arguments(kwargs, match):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        CausalConv3d(**args)


def test_bad_inputs():
    conv = CausalConv3d(4, 4, 3, backend="reference")
    with pytest.raises(ValueError, match="C=3"):
        conv(torch.randn(1, 3, 5, 4, 4))
    with pytest.raises(ValueError, match="cache"):
        conv(torch.randn(1, 4, 5, 4, 4), torch.randn(1, 4, 1, 4, 4))
    with pytest.raises(ValueError, match="CausalConv3d: x has dtype torch.bfloat16 but the module's parameters are"):
        conv(torch.randn(1, 4, 5, 4, 4).bfloat16())


@pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension's causal conv is not built")
@pytest.mark.parametrize("stride", [1, 2])
def test_cpp_backend_matches_reference(stride):
    torch.manual_seed(6 + stride)
    ref = CausalConv3d(6, 5, 3, stride=stride, backend="reference")
    cpp = CausalConv3d(6, 5, 3, stride=stride, backend="cpp")
    cpp.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 7, 5, 9)
    with torch.no_grad():  # (the kernel has no backward: with grad mode on the named backend refuses)
        (y_ref, cache_ref), (y_cpp, cache_cpp) = ref(x), cpp(x)
    assert rel_err(y_cpp, y_ref) <= 1e-5
    assert torch.equal(cache_cpp, cache_ref)


def test_default_module_trains_on_cpu():
    """auto takes the differentiable reference while autograd records (the kernels have no backward);
    the gradients are the reference's, and a named kernel refuses at the call."""
    torch.manual_seed(7)
    conv, ref = CausalConv3d(4, 5, 3, stride=2), CausalConv3d(4, 5, 3, stride=2, backend="reference")
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(1, 4, 5, 3, 4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    conv(x)[0].square().sum().backward()
    ref(x_ref)[0].square().sum().backward()
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(conv.weight.grad, ref.weight.grad)
    if HAS_NATIVE:
        conv.backend = "cpp"
        with pytest.raises(ValueError, match="backend='cpp' has no backward pass, but weight requires grad"):
            conv(x.detach())
