"""The fused VAE conv's activation pass with the spatial norm's modulation, at the 5B decoder's four
resolutions (one frame batch of 2 latent frames, bf16): the pass alone (CUDA kernel times from the
profiler, the modulation table included) and the whole line, fused (``zq=``: table + gather) against
unfused (scale / shift formed first as the shipped path does: zq nearest-resized, then the (1,1,1) convs
on ``causal_conv3d``, then the op reading them).

    python3 benchmarks/experiments/vae_prep_modulation.py --out DIR     # GPU, ~20 s
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [  # (C, T, H, W): the decoder's frame batch at each level; zq is [1, 16, 2, 60, 90]
    (512, 2, 60, 90), (256, 4, 120, 180), (256, 8, 240, 360), (128, 8, 480, 720)]


def kernel_ms(fn, reps=10):
    """CUDA time per call of each kernel family (by name) over ``reps`` calls, from the profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA:  # kernels only (CPU ops sum their kernels)
            continue
        name = e.key
        fam = next((f for f in ("_vae_zq_mod", "_vae_prep_vec", "_vae_prep", "_vae_conv3x3", "_vae_gn",
                                "_causal_conv3d", "upsample_nearest") if f in name), "other")
        out[fam] = out.get(fam, 0.0) + e.device_time_total / 1e3 / reps
    return {k: round(v, 4) for k, v in out.items()}


def main():
    from triton.testing import do_bench

    from cogvideox_kernels.ops import causal_conv3d
    from cogvideox_kernels.ops.vae_conv import native, spatial_norm_index, vae_conv3d

    # the kernel's own modulation (at e054478 this was missing: the "fused" column there ran the CUDA backend's
    # fallback, modulation_from_zq's full-size scale / shift + the unfused pass; see vae_decode_notes.md)
    os.environ[native.FUSED_MODULATION_CUDA_ENV] = "1"

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for C, T, H, W in SHAPES:
        rnd = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=dt)  # noqa: E731
        x = rnd(1, C, T, H, W)
        w = rnd(C, C, 3, 3, 3) / (27 * C) ** 0.5
        b = rnd(C)
        zq = rnd(1, 16, 2, 60, 90)
        wy, wb = rnd(C, 16, 1, 1, 1) * 0.3, rnd(C, 16, 1, 1, 1) * 0.3
        by, bb = rnd(C) * 0.1 + 1, rnd(C) * 0.1
        nw, nb = rnd(C) * 0.1 + 1, rnd(C) * 0.1
        idx = spatial_norm_index(zq.shape[2:], (T, H, W))
        common = dict(num_groups=32, norm_weight=nw, norm_bias=nb, silu=True, backend="cuda")

        def fused():
            return vae_conv3d(x, w, b, zq=zq, zq_index=idx, scale_weight=wy, scale_bias=by, shift_weight=wb,
                              shift_bias=bb, **common)

        def unfused():  # what the shipped path runs: resize, the two (1,1,1) convs, the op
            z = F.interpolate(zq, size=(T, H, W))
            scale, _ = causal_conv3d(z, wy, by, backend="cuda")
            shift, _ = causal_conv3d(z, wb, bb, backend="cuda")
            return vae_conv3d(x, w, b, scale=scale, shift=shift, **common)

        z = F.interpolate(zq, size=(T, H, W))
        scale, _ = causal_conv3d(z, wy, by, backend="cuda")
        shift, _ = causal_conv3d(z, wb, bb, backend="cuda")

        def op_given():  # the op alone with scale / shift given (no modulation formed)
            return vae_conv3d(x, w, b, scale=scale, shift=shift, **common)

        assert native.fused_modulation_cuda()
        y_f, y_u = fused()[0], unfused()[0]
        err = ((y_f.double() - y_u.double()).norm() / y_u.double().norm()).item()
        row = {"shape": [1, C, T, H, W], "zq": list(zq.shape), "rel_diff_fused_vs_unfused": f"{err:.2e}",
               "line_ms": {"fused": round(do_bench(fused), 4), "unfused": round(do_bench(unfused), 4),
                           "op_given_scale_shift": round(do_bench(op_given), 4)},
               "kernels_ms": {"fused": kernel_ms(fused), "unfused": kernel_ms(unfused)}}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del x, w, z, scale, shift, y_f, y_u
        torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae_prep_modulation.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows},
                                                             indent=1))


if __name__ == "__main__":
    main()
