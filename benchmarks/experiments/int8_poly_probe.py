"""Issue 15: a share of the INT8 attention kernel's exponentials on the FMA pipe.

The bf16 kernel at head_dim 64 is bound by MUFU and the tensor pipe together (both 75% in ncu), so
moving exponentials to a polynomial did not pay there (h200_s7: poly 1/8 +0.10 ms, 1/4 +0.22 at
5B). The INT8 kernel's Q K^T takes half the tensor time and the same MUFU work, so it is the case
where the FMA pipe could take load off MUFU. This probe swaps ``hopper_int8_fwd._exp2_bounded``
(the fixed-max loop's 2^x, bounded heads) for ``hopper_attention_next._exp2_mixed`` with POLY
eighths of every accumulator tile on the FMA pipe, one child process per POLY (a fresh Triton
cache each, the swap made before anything compiles), and reports per POLY:

* offline (any machine, ``--offline``): the fixed-max loop's SASS counts (``int8_sass``);
* on a GPU: the full path (norm + RoPE + quantization + kernel, ``precision="int8"``) at the 5B
  shape, ms (``do_bench`` median), error / cosine / max vs float64 on the model and hard inputs
  (``attention_quality``'s inputs and metrics), with the bf16 hopper path timed in the POLY 0 child.

    PYTHONPATH=$PWD python3 benchmarks/experiments/int8_poly_probe.py --out DIR [--polys 0,2,3] [--offline]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

POLY_ENV = "INT8_POLY_PROBE"


from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402

from hopper_attention_next import _exp2_mixed  # noqa: E402

_POLY = gl.constexpr(int(os.environ.get(POLY_ENV, "0")))


@gluon.jit
def _exp2_bounded_poly(x, MASK: gl.constexpr):
    """2^x with _POLY eighths of the tile on the FMA pipe (``_exp2_mixed``)."""
    return _exp2_mixed(x, _POLY, MASK)


def _install_poly(poly: int):
    """Replace the int8 kernel's bounded-head 2^x by the mixed MUFU / polynomial form (POLY
    eighths on the FMA pipe); POLY 0 leaves the shipped function."""
    assert poly == _POLY.value, "the child reads POLY from the environment at import"
    if poly:
        from cogvideox_kernels.ops.attention import hopper_int8_fwd
        hopper_int8_fwd._exp2_bounded = _exp2_bounded_poly


def sass_counts(poly: int) -> list:
    """Per key-block loop of the default int8 kernel (D 64): SASS length and the counted opcodes."""
    from hopper_same_sass import main_loops
    from int8_sass import KEYS

    from cogvideox_kernels.ops.attention import hopper_int8_fwd
    compiled = hopper_int8_fwd.compile_offline(dict(K_SPLIT=False), 64)
    rows = [dict(local_memory=".local" in compiled.asm["ptx"])]
    for body in main_loops(compiled):
        ops = collections.Counter(op.split(".")[0] for op in body)
        rows.append(dict(length=len(body), **{k: ops[k] for k in KEYS if ops[k]}))
    return rows


def gpu_rows(poly: int, commit: str | None) -> list:
    import torch

    import attention_quality as aq
    from bench_attention import SHAPES, make_inputs, reference_rows, sample_rows
    from cogvideox_kernels import ops
    from cogvideox_kernels.bench.common import time_ms

    shape = SHAPES["5b"]
    rows = []
    for input_name, make in (("model", make_inputs), ("hard", aq.hard_inputs)):
        inp = make(shape, device="cuda")
        sample = sample_rows(shape["S"], shape["text_len"], count=256)
        ref = reference_rows(inp, sample, with_norm_rope=True)
        a = aq.op_args(inp)
        q, k, v = inp["q"], inp["k"], inp["v"]
        methods = [("int8", lambda: ops.rope3d_attention(q, k, v, **a, precision="int8"))]
        if poly == 0:
            methods.insert(0, ("bf16", lambda: ops.rope3d_attention(q, k, v, **a, backend="hopper")))
        for name, fn in methods:
            out = fn()
            torch.cuda.synchronize()
            row = dict(poly=poly, inputs=input_name, method=name, **aq.metrics(out, ref, sample))
            del out
            if input_name == "model":
                row["ms"] = time_ms(fn, "cuda")
            rows.append(row)
            print(json.dumps(row), flush=True)
        del inp, ref
        torch.cuda.empty_cache()
    return rows


def child(args):
    poly = int(os.environ[POLY_ENV])
    _install_poly(poly)
    result = dict(poly=poly, sass=sass_counts(poly))
    print(f"poly {poly}/8 SASS loops: {result['sass']}", flush=True)
    if not args.offline:
        result["rows"] = gpu_rows(poly, args.commit)
    with open(os.path.join(args.out, f"poly_{poly}.json"), "w") as f:
        json.dump(result, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--polys", default="0,2,3", help="eighths on the FMA pipe, one child each (0..4)")
    ap.add_argument("--offline", action="store_true", help="SASS only (no GPU needed)")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.child:
        return child(args)
    summary = []
    for poly in [int(p) for p in args.polys.split(",")]:
        if not 0 <= poly <= 4:
            raise SystemExit(f"--polys: {poly} is not in 0..4")
        t0 = time.time()
        env = dict(os.environ, **{POLY_ENV: str(poly), "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix=f"poly{poly}_")})
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--out", args.out]
        cmd += ["--offline"] if args.offline else []
        cmd += ["--commit", args.commit] if args.commit else []
        rc = subprocess.run(cmd, env=env).returncode
        print(f"poly {poly}: rc {rc}, {time.time() - t0:.0f} s", flush=True)
        path = os.path.join(args.out, f"poly_{poly}.json")
        if rc == 0 and os.path.exists(path):
            with open(path) as f:
                summary.append(json.load(f))
    lines = ["| POLY | method | model ms | model rel | hard rel | hard cos | fixed-max loop SASS |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for res in summary:
        loop = res["sass"][1] if len(res["sass"]) > 1 else {}
        by = collections.defaultdict(dict)
        for row in res.get("rows", []):
            by[row["method"]][row["inputs"]] = row
        for method, r in (by.items() or [("int8", {})]):
            m, h = r.get("model", {}), r.get("hard", {})
            lines.append(f"| {res['poly']}/8 | {method} | {m.get('ms', float('nan')):.3f} | {m.get('rel', float('nan')):.3e} "
                         f"| {h.get('rel', float('nan')):.3e} | {h.get('cos', float('nan')):.6f} | {loop} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "int8_poly_probe.md"), "w") as f:
        f.write(f"commit {args.commit}\n\n{table}\n")


if __name__ == "__main__":
    main()
