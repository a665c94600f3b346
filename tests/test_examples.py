"""Every script in examples/ runs as a user would run it (a fresh process, this environment: under
TRITON_INTERPRET=1 the examples also run the Triton kernels) and checks its own results."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NEEDS = {"diffusers_dropin.py": "diffusers"}


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(
        ["ops_on_cpu.py", "model_end_to_end.py", "diffusers_dropin.py", "streaming_vae.py"])


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(name, tmp_path):
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"needs {NEEDS[name]}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)  # from another folder: the installed package, not the checkout
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.rstrip().endswith("ok"), out.stdout[-2000:]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and name != "streaming_vae.py":
        assert "triton" in out.stdout  # the Triton kernels ran too
