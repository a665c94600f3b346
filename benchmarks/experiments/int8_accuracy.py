"""Where the 8-bit attention's error on the hard inputs comes from, and what fixes it (issue 15).

    PYTHONPATH=$PWD python benchmarks/experiments/int8_accuracy.py [--S 4096] [--H 4]

CPU, float32 maths of what the kernel computes (as ``int8_prepass.int8_attention_reference``),
with each quantization switched on/off and candidate fixes (finer k scales, q scales per channel
group, a per-head Hadamard rotation of q and k). Inputs: ``attention_quality``'s ``model`` and
``hard`` sets at a reduced shape; error against float64 on sampled rows. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from attention_quality import hard_inputs, metrics  # noqa: E402
from bench_attention import make_inputs, reference_rows, sample_rows  # noqa: E402
from cogvideox_kernels.ops.attention.reference import qk_norm_rope_reference  # noqa: E402


def hadamard(n, signs_seed=None):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    h = h / n ** 0.5
    if signs_seed is not None:
        g = torch.Generator().manual_seed(signs_seed)
        h = h * (torch.randint(0, 2, (n,), generator=g) * 2 - 1).double()[:, None]
    return h


def rnd(x):
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))


def quant(x, group_rows, group_cols):
    """x [B, H, S, D] float64 -> dequantized int8 with one scale per (group_rows tokens x
    group_cols channels); 0 = whole dim."""
    B, H, S, D = x.shape
    gr = group_rows or S
    gc = group_cols or D
    pad = (-S) % gr
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, H, -1, gr, D // gc, gc)
    amax = xp.abs().amax((3, 5), keepdim=True)
    sc = torch.where(amax > 0, amax / 127, 1.0).float().double()  # scales are float32
    y = rnd(xp / sc).clamp(-127, 127) * sc
    return y.view(B, H, -1, D)[:, :, :S]


def quant_split(x, group_rows, group_cols, lo_bits=7):
    """k as two INT8 parts sharing one scale (the kernel's K_SPLIT): hi = round(x / s),
    lo = round((x / s - hi) * 2^lo_bits) (|lo| <= 2^(lo_bits - 1)); dequantized s (hi + lo / 2^lo_bits)."""
    B, H, S, D = x.shape
    gr = group_rows or S
    gc = group_cols or D
    pad = (-S) % gr
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, H, -1, gr, D // gc, gc)
    amax = xp.abs().amax((3, 5), keepdim=True)
    sc = torch.where(amax > 0, amax / 127, 1.0).float().double()
    y = xp / sc
    hi = rnd(y).clamp(-127, 127)
    lo = rnd((y - hi) * 2 ** lo_bits).clamp(-127, 127)
    return ((hi + lo / 2 ** lo_bits) * sc).view(B, H, -1, D)[:, :, :S]


def emulate(inp, *, q_quant=(1, 0), k_quant=(128, 0), p_round=True, rotate=None, qk16=False,
            block_mean=0, k_split=False):
    """float64 attention out [B, S, H, D] from the quantized q, k (None: no quantization)."""
    args = (inp["text_len"], inp["cos"], inp["sin"])
    qw = qk_norm_rope_reference(inp["q"], *args, inp["q_norm"], 1e-6, torch.float32)
    kw = qk_norm_rope_reference(inp["k"], *args, inp["k_norm"], 1e-6, torch.float32)
    if qk16:  # what the bf16 path multiplies
        qw, kw = qw.to(torch.bfloat16), kw.to(torch.bfloat16)
    qw, kw = (t.transpose(1, 2).double() for t in (qw, kw))
    v = inp["v"].transpose(1, 2).double()
    kw = kw - kw.mean(2, keepdim=True)
    if rotate is not None:
        qw, kw = qw @ rotate, kw @ rotate
    bias = 0.0
    if block_mean:  # k - (mean of its block of keys); q . mean added back per (row, block)
        B, H, S, D = kw.shape
        pad = (-S) % block_mean
        kb = torch.nn.functional.pad(kw, (0, 0, 0, pad)).view(B, H, -1, block_mean, D)
        n = torch.full((kb.shape[2],), float(block_mean), dtype=kw.dtype)
        n[-1] = block_mean - pad
        mb = kb.sum(3) / n[:, None]  # [B, H, nb, D]
        mb = mb.float().double()
        kw = (kb - mb[:, :, :, None]).view(B, H, -1, D)[:, :, :S]
    if q_quant is not None:
        qw = quant(qw, *q_quant)
    if block_mean:
        bias = (qw @ mb.transpose(-1, -2)).float().double().repeat_interleave(block_mean, -1)[..., :S]
    if k_quant is not None:
        hi = quant(kw, *k_quant)
        # k_split: k as two INT8 terms (hi + the residual's own INT8), i.e. two s8 GEMMs
        if k_split == "pow2":
            hi = quant_split(kw, *k_quant)
        elif k_split == "pow2_6":
            hi = quant_split(kw, *k_quant, lo_bits=6)
        kw = hi + quant(kw - hi, *k_quant) if k_split is True else hi
    s = (qw @ kw.transpose(-1, -2) + bias) * inp["scale"]
    p = torch.exp(s - s.amax(-1, keepdim=True))
    pq = p.to(torch.bfloat16).double() if p_round else p
    out = (pq @ v) / p.sum(-1, keepdim=True)
    return out.transpose(1, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--rows", type=int, default=384)
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names")
    a = ap.parse_args()
    D, text_len = 64, 96
    w = (a.S - text_len) // 80
    shape = dict(B=1, H=a.H, S=text_len + 4 * 20 * w, D=D, text_len=text_len, grid=(4, 20, w))
    from cogvideox_kernels.ops.attention.int8_prepass import rotation_matrix
    Hship = rotation_matrix(D).double()
    Hd = hadamard(D)
    Hs = hadamard(D, signs_seed=0)
    H32 = torch.block_diag(hadamard(32), hadamard(32))
    cands = [
        ("int8 as shipped (q per token, k per 128 keys, bf16 P)", {}),
        ("q, k exact (bf16 P only)", dict(q_quant=None, k_quant=None)),
        ("q exact", dict(q_quant=None)),
        ("k exact", dict(k_quant=None)),
        ("P exact (float32)", dict(p_round=False)),
        ("k per key", dict(k_quant=(1, 0))),
        ("k per 64 keys", dict(k_quant=(64, 0))),
        ("k per 128 keys x 32 channels", dict(k_quant=(128, 32))),
        ("q per token x 32 channels", dict(q_quant=(1, 32))),
        ("q per token x 16 channels", dict(q_quant=(1, 16))),
        ("q x 32 ch, k per key", dict(q_quant=(1, 32), k_quant=(1, 0))),
        ("Hadamard 64 on q, k", dict(rotate=Hd)),
        ("Hadamard 64 with random signs", dict(rotate=Hs)),
        ("Hadamard 32 (block-diagonal)", dict(rotate=H32)),
        ("Hadamard 64 + k per key", dict(rotate=Hd, k_quant=(1, 0))),
        ("Hadamard 64 + k per 64 keys", dict(rotate=Hd, k_quant=(64, 0))),
        ("Hadamard 64 + q x 32 ch", dict(rotate=Hd, q_quant=(1, 32))),
        ("k block-mean 128 smoothing (+ q.mean per row, block)", dict(block_mean=128)),
        ("k block-mean 16", dict(block_mean=16, k_quant=(16, 0))),
        ("Hadamard+signs + k block-mean 128", dict(rotate=Hs, block_mean=128)),
        ("Hadamard+signs + k block-mean 64, k per 64", dict(rotate=Hs, block_mean=64, k_quant=(64, 0))),
        ("Hadamard+signs + k block-mean 128 + k per key", dict(rotate=Hs, block_mean=128, k_quant=(1, 0))),
        ("shipped rotation (ROTATE=True)", dict(rotate=Hship)),
        ("shipped rotation + k per key", dict(rotate=Hship, k_quant=(1, 0))),
        ("k as two INT8 terms (hi + lo, two s8 GEMMs)", dict(k_split=True)),
        ("shipped rotation + k as two INT8 terms", dict(rotate=Hship, k_split=True)),
        ("k as two INT8 parts, one scale: hi + lo / 2^7 (K_SPLIT)", dict(k_split="pow2")),
        ("shipped rotation + k as hi + lo / 2^7 (ROTATE + K_SPLIT)", dict(rotate=Hship, k_split="pow2")),
        ("shipped rotation + k as hi + lo / 2^6", dict(rotate=Hship, k_split="pow2_6")),
        ("shipped rotation, k exact", dict(rotate=Hship, k_quant=None)),
        ("Hadamard+signs, q exact", dict(rotate=Hs, q_quant=None)),
        ("Hadamard+signs, k exact", dict(rotate=Hs, k_quant=None)),
        ("Hadamard+signs + k per key", dict(rotate=Hs, k_quant=(1, 0))),
        ("Hadamard+signs + k per 16 keys", dict(rotate=Hs, k_quant=(16, 0))),
        ("Hadamard+signs + k per 32 keys", dict(rotate=Hs, k_quant=(32, 0))),
        ("Hadamard+signs + k per 64 keys", dict(rotate=Hs, k_quant=(64, 0))),
        ("Hadamard+signs + k per key + q x 32 ch", dict(rotate=Hs, k_quant=(1, 0), q_quant=(1, 32))),
    ]
    if a.only:
        cands = [c for c in cands if any(o in c[0] for o in a.only.split(","))]
    rows_out = []
    for name, make in (("model", make_inputs), ("hard", hard_inputs)):
        inp = make(shape, device="cpu")
        rows = sample_rows(shape["S"], text_len, count=a.rows)
        ref = reference_rows(inp, rows)
        from cogvideox_kernels import ops
        args = dict(text_len=text_len, cos=inp["cos"], sin=inp["sin"], q_norm=inp["q_norm"],
                    k_norm=inp["k_norm"], scale=inp["scale"])
        bf = ops.rope3d_attention_reference(inp["q"], inp["k"], inp["v"], **args,
                                            compute_dtype=torch.bfloat16)
        m = metrics(bf, ref, rows)
        rows_out.append((name, "bf16 reference (bf16 math)", m))
        print(name, "bf16", m, flush=True)
        em = ops.rope3d_attention(inp["q"], inp["k"], inp["v"], **args, precision="int8",
                                  backend="reference")
        rows_out.append((name, "int8 emulation (shipped, int8_attention_reference)",
                         metrics(em, ref, rows)))
        for cname, kw in cands:
            m = metrics(emulate(inp, **kw), ref, rows)
            rows_out.append((name, cname, m))
            print(name, cname, m, flush=True)
    print(f"\nshape B1 H{a.H} S{shape['S']} D64, {len(rows)} rows\n")
    print("| inputs | variant | rel err | x bf16 | cosine | max abs |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = {n: m["rel"] for n, c, m in rows_out if c.startswith("bf16")}
    for n, c, m in rows_out:
        print(f"| {n} | {c} | {m['rel']:.3e} | {m['rel'] / base[n]:.2f} | {m['cos']:.6f} | "
              f"{m['max_abs']:.3e} |")


if __name__ == "__main__":
    main()
