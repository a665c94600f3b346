"""H200 probe: the Hopper attention with the score-bound (fixed-max) softmax against the running-max
softmax and FA3, in one process. Needs an H100/H200 and (for FA3) the fa3-fwd wheel.

    PYTHONPATH=$PWD python3 benchmarks/experiments/hopper_bound_probe.py --out DIR [--next]
        [--next-only "prescaled control,prescaled poly"]

Per shape (5B, 1.5-5B, head_dim 128): q, k, v are strided views of a bf16 QKV tensor with QK
LayerNorm + RoPE3D on (``bench_attention.make_inputs``). Rows: FA3 alone on the normed contiguous
q/k/v; our kernel alone (pre-pass outside the timing) with and without the bound, for a few
configs; the full path (pre-pass + kernel) with and without the bound. Every output is written
into a NaN-filled buffer and checked against a float64 reference on sampled rows. Also prints the
bound T (log2 units) of each shape's inputs: the fixed-max path runs where T <= 80.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, ".."))

from bench_hopper_attention import fa3_fn  # noqa: E402
from bench_attention import SHAPES, make_inputs, reference_rows, rel_error, sample_rows  # noqa: E402
from cogvideox_kernels.bench.common import environment, time_ms  # noqa: E402
from cogvideox_kernels.ops.attention.hopper import hopper_attention_fwd  # noqa: E402
from cogvideox_kernels.ops.attention.hopper_fwd import (LOG2E, default_config,  # noqa: E402
                                                        hopper_attention_core)
from cogvideox_kernels.ops.attention.reference import attention_flops  # noqa: E402
from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd  # noqa: E402

SHAPES = dict(SHAPES)
SHAPES["d128"] = dict(B=2, H=24, S=17776, D=128, text_len=226, grid=(13, 30, 45))
# BLOCK_N 64 with 6 / 8 stages at head_dim 64: +0.6-0.7 ms (e571047), dropped from the sweep
# STAGES 6 at head_dim 64 needs 246 KB of shared memory (limit 227 KB)
KERNEL_CONFIGS = {64: [{}, dict(STAGES=3), dict(STAGES=5)],
                  128: [{}, dict(STAGES=3), dict(STAGES=5)]}


def run_shape(name, results, log):
    shape = SHAPES[name]
    B, H, S, D = shape["B"], shape["H"], shape["S"], shape["D"]
    flops = attention_flops(B, S, H, D)
    inp = make_inputs(shape)
    rows = sample_rows(S, shape["text_len"], count=192)
    ref = reference_rows(inp, rows)
    eps, scale = 1e-6, inp["scale"]
    rep = 400 if S < 30000 else 1200
    fa3_ms = None

    def record(method, ms, err, **extra):
        row = dict(shape=name, method=method, ms=ms, err=err, tflops=flops / ms / 1e9,
                   vs_fa3=None if fa3_ms is None else ms / fa3_ms, **extra)
        results.append(row)
        ratio = "" if row["vs_fa3"] is None else f"{row['vs_fa3']:.3f}x FA3"
        log(f"  {method:44s} {ms:8.3f} ms {row['tflops']:6.1f} TF/s err {err:.2e} {ratio}")

    qn, kn = inp["q_norm"], inp["k_norm"]
    norm_sq = torch.empty((2, B, S, H), dtype=torch.float32, device="cuda")
    qh = qk_norm_rope_fwd(inp["q"], inp["text_len"], inp["cos"], inp["sin"], qn[0], qn[1], True,
                          eps, norm_sq=norm_sq[0])
    kh = qk_norm_rope_fwd(inp["k"], inp["text_len"], inp["cos"], inp["sin"], kn[0], kn[1], True,
                          eps, norm_sq=norm_sq[1])
    norm_max = norm_sq.amax(dim=2).reshape(2, B * H)
    vh = qk_norm_rope_fwd(inp["v"], 0, None, None, None, None, False, eps)
    pre_ms = time_ms(lambda: qk_norm_rope_fwd(inp["k"], inp["text_len"], inp["cos"], inp["sin"],
                                              kn[0], kn[1], True, eps, norm_sq=norm_sq[1]),
                     "cuda", rep_ms=rep)
    log(f"  pre-pass of k with norms: {pre_ms:.3f} ms")
    bound = (norm_max[0] * norm_max[1]).sqrt() * scale * LOG2E * 1.01
    log(f"  bound T (log2 units): min {bound.min().item():.1f} max {bound.max().item():.1f} "
        f"(fixed max where T <= 80)")
    results.append(dict(shape=name, method="bound", T_min=bound.min().item(),
                        T_max=bound.max().item()))

    fa3 = fa3_fn()
    if fa3 is not None:
        qc, kc, vc = qh.contiguous(), kh.contiguous(), vh.contiguous()
        out = fa3(qc, kc, vc, softmax_scale=scale)
        out = out[0] if isinstance(out, tuple) else out
        fa3_ms = time_ms(lambda: fa3(qc, kc, vc, softmax_scale=scale), "cuda", rep_ms=rep)
        record("FA3 alone (normed q/k, contiguous)", fa3_ms, rel_error(out, ref, rows))
        del qc, kc, vc, out

    qt, kt, vt = qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
    # q with scale * log2(e) folded in by the pre-pass (hopper.PRESCALE_Q): 2^score straight from
    # the accumulator for the bounded heads
    norm_sq_p = torch.empty((B, S, H), dtype=torch.float32, device="cuda")
    qp = qk_norm_rope_fwd(inp["q"], inp["text_len"], inp["cos"], inp["sin"], qn[0], qn[1], True,
                          eps, norm_sq=norm_sq_p, out_scale=scale * LOG2E).transpose(1, 2)
    nm_p = torch.stack([norm_sq_p.amax(dim=1).reshape(B * H), norm_max[1]]).contiguous()
    out = torch.full((B, S, H, D), float("nan"), dtype=qh.dtype, device="cuda")
    hopper_attention_core(qp, kt, vt, out, scale, None, nm_p, q_prescaled=True)
    torch.cuda.synchronize()
    ms = time_ms(lambda: hopper_attention_core(qp, kt, vt, out, scale, None, nm_p, q_prescaled=True),
                 "cuda", rep_ms=rep)
    record("kernel default bound, q prescaled", ms, rel_error(out, ref, rows), prescaled=True)
    del qp, out
    for cfg in KERNEL_CONFIGS[D]:
        full_cfg = {**default_config(D), **cfg}
        for bounded in ((True, False) if not cfg else (True,)):
            nm = norm_max if bounded else None
            out = torch.full((B, S, H, D), float("nan"), dtype=qh.dtype, device="cuda")
            try:
                hopper_attention_core(qt, kt, vt, out, scale, full_cfg, nm)
                torch.cuda.synchronize()
            except Exception as e:
                log(f"  kernel {full_cfg} bounded={bounded}: {type(e).__name__}: {str(e)[:200]}")
                continue
            err = rel_error(out, ref, rows)
            ms = time_ms(lambda: hopper_attention_core(qt, kt, vt, out, scale, full_cfg, nm),
                         "cuda", rep_ms=rep)
            tag = ",".join(f"{k}{v}" for k, v in cfg.items()) or "default"
            record(f"kernel {tag} {'bound' if bounded else 'running-max'}", ms, err,
                   config=full_cfg, bounded=bounded)
    del out
    for cfg in ([None, dict(PRESCALE_Q=False), dict(SCORE_BOUND=False)]
                + [c for c in KERNEL_CONFIGS[D] if c]):
        bounded = (cfg or {}).get("SCORE_BOUND", True)

        def full():
            return hopper_attention_fwd(inp["q"], inp["k"], inp["v"], inp["text_len"], inp["cos"],
                                        inp["sin"], qn[0], qn[1], kn[0], kn[1], True, True, eps,
                                        scale, config=cfg)
        try:
            out = full()
        except Exception as e:  # noqa: BLE001
            log(f"  full path {cfg}: {type(e).__name__}: {str(e)[:200]}")
            continue
        ms = time_ms(full, "cuda", rep_ms=rep)
        tag = ",".join(f"{k}{v}" for k, v in (cfg or {}).items()) or "default"
        record(f"full path {tag} (LN+RoPE+attn, V in place)", ms, rel_error(out, ref, rows),
               bounded=bounded, config=cfg)
    if NEXT:
        import hopper_attention_next as nx

        for vname, kw in {"next base": {}, **{f"next {k}": v for k, v in nx.VARIANTS.items()}}.items():
            if NEXT_ONLY and not any(sub in vname for sub in NEXT_ONLY):
                continue
            def run_next(check=False):
                return nx.attention_next(inp["q"], inp["k"], inp["v"], inp["text_len"], inp["cos"],
                                         inp["sin"], qn, kn, eps, scale, check_bound=check, **kw)
            try:
                out = run_next(True)
                torch.cuda.synchronize()
            except Exception as e:
                log(f"  {vname}: {type(e).__name__}: {str(e)[:300]}")
                continue
            ms = time_ms(run_next, "cuda", rep_ms=rep)
            record(f"full path {vname} (LN+RoPE+attn)", ms, rel_error(out, ref, rows), variant=kw)
    del inp, qh, kh, vh, ref, out
    torch.cuda.empty_cache()


NEXT = False
NEXT_ONLY: list[str] = []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="hopper_bound_out")
    ap.add_argument("--shapes", default="5b,d128")
    ap.add_argument("--next", action="store_true",
                    help="also time hopper_attention_next.py's variants (ping-pong, fused q prologue)")
    ap.add_argument("--next-only", default="",
                    help="with --next: only the variants whose name contains one of these "
                         "comma-separated strings")
    args = ap.parse_args()
    global NEXT, NEXT_ONLY
    NEXT = args.next
    NEXT_ONLY = [x for x in args.next_only.split(",") if x]
    sys.path.insert(0, HERE)
    os.makedirs(args.out, exist_ok=True)
    lines, results = [], []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    env = environment("cuda")
    log(json.dumps(env))
    for name in args.shapes.split(","):
        log(f"== {name} {SHAPES[name]}")
        run_shape(name, results, log)
        with open(os.path.join(args.out, "hopper_bound_probe.json"), "w") as f:
            json.dump(dict(env=env, results=results), f, indent=1, default=str)
    with open(os.path.join(args.out, "hopper_bound_probe.log"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
