"""Fuzz: seeded random shapes, dtypes, optional parts and strides for every op, through every backend
that runs on CPU (reference, Triton interpreter, C++) and ``auto``, against the float64 reference on
contiguous copies. A named kernel that does not support a drawn case must refuse it with a
ValueError (and ``auto`` must then run the reference). Bounded: a fixed number of small cases per op
(about a minute on 2 cores in all); the seed is in each failure message.
"""
import random

import pytest
import torch

from cogvideox_kernels import ops
from cogvideox_kernels.ops import registry
from helpers import rel_err, replaced, strided_view, tensor_args, view_kinds

BUDGET = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
CASES = {"rope3d_attention": 20, "expert_ffn": 10, "causal_conv3d": 60}


def draw_attention(r: random.Random, g: torch.Generator):
    dtype = r.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64])
    B, S, H = r.randint(1, 2), r.choice([1, 2, 7, 33, r.randint(1, 70)]), r.randint(1, 3)
    rope = r.random() < 0.7
    D = r.choice([2, 8, 16, 24, 40, 64]) if rope else r.choice([3, 8, 17, 40, 64])
    text_len = r.choice([0, S, r.randint(0, S)])
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(dtype)  # noqa: E731
    cos = sin = None
    if rope:
        angles = (torch.randn(S - text_len, D // 2, generator=g) * 3).double().repeat_interleave(2, dim=1)
        cos, sin = angles.cos().float(), angles.sin().float()

    def norm():
        kind = r.choice(["none", "affine", "weight", "plain"])
        return {"none": None, "affine": (1 + rnd(D, std=0.3), rnd(D, std=0.2)), "weight": (1 + rnd(D, std=0.3), None),
                "plain": (None, None)}[kind]

    return dict(q=rnd(B, S, H, D), k=rnd(B, S, H, D), v=rnd(B, S, H, D), text_len=text_len, cos=cos, sin=sin,
                q_norm=norm(), k_norm=norm(), eps=r.choice([1e-6, 1e-5]),
                scale=r.choice([None, None, 0.2 + r.random()]))


def draw_expert_ffn(r: random.Random, g: torch.Generator):
    dtype = r.choice([torch.float32, torch.float32, torch.bfloat16, torch.float64])
    B, S, Hd, F = r.randint(1, 2), r.choice([1, 5, r.randint(1, 24)]), r.randint(4, 40), r.randint(4, 48)
    nt = r.choice([0, 0, 1, 2, 3])
    nv = r.randint(1, 3) if nt else 0
    E = 1 if nt == 0 else nt + nv
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(dtype)  # noqa: E731
    biases = r.random() < 0.7
    affine = r.random() < 0.7
    router = lambda n: (rnd(n, Hd, std=3.0), rnd(n) if r.random() < 0.7 else None) if nt and n > 1 else None  # noqa: E731
    return dict(x=rnd(B, S, Hd), modulation=rnd(B, 6, Hd, std=0.5), w1=rnd(E, F, Hd, std=Hd ** -0.5),
                b1=rnd(E, F, std=0.1) if biases else None, w2=rnd(E, Hd, F, std=F ** -0.5),
                b2=rnd(E, Hd, std=0.1) if biases else None, text_len=r.choice([0, S, r.randint(0, S)]),
                norm_weight=1 + rnd(Hd, std=0.3) if affine else None, norm_bias=rnd(Hd, std=0.2) if affine else None,
                eps=1e-5, num_text_experts=nt, text_router=router(nt), video_router=router(nv))


def draw_causal_conv3d(r: random.Random, g: torch.Generator):
    dtype = r.choice([torch.float32, torch.float64, torch.bfloat16, torch.float16])
    B, C, C_out, T = r.randint(1, 2), r.randint(1, 9), r.randint(1, 9), r.randint(1, 9)
    H, W = r.randint(1, 7), r.randint(1, 7)
    kt = r.randint(1, 6)
    kh, kw = r.choice([(1, 1), (1, 1), (1, 1), (3, 3), (1, 3)])
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(x=rnd(B, C, T, H, W), weight=rnd(C_out, C, kt, kh, kw) / (C * kt) ** 0.5,
                bias=rnd(C_out) if r.random() < 0.7 else None, stride=r.choice([1, 2, 2, 3]),
                pad_mode=r.choice(["replicate", "zeros"]),
                cache=rnd(B, C, kt - 1, H, W) if kt > 1 and r.random() < 0.4 else None)


DRAW = {"rope3d_attention": draw_attention, "expert_ffn": draw_expert_ffn, "causal_conv3d": draw_causal_conv3d}


def with_random_strides(r: random.Random, inputs: dict) -> dict:
    """Each tensor argument, with probability 1/3, as one of the non-contiguous views (same values,
    or for ``expand`` the first slice repeated: the reference then sees that too)."""
    out = inputs
    for name, index, t in tensor_args(inputs):
        kinds = view_kinds(t) if t.numel() > 1 else []
        if kinds and r.random() < 1 / 3:
            out = replaced(out, name, index, strided_view(t, r.choice(kinds)))
    return out


def compare(op, got, want, dtype, what):
    if op == "causal_conv3d":
        (got, got_cache), (want, want_cache) = got, want
        assert torch.equal(got_cache, want_cache), f"{what}: new cache differs"
    assert got.shape == want.shape and got.dtype == dtype, what
    err = rel_err(got, want)
    assert err <= BUDGET[dtype], f"{what}: rel err {err:.2e} > {BUDGET[dtype]:.0e}"


@pytest.mark.parametrize("op", list(CASES))
def test_fuzz(op, monkeypatch):
    monkeypatch.delenv("COGVIDEOX_KERNELS_BACKEND", raising=False)
    fn, reference = getattr(ops, op), getattr(ops, f"{op}_reference")
    kernels = [k for k, why in registry.availability(op, "cpu").items() if why is None]
    ran = {k: 0 for k in kernels}
    for case in range(CASES[op]):
        seed = 1000 * list(CASES).index(op) + case
        r, g = random.Random(seed), torch.Generator().manual_seed(seed)
        inputs = with_random_strides(r, DRAW[op](r, g))
        dtype = inputs["q" if op == "rope3d_attention" else "x"].dtype
        packed = {k: v.contiguous() if isinstance(v, torch.Tensor) else
                  tuple(t.contiguous() if isinstance(t, torch.Tensor) else t for t in v) if isinstance(v, tuple) else v
                  for k, v in inputs.items()}
        want = reference(**packed, compute_dtype=torch.float64)
        if op == "causal_conv3d":
            want = (want[0], reference(**packed)[1])  # the cache in the input dtype, as every backend returns it
        with torch.no_grad():
            compare(op, fn(**inputs), want, dtype, f"seed {seed} auto ({registry.resolve(op, **inputs)})")
            compare(op, fn(**inputs, backend="reference"), want, dtype, f"seed {seed} reference")
            for kernel in kernels:
                try:
                    got = fn(**inputs, backend=kernel)
                except ValueError as exc:  # a case the kernel does not take: refused, and auto ran the reference
                    assert "does not support these inputs" in str(exc), f"seed {seed} {kernel}: {exc}"
                    continue
                compare(op, got, want, dtype, f"seed {seed} {kernel}")
                ran[kernel] += 1
    assert all(n >= CASES[op] // 4 for n in ran.values()), f"too few cases reached the kernels: {ran}"
