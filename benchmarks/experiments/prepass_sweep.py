"""H200 probe: the QK-LayerNorm + RoPE pre-pass of the Hopper attention's full path, piece by piece
(q pre-pass, k pre-pass with row norms, the per-head amax, the kernel) and the pre-pass's rows per
program x warps, at the 5B shape (q, k strided views of a QKV tensor, as the model feeds them).
Each config's output is compared bit for bit with the default's.

    PYTHONPATH=$PWD python3 benchmarks/experiments/prepass_sweep.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, ".."))

from bench_attention import SHAPES, make_inputs  # noqa: E402
from bench_hopper_attention import fa3_fn  # noqa: E402
from cogvideox_kernels.bench.common import environment, time_ms  # noqa: E402
from cogvideox_kernels.ops.attention.hopper import hopper_attention_fwd  # noqa: E402
from cogvideox_kernels.ops.attention.hopper_fwd import hopper_attention_core  # noqa: E402
from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="prepass_sweep_out")
    ap.add_argument("--shape", default="5b")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows, lines = [], []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    env = environment("cuda")
    shape = SHAPES[args.shape]
    inp = make_inputs(shape)
    B, S, H, D = shape["B"], shape["S"], shape["H"], shape["D"]
    eps, scale, tl_ = 1e-6, inp["scale"], inp["text_len"]
    qn, kn = inp["q_norm"], inp["k_norm"]
    nbytes = 2 * B * S * H * D * inp["k"].element_size()  # read + write of one tensor

    def pre(x, w, sq, **kw):
        return qk_norm_rope_fwd(x, tl_, inp["cos"], inp["sin"], w[0], w[1], True, eps, norm_sq=sq, **kw)

    sq = torch.empty((2, B, S, H), dtype=torch.float32, device="cuda")
    ref_k = pre(inp["k"], kn, sq[1])
    ref_sq = sq[1].clone()
    ref_max = ref_sq.amax(dim=1).reshape(-1)
    nmax = torch.zeros(B * H, dtype=torch.float32, device="cuda")
    for head_rows in (False, True):
        for block_r in (32, 64, 128):
            for nw in (2, 4, 8):
                tag = f"{'head rows' if head_rows else 'token rows'} block_r {block_r:4d} warps {nw}"
                if head_rows:
                    def run():
                        return qk_norm_rope_fwd(inp["k"], tl_, inp["cos"], inp["sin"], kn[0], kn[1],
                                                True, eps, norm_max=nmax, block_r=block_r,
                                                num_warps=nw)
                else:
                    def run():
                        return pre(inp["k"], kn, sq[1], block_r=block_r, num_warps=nw)
                sq.fill_(float("nan"))
                nmax.zero_()
                try:
                    y = run()
                except Exception as e:  # noqa: BLE001
                    log(f"{tag}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                same = bool(torch.equal(y, ref_k)) and (
                    bool(torch.equal(nmax, ref_max)) if head_rows else bool(torch.equal(sq[1], ref_sq)))
                ms = time_ms(run, "cuda", rep_ms=300)
                rows.append(dict(head_rows=head_rows, block_r=block_r, num_warps=nw, ms=ms, same=same,
                                 gb_s=nbytes / ms / 1e6))
                log(f"k pre-pass {tag}: {ms:.4f} ms {nbytes / ms / 1e6:6.0f} GB/s same={same}")
    # the full path's pieces
    qh = pre(inp["q"], qn, sq[0])
    kh = pre(inp["k"], kn, sq[1])
    nm = sq.amax(dim=2).reshape(2, B * H)
    nm2 = torch.zeros((2, B * H), dtype=torch.float32, device="cuda")
    out = torch.empty((B, S, H, D), dtype=inp["q"].dtype, device="cuda")
    pieces = {
        "q pre-pass": lambda: pre(inp["q"], qn, sq[0]),
        "k pre-pass": lambda: pre(inp["k"], kn, sq[1]),
        "amax (old path)": lambda: sq.amax(dim=2),
        "zeros (new path)": lambda: nm2.zero_(),
        "q pre-pass head rows + max": lambda: qk_norm_rope_fwd(inp["q"], tl_, inp["cos"], inp["sin"],
                                                              qn[0], qn[1], True, eps,
                                                              norm_max=nm2[0]),
        "kernel": lambda: hopper_attention_core(qh.transpose(1, 2), kh.transpose(1, 2), inp["v"], out,
                                                scale, None, nm, v_token_major=True),
        "full path": lambda: hopper_attention_fwd(inp["q"], inp["k"], inp["v"], tl_, inp["cos"],
                                                  inp["sin"], qn[0], qn[1], kn[0], kn[1], True, True,
                                                  eps, scale),
    }
    fa3 = fa3_fn()
    if fa3 is not None:
        qc, kc, vc = qh.contiguous(), kh.contiguous(), inp["v"].contiguous()
        pieces["FA3 alone (normed q/k, contiguous)"] = lambda: fa3(qc, kc, vc, softmax_scale=scale)
    for name, fn in pieces.items():
        ms = time_ms(fn, "cuda", rep_ms=300 if "pre-pass" in name or "am" in name or "zeros" in name else 1200)
        rows.append(dict(piece=name, ms=ms))
        log(f"{name:12s} {ms:.4f} ms")
    with open(os.path.join(args.out, "prepass_sweep.json"), "w") as f:
        json.dump(dict(env=env, shape=shape, rows=rows), f, indent=1, default=str)
    with open(os.path.join(args.out, "prepass_sweep.log"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
