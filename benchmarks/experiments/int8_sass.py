"""Offline (no GPU): SASS of the INT8 attention kernel's key-block loops, per config: instructions
per 64x128 key block and warp, the opcodes the softmax changes, and whether every MUFU.EX2 sits
between the two wgmma waits (softmax under P V). A bounded kernel holds two loops per consumer
warpgroup (fixed max, running max). Run with TRITON_INTERPRET unset:

    PYTHONPATH=$PWD python benchmarks/experiments/int8_sass.py
"""
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hopper_same_sass import main_loops  # noqa: E402
from cogvideox_kernels.ops.attention import hopper_int8_fwd  # noqa: E402

KEYS = ("FMNMX", "FMUL", "FADD", "FFMA", "MUFU", "SHFL", "F2FP", "IGMMA", "HGMMA")


def main():
    for config in (dict(SCORE_BOUND=False, STAGES=3), dict(STAGES=3), dict()):
        compiled = hopper_int8_fwd.compile_offline(config, 64)
        print(f"{config or 'default'}: local memory {'.local' in compiled.asm['ptx']}, "
              f"shared {compiled.metadata.shared} B")
        for body in main_loops(compiled):
            ops = collections.Counter(op.split(".")[0] for op in body)
            dep = [i for i, op in enumerate(body) if op.startswith("WARPGROUP.DEPBAR")]
            mufu = [i for i, op in enumerate(body) if op == "MUFU.EX2"]
            inside = sum(dep[0] < i < dep[-1] for i in mufu) if len(dep) >= 2 else 0
            print(f"  loop {len(body)}: " + " ".join(f"{k} {ops[k]}" for k in KEYS)
                  + f"; MUFU.EX2 between the wgmma waits {inside}/{len(mufu)}")


if __name__ == "__main__":
    main()
