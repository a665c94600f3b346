"""Issue 14 experiment: would "our activation pass + cuDNN's conv" beat the fused VAE conv at 256 / 512 channels?

The route (``route``) computes the fused op's function (``vae_conv3d``: GroupNorm-apply + SiLU + causal
(kt,kh,kw) conv + bias + residual, streaming cache) in four steps:

1. statistics: ``vae_group_norm_coef`` (the CUDA statistics pass on a GPU; float64 reference on a CPU), or a
   given ``norm_coef``;
2. ``act_cl_fwd`` (the shipped Triton pass, ops/vae_conv/cudnn_route.py): reads x NCDHW and the coefficients, writes act(x) rounded once to
   x's dtype with the kt-1 front frames before it (the cache as given, else act(x)'s frame 0 repeated, else
   zeros) channels-last: memory [B, T+kt-1, H, W, C] = a channels_last_3d [B, C, T+kt-1, H, W] tensor; it also
   writes the new cache (the last kt-1 padded frames, NCDHW, like the fused op);
3. ``F.conv3d(act_cl, weight_cl, bias, padding=(0, kh//2, kw//2))`` (cuDNN in channels_last_3d on a GPU);
4. the residual add, leaving y channels-last (``out_layout="cl"``, torch's in-place add on the conv output) or
   writing contiguous NCDHW (``"nc"``: the shipped transpose-add kernel ``cl_to_nc_fwd``, one pass that reads
   y channels-last and the residual NCDHW and writes NCDHW, as today's consumers read it).

GPU benchmark (<= 2 min on an H200; bf16, GroupNorm 32 + SiLU, 2 cache frames, residual, bias), at
[1,128,6,480,720], [1,256,6,240,360], [1,512,6,60,90], in one process, times (``bench.common.time_ms``):
 (a) ``a_fused``: ``vae_conv3d(..., backend="cuda")``, today's fused op;
 (b) ``b_route_nc`` / ``b_route_cl``: the route with the output converted to NCDHW (= the shipped op with the
     fastest block config) / left channels-last
     (``b_route_cl_rescl``: also the residual already channels-last, the best case of an all-channels-last chain);
 (c) ``c_cudnn_conv``: cuDNN's conv alone on a ready channels-last padded input (the floor of (b));
plus the route's parts (statistics; the activation pass with the fastest of a few block configs, ``part_act``,
and with the zq modulation, ``part_act_zq``, of which ``part_zq_mod`` forms scale / shift at zq's resolution;
step 4: ``part_add_to_nc`` / ``part_to_nc`` the transpose-add kernel with / without the residual,
``part_add_to_nc_torch`` the former torch conversion ``torch.add(y_cl, residual_nc, out=y_nc)`` for comparison,
``part_add_cl`` b_route_cl's torch add, ``part_add_cl_rescl`` the same add in one layout, the floor), the
transpose-add kernel's ms per block config (``transpose_config_ms``, TRANSPOSE_CONFIGS),
cuDNN on torch.cat'ed NCDHW input (``cudnn_cat_nc``, the bench_vae_conv row, to tie this run to a12da88's),
and (b)/(c) again with ``torch.backends.cudnn.benchmark = True``. Before timing, (a), (b_nc) and (b_cl) are
checked against ``vae_conv3d(..., backend="reference")`` in float32 (TF32 off) with NaN-poisoned
``torch.empty``: (b)'s error must be <= 2x (a)'s. Prints a table (ms, TFLOP/s by ``vae_conv3d_flops``,
speedup over (a)), per-kernel profiler times of (b), and an estimate of what the route would save in the
81x768x1360 decode (ResNet convs of the 5B decoder by level, each at the measured rate of the shape with its
input channels), and writes JSON to --out.

The activation pass ``act_cl_fwd`` (with ``zq_modulation_fwd``), the transpose-add ``cl_to_nc_fwd`` and the
channels-last weight are the shipped ones
(cogvideox_kernels/ops/vae_conv/cudnn_route.py, ``vae_conv3d``'s backend "cudnn"); rows ``b_cudnn_op`` (the op as
shipped, its default block config) and ``b_cudnn_op_zq`` / ``a_fused_zq`` (the decoder's form: the spatial norm's
modulation from a 16-channel zq) time it. ``--decode`` then times ``apply(vae)``'s decode with
``COGVIDEOX_KERNELS_VAE_CONV_CUDNN_CHANNELS`` off and on (``--decode-channels``, default ``256+``) by running
benchmarks/bench_vae_decode.py once each (``--decode-large``: also 81x768x1360).

    PYTHONPATH=$PWD python3 benchmarks/experiments/vae_conv_cudnn_route.py --out $OUT [--decode [--decode-large]]
    python benchmarks/experiments/vae_conv_cudnn_route.py --offline   # sm_90a compile + ptxas, no GPU
    TRITON_INTERPRET=1 PYTHONPATH=<package with the C++ extension> python3 .../vae_conv_cudnn_route.py --smoke
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

import subprocess

import torch
import torch.nn.functional as F
import triton

from cogvideox_kernels.ops.vae_conv import (check_vae_conv_inputs, spatial_norm_index, vae_conv3d,
                                            vae_conv3d_flops, vae_group_norm_coef)
from cogvideox_kernels.ops.vae_conv import cudnn_route
from cogvideox_kernels.ops.vae_conv.cudnn_route import (CUDNN_CHANNELS_ENV, _cl_to_nc_fwd_kernel,
                                                        _vae_act_cl_fwd_kernel, _zq_modulation_fwd_kernel, act_cl_fwd,
                                                        channels_last_weight, cl_to_nc_fwd, zq_modulation_fwd)

SHAPES = [(1, 128, 6, 480, 720), (1, 256, 6, 240, 360), (1, 512, 6, 60, 90)]
SMOKE_SHAPES = [(1, 64, 3, 8, 12)]  # --smoke: CPU (TRITON_INTERPRET=1, the C++ path as (a)): checks the script runs
DEVICE, BACKEND = "cuda", "cuda"
GROUPS = 32
ACT_CONFIGS = [(64, 64, 4), (128, 32, 4), (32, 128, 4), (128, 64, 8)]  # (BLOCK_P, BLOCK_C, warps)
TRANSPOSE_CONFIGS = [(64, 64, 4), (128, 64, 4), (64, 128, 8), (128, 128, 8), (32, 64, 4)]  # cl_to_nc_fwd's
ZQ_MOD_CONFIGS = [(64, 32, 4), (128, 32, 4), (64, 64, 4)]  # zq_modulation_fwd's
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def route(x, weight, bias=None, *, num_groups=0, norm_weight=None, norm_bias=None, eps=1e-6, silu=False, cache=None,
          pad_mode="replicate", residual=None, norm_coef=None, out_layout="nc", weight_cl=None, config=(64, 64, 4)):
    """``(y, new_cache)`` as ``vae_conv3d`` returns them. ``out_layout="nc"``: the shipped backend,
    ``vae_conv3d(..., backend="cudnn")`` (y contiguous NCDHW) with the activation pass's block ``config``;
    ``"cl"``: its steps (statistics, ``act_cl_fwd``, ``F.conv3d``) with y left channels_last_3d and the residual
    added in place (``weight_cl``: ``channels_last_weight(weight)`` made beforehand, else the cached one)."""
    check_vae_conv_inputs(x, weight, bias, num_groups=num_groups, norm_weight=norm_weight, norm_bias=norm_bias,
                          eps=eps, silu=silu, cache=cache, pad_mode=pad_mode, residual=residual, norm_coef=norm_coef)
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"route: x has dtype {x.dtype}; the activation pass takes float32, bfloat16 or float16")
    if out_layout not in ("nc", "cl"):
        raise ValueError(f"route: out_layout={out_layout!r}; choose 'nc' (contiguous NCDHW) or 'cl' (channels_last_3d)")
    if out_layout == "nc":
        saved, cudnn_route.ACT_CONFIG = cudnn_route.ACT_CONFIG, config
        try:
            return vae_conv3d(x, weight, bias, num_groups=num_groups, norm_weight=norm_weight, norm_bias=norm_bias,
                              eps=eps, silu=silu, cache=cache, pad_mode=pad_mode, residual=residual,
                              norm_coef=norm_coef, backend="cudnn")
        finally:
            cudnn_route.ACT_CONFIG = saved
    kt, kh, kw = weight.shape[2:]
    coef = norm_coef
    if num_groups:
        coef = vae_group_norm_coef(x, num_groups, norm_weight, norm_bias, eps)
    act, new_cache = act_cl_fwd(x, coef, silu=silu, kt=kt, cache=cache, pad_mode=pad_mode, config=config)
    w = channels_last_weight(weight) if weight_cl is None else weight_cl
    y = F.conv3d(act, w, bias, padding=(0, kh // 2, kw // 2))
    y = y.contiguous(memory_format=torch.channels_last_3d)  # (a no-op where the conv already gave that)
    return (y if residual is None else y.add_(residual)), new_cache


def _compile_sm90a(fn, sig, constexprs, aligned, warps):
    """``fn`` compiled for sm_90a without a GPU (Triton -> PTX -> ptxas): (ptxas's register / spill line, the PTX).
    ``sig``: argument types by name; ``constexprs``: values by name (also the integer arguments the JIT would
    specialize, e.g. a stride of 1); ``aligned``: the arguments marked divisible by 16, as the JIT specializes
    them at the benchmark's shapes."""
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    sig = dict(sig, **{k: "constexpr" for k in constexprs})
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "k.ptx"), "w") as f:
            f.write(k.asm["ptx"])
        run = subprocess.run(["ptxas", "-v", "--gpu-name", "sm_90a", os.path.join(tmp, "k.ptx"), "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    line = " ".join(ln.split("ptxas info    : ")[-1] for ln in run.stderr.splitlines() if "registers" in ln)
    return line, k.asm["ptx"]


def ptx_memory_ops(ptx):
    """Counts of the PTX's shared-memory and vector global loads / stores (where a layout change goes through
    shared memory, and how wide the global accesses are)."""
    keys = ("st.shared", "ld.shared", "ldmatrix", "stmatrix", "ld.global.v4", "ld.global.v2", "st.global.v4",
            "st.global.v2", "local")
    return {k: ptx.count(k) for k in keys}


def compile_offline(config, has_cache=True, dtype="bf16", zq=False):
    """The shipped activation pass (cudnn_route._vae_act_cl_fwd_kernel) for sm_90a: ptxas's register / spill line.
    ``zq``: the spatial norm's modulation from zq (scale / shift at zq's resolution, gathered through zq_index)."""
    ptr = f"*{dtype}"
    sig = {"x_ptr": ptr, "cache_ptr": ptr, "coef_ptr": "*fp32", "scale_ptr": ptr, "shift_ptr": ptr, "idx_ptr": "*i32",
           "act_ptr": ptr, "new_cache_ptr": ptr, "C": "i32", "T": "i32", "H": "i32", "W": "i32", "sxb": "i64",
           "sxc": "i32", "sxt": "i32", "scb": "i32", "scc": "i32", "sct": "i32", "ssb": "i32", "ssc": "i32",
           "sst": "i32", "sfb": "i32", "sfc": "i32", "sft": "i32", "WZ": "i32"}
    constexprs = dict(NF=2, HAS_CACHE=has_cache, ZERO_FRONT=False, HAS_COEF=True, MOD=2 if zq else 0, SILU=True,
                      BLOCK_P=config[0], BLOCK_C=config[1], INTERPRET=False)
    aligned = [n for n in sig if n.endswith("_ptr") or n in ("C", "sxb", "sxc", "sxt", "scb", "scc", "sct")]
    return _compile_sm90a(_vae_act_cl_fwd_kernel, sig, constexprs, aligned, config[2])[0]


def compile_zq_mod_offline(config, dtype="bf16"):
    """cudnn_route._zq_modulation_fwd_kernel (16 zq channels' sums, both biases) for sm_90a: ptxas's line."""
    ptr = f"*{dtype}"
    sig = {"zq_ptr": ptr, "sw_ptr": ptr, "sb_ptr": ptr, "hw_ptr": ptr, "hb_ptr": ptr, "scale_ptr": ptr,
           "shift_ptr": ptr, "C": "i32", "P": "i32", "KZ": "i32", "szb": "i32", "szk": "i32"}
    constexprs = dict(HAS_SB=True, HAS_HB=True, BLOCK_P=config[0], BLOCK_C=config[1], INTERPRET=False)
    aligned = [n for n in sig if n.endswith("_ptr") or n in ("C", "KZ", "szb")]
    return _compile_sm90a(_zq_modulation_fwd_kernel, sig, constexprs, aligned, config[2])[0]


def compile_transpose_offline(config, has_res=True, dtype="bf16"):
    """cudnn_route._cl_to_nc_fwd_kernel (channels_last_3d y: channel stride 1, which the JIT specializes) for
    sm_90a: (ptxas's line, ``ptx_memory_ops``)."""
    ptr = f"*{dtype}"
    sig = {"y_ptr": ptr, "res_ptr": ptr, "out_ptr": ptr, "C": "i32", "T": "i32", "HW": "i32", "syb": "i32",
           "syc": "i32", "syt": "i32", "syp": "i32", "srb": "i32", "src": "i32", "srt": "i32", "sob": "i32",
           "soc": "i32", "sot": "i32"}
    constexprs = dict(syc=1, HAS_RES=has_res, BLOCK_P=config[0], BLOCK_C=config[1], INTERPRET=False)
    aligned = [n for n in sig if n.endswith("_ptr") or n not in ("T", "syc")]
    line, ptx = _compile_sm90a(_cl_to_nc_fwd_kernel, sig, constexprs, aligned, config[2])
    return line, ptx_memory_ops(ptx)


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
                cache=(rnd(B, C, 2, H, W) * 0.5).to(dtype),
                # the spatial norm's latent (16 channels at a quarter of the resolution) and its (1,1,1) convs
                zq=rnd(B, 16, T, max(1, H // 4), max(1, W // 4)).to(dtype),
                scale_weight=(rnd(C, 16, 1, 1, 1) * 0.25).to(dtype), scale_bias=(rnd(C) * 0.3 + 1).to(dtype),
                shift_weight=(rnd(C, 16, 1, 1, 1) * 0.25).to(dtype), shift_bias=(rnd(C) * 0.3).to(dtype))


def zq_kw(a):
    """norm_kw with the spatial norm's modulation from zq (what the decoder's ResNet convs run)."""
    return dict(norm_kw(a), **{k: a[k] for k in ("zq", "scale_weight", "scale_bias", "shift_weight", "shift_bias")})


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
    with poisoned_empty():  # the decoder's form: the modulation from zq, fused kernel vs the shipped route
        ya_zq, _ = vae_conv3d(a["x"], a["weight"], a["bias"], backend=BACKEND, **zq_kw(a))
        yb_zq, _ = vae_conv3d(a["x"], a["weight"], a["bias"], backend="cudnn", **zq_kw(a))
        sync()
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref_zq, _ = vae_conv3d(f["x"], f["weight"], f["bias"], backend="reference", **zq_kw(f))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    out["a_zq_rel_err"] = rel(ya_zq, ref_zq)
    out["b_zq_rel_err"] = rel(yb_zq, ref_zq)
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
                     and out["b_zq_rel_err"] <= 2 * out["a_zq_rel_err"]
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


def pick_transpose_config(a, time_ms, coef):
    """ms of the transpose-add kernel (cl_to_nc_fwd: the conv's channels-last output + the residual into NCDHW)
    per block config of TRANSPOSE_CONFIGS, on this shape's conv output."""
    act, _ = act_cl_fwd(a["x"], coef, silu=True, kt=3, cache=a["cache"])
    y_cl = F.conv3d(act, channels_last_weight(a["weight"]), a["bias"], padding=(0, 1, 1))
    y_nc = torch.empty(a["residual"].shape, dtype=y_cl.dtype, device=y_cl.device)
    times = {cfg: time_ms(lambda: cl_to_nc_fwd(y_cl, a["residual"], y_nc, config=cfg), DEVICE, quick=True)
             for cfg in TRANSPOSE_CONFIGS}
    return {f"{bp}x{bc}w{w}": round(ms, 4) for (bp, bc, w), ms in times.items()}


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
    zq_mod = {k: a[k] for k in ("zq", "scale_weight", "scale_bias", "shift_weight", "shift_bias")}
    zq_index = spatial_norm_index(a["zq"].shape[2:], x.shape[2:], device=x.device)
    return {
        "a_fused": lambda: vae_conv3d(x, w, b, backend=BACKEND, **kw),
        "b_cudnn_op": lambda: vae_conv3d(x, w, b, backend="cudnn", **kw),  # the shipped backend, its default config
        "b_route_nc": lambda: route(x, w, b, weight_cl=wcl, out_layout="nc", config=config, **kw),  # best config
        "a_fused_zq": lambda: vae_conv3d(x, w, b, backend=BACKEND, **zq_kw(a)),
        "b_cudnn_op_zq": lambda: vae_conv3d(x, w, b, backend="cudnn", **zq_kw(a)),
        "b_route_cl": lambda: route(x, w, b, weight_cl=wcl, out_layout="cl", config=config, **kw),
        "b_route_cl_rescl": lambda: route(x, w, b, weight_cl=wcl, out_layout="cl", config=config, **kw_rescl),
        "c_cudnn_conv": lambda: F.conv3d(act, wcl, b, padding=(0, 1, 1)),
        "cudnn_cat_nc": lambda: F.conv3d(torch.cat((cache, x), dim=2), w, b, padding=(0, 1, 1)),
        "part_stats": lambda: vae_group_norm_coef(x, GROUPS, a["norm_weight"], a["norm_bias"], 1e-6),
        "part_act": lambda: act_cl_fwd(x, coef, silu=True, kt=3, cache=cache, config=config),
        "part_act_zq": lambda: act_cl_fwd(x, coef, silu=True, kt=3, cache=cache, zq_index=zq_index, **zq_mod),
        "part_zq_mod": lambda: zq_modulation_fwd(a["zq"], x.dtype, a["scale_weight"], a["scale_bias"],
                                                 a["shift_weight"], a["shift_bias"]),
        "part_add_to_nc": lambda: cl_to_nc_fwd(y_cl, res, y_nc),  # the shipped op's step 4 (transpose-add kernel)
        "part_to_nc": lambda: cl_to_nc_fwd(y_cl, None, y_nc),  # (without a residual)
        "part_add_to_nc_torch": lambda: torch.add(y_cl, res, out=y_nc),  # the former step 4 (torch, mixed layouts)
        "part_add_cl": lambda: y_cl.add_(res),  # b_route_cl's add (torch, in place on y channels-last)
        "part_add_cl_rescl": lambda: y_cl.add_(res_cl),  # the same add in one layout (the floor)
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


def decode_switch(out, channels, large=False, tiny=False):
    """apply(vae)'s decode with ``CUDNN_CHANNELS_ENV`` unset ("off") and set to ``channels`` ("on"): one
    ``benchmarks/bench_vae_decode.py`` process each (the switch is read at import), patched rows only (fused
    modulation on, the shipped default), 49x480x720 (and 81x768x1360 with ``large``; the tiny CPU VAE with
    ``tiny``), each with its float32 reference error. Prints their result tables; returns {label: exit code}."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench_vae_decode.py")
    codes = {}
    for label, value in (("off", None), ("on", channels)):
        env = {k: v for k, v in os.environ.items() if k != CUDNN_CHANNELS_ENV}
        if value:
            env[CUDNN_CHANNELS_ENV] = value
        folder = os.path.join(out or ".", f"decode_cudnn_{label}")
        cmd = [sys.executable, script, "--out", folder, "--no-encode"]
        cmd += ["--tiny"] if tiny else ["--variants", "patched", "--fused-modulation", "on"]
        if large and not tiny:
            cmd += ["--large", "--large-variants", "patched"]
        print(f"decode, switch {label} ({CUDNN_CHANNELS_ENV}={value or ''}): {' '.join(cmd)}", flush=True)
        run = subprocess.run(cmd, env=env, text=True, capture_output=True)
        codes[label] = run.returncode
        if run.returncode:
            print(run.stdout[-3000:], run.stderr[-3000:], flush=True)
        table = os.path.join(folder, "vae_decode_results.md")
        if os.path.exists(table):
            with open(table) as f:
                print(f.read(), flush=True)
    return codes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for vae_conv_cudnn_route_<commit>.json")
    ap.add_argument("--quick", action="store_true", help="30 ms of repetitions per timing instead of 100")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile of the route")
    ap.add_argument("--smoke", action="store_true", help="CPU run at a small shape (needs TRITON_INTERPRET=1)")
    ap.add_argument("--offline", action="store_true",
                    help="compile the shipped kernels (activation pass, zq modulation, transpose-add) for sm_90a "
                         "(no GPU), print their ptxas lines, and exit")
    ap.add_argument("--decode", action="store_true",
                    help="also time apply(vae)'s 49x480x720 decode with the switch off and on (two bench_vae_decode.py "
                         "processes: the switch is read at import)")
    ap.add_argument("--decode-large", action="store_true", help="with --decode: also the 81x768x1360 decode")
    ap.add_argument("--decode-channels", default="256+",
                    help=f"{CUDNN_CHANNELS_ENV} for the 'on' decode (default 256+: the 256 / 512-channel convs)")
    ap.add_argument("--skip-convs", action="store_true", help="skip the per-shape conv benchmark (with --decode)")
    args = ap.parse_args(argv)
    if args.offline:
        for cfg in ACT_CONFIGS:
            for has_cache in (True, False):
                for zq in (False, True):
                    print("act", cfg, "cache" if has_cache else "no cache", "zq" if zq else "",
                          compile_offline(cfg, has_cache, zq=zq), flush=True)
        for cfg in ZQ_MOD_CONFIGS:
            print("zq_mod", cfg, compile_zq_mod_offline(cfg), flush=True)
        for cfg in TRANSPOSE_CONFIGS:
            for has_res in (True, False):
                line, ops = compile_transpose_offline(cfg, has_res)
                print("cl_to_nc", cfg, "residual" if has_res else "no residual", line, json.dumps(ops), flush=True)
        return 0
    from cogvideox_kernels.bench.common import environment, peak_memory_gib, time_ms

    global DEVICE, BACKEND
    shapes = SHAPES
    if args.smoke:
        DEVICE, BACKEND, shapes, args.no_profile = "cpu", "cpp", SMOKE_SHAPES, True
    if args.skip_convs:
        shapes = []
    elif DEVICE == "cuda" and not torch.cuda.is_available():
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
        transpose_ms = pick_transpose_config(a, time_ms, coef)
        check = check_shape(a, config)
        failed |= not check["ok"]
        print(json.dumps({"shape": key, "act_config": config, "act_config_ms": config_ms,
                          "transpose_config_ms": transpose_ms, "check": check}), flush=True)
        y = torch.empty(shape, dtype=a["x"].dtype, device=DEVICE)
        flops = vae_conv3d_flops(a["weight"], y)
        del y
        fns = variants(a, config)
        timed = {name: time_ms(fn, DEVICE, quick=args.quick) for name, fn in fns.items()}
        torch.backends.cudnn.benchmark = True  # cuDNN's own search (what the model would get with the flag set)
        for name in ("b_cudnn_op", "b_route_nc", "b_route_cl", "c_cudnn_conv"):
            timed[name + "_cudnn_bench"] = time_ms(fns[name], DEVICE, quick=args.quick)
        torch.backends.cudnn.benchmark = False
        peak = {name: peak_memory_gib(fns[name], DEVICE) for name in ("a_fused", "b_cudnn_op", "b_route_cl")}
        ms_a = timed["a_fused"]
        rows = []
        for name, ms in timed.items():
            whole = not name.startswith("part_")
            rows.append(dict(shape=key, impl=name, ms=round(ms, 4),
                             tflops=round(flops / ms / 1e9, 1) if whole else None,
                             vs_a=round(ms_a / ms, 3) if whole else None,
                             peak_mib=None if peak.get(name) is None else round(peak[name] * 1024, 1)))
            print(json.dumps(rows[-1]), flush=True)
        rates[shape[1]] = {k: flops / timed[k] / 1e9 for k in ("a_fused", "b_cudnn_op", "b_route_nc", "b_route_cl",
                                                                "c_cudnn_conv", "a_fused_zq", "b_cudnn_op_zq")}
        prof = {}
        if not args.no_profile:
            try:
                prof = profile_route(fns["b_route_nc"])
                print(json.dumps({"shape": key, "b_route_nc_kernels_ms": prof}), flush=True)
            except Exception as exc:  # the table matters more than the breakdown
                print(f"profile failed: {type(exc).__name__}: {exc}", flush=True)
        result["shapes"][key] = dict(act_config=list(config), act_config_ms=config_ms,
                                     transpose_config_ms=transpose_ms, check=check, flops=flops,
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
    if args.decode:
        codes = decode_switch(args.out, args.decode_channels, large=args.decode_large, tiny=args.smoke)
        failed |= any(codes.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
