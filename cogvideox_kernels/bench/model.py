"""The model-level cases of ``cogvideox-kernels bench``: a diffusers CogVideoX denoising step and the
diffusers VAE, unpatched vs patched with our kernels (``cogvideox_kernels.bench.step`` does the work)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .common import Result

STEP_PRESETS = {"2b": "2b", "5b": "5b"}


def run_model_bench(op: str, preset: str, device, *, quick: bool = False, compile_variants: bool = True) -> list[Result]:
    if device.type != "cuda":
        return [Result(op, preset, "-", "ours", status="skipped", note="needs a CUDA GPU")]
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return [Result(op, preset, "-", "ours", status="skipped", note="needs diffusers (pip install '.[diffusers]')")]
    from . import step

    out_dir = Path(tempfile.mkdtemp(prefix=f"cvk-{op}-"))
    rec = step.Recorder(out_dir, deadline=None)
    if op == "step":
        model_preset = STEP_PRESETS.get(preset)
        if model_preset is None:
            return [Result(op, preset, "-", "ours", status="skipped", note="step presets: 2b, 5b")]
        variants = step.STEP_VARIANTS if compile_variants else ("eager", "ours", step.UNFUSED_HALF)
        step.transformer_section(rec, model_preset, variants=variants, profile=not quick)
    elif op == "vae":
        step.vae_section(rec)
    rows = [r for r in rec.rows if r["variant"] != "float32 reference"]
    results = []
    for r in rows:
        is_ours = r["variant"].startswith(("ours", "decode patched", "encode patched"))
        res = Result(op if not r["section"].startswith("profile") else f"{op} profile", f"{r['section']} {r['preset']}",
                     r["variant"], "ours" if is_ours else "baseline", ms=r["ms"],
                     rel_err=float(r["rel_err_vs_fp32"]) if r["rel_err_vs_fp32"] else None,
                     peak_mem_gib=r["peak_mem_gib"], status=r["status"], note=r["note"] or "")
        results.append(res)
    # The step's accuracy bar: ours no worse than 1.25x eager bf16's error against float32.
    eager = next((r for r in results if r.variant == "eager" and r.rel_err is not None), None)
    for r in results:
        if r.kind == "ours" and eager and r.rel_err is not None and op == "step":
            r.budget = 1.25 * eager.rel_err
            if r.rel_err > r.budget:
                r.status, r.note = "wrong", f"rel err {r.rel_err:.2e} > 1.25x eager's {eager.rel_err:.2e}"
    for group in {r.shape for r in results}:
        members = [r for r in results if r.shape == group and r.ms and r.status == "ok"]
        for o in (m for m in members if m.kind == "ours"):
            for b in (m for m in members if m.kind == "baseline"):
                if op != "vae" or b.variant.split()[0] == o.variant.split()[0]:
                    o.speedups[b.variant] = b.ms / o.ms
    return results
