"""Lead for int8's outlier weakness (issue 15): a block-diagonal Hadamard rotation along K before the int8
rounding (QuaRot-style; h W^T = (h R)(W R)^T with R orthogonal, W R quantized once per weight version).
Rotation spreads an outlier channel over its block, so a row's amax no longer starves the other
channels. Float32 emulation with the kernels' bf16 roundings, inputs as int8_ffn_emulate.py.

    python benchmarks/experiments/int8_ffn_rotate.py [--video 1000] [--block 128]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import int8_ffn_emulate as emu  # noqa: E402

from cogvideox_kernels.ops.expert_ffn import int8  # noqa: E402
from cogvideox_kernels.ops.expert_ffn.reference import modulated_norm_reference  # noqa: E402

bf = emu.bf
q = int8.int8_round_trip


def hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n ** 0.5


def rot(t, H):
    """t [..., K] times the block-diagonal diag(H, H, ...) (K a multiple of H's size)."""
    b = H.shape[0]
    return (t.reshape(*t.shape[:-1], -1, b) @ H).reshape(t.shape)


def path(a, H, gemm1=True, gemm2=True, center=False):
    """center: GEMM2's input loses its row mean before rotation (the mean comes back as mean * sum_k W2,
    an epilogue term), so the GELU output's positive mean does not pile up in one coefficient per block."""
    up = {k: v.float() if torch.is_tensor(v) else v for k, v in a.items()}
    x, w1, b1, w2, b2 = up["x"], up["w1"][0], up["b1"][0], up["w2"][0], up["b2"][0]
    h, gate = modulated_norm_reference(x, up["modulation"], a["text_len"], up["norm_weight"], up["norm_bias"], 1e-5)
    r1 = (lambda t: rot(t, H)) if gemm1 else (lambda t: t)
    r2 = (lambda t: rot(t, H)) if gemm2 else (lambda t: t)
    y = bf(F.linear(q(r1(h)), q(r1(w1))))
    inter = F.gelu(y + b1, approximate="tanh")
    w2r = q(r2(w2))
    if center:
        mean = inter.mean(dim=-1, keepdim=True)
        f = F.linear(q(r2(inter - mean)), w2r) + mean * rot(w2r, H.t()).sum(dim=-1) + b2
    else:
        f = F.linear(q(r2(inter)), w2r) + b2
    return bf(x + gate * f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--video", type=int, default=1000)
    p.add_argument("--block", type=int, default=128)
    args = p.parse_args()
    emu.bench.DEVICE = "cpu"
    H = hadamard(args.block)
    print(f"| inputs | fp8 / bf16 | int8 / bf16 | int8, rotated GEMM1 / bf16 | int8, both rotated / bf16 | "
          f"int8, both rotated, GEMM2 centered / bf16 | (block {args.block})")
    print("| --- " * 6 + "|")
    for kind in emu.KINDS:
        a = emu.bench.make_inputs(1, 226, args.video, 3072, 12288, seed=5, kind=kind)
        ref = emu.bench.reference(a)
        e = {k: emu.bench.metrics(emu.path(a, k), ref)["rel_err"] for k in ("bf16", "fp8", "int8")}
        e["r1"] = emu.bench.metrics(path(a, H, True, False), ref)["rel_err"]
        e["r12"] = emu.bench.metrics(path(a, H, True, True), ref)["rel_err"]
        e["r12c"] = emu.bench.metrics(path(a, H, True, True, center=True), ref)["rel_err"]
        print(f"| {kind} | {e['fp8'] / e['bf16']:.2f}x | {e['int8'] / e['bf16']:.2f}x | {e['r1'] / e['bf16']:.2f}x | "
              f"{e['r12'] / e['bf16']:.2f}x | {e['r12c'] / e['bf16']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
