"""8-bit expert FFN (``expert_ffn(..., precision="fp8" | "int8")``) on a GPU: speed, error and hard inputs,
one run.

1. FFN half-block at the CogVideoX-5B shape (B 2, 226 + 17550 tokens, 3072 -> 12288, bf16), the inputs
   of the bench CLI's ffn op: ours bf16 (the default path), ours fp8 (cuBLASLt/CUTLASS accumulation
   as shipped, and with fast accumulation), ours int8 (Triton int8 GEMMs), the eager bf16 chain, bare
   bf16, FP8 and int8 GEMMs (ours and torch._int_mm, whose int32 output is the traffic ours avoids),
   and the pieces of the fp8 and int8 paths. Parity first (outputs NaN-poisoned; errors vs a float32
   reference with TF32 off, and for fp8 / int8 vs their float32 emulations), then
   ``triton.testing.do_bench`` medians.
1b. int8 GEMM tile configs (``--no-int8-sweep`` skips): each GEMM of the int8 path timed per config
   (outputs checked against the default config's), then the whole op with the best pair.
2. Hard inputs (errors only, B 1, 226 + 4000 tokens, same widths): channel outliers in h through the
   modulation, massive-activation channels in x, heavy-tailed x, outlier weight columns: rel err,
   cosine similarity and max error of bf16, fp8 and int8 (ours), their emulations and a naive per-tensor FP8.
3. The 5B transformer step through ``apply(model, precision=...)`` (random weights) vs float32, while
   the deadline allows.

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_fp8_ffn.py --out DIR --commit SHA [--budget-s 150]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from cogvideox_kernels import ops
from cogvideox_kernels.bench.common import environment
from cogvideox_kernels.bench.suites import eager_ffn_half
from cogvideox_kernels.ops.expert_ffn import expert_ffn_flops, expert_ffn_reference, fp8, int8
from cogvideox_kernels.ops.expert_ffn import triton_fwd as tf

RESULTS: dict = {"env": {}, "ffn_5b": [], "pieces": [], "int8_sweep": [], "hard": [], "step": [], "errors": []}
OUT = Path(".")
T0 = time.time()
BUDGET_S = 150.0
SWEEP = True  # section 1b (--no-int8-sweep: off)
# int8 GEMM tiles to try (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first is int8.GPU_CONFIG
INT8_CONFIGS = [(128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (128, 128, 128, 4, 4), (128, 128, 128, 8, 4),
                (256, 128, 128, 8, 3), (128, 256, 64, 8, 4), (128, 128, 256, 8, 3)]
DEVICE = "cuda"  # --smoke: "cpu" with tiny shapes under TRITON_INTERPRET=1 (checks the script, times nothing)
SHAPE_5B = (2, 226, 17550, 3072, 12288)  # B, text, video, hidden, inner
SHAPE_HARD = (1, 226, 4000, 3072, 12288)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def left() -> float:
    return BUDGET_S - (time.time() - T0)


def save():
    (OUT / "fp8_ffn_results.json").write_text(json.dumps(RESULTS, indent=1))


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty / empty_like NaN-filled (floating dtypes), as the tests do: unwritten outputs show."""
    real, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: fill(real(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real, real_like


def metrics(out, ref, x=None) -> dict:
    out, ref = out.double(), ref.double()
    m = dict(finite=bool(torch.isfinite(out).all()), rel_err=((out - ref).norm() / ref.norm()).item(),
             cos=F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item(), max_abs=(out - ref).abs().max().item())
    if x is not None:  # the FFN term gate * f(h) alone (the residual x dominates the sum)
        x = x.double()
        m["delta_rel_err"] = ((out - ref).norm() / (ref - x).norm()).item()
    return m


def bench(fn) -> float:
    fn()
    sync()
    if DEVICE != "cuda":
        return float("nan")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


@contextlib.contextmanager
def fast_accum(on: bool):
    old = os.environ.get(fp8.FAST_ACCUM_ENV)
    os.environ[fp8.FAST_ACCUM_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(fp8.FAST_ACCUM_ENV, None)
        else:
            os.environ[fp8.FAST_ACCUM_ENV] = old


def make_inputs(B, text_len, video, hidden, inner, seed=1, kind="gaussian"):
    """The bench CLI's ffn inputs (suites.ffn_cases), optionally made hard."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *shape, s=1.0: torch.randn(*shape, generator=g) * s  # noqa: E731
    S = text_len + video
    x, mod = mk(B, S, hidden), mk(B, 6, hidden, s=0.3)
    w1, b1 = mk(1, inner, hidden, s=hidden ** -0.5), mk(1, inner, s=0.1)
    w2, b2 = mk(1, hidden, inner, s=inner ** -0.5), mk(1, hidden, s=0.1)
    nw, nb = 1 + mk(hidden, s=0.1), mk(hidden, s=0.1)
    if kind == "h_channel_outliers":  # (1 + scale) ~ 30 on 1% of the channels: h has outlier channels
        mod[:, [1, 4], ::100] = 30.0
    elif kind == "x_massive_channels":  # a few channels of x ~100x the rest (DiT "massive activations")
        x[..., :4] *= 100.0
    elif kind == "heavy_tailed_x":  # Student-t (3 dof) activations and 1% of tokens x50
        x = torch.distributions.StudentT(3.0).sample((B, S, hidden))
        x[:, ::100] *= 50.0
    elif kind == "w_outlier_columns":  # a few input channels of w1 and w2 ~20x
        w1[..., ::256] *= 20.0
        w2[..., ::1024] *= 20.0
    a = dict(x=x, modulation=mod, w1=w1, b1=b1, w2=w2, b2=b2, norm_weight=nw, norm_bias=nb)
    a = {k: v.to(DEVICE, torch.bfloat16) for k, v in a.items()}
    a["text_len"] = text_len
    return a


def reference(a, precision="bf16"):
    up = {k: v.float() if torch.is_tensor(v) else v for k, v in a.items()}
    torch.backends.cuda.matmul.allow_tf32 = False
    return expert_ffn_reference(**up, precision=precision)


def naive_tensorwise_fp8(a):
    """Per-tensor FP8 (one scale per tensor, as plain FP8 recipes do), emulated in float32."""
    def q(t):
        s = t.abs().max().clamp_min(1e-30) / 448.0
        return (t / s).to(torch.float8_e4m3fn).float() * s

    up = {k: v.float() if torch.is_tensor(v) else v for k, v in a.items()}
    x = up["x"]
    B, S, Hd = x.shape
    from cogvideox_kernels.ops.expert_ffn.reference import modulated_norm_reference
    h, gate = modulated_norm_reference(x, up["modulation"], a["text_len"], up["norm_weight"], up["norm_bias"], 1e-5)
    inner = F.gelu(F.linear(q(h), q(up["w1"][0]), up["b1"][0]), approximate="tanh")
    f = F.linear(q(inner), q(up["w2"][0]), up["b2"][0])
    return x + gate * f


def kernel_args(a):
    return {k: a[k] for k in ("x", "modulation", "w1", "b1", "w2", "b2", "text_len", "norm_weight", "norm_bias")}


def run(name, a, precision, backend="triton"):
    return ops.expert_ffn(a["x"], a["modulation"], a["w1"], a["b1"], a["w2"], a["b2"], text_len=a["text_len"],
                          norm_weight=a["norm_weight"], norm_bias=a["norm_bias"], precision=precision, backend=backend)


# ------------------------------------------------------------------------------------------------
def section_ffn():
    B, text_len, video, Hd, Fi = SHAPE_5B
    a = make_inputs(B, text_len, video, Hd, Fi)
    T = B * (text_len + video)
    flops = expert_ffn_flops(T, Hd, Fi)
    ref = reference(a)
    ref8 = reference(a, "fp8")
    RESULTS["ffn_5b"].append(dict(variant="fp8 emulation (float32)", **metrics(ref8, ref, a["x"])))
    RESULTS["ffn_5b"].append(dict(variant="int8 emulation (float32)", **metrics(reference(a, "int8"), ref, a["x"])))
    emul_i8 = int8.kernel_emulation(**kernel_args(a)).float()  # + the kernels' bf16 roundings
    RESULTS["ffn_5b"].append(dict(variant="int8 kernel emulation (float32 + bf16 roundings)",
                                  **metrics(emul_i8, ref, a["x"])))
    x = a["x"]
    variants = [
        ("ours bf16 (default path)", lambda: run("", a, "bf16"), True),
        ("ours fp8", lambda: run("", a, "fp8"), True),
        ("ours fp8, fast accumulation", lambda: run("", a, "fp8"), True),
        ("ours int8", lambda: run("", a, "int8"), True),
        ("eager bf16 chain", lambda: eager_ffn_half(x, a["modulation"], (a["norm_weight"], a["norm_bias"]), a["w1"][0],
                                                    a["b1"][0], a["w2"][0], a["b2"][0], text_len), True),
    ]
    w1q, w1s = fp8.quantize_weight(a["w1"][0])
    w2q, w2s = fp8.quantize_weight(a["w2"][0])
    hq, hs = fp8.quantize_rows(torch.randn(T, Hd, device=DEVICE))
    iq, is_ = fp8.quantize_rows(torch.randn(T, Fi, device=DEVICE))
    w1i, w1is = int8.quantize_weight(a["w1"][0])
    w2i, w2is = int8.quantize_weight(a["w2"][0])
    hi8, hi8s = int8.quantize_rows(torch.randn(T, Hd, device=DEVICE))
    ii8, ii8s = int8.quantize_rows(torch.randn(T, Fi, device=DEVICE))
    y1 = torch.empty(T, Fi, dtype=torch.bfloat16, device=DEVICE)
    y2 = torch.empty(T, Hd, dtype=torch.bfloat16, device=DEVICE)
    variants += [
        ("bf16 GEMMs only* (2x F.linear + GELU)", lambda: F.linear(F.gelu(F.linear(x, a["w1"][0], a["b1"][0]),
                                                                        approximate="tanh"), a["w2"][0], a["b2"][0]), False),
        ("fp8 GEMMs only* (2x _scaled_mm)", lambda: (fp8.fp8_linear(hq, hs, w1q, w1s), fp8.fp8_linear(iq, is_, w2q, w2s))[1],
         False),
        ("int8 GEMMs only* (2x ours, bf16 out)", lambda: (int8.int8_linear_fwd(hi8, hi8s, w1i, w1is, y1),
                                                          int8.int8_linear_fwd(ii8, ii8s, w2i, w2is, y2))[1], False),
    ]
    if DEVICE == "cuda":  # torch._int_mm (cuBLASLt, int32 out): the fallback reference, without its dequantization
        variants.append(("int8 GEMMs only* (2x torch._int_mm, int32 out)",
                         lambda: (torch._int_mm(hi8, w1i.t()), torch._int_mm(ii8, w2i.t()))[1], False))
    rows = {}
    for name, fn, compare in variants:
        row = dict(variant=name)
        try:
            with fast_accum("fast" in name):
                if compare:
                    with poisoned_empty():
                        out = fn()
                    sync()
                    row.update(metrics(out, ref, x))
                    if "fp8" in name:
                        row["vs_emulation"] = metrics(out, ref8, x)
                    if "int8" in name:
                        row["vs_emulation"] = metrics(out, emul_i8, x)
                    del out
                row["ms"] = bench(fn)
                row["gemm_tflops"] = flops / row["ms"] / 1e9
        except Exception as exc:
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows[name] = row
        RESULTS["ffn_5b"].append(row)
        print("ROW", json.dumps(row), flush=True)
        save()
    # pieces of the fp8 path
    x2d = x.view(T, Hd)
    h = tf.modulated_norm_fwd(x2d, a["modulation"], a["norm_weight"], a["norm_bias"], 1e-5, text_len + video,
                              text_len, torch.float8_e4m3fn)
    y = fp8.fp8_linear(h[0], h[1], w1q, w1s)
    aq = fp8.bias_gelu_quant_fwd(y, a["b1"][0])
    f = fp8.fp8_linear(aq[0], aq[1], w2q, w2s)
    S = text_len + video
    h8 = tf.modulated_norm_fwd(x2d, a["modulation"], a["norm_weight"], a["norm_bias"], 1e-5, S, text_len, torch.int8)
    int8.int8_linear_fwd(h8[0], h8[1], w1i, w1is, y1)
    a8 = fp8.bias_gelu_quant_fwd(y1, a["b1"][0], torch.int8)
    pieces = [
        ("pre-pass LN+modulate+quantize (fp8 out)", lambda: tf.modulated_norm_fwd(
            x2d, a["modulation"], a["norm_weight"], a["norm_bias"], 1e-5, text_len + video, text_len, torch.float8_e4m3fn)),
        ("pre-pass LN+modulate (bf16 out)", lambda: tf.modulated_norm_fwd(
            x2d, a["modulation"], a["norm_weight"], a["norm_bias"], 1e-5, text_len + video, text_len, torch.bfloat16)),
        ("GEMM1 fp8 _scaled_mm", lambda: fp8.fp8_linear(h[0], h[1], w1q, w1s)),
        ("b1 + GELU + quantize (row-wise)", lambda: fp8.bias_gelu_quant_fwd(y, a["b1"][0])),
        ("GEMM2 fp8 _scaled_mm", lambda: fp8.fp8_linear(aq[0], aq[1], w2q, w2s)),
        ("b2 + gate + residual", lambda: tf.gate_residual_fwd(x2d, f, a["modulation"], a["b2"][0], text_len + video,
                                                              text_len)),
        ("weight quantization (w1 + w2, per cache miss)", lambda: (fp8.quantize_weight(a["w1"][0]),
                                                                  fp8.quantize_weight(a["w2"][0]))),
        ("int8: pre-pass LN+modulate+quantize (int8 out)", lambda: tf.modulated_norm_fwd(
            x2d, a["modulation"], a["norm_weight"], a["norm_bias"], 1e-5, S, text_len, torch.int8)),
        ("int8: GEMM1 (dequantizing epilogue, bf16 out)", lambda: int8.int8_linear_fwd(h8[0], h8[1], w1i, w1is, y1)),
        ("int8: b1 + GELU + quantize (row-wise)", lambda: fp8.bias_gelu_quant_fwd(y1, a["b1"][0], torch.int8)),
        ("int8: GEMM2 + b2 + gate + residual", lambda: int8.int8_linear_fwd(
            a8[0], a8[1], w2i, w2is, y2, epilogue=int8.EPILOGUE_GATE_RESIDUAL, bias=a["b2"][0], x=x2d,
            modulation=a["modulation"], seq_len=S, text_len=text_len)),
        ("int8: weight quantization (w1 + w2, per cache miss)", lambda: (int8.quantize_weight(a["w1"][0]),
                                                                        int8.quantize_weight(a["w2"][0]))),
    ]
    for name, fn in pieces:
        try:
            ms = bench(fn)
            row = dict(piece=name, ms=ms)
            if "GEMM" in name:
                row["tflops"] = 2.0 * T * Hd * Fi / ms / 1e9
        except Exception as exc:
            traceback.print_exc()
            row = dict(piece=name, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        RESULTS["pieces"].append(row)
        print("PIECE", json.dumps(row), flush=True)
    save()
    del ref8, h, y, aq, f, hq, iq, w1q, w2q, hi8, ii8, y2
    if SWEEP:
        try:
            section_int8_sweep(a, emul_i8, ref, h8, a8, w1i, w1is, w2i, w2is, y1, T, Hd, Fi)
        except Exception as exc:
            traceback.print_exc()
            RESULTS["errors"].append(f"int8 sweep: {type(exc).__name__}: {str(exc)[:300]}")
    save()
    del a, ref, emul_i8, h8, a8, y1
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def section_int8_sweep(a, emul_i8, ref, h8, a8, w1i, w1is, w2i, w2is, y1, T, Hd, Fi):
    """Each int8 GEMM per tile config (outputs vs the default config's), then the op with the best pair."""
    x = a["x"]
    x2d = x.view(T, Hd)
    S = x.shape[1]
    configs = INT8_CONFIGS if DEVICE == "cuda" else [(32, 32, 32, 4, 1), (32, 64, 32, 4, 1)]
    flops = 2.0 * T * Hd * Fi
    gemms = {
        "GEMM1": (lambda out, cfg: int8.int8_linear_fwd(h8[0], h8[1], w1i, w1is, out, config=cfg), (T, Fi)),
        "GEMM2": (lambda out, cfg: int8.int8_linear_fwd(
            a8[0], a8[1], w2i, w2is, out, epilogue=int8.EPILOGUE_GATE_RESIDUAL, bias=a["b2"][0], x=x2d,
            modulation=a["modulation"], seq_len=S, text_len=a["text_len"], config=cfg), (T, Hd)),
    }
    best = {}
    for gemm, (fn, shape) in gemms.items():
        expected = fn(torch.empty(shape, dtype=torch.bfloat16, device=DEVICE), None)
        for bm, bn, bk, warps, stages in configs:
            if left() < 40:
                RESULTS["int8_sweep"].append(dict(gemm=gemm, status="skipped: out of time"))
                break
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
            row = dict(gemm=gemm, **cfg)
            try:
                with poisoned_empty():
                    out = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)
                fn(out, cfg)
                sync()
                row["rel_diff_vs_default"] = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
                row["ms"] = bench(lambda: fn(out, cfg))
                row["tops"] = flops / row["ms"] / 1e9
                if row["rel_diff_vs_default"] < 1e-6 and (gemm not in best or row["ms"] < best[gemm][1]):
                    best[gemm] = (cfg, row["ms"])
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            RESULTS["int8_sweep"].append(row)
            print("SWEEP", json.dumps(row), flush=True)
        save()
    if len(best) == 2:
        cfg1, cfg2 = best["GEMM1"][0], best["GEMM2"][0]
        args = kernel_args(a)
        fn = lambda: int8.expert_ffn_int8_fwd(args["x"], args["modulation"], args["w1"], args["b1"], args["w2"],  # noqa: E731
                                              args["b2"], args["text_len"], args["norm_weight"], args["norm_bias"],
                                              1e-5, config1=cfg1, config2=cfg2)
        with poisoned_empty():
            out = fn()
        sync()
        row = dict(variant="ours int8, best swept tiles", config1=cfg1, config2=cfg2, **metrics(out, ref, x),
                   vs_emulation=metrics(out, emul_i8, x))
        row["ms"] = bench(fn)
        row["gemm_tflops"] = 2 * flops / row["ms"] / 1e9
        RESULTS["ffn_5b"].append(row)
        print("ROW", json.dumps(row), flush=True)


def section_hard():
    for kind in ("gaussian", "h_channel_outliers", "x_massive_channels", "heavy_tailed_x", "w_outlier_columns"):
        try:
            a = make_inputs(*SHAPE_HARD, seed=5, kind=kind)
            ref = reference(a)
            row = dict(inputs=kind)
            with poisoned_empty():
                row["bf16 ours"] = metrics(run("", a, "bf16"), ref, a["x"])
                row["fp8 ours"] = metrics(run("", a, "fp8"), ref, a["x"])
                row["int8 ours"] = metrics(run("", a, "int8"), ref, a["x"])
            row["fp8 emulation"] = metrics(reference(a, "fp8"), ref, a["x"])
            row["int8 emulation"] = metrics(reference(a, "int8"), ref, a["x"])
            row["int8 kernel emulation"] = metrics(int8.kernel_emulation(**kernel_args(a)).float(), ref, a["x"])
            row["fp8 per-tensor (naive, emulated)"] = metrics(naive_tensorwise_fp8(a), ref, a["x"])
            row["fp8/bf16 error ratio"] = row["fp8 ours"]["rel_err"] / row["bf16 ours"]["rel_err"]
            row["int8/bf16 error ratio"] = row["int8 ours"]["rel_err"] / row["bf16 ours"]["rel_err"]
        except Exception as exc:
            traceback.print_exc()
            row = dict(inputs=kind, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        RESULTS["hard"].append(row)
        print("HARD", json.dumps(row), flush=True)
        save()


PROJ_SHAPE = (2, 17776, 3072)  # [B, S, hidden] of section_proj (5B)


def section_proj():
    """The attention half's projections at 5B (adaln_linear: LN-modulate pre-pass + to_q/k/v; gated_linear:
    to_out + bias + gate + residual), bf16 vs precision="fp8" (plain and fast accumulation), with the fp8
    results' error against the bf16 op."""
    B, S, Hd = PROJ_SHAPE
    text_len = min(226, S // 2)
    g = torch.Generator(device=DEVICE).manual_seed(3)
    rnd = lambda *shape, std=1.0: (torch.randn(*shape, generator=g, device=DEVICE) * std).to(torch.bfloat16)  # noqa: E731
    x, mod, a = rnd(B, S, Hd), rnd(B, 6, Hd, std=0.3), rnd(B, S, Hd)
    ws, bs = [rnd(Hd, Hd, std=Hd ** -0.5) for _ in range(3)], [rnd(Hd, std=0.05) for _ in range(3)]
    nw, nb = 1 + rnd(Hd, std=0.1), rnd(Hd, std=0.1)
    calls = {
        "adaln_linear (to_q/k/v)": lambda precision: ops.adaln_linear(x, mod, ws, bs, text_len=text_len, norm_weight=nw,
                                                                       norm_bias=nb, eps=1e-5, precision=precision),
        "gated_linear (to_out)": lambda precision: ops.gated_linear(x, a, ws[0], bs[0], mod, text_len=text_len,
                                                                   precision=precision)}
    for name, fn in calls.items():
        ref = fn("bf16")
        for precision, fast in (("bf16", False), ("fp8", False), ("fp8", True)):
            row = dict(piece=f"{name} {precision}" + (" fast accumulation" if fast else ""))
            try:
                with fast_accum(fast):
                    out = fn(precision)
                    row["ms"] = bench(lambda: fn(precision))
                sub = (out - x) if name.startswith("gated") else out
                base = (ref - x) if name.startswith("gated") else ref
                row["rel_vs_bf16"] = ((sub.float() - base.float()).norm() / base.float().norm()).item()
            except Exception as exc:
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            RESULTS["pieces"].append(row)
            print("PROJ", json.dumps(row), flush=True)
            save()


def section_step():
    from cogvideox_kernels.bench import step as st
    from cogvideox_kernels.integrations import diffusers as integration

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()
    model = st.build_transformer("5b", torch.float32)
    inputs32 = st.step_inputs(model, torch.float32)
    with torch.no_grad():
        ref = model(**inputs32)[0].float()
    torch.cuda.synchronize()
    RESULTS["step"].append(dict(variant="float32 reference", s=time.time() - t0))
    model = model.to(torch.bfloat16)
    inputs = st.cast_inputs(inputs32, torch.bfloat16)
    del inputs32
    st.free_memory()
    outs = {}
    variants = [("ours bf16", dict(precision="bf16")), ("ours int8 FFN", dict(precision="int8-ffn")),
                ("ours fp8 FFN", dict(precision="fp8")),
                # FP8 FFN + FP8 attention projections (adaln_linear / gated_linear), then the same with cuBLASLt's
                # fast FP8 accumulation (fp8.FAST_ACCUM_ENV, the default since db11c38) on every FP8 GEMM; every other
                # variant runs with it off
                ("ours fp8-all", dict(precision="fp8-all")),
                ("ours fp8-all, fast accumulation", dict(precision="fp8-all", fast_accum=True)),
                # issue 15's step bar (<= 0.90 s): the 8-bit attention (its defaults: rotation + k split
                # for the heads over the bound) with the FP8 FFN
                ("ours int8 attention + fp8 FFN", dict(precision="int8+fp8")),
                ("diffusers eager bf16", None)]
    only = os.environ.get("BENCH_FP8_STEP_VARIANTS")  # ";"-separated variant names to run (all by default)
    if only:
        variants = [v for v in variants if v[0] in only.split(";")]
    for variant, kwargs in variants:
        kwargs = dict(kwargs) if kwargs is not None else None
        fast_accum = bool(kwargs and kwargs.pop("fast_accum", False))
        os.environ[fp8.FAST_ACCUM_ENV] = "1" if fast_accum else "0"
        if left() < 25:
            RESULTS["step"].append(dict(variant=variant, status="skipped: out of time"))
            continue
        try:
            if kwargs is not None:
                integration.apply(model, vae=False, **kwargs)

            def step():
                with torch.no_grad():
                    return model(**inputs)[0]

            first_s, ms, out = st.time_calls(step, warmup=1, reps=2)
            outs[variant] = out.float()
            row = dict(variant=variant, ms=ms, first_call_s=first_s, **metrics(out.float(), ref))
            if "ours bf16" in outs and variant != "ours bf16":
                row["rel_diff_vs_ours_bf16"] = metrics(out.float(), outs["ours bf16"])["rel_err"]
        except Exception as exc:
            traceback.print_exc()
            row = dict(variant=variant, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            integration.remove(model)
            os.environ.pop(fp8.FAST_ACCUM_ENV, None)
        RESULTS["step"].append(row)
        print("STEP", json.dumps(row), flush=True)
        save()


def table():
    lines = ["", f"GPU {RESULTS['env'].get('gpu')} | torch {RESULTS['env'].get('torch')} | triton "
             f"{RESULTS['env'].get('triton')} | commit {RESULTS['env'].get('commit')}", "FFN half-block 5B:"]
    for r in RESULTS["ffn_5b"]:
        lines.append(f"  {r['variant']:<42} ms {r.get('ms', float('nan')):7.3f}  rel {r.get('rel_err', float('nan')):.2e}"
                     f"  delta {r.get('delta_rel_err', float('nan')):.2e}  cos {r.get('cos', float('nan')):.6f}"
                     + (f"  vs emul {r['vs_emulation']['delta_rel_err']:.2e}" if "vs_emulation" in r else "")
                     + (f"  ERROR {r['error'][:80]}" if "error" in r else ""))
    for r in RESULTS["int8_sweep"]:
        lines.append(f"  int8 sweep {json.dumps(r)}")
    for r in RESULTS["pieces"]:
        lines.append(f"  piece {r['piece']:<46} ms {r.get('ms', float('nan')):7.3f}" + (
            f"  {r['tflops']:.0f} TF/s" if "tflops" in r else "") + (f"  ERROR {r['error'][:80]}" if "error" in r else ""))
    lines.append("hard inputs (rel err vs float32: bf16 / fp8 ours / fp8 emul / fp8 per-tensor / int8 ours / int8 emul;"
                 " ratios fp8, int8; cos fp8, int8):")
    for r in RESULTS["hard"]:
        if "error" in r:
            lines.append(f"  {r['inputs']:<20} ERROR {r['error'][:100]}")
            continue
        lines.append(f"  {r['inputs']:<20} {r['bf16 ours']['rel_err']:.2e} / {r['fp8 ours']['rel_err']:.2e} / "
                     f"{r['fp8 emulation']['rel_err']:.2e} / {r['fp8 per-tensor (naive, emulated)']['rel_err']:.2e} / "
                     f"{r['int8 ours']['rel_err']:.2e} / {r['int8 emulation']['rel_err']:.2e};"
                     f" {r['fp8/bf16 error ratio']:.1f}x, {r['int8/bf16 error ratio']:.1f}x;"
                     f" cos {r['fp8 ours']['cos']:.6f}, {r['int8 ours']['cos']:.6f}")
    for r in RESULTS["step"]:
        lines.append("  step " + json.dumps(r))
    return "\n".join(lines)


def main():
    global OUT, BUDGET_S, DEVICE, SHAPE_5B, SHAPE_HARD, SWEEP, PROJ_SHAPE
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--commit", default=None)
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--no-step", action="store_true")
    p.add_argument("--no-int8-sweep", action="store_true", help="skip the int8 GEMM tile sweep (section 1b)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreter: the script's logic only")
    args = p.parse_args()
    if args.smoke:
        DEVICE, SHAPE_5B, SHAPE_HARD, args.no_step = "cpu", (2, 3, 29, 64, 256), (1, 3, 29, 64, 256), True
        PROJ_SHAPE = (1, 40, 64)
    OUT, BUDGET_S, SWEEP = Path(args.out), args.budget_s, not args.no_int8_sweep
    OUT.mkdir(parents=True, exist_ok=True)
    RESULTS["env"] = environment(DEVICE)
    if args.commit:
        RESULTS["env"]["commit"] = args.commit
    save()
    sections = [section_ffn, section_hard, section_proj] + (
        [] if args.no_step else [section_step])
    for section in sections:
        if section is section_step and left() < 70:
            RESULTS["step"].append(dict(status=f"skipped: {left():.0f} s left"))
            continue
        try:
            section()
        except Exception as exc:
            traceback.print_exc()
            RESULTS["errors"].append(f"{section.__name__}: {type(exc).__name__}: {str(exc)[:300]}")
        save()
        print(f"[{time.time() - T0:.0f} s] {section.__name__} done", flush=True)
    text = table()
    (OUT / "fp8_ffn_table.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
