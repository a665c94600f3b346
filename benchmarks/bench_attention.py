"""Benchmark: fused QK-norm + RoPE3D + attention (Triton) against SDPA backends and a
diffusers-style path, at the CogVideoX shapes of DESIGN.md. Needs a CUDA GPU.

    PYTHONPATH=$PWD python3 benchmarks/bench_attention.py --out DIR [--sweep] [--shapes 5b,2b,1.5-5b]

Every method's output is checked against a float64 reference on sampled query rows (all keys), so
parity comes from the same run as the timings. ``--sweep`` also times a list of kernel configs
(blocks, warps, stages, TMA, warp specialization, q prologue vs pre-pass) at the 5B shape.
``run_attention_bench(shapes, out_dir)`` is the entry point for the CLI bench.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cogvideox_kernels.bench.common import environment, time_ms  # noqa: E402
from cogvideox_kernels.bench.presets import MODELS  # noqa: E402
from cogvideox_kernels.ops.attention import rope3d_attention  # noqa: E402
from cogvideox_kernels.ops.attention.reference import attention_flops, qk_norm_rope_reference  # noqa: E402
from cogvideox_kernels.ops.rope import rope3d_freqs  # noqa: E402

PEAK_TFLOPS = 790.0  # measured bf16 matmul ceiling on the H100 (CONVENTIONS.md)

# name -> B, H, S, D, text_len, latent grid (t, h, w) for RoPE or None (bench/presets.py)
SHAPES = {m.name: dict(B=m.batch, H=m.num_heads, S=m.seq_len, D=m.head_dim, text_len=m.text_len,
                       grid=m.grid if m.rope else None) for m in (MODELS["5b"], MODELS["2b"], MODELS["1.5-5b"])}


# ----------------------------------------------------------------------------------------------
# inputs, reference, baselines
# ----------------------------------------------------------------------------------------------
def make_inputs(shape: dict, dtype=torch.bfloat16, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    B, H, S, D, text_len = shape["B"], shape["H"], shape["S"], shape["D"], shape["text_len"]
    qkv = torch.randn(B, S, 3, H, D, device=device, dtype=torch.float32, generator=g).to(dtype)
    q, k, v = qkv.unbind(2)  # strided [B, S, H, D] views, as the QKV projection gives them
    cos = sin = None
    if shape["grid"] is not None:
        t, hh, ww = shape["grid"]
        sin, cos = rope3d_freqs(t, hh, ww, hidden_size=H * D, num_heads=H, device=device)
        assert cos.shape[0] == S - text_len
    # trained-looking LayerNorm affine: near 1 and near 0
    norm = lambda: ((1 + 0.1 * torch.randn(D, device=device, generator=g)).to(dtype),  # noqa: E731
                    (0.1 * torch.randn(D, device=device, generator=g)).to(dtype))
    return dict(qkv=qkv, q=q, k=k, v=v, text_len=text_len, cos=cos, sin=sin, q_norm=norm(),
                k_norm=norm(), scale=D ** -0.5)


def sample_rows(S: int, text_len: int, count: int = 256, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    fixed = torch.tensor([0, max(text_len - 1, 0), min(text_len, S - 1), S // 2, S - 1])
    rows = torch.cat((fixed, torch.randint(0, S, (count,), generator=g)))
    return torch.unique(rows)


@torch.no_grad()
def reference_rows(inp: dict, rows: torch.Tensor, with_norm_rope: bool = True) -> torch.Tensor:
    """float64 attention output [B, R, H, D] for the query rows ``rows`` (all keys)."""
    q, k, v = inp["q"], inp["k"], inp["v"]
    rows = rows.to(q.device)
    if with_norm_rope:
        args = (inp["text_len"], inp["cos"], inp["sin"])
        qw = qk_norm_rope_reference(q, *args, inp["q_norm"], 1e-6, torch.float64)
        kw = qk_norm_rope_reference(k, *args, inp["k_norm"], 1e-6, torch.float64)
    else:
        qw, kw = q.double(), k.double()
    outs = []
    for b in range(q.shape[0]):
        scores = torch.einsum("rhd,shd->hrs", qw[b, rows], kw[b]) * inp["scale"]
        p = torch.softmax(scores, dim=-1)
        del scores
        outs.append(torch.einsum("hrs,shd->rhd", p, v[b].double()))
        del p
    del qw, kw
    return torch.stack(outs)


def rel_error(out: torch.Tensor, ref_rows: torch.Tensor, rows: torch.Tensor) -> float:
    o = out[:, rows.to(out.device)].double()
    if not torch.isfinite(o).all():
        return float("inf")
    return ((o - ref_rows).norm() / ref_rows.norm()).item()


def rope_diffusers_style(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' apply_rotary_emb (use_real_unbind_dim=-1) on [B, H, N, D]: float32 math, cast back."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def diffusers_style_path(q, k, v, *, text_len, cos, sin, q_norm, k_norm, scale, eps=1e-6):
    """What diffusers' CogVideoX attention processor does around SDPA (bf16 LayerNorm on q/k,
    out-of-place RoPE written back into the video slice, default SDPA, transpose + reshape)."""
    B, S, H, D = q.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q = F.layer_norm(q, (D,), q_norm[0], q_norm[1], eps)
    k = F.layer_norm(k, (D,), k_norm[0], k_norm[1], eps)
    if cos is not None:
        q[:, :, text_len:] = rope_diffusers_style(q[:, :, text_len:], cos, sin)
        k[:, :, text_len:] = rope_diffusers_style(k[:, :, text_len:], cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(B, S, H, D)


def sdpa_alone(q, k, v, scale, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    with sdpa_kernel([which]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), scale=scale).transpose(1, 2)


def ours(inp, **overrides):
    # forced configs and the measured-slower launch options (q prologue, k/v in place, polynomial
    # exp2) run the experimental copy of the kernel
    from experiments.attention_variants import attention_variant_fwd as rope3d_attention_fwd

    if not overrides:
        return rope3d_attention(inp["q"], inp["k"], inp["v"], text_len=inp["text_len"],
                                cos=inp["cos"], sin=inp["sin"], q_norm=inp["q_norm"],
                                k_norm=inp["k_norm"], scale=inp["scale"], backend="triton")
    with_norm_rope = overrides.pop("with_norm_rope", True)
    qn = inp["q_norm"] if with_norm_rope else (None, None)
    kn = inp["k_norm"] if with_norm_rope else (None, None)
    cos = inp["cos"] if with_norm_rope else None
    sin = inp["sin"] if with_norm_rope else None
    return rope3d_attention_fwd(inp["q"], inp["k"], inp["v"], inp["text_len"], cos, sin, qn[0],
                                qn[1], kn[0], kn[1], with_norm_rope, with_norm_rope, 1e-6,
                                inp["scale"], **overrides)


# ----------------------------------------------------------------------------------------------
# config sweep (5B shape) and the main table
# ----------------------------------------------------------------------------------------------
# Run 1 (commit c9ab6e6, results in benchmarks/results/attention_sweep_run1.*) swept blocks, warps,
# stages, TMA, warp specialization, an FMA-pipe exp2 and maxnreg with q normed in the attention
# prologue. It showed that registers (1 vs 2 CTAs per SM) and the K layout decide the time; this
# sweep compares the layouts and the best configs from it.
# (BLOCK_M, BLOCK_N, warps, stages, TMA, warp-specialize, FMA-pipe exp2 on half of P, maxnreg)
SWEEP = [
    # k, v written head-major by the pre-pass, q normed/rotated by the pre-pass (the default)
    ((128, 64, 8, 3, True, False, False, None), {}),
    ((128, 64, 8, 3, False, False, False, None), {}),
    ((128, 64, 8, 4, True, False, False, None), {}),
    ((128, 64, 8, 2, True, False, False, None), {}),
    ((64, 64, 4, 3, True, False, False, None), {}),
    ((64, 128, 4, 3, True, False, False, None), {}),
    ((128, 128, 8, 3, True, False, False, None), {}),
    ((128, 128, 8, 2, True, False, False, None), {}),
    ((128, 64, 4, 3, True, False, False, None), {}),
    ((128, 64, 8, 3, True, False, True, None), {}),
    ((64, 64, 4, 3, True, False, True, None), {}),
    ((128, 64, 8, 3, True, True, False, None), {}),
    # k [B, S, H, D] from the pre-pass, v read in place (run 1's best)
    ((128, 64, 8, 3, True, False, False, None), dict(relayout_kv=False)),
    ((128, 64, 8, 3, False, False, False, None), dict(relayout_kv=False)),
    # q normed/rotated in the attention prologue
    ((128, 64, 8, 3, True, False, False, None), dict(q_prologue=True)),
    ((128, 64, 8, 3, True, False, False, 128), dict(q_prologue=True)),
]


def _cfg(bm, bn, w, s, tma=False, ws=False, poly=False, maxnreg=None):
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, USE_TMA=tma,
               WARP_SPECIALIZE=ws, POLY_EXP=poly)
    if maxnreg:
        cfg["maxnreg"] = maxnreg
    return cfg


def _cfg_name(c):
    bm, bn, w, s, tma, ws, poly, maxnreg = c
    return (f"bm{bm} bn{bn} w{w} s{s}" + (" tma" if tma else "") + (" ws" if ws else "")
            + (" polyexp" if poly else "") + (f" maxnreg{maxnreg}" if maxnreg else ""))


def run_sweep(out_dir: str, shape_name: str = "5b", log=print, time_budget_s=90) -> list[dict]:
    from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd

    shape = SHAPES[shape_name]
    inp = make_inputs(shape)
    rows = sample_rows(shape["S"], shape["text_len"])
    ref = reference_rows(inp, rows)
    ref_plain = reference_rows(inp, rows, with_norm_rope=False)
    flops = attention_flops(shape["B"], shape["S"], shape["H"], shape["D"])
    results = []

    def record(name, fn, ref_rows_, **extra):
        row = dict(shape=shape_name, variant=name, **extra)
        try:
            t0 = time.time()
            out = fn()
            torch.cuda.synchronize()
            row["compile_s"] = round(time.time() - t0, 2)
            row["rel_err"] = rel_error(out, ref_rows_, rows) if ref_rows_ is not None else None
            del out
            ms = time_ms(fn, "cuda", rep_ms=300)
            row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
        except Exception as e:  # keep sweeping: record why a variant failed
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        log(json.dumps(row))
        results.append(row)
        with open(os.path.join(out_dir, "attention_sweep.json"), "w") as f:
            json.dump(results, f, indent=1)

    t_start = time.time()
    for c, launch in SWEEP:
        name = ("fused " + ("q-prologue " if launch.get("q_prologue") else "")
                + ("kv-in-place " if launch.get("relayout_kv") is False else "") + _cfg_name(c))
        if time.time() - t_start > time_budget_s:
            log(f"sweep: time budget of {time_budget_s} s spent, skipping {name}")
            continue
        record(name, lambda c=c, launch=launch: ours(inp, config=_cfg(*c), **launch), ref,
               config=list(c), **{k: str(v) for k, v in launch.items()})
    for relayout in (True, False):
        c = (128, 64, 8, 3, True, False, False, None)
        record(f"attention only (no norm/rope), relayout_kv={relayout} " + _cfg_name(c),
               lambda c=c, r=relayout: ours(inp, config=_cfg(*c), with_norm_rope=False,
                                            relayout_kv=r), ref_plain, config=list(c))
    for block_r in (32, 64, 128):
        record(f"pre-pass alone: k norm+rope, head-major, BLOCK_R {block_r}",
               lambda b=block_r: qk_norm_rope_fwd(inp["k"], inp["text_len"], inp["cos"], inp["sin"],
                                                  inp["k_norm"][0], inp["k_norm"][1], True, 1e-6,
                                                  block_r=b), None)
    record("pre-pass alone: v copy, head-major",
           lambda: qk_norm_rope_fwd(inp["v"], 0, None, None, None, None, False, 1e-6), None)
    del inp, ref, ref_plain
    torch.cuda.empty_cache()
    return results


def run_attention_bench(shapes, out_dir: str, log=print) -> list[dict]:
    """Time ours and the baselines at each named shape; returns one dict per (shape, method)."""
    os.makedirs(out_dir, exist_ok=True)
    env = environment("cuda")
    results = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        B, H, S, D = shape["B"], shape["H"], shape["S"], shape["D"]
        flops = attention_flops(B, S, H, D)
        rep = 300 if S < 30000 else 800
        inp = make_inputs(shape)
        rows = sample_rows(S, shape["text_len"])
        ref = reference_rows(inp, rows)
        ref_plain = reference_rows(inp, rows, with_norm_rope=False)
        q, k, v = inp["q"], inp["k"], inp["v"]
        methods = [
            ("ours fused (norm+rope+attn, triton)", lambda: ours(inp), ref),
            ("ours fused, k/v read in place (no relayout)",
             lambda: ours(inp, relayout_kv=False, config=None), ref),
            ("diffusers-style path (LN+rope+SDPA default)",
             lambda: diffusers_style_path(q, k, v, text_len=inp["text_len"], cos=inp["cos"],
                                          sin=inp["sin"], q_norm=inp["q_norm"],
                                          k_norm=inp["k_norm"], scale=inp["scale"]), ref),
            ("SDPA cuDNN alone", lambda: sdpa_alone(q, k, v, inp["scale"], "cudnn"), ref_plain),
            ("SDPA flash alone", lambda: sdpa_alone(q, k, v, inp["scale"], "flash"), ref_plain),
            ("SDPA efficient alone", lambda: sdpa_alone(q, k, v, inp["scale"], "efficient"),
             ref_plain),
        ]
        for name, fn, ref_rows_ in methods:
            row = dict(shape=shape_name, B=B, H=H, S=S, D=D, rope=shape["grid"] is not None,
                       method=name)
            try:
                out = fn()
                torch.cuda.synchronize()
                row["rel_err"] = rel_error(out, ref_rows_, rows)
                del out
                ms = time_ms(fn, "cuda", rep_ms=rep)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1),
                           pct_of_peak=round(100 * flops / ms / 1e9 / PEAK_TFLOPS, 1),
                           extra_peak_mem_mib=round((torch.cuda.max_memory_allocated() - base) / 2**20, 1))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            log(json.dumps(row))
            results.append(row)
        ours_ms = results[-len(methods)].get("ms")
        for row in results[-len(methods):]:
            if ours_ms and row.get("ms"):
                row["ours_speedup"] = round(row["ms"] / ours_ms, 3)
        del inp, ref, ref_plain, q, k, v
        torch.cuda.empty_cache()
    for row in results:
        row.update(env)
    write_tables(results, out_dir, env)
    return results


def write_tables(results, out_dir, env):
    keys = ["shape", "B", "H", "S", "D", "rope", "method", "ms", "tflops", "pct_of_peak",
            "ours_speedup", "rel_err", "extra_peak_mem_mib", "error"]
    with open(os.path.join(out_dir, "attention_bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + list(env), extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    lines = [f"GPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, "
             f"commit {env['commit']}", "",
             "| shape | method | ms | TFLOP/s | % of 790 | ours speedup | rel err vs fp64 | extra peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['method']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['shape']} | {r['method']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                     f"{r['pct_of_peak']:.1f} | {r.get('ours_speedup', float('nan')):.2f}x | "
                     f"{r['rel_err']:.2e} | {r['extra_peak_mem_mib']:.0f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "attention_bench.md"), "w") as f:
        f.write(text)
    print(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="5b,2b,1.5-5b")
    ap.add_argument("--sweep", action="store_true", help="time the config sweep at the 5B shape first")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(json.dumps(environment("cuda")), flush=True)
    if args.sweep:
        sweep = run_sweep(args.out, log=lambda s: print(s, flush=True))
        ok = sorted((r for r in sweep if "ms" in r), key=lambda r: r["ms"])
        print("\nsweep, fastest first:")
        for r in ok:
            print(f"  {r['ms']:8.3f} ms {r['tflops']:6.1f} TFLOP/s  err {r['rel_err']}  {r['variant']}")
        for r in sweep:
            if "error" in r:
                print(f"  FAILED {r['variant']}: {r['error']}")
    results = run_attention_bench(args.shapes.split(","), args.out, log=lambda s: print(s, flush=True))
    with open(os.path.join(args.out, "attention_bench.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
