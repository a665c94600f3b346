"""One denoising step of diffusers' CogVideoX transformer (random weights, bf16), side by side:
eager, torch.compile of the blocks, ours (cogvideox_kernels.integrations.diffusers.apply), ours +
compile; each output against a float32 run of the same model. Then, while time is left, a
torch.profiler split (attention / GEMM / norm / elementwise) of eager vs ours, the VAE decode and
encode (diffusers un-tiled, tiled, patched; vs float32), and the 2B step.

    python benchmarks/bench_step.py --out DIR [--preset 5b|2b] [--deadline EPOCH_SECONDS]

Every row is written to DIR as soon as it is measured (step_rows.csv / step_rows.json), so a run
cut short keeps what it had. ``run_step_bench(preset, out_dir) -> list[dict]`` serves the CLI.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from .common import environment, profiled_kernel_ms, time_ms
from .presets import MODELS

PRESETS = ("5b", "2b")  # CogVideoX-5B (RoPE3D) and -2B (sin-cos positions): same tokens, bench/presets.py
BATCH, TEXT_LEN = MODELS["5b"].batch, MODELS["5b"].text_len
FRAMES, HEIGHT, WIDTH = MODELS["5b"].latents  # 13 x 60 x 90 latents (49 x 480 x 720 video)
DEVICE = "cuda"  # a module global so a CPU smoke run of the script's logic can swap it
FIELDS = ["section", "preset", "variant", "ms", "rel_err_vs_fp32", "peak_mem_gib", "first_call_s", "status", "note"]


class Recorder:
    def __init__(self, out_dir: Path, deadline: float | None):
        self.out_dir = out_dir
        self.deadline = deadline
        self.rows: list[dict] = []
        out_dir.mkdir(parents=True, exist_ok=True)
        previous = out_dir / "step_rows.json"
        if previous.exists():  # a later process of the same run appends to the earlier one's rows
            self.rows = json.loads(previous.read_text())["rows"]
        self.meta = environment(DEVICE)
        (out_dir / "step_env.json").write_text(json.dumps(self.meta, indent=1))

    def left_s(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def add(self, **row):
        row = {k: row.get(k) for k in FIELDS}
        if row["note"]:
            row["note"] = " ".join(str(row["note"]).split())  # one line per row in CSV/markdown
        self.rows.append(row)
        print("ROW", json.dumps(row), flush=True)
        with open(self.out_dir / "step_rows.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)
        (self.out_dir / "step_rows.json").write_text(json.dumps({"env": self.meta, "rows": self.rows}, indent=1))


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def time_calls(fn, warmup: int, reps: int):
    """(first call s, median ms of ``reps`` timed calls after ``warmup`` calls in all, first output)."""
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    return first_s, time_ms(fn, DEVICE, reps=reps, warmup=warmup - 1), out


# ------------------------------------------------------------------------------------------------
# transformer step


def build_transformer(preset: str, dtype: torch.dtype):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    with torch.device(DEVICE):  # parameters are made and initialised on the GPU (fast)
        model = CogVideoXTransformer3DModel(**MODELS[preset].diffusers_config())
    return model.to(dtype).eval().requires_grad_(False)


def step_inputs(model, dtype):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    g = torch.Generator(device=DEVICE).manual_seed(1)
    latents = torch.randn(BATCH, FRAMES, 16, HEIGHT, WIDTH, generator=g, device=DEVICE).to(dtype)
    text = torch.randn(BATCH, TEXT_LEN, 4096, generator=g, device=DEVICE).to(dtype)
    inputs = dict(hidden_states=latents, encoder_hidden_states=text,
                  timestep=torch.tensor([500, 500], device=DEVICE), return_dict=False)
    if model.config.use_rotary_positional_embeddings:
        grid = (HEIGHT // 2, WIDTH // 2)
        inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(
            embed_dim=model.config.attention_head_dim, crops_coords=((0, 0), grid), grid_size=grid,
            temporal_size=FRAMES, device=DEVICE)
    return inputs


def cast_inputs(inputs, dtype):
    out = dict(inputs)
    out["hidden_states"] = inputs["hidden_states"].to(dtype)
    out["encoder_hidden_states"] = inputs["encoder_hidden_states"].to(dtype)
    return out


def compile_blocks(model):
    for block in model.transformer_blocks:
        block.compile()


def uncompile_blocks(model):
    for block in model.transformer_blocks:
        block._compiled_call_impl = None
    torch._dynamo.reset()


def count_kernel_calls(model, inputs):
    """How many rope3d_attention / expert_ffn calls one patched step makes, and their backends."""
    from cogvideox_kernels.integrations import diffusers as integration

    seen = {"rope3d_attention": 0, "expert_ffn": 0, "adaln_linear": 0, "gated_linear": 0}
    originals = {name: getattr(integration, name) for name in seen}

    def spy(name):
        def call(*args, **kwargs):
            seen[name] += 1
            return originals[name](*args, **kwargs)
        return call

    try:
        for name in seen:
            setattr(integration, name, spy(name))
        with torch.no_grad():
            model(**inputs)
    finally:
        for name, fn in originals.items():
            setattr(integration, name, fn)
    return seen


def fa3_sdpa():
    """``F.scaled_dot_product_attention`` on FlashAttention-3's forward (the ``fa3-fwd`` wheel), for
    the "diffusers + FA3 + compiled blocks" baseline; None where FA3 is not importable."""
    try:
        from fa3_fwd_interface import flash_attn_func
    except Exception:  # pragma: no cover - needs the fa3-fwd wheel on an sm_90 GPU
        return None

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or dropout_p or is_causal or kwargs:
            raise ValueError("the FA3 baseline covers unmasked, non-causal attention without dropout only")
        out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scale)
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

    return sdpa


# apply() with state.FUSED_ATTENTION_HALF on (the default) / off; "ours" runs the state as it is
FUSED_HALF = "ours (fused attention half)"
UNFUSED_HALF = "ours (unfused attention half)"
HALF_SETTING = {FUSED_HALF: True, UNFUSED_HALF: False}
# apply() with the shared FFN's GEMMs on another path (expert_ffn's COGVIDEOX_KERNELS_FFN_SHARED for the
# variant: "triton" fuses bias + gate + residual into GEMM2's epilogue, no separate pass); not in the defaults
FFN_PATH_VARIANTS = {"ours (ffn triton)": "triton", "ours (ffn cublaslt)": "cublaslt"}
STEP_VARIANTS = ("eager", "compiled", "ours", UNFUSED_HALF, "ours+compile", "fa3+compile")
KNOWN_EXTRA = (FUSED_HALF, *FFN_PATH_VARIANTS)  # accepted by --variants, not run by default


def transformer_section(rec: Recorder, preset: str, variants=STEP_VARIANTS, profile: bool = True):
    from cogvideox_kernels.integrations import diffusers as integration
    from cogvideox_kernels.integrations.diffusers import state as integration_state
    from cogvideox_kernels.ops import registry

    fused_default = integration_state.FUSED_ATTENTION_HALF
    section = f"step_{preset}"
    # float32 reference (true fp32 GEMMs), once, then the same weights in bf16
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    free_memory()
    t0 = time.perf_counter()
    model = build_transformer(preset, torch.float32)
    inputs32 = step_inputs(model, torch.float32)
    with torch.no_grad():
        ref = model(**inputs32)[0].float()
    torch.cuda.synchronize()
    rec.add(section=section, preset=preset, variant="float32 reference", first_call_s=round(time.perf_counter() - t0, 2),
            peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), status="ok",
            note="fp32 weights and activations, TF32 off; model build included in first_call_s")
    model = model.to(torch.bfloat16)
    inputs = cast_inputs(inputs32, torch.bfloat16)
    del inputs32
    free_memory()

    def step():
        with torch.no_grad():
            return model(**inputs)[0]

    from cogvideox_kernels.ops.expert_ffn.triton_fwd import SHARED_PATH_ENV as ffn_env

    ffn_saved = os.environ.get(ffn_env)
    results = {}
    eager_out = None
    for variant in variants:
        need = {"eager": 15, "compiled": 90, "ours": 20, FUSED_HALF: 20, UNFUSED_HALF: 20, "ours+compile": 80,
                "fa3+compile": 90, **{v: 20 for v in FFN_PATH_VARIANTS}}[variant]
        if rec.left_s() < need:
            rec.add(section=section, preset=preset, variant=variant, status="skipped", note="out of time")
            continue
        note = ""
        sdpa = torch.nn.functional.scaled_dot_product_attention
        try:
            free_memory()
            if variant.startswith("fa3"):  # diffusers' own processor with FA3 as its attention core
                fa3 = fa3_sdpa()
                if fa3 is None:
                    rec.add(section=section, preset=preset, variant=variant, status="skipped",
                            note="fa3_fwd_interface is not importable")
                    continue
                torch.nn.functional.scaled_dot_product_attention = fa3
                note = "diffusers' processor, F.scaled_dot_product_attention -> FA3 forward"
            if variant.startswith("ours"):
                integration.apply(model, vae=False)
                integration_state.FUSED_ATTENTION_HALF = HALF_SETTING.get(variant, fused_default)
            if variant in FFN_PATH_VARIANTS:
                os.environ[ffn_env] = FFN_PATH_VARIANTS[variant]
                note = f"{ffn_env}={FFN_PATH_VARIANTS[variant]}"
            if variant in ("ours", FUSED_HALF, UNFUSED_HALF):  # proves the step goes through our ops (and warms them up)
                calls = count_kernel_calls(model, inputs)
                backend_attn = registry.auto_choice("rope3d_attention", DEVICE)
                note = f"op calls per step {calls}, auto backend: {backend_attn}"
            if variant.endswith("compile") or variant == "compiled":
                compile_blocks(model)
            first_s, ms, out = time_calls(step, warmup=2 if "compile" in variant else 1, reps=3)
            err = rel_err(out.float(), ref)
            results[variant] = ms
            if variant == "eager":
                eager_out = out.clone()
            elif eager_out is not None:  # how far apart two bf16 paths are, next to their error vs fp32
                note = f"{note}; rel diff vs eager bf16 {rel_err(out.float(), eager_out.float()):.3e}".lstrip("; ")
            rec.add(section=section, preset=preset, variant=variant, ms=round(ms, 1), rel_err_vs_fp32=f"{err:.3e}",
                    peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), first_call_s=round(first_s, 1),
                    status="ok", note=note)
            del out
        except Exception as exc:  # keep going: the other variants still count
            traceback.print_exc()
            rec.add(section=section, preset=preset, variant=variant, status="error",
                    note=f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
            integration_state.FUSED_ATTENTION_HALF = fused_default
            if ffn_saved is None:
                os.environ.pop(ffn_env, None)
            else:
                os.environ[ffn_env] = ffn_saved
            if "compile" in variant:
                uncompile_blocks(model)
            integration.remove(model)
    if profile and rec.left_s() > 30:
        for variant in ("eager", FUSED_HALF, UNFUSED_HALF):
            try:
                if variant.startswith("ours"):
                    integration.apply(model, vae=False)
                    integration_state.FUSED_ATTENTION_HALF = HALF_SETTING[variant]
                split = profile_split(step)
                rec.add(section=f"profile_{preset}", preset=preset, variant=variant, ms=round(split.pop("total"), 1),
                        status="ok", note=json.dumps(split))
            except Exception as exc:
                traceback.print_exc()
                rec.add(section=f"profile_{preset}", preset=preset, variant=variant, status="error",
                        note=f"{type(exc).__name__}: {str(exc)[:300]}")
            finally:
                integration_state.FUSED_ATTENTION_HALF = fused_default
                integration.remove(model)
    del model, ref, inputs, eager_out
    free_memory()
    return results


KERNEL_CLASSES = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "wgmma", "sm90_", "cublas", "grouped_gemm")),
    ("norm", ("layer_norm", "layernorm", "group_norm", "norm")),
)


def classify(name: str) -> str:
    low = name.lower()
    for label, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return label
    return "elementwise/other"


def profile_split(step) -> dict:
    """GPU-kernel ms of one step by class, plus the 6 largest kernels (names cut)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_class: dict[str, float] = {}
    kernels = []
    for ms, name in profiled_kernel_ms(prof):
        by_class[classify(name)] = by_class.get(classify(name), 0.0) + ms
        kernels.append((ms, name[:60]))
    kernels.sort(reverse=True)
    split = {k: round(v, 1) for k, v in sorted(by_class.items())}
    split["top"] = [[round(ms, 1), name] for ms, name in kernels[:6]]
    split["total"] = sum(by_class.values())
    return split


# ------------------------------------------------------------------------------------------------
# VAE


VAE_SHAPES = {"5b": (49, 480, 720), "1.5-5b": (81, 768, 1360)}  # video frames x height x width
VAE_VARIANTS = ("diffusers", "diffusers tiled", "patched")  # (+ "patched host-cache" on CUDA: vae_cache="host")
TINY_VAE = dict(block_out_channels=(16, 16, 32, 32), latent_channels=4, layers_per_block=1, norm_num_groups=4)


class _OpCounter:
    """Counts the integration's VAE op calls (vae_conv3d, causal_conv3d) while entered."""

    NAMES = ("vae_conv3d", "causal_conv3d")

    def __enter__(self):
        from cogvideox_kernels.integrations import diffusers as integration

        self.module, self.calls = integration, dict.fromkeys(self.NAMES, 0)
        self.originals = {name: getattr(integration, name) for name in self.NAMES}
        for name, fn in self.originals.items():
            def spy(*args, _name=name, _fn=fn, **kwargs):
                self.calls[_name] += 1
                return _fn(*args, **kwargs)
            setattr(integration, name, spy)
        return self.calls

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(self.module, name, fn)


def _vae_free(device):
    if device.type == "cuda":
        free_memory()
    else:
        gc.collect()


def _vae_timed(fn, device, warmup_context=None):
    """(warm-up s, timed ms, peak GiB above what was allocated before the timed call, its output)."""
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    with torch.no_grad(), warmup_context or contextlib.nullcontext():
        out = fn()
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    del out
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    return first_s, ms, peak, out


def vae_section(rec: Recorder, frames: int = 49, height: int = 480, width: int = 720, *, config=None,
                work=("decode", "encode"), variants=None, fp32_reference: bool = True,
                dtype=torch.bfloat16, backend: str = "auto", tile: tuple | None = None):
    """Decode (and encode) of a ``frames x height x width`` clip with diffusers' ``AutoencoderKLCogVideoX``
    (``config``: the CogVideoX-2B/5B/1.5 VAE config, diffusers' defaults; random weights) in ``dtype``:
    diffusers un-tiled, diffusers ``enable_tiling()``, and ``apply(vae, backend=...)`` un-tiled. Each row:
    the second call's wall time (after one warm-up call), its peak memory above what was allocated before
    it (weights and inputs), and its error against a float32 run of the same weights (TF32 off) when
    ``fp32_reference``. On a CPU (``DEVICE = "cpu"``, a tiny ``config``, backend "cpp") it checks the logic.
    ``tile``: (sample height, width) of diffusers' tiles, default diffusers' own (half the config's size).
    ``variants``: default VAE_VARIANTS, and on CUDA also "patched host-cache" (``apply(vae, vae_cache="host")``,
    decode only: the option is the decoder's).
    """
    from diffusers import AutoencoderKLCogVideoX

    from cogvideox_kernels.integrations import diffusers as integration

    device = torch.device(DEVICE)
    shape = f"{frames}x{height}x{width}"
    if variants is None:
        variants = VAE_VARIANTS + (("patched host-cache",) if device.type == "cuda" else ())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _vae_free(device)
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLCogVideoX(**(config or {})).eval().requires_grad_(False)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    g = torch.Generator(device=device).manual_seed(2)
    inputs = {"decode": torch.randn(1, vae.config.latent_channels, (frames - 1) // 4 + 1, height // scale,
                                    width // scale, generator=g, device=device),
              "encode": torch.rand(1, vae.config.in_channels, frames, height, width, generator=g,
                                   device=device) * 2 - 1}
    calls = {"decode": lambda x: vae.decode(x).sample, "encode": lambda x: vae.encode(x).latent_dist.mode()}
    refs, errors = {}, {}
    if fp32_reference:
        for what in work:
            if rec.left_s() < 40:
                break
            t0 = time.perf_counter()
            with torch.no_grad():
                refs[what] = calls[what](inputs[what]).float()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rec.add(section="vae", preset=shape, variant="float32 reference", status="ok",
                    first_call_s=round(time.perf_counter() - t0, 2),
                    note=f"{what}: float32 weights and activations, TF32 off, un-tiled, one call")
    vae.to(dtype)
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    for what in work:
        for variant in variants:
            if what == "encode" and variant.endswith("host-cache"):
                continue  # (the decoder's conv caches: encode is the "patched" row)
            label = f"{what} {variant}"
            if rec.left_s() < 25:
                rec.add(section="vae", preset=shape, variant=label, status="skipped", note="out of time")
                continue
            note, counter = [], None
            try:
                if variant == "diffusers tiled":
                    tiles = {} if tile is None else dict(tile_sample_min_height=tile[0], tile_sample_min_width=tile[1])
                    vae.enable_tiling(**tiles)
                    note.append(f"tiles {vae.tile_sample_min_height}x{vae.tile_sample_min_width} (sample)")
                if variant in ("patched", "patched host-cache"):
                    integration.apply(vae, backend=backend,
                                      vae_cache="host" if variant.endswith("host-cache") else "device")
                    report = integration.patch_report(vae)
                    note.append(f"patched: {report['vae_resnet']} ResNet blocks, {report['vae']} causal convs")
                    counter = _OpCounter()
                _vae_free(device)
                first_s, ms, peak, out = _vae_timed(lambda: calls[what](inputs[what]), device, counter)
                if counter:
                    note.append(f"op calls per {what} {counter.calls}".replace("'", ""))
                err = ""
                if what in refs:
                    errors[label] = rel_err(out.float(), refs[what])
                    err = f"{errors[label]:.3e}"
                    own = errors.get(f"{what} diffusers")
                    if variant != "diffusers" and own:
                        note.append(f"error {errors[label] / own:.2f}x diffusers' bf16")
                rec.add(section="vae", preset=shape, variant=label, ms=round(ms, 1), rel_err_vs_fp32=err,
                        peak_mem_gib=None if peak is None else round(peak, 2), first_call_s=round(first_s, 2),
                        status="ok", note="; ".join(note))
                del out
            except Exception as exc:
                traceback.print_exc()
                rec.add(section="vae", preset=shape, variant=label, status="error",
                        note=f"{type(exc).__name__}: {str(exc)[:300]}")
            finally:
                vae.disable_tiling()
                integration.remove(vae)
    del vae, inputs, refs
    _vae_free(device)


# ------------------------------------------------------------------------------------------------


def write_markdown(rec: Recorder, preset: str):
    env = rec.meta
    lines = [f"# CogVideoX step benchmark ({preset})", "",
             f"GPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}, diffusers {env['diffusers']}, "
             f"commit {env['commit']}, {env['date']}. Random weights, bf16, B={BATCH}, text {TEXT_LEN}, latents "
             f"{FRAMES}x{HEIGHT}x{WIDTH}. ms = median of CUDA-event timings after warm-up; rel_err = ||out - "
             "ref|| / ||ref|| against a float32 run of the same model (TF32 off).", "",
             "| section | variant | ms | rel err vs fp32 | peak GiB | first call s | status | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rec.rows:
        lines.append("| " + " | ".join("" if r[k] is None else str(r[k]).replace("|", "/") for k in
                                       ("section", "variant", "ms", "rel_err_vs_fp32", "peak_mem_gib", "first_call_s",
                                        "status", "note")) + " |")
    (rec.out_dir / "step_results.md").write_text("\n".join(lines) + "\n")


SECTIONS = ("step", "vae", "other")


def run_step_bench(preset: str = "5b", out_dir="bench-out", deadline: float | None = None,
                   sections=SECTIONS, variants=STEP_VARIANTS) -> list[dict]:
    """Run the step benchmark; rows also land in ``out_dir`` as they are measured.

    sections: "step" (``preset``: eager, compiled, ours, ours with the fused attention half
    (``state.FUSED_ATTENTION_HALF``), ours+compile, diffusers + FA3 + compile where
    the fa3-fwd wheel is importable, then a profile split), "vae"
    (decode/encode 49x480x720: diffusers un-tiled, tiled, patched, each vs float32), "other" (the other
    preset: eager, ours, compiled).
    Each later section runs only while ``deadline`` leaves it time. variants: the step section's, in order.
    """
    if set(variants) - set(STEP_VARIANTS + KNOWN_EXTRA):
        raise ValueError(f"variants {sorted(set(variants) - set(STEP_VARIANTS + KNOWN_EXTRA))} are not supported; "
                         f"choose from {STEP_VARIANTS + KNOWN_EXTRA}")
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not supported; choose one of {tuple(PRESETS)}")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"sections {sorted(unknown)} are not supported; choose from {SECTIONS}")
    if not torch.cuda.is_available():
        raise RuntimeError("the step benchmark needs a CUDA GPU")
    rec = Recorder(Path(out_dir), deadline)
    try:
        if "step" in sections:
            transformer_section(rec, preset, variants=variants)
            write_markdown(rec, preset)
        if "vae" in sections and rec.left_s() > 60:
            vae_section(rec)
            write_markdown(rec, preset)
        if "other" in sections and rec.left_s() > 70:
            other = "2b" if preset == "5b" else "5b"
            transformer_section(rec, other, variants=("eager", "ours", FUSED_HALF, "compiled"), profile=False)
    finally:
        write_markdown(rec, preset)
    return rec.rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for step_rows.csv/json and step_results.md")
    parser.add_argument("--preset", default="5b", choices=PRESETS)
    parser.add_argument("--deadline", type=float, default=None,
                        help="wall-clock epoch seconds by which to stop starting new measurements")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {SECTIONS} (default: all, in that order)")
    parser.add_argument("--variants", default=",".join(STEP_VARIANTS),
                        help=f"comma-separated subset of the step section's {STEP_VARIANTS + KNOWN_EXTRA}, "
                             "in the order to run")
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    variants = tuple(s.strip() for s in args.variants.split(",") if s.strip())
    unknown = [v for v in variants if v not in STEP_VARIANTS + KNOWN_EXTRA]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {STEP_VARIANTS + KNOWN_EXTRA}")
    rows = run_step_bench(args.preset, args.out, deadline=args.deadline, sections=sections, variants=variants)
    print(f"{len(rows)} rows written to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
