"""Does a host <-> device copy on a side stream slow the compute stream's kernels (issue 14's host caches)?

A. Micro: kernel sequences on the current stream timed alone and while a 2 GiB pinned host -> device (or device ->
   host) copy runs on a side stream: tiny launches (x.add_ on 1 MiB), a bandwidth-bound elementwise pass (1 GiB),
   GroupNorm at the decoder's [1,512,8,96,170], a bf16 GEMM, a cuDNN (3,3,3) Conv3d at [1,128,4,240,360].
B. The host-cache decode (49x480x720, 5B VAE config, random weights) under the profiler: each kernel's duration
   when it overlaps a host -> device copy vs when it does not (same kernel name), the compute stream's idle time
   inside copies, and the allocator's counters over the decode (host vs device caches).

    python3 benchmarks/experiments/host_copy_contention.py --out DIR
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics

import torch


def ms_between(e0, e1):
    return e0.elapsed_time(e1)


def micro():
    dev = "cuda"
    side = torch.cuda.Stream()
    nbytes = 2 << 30
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    dbuf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    small = torch.randn(1 << 18, device=dev)
    big = torch.randn(1 << 28, device=dev)  # 1 GiB fp32
    gn_x = torch.randn(1, 512, 8, 96, 170, device=dev, dtype=torch.bfloat16)
    gn = torch.nn.GroupNorm(32, 512).to(dev, torch.bfloat16)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    conv = torch.nn.Conv3d(128, 128, 3, padding=1).to(dev, torch.bfloat16)
    cx = torch.randn(1, 128, 4, 240, 360, device=dev, dtype=torch.bfloat16)
    cases = {
        "tiny add x2000": lambda: [small.add_(1.0) for _ in range(2000)],
        "1GiB mul x10": lambda: [big.mul_(1.0001) for _ in range(10)],
        "groupnorm x20": lambda: [gn(gn_x) for _ in range(20)],
        "gemm 8192 x20": lambda: [a @ a for _ in range(20)],
        "conv3d x10": lambda: [conv(cx) for _ in range(10)],
    }
    rows = []
    with torch.no_grad():
        for name, fn in cases.items():
            fn()
            row = {"case": name}
            for mode in ("alone", "h2d", "d2h"):
                times = []
                for _ in range(3):
                    torch.cuda.synchronize()
                    if mode != "alone":
                        with torch.cuda.stream(side):
                            for _ in range(4):  # ~150 ms of copying
                                if mode == "h2d":
                                    dbuf.copy_(host, non_blocking=True)
                                else:
                                    host.copy_(dbuf, non_blocking=True)
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    fn()
                    e1.record()
                    torch.cuda.synchronize()
                    times.append(ms_between(e0, e1))
                row[mode + "_ms"] = round(min(times), 3)
            row["h2d_x"] = round(row["h2d_ms"] / row["alone_ms"], 2)
            row["d2h_x"] = round(row["d2h_ms"] / row["alone_ms"], 2)
            print(row, flush=True)
            rows.append(row)
    return rows


def decode_profile(out_dir):
    from diffusers import AutoencoderKLCogVideoX
    from torch.profiler import ProfilerActivity, profile

    from cogvideox_kernels.integrations import diffusers as integration

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLCogVideoX().eval().requires_grad_(False).to(torch.bfloat16)
    z = torch.randn(1, 16, 13, 60, 90, device="cuda", dtype=torch.bfloat16)
    res = {"alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
           "max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")}
    keys = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams", "num_ooms")
    for place in ("device", "host"):
        integration.apply(vae, vae_cache=place)
        with torch.no_grad():
            vae.decode(z)
            torch.cuda.synchronize()
            s0 = torch.cuda.memory_stats()
            vae.decode(z)
            torch.cuda.synchronize()
            s1 = torch.cuda.memory_stats()
            res["alloc_" + place] = {k: s1.get(k, 0) - s0.get(k, 0) for k in keys}
            print(place, res["alloc_" + place], flush=True)
            if place == "host":
                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    vae.decode(z)
                    torch.cuda.synchronize()
        integration.remove(vae)
    kern, h2d = [], []
    for e in prof.events():
        if getattr(e.device_type, "name", str(e.device_type)) != "CUDA":
            continue
        iv = (e.time_range.start, e.time_range.end)
        if "Memcpy HtoD" in e.name:
            h2d.append(iv)
        elif "Memcpy" not in e.name and "Memset" not in e.name:
            kern.append((e.name[:90], iv))
    h2d.sort()

    def overlaps(iv):
        for s, e in h2d:  # (few hundred copies)
            if s < iv[1] and e > iv[0]:
                return True
        return False

    by = {}
    for name, iv in kern:
        d = by.setdefault(name, {"in": [], "out": []})
        d["in" if overlaps(iv) else "out"].append(iv[1] - iv[0])
    rows = []
    for name, d in by.items():
        if d["in"] and d["out"]:
            mi, mo = statistics.median(d["in"]), statistics.median(d["out"])
            rows.append(dict(kernel=name, n_in=len(d["in"]), n_out=len(d["out"]), med_in_us=round(mi, 1),
                             med_out_us=round(mo, 1), extra_ms=round((mi - mo) * len(d["in"]) / 1e3, 2)))
    rows.sort(key=lambda r: -r["extra_ms"])
    # idle time of the compute kernels inside copy intervals
    kiv = sorted(iv for _, iv in kern)
    busy_in = idle_in = 0.0
    for s, e in h2d:
        covered, cur = 0.0, s
        for ks, ke in kiv:
            if ke <= cur or ks >= e:
                continue
            a, b = max(ks, cur), min(ke, e)
            if b > a:
                covered += b - a
                cur = b
        busy_in += covered
        idle_in += (e - s) - covered
    res["h2d_ms"] = sum(e - s for s, e in h2d) / 1e3
    res["kernels_busy_during_h2d_ms"] = busy_in / 1e3
    res["idle_during_h2d_ms"] = idle_in / 1e3
    res["kernels_slower_during_h2d"] = rows[:25]
    print({k: res[k] for k in ("h2d_ms", "kernels_busy_during_h2d_ms", "idle_during_h2d_ms")}, flush=True)
    for r in rows[:15]:
        print(r, flush=True)
    if out_dir:
        trace = os.path.join(out_dir, "host_decode_trace.json")
        prof.export_chrome_trace(trace)
        with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g:
            g.write(f.read())
        os.remove(trace)
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--skip-micro", action="store_true")
    a = p.parse_args()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "commit": os.environ.get("COGVIDEOX_KERNELS_COMMIT")}
    if not a.skip_micro:
        res["micro"] = micro()
    res["decode"] = decode_profile(a.out)
    if a.out:
        with open(os.path.join(a.out, "host_copy_contention.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
