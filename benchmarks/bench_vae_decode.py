"""diffusers' CogVideoX VAE, decode and encode at full clip size (issue 14): diffusers un-tiled, diffusers
``enable_tiling()`` and ``apply(vae)`` un-tiled (ResNet blocks on the fused ``vae_conv3d``), each with
seconds, peak memory above the inputs and the error against a float32 run of the same weights. The
work is ``cogvideox_kernels.bench.step.vae_section``; this script adds the summary against issue 14's bars.

    python3 benchmarks/bench_vae_decode.py --out DIR                # H200: 49x480x720, about 1 minute
    python3 benchmarks/bench_vae_decode.py --out DIR --large        # + 1.5-5B's 81x768x1360 decode
    ... --large --large-variants patched --large-encode diffusers,patched    # fewer rows there, + encode
    ... --variants "patched,patched host-cache"   # + apply(vae, vae_cache="host") (caches in pinned host memory)
    python3 benchmarks/bench_vae_decode.py --out DIR --tiny         # CPU smoke run (tiny VAE, C++ path)
    ... --fused-modulation both     # (default) apply(vae) with the spatial norm's conv_y / conv_b as
                                    # module calls (rows "... patched") and inside the CUDA activation
                                    # pass (rows "... patched fused-mod", the shipped default)

``--fused-modulation``: "off" runs apply(vae) with COGVIDEOX_KERNELS_VAE_FUSED_MODULATION_CUDA=0 (conv_y /
conv_b as module calls), "on" only with the fused modulation (=1, the default since the H200 run at
e054478), "both" the rows with it off and then the patched variants again with it on (a float32 reference
again for their error). The packed-weight cache (ops/vae_conv/native.PACKED, filled by the warm-up call)
is resident before the timed call, so it is in the baseline, not in "peak GiB": 0.22 GiB for the 5B VAE
decoder's 36 ResNet convs in bf16 (0.17 GiB more for the encoder's 28 after an encode).

Writes DIR/step_rows.csv/json (every row as measured), DIR/step_env.json and DIR/vae_decode_results.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from cogvideox_kernels.bench import step

# diffusers' tiling steps by int(tile_latent * (1 - overlap)) latents but keeps tile_sample - blend pixels of a
# tile: the two agree (no seam gaps) for its defaults and for these tiny tiles (48 x 80 with 1/6, 1/5 overlap)
TINY_SHAPE, TINY_TILE = (9, 64, 96), (48, 80)
BARS = {"49x480x720": {"decode": (1.2, 4.0)}, "81x768x1360": {"decode": (5.5, 12.0)}}  # s, GiB (issue 14)


FUSED = "patched fused-mod"


def _fused_modulation(rec, on: bool):
    """Set the CUDA fused-modulation switch; with it on, label the patched rows ``FUSED``."""
    from cogvideox_kernels.ops.vae_conv import native

    os.environ[native.FUSED_MODULATION_CUDA_ENV] = "1" if on else "0"
    rec.__dict__.pop("add", None)
    if on:
        real = type(rec).add.__get__(rec)

        def add(**row):
            if str(row.get("variant") or "").endswith("patched"):
                row["variant"] = row["variant"][: -len("patched")] + FUSED
            elif str(row.get("variant") or "").endswith("patched host-cache"):
                row["variant"] = row["variant"][: -len("patched host-cache")] + FUSED + " host-cache"
                row["note"] = "; ".join(filter(None, [row.get("note"), f"{native.FUSED_MODULATION_CUDA_ENV}=1"]))
            real(**row)

        rec.add = add


def summary(rows, env) -> str:
    lines = [f"# diffusers CogVideoX VAE: decode / encode ({env.get('gpu') or env['device']})", "",
             f"commit {env['commit']}, torch {env['torch']}, diffusers {env['diffusers']}, {env['date']}. Random "
             "weights (CogVideoX-5B VAE config), batch 1; s = one call after a warm-up call; GiB = peak above "
             "weights and inputs; rel err vs a float32 run of the same weights (TF32 off, un-tiled).", "",
             "| clip | variant | s | peak GiB | rel err vs fp32 | speedup vs un-tiled | vs tiled | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = [r for r in rows if r["section"] == "vae"]
    by = {(r["preset"], r["variant"]): r for r in rows}
    checks = []
    for r in rows:
        shape, variant = r["preset"], r["variant"]
        if variant == "float32 reference":
            lines.append(f"| {shape} | float32 reference | {r['first_call_s']} | | | | | {r['note']} |")
            continue
        what = variant.split()[0]
        base, tiled = by.get((shape, f"{what} diffusers")), by.get((shape, f"{what} diffusers tiled"))
        speed = [f"{b['ms'] / r['ms']:.2f}x" if b and b["ms"] and r["ms"] and b is not r else ""
                 for b in (base, tiled)]
        s = "" if r["ms"] is None else f"{r['ms'] / 1e3:.3f}"
        lines.append(f"| {shape} | {variant} | {s} | {r['peak_mem_gib'] or ''} | {r['rel_err_vs_fp32'] or ''} | "
                     f"{speed[0]} | {speed[1]} | {r['status']}: {r['note'] or ''} |")
        if variant.endswith(("patched", FUSED, "host-cache")) and r["ms"]:
            n_checks = len(checks)
            bar = BARS.get(shape, {}).get(what)
            if bar and r["peak_mem_gib"] is not None:
                met = r["ms"] / 1e3 <= bar[0] and r["peak_mem_gib"] <= bar[1]
                checks.append(f"{shape} {what} <= {bar[0]} s and <= {bar[1]} GiB: {r['ms'] / 1e3:.3f} s, "
                              f"{r['peak_mem_gib']} GiB -> {'met' if met else 'NOT met'}")
            for name, b in (("un-tiled", base), ("tiled", tiled)):
                if b and b["ms"]:
                    need = 1.5 if what == "encode" and name == "un-tiled" else 1.0
                    checks.append(f"{shape} {what} >= {need}x diffusers {name}: {b['ms'] / r['ms']:.2f}x -> "
                                  f"{'met' if b['ms'] / r['ms'] >= need else 'NOT met'}")
            if tiled and tiled["peak_mem_gib"] is not None and r["peak_mem_gib"] is not None and what == "decode":
                checks.append(f"{shape} decode memory below tiled: {r['peak_mem_gib']} vs {tiled['peak_mem_gib']} GiB "
                              f"-> {'met' if r['peak_mem_gib'] < tiled['peak_mem_gib'] else 'NOT met'}")
            if base and r["rel_err_vs_fp32"] and float(base["rel_err_vs_fp32"] or 0) > 0:
                ratio = float(r["rel_err_vs_fp32"]) / float(base["rel_err_vs_fp32"])
                checks.append(f"{shape} {what} error <= 1.25x diffusers' bf16: {ratio:.2f}x -> "
                              f"{'met' if ratio <= 1.25 else 'NOT met'}")
            tag = " ".join(t for t, on in (("fused-mod", FUSED in variant), ("host-cache", "host-cache" in variant)) if on)
            if tag:  # (the same bars, for the fused-modulation / host-cache rows)
                checks[n_checks:] = [f"[{tag}] {c}" for c in checks[n_checks:]]
    head = "Issue 14 bars" + (" (CPU figures: not the product's speed):" if env.get("gpu") is None else ":")
    return "\n".join(lines + ["", head, ""] + [f"- {c}" for c in checks]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="tiny VAE on the CPU (C++ path): checks the script")
    p.add_argument("--large", action="store_true", help="also decode 1.5-5B's 81x768x1360 (latents 21x96x170)")
    p.add_argument("--large-fp32", action="store_true", help="with --large: a float32 reference there too")
    p.add_argument("--variants", default=",".join(step.VAE_VARIANTS + ("patched host-cache",)),
                   help="the variants at 49x480x720 (comma-separated), e.g. 'patched'")
    p.add_argument("--large-variants", default=",".join(step.VAE_VARIANTS + ("patched host-cache",)),
                   help="with --large: the decode variants there (comma-separated), e.g. 'patched'")
    p.add_argument("--large-encode", default="",
                   help="with --large: also encode 81x768x1360 with these variants (comma-separated)")
    p.add_argument("--no-encode", action="store_true")
    p.add_argument("--deadline-s", type=float, default=None, help="stop starting measurements after this long")
    p.add_argument("--fused-modulation", choices=("off", "on", "both"), default="both",
                   help="apply(vae) with the CUDA fused spatial-norm modulation off, on, or both (see the doc)")
    a = p.parse_args(argv)
    if not a.tiny and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --tiny)")
    step.DEVICE = "cpu" if a.tiny else "cuda"
    deadline = None if a.deadline_s is None else time.time() + a.deadline_s
    rec = step.Recorder(Path(a.out), deadline)
    work = ("decode",) if a.no_encode else ("decode", "encode")
    if a.tiny:
        from cogvideox_kernels._ext import extension_available

        step.vae_section(rec, *TINY_SHAPE, config=step.TINY_VAE, work=work, dtype=torch.float32,
                         backend="cpp" if extension_available() else "reference", tile=TINY_TILE)
    else:
        runs = {"off": [False], "on": [True], "both": [False, True]}[a.fused_modulation]
        for fused in runs:  # (with both: the shipped rows first, then the patched ones fused)
            _fused_modulation(rec, fused)
            if fused == runs[0]:
                keep = lambda v: v  # noqa: E731
            else:  # the second run (both): only the patched variants again
                keep = lambda v: ",".join(x for x in v.split(",") if x.startswith("patched"))  # noqa: E731
            if keep(a.variants):
                step.vae_section(rec, *step.VAE_SHAPES["5b"], work=("decode",) if fused and len(runs) > 1 else work,
                                 variants=tuple(keep(a.variants).split(",")))
            if a.large and keep(a.large_variants):
                step.vae_section(rec, *step.VAE_SHAPES["1.5-5b"], work=("decode",), fp32_reference=a.large_fp32,
                                 variants=tuple(keep(a.large_variants).split(",")))
            if a.large and a.large_encode and fused == runs[0]:
                step.vae_section(rec, *step.VAE_SHAPES["1.5-5b"], work=("encode",), fp32_reference=False,
                                 variants=tuple(a.large_encode.split(",")))
        _fused_modulation(rec, False)
    text = summary(rec.rows, rec.meta)
    (Path(a.out) / "vae_decode_results.md").write_text(text)
    print(text)
    return 0 if all(r["status"] in ("ok", "skipped") for r in rec.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
