"""Host <-> device copy bandwidth on the device machine (issue 14: can the VAE decoder's conv caches live in
pinned host memory between frame batches without costing time?). Prints a table; writes JSON to --out.

Measures: pinned allocation time; H2D and D2H GB/s (pinned, non_blocking on a side stream) at 0.08-1.3 GiB;
both directions at once on two streams; a D2H + H2D stream running beside a cuDNN conv (does the conv slow down,
do the copies keep their rate?)."""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F


def gbps(nbytes, ms):
    return nbytes / ms / 1e6


def timed(fn, stream=None, reps=5):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    t0 = time.perf_counter()
    host = torch.empty(8 << 30, dtype=torch.uint8, pin_memory=True)
    res["pin_alloc_8GiB_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    host[::4096].fill_(1)
    res["pin_touch_8GiB_s"] = time.perf_counter() - t0
    rows = []
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    for mib in (84, 169, 338, 676, 1352):
        n = mib << 20
        d = torch.empty(n, dtype=torch.uint8, device=dev)
        d2 = torch.empty(n, dtype=torch.uint8, device=dev)
        h, h2 = host[:n], host[n:2 * n]
        h2d = timed(lambda: d.copy_(h, non_blocking=True))
        d2h = timed(lambda: h.copy_(d, non_blocking=True))

        def both():
            cur = torch.cuda.current_stream()
            s1.wait_stream(cur)
            s2.wait_stream(cur)
            with torch.cuda.stream(s1):
                d.copy_(h, non_blocking=True)
            with torch.cuda.stream(s2):
                h2.copy_(d2, non_blocking=True)
            cur.wait_stream(s1)
            cur.wait_stream(s2)

        bi = timed(both)
        rows.append(dict(MiB=mib, h2d_GBps=gbps(n, h2d), d2h_GBps=gbps(n, d2h), both_ms=bi,
                         both_GBps_each=gbps(n, bi)))
        print(rows[-1], flush=True)
    res["copies"] = rows
    # a conv beside copies
    x = torch.randn(1, 128, 10, 480, 720, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(128, 128, 3, 3, 3, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    conv = lambda: F.conv3d(x, w, padding=(0, 1, 1))  # noqa: E731
    for _ in range(3):
        conv()
    conv_ms = timed(lambda: [conv() for _ in range(10)]) / 10
    n = 1352 << 20
    d = torch.empty(n, dtype=torch.uint8, device=dev)
    d2 = torch.empty(n, dtype=torch.uint8, device=dev)
    h, h2 = host[:n], host[n:2 * n]

    def with_copies():
        cur = torch.cuda.current_stream()
        s1.wait_stream(cur)
        s2.wait_stream(cur)
        e1, e2, e3, e4 = (torch.cuda.Event(enable_timing=True) for _ in range(4))
        with torch.cuda.stream(s1):
            e1.record()
            d.copy_(h, non_blocking=True)
            e2.record()
        with torch.cuda.stream(s2):
            e3.record()
            h2.copy_(d2, non_blocking=True)
            e4.record()
        for _ in range(10):
            conv()
        cur.wait_stream(s1)
        cur.wait_stream(s2)
        torch.cuda.synchronize()
        return e1.elapsed_time(e2), e3.elapsed_time(e4)

    both_ms = timed(with_copies) / 10
    c1, c2 = with_copies()
    res["conv_alone_ms"] = conv_ms
    res["conv_with_copies_ms"] = both_ms
    res["copies_beside_conv_ms"] = (c1, c2)
    res["copies_beside_conv_GBps"] = (gbps(n, c1), gbps(n, c2))
    print({k: v for k, v in res.items() if k != "copies"}, flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "host_copy_probe.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
