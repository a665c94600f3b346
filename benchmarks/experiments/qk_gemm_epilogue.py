"""Experiment (issue 13): the attention's QK-LayerNorm + RoPE pre-pass folded into the q/k GEMM's epilogue.

The kernel, its launcher and reference now live in ``cogvideox_kernels/ops/adaln_linear/qk_gemm.py`` (imported
here); this file keeps the GPU probe, the config sweep and the offline sm_90a compile.

Today the fused attention half runs to_q / to_k as cuBLAS ``addmm``s into a token-major [3, B*S, inner]
buffer, then ``qk_norm_rope_fwd`` reads q and k back, norms each head's D channels, rotates the video
tokens, writes head-major [B, H, S, D] and reduces the per-head max squared row norm (the Hopper
kernel's score bound). Here one Triton GEMM, y = h @ W^T + b for W = to_q, to_k or both stacked
(N = P * H * D), does that work on its float32 tile before anything is stored:

* per (token, head) of a BLOCK_M x BLOCK_N tile (BLOCK_N a multiple of D, split into heads in
  registers): LayerNorm over D in float32 of the accumulator + bias (no bf16 rounding in between,
  unlike the unfused path), norm weight + bias, interleaved RoPE on video tokens (cos/sin tables
  [S - text_len, D]); tiles may straddle the text/video boundary, two (or, for S < BLOCK_M, more)
  samples and the q/k boundary of a stacked weight;
* stores bf16 head-major ``y[P, B, H, S, D]`` (``y[p]`` is what the attention kernel reads);
* ``norm_max[p, b * H + h]`` = max over tokens of ||y||^2 of the **stored** (bf16) rows, by one
  atomic max per (head, sample) of a tile into a zeroed float32 [P, B * H]. (The shipped pre-pass takes
  the norm of the float32 row before its cast; the rounded row's is the quantity the attention's
  score bound is about.)

EPILOGUE_BIAS (0) is the same GEMM with a plain bias epilogue into a token-major [M, N] (what addmm
writes), to separate GEMM speed from the epilogue's cost.

Run the GPU probe (H200, ~3 minutes): ``PYTHONPATH=$PWD python3 benchmarks/experiments/qk_gemm_epilogue.py
--out $OUT``; ``--offline`` compiles every config for sm_90a without a GPU and prints registers / spills;
``--dry-run`` (with TRITON_INTERPRET=1) runs the probe's code on CPU at a tiny shape.
CPU checks: tests/experiments/test_qk_gemm_epilogue.py (interpreter).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from cogvideox_kernels.ops._triton_utils import interpret_mode  # noqa: E402,F401
# the kernel, launcher and reference are shipped code (one copy); the probe, offline compile and sweep stay here
from cogvideox_kernels.ops.adaln_linear.qk_gemm import (  # noqa: E402,F401
    EPILOGUE_BIAS, EPILOGUE_NORM_ROPE, GPU_CONFIG, INTERPRET_CONFIG, _qk_gemm_fwd_kernel, norm_max_of, qk_gemm_fwd,
    qk_gemm_reference)

# The probe's sweep. num_programs None: one tile per program; "sms" / "2sms": one / two programs per SM,
# persistent. Offline (sm_90a, 5B specialization, no spills in any): 128x128 w8 177 registers (bias epilogue
# 110), 128x256 w8 246 (170), 64x128 w4 178 (110; 98 KB shared memory: two CTAs per SM, so one's epilogue
# runs under the other's main loop). 128x64 with 4 warps spilled (not in the sweep).
PROBE_CONFIGS = [
    GPU_CONFIG,
    dict(GPU_CONFIG, num_programs="sms"),
    dict(GPU_CONFIG, num_programs="sms", flatten=True),
    dict(GPU_CONFIG, num_stages=3),
    dict(GPU_CONFIG, BLOCK_N=256, num_stages=3),
    dict(GPU_CONFIG, BLOCK_N=256, num_stages=3, num_programs="sms"),
    dict(GPU_CONFIG, BLOCK_M=64, num_warps=4),
    dict(GPU_CONFIG, BLOCK_M=64, num_warps=4, num_programs="2sms"),
    dict(GPU_CONFIG, num_programs="sms", warp_specialize=True),
]


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


# ----------------------------------------------------------------------------------------------- offline check
def compile_offline(config=None, epilogue=EPILOGUE_NORM_ROPE, rope=True, head_dim=64):
    """Compile the kernel for sm_90a without a GPU; returns the CompiledKernel (asm: ttgir, ptx, cubin)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = dict(GPU_CONFIG, **(config or {}))
    sig = {"a_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16", "lnw_ptr": "*bf16",
           "lnb_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "norm_max_ptr": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "S": "i32", "H": "i32", "B": "i32", "text_len": "i32",
           "eps": "fp32", "stride_cs": "i32", "num_programs": "i32"}
    constexprs = dict(EPILOGUE=epilogue, HAS_BIAS=True, HAS_LN_W=True, HAS_LN_B=True, HAS_ROPE=rope,
                      NORM_MAX=epilogue == EPILOGUE_NORM_ROPE, D=head_dim, BLOCK_M=cfg["BLOCK_M"],
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
                      WARP_SPECIALIZE=cfg["warp_specialize"], FLATTEN=cfg["flatten"], INTERPRET=False)
    # what the launch at the 5B shape specializes: pointers, M, N, K, S, H, stride_cs divisible by 16
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in names if n.endswith("_ptr") or n in ("M", "N", "K", "S", "H", "stride_cs")}
    sig.update({k: "constexpr" for k in constexprs})
    return triton.compile(ASTSource(fn=_qk_gemm_fwd_kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 128),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def ptxas_usage(ptx: str) -> str:
    """ptxas -v's register / spill line for the kernel (needs ptxas on PATH)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run(["ptxas", "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    lines = [ln.split("info    : ")[-1] for ln in run.stderr.splitlines() if "registers" in ln or "spill" in ln]
    return "; ".join(lines) if run.returncode == 0 else run.stderr[-500:]


def offline_report():
    for i, cfg in enumerate(PROBE_CONFIGS):
        for epilogue in (EPILOGUE_NORM_ROPE, EPILOGUE_BIAS):
            tag = f"config {i} {_tag(cfg)} epilogue {'norm+rope' if epilogue else 'bias'}"
            try:
                ptx = compile_offline(cfg, epilogue).asm["ptx"]
            except Exception as e:  # noqa: BLE001
                print(f"{tag}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            print(f"{tag}: wgmma={'wgmma.mma_async' in ptx} tma={'cp.async.bulk.tensor' in ptx} "
                  f"{ptxas_usage(ptx)}", flush=True)


# ---------------------------------------------------------------------------------------------------- GPU probe
def _tag(cfg):
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']} "
            f"{'persist ' + str(cfg['num_programs']) if cfg.get('num_programs') else 'grid'}"
            f"{' flat' if cfg.get('flatten') else ''}"
            f"{' ws' if cfg.get('warp_specialize') else ''}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="qk_gemm_out")
    ap.add_argument("--offline", action="store_true", help="compile for sm_90a (no GPU) and print registers")
    ap.add_argument("--dry-run", action="store_true",
                    help="the probe's code path on CPU at a tiny shape (TRITON_INTERPRET=1; numbers meaningless)")
    ap.add_argument("--deadline", type=float, default=240.0, help="seconds; later configs are skipped")
    args = ap.parse_args()
    if args.offline:
        offline_report()
        return
    from cogvideox_kernels.bench.common import environment, time_ms
    from cogvideox_kernels.ops.attention.hopper import PREPASS_CONFIG
    from cogvideox_kernels.ops.attention.triton_fwd import qk_norm_rope_fwd
    from cogvideox_kernels.ops.rope import rope3d_freqs

    os.makedirs(args.out, exist_ok=True)
    lines, rows = [], []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    dev = "cpu" if args.dry_run else "cuda"
    B, text_len, H, D, hidden = 2, 226, 48, 64, 3072  # CogVideoX-5B
    grid = (13, 30, 45)
    configs = PROBE_CONFIGS
    if args.dry_run:
        text_len, H, hidden, grid = 5, 3, 64, (2, 3, 4)
        configs = [dict(INTERPRET_CONFIG), dict(INTERPRET_CONFIG, BLOCK_N=64, num_programs=None)]
    S = text_len + grid[0] * grid[1] * grid[2]
    inner, M = H * D, B * S
    g = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16
    h = torch.randn(M, hidden, device=dev, generator=g).to(bf)
    w = (torch.randn(2 * inner, hidden, device=dev, generator=g) * hidden ** -0.5).to(bf)  # [to_q; to_k]
    b = (0.1 * torch.randn(2 * inner, device=dev, generator=g)).to(bf)
    lnw = (1 + 0.1 * torch.randn(2, D, device=dev, generator=g)).to(bf)
    lnb = (0.1 * torch.randn(2, D, device=dev, generator=g)).to(bf)
    sin, cos = rope3d_freqs(*grid, hidden_size=inner, num_heads=H, device=dev)
    wq, wk = w[:inner], w[inner:]  # contiguous views: the model's two separate weights
    bq, bk = b[:inner], b[inner:]
    kw = dict(seq_len=S, text_len=text_len, num_heads=H, cos=cos, sin=sin, eps=1e-6)
    flops = 2.0 * M * (2 * inner) * hidden
    env = environment(dev)
    log(f"{env.get('gpu', '')} torch {torch.__version__} triton {triton.__version__}; B {B} S {S} H {H} D {D} "
        f"hidden {hidden}; q and k GEMMs {flops / 1e12:.3f} TFLOP")

    # float64 reference of q and k, one at a time (memory), then errors of both paths against it
    ref = torch.cat([qk_gemm_reference(h, w[p * inner:(p + 1) * inner], b[p * inner:(p + 1) * inner],
                                       norm_weight=lnw[p:p + 1], norm_bias=lnb[p:p + 1], **kw).float()
                     for p in range(2)])
    ref_nm = norm_max_of(ref.view(2, B, H, S, D)).float()

    # (a) today: two addmm into the [3, B*S, inner] buffer, then the shipped pre-pass on q and k
    qkv = torch.empty((3, M, inner), dtype=bf, device=dev)
    nm_a = torch.zeros((2, B * H), dtype=torch.float32, device=dev)

    def gemms_a():
        torch.addmm(bq, h, wq.t(), out=qkv[0])
        torch.addmm(bk, h, wk.t(), out=qkv[1])

    def prepass_a():
        nm_a.zero_()
        out = []
        for p in range(2):
            x = qkv[p].view(B, S, H, D)
            out.append(qk_norm_rope_fwd(x, text_len, cos, sin, lnw[p], lnb[p], True, 1e-6, norm_max=nm_a[p],
                                        **PREPASS_CONFIG))
        return out

    def path_a():
        gemms_a()
        return prepass_a()

    ya = path_a()
    ya = torch.stack([t.transpose(1, 2) for t in ya])  # [2, B, H, S, D]
    err_a = rel_err(ya, ref)
    log(f"(a) addmm + pre-pass: rel err {err_a:.3e} vs float64; norm_max vs its output "
        f"{rel_err(nm_a, norm_max_of(ya)):.2e}")

    nm_b = torch.zeros((2, B * H), dtype=torch.float32, device=dev)
    nm_q, nm_k = nm_b[0:1], nm_b[1:2]

    def fused_one(cfg):  # one launch over the stacked [to_q; to_k] (a weight copy in a real integration)
        nm_b.zero_()
        return qk_gemm_fwd(h, w, b, norm_weight=lnw, norm_bias=lnb, norm_max=nm_b, config=cfg, **kw)

    def fused_two(cfg):  # one launch per projection (no weight copy)
        nm_b.zero_()
        yq = qk_gemm_fwd(h, wq, bq, norm_weight=lnw[0:1], norm_bias=lnb[0:1], norm_max=nm_q, config=cfg, **kw)
        yk = qk_gemm_fwd(h, wk, bk, norm_weight=lnw[1:2], norm_bias=lnb[1:2], norm_max=nm_k, config=cfg, **kw)
        return yq, yk

    def plain(cfg):  # (c) same GEMM, bias epilogue only, token-major (as addmm)
        return qk_gemm_fwd(h, w, b, seq_len=S, num_heads=2 * H, epilogue=EPILOGUE_BIAS, config=cfg)

    pieces = {"(a) addmm q + k": gemms_a, "(a) pre-pass q + k (+ zero norm_max)": prepass_a,
              "(a) total": path_a}
    for name, fn in pieces.items():
        ms = time_ms(fn, dev, rep_ms=300)
        rows.append(dict(row=name, ms=ms, err=err_a if name.endswith("total") else None))
        log(f"{name:44s} {ms:7.4f} ms" + (f" {flops / ms / 1e9:6.0f} TFLOP/s" if "addmm" in name else ""))
    base, base_gemm = rows[-1]["ms"], rows[0]["ms"]
    plain_ref = h.double() @ w.double().T + b.double()
    start = time.time()
    for cfg in configs:
        tag = _tag(cfg)
        if time.time() - start > args.deadline:
            log(f"{tag}: skipped (deadline {args.deadline:.0f} s)")
            continue
        try:
            yb = fused_one(cfg).view(2, B, H, S, D)
            err_b = rel_err(yb, ref)
            nm_ok = rel_err(nm_b, norm_max_of(yb))
            yc = plain(cfg)
            err_c = rel_err(yc, plain_ref)
        except Exception as e:  # noqa: BLE001
            log(f"{tag}: {type(e).__name__}: {str(e)[:200]}")
            continue
        ok = err_b <= 1.02 * err_a and nm_ok < 1e-5 and err_c < 5e-3  # no worse than today's path
        log(f"{tag}: parity (b) {err_b:.3e} (a {err_a:.3e}) norm_max {nm_ok:.1e} (c) {err_c:.3e} "
            f"{'ok' if ok else 'FAILED: not timed'}")
        if not ok:
            rows.append(dict(row="parity", config=tag, err_b=err_b, err_c=err_c, norm_max_err=nm_ok, ok=False))
            continue
        for name, fn in (("(b) fused, one launch q+k", lambda: fused_one(cfg)),
                         ("(b) fused, two launches", lambda: fused_two(cfg)),
                         ("(c) plain bias epilogue q+k", lambda: plain(cfg))):
            ms = time_ms(fn, dev, rep_ms=300)
            # (b) against (a)'s total: the step's saving; (c) against (a)'s two addmm: GEMM speed vs cuBLAS
            vs, what = (base, "(a) total") if name.startswith("(b)") else (base_gemm, "(a) addmm")
            rows.append(dict(row=name, config=tag, ms=ms, err=err_b if name.startswith("(b)") else err_c,
                             tflops=flops / ms / 1e9, step_ms_saved=42 * (vs - ms), vs=what))
            log(f"  {name:42s} {ms:7.4f} ms {flops / ms / 1e9:6.0f} TFLOP/s; 42 x ({what} - this) = "
                f"{42 * (vs - ms):+7.1f} ms per step")
    with open(os.path.join(args.out, "qk_gemm_epilogue.json"), "w") as f:
        json.dump(dict(env=env, shape=dict(B=B, S=S, H=H, D=D, hidden=hidden, text_len=text_len), rows=rows,
                       err_a=err_a, ref_norm_max_max=float(ref_nm.max())), f, indent=1, default=str)
    with open(os.path.join(args.out, "qk_gemm_epilogue.log"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
