"""The integration's benchmark scripts on the CPU: gpu_diffusers_features.py --tiny (the logic the H200 run
uses: LoRA + model offload, patched vs unpatched, op counts, errors, JSON) and the conformance runner's
choice of the tests' tag."""
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_features_script_tiny(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    script = load("gpu_diffusers_features")
    assert script.main(["--tiny", "--reps", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_diffusers_features.json").read_text())
    layers = script.TINY["num_layers"]
    assert result["calls"]["patched, LoRA"] == {"rope3d_attention": layers, "expert_ffn": layers}
    assert result["calls"]["unpatched, LoRA"] == {"rope3d_attention": 0, "expert_ffn": 0}
    correctness = {k: v for k, v in result["checks"].items() if k != "patched_step_time_unchanged_by_lora"}
    assert all(correctness.values()), result["checks"]
    assert result["errors"]["patched_vs_fp32"] <= 2e-2 and result["errors"]["lora_effect"] > 1e-3
    assert {r["variant"] for r in result["rows"] if "ms" in r} == {
        "unpatched, LoRA", "patched, LoRA", "patched, LoRA disabled", "unpatched, LoRA disabled"}


def test_conformance_picks_the_installed_tag_or_the_one_below(tmp_path):
    conformance = load("diffusers_conformance")
    repo = tmp_path / "repo"
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for tag in ("v0.39.0", "v0.40.0", "v0.43.0"):
        subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", tag], check=True)
        subprocess.run(git + ["tag", tag], check=True)
    git_dir = conformance._git_dir(repo)
    assert conformance.pick_ref(git_dir, "0.40.0", None) == ("v0.40.0", "")
    ref, note = conformance.pick_ref(git_dir, "0.42.1", None)
    assert ref == "v0.40.0" and "no tag v0.42.1" in note
    assert conformance.pick_ref(git_dir, "0.42.1", "v0.39.0") == ("v0.39.0", "")
    assert conformance._junit_id("tests/a/test_b.py::TestC::test_d[x]") == "tests.a.test_b.TestC::test_d[x]"


def test_vae_decode_bench_tiny(tmp_path):
    """bench_vae_decode.py --tiny (what gpu_vae_decode.sh runs at full size): diffusers un-tiled, tiled and
    patched decode/encode of a tiny VAE on the CPU, the patched rows through vae_conv3d (2 calls per ResNet
    block per frame batch) and equal to float32 diffusers, the summary against issue 14's bars written."""
    script = load("bench_vae_decode")
    assert script.main(["--tiny", "--out", str(tmp_path)]) == 0
    rows = {(r["variant"], r["note"].split(":")[0] if r["variant"] == "float32 reference" else ""): r
            for r in json.loads((tmp_path / "step_rows.json").read_text())["rows"]}
    assert {v for v, _ in rows} == {"float32 reference"} | {f"{w} {v}" for w in ("decode", "encode")
                                                           for v in ("diffusers", "diffusers tiled", "patched")}
    assert all(r["status"] == "ok" for r in rows.values())
    blocks = {"decode": 10, "encode": 6}  # TINY_VAE: 4 up x 2 + mid 2; 4 down x 1 + mid 2; one frame batch
    for what, n in blocks.items():
        patched = rows[(f"{what} patched", "")]
        assert f"vae_conv3d: {2 * n}" in patched["note"], patched["note"]
        assert float(patched["rel_err_vs_fp32"]) <= 1e-5
        assert float(rows[(f"{what} diffusers tiled", "")]["rel_err_vs_fp32"]) > 1e-3  # tiling ran
    summary = (tmp_path / "vae_decode_results.md").read_text()
    assert "decode patched" in summary and "Issue 14 bars" in summary


def test_vae_section_host_cache_rows(tmp_path, monkeypatch):
    """The VAE section's default variants: diffusers, tiled and patched on the CPU; "patched host-cache"
    (apply(vae, vae_cache="host")) added on CUDA only, and timed for decode only (the option is the decoder's)."""
    import torch

    from cogvideox_kernels.bench import step

    monkeypatch.setattr(step, "DEVICE", "cpu")
    rec = step.Recorder(tmp_path, None)
    step.vae_section(rec, 5, 32, 48, config=step.TINY_VAE, variants=("patched", "patched host-cache"),
                     fp32_reference=False, dtype=torch.float32, backend="reference")
    labels = [r["variant"] for r in rec.rows]
    assert labels == ["decode patched", "decode patched host-cache", "encode patched"]
    assert all(r["status"] == "ok" for r in rec.rows)
    def not_timed(*args, **kwargs):
        raise RuntimeError("not timed here")

    monkeypatch.setattr(step, "_vae_timed", not_timed)  # (only the rows' labels matter below)
    step.vae_section(rec, 5, 32, 48, config=step.TINY_VAE, work=("decode",), fp32_reference=False,
                     dtype=torch.float32, backend="reference")
    assert [r["variant"] for r in rec.rows[3:]] == [f"decode {v}" for v in step.VAE_VARIANTS]  # (no host-cache)
