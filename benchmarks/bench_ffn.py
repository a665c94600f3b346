"""Benchmark of the expert-FFN half-block (``expert_ffn``) on a GPU.

Compares, at the CogVideoX-5B and -2B shapes (shared FFN, as in the real checkpoints):
  * ours, ``backend="triton"`` with each shared-FFN path (all-Triton, cuBLASLt GEMM1, all-cuBLAS GEMMs)
  * the eager torch chain written like diffusers' CogVideoXBlock second half (norm2 + ff + gates)
  * the same chain under ``torch.compile``
  * bare cuBLAS GEMMs (two F.linear) for the GEMM efficiency figure
and reports ms, GEMM TFLOP/s (4*tokens*hidden*inner / t), % of 790 TFLOP/s, speedups and the
relative error of each against a float32 reference.

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python3 benchmarks/bench_ffn.py --out DIR [--sweep] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from cogvideox_kernels.bench.common import environment, time_ms
from cogvideox_kernels.bench.presets import ffn_shapes
from cogvideox_kernels.ops.expert_ffn import expert_ffn_flops, expert_ffn_reference
from cogvideox_kernels.ops.expert_ffn import triton_fwd as tf

PEAK_TFLOPS = 790.0  # measured bf16 matmul ceiling on the H100 (CONVENTIONS.md)

SHAPES = {name: ffn_shapes(name)[-1] for name in ("5b", "2b")}  # name: (B, text_len, video_len, hidden, inner)

_BASE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, persistent=True,
             epilogue_subtile=True)
SWEEP_CONFIGS = [  # GEMM configs tried for both GEMMs (most promising first: a time budget may cut the tail)
    dict(_BASE),
    dict(_BASE, epilogue_subtile=False),
    dict(_BASE, num_stages=4),
    dict(_BASE, persistent=False),
    dict(_BASE, warp_specialize=True),
    dict(_BASE, BLOCK_M=256, BLOCK_N=128),
    dict(_BASE, BLOCK_N=128, num_stages=4, epilogue_subtile=False),
    dict(_BASE, BLOCK_N=128, num_warps=4, num_stages=4),
    dict(_BASE, tma=False),
]


def torch_chain(x, modulation, norm_weight, norm_bias, w1, b1, w2, b2, text_len: int, eps: float = 1e-5):
    """Eager half-block as diffusers' CogVideoXBlock writes it: returns (video, text) like diffusers."""
    hidden = x.shape[-1]
    shift, scale, gate, enc_shift, enc_scale, enc_gate = modulation.unbind(1)
    video, text = x[:, text_len:], x[:, :text_len]
    norm_video = F.layer_norm(video, (hidden,), norm_weight, norm_bias, eps) * (1 + scale[:, None]) + shift[:, None]
    norm_text = F.layer_norm(text, (hidden,), norm_weight, norm_bias, eps) * (1 + enc_scale[:, None]) \
        + enc_shift[:, None]
    h = torch.cat([norm_text, norm_video], dim=1)
    ff = F.linear(F.gelu(F.linear(h, w1, b1), approximate="tanh"), w2, b2)
    video = video + gate[:, None] * ff[:, text_len:]
    text = text + enc_gate[:, None] * ff[:, :text_len]
    return video, text


def make_inputs(B, text_len, video_len, hidden, inner, dtype, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    S = text_len + video_len

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    return dict(x=rnd(B, S, hidden), modulation=rnd(B, 6, hidden, std=0.5),
                w1=rnd(1, inner, hidden, std=hidden ** -0.5), b1=rnd(1, inner, std=0.1),
                w2=rnd(1, hidden, inner, std=inner ** -0.5), b2=rnd(1, hidden, std=0.1),
                norm_weight=rnd(hidden, std=0.2) + 1, norm_bias=rnd(hidden, std=0.1), text_len=text_len)


def rel_err(out, ref):
    out = out.float()
    return ((out - ref).norm() / ref.norm()).item()


DEVICE = "cuda"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def ours(inp, path, config1=None, config2=None):
    return tf.expert_ffn_fwd(inp["x"], inp["modulation"], inp["w1"], inp["b1"], inp["w2"], inp["b2"],
                             inp["text_len"], inp["norm_weight"], inp["norm_bias"], 1e-5, 0, None, None,
                             shared_path=path, config1=config1, config2=config2)


SWEEP_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "persistent",
              "epilogue_subtile", "warp_specialize", "tma")


def sweep_gemms(name, inp, log, budget_s=90.0):
    """Time each config on GEMM1 (GELU epilogue) and GEMM2 (gate/residual epilogue); check parity."""
    B, S, Hd = inp["x"].shape
    T = B * S
    inner = inp["w1"].shape[1]
    x2d = inp["x"].view(T, Hd)
    h = tf.modulated_norm_fwd(x2d, inp["modulation"], inp["norm_weight"], inp["norm_bias"], 1e-5, S,
                              inp["text_len"], x2d.dtype)
    ref1 = F.gelu(F.linear(h.float(), inp["w1"][0].float(), inp["b1"][0].float()), approximate="tanh")
    inter = ref1.to(x2d.dtype)
    flops = 2.0 * T * Hd * inner
    rows = []
    t_start = time.time()
    for which in (1, 2):
        for i, cfg in enumerate(SWEEP_CONFIGS):
            if time.time() - t_start > budget_s * (0.5 if which == 1 else 1.0) and i > 0:
                print(f"  sweep gemm{which}: time budget spent, {len(SWEEP_CONFIGS) - i} configs skipped")
                break
            row = dict(shape=name, gemm=which, **{k: v for k, v in cfg.items()})
            try:
                if which == 1:
                    out = torch.empty(T, inner, dtype=x2d.dtype, device=x2d.device)
                    fn = lambda: tf.grouped_gemm_fwd(h, inp["w1"], inp["b1"], out,  # noqa: E731
                                                     epilogue=tf.EPILOGUE_GELU, config=cfg)
                    fn()
                    sync()
                    row["rel_err"] = rel_err(out, ref1)
                else:
                    out = torch.empty_like(x2d)
                    fn = lambda: tf.grouped_gemm_fwd(inter, inp["w2"], inp["b2"], out,  # noqa: E731
                                                     epilogue=tf.EPILOGUE_GATE_RESIDUAL, x=x2d,
                                                     modulation=inp["modulation"], seq_len=S,
                                                     text_len=inp["text_len"], config=cfg)
                    fn()
                    sync()
                    f = F.linear(inter.float(), inp["w2"][0].float(), inp["b2"][0].float()).view(B, S, Hd)
                    is_text = (torch.arange(S, device=f.device) < inp["text_len"])[None, :, None]
                    mod = inp["modulation"].float()
                    gate = torch.where(is_text, mod[:, None, 5], mod[:, None, 2])
                    ref2 = (inp["x"].float() + gate * f).view(T, Hd)
                    row["rel_err"] = rel_err(out, ref2)
                    del f, ref2
                t = time_ms(fn, DEVICE, rep_ms=60, quick=DEVICE != "cuda")
                row.update(ms=t, tflops=flops / t / 1e9)
            except Exception as e:  # a config that fails to compile is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(f"  sweep {name} gemm{which} {cfg} -> "
                  + (f"{row['ms']:.3f} ms {row['tflops']:.0f} TF/s rel {row['rel_err']:.1e}"
                     if "ms" in row else row["error"]), flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()
    # cuBLAS on the same GEMMs, with the library's fused GELU epilogue for GEMM1
    for label, fn in (("cublas_linear1", lambda: F.linear(h, inp["w1"][0], inp["b1"][0])),
                      ("cublaslt_gelu1", lambda: torch._addmm_activation(inp["b1"][0], h, inp["w1"][0].t(),
                                                                        use_gelu=True)),
                      ("cublas_linear2", lambda: F.linear(inter, inp["w2"][0], inp["b2"][0]))):
        t = time_ms(fn, DEVICE, rep_ms=60, quick=DEVICE != "cuda")
        row = dict(shape=name, gemm=label, ms=t, tflops=flops / t / 1e9)
        if label == "cublaslt_gelu1":  # which GELU does the cuBLASLt epilogue compute? (fp32: no rounding)
            a32, w32 = h[:4096].float(), inp["w1"][0, :1024].float()
            b32 = inp["b1"][0, :1024].float() * 20  # spread the pre-activations over the curved part
            lin = F.linear(a32, w32, b32)
            got = torch._addmm_activation(b32, a32, w32.t(), use_gelu=True)
            row["fp32_rel_vs_gelu_tanh"] = rel_err(got, F.gelu(lin, approximate="tanh"))
            row["fp32_rel_vs_gelu_erf"] = rel_err(got, F.gelu(lin))
            del lin, got
        rows.append(row)
        print(f"  {name} {label}: {t:.3f} ms {row['tflops']:.0f} TF/s "
              + " ".join(f"{k}={v:.2e}" for k, v in row.items() if k.startswith("rel")), flush=True)
        log.write(json.dumps(row) + "\n")
    del ref1, inter
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    best = {}
    for which in (1, 2):
        ok = [r for r in rows if r["gemm"] == which and "ms" in r and r["rel_err"] < 1e-2]
        if ok:
            r = min(ok, key=lambda r: r["ms"])
            best[which] = {k: r[k] for k in SWEEP_KEYS if k in r}
            print(f"  best gemm{which}: {r['ms']:.3f} ms {r['tflops']:.0f} TF/s {best[which]}", flush=True)
    return rows, best


def run_ffn_bench(shapes, out_dir, *, sweep=False, compile_chain=True, paths=("triton", "cublaslt", "cublas"),
                  dtype=torch.bfloat16, config1=None, config2=None):
    """Time ours vs the torch chain (eager / compiled) vs bare cuBLAS at each shape; list of result rows."""
    os.makedirs(out_dir, exist_ok=True)
    info = environment(DEVICE)
    results = []
    log = open(os.path.join(out_dir, "ffn_log.jsonl"), "a")
    for name in shapes:
        B, text_len, video_len, hidden, inner = SHAPES[name] if isinstance(name, str) else name
        name = name if isinstance(name, str) else f"B{B}_S{text_len}+{video_len}_{hidden}x{inner}"
        tokens = B * (text_len + video_len)
        flops = expert_ffn_flops(tokens, hidden, inner)
        inp = make_inputs(B, text_len, video_len, hidden, inner, dtype, device=DEVICE)
        if sweep is True or (sweep and name in sweep):
            sweep_rows, best = sweep_gemms(name, inp, log)
            results += [dict(info, kind="sweep", **r) for r in sweep_rows]
            config1, config2 = best.get(1, config1), best.get(2, config2)
            results.append(dict(info, kind="chosen_configs", shape=name, config1=config1, config2=config2))
        ref = expert_ffn_reference(**{k: (v.float() if torch.is_tensor(v) else v) for k, v in inp.items()})
        args = (inp["x"], inp["modulation"], inp["norm_weight"], inp["norm_bias"], inp["w1"][0], inp["b1"][0],
                inp["w2"][0], inp["b2"][0], text_len)

        def chain_err(fn):
            video, text = fn(*args)
            return rel_err(torch.cat([text, video], dim=1), ref)

        variants = {}
        for path in paths:
            variants[f"ours[{path}]"] = (lambda p=path: ours(inp, p, config1, config2),
                                         lambda p=path: rel_err(ours(inp, p, config1, config2), ref))
        variants["torch eager"] = (lambda: torch_chain(*args), lambda: chain_err(torch_chain))
        if compile_chain:
            compiled = torch.compile(torch_chain, dynamic=False)
            variants["torch.compile"] = (lambda: compiled(*args), lambda: chain_err(compiled))
        h = tf.modulated_norm_fwd(inp["x"].view(tokens, hidden), inp["modulation"], inp["norm_weight"],
                                  inp["norm_bias"], 1e-5, text_len + video_len, text_len, dtype)
        inter = F.gelu(F.linear(h, inp["w1"][0], inp["b1"][0]), approximate="tanh")
        variants["cuBLAS GEMMs only"] = (
            lambda: F.linear(F.linear(h, inp["w1"][0], inp["b1"][0]), inp["w2"][0], inp["b2"][0]), None)
        variants["our pre-pass (LN+modulate)"] = (
            lambda: tf.modulated_norm_fwd(inp["x"].view(tokens, hidden), inp["modulation"], inp["norm_weight"],
                                          inp["norm_bias"], 1e-5, text_len + video_len, text_len, dtype), None)
        variants["our GEMM1 (+b1, GELU)"] = (lambda: tf.grouped_gemm_fwd(
            h, inp["w1"], inp["b1"], torch.empty_like(inter), epilogue=tf.EPILOGUE_GELU, config=config1), None)
        variants["our GEMM2 (+b2, gate, residual)"] = (lambda: tf.grouped_gemm_fwd(
            inter, inp["w2"], inp["b2"], torch.empty_like(h), epilogue=tf.EPILOGUE_GATE_RESIDUAL,
            x=inp["x"].view(tokens, hidden), modulation=inp["modulation"], seq_len=text_len + video_len,
            text_len=text_len, config=config2), None)
        rows = {}
        for label, (fn, err_fn) in variants.items():
            t0 = time.time()
            try:
                err = err_fn() if err_fn is not None else None
                sync()
                if DEVICE == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ms = time_ms(fn, DEVICE, quick=DEVICE != "cuda")
                peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None
            except Exception as e:
                print(f"  {name} {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            gemm_flops = flops / 2 if "GEMM1" in label or "GEMM2" in label else flops
            rows[label] = dict(info, kind="table", shape=name, variant=label, tokens=tokens, hidden=hidden,
                               inner=inner, ms=ms, tflops=gemm_flops / ms / 1e9,
                               pct_of_790=100 * gemm_flops / ms / 1e9 / PEAK_TFLOPS, rel_err_vs_fp32=err,
                               peak_mem_gib=peak, setup_s=time.time() - t0)
            print(f"  {name} {label}: {ms:.3f} ms  {rows[label]['tflops']:.0f} TF/s  err "
                  f"{err if err is None else f'{err:.2e}'}", flush=True)
            log.write(json.dumps(dict(rows[label], kind="table_partial")) + "\n")
            log.flush()
        for row in rows.values():
            for base in ("torch eager", "torch.compile", "cuBLAS GEMMs only"):
                if base in rows:
                    row[f"speedup_vs_{base}"] = rows[base]["ms"] / row["ms"]
            log.write(json.dumps(row) + "\n")
            results.append(row)
        del inp, ref, h, inter, variants
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    log.close()
    return results


def format_table(results):
    lines = ["| shape | variant | ms | GEMM TFLOP/s | % of 790 | vs eager | vs compile | rel err vs fp32 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if r.get("kind") != "table":
            continue
        err = r["rel_err_vs_fp32"]
        lines.append(f"| {r['shape']} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['pct_of_790']:.0f}% "
                     f"| {r.get('speedup_vs_torch eager', float('nan')):.2f}x "
                     f"| {r.get('speedup_vs_torch.compile', float('nan')):.2f}x "
                     f"| {'' if err is None else f'{err:.2e}'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="5b,2b")
    parser.add_argument("--sweep", default="", help="comma-separated shapes to run the GEMM config sweep at")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--device", default="cuda", help="cpu: smoke-run this script under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cpu":
        SHAPES["tiny"] = (2, 3, 17, 64, 96)
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference stays float32
    results = run_ffn_bench(args.shapes.split(","), args.out, sweep=set(filter(None, args.sweep.split(","))),
                            compile_chain=not args.no_compile)
    table = format_table(results)
    info = environment(DEVICE)
    header = f"GPU {info['gpu']}, torch {info['torch']}, triton {info['triton']}, commit {info['commit']}"
    with open(os.path.join(args.out, "ffn_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "ffn_table.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")
    print(header)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
