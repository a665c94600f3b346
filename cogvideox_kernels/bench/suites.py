"""Benchmark cases: for each op and shape, our kernel and every baseline, on the same inputs.

Each case computes a float32 reference once, runs every variant once to check parity (a variant
outside its budget is reported as wrong and never timed), then times the correct ones. Shapes come
from ``bench/presets.py``. On a CPU the partial baselines (starred; a different function) are left
out and nothing is compared by speed: CPU timings say nothing about the product.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.attention import apply_rope_interleaved, attention_flops
from ..ops.expert_ffn import expert_ffn_flops
from .common import Progress, Result, peak_memory_gib, time_ms
from .presets import attention_shapes, conv_shapes, ffn_shapes


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


@dataclass
class Variant:
    name: str
    kind: str  # "ours" | "baseline"
    fn: Callable[[], torch.Tensor]
    compare: bool = True  # False for partial baselines (e.g. attention without norm/RoPE)
    note: str = ""
    backend: str = "torch"  # what runs: our kernel's backend, or "torch" for a PyTorch baseline
    budget: float | None = None  # a lossy mode's own error gate (replaces the 2x-PyTorch rule)


@dataclass
class Case:
    op: str
    shape: str
    reference: Callable[[], torch.Tensor]
    variants: list[Variant]
    flops: float | None = None
    bytes: float | None = None
    torch_path: str | None = None  # PyTorch's own same-dtype path: ours may err at most 2x its error
    abs_budget: float = 1e-2
    extra: dict = field(default_factory=dict)


OP_NAMES = {"attention": "rope3d_attention", "ffn": "expert_ffn", "conv": "causal_conv3d"}


def kernel_backends(op: str, device: torch.device) -> list[str]:
    """The kernel backends of ``op`` that can run on ``device`` (from the op registry), in the order
    ``auto`` tries them: each gets its own "ours (<kernel>)" row."""
    from ..ops import registry

    return [k for k, why_not in registry.availability(OP_NAMES[op], device).items() if why_not is None]


def float32(obj):
    """``obj`` with every floating tensor in it (also inside tuples / dicts) as float32."""
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(float32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: float32(v) for k, v in obj.items()}
    return obj


def float32_reference(fn, *args, **kwargs) -> torch.Tensor:
    """``fn`` on float32 copies of its inputs with TF32 off: the float32 output every variant is
    compared with (not the reference's output rounded back to the input dtype)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return fn(*float32(args), **float32(kwargs))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def backend_label(kernel: str, device: torch.device) -> str:
    return f"{kernel} (interpreter)" if kernel == "triton" and device.type == "cpu" else kernel


# ------------------------------------------------------------------------------------- attention
def diffusers_style_attention(q, k, v, text_len, cos, sin, q_norm, k_norm, eps):
    """diffusers' CogVideoX processor path: transpose to [B, H, S, D], LayerNorm in the input dtype,
    out-of-place RoPE on the video part (float math, cast back), SDPA (default backend choice)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    D = q.shape[-1]
    q = F.layer_norm(q, (D,), *q_norm, eps)
    k = F.layer_norm(k, (D,), *k_norm, eps)
    if cos is not None:
        def rope(x):  # x [B, H, N, D]: rotate through our [B, N, H, D] helper, then back
            return apply_rope_interleaved(x.transpose(1, 2), cos, sin).to(x.dtype).transpose(1, 2)
        q = torch.cat((q[:, :, :text_len], rope(q[:, :, text_len:])), dim=2)
        k = torch.cat((k[:, :, :text_len], rope(k[:, :, text_len:])), dim=2)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


def sdpa_backend(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend_name]

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2)).transpose(1, 2)
    return run


def fa3_attention():
    """FlashAttention-3's forward on [B, S, H, D] (the ``fa3-fwd`` wheel, sm_90), or None where it is not
    importable: the strongest attention a user can assemble, a baseline beside cuDNN."""
    try:
        from fa3_fwd_interface import flash_attn_func
    except Exception:
        return None

    def run(q, k, v):
        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    return run


def attention_cases(preset: str, device: torch.device, dtype: torch.dtype) -> list[Case]:
    cases = []
    for B, H, text_len, grid, D, rope in attention_shapes(preset):
        S = text_len + grid[0] * grid[1] * grid[2]
        name = f"B{B} H{H} S{S} D{D}{'' if rope else ' no-rope'}"

        def make(B=B, H=H, S=S, D=D, text_len=text_len, grid=grid, rope=rope):
            g = torch.Generator(device="cpu").manual_seed(0)
            qkv = torch.randn(B, S, 3, H, D, generator=g).to(device, dtype)
            q, k, v = qkv.unbind(2)
            norms = [(1 + 0.1 * torch.randn(D, generator=g)).to(device, dtype),
                     (0.1 * torch.randn(D, generator=g)).to(device, dtype)]
            q_norm = (norms[0], norms[1])
            k_norm = (norms[0].flip(0).contiguous(), norms[1].flip(0).contiguous())
            cos = sin = None
            if rope:
                sin, cos = ops.rope3d_freqs(*grid, hidden_size=D, num_heads=1, device=device)
            return dict(q=q, k=k, v=v, text_len=text_len, cos=cos, sin=sin, q_norm=q_norm, k_norm=k_norm)

        inputs = make()
        args = inputs

        def reference(a=args):
            return float32_reference(ops.rope3d_attention, **a, backend="reference")

        variants = []
        for kb in kernel_backends("attention", device):
            variants.append(Variant(f"ours ({kb})", "ours", lambda a=args, kb=kb: ops.rope3d_attention(**a, backend=kb),
                                    backend=backend_label(kb, device)))
        variants.append(Variant("diffusers LN+RoPE+SDPA", "baseline",
                                lambda a=args: diffusers_style_attention(a["q"], a["k"], a["v"], a["text_len"], a["cos"],
                                                                         a["sin"], a["q_norm"], a["k_norm"], 1e-6)))
        if device.type == "cuda":
            for bn in ("cudnn", "flash", "efficient"):
                run = sdpa_backend(bn)
                variants.append(Variant(f"SDPA {bn}*", "baseline",
                                        lambda a=args, run=run: run(a["q"], a["k"], a["v"]), compare=False,
                                        note="no QK-norm/RoPE"))
            fa3 = fa3_attention()
            if fa3 is not None:
                variants.append(Variant("FA3 alone*", "baseline", lambda a=args: fa3(a["q"], a["k"], a["v"]),
                                        compare=False, note="FlashAttention-3 forward (fa3-fwd), no QK-norm/RoPE"))
        cases.append(Case("attention", name, reference, variants, flops=attention_flops(B, S, H, D),
                          torch_path="diffusers LN+RoPE+SDPA"))
    return cases


# ------------------------------------------------------------------------------------- expert FFN
FP8_BUDGET = 3e-2  # sanity gate of the fp8 rows (a broken kernel errs O(1)); ~1e-2 expected at these inputs
def eager_ffn_half(x, modulation, norm, w1, b1, w2, b2, text_len):
    """The FFN half of diffusers' CogVideoXBlock, written as a user would in PyTorch."""
    shift_v, scale_v, gate_v, shift_t, scale_t, gate_t = modulation.unbind(1)
    text, video = x[:, :text_len], x[:, text_len:]
    hv = F.layer_norm(video, (x.shape[-1],), *norm, 1e-5) * (1 + scale_v[:, None]) + shift_v[:, None]
    ht = F.layer_norm(text, (x.shape[-1],), *norm, 1e-5) * (1 + scale_t[:, None]) + shift_t[:, None]
    h = torch.cat((ht, hv), dim=1)
    f = F.linear(F.gelu(F.linear(h, w1, b1), approximate="tanh"), w2, b2)
    return torch.cat((text + gate_t[:, None] * f[:, :text_len], video + gate_v[:, None] * f[:, text_len:]), dim=1)


def ffn_cases(preset: str, device: torch.device, dtype: torch.dtype, compile_baseline: bool) -> list[Case]:
    cases = []
    for B, text_len, video, Hd, Fi in ffn_shapes(preset):
        S = text_len + video
        name = f"B{B} S{S} {Hd}->{Fi}"
        g = torch.Generator(device="cpu").manual_seed(1)
        mk = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(device, dtype)  # noqa: E731
        x = mk(B, S, Hd)
        mod = mk(B, 6, Hd, s=0.3)
        w1, b1 = mk(1, Fi, Hd, s=Hd ** -0.5), mk(1, Fi, s=0.1)
        w2, b2 = mk(1, Hd, Fi, s=Fi ** -0.5), mk(1, Hd, s=0.1)
        nw, nb = 1 + mk(Hd, s=0.1), mk(Hd, s=0.1)
        a = dict(x=x, modulation=mod, w1=w1, b1=b1, w2=w2, b2=b2, text_len=text_len, norm_weight=nw, norm_bias=nb)

        def reference(a=a):
            return float32_reference(ops.expert_ffn, **a, backend="reference")

        def eager(a=a):
            return eager_ffn_half(a["x"], a["modulation"], (a["norm_weight"], a["norm_bias"]), a["w1"][0], a["b1"][0],
                                  a["w2"][0], a["b2"][0], a["text_len"])

        variants = []
        kernels = kernel_backends("ffn", device)
        for kb in kernels:
            variants.append(Variant(f"ours ({kb})", "ours", lambda a=a, kb=kb: ops.expert_ffn(
                a["x"], a["modulation"], a["w1"], a["b1"], a["w2"], a["b2"], text_len=a["text_len"],
                norm_weight=a["norm_weight"], norm_bias=a["norm_bias"], backend=kb), backend=backend_label(kb, device)))
        if "triton" in kernels and device.type == "cuda":  # the shared FFN picks its GEMM path by measurement
            from ..ops.expert_ffn.triton_fwd import expert_ffn_fwd

            next(v for v in variants if v.name == "ours (triton)").name = "ours (default path)"
            variants.append(Variant("ours (all-Triton GEMMs)", "ours", lambda a=a: expert_ffn_fwd(
                a["x"], a["modulation"], a["w1"], a["b1"], a["w2"], a["b2"], a["text_len"], a["norm_weight"],
                a["norm_bias"], 1e-5, 0, None, None, shared_path="triton"), backend="triton"))
        if "triton" in kernels and dtype == torch.bfloat16:
            variants.append(Variant("ours (fp8)", "ours", lambda a=a: ops.expert_ffn(
                a["x"], a["modulation"], a["w1"], a["b1"], a["w2"], a["b2"], text_len=a["text_len"],
                norm_weight=a["norm_weight"], norm_bias=a["norm_bias"], precision="fp8", backend="triton"),
                backend=backend_label("triton", device), budget=FP8_BUDGET,
                note="precision='fp8' (e4m3 GEMMs, lossy): error gate 3e-2, not 2x PyTorch's"))
        variants.append(Variant("eager chain", "baseline", eager))
        if compile_baseline:
            compiled = torch.compile(eager_ffn_half)
            variants.append(Variant("compiled chain", "baseline", lambda a=a, c=compiled: c(
                a["x"], a["modulation"], (a["norm_weight"], a["norm_bias"]), a["w1"][0], a["b1"][0], a["w2"][0],
                a["b2"][0], a["text_len"])))
        if device.type == "cuda":
            variants.append(Variant("cuBLAS GEMMs*", "baseline", lambda a=a: F.linear(
                F.gelu(F.linear(a["x"], a["w1"][0], a["b1"][0]), approximate="tanh"), a["w2"][0], a["b2"][0]),
                compare=False, note="two Linear + GELU, no norm/gate"))
        cases.append(Case("ffn", name, reference, variants, flops=expert_ffn_flops(B * S, Hd, Fi),
                          torch_path="eager chain"))
    return cases


# ------------------------------------------------------------------------------------- causal conv
def conv_cases(preset: str, device: torch.device, dtype: torch.dtype) -> list[Case]:
    cases = []
    for B, C, T, H, W, stride in conv_shapes(preset):
        name = f"[{B},{C},{T},{H},{W}] kt3 st{stride}"
        g = torch.Generator(device="cpu").manual_seed(2)
        x = torch.randn(B, C, T, H, W, generator=g).to(device, dtype)
        w = (torch.randn(C, C, 3, 1, 1, generator=g) * (3 * C) ** -0.5).to(device, dtype)
        b = (torch.randn(C, generator=g) * 0.1).to(device, dtype)

        def reference(x=x, w=w, b=b, stride=stride):
            return float32_reference(ops.causal_conv3d, x, w, b, stride=stride, pad_mode="replicate",
                                     backend="reference")[0]

        def cudnn_cat(x=x, w=w, b=b, stride=stride):  # replicate frame 0 as diffusers does: torch.cat + Conv3d
            xp = torch.cat((x[:, :, :1], x[:, :, :1], x), dim=2)
            return F.conv3d(xp, w, b, stride=(stride, 1, 1))

        def cudnn_pad(x=x, w=w, b=b, stride=stride):  # zero padding via F.pad: a different function
            return F.conv3d(F.pad(x, (0, 0, 0, 0, 2, 0)), w, b, stride=(stride, 1, 1))

        variants = []
        for kb in kernel_backends("conv", device):
            variants.append(Variant(f"ours ({kb})", "ours", lambda x=x, w=w, b=b, stride=stride, kb=kb: ops.causal_conv3d(
                x, w, b, stride=stride, pad_mode="replicate", backend=kb)[0], backend=kb))
        variants.append(Variant("cat+Conv3d", "baseline", cudnn_cat))
        if device.type == "cuda":
            variants.append(Variant("pad0+Conv3d*", "baseline", cudnn_pad, compare=False, note="zero padding"))
        y_numel = B * C * ((T - 1) // stride + 1) * H * W
        nbytes = (x.numel() + w.numel() + y_numel) * x.element_size()  # the floor: each byte once
        flops = 2.0 * y_numel * C * 3
        cases.append(Case("conv", name, reference, variants, flops=flops, bytes=nbytes,
                          torch_path="cat+Conv3d"))
    return cases


# ------------------------------------------------------------------------------------- runner
def run_cases(cases: list[Case], device: torch.device, ceilings: dict, quick: bool, progress: Progress) -> list[Result]:
    results = []
    for case in cases:
        ref = case.reference().float()
        errors = {}
        rows = []
        for var in case.variants:
            r = Result(case.op, case.shape, var.name, var.kind, note=var.note, backend=var.backend)
            try:
                out = var.fn()
                if var.compare:
                    r.rel_err = rel_err(out, ref)
                    errors[var.name] = r.rel_err
                del out
            except Exception as exc:  # report, never hide
                r.status, r.note = "error", f"{type(exc).__name__}: {str(exc)[:70]}"
            rows.append((var, r))
        torch_err = errors.get(case.torch_path)
        for var, r in rows:
            if r.status != "ok":
                continue
            if var.kind == "ours":
                budget = case.abs_budget
                if torch_err is not None and torch_err > 0:
                    budget = min(budget, max(2 * torch_err, 1e-5))
                if var.budget is not None:
                    budget = var.budget
                r.budget = budget
                if r.rel_err is None or not (r.rel_err <= budget):
                    r.status, r.note = "wrong", f"rel err {r.rel_err:.2e} > budget {budget:.2e}; not timed"
                    continue
            try:
                if device.type == "cuda":
                    r.ms = time_ms(var.fn, device, quick=quick)
                else:  # warm from the parity call; CPU figures are not the product's: few repetitions
                    r.ms = time_ms(var.fn, device, reps=3, warmup=0)
                r.peak_mem_gib = peak_memory_gib(var.fn, device)
            except Exception as exc:
                r.status, r.note = "error", f"{type(exc).__name__}: {str(exc)[:70]}"
                continue
            if device.type != "cuda":  # a CPU time is not a throughput of the product: report ms only
                continue
            if case.flops:
                r.tflops = case.flops / r.ms / 1e9
            if case.bytes:
                r.gbps = case.bytes / r.ms / 1e6
            bounds = []
            if case.flops:
                bounds.append(case.flops / (ceilings["matmul_tflops"] * 1e12) * 1e3)
            if case.bytes:
                bounds.append(case.bytes / (ceilings["copy_gbps"] * 1e9) * 1e3)
            if bounds:
                r.pct_ceiling = 100.0 * max(bounds) / r.ms
        ours = [r for _, r in rows if r.kind == "ours" and r.ms and device.type == "cuda"]
        for o in ours:
            for _, r in rows:
                if r.kind == "baseline" and r.ms:
                    o.speedups[r.variant] = r.ms / o.ms
        results.extend(r for _, r in rows)
        del ref
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        progress.step(f"{case.op} {case.shape}")
    return results
