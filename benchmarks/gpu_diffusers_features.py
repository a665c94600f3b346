"""The 5B step with diffusers features on, patched vs unpatched: a LoRA on the attention and FFN linears and
model CPU offload (accelerate's ``cpu_offload_with_hook``, what ``enable_model_cpu_offload()`` puts on each
pipeline model), on diffusers' CogVideoXTransformer3DModel with the 5B config (random weights, bf16, B 2,
13 x 60 x 90 latents, 226 text tokens, 42 layers).

Measures: our op calls per patched step (42 attention + 42 FFN expected), the output of the patched step
against the unpatched one and both against a float32 run (TF32 off) of the same weights and LoRA, and the
step time unpatched / patched, each with the LoRA active and disabled (the effective-weight path must
leave the patched step time as it is). Prints a short table and writes ``gpu_diffusers_features.json``
to ``--out`` (default ``$OUT``). Exit status 1 if a correctness check fails.

    python benchmarks/gpu_diffusers_features.py --out $OUT          # H200: about 2-3 minutes
    python benchmarks/gpu_diffusers_features.py --tiny --out DIR    # CPU smoke run (tiny config), in CI
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

FULL = dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, in_channels=16, out_channels=16,
            time_embed_dim=512, text_embed_dim=4096, sample_width=90, sample_height=60, sample_frames=49,
            patch_size=2, max_text_seq_length=226, use_rotary_positional_embeddings=True)
TINY = dict(FULL, num_attention_heads=2, num_layers=2, in_channels=4, out_channels=4, time_embed_dim=32,
            text_embed_dim=32, sample_width=6, sample_height=4, sample_frames=9, max_text_seq_length=7)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def environment(device) -> dict:
    import diffusers
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except OSError:
        commit = None
    return dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, triton=triton.__version__, diffusers=diffusers.__version__,
                python=platform.python_version(), commit=os.environ.get("COGVIDEOX_KERNELS_COMMIT", commit),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def build(config, device, rank):
    """The transformer in float32 on ``device`` with a LoRA (non-zero, ~10% of the base weights' scale)."""
    from diffusers import CogVideoXTransformer3DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = CogVideoXTransformer3DModel(**config).eval().requires_grad_(False)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1 * (rank ** 0.5))  # default init is U(+-1/sqrt(r)): a delta of ~10% of W
    return model.requires_grad_(False)


def step_inputs(config, device, batch=2, frames=None):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    frames = frames or (config["sample_frames"] - 1) // 4 + 1
    h, w, p = config["sample_height"], config["sample_width"], config["patch_size"]
    g = torch.Generator(device=device).manual_seed(1)
    grid = (h // p, w // p)
    return dict(hidden_states=torch.randn(batch, frames, config["in_channels"], h, w, generator=g, device=device),
                encoder_hidden_states=torch.randn(batch, config["max_text_seq_length"], config["text_embed_dim"],
                                                  generator=g, device=device),
                timestep=torch.tensor([500] * batch, device=device), return_dict=False,
                image_rotary_emb=get_3d_rotary_pos_embed(embed_dim=config["attention_head_dim"],
                                                         crops_coords=((0, 0), grid), grid_size=grid,
                                                         temporal_size=frames, device=device))


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float("nan") if not torch.isfinite(out).all() else ((out - ref).norm() / ref.norm()).item()


class OpCounter:
    """Counts the integration's op calls (looked up on the package at each call)."""

    NAMES = ("rope3d_attention", "expert_ffn")

    def __init__(self):
        from cogvideox_kernels.integrations import diffusers as integration

        self.integration, self.calls, self.real = integration, dict.fromkeys(self.NAMES, 0), {}
        for name in self.NAMES:
            self.real[name] = getattr(integration, name)
            setattr(integration, name, self._counted(name))

    def _counted(self, name):
        def call(*args, **kwargs):
            self.calls[name] += 1
            return self.real[name](*args, **kwargs)
        return call

    def close(self):
        for name, fn in self.real.items():
            setattr(self.integration, name, fn)


def timed(fn, device, reps):
    """(first call s, median ms of ``reps`` calls after it, last output)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(times), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (a smoke run of the logic)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per variant after the first")
    parser.add_argument("--no-fp32", action="store_true", help="skip the float32 reference run")
    args = parser.parse_args(argv)

    from accelerate import cpu_offload_with_hook

    from cogvideox_kernels.integrations import diffusers as integration

    device = torch.device("cpu" if args.tiny else "cuda")
    config, rank = (TINY, 4) if args.tiny else (FULL, 64)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    result = dict(env=environment(device), config=dict(config, batch=2, lora_rank=rank, lora_targets=LORA_TARGETS,
                                                        offload="accelerate cpu_offload_with_hook (model-level)"),
                  rows=[], errors={}, calls={}, checks={})
    t_start = time.perf_counter()

    model = build(config, device, rank)
    inputs32 = step_inputs(config, device)
    if not args.no_fp32:
        t0 = time.perf_counter()
        with torch.no_grad():
            ref32 = model(**inputs32)[0].float().cpu()
        result["rows"].append(dict(variant="float32 reference (unpatched, LoRA on)",
                                   first_call_s=round(time.perf_counter() - t0, 2)))
    inputs = dict(inputs32, hidden_states=inputs32["hidden_states"].bfloat16(),
                  encoder_hidden_states=inputs32["encoder_hidden_states"].bfloat16())
    del inputs32
    # bf16 weights kept on the CPU; accelerate's model-offload hook moves the model to the device at each call
    model = model.to(torch.bfloat16).to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model, _ = cpu_offload_with_hook(model, execution_device=device)

    def step():
        with torch.no_grad():
            return model(**inputs)[0]

    outs = {}
    for variant, patched, lora in (("unpatched, LoRA", False, True), ("patched, LoRA", True, True),
                                   ("patched, LoRA disabled", True, False), ("unpatched, LoRA disabled", False, False)):
        if patched and not integration.is_patched(model):
            integration.apply(model, vae=False)
        if not patched and integration.is_patched(model):
            integration.remove(model)
        model.enable_lora() if lora else model.disable_lora()
        counter = OpCounter()
        try:
            first, ms, out = timed(step, device, args.reps)
        finally:
            counter.close()
        calls = {k: v // (args.reps + 1) for k, v in counter.calls.items()}
        outs[variant] = out.float().cpu()
        result["calls"][variant] = calls
        row = dict(variant=variant, ms=round(ms, 2), first_call_s=round(first, 2), op_calls_per_step=calls)
        if device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        result["rows"].append(row)
        print("ROW", json.dumps(row), flush=True)

    layers = config["num_layers"]
    errors = result["errors"]
    errors["patched_vs_unpatched"] = rel_err(outs["patched, LoRA"], outs["unpatched, LoRA"])
    errors["lora_effect"] = rel_err(outs["unpatched, LoRA disabled"], outs["unpatched, LoRA"])
    if not args.no_fp32:
        errors["unpatched_vs_fp32"] = rel_err(outs["unpatched, LoRA"], ref32)
        errors["patched_vs_fp32"] = rel_err(outs["patched, LoRA"], ref32)
    ms = {r["variant"]: r.get("ms") for r in result["rows"]}
    checks = result["checks"]
    checks["our_ops_every_layer"] = all(result["calls"][v] == {"rope3d_attention": layers, "expert_ffn": layers}
                                        for v in ("patched, LoRA", "patched, LoRA disabled"))
    checks["unpatched_runs_no_op"] = all(sum(result["calls"][v].values()) == 0
                                         for v in ("unpatched, LoRA", "unpatched, LoRA disabled"))
    checks["lora_changes_output"] = errors["lora_effect"] > 1e-3
    budget = max(1e-2, 2 * errors.get("unpatched_vs_fp32", 0.0))  # bf16: within 2x diffusers' own error
    checks["patched_within_bf16_budget"] = (errors.get("patched_vs_fp32", errors["patched_vs_unpatched"]) <= budget)
    result["timing"] = dict(lora_path_cost=ms["patched, LoRA"] / ms["patched, LoRA disabled"],
                            peft_cost_unpatched=ms["unpatched, LoRA"] / ms["unpatched, LoRA disabled"],
                            speedup_with_lora=ms["unpatched, LoRA"] / ms["patched, LoRA"])
    checks["patched_step_time_unchanged_by_lora"] = result["timing"]["lora_path_cost"] <= 1.03
    result["total_s"] = round(time.perf_counter() - t_start, 1)

    print(f"\n{result['env']['device']}  torch {result['env']['torch']}  triton {result['env']['triton']}  "
          f"diffusers {result['env']['diffusers']}  commit {result['env']['commit']}")
    print(f"{'variant':28s}{'step ms':>10s}{'first s':>9s}  op calls/step")
    for r in result["rows"]:
        if "ms" in r:
            print(f"{r['variant']:28s}{r['ms']:10.1f}{r['first_call_s']:9.1f}  {r['op_calls_per_step']}")
    print("rel err: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    print("timing: " + ", ".join(f"{k} {v:.3f}" for k, v in result["timing"].items()))
    print("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()))
    (args.out / "gpu_diffusers_features.json").write_text(json.dumps(result, indent=1))
    correctness = [k for k in checks if k != "patched_step_time_unchanged_by_lora"]
    return 0 if all(checks[k] for k in correctness) else 1


if __name__ == "__main__":
    sys.exit(main())
