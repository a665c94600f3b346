"""Every tensor argument of every op, one at a time, as a non-contiguous view, through every backend
that runs on CPU (reference, Triton interpreter, C++), against the float64 reference on contiguous
copies of the same values. A kernel reads the strides it declares it handles and gets copies of the
rest (ops.registry ``layout``); a wrong answer here is a kernel reading a view as if it were packed.

Views: ``step`` (every other element of the last dim, NaN in between), ``slice`` (a window of a
NaN-padded tensor along dim 1: a time slice x[:, :, a:b] for the conv), ``expand`` (stride 0 along the
first dim longer than 1: the values repeat), ``transpose`` (the last two dims longer than 1 stored
transposed) and ``channels_last_3d`` (5-D tensors). Outputs are NaN-poisoned (tests/conftest.py).
"""
import pytest
import torch

from cogvideox_kernels import _ext, ops
from cogvideox_kernels._backend import interpret_mode
from cogvideox_kernels.ops import registry
from helpers import rel_err, replaced, strided_view as view, tensor_args, view_kinds as kinds


def attention_inputs(g):
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, S, H, D, text_len = 2, 11, 2, 16, 3
    angles = (rnd(S - text_len, D // 2) * 3).repeat_interleave(2, dim=1)
    return dict(q=rnd(B, S, H, D), k=rnd(B, S, H, D), v=rnd(B, S, H, D), text_len=text_len, cos=angles.cos(),
                sin=angles.sin(), q_norm=(1 + 0.3 * rnd(D), 0.2 * rnd(D)), k_norm=(1 + 0.3 * rnd(D), 0.2 * rnd(D)),
                eps=1e-6, scale=None)


def expert_ffn_inputs(g):
    rnd = lambda *s, std=1.0: torch.randn(*s, generator=g) * std  # noqa: E731
    B, S, Hd, F, nt, nv = 2, 7, 16, 24, 2, 2
    E = nt + nv
    return dict(x=rnd(B, S, Hd), modulation=rnd(B, 6, Hd, std=0.5), w1=rnd(E, F, Hd, std=Hd ** -0.5),
                b1=rnd(E, F, std=0.1), w2=rnd(E, Hd, F, std=F ** -0.5), b2=rnd(E, Hd, std=0.1), text_len=3,
                norm_weight=1 + 0.3 * rnd(Hd), norm_bias=0.2 * rnd(Hd), eps=1e-5, num_text_experts=nt,
                text_router=(rnd(nt, Hd, std=3.0), rnd(nt)), video_router=(rnd(nv, Hd, std=3.0), rnd(nv)))


def causal_conv3d_inputs(g):
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, C, C_out, T, H, W, kt = 2, 3, 4, 5, 3, 4, 3
    return dict(x=rnd(B, C, T, H, W), weight=rnd(C_out, C, kt, 1, 1) / 3, bias=rnd(C_out), stride=1,
                pad_mode="replicate", cache=rnd(B, C, kt - 1, H, W))


OPS = {"rope3d_attention": (ops.rope3d_attention, attention_inputs),
       "expert_ffn": (ops.expert_ffn, expert_ffn_inputs),
       "causal_conv3d": (ops.causal_conv3d, causal_conv3d_inputs)}


def cpu_backends(op):
    names = ["reference"]
    for kernel, why in registry.availability(op, "cpu").items():
        if why is None:
            names.append(kernel)
    return names


def cases():
    for op, (_, make) in OPS.items():
        inputs = make(torch.Generator().manual_seed(0))
        for name, index, t in tensor_args(inputs):
            arg = name if index is None else f"{name}[{index}]"
            for kind in kinds(t):
                yield pytest.param(op, name, index, kind, id=f"{op}-{arg}-{kind}")


@pytest.mark.parametrize("op,name,index,kind", list(cases()))
def test_each_argument_non_contiguous(op, name, index, kind):
    fn, make = OPS[op]
    backends = cpu_backends(op)
    if op != "causal_conv3d":  # CI runs the Triton kernels here, in the interpreter
        assert "triton" in backends or not interpret_mode()
    else:
        assert "cpp" in backends or not _ext.extension_available()
    inputs = make(torch.Generator().manual_seed(len(name) + 7 * (index or 0)))
    original = inputs[name] if index is None else inputs[name][index]
    strided = view(original, kind)
    assert not strided.is_contiguous() and strided.shape == original.shape
    packed = replaced(inputs, name, index, strided.contiguous())
    reference = getattr(ops, f"{op}_reference")
    want = reference(**packed, compute_dtype=torch.float64)
    for backend in backends:
        with torch.no_grad():
            got = fn(**replaced(inputs, name, index, strided), backend=backend)
        if op == "causal_conv3d":
            (got, got_cache), (want_y, want_cache) = got, want
            assert torch.equal(got_cache, want_cache.float()), backend
            assert rel_err(got, want_y) <= 1e-5, backend
        else:
            assert rel_err(got, want) <= 1e-5, backend
