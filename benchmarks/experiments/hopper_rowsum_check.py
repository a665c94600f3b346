"""GPU check of hopper_attention_next's ROWSUM_MMA kernel (H100/H200), beside the probe
(``hopper_bound_probe.py --next`` times it at 5B / D128 on sampled rows): every row of small
shapes that take the single-block, two-block and tail paths, at head_dim 64 and 128, with and
without the tensor-core row sums and with POLY eighths of the exponentials on the FMA pipe,
outputs over NaN-filled freed memory, against float64.

    PYTHONPATH=$PWD python3 benchmarks/experiments/hopper_rowsum_check.py

Exits 1 if an error exceeds 1e-2 (about twice PyTorch's own bf16 error on this path) or exceeds
twice the control's (the same kernel with the shipped loop).
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from bench_attention import make_inputs, reference_rows, rel_error  # noqa: E402
import hopper_attention_next as nx  # noqa: E402


def poison():
    """Fill freed caching-allocator memory with NaN, so unwritten outputs show."""
    x = torch.empty(64 << 20, device="cuda")
    x.fill_(float("nan"))
    del x


VARIANTS = {"control": dict(rowsum_mma=False), "rowsum_mma": dict(rowsum_mma=True),
            **{f"poly {k}/8": dict(rowsum_mma=False, poly=k) for k in (1, 2, 3, 4)},
            "rowsum_mma poly 3/8": dict(rowsum_mma=True, poly=3)}


def main():
    print(torch.cuda.get_device_name())
    ok = True
    for D in (64, 128):
        for S in (100, 129, 300, 1000):  # 1 block; 2 (D64: the second of 1 key); tails
            inp = make_inputs(dict(B=1, H=3, S=S, D=D, text_len=S, grid=None), seed=S + D)
            rows = torch.arange(S)
            ref = reference_rows(inp, rows)
            errs = {}
            for name, kw in VARIANTS.items():
                poison()
                out = nx.attention_next(inp["q"], inp["k"], inp["v"], S, None, None, inp["q_norm"],
                                        inp["k_norm"], 1e-6, inp["scale"], **kw)
                torch.cuda.synchronize()
                errs[name] = rel_error(out, ref, rows)
            for name, err in errs.items():
                good = err <= 1e-2 and err <= 2 * errs["control"] + 1e-6
                ok &= good
                print(f"D{D} S{S} {name}: err {err:.3e} (control {errs['control']:.3e}) "
                      f"{'ok' if good else 'FAIL'}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
