"""Issue 14 experiment: would "our activation pass + cuDNN's conv" beat the fused VAE conv at 256 / 512 channels?

The route (``route``) computes the fused op's function (``vae_conv3d``: GroupNorm-apply + SiLU + causal
(kt,kh,kw) conv + bias + residual, streaming cache) in four steps:

1. statistics: ``vae_group_norm_coef`` (the CUDA statistics pass on a GPU; float64 reference on a CPU), or a
   given ``norm_coef``;
2. ``act_cl_fwd`` (the Triton kernel below): reads x NCDHW and the coefficients, writes act(x) rounded once to
   x's dtype with the kt-1 front frames before it (the cache as given, else act(x)'s frame 0 repeated, else
   zeros) channels-last: memory [B, T+kt-1, H, W, C] = a channels_last_3d [B, C, T+kt-1, H, W] tensor; it also
   writes the new cache (the last kt-1 padded frames, NCDHW, like the fused op);
3. ``F.conv3d(act_cl, weight_cl, bias, padding=(0, kh//2, kw//2))`` (cuDNN in channels_last_3d on a GPU);
4. the residual add, leaving y channels-last (``out_layout="cl"``, an in-place add on the conv output) or
   writing contiguous NCDHW (``"nc"``: one add that reads y channels-last and writes NCDHW, as today's
   consumers read it).

GPU benchmark (<= 2 min on an H200; bf16, GroupNorm 32 + SiLU, 2 cache frames, residual, bias), at
[1,128,6,480,720], [1,256,6,240,360], [1,512,6,60,90], in one process, times (``bench.common.time_ms``):
 (a) ``a_fused``: ``vae_conv3d(..., backend="cuda")``, today's fused op;
 (b) ``b_route_nc`` / ``b_route_cl``: the route with the output converted to NCDHW / left channels-last
     (``b_route_cl_rescl``: also the residual already channels-last, the best case of an all-channels-last chain);
 (c) ``c_cudnn_conv``: cuDNN's conv alone on a ready channels-last padded input (the floor of (b));
plus the route's parts (statistics, activation pass with the fastest of a few block configs, the adds),
cuDNN on torch.cat'ed NCDHW input (``cudnn_cat_nc``, the bench_vae_conv row, to tie this run to a12da88's),
and (b)/(c) again with ``torch.backends.cudnn.benchmark = True``. Before timing, (a), (b_nc) and (b_cl) are
checked against ``vae_conv3d(..., backend="reference")`` in float32 (TF32 off) with NaN-poisoned
``torch.empty``: (b)'s error must be <= 2x (a)'s. Prints a table (ms, TFLOP/s by ``vae_conv3d_flops``,
speedup over (a)), per-kernel profiler times of (b), and an estimate of what the route would save in the
81x768x1360 decode (ResNet convs of the 5B decoder by level, each at the measured rate of the shape with its
input channels), and writes JSON to --out.

    PYTHONPATH=$PWD python3 benchmarks/experiments/vae_conv_cudnn_route.py --out $OUT
    python benchmarks/experiments/vae_conv_cudnn_route.py --offline   # sm_90a compile + ptxas, no GPU
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cogvideox_kernels.ops._triton_utils import interpret_mode, store_cast
from cogvideox_kernels.ops.vae_conv import (check_vae_conv_inputs, vae_conv3d, vae_conv3d_flops,
                                            vae_group_norm_coef)

SHAPES = [(1, 128, 6, 480, 720), (1, 256, 6, 240, 360), (1, 512, 6, 60, 90)]
SMOKE_SHAPES = [(1, 64, 3, 8, 12)]  # --smoke: CPU (TRITON_INTERPRET=1, the C++ path as (a)): checks the script runs
DEVICE, BACKEND = "cuda", "cuda"
GROUPS = 32
ACT_CONFIGS = [(64, 64, 4), (128, 32, 4), (32, 128, 4), (128, 64, 8)]  # (BLOCK_P, BLOCK_C, warps)
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _act_tile(x_ptr, coef_ptr, b, c, p, mask, t, C, sxb, sxc, sxt, HAS_COEF: tl.constexpr, SILU: tl.constexpr):
    """act(x[b, c, t, p]) in float32: GroupNorm-apply v * a + d (coef [B, C, 2]), then SiLU."""
    v = tl.load(x_ptr + b * sxb + c[:, None] * sxc + t.to(tl.int64) * sxt + p[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if HAS_COEF:
        c_ok = c < C
        a = tl.load(coef_ptr + (b * C + c) * 2, mask=c_ok, other=0.0)
        d = tl.load(coef_ptr + (b * C + c) * 2 + 1, mask=c_ok, other=0.0)
        v = v * a[:, None] + d[:, None]
    if SILU:
        v = v / (1.0 + tl.exp(-v))
    return v


@triton.jit
def _act_cl_fwd_kernel(x_ptr, cache_ptr, coef_ptr, act_ptr, new_cache_ptr, C, T, HW,
                       sxb, sxc, sxt, scb, scc, sct,
                       NF: tl.constexpr, HAS_CACHE: tl.constexpr, ZERO_FRONT: tl.constexpr,
                       HAS_COEF: tl.constexpr, SILU: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr):
    """One program: BLOCK_C channels x BLOCK_P pixels of padded frame ``fp`` of batch element ``b``. Padded
    frames 0..NF-1 are the front (cache as given / act(x) frame 0 / zeros), NF.. are act(x) frames 0..T-1.
    Reads along pixels (NCDHW planes, each dense), writes along channels (act: [B, T+NF, H*W, C]);
    padded frames >= T also go to the new cache [B, C, NF, H*W]."""
    pid_f = tl.program_id(2)
    TP = T + NF
    b = (pid_f // TP).to(tl.int64)
    fp = pid_f % TP
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (c < C)[:, None] & (p < HW)[None, :]
    if HAS_CACHE:
        if fp < NF:  # a front frame: the cache's frame fp, as given (already activated)
            v = tl.load(cache_ptr + b * scb + c[:, None] * scc + fp.to(tl.int64) * sct + p[None, :], mask=mask,
                        other=0.0).to(tl.float32)
        else:
            v = _act_tile(x_ptr, coef_ptr, b, c, p, mask, fp - NF, C, sxb, sxc, sxt, HAS_COEF, SILU)
    else:  # x's frame fp - NF, or frame 0 for a front frame (replicated; zeroed below for ZERO_FRONT)
        v = _act_tile(x_ptr, coef_ptr, b, c, p, mask, tl.maximum(fp - NF, 0), C, sxb, sxc, sxt, HAS_COEF, SILU)
        if ZERO_FRONT:
            v = tl.where(fp < NF, 0.0, v)
    out = store_cast(v, act_ptr.dtype.element_ty, INTERPRET)
    row = (b * TP + fp) * HW + p  # channels-last pixel rows of act
    tl.store(act_ptr + row[None, :] * C + c[:, None], out, mask=mask)
    if fp >= T:  # padded frames T .. T+NF-1 are the new cache's frames 0 .. NF-1
        nc = ((b * C + c[:, None]) * NF + (fp - T)) * HW + p[None, :]
        tl.store(new_cache_ptr + nc, out, mask=mask)


def _plane_dense(t):
    """A [B, C, T, H, W] tensor whose (H, W) planes are dense (row stride W, unit column stride): the kernel
    reads it through its (b, c, t) strides; anything else is copied."""
    return t.stride(4) == 1 and (t.shape[3] == 1 or t.stride(3) == t.shape[4])


def act_cl_fwd(x, coef, *, silu, kt, cache=None, pad_mode="replicate", config=(64, 64, 4)):
    """(act_cl [B, C, T+kt-1, H, W] channels_last_3d, new_cache [B, C, kt-1, H, W] contiguous): the route's
    activation pass. ``coef`` float32 [B, C, 2] (norm(v) = v * a + d) or None (no norm)."""
    B, C, T, H, W = x.shape
    nf = kt - 1
    x = x if _plane_dense(x) else x.contiguous()
    if cache is not None:
        cache = cache if _plane_dense(cache) else cache.contiguous()
    if coef is not None:
        coef = coef.contiguous()
    act = torch.empty((B, T + nf, H, W, C), dtype=x.dtype, device=x.device).permute(0, 4, 1, 2, 3)
    new_cache = torch.empty((B, C, nf, H, W), dtype=x.dtype, device=x.device)
    bp, bc, warps = config
    cs = cache.stride()[:3] if cache is not None else (0, 0, 0)
    grid = (triton.cdiv(H * W, bp), triton.cdiv(C, bc), B * (T + nf))
    _act_cl_fwd_kernel[grid](x, cache if cache is not None else x, coef if coef is not None else x, act, new_cache,
                             C, T, H * W, *x.stride()[:3], *cs, NF=nf, HAS_CACHE=cache is not None,
                             ZERO_FRONT=pad_mode == "zeros", HAS_COEF=coef is not None, SILU=silu,
                             BLOCK_P=bp, BLOCK_C=bc, INTERPRET=interpret_mode(),
                             num_warps=warps)
    return act, new_cache


def channels_last_weight(weight):
    """The conv weight in channels_last_3d (in a model: once per weight, like the fused op's packed weight)."""
    return weight.contiguous(memory_format=torch.channels_last_3d)


def route(x, weight, bias=None, *, num_groups=0, norm_weight=None, norm_bias=None, eps=1e-6, silu=False, cache=None,
          pad_mode="replicate", residual=None, norm_coef=None, out_layout="nc", weight_cl=None, config=(64, 64, 4)):
    """``(y, new_cache)`` as ``vae_conv3d`` returns them, by statistics + ``act_cl_fwd`` + ``F.conv3d`` on the
    channels-last padded activation + the residual add. ``out_layout``: "nc" (y contiguous NCDHW) or "cl"
    (y channels_last_3d). ``weight_cl``: ``channels_last_weight(weight)`` made beforehand (else made here)."""
    check_vae_conv_inputs(x, weight, bias, num_groups=num_groups, norm_weight=norm_weight, norm_bias=norm_bias,
                          eps=eps, silu=silu, cache=cache, pad_mode=pad_mode, residual=residual, norm_coef=norm_coef)
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"route: x has dtype {x.dtype}; the activation pass takes float32, bfloat16 or float16")
    if out_layout not in ("nc", "cl"):
        raise ValueError(f"route: out_layout={out_layout!r}; choose 'nc' (contiguous NCDHW) or 'cl' (channels_last_3d)")
    kt, kh, kw = weight.shape[2:]
    coef = norm_coef
    if num_groups:
        coef = vae_group_norm_coef(x, num_groups, norm_weight, norm_bias, eps)
    act, new_cache = act_cl_fwd(x, coef, silu=silu, kt=kt, cache=cache, pad_mode=pad_mode, config=config)
    w = channels_last_weight(weight) if weight_cl is None else weight_cl
    y = F.conv3d(act, w, bias, padding=(0, kh // 2, kw // 2))
    if out_layout == "cl":
        y = y.contiguous(memory_format=torch.channels_last_3d)  # (a no-op where the conv already gave that)
        return (y if residual is None else y.add_(residual)), new_cache
    if residual is None:
        return y.contiguous(), new_cache
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    return torch.add(y, residual, out=out), new_cache


def compile_offline(config, has_cache=True, dtype="bf16"):
    """The activation pass compiled for sm_90a without a GPU (Triton -> PTX -> ptxas): catches compile errors
    here; returns ptxas's register / spill line."""
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bp, bc, warps = config
    ptr = f"*{dtype}"
    sig = {"x_ptr": ptr, "cache_ptr": ptr, "coef_ptr": "*fp32", "act_ptr": ptr, "new_cache_ptr": ptr, "C": "i32",
           "T": "i32", "HW": "i32", "sxb": "i64", "sxc": "i32", "sxt": "i32", "scb": "i32", "scc": "i32", "sct": "i32"}
    constexprs = dict(NF=2, HAS_CACHE=has_cache, ZERO_FRONT=False, HAS_COEF=True, SILU=True, BLOCK_P=bp, BLOCK_C=bc,
                      INTERPRET=False)
    names = list(sig)
    # every int but T divisible by 16, as the JIT specializes them at the benchmark's shapes
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n != "T"}
    sig.update({k: "constexpr" for k in constexprs})
    k = triton.compile(ASTSource(fn=_act_cl_fwd_kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "k.ptx"), "w") as f:
            f.write(k.asm["ptx"])
        run = subprocess.run(["ptxas", "-v", "--gpu-name", "sm_90a", os.path.join(tmp, "k.ptx"), "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    return " ".join(line.split("ptxas info    : ")[-1] for line in run.stderr.splitlines() if "registers" in line)


# ------------------------------------------------------------------------------------------------ GPU benchmark
def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def rel(out, ref):
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty / empty_like return NaN-filled tensors while inside: an unwritten output element shows."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def make_inputs(shape, seed, dtype=torch.bfloat16):
    B, C, T, H, W = shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=DEVICE, dtype=torch.float32)  # noqa: E731
    return dict(x=(rnd(B, C, T, H, W) * 1.5 + 0.3).to(dtype), weight=(rnd(C, C, 3, 3, 3) / math.sqrt(27 * C)).to(dtype),
                bias=(rnd(C) * 0.1).to(dtype), norm_weight=(rnd(C) * 0.3 + 1).to(dtype),
                norm_bias=(rnd(C) * 0.3).to(dtype), residual=rnd(B, C, T, H, W).to(dtype),
                cache=(rnd(B, C, 2, H, W) * 0.5).to(dtype))


def norm_kw(a):
    return dict(num_groups=GROUPS, norm_weight=a["norm_weight"], norm_bias=a["norm_bias"], silu=True,
                cache=a["cache"], residual=a["residual"])


def check_shape(a, config):
    """rel errors of (a), (b_nc), (b_cl) and their new caches against the float32 reference (TF32 off)."""
    f = {k: v.float() for k, v in a.items()}
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref, ref_cache = vae_conv3d(f["x"], f["weight"], f["bias"], backend="reference", **norm_kw(f))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    wcl = channels_last_weight(a["weight"])
    out = {}
    with poisoned_empty():
        ya, ca = vae_conv3d(a["x"], a["weight"], a["bias"], backend=BACKEND, **norm_kw(a))
        ynb, cnb = route(a["x"], a["weight"], a["bias"], weight_cl=wcl, out_layout="nc", config=config, **norm_kw(a))
        ycl, ccl = route(a["x"], a["weight"], a["bias"], weight_cl=wcl, out_layout="cl", config=config, **norm_kw(a))
        sync()
    out["a_rel_err"] = rel(ya, ref)
    out["b_nc_rel_err"] = rel(ynb, ref)
    out["b_cl_rel_err"] = rel(ycl, ref)
    out["b_vs_a_rel"] = rel(ynb, ya)
    out["a_cache_rel_err"] = rel(ca, ref_cache)
    out["b_cache_rel_err"] = rel(cnb, ref_cache)
    out["b_cache_vs_a_rel"] = rel(cnb, ca)
    out["b_nc_layout_ok"] = bool(ynb.is_contiguous())
    out["b_cl_layout_ok"] = bool(ycl.is_contiguous(memory_format=torch.channels_last_3d))
    out["ok"] = bool(out["b_nc_rel_err"] <= 2 * out["a_rel_err"] and out["b_cl_rel_err"] <= 2 * out["a_rel_err"]
                     and out["b_cache_rel_err"] <= 2 * max(out["a_cache_rel_err"], 1e-3)
                     and out["b_nc_layout_ok"] and out["b_cl_layout_ok"])
    return {k: (float(f"{v:.4e}") if isinstance(v, float) else v) for k, v in out.items()}


def pick_act_config(a, time_ms, coef):
    """The fastest activation-pass block config at this shape (ms per config)."""
    times = {}
    for cfg in ACT_CONFIGS:
        times[cfg] = time_ms(lambda: act_cl_fwd(a["x"], coef, silu=True, kt=3, cache=a["cache"], config=cfg), DEVICE,
                             quick=True)
    best = min(times, key=times.get)
    return best, {f"{bp}x{bc}w{w}": round(ms, 4) for (bp, bc, w), ms in times.items()}


def variants(a, config):
    x, w, b, res, cache = a["x"], a["weight"], a["bias"], a["residual"], a["cache"]
    kw = norm_kw(a)
    wcl = channels_last_weight(w)
    res_cl = res.contiguous(memory_format=torch.channels_last_3d)
    coef = vae_group_norm_coef(x, GROUPS, a["norm_weight"], a["norm_bias"], 1e-6)
    act, _ = act_cl_fwd(x, coef, silu=True, kt=3, cache=cache, config=config)
    y_cl = F.conv3d(act, wcl, b, padding=(0, 1, 1))
    y_nc = torch.empty(res.shape, dtype=res.dtype, device=res.device)
    kw_rescl = dict(kw, residual=res_cl)
    return {
        "a_fused": lambda: vae_conv3d(x, w, b, backend=BACKEND, **kw),
        "b_route_nc": lambda: route(x, w, b, weight_cl=wcl, out_layout="nc", config=config, **kw),
        "b_route_cl": lambda: route(x, w, b, weight_cl=wcl, out_layout="cl", config=config, **kw),
        "b_route_cl_rescl": lambda: route(x, w, b, weight_cl=wcl, out_layout="cl", config=config, **kw_rescl),
        "c_cudnn_conv": lambda: F.conv3d(act, wcl, b, padding=(0, 1, 1)),
        "cudnn_cat_nc": lambda: F.conv3d(torch.cat((cache, x), dim=2), w, b, padding=(0, 1, 1)),
        "part_stats": lambda: vae_group_norm_coef(x, GROUPS, a["norm_weight"], a["norm_bias"], 1e-6),
        "part_act": lambda: act_cl_fwd(x, coef, silu=True, kt=3, cache=cache, config=config),
        "part_add_to_nc": lambda: torch.add(y_cl, res, out=y_nc),
        "part_add_cl": lambda: y_cl.add_(res),
        "part_add_cl_rescl": lambda: y_cl.add_(res_cl),
    }


def profile_route(fn, reps=5):
    """GPU ms per call of each kernel of ``fn`` (torch.profiler; kernels only)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total:
            out[e.key[:100]] = round(e.device_time_total / 1e3 / reps, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# The 5B decoder's ResNet (3,3,3) convs at 81x768x1360 (diffusers' CogVideoX VAE: decoder channels 512, 512,
# 256, 256, 128; layers_per_block 3 -> 4 ResNet blocks per up block, 2 in the mid block; 21 latent frames at
# 96x170, 41 frames at 192x340, 81 at 384x680 and 768x1360): (level, C_in, C_out, H, W, frames, convs).
DECODE_81x768x1360 = [
    ("mid + up_blocks.0", 512, 512, 96, 170, 21, 12),
    ("up_blocks.1 conv1 of block 0", 512, 256, 192, 340, 41, 1),
    ("up_blocks.1", 256, 256, 192, 340, 41, 7),
    ("up_blocks.2", 256, 256, 384, 680, 81, 8),
    ("up_blocks.3 conv1 of block 0", 256, 128, 768, 1360, 81, 1),
    ("up_blocks.3", 128, 128, 768, 1360, 81, 7),
]


def decode_estimate(rates):
    """Per level: FLOPs and the ms of the fused op and of the route at the TFLOP/s measured at the shape with
    the same input channels (``rates[C_in] = {impl: TFLOP/s}``). Rough: frame counts per call, spatial sizes
    and C_out differ from the benchmark shapes."""
    rows, tot = [], {}
    for level, ci, co, h, w, frames, n in DECODE_81x768x1360:
        if ci not in rates:  # (a run without that shape)
            continue
        flops = 2.0 * ci * co * 27 * h * w * frames * n
        r = dict(level=level, c_in=ci, c_out=co, hw=f"{h}x{w}", frames=frames, convs=n, tflop=round(flops / 1e12, 1))
        for impl, tflops in rates[ci].items():
            r[f"{impl}_ms"] = round(flops / tflops / 1e9, 1)
            tot[impl] = tot.get(impl, 0.0) + r[f"{impl}_ms"]
        rows.append(r)
    return rows, {k: round(v, 1) for k, v in tot.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for vae_conv_cudnn_route_<commit>.json")
    ap.add_argument("--quick", action="store_true", help="30 ms of repetitions per timing instead of 100")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile of the route")
    ap.add_argument("--smoke", action="store_true", help="CPU run at a small shape (needs TRITON_INTERPRET=1)")
    ap.add_argument("--offline", action="store_true", help="compile the activation pass for sm_90a (no GPU) and exit")
    args = ap.parse_args(argv)
    if args.offline:
        for cfg in ACT_CONFIGS:
            for has_cache in (True, False):
                print(cfg, "cache" if has_cache else "no cache", compile_offline(cfg, has_cache), flush=True)
        return 0
    from cogvideox_kernels.bench.common import environment, peak_memory_gib, time_ms

    global DEVICE, BACKEND
    shapes = SHAPES
    if args.smoke:
        DEVICE, BACKEND, shapes, args.no_profile = "cpu", "cpp", SMOKE_SHAPES, True
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (the CPU check is tests/experiments/test_vae_conv_cudnn_route.py; --smoke runs here)")
        return 2
    env = environment(DEVICE)
    env["commit"] = os.environ.get("COGVIDEOX_KERNELS_COMMIT") or env["commit"]
    print(json.dumps(env), flush=True)
    torch.backends.cudnn.benchmark = False
    result = dict(env=env, shapes={}, rows=[])
    rates = {}
    failed = False
    for i, shape in enumerate(shapes):
        a = make_inputs(shape, seed=i)
        key = "x".join(map(str, shape))
        coef = vae_group_norm_coef(a["x"], GROUPS, a["norm_weight"], a["norm_bias"], 1e-6)
        config, config_ms = pick_act_config(a, time_ms, coef)
        check = check_shape(a, config)
        failed |= not check["ok"]
        print(json.dumps({"shape": key, "act_config": config, "act_config_ms": config_ms, "check": check}), flush=True)
        y = torch.empty(shape, dtype=a["x"].dtype, device=DEVICE)
        flops = vae_conv3d_flops(a["weight"], y)
        del y
        fns = variants(a, config)
        timed = {name: time_ms(fn, DEVICE, quick=args.quick) for name, fn in fns.items()}
        torch.backends.cudnn.benchmark = True  # cuDNN's own search (what the model would get with the flag set)
        for name in ("b_route_nc", "b_route_cl", "c_cudnn_conv"):
            timed[name + "_cudnn_bench"] = time_ms(fns[name], DEVICE, quick=args.quick)
        torch.backends.cudnn.benchmark = False
        peak = {name: peak_memory_gib(fns[name], DEVICE) for name in ("a_fused", "b_route_nc", "b_route_cl")}
        ms_a = timed["a_fused"]
        rows = []
        for name, ms in timed.items():
            whole = not name.startswith("part_")
            rows.append(dict(shape=key, impl=name, ms=round(ms, 4),
                             tflops=round(flops / ms / 1e9, 1) if whole else None,
                             vs_a=round(ms_a / ms, 3) if whole else None,
                             peak_mib=None if peak.get(name) is None else round(peak[name] * 1024, 1)))
            print(json.dumps(rows[-1]), flush=True)
        rates[shape[1]] = {k: flops / timed[k] / 1e9 for k in ("a_fused", "b_route_nc", "b_route_cl", "c_cudnn_conv")}
        prof = {}
        if not args.no_profile:
            try:
                prof = profile_route(fns["b_route_nc"])
                print(json.dumps({"shape": key, "b_route_nc_kernels_ms": prof}), flush=True)
            except Exception as exc:  # the table matters more than the breakdown
                print(f"profile failed: {type(exc).__name__}: {exc}", flush=True)
        result["shapes"][key] = dict(act_config=list(config), act_config_ms=config_ms, check=check, flops=flops,
                                     b_route_nc_kernels_ms=prof)
        result["rows"] += rows
        del a, fns
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        if args.out:  # partial results survive a later failure
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"vae_conv_cudnn_route_{env['commit'][:7]}.json"), "w") as f:
                json.dump(result, f, indent=1)
    est_rows, est_tot = decode_estimate(rates)
    result["decode_81x768x1360_estimate"] = dict(levels=est_rows, total_ms=est_tot)
    if args.out:
        with open(os.path.join(args.out, f"vae_conv_cudnn_route_{env['commit'][:7]}.json"), "w") as f:
            json.dump(result, f, indent=1)
    cols = ["shape", "impl", "ms", "tflops", "vs_a", "peak_mib"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in result["rows"]:
        print("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")
    print("\nResNet convs of the 81x768x1360 decode at these rates (ms):")
    for r in est_rows:
        print(json.dumps(r))
    print(json.dumps({"total_ms": est_tot}))
    print("checks:", "all ok" if not failed else "FAILED (see the check lines)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
