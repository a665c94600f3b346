"""Why does ``apply(vae, vae_cache="host")`` cost time (issue 14)? One 49x480x720 decode (5B VAE config, random
weights, bf16) timed per variant, with the allocator's counters over the timed call and a profile of the host
variant: the compute stream's busy time vs wall time, the copies' total time per direction, and how much of
the copy time overlaps compute. Variants: device caches; host caches; host caches with MIN_BYTES raised
(fewer, larger copies); host caches with the prefetch off (each stage's caches copied just before it runs).

    python3 benchmarks/experiments/vae_cache_offload_probe.py --out DIR [--large]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def intervals_union(iv):
    iv = sorted(iv)
    total, cur_s, cur_e = 0.0, None, None
    for s, e in iv:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def overlap(a, b):
    """Total length of the intersection of the unions of interval lists a and b."""
    return intervals_union(a) + intervals_union(b) - intervals_union(a + b)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--large", action="store_true")
    a = p.parse_args()
    from diffusers import AutoencoderKLCogVideoX

    from cogvideox_kernels.integrations import diffusers as integration
    from cogvideox_kernels.integrations.diffusers import cache_offload, resnet

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLCogVideoX().eval().requires_grad_(False).to(torch.bfloat16)
    T, H, W = (21, 96, 170) if a.large else (13, 60, 90)
    z = torch.randn(1, 16, T, H, W, device="cuda", dtype=torch.bfloat16)
    res = {"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("COGVIDEOX_KERNELS_COMMIT"),
           "latents": [1, 16, T, H, W], "rows": []}
    real_prefetch = cache_offload.prefetch
    # how long the host thread spends issuing a host -> device copy on a side stream that waits for ~50 ms of
    # GPU work (an async copy returns at once; a copy the driver treats as pageable waits for its stream)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    micro = {}
    for kind, make in (("torch pinned slab", cache_offload._pinned), ("cudaHostRegister", cache_offload._registered)):
        pool = cache_offload._Pool()
        buf = make(256 << 20, pool)
        dst = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        for _ in range(2):
            torch.cuda.synchronize()
            for _ in range(50):
                x @ x
            side.wait_stream(torch.cuda.current_stream())
            t0 = time.perf_counter()
            with torch.cuda.stream(side):
                dst.copy_(buf, non_blocking=True)
            issue_ms = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            with torch.cuda.stream(side):
                buf.copy_(dst, non_blocking=True)
            issue_d2h_ms = (time.perf_counter() - t0) * 1e3
            torch.cuda.synchronize()
        micro[kind] = dict(h2d_issue_ms=round(issue_ms, 3), d2h_issue_ms=round(issue_d2h_ms, 3))
        del buf
        pool.release()
    print("copy issue latency behind ~50 ms of GPU work:", micro, flush=True)
    res["issue_latency"] = micro
    variants = [("device", {}), ("host", {}), ("host registered", {"registered": True}),
                ("host no prefetch", {"noprefetch": True})]
    ref = None
    for name, opt in variants:
        integration.apply(vae, vae_cache="device" if name == "device" else "host")
        cache_offload.MIN_BYTES = opt.get("min", 8 << 20)
        cache_offload.release()
        cache_offload._POOL.make = cache_offload._registered if opt.get("registered") else cache_offload._pinned
        cache_offload.prefetch = (lambda tree: None) if opt.get("noprefetch") else real_prefetch
        resnet.cache_offload.prefetch = cache_offload.prefetch
        with torch.no_grad():
            timed(lambda: vae.decode(z).sample)
            s0 = torch.cuda.memory_stats()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            s, out = timed(lambda: vae.decode(z).sample)
            s1 = torch.cuda.memory_stats()
        keys = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
        row = dict(variant=name, s=round(s, 4), peak_gib=round((torch.cuda.max_memory_allocated() - base) / 2**30, 2),
                   pinned_made_gib=round(cache_offload.made_bytes() / 2**30, 2),
                   **{k: s1.get(k, 0) - s0.get(k, 0) for k in keys})
        if ref is None:
            ref = out
        row["bit_identical_to_device"] = bool(torch.equal(out, ref))
        del out
        print(row, flush=True)
        res["rows"].append(row)
        integration.remove(vae)
    cache_offload.prefetch = resnet.cache_offload.prefetch = real_prefetch
    cache_offload.MIN_BYTES = 8 << 20
    cache_offload.release()
    cache_offload._POOL.make = cache_offload._pinned
    # profile of the host variant
    integration.apply(vae, vae_cache="host")
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        timed(lambda: vae.decode(z).sample)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            s, _ = timed(lambda: vae.decode(z).sample)
    kern, h2d, d2h = [], [], []
    for e in prof.events():
        if getattr(e.device_type, "name", str(e.device_type)) != "CUDA":
            continue
        name = e.name
        iv = (e.time_range.start, e.time_range.end)
        if "Memcpy HtoD" in name:
            h2d.append(iv)
        elif "Memcpy DtoH" in name:
            d2h.append(iv)
        else:
            kern.append(iv)
    res["profile"] = dict(wall_ms=s * 1e3, kernels_busy_ms=intervals_union(kern) / 1e3,
                          h2d_ms=intervals_union(h2d) / 1e3, d2h_ms=intervals_union(d2h) / 1e3,
                          h2d_overlapping_kernels_ms=overlap(h2d, kern) / 1e3,
                          d2h_overlapping_kernels_ms=overlap(d2h, kern) / 1e3, n_h2d=len(h2d), n_d2h=len(d2h))
    print(res["profile"], flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "vae_cache_offload_probe.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
