"""Offline (no GPU): SASS of the INT8 attention kernel's key-block loops, per config: instructions
per 64x128 key block and warp, the opcodes the softmax changes, and whether every MUFU.EX2 sits
between the two wgmma waits (softmax under P V). A bounded kernel holds two loops per consumer
warpgroup (fixed max, running max). Run with TRITON_INTERPRET unset:

    PYTHONPATH=$PWD python benchmarks/experiments/int8_sass.py [case,case,...]   (see CASES)
"""
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hopper_same_sass import main_loops  # noqa: E402
from cogvideox_kernels.ops.attention import hopper_int8_fwd  # noqa: E402

KEYS = ("FMNMX", "FMUL", "FADD", "FFMA", "MUFU", "SHFL", "F2FP", "IGMMA", "HGMMA", "I2FP", "IMAD",
        "IADD3", "VIADD", "WARPGROUP")
CASES = {  # name -> (config, head_dim)
    "runmax_s3": (dict(SCORE_BOUND=False, STAGES=3), 64),
    "s3": (dict(STAGES=3), 64),
    "default": (dict(), 64),
    "default_d128": (dict(), 128),
    "i2f": (dict(MAGIC_CVT=False), 64),
    "k_split": (dict(K_SPLIT=True), 64),  # 4 stages
    "k_split_s3": (dict(K_SPLIT=True, STAGES=3), 64),
    "k_split_runmax": (dict(K_SPLIT=True, SCORE_BOUND=False), 64),
    "k_split_d128": (dict(K_SPLIT=True), 128),  # 2 stages
    "k_split_heads": (dict(K_SPLIT="heads"), 64),  # fixed-max loop without k_lo, running max with
    "k_split_heads_d128": (dict(K_SPLIT="heads"), 128),
}


def res_usage(compiled) -> str:
    """cuobjdump's resource line (REG, STACK, SHARED, LOCAL, ...) of the cubin."""
    import subprocess
    import tempfile

    from hopper_same_sass import CUOBJDUMP
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    return " ".join(line.strip() for line in out.splitlines() if "REG" in line)


def main():
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["runmax_s3", "s3", "default"]
    for name in names:
        config, head_dim = CASES[name]
        compiled = hopper_int8_fwd.compile_offline(config, head_dim)
        print(f"{name} {config or ''} D {head_dim}: local memory {'.local' in compiled.asm['ptx']}, "
              f"shared {compiled.metadata.shared} B; {res_usage(compiled)}")
        for body in main_loops(compiled):
            ops = collections.Counter(op.split(".")[0] for op in body)
            dep = [i for i, op in enumerate(body) if op.startswith("WARPGROUP.DEPBAR")]
            mufu = [i for i, op in enumerate(body) if op == "MUFU.EX2"]
            inside = sum(dep[0] < i < dep[-1] for i in mufu) if len(dep) >= 2 else 0
            print(f"  loop {len(body)}: " + " ".join(f"{k} {ops[k]}" for k in KEYS)
                  + f"; MUFU.EX2 between the wgmma waits {inside}/{len(mufu)}")


if __name__ == "__main__":
    main()
