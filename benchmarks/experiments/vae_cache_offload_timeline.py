"""Where does ``apply(vae, vae_cache="host")`` wait (issue 14)? A GPU timeline of one decode (5B VAE config,
random weights, bf16): CUDA events on the compute stream at each decoder stage's start, after its caches are
waited for, and at its end; on the side streams around each host -> device and device -> host copy. Printed: the
compute stream's stall per stage (time between reaching a stage and its caches being on the device), when each
stage's copy started and ended relative to the stage before it, and the same decode under variants of the copy
schedule (monkeypatched here; what wins moves into cache_offload.py):

- ``ahead=k``: stage i issues the copies of stages i+1 .. i+k;
- ``own``: the device buffer of a copy comes from the copy stream's own allocator pool, so the copy waits only for
  its host buffer, not for the compute stream to reach the stage that issued it;
- ``prio``: the side streams at high priority.

    python3 benchmarks/experiments/vae_cache_offload_timeline.py --out DIR [--large] [--variants ...]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

LOG = {"stages": [], "copies": [], "batch": -1, "path": None}


def mark(stream):
    e = torch.cuda.Event(enable_timing=True)
    e.record(stream)
    return e


def install(variant):
    from cogvideox_kernels.integrations.diffusers import cache_offload, resnet

    ahead = int(variant.get("ahead", 1))
    own = bool(variant.get("own"))
    prio = bool(variant.get("prio"))
    cache_offload._STREAMS.clear()
    real_streams_init = cache_offload._Streams.__init__

    def streams_init(self, device):
        self.device = device
        self.d2h = torch.cuda.Stream(device, priority=-1 if prio else 0)
        self.h2d = torch.cuda.Stream(device, priority=-1 if prio else 0)

    def store(self, t):
        cur = torch.cuda.current_stream(self.device)
        nbytes = t.numel() * t.element_size()
        buf, ready = cache_offload._POOL.take(nbytes)
        self.d2h.wait_stream(cur)
        if ready is not None:
            self.d2h.wait_event(ready)
        with torch.cuda.stream(self.d2h):
            e0 = mark(self.d2h)
            buf.copy_(t.reshape(-1).view(torch.uint8), non_blocking=True)
            done = torch.cuda.Event(enable_timing=True)
            done.record(self.d2h)
        LOG["copies"].append(("d2h", LOG["batch"], LOG["path"], nbytes, e0, done))
        t.record_stream(self.d2h)
        return cache_offload.HostCache(buf, tuple(t.shape), t.dtype, t.device, done)

    def load(self, hc):
        cur = torch.cuda.current_stream(self.device)
        nbytes = hc.host.numel()
        if own:
            with torch.cuda.stream(self.h2d):
                t = torch.empty(hc.shape, dtype=hc.dtype, device=hc.device)
        else:
            t = torch.empty(hc.shape, dtype=hc.dtype, device=hc.device)
            self.h2d.wait_stream(cur)
        self.h2d.wait_event(hc.stored)
        with torch.cuda.stream(self.h2d):
            e0 = mark(self.h2d)
            t.reshape(-1).view(torch.uint8).copy_(hc.host, non_blocking=True)
            done = torch.cuda.Event(enable_timing=True)
            done.record(self.h2d)
        LOG["copies"].append(("h2d", LOG["batch"], LOG["path"], nbytes, e0, done))
        t.record_stream(cur if own else self.h2d)
        cache_offload._POOL.give(hc.host, done)
        return t, done

    def run(self, path, fn):
        i = self.paths.index(path, self.next)
        self.next = i + 1
        if i == 0:
            LOG["batch"] += 1
        cur = torch.cuda.current_stream()
        sub = self._get(path)
        e_start = mark(cur)
        if cache_offload.holds_host(sub) or (self.host and i + 1 < len(self.paths)):
            for k in range(1, ahead + 1):
                if i + k < len(self.paths):
                    LOG["path"] = "/".join(self.paths[i + k])
                    cache_offload.prefetch(self._get(self.paths[i + k]))
            LOG["path"] = "/".join(path)
            if isinstance(sub, dict):
                sub = cache_offload.load(sub)
            elif isinstance(sub, cache_offload.HostCache):
                sub = sub.tensor()
        e_ready = mark(cur)
        out, new_cache = fn(sub)
        del sub
        e_end = mark(cur)
        LOG["path"] = "/".join(path)
        LOG["stages"].append((LOG["batch"], "/".join(path), e_start, e_ready, e_end))
        return out, (cache_offload.store(new_cache) if self.host else new_cache)

    cache_offload._Streams.__init__ = streams_init
    cache_offload._Streams.store = store
    cache_offload._Streams.load = load
    resnet._Stages.run = run
    return real_streams_init


def analyse(t0):
    rel = lambda e: t0.elapsed_time(e)  # ms since the decode's start
    stages = [dict(batch=b, path=p, start=rel(s), ready=rel(r), end=rel(e)) for b, p, s, r, e in LOG["stages"]]
    copies = [dict(kind=k, batch=b, path=p, mib=n / 2**20, start=rel(s), end=rel(e))
              for k, b, p, n, s, e in LOG["copies"]]
    by_path = {}
    for st in stages:
        d = by_path.setdefault(st["path"], dict(stall_ms=0.0, compute_ms=0.0, h2d_mib=0.0, h2d_ms=0.0, n=0))
        d["stall_ms"] += st["ready"] - st["start"]
        d["compute_ms"] += st["end"] - st["ready"]
        d["n"] += 1
    for c in copies:
        if c["kind"] == "h2d" and c["path"] in by_path:
            by_path[c["path"]]["h2d_mib"] += c["mib"]
            by_path[c["path"]]["h2d_ms"] += c["end"] - c["start"]
    return stages, copies, by_path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--large", action="store_true")
    p.add_argument("--variants", default="device,host,ahead2,own,own+ahead2,prio")
    p.add_argument("--timeline-batch", type=int, default=2)
    a = p.parse_args()
    from diffusers import AutoencoderKLCogVideoX

    from cogvideox_kernels.integrations import diffusers as integration
    from cogvideox_kernels.integrations.diffusers import cache_offload

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLCogVideoX().eval().requires_grad_(False).to(torch.bfloat16)
    T, H, W = (21, 96, 170) if a.large else (13, 60, 90)
    z = torch.randn(1, 16, T, H, W, device="cuda", dtype=torch.bfloat16)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "commit": os.environ.get("COGVIDEOX_KERNELS_COMMIT"), "latents": [1, 16, T, H, W], "variants": []}
    ref = None
    for name in a.variants.split(","):
        opt = {}
        for part in name.split("+"):
            if part.startswith("ahead"):
                opt["ahead"] = int(part[5:])
            elif part in ("own", "prio"):
                opt[part] = True
        install(opt)
        integration.apply(vae, vae_cache="device" if name == "device" else "host")
        with torch.no_grad():
            vae.decode(z)  # (warm: pins the pool)
            torch.cuda.synchronize()
            LOG.update(stages=[], copies=[], batch=-1, path=None)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = mark(torch.cuda.current_stream())
            w0 = time.perf_counter()
            out = vae.decode(z).sample
            t1 = mark(torch.cuda.current_stream())
            torch.cuda.synchronize()
            wall = time.perf_counter() - w0
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        if ref is None:
            ref = out
        stages, copies, by_path = analyse(t0)
        stall = sum(d["stall_ms"] for d in by_path.values())
        row = dict(variant=name, s=round(wall, 4), gpu_ms=round(t0.elapsed_time(t1), 1), peak_gib=round(peak, 2),
                   stall_ms=round(stall, 1), bit_identical=bool(torch.equal(out, ref)),
                   h2d_gib=round(sum(c["mib"] for c in copies if c["kind"] == "h2d") / 1024, 2),
                   d2h_gib=round(sum(c["mib"] for c in copies if c["kind"] == "d2h") / 1024, 2))
        print(row, flush=True)
        if name != "device":
            print(f"  {'stage':28s} {'n':>2s} {'stall':>7s} {'compute':>8s} {'h2d MiB':>8s} {'h2d ms':>7s}")
            for path_, d in by_path.items():
                print(f"  {path_:28s} {d['n']:2d} {d['stall_ms']:7.1f} {d['compute_ms']:8.1f} {d['h2d_mib']:8.0f} "
                      f"{d['h2d_ms']:7.1f}")
            b = a.timeline_batch
            print(f"  timeline of batch {b} (ms from decode start): stage start/ready/end; copies for it")
            for st in stages:
                if st["batch"] != b:
                    continue
                cs = [c for c in copies if c["path"] == st["path"] and c["batch"] == b]
                ctext = " ".join(f"{c['kind']}[{c['start']:.1f},{c['end']:.1f}]{c['mib']:.0f}M" for c in cs)
                print(f"  {st['path']:28s} {st['start']:8.1f} {st['ready']:8.1f} {st['end']:8.1f}  {ctext}")
        res["variants"].append(dict(row, by_path=by_path, stages=stages, copies=copies))
        del out
        integration.remove(vae)
        cache_offload.release()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "vae_cache_offload_timeline" + ("_large" if a.large else "") + ".json"),
                  "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
