"""Quality (and, on an H100/H200, speed) of 8-bit attention without real weights (issue 15).

    PYTHONPATH=$PWD python3 benchmarks/attention_quality.py --out DIR [--shape 5b|small]
        [--commit SHA] [--no-time] [--variants name,...]

Two input sets at one shape, both as the model feeds them ([B, S, H, D] strided views of a QKV
tensor, RoPE3D on the video tokens):

* ``model``: random q, k, v with trained-looking QK LayerNorm (what ``bench_attention`` uses);
* ``hard``: what breaks naive 8-bit attention: K channels offset by ~10 standard deviations
  (per head and channel, shared by all tokens), heavy-tailed q (Student t, 3 dof), V with rare
  x30 outliers; no norms.

Per method: relative error ||out - ref|| / ||ref||, cosine similarity and max |out - ref| against
float64 on sampled query rows (all keys), NaN-poisoned outputs first; on a GPU also the median
time (``do_bench``) of the whole path (norm + RoPE + quantization + attention) and of the kernel
alone, and FA3 (bf16, and FP8 with per-head scales) on the normed, rotated q/k where the fa3-fwd
wheel is importable. On a CPU only the float32 emulation of ``precision="int8"`` runs (the maths
of the 8-bit path, what the CPU tests check), at ``--shape small``.
Writes ``attention_quality.json`` (after every measurement: a timeout keeps what was done) and
``attention_quality.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_attention import SHAPES, make_inputs, reference_rows, sample_rows  # noqa: E402
from cogvideox_kernels import ops  # noqa: E402
from cogvideox_kernels.bench.common import environment, time_ms  # noqa: E402
from cogvideox_kernels.ops.attention.reference import (attention_flops,  # noqa: E402
                                                       qk_norm_rope_reference)

SHAPES = dict(SHAPES)
SHAPES["small"] = dict(B=1, H=2, S=650, D=64, text_len=50, grid=(2, 15, 20))

# name -> hopper_int8_fwd config overrides (kernel variants measured; the first is the default)
# Runs on the H200 (results/int8_attention_notes.md): e004bfb measured FP8 P V (SageAttention2)
# 19.3-23.8 ms vs INT8 Q K^T + bf16 P V 14.2 ms (kernel), so the latter is the default; c7fe970
# measured row sums on the tensor cores (ROWSUM_MMA, since removed) no faster. int8bound: the
# softmax without a running max (SCORE_BOUND, default) against the running max it replaces;
# 909eb62 measured 4 stages a little faster than 3 with it (the default since). int8acc: the
# pre-pass's rotation of q and k (ROTATE; the kernel is the same), off by default until measured.
# int8k2: k as two INT8 parts (K_SPLIT: a second s8 Q K^T per key block; "heads": only for the
# heads that keep the running max), off until measured.
INT8_VARIANTS = {
    "int8_default": dict(),  # the shipped defaults (since d4f7878: rotation + k split for the heads over the bound)
    "int8": dict(ROTATE=False, K_SPLIT=False),
    "int8_rot": dict(ROTATE=True, K_SPLIT=False),
    "int8_ksplit": dict(ROTATE=False, K_SPLIT=True),
    "int8_rot_ksplit": dict(ROTATE=True, K_SPLIT=True),
    "int8_rot_ksplit_s3": dict(ROTATE=True, K_SPLIT=True, STAGES=3),
    "int8_rot_ksplit_heads": dict(ROTATE=True, K_SPLIT="heads"),  # two parts where T > 80 only
    "int8_rot_ksplit_runmax": dict(ROTATE=True, K_SPLIT=True, SCORE_BOUND=False),
    "int8_rot_runmax": dict(ROTATE=True, SCORE_BOUND=False),
    "int8_runmax": dict(SCORE_BOUND=False),
    "int8_s3": dict(STAGES=3),
    "int8_runmax_s3": dict(SCORE_BOUND=False, STAGES=3),  # the default until 909eb62
    "int8_s6": dict(STAGES=6),
    "int8_i2f": dict(MAGIC_CVT=False),
    "int8_fp8pv_i2f": dict(PV_FP8=True, MAGIC_CVT=False),
}


def hard_inputs(shape: dict, seed=0, device="cuda"):
    torch.manual_seed(seed)  # the Student t sampler takes no generator
    g = torch.Generator(device=device).manual_seed(seed)
    B, H, S, D, text_len = shape["B"], shape["H"], shape["S"], shape["D"], shape["text_len"]
    base = make_inputs(shape, seed=seed, device=device)  # for the RoPE tables
    t = torch.distributions.StudentT(torch.tensor(3.0, device=device))
    qkv = torch.empty(B, S, 3, H, D, device=device, dtype=torch.bfloat16)
    qkv[:, :, 0] = t.sample((B, S, H, D)).clamp(-50, 50).to(torch.bfloat16)
    offset = 10.0 * torch.randn(1, 1, H, D, device=device, generator=g)
    qkv[:, :, 1] = (torch.randn(B, S, H, D, device=device, generator=g) + offset).to(torch.bfloat16)
    v = torch.randn(B, S, H, D, device=device, generator=g)
    outlier = torch.rand(B, S, H, D, device=device, generator=g) < 1e-3
    qkv[:, :, 2] = torch.where(outlier, 30 * v, v).to(torch.bfloat16)
    q, k, v = qkv.unbind(2)
    return dict(qkv=qkv, q=q, k=k, v=v, text_len=text_len, cos=base["cos"], sin=base["sin"],
                q_norm=None, k_norm=None, scale=D ** -0.5)


def op_args(inp):
    return dict(text_len=inp["text_len"], cos=inp["cos"], sin=inp["sin"], q_norm=inp["q_norm"],
                k_norm=inp["k_norm"], scale=inp["scale"])


def metrics(out, ref, rows):
    o = out[:, rows.to(out.device)].double()
    if not torch.isfinite(o).all():
        return dict(rel=float("inf"), cos=float("nan"), max_abs=float("inf"))
    diff = o - ref
    return dict(rel=(diff.norm() / ref.norm()).item(),
                cos=torch.nn.functional.cosine_similarity(o.flatten(), ref.flatten(), 0).item(),
                max_abs=diff.abs().max().item())


def normed(inp):
    """Normed, rotated q/k (bf16, contiguous [B, S, H, D]) and v, for FA3."""
    args = (inp["text_len"], inp["cos"], inp["sin"])
    q = qk_norm_rope_reference(inp["q"], *args, inp["q_norm"], 1e-6, torch.float32)
    k = qk_norm_rope_reference(inp["k"], *args, inp["k_norm"], 1e-6, torch.float32)
    return q.to(torch.bfloat16).contiguous(), k.to(torch.bfloat16).contiguous(), inp["v"].contiguous()


def fp8_per_head(x):
    """float8_e4m3fn x and its per-(b, h) descale [B, H] (amax / 448 over tokens and channels)."""
    amax = x.float().abs().amax(dim=(1, 3)).clamp_min(1e-12)  # [B, H]
    scale = amax / 448.0
    x8 = (x.float() / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return x8, scale.contiguous()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", default=None, help="5b (GPU default) or small (CPU default)")
    parser.add_argument("--commit", default=None, help="recorded in the results (staged copies)")
    parser.add_argument("--no-time", action="store_true", help="quality only")
    parser.add_argument("--variants", default=",".join(INT8_VARIANTS))
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    shape_name = args.shape or ("5b" if gpu else "small")
    shape = SHAPES[shape_name]
    env = environment(device)
    if args.commit:
        env["commit"] = args.commit
    results = dict(env=env, shape=dict(shape, name=shape_name), rows=[])
    B, H, S, D = shape["B"], shape["H"], shape["S"], shape["D"]
    flops = attention_flops(B, S, H, D)
    timing = gpu and not args.no_time
    hopper = False
    if gpu:
        from cogvideox_kernels.ops.attention.hopper import hopper_available
        hopper = hopper_available("cuda")[0]
    try:
        from fa3_fwd_interface import flash_attn_func as fa3
    except Exception as e:  # pragma: no cover - needs the fa3-fwd wheel and a GPU
        print(f"FA3 not importable: {type(e).__name__}: {e}")
        fa3 = None

    def save():
        with open(os.path.join(args.out, "attention_quality.json"), "w") as f:
            json.dump(results, f, indent=1)

    def log(s):
        print(s, flush=True)

    for input_name, make in (("model", make_inputs), ("hard", hard_inputs)):
        inp = make(shape, device=device)
        rows = sample_rows(S, shape["text_len"], count=args.rows)
        ref = reference_rows(inp, rows, with_norm_rope=True)

        def record(method, fn, *, full=None, kernel=None, note=""):
            t0 = time.time()
            try:
                out = fn()
                torch.cuda.synchronize() if gpu else None
                row = dict(inputs=input_name, method=method, **metrics(out, ref, rows), note=note)
                del out
                if timing and full is not None:
                    row["ms"] = time_ms(full, device)
                    row["tflops"] = flops / row["ms"] / 1e9
                if timing and kernel is not None:
                    row["kernel_ms"] = time_ms(kernel, device)
            except Exception as e:  # keep going: one failing method must not lose the others
                row = dict(inputs=input_name, method=method, error=f"{type(e).__name__}: {e}"[:400])
            row["wall_s"] = round(time.time() - t0, 1)
            results["rows"].append(row)
            save()
            log(f"{input_name:5s} {method:22s} rel {row.get('rel', float('nan')):.3e} "
                f"cos {row.get('cos', float('nan')):.6f} max {row.get('max_abs', float('nan')):.3e} "
                f"ms {row.get('ms', '-')} kernel {row.get('kernel_ms', '-')} {row.get('error', '')}")

        a = op_args(inp)
        q, k, v = inp["q"], inp["k"], inp["v"]
        record("bf16 reference (bf16 math)",
               lambda: ops.rope3d_attention_reference(q, k, v, **a, compute_dtype=torch.bfloat16))
        # float32 emulation of the 8-bit path (CPU; on a GPU only at small shapes: it is S x S)
        if not gpu or S <= 4096:
            from cogvideox_kernels.ops.attention.int8_prepass import int8_attention_reference
            for rot, ks in ((False, False), (True, False), (False, True), (True, True)):
                record("int8 emulation" + (", rotated" if rot else "") + (", k split" if ks else "")
                       + " (fp32)", lambda rot=rot, ks=ks: int8_attention_reference(
                           q, k, v, **a, rotate=rot, k_split=ks))
        if hopper:
            full = lambda: ops.rope3d_attention(q, k, v, **a, backend="hopper")  # noqa: E731
            record("bf16 (ours, hopper)", full, full=full if input_name == "model" else None)
        if fa3 is not None:  # before the int8 variants: a crash there loses nothing else
            qn_, kn_, vc = normed(inp)
            f = lambda: fa3(qn_, kn_, vc, softmax_scale=inp["scale"])  # noqa: E731
            timed = f if input_name == "model" else None
            record("FA3 bf16 (attention alone)", f, full=timed)
            q8, qs = fp8_per_head(qn_)
            k8, ks = fp8_per_head(kn_)
            v8, vs = fp8_per_head(vc)
            f8 = lambda: fa3(q8, k8, v8, softmax_scale=inp["scale"], q_descale=qs,  # noqa: E731
                             k_descale=ks, v_descale=vs)
            record("FA3 fp8 per-head (alone)", f8, full=f8 if input_name == "model" else None)
            del qn_, kn_, vc, q8, k8, v8
        if hopper:
            from cogvideox_kernels.ops.attention.hopper import hopper_int8_attention_fwd
            from cogvideox_kernels.ops.attention.hopper_fwd import v_token_major_ok
            from cogvideox_kernels.ops.attention.hopper_int8_fwd import (
                bound_applies, hopper_int8_attention_core, resolve_config)
            from cogvideox_kernels.ops.attention.int8_prepass import (LOG2E, quantize_int8_inputs,
                                                                      score_bound)
            from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd

            qn, kn = inp["q_norm"] or (None, None), inp["k_norm"] or (None, None)
            norm_args = (inp["text_len"], inp["cos"], inp["sin"], qn[0], qn[1], kn[0], kn[1],
                         inp["q_norm"] is not None, inp["k_norm"] is not None, 1e-6)
            prepass = lambda fp8_v=True, norms=True, rotate=False, k_split=False: (  # noqa: E731
                quantize_int8_inputs(q, k, v, *norm_args, fp8_v=fp8_v, norms=norms, rotate=rotate,
                                     k_split=k_split))
            # which heads take the fixed-max softmax (score bound T <= 80)
            T, fixed, _ = score_bound(prepass(False).norm_max, inp["scale"] * LOG2E)
            row = dict(inputs=input_name, method="int8 score bound T per head",
                       note=f"T min {T.min().item():.1f} median {T.median().item():.1f} max "
                            f"{T.max().item():.1f}; fixed-max heads {int(fixed.sum())}/{fixed.numel()}")
            results["rows"].append(row)
            log(f"{input_name:5s} {row['method']}: {row['note']}")
            if timing and input_name == "model":
                for norms, rot, ks in ((False, False, False), (True, False, False),
                                       (True, True, False), (True, True, True)):
                    row = dict(inputs=input_name, method="int8 pre-pass alone (q, k; no V)"
                               + (" + norms" if norms else "") + (" + rotation" if rot else "")
                               + (" + k split" if ks else ""),
                               ms=time_ms(lambda: prepass(False, norms, rot, ks), device))
                    results["rows"].append(row)
                    log(f"{input_name:5s} {row['method']}   ms {row['ms']:.3f}")
                # the rotation as it was before 2026-12-01's session 5 (a float32 matrix per program,
                # 3 TF32 products; int8_prepass.ROT_MODE 0) against the shipped one (mode 1)
                from cogvideox_kernels.ops.attention import int8_prepass
                shipped, int8_prepass.ROT_MODE = int8_prepass.ROT_MODE, 0
                try:
                    a, b = prepass(False, True, True, True), None
                    int8_prepass.ROT_MODE = shipped
                    b = prepass(False, True, True, True)
                    same = {n: (getattr(a, n).int() - getattr(b, n).int()).abs().max().item()
                            for n in ("q8", "k8", "k8_lo")}
                    int8_prepass.ROT_MODE = 0
                    row = dict(inputs=input_name, method="int8 pre-pass alone (q, k; no V) + norms + rotation "
                               "+ k split, ROT_MODE 0 (float32 matrix, tf32x3)",
                               ms=time_ms(lambda: prepass(False, True, True, True), device),
                               note=f"max |int8 difference| vs ROT_MODE {shipped}: {same}")
                    results["rows"].append(row)
                    log(f"{input_name:5s} {row['method']}   ms {row['ms']:.3f} {row['note']}")
                finally:
                    int8_prepass.ROT_MODE = shipped
                # k's quantizing pass with the other warp count (default 8; 4 spills offline)
                shipped_w = int8_prepass.K_WARPS
                other_w = 4 if shipped_w == 8 else 8
                int8_prepass.K_WARPS = other_w
                try:
                    row = dict(inputs=input_name, method="int8 pre-pass alone (q, k; no V) + norms + rotation "
                               f"+ k split, K_WARPS {other_w}",
                               ms=time_ms(lambda: prepass(False, True, True, True), device))
                    results["rows"].append(row)
                    log(f"{input_name:5s} {row['method']}   ms {row['ms']:.3f}")
                finally:
                    int8_prepass.K_WARPS = shipped_w
            for name in args.variants.split(","):
                cfg = resolve_config(D, INT8_VARIANTS[name])
                run = lambda cfg=cfg: hopper_int8_attention_fwd(q, k, v, *norm_args,  # noqa: E731
                                                                inp["scale"], config=cfg)
                kernel = None
                if timing and input_name == "model":  # as hopper_int8_attention_fwd calls it
                    t8 = prepass(cfg["PV_FP8"], bound_applies(cfg, v.dtype), cfg["ROTATE"],
                                 cfg["K_SPLIT"])
                    in_place = not cfg["PV_FP8"] and v_token_major_ok(v)
                    v_in = t8.v8t if cfg["PV_FP8"] else (v if in_place else qk_norm_rope_fwd(
                        v, 0, None, None, None, None, False, 1e-6).transpose(1, 2))
                    out = torch.empty_like(q, memory_format=torch.contiguous_format)
                    kernel = lambda t8=t8, v_in=v_in, out=out, cfg=cfg, ip=in_place: (  # noqa: E731
                        hopper_int8_attention_core(t8.q8, t8.q_scale, t8.k8, t8.k_scale, v_in,
                                                   t8.v_scale, out, inp["scale"], cfg,
                                                   t8.norm_max, v_token_major=ip,
                                                   k8_lo=t8.k8_lo))
                record(name, run, full=run if input_name == "model" else None, kernel=kernel,
                       note=json.dumps(INT8_VARIANTS[name]))
        del inp, ref
        if gpu:
            torch.cuda.empty_cache()

    lines = [f"# 8-bit attention quality ({shape_name}: B{B} H{H} S{S} D{D})", "",
             f"{env.get('gpu') or 'CPU'}, torch {env['torch']}, triton {env['triton']}, "
             f"commit {env['commit']}, {env['date']}", "",
             "| inputs | method | rel err | cosine | max abs err | ms (full path) | TFLOP/s | kernel ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        fmt = lambda key, f: (f.format(r[key]) if key in r else "")  # noqa: E731
        lines.append(f"| {r['inputs']} | {r['method']} | {fmt('rel', '{:.3e}')} | "
                     f"{fmt('cos', '{:.6f}')} | {fmt('max_abs', '{:.3e}')} | {fmt('ms', '{:.3f}')} | "
                     f"{fmt('tflops', '{:.0f}')} | {fmt('kernel_ms', '{:.3f}')} |"
                     + (f" {r['error']}" if "error" in r else "")
                     + (f" {r['note']}" if r.get("note") and "rel" not in r else ""))
    with open(os.path.join(args.out, "attention_quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    save()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
