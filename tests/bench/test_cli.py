"""The ``cogvideox-kernels`` command and the bench harness on a machine without a GPU: arguments are
parsed and checked before anything heavy loads, ``cli.main([...])`` runs the arguments it is given,
and the CPU table reports only what a CPU run can tell."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from cogvideox_kernels import cli
from cogvideox_kernels.bench import common, presets

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def run_cli(*args, env=None, timeout=300):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "cogvideox_kernels.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def loaded_after(code: str) -> set:
    """The heavy modules a fresh interpreter has loaded after running ``code``."""
    probe = code + "\nimport sys; print(sorted(m for m in ('torch', 'triton', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"')))


def test_help_and_bad_arguments_answer_without_loading_torch():
    for args in (["--help"], ["bench", "--help"], ["bench", "--ops", ""], ["bench", "--ops", "attention,nope"]):
        code = f"from cogvideox_kernels import cli\ntry:\n    cli.main({args!r})\nexcept SystemExit:\n    pass"
        assert loaded_after(code) == set(), args
    assert loaded_after("import cogvideox_kernels") == set()


def test_bench_help_says_what_runs_by_default_and_what_plots_need(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "By default it runs the kernel ops attention, ffn, conv" in text
    assert "need a CUDA GPU" in text and "pip install 'cogvideox-kernels[bench]'" in text


@pytest.mark.parametrize("ops,message", [("", "no op given"), (" , ", "no op given"),
                                         ("attention,foo", "unknown op(s) 'foo'")])
def test_bench_ops_must_name_known_ops(ops, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--ops", ops])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_out_that_cannot_be_written_fails_at_once(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--out", str(blocker / "results")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'results'}: cannot write there" in err


def test_info_lists_each_op_and_backend():
    out = run_cli("info", timeout=120)
    assert out.returncode == 0, out.stderr
    for op in ("rope3d_attention", "expert_ffn", "causal_conv3d"):
        assert op in out.stdout
    assert "auto ->" in out.stdout
    assert "rope3d_attention bf16, int8; expert_ffn bf16, fp8, int8" in out.stdout
    assert "int8+fp8 (attention int8, FFN fp8)" in out.stdout


def _rows(out_dir):
    with open(out_dir / "bench_small.csv") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


@CPU_ONLY
@pytest.mark.parametrize("interpreter", ["1", "0"])
def test_main_runs_the_arguments_it_is_given(interpreter, tmp_path, monkeypatch, capfd):
    """From Python, main([...]) runs those arguments (not sys.argv), in this process when the
    interpreter is on, in a child process otherwise (this process's environment is left alone)."""
    monkeypatch.setattr(sys, "argv", ["pytest", "--this-is-not-a-bench-argument"])
    monkeypatch.setenv("TRITON_INTERPRET", interpreter)
    rc = cli.main(["bench", "--ops", "conv", "--quick", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0, capfd.readouterr()
    assert os.environ["TRITON_INTERPRET"] == interpreter
    rows = _rows(tmp_path)
    assert {r["op"] for r in rows} == {"conv"}
    assert [r["variant"] for r in rows if r["kind"] == "ours"] == ["ours (cpp)"] * 2
    assert all(r["status"] == "ok" for r in rows)


@CPU_ONLY
def test_cpu_table_tells_the_truth(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "cogvideox_kernels.cli", "bench", "--preset", "5b", "--ops", "conv",
                          "--quick", "--no-progress", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert text.count("no GPU here") == 1  # the notice prints once
    start = text.index("op ")
    table = text[start:text.index("\n\n", start)]  # the rows, without the footnote
    head = table.splitlines()[0].split()
    assert head[:5] == ["op", "shape", "variant", "backend", "rel"] and "CPU" in head
    for absent in ("TFLOP/s", "GB/s", "speedup", "%ceil", "cuBLAS", "*  ", "pad0+Conv3d"):
        assert absent not in table, absent
    assert "NOT the product's speed" in text
    rows = _rows(tmp_path)
    ours = [r for r in rows if r["kind"] == "ours"]
    assert ours and all(r["backend"] == "cpp" and r["status"] == "ok" for r in ours)
    for r in rows:  # every variant compared against the float32 reference; no throughput, no speedups on CPU
        assert float(r["rel_err"]) < 1e-2 and r["tflops"] == r["gbps"] == r["speedups"] == ""
        assert float(r["ms"]) > 0
    assert all(float(r["budget"]) > 0 for r in ours)
    meta = json.loads((tmp_path / "bench_small.json").read_text())["environment"]
    assert meta["gpu"] is None and meta["triton_interpreter"] is True and meta["torch"] == torch.__version__


@pytest.mark.slow
@CPU_ONLY
def test_cli_bench_default_runs_every_kernel_correctly_on_cpu(tmp_path):
    """What a newcomer runs first: `cogvideox-kernels bench` on a CPU, every kernel within budget."""
    out = run_cli("bench", "--quick", "--no-progress", "--out", str(tmp_path), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = _rows(tmp_path)
    ours = {(r["op"], r["backend"]) for r in rows if r["kind"] == "ours" and r["status"] == "ok"}
    assert ours == {("attention", "triton (interpreter)"), ("ffn", "triton (interpreter)"), ("conv", "cpp")}
    assert all(r["status"] == "ok" for r in rows)
    pytest.importorskip("matplotlib")
    assert {p.name for p in tmp_path.glob("*.png")} == {f"bench_small_{op}.png" for op in ("attention", "ffn", "conv")}


# ------------------------------------------------------------------------------------- harness units
def test_gpu_table_keeps_its_columns_and_cpu_table_drops_throughput():
    r = common.Result("attention", "B2 H48 S17776 D64", "ours (triton)", "ours", ms=17.3, tflops=449.2, rel_err=3.8e-3,
                      budget=9e-3, speedups={"SDPA cudnn*": 1.22}, backend="triton")
    gpu = common.table([r], "cuda")
    assert gpu.splitlines()[0].split()[:6] == ["op", "shape", "variant", "ms", "TFLOP/s", "GB/s"]
    assert "1.22x SDPA cudnn*" in gpu and "not parity-checked" in gpu
    cpu = common.table([r], "cpu")
    assert "449" not in cpu and "1.22x" not in cpu and "triton" in cpu and "NOT the product's speed" in cpu
    wrong = common.Result("ffn", "s", "ours (triton)", "ours", rel_err=0.5, budget=1e-2, status="wrong", note="too far")
    assert "WRONG (too far)" in common.table([wrong], "cpu")


def test_time_ms_on_cpu_calls_warmup_then_reps():
    calls = []
    ms = common.time_ms(lambda: calls.append(1), "cpu", reps=4, warmup=2)
    assert len(calls) == 6 and ms >= 0
    calls.clear()
    common.time_ms(lambda: calls.append(1), "cpu", quick=True)
    assert len(calls) == 1 + 3


def test_environment_on_cpu():
    env = common.environment("cpu")
    assert env["gpu"] is None and env["device"] == "cpu" and env["torch"] == torch.__version__
    assert {"commit", "date", "triton", "diffusers", "python", "host", "command", "nccl", "cuda"} <= env.keys()


def test_presets_are_the_real_shapes():
    m = presets.MODELS
    assert m["5b"].seq_len == m["2b"].seq_len == 226 + 13 * 30 * 45 == 17_776
    assert m["1.5-5b"].seq_len == 224 + 11 * 48 * 85 == 45_104
    assert (m["2b"].hidden, m["2b"].inner, m["5b"].hidden, m["5b"].inner) == (1920, 7680, 3072, 12288)
    assert presets.attention_shapes("5b")[-1] == (2, 48, 226, (13, 30, 45), 64, True)
    assert presets.ffn_shapes("1.5-5b") == [(2, 224, 44880, 3072, 12288)]
    assert len(presets.conv_shapes("2b")) == 6
    cfg = m["1.5-5b"].diffusers_config()
    assert cfg["patch_size_t"] == 2 and cfg["sample_frames"] == 81 and cfg["max_text_seq_length"] == 224
    assert m["5b"].diffusers_config()["sample_frames"] == 49


def test_attention_plot_joins_only_points_of_one_head_layout(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from cogvideox_kernels.bench import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    results = [common.Result("attention", shape, v, "ours", ms=1.0, tflops=t)
               for shape, t in (("B2 H48 S4276 D64", 300.0), ("B2 H48 S17776 D64", 440.0), ("B1 H2 S83 D40", 1.0))
               for v in ("ours (triton)", "SDPA cudnn*")]
    plots.plot_results(results, str(tmp_path), "t")
    (fig,) = figures
    lines = fig.axes[0].get_lines()
    assert sorted(len(line.get_xdata()) for line in lines) == [1, 1, 2, 2]  # B1 H2 D40 never joins B2 H48 D64
    assert all("D40" in line.get_label() for line in lines if len(line.get_xdata()) == 1)


def test_step_bench_rejects_unknown_variants():
    """bench_step's --variants: a name outside the step section's variants is a usage error naming it
    (not a KeyError after the float32 reference has been built); the FFN-path variants are known."""
    from cogvideox_kernels.bench import step

    with pytest.raises(SystemExit):
        step.main(["--variants", "ours,bogus", "--out", "unused"])
    assert set(step.FFN_PATH_VARIANTS.values()) <= {"triton", "cublaslt", "cublas"}
    assert all(v in step.KNOWN_EXTRA for v in step.FFN_PATH_VARIANTS)
