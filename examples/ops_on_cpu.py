"""The three ops at small shapes on CPU tensors, each checked against a float64 run of its reference.

    python examples/ops_on_cpu.py                      # the references and the C++ conv
    TRITON_INTERPRET=1 python examples/ops_on_cpu.py   # also the Triton kernels, in the interpreter

On a GPU, make the same tensors on "cuda" in bf16: backend="auto" (the default) then picks the kernels.
"""
import os

import torch

from cogvideox_kernels import ops


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def f64(*tensors):
    return tuple(t.double() for t in tensors)


torch.manual_seed(0)
interpreter = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
triton = ["triton"] if interpreter else []  # Triton runs CPU tensors only in its interpreter

# --- QK-LayerNorm + RoPE3D + attention ------------------------------------------------------------
B, H, D = 2, 3, 64
text_len, grid = 7, (2, 3, 5)  # 7 text tokens, then a 2 x 3 x 5 grid of video tokens (t, h, w after patchify)
S = text_len + grid[0] * grid[1] * grid[2]
qkv = torch.randn(B, S, 3, H, D)  # a fused QKV projection's output, viewed as [B, S, 3, H, D]
q, k, v = qkv.unbind(2)  # [B, S, H, D] strided views, no copies
sin, cos = ops.rope3d_freqs(*grid, hidden_size=H * D, num_heads=H)  # [30, D] float32 tables
q_norm = (1 + 0.1 * torch.randn(D), 0.1 * torch.randn(D))  # per-head LayerNorm (weight, bias) on q
k_norm = (1 + 0.1 * torch.randn(D), 0.1 * torch.randn(D))

exact = ops.rope3d_attention(*f64(q, k, v), text_len=text_len, cos=cos.double(), sin=sin.double(),
                             q_norm=f64(*q_norm), k_norm=f64(*k_norm), backend="reference")
for backend in ["reference", *triton]:
    out = ops.rope3d_attention(q, k, v, text_len=text_len, cos=cos, sin=sin, q_norm=q_norm, k_norm=k_norm,
                               backend=backend)  # [B, S, H, D]
    err = rel_err(out, exact)
    print(f"rope3d_attention  backend={backend:<9}  out {tuple(out.shape)}  rel err {err:.1e}")
    assert out.shape == (B, S, H, D) and err < 1e-5

# --- expert adaLN + FFN + gate + residual (the FFN half of a CogVideoX block) ---------------------
hidden, inner = 64, 256
x = torch.randn(B, S, hidden)  # [text ; video] tokens
modulation = 0.3 * torch.randn(B, 6, hidden)  # shift, scale, gate for video, then for text (from the timestep)
w1, b1 = torch.randn(1, inner, hidden) * hidden**-0.5, 0.1 * torch.randn(1, inner)  # [E, inner, hidden], [E, inner]
w2, b2 = torch.randn(1, hidden, inner) * inner**-0.5, 0.1 * torch.randn(1, hidden)  # E = 1: one FFN for both
norm_weight, norm_bias = 1 + 0.1 * torch.randn(hidden), 0.1 * torch.randn(hidden)  # the shared LayerNorm

exact = ops.expert_ffn(*f64(x, modulation, w1, b1, w2, b2), text_len=text_len, norm_weight=norm_weight.double(),
                       norm_bias=norm_bias.double(), backend="reference")
for backend in ["reference", *triton]:
    y = ops.expert_ffn(x, modulation, w1, b1, w2, b2, text_len=text_len, norm_weight=norm_weight,
                       norm_bias=norm_bias, backend=backend)  # x + gate_m * FFN(LN(x) * (1 + scale_m) + shift_m)
    err = rel_err(y, exact)
    print(f"expert_ffn        backend={backend:<9}  out {tuple(y.shape)}  rel err {err:.1e}")
    assert y.shape == x.shape and err < 1e-5

# --- causal temporal convolution ------------------------------------------------------------------
C, T = 8, 9
feats = torch.randn(1, C, T, 6, 10)  # [B, C, T, H, W]
weight, bias = torch.randn(C, C, 3, 1, 1) / (3 * C) ** 0.5, 0.1 * torch.randn(C)  # a (kt=3, 1, 1) kernel
exact, _ = ops.causal_conv3d(*f64(feats, weight, bias), stride=2, backend="reference")
for backend in ["reference", "cpp"]:  # "cpp": the compiled extension's CPU path
    y, cache = ops.causal_conv3d(feats, weight, bias, stride=2, backend=backend)  # frame 0 repeated in front
    err = rel_err(y, exact)
    print(f"causal_conv3d     backend={backend:<9}  out {tuple(y.shape)}  rel err {err:.1e}  cache {tuple(cache.shape)}")
    assert y.shape == (1, C, 5, 6, 10) and err < 1e-5  # stride 2 in time: 9 frames -> 5
print("ok")
