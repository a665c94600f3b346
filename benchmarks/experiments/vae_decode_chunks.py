"""apply(vae) decode at 49x480x720 (CogVideoX-5B VAE config, random weights, bf16) with different frame-chunk
sizes (resnet.CHUNK_BYTES): seconds (one call after a warm-up), peak memory above weights and inputs, the
difference to the default chunking, then a torch.profiler table of the default's CUDA kernels (issue 14).

    python3 benchmarks/experiments/vae_decode_chunks.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--chunks-mib", default="256,128,0", help="0 = no chunking; the first is profiled")
    a = p.parse_args()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from diffusers import AutoencoderKLCogVideoX

    from cogvideox_kernels.bench.common import environment
    from cogvideox_kernels.integrations import diffusers as integration
    from cogvideox_kernels.integrations.diffusers import resnet

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLCogVideoX().eval().requires_grad_(False).to(torch.bfloat16)
    z = torch.randn(1, 16, 13, 60, 90, device="cuda", generator=torch.Generator("cuda").manual_seed(2)).bfloat16()
    integration.apply(vae)
    rows, ref, first = [], None, None
    for mib in [int(v) for v in a.chunks_mib.split(",")]:
        resnet.CHUNK_BYTES = (mib << 20) if mib else 1 << 62
        resnet.CHUNK_ABOVE = resnet.CHUNK_ABOVE if mib else 1 << 62
        first = first if first is not None else (resnet.CHUNK_BYTES, resnet.CHUNK_ABOVE)
        with torch.no_grad():
            vae.decode(z)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            x = vae.decode(z).sample
            torch.cuda.synchronize()
            s = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        diff = 0.0 if ref is None else ((x.float() - ref).norm() / ref.norm()).item()
        ref = x.float() if ref is None else ref
        rows.append({"chunk_mib": mib or None, "s": round(s, 3), "peak_gib": round(peak, 2), "rel_diff_vs_first": diff})
        print(rows[-1], flush=True)
        (out_dir / "vae_decode_chunks.json").write_text(json.dumps({"env": environment("cuda"), "rows": rows}, indent=1))
        del x
    resnet.CHUNK_BYTES, resnet.CHUNK_ABOVE = first
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        vae.decode(z)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    (out_dir / "vae_decode_profile.txt").write_text(table)
    (out_dir / "vae_decode_chunks.json").write_text(json.dumps({"env": environment("cuda"), "rows": rows}, indent=1))
    print(table)
    print("| chunk MiB | s | peak GiB | rel diff vs first |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['chunk_mib'] or 'none'} | {r['s']} | {r['peak_gib']} | {r['rel_diff_vs_first']:.1e} |")


if __name__ == "__main__":
    main()
