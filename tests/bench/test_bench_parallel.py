"""benchmarks/bench_parallel.py on CPU: the tiny model under torchrun with 2 gloo processes (diffusers'
enable_parallelism hosting our Ulysses processor) and with 1 process, then ``--compare``: the full
outputs agree (float32), every field the multi-GPU run will report is there, the all-to-all timer saw
the two all-to-alls per block, and ``--compare`` flags a perturbed output. Skips when torchrun cannot
start its processes here (rendezvous / sockets), with the launcher's words."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_parallel.py"
FIELDS = ("preset", "tiny", "world_size", "dtype", "tokens_per_sample", "ms", "ms_per_rank", "peak_gib_per_rank",
          "a2a_calls", "a2a_ms_per_rank", "a2a_share_per_rank", "a2a_share", "fingerprint", "ranks_identical",
          "weights_checksum", "weights_agree", "output_file", "env")
LAUNCH_FAILURES = ("RendezvousConnectionError", "RendezvousTimeoutError", "DistNetworkError", "EADDRINUSE",
                   "Address already in use", "Connection refused", "Name or service not known")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("TRITON_INTERPRET", None)  # backend auto on CPU is the reference anyway; keep it quick
    return env


def _torchrun(nproc, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(SCRIPT),
           "--tiny", "--out", str(out), "--save-output"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun --nproc-per-node {nproc} did not finish in 120 s: {exc}")
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 and not (out / "result.json").exists():
        hit = [w for w in LAUNCH_FAILURES if w in log]
        if hit:
            pytest.skip(f"torchrun could not start {nproc} processes here ({hit[0]}): {log[-400:]}")
    assert proc.returncode == 0, log[-4000:]
    return json.loads((out / "result.json").read_text())


def _compare(*args):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--compare", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=_env(), cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_bench_parallel_tiny_two_ranks_equal_one(tmp_path):
    two = _torchrun(2, tmp_path / "n2")
    one = _torchrun(1, tmp_path / "n1")
    for result in (one, two):
        missing = [f for f in FIELDS if f not in result]
        assert not missing, missing
        assert result["tiny"] and result["preset"] == "1.5-5b" and result["dtype"] == "float32"
        assert result["tokens_per_sample"] == 7 + 2 * 4 * 6
        assert result["ms"] > 0 and result["ranks_identical"] and result["weights_agree"]
        assert result["fingerprint"]["finite"] and result["fingerprint"]["norm"] > 0
        assert result["env"]["nvls"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                                         "NVSHMEM_DISABLE_NVLS": "1"}
        table = (tmp_path / f"n{result['world_size']}" / "result.md").read_text().splitlines()[2:]
        assert len(table) == 3 and table[2].startswith(f"| cpu | {result['world_size']} | 1.5-5b (tiny) | 55 |")
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(two["ms_per_rank"]) == 2
    assert one["weights_checksum"] == two["weights_checksum"]
    # the Ulysses path ran: two all-to-alls per block (2 blocks), timed on both ranks
    assert two["a2a_calls"] == 4 and one["a2a_calls"] == 0
    assert len(two["a2a_share_per_rank"]) == 2 and 0 < two["a2a_share"] < 1
    assert one["a2a_share"] is None

    rc, log = _compare(tmp_path / "n1", tmp_path / "n2", "--out", tmp_path)
    assert rc == 0, log
    report = json.loads((tmp_path / "compare_1.5-5b_tiny.json").read_text())
    (row,) = report["rows"]
    assert row["parity_measure"] == "full output" and row["within_budget"] and not row["problems"]
    assert row["rel_err"] <= 1e-5 and row["fingerprint_rel_diff"] <= 1e-5
    assert row["speedup"] > 0 and row["speedup_bar"] is None  # no bar for the tiny model
    assert (tmp_path / "compare_1.5-5b_tiny.md").exists()

    # the compare notices a wrong output (and a missing run)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "n2", bad)
    out = torch.load(bad / "output.pt")
    torch.save(out * 1.001, bad / "output.pt")
    rc, log = _compare(tmp_path / "n1", bad)
    assert rc == 1 and "NO" in log, log
    rc, log = _compare(tmp_path / "n1", tmp_path / "n2", tmp_path / "absent")
    assert rc == 1 and "not run" in log, log
