"""Offline check (no GPU): the shipped Hopper kernel and the experimental variants module, both
at the shipped defaults, compile to the same SASS main loop (opcode sequence of the loop that
holds the HGMMAs and MUFU.EX2s), so the variants' GPU timings stand for the shipped kernel. The
rest may differ slightly (the variants module allocates and initialises unused barriers). Run with TRITON_INTERPRET unset:

    PYTHONPATH=$PWD python benchmarks/experiments/hopper_same_sass.py
"""
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402

import hopper_attention_variants as variants  # noqa: E402
from cogvideox_kernels.ops.attention import hopper_fwd as shipped  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def main_loops(compiled) -> list[list[str]]:
    """Opcode sequences of the innermost backward-branch loops that hold HGMMA and MUFU.EX2."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
    ops, loops = [], []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,5})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(?:\s+0x([0-9a-f]+))?", line)
        if m:
            addr = int(m.group(1), 16)
            ops.append((addr, m.group(2)))
            if m.group(2) == "BRA" and m.group(3) and int(m.group(3), 16) < addr:
                loops.append((int(m.group(3), 16), addr))
    bodies = []
    for lo, hi in loops:
        if any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops):
            continue  # not innermost (the partition dispatch loops enclose the main loops)
        body = [op for a, op in ops if lo <= a <= hi]
        if any(o.startswith("HGMMA") for o in body) and sum(o == "MUFU.EX2" for o in body) > 16:
            bodies.append(body)
    return bodies


def main():
    ok = True
    for head_dim, dtype in ((64, "bf16"), (128, "bf16"), (64, "fp16")):
        # the running-max loop: the variants module predates the score-bound (fixed-max) loop
        a = main_loops(shipped.compile_offline(None, head_dim, dtype, bounded=False))
        b = main_loops(variants.compile_offline(shipped.default_config(head_dim), head_dim, dtype))
        same = bool(a) and a == b
        # ptxas may order independent uniform-register adds differently: same opcodes, same count
        same_ops = bool(a) and [sorted(x) for x in a] == [sorted(x) for x in b]
        ok &= same_ops
        verdict = "same" if same else ("same opcodes, scheduled differently" if same_ops
                                       else "DIFFERENT")
        print(f"D={head_dim} {dtype}: main loops (instructions) shipped {[len(x) for x in a]}, "
              f"variants {[len(x) for x in b]}: {verdict}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
