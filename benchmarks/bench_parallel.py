"""Context parallelism (Ulysses) benchmark: one denoising step of diffusers' CogVideoX transformer on
1, 2 or 4 GPUs of one host (issue 8).

Each rank builds the same ``CogVideoXTransformer3DModel`` (random weights, seed 0, bf16, on its GPU),
calls ``cogvideox_kernels.integrations.diffusers.apply(model)`` and, for N > 1, diffusers' own
``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N, ulysses_anything=True))``,
then runs one step on the same inputs (CFG batch B = 2):

* ``1.5-5b``: CogVideoX1.5-5B T2V, 42 layers, 48 heads x 64, patch 2 x 2 x 2 (patch_size_t=2), no patch
  bias, 224 text tokens, 768 x 1360 x 81 frames -> latents 22 x 16 x 96 x 170 (21 latent frames padded
  to 22 as CogVideoXPipeline does) -> 224 + 11 * 48 * 85 = 45,104 tokens per sample, "slice" RoPE grid.
* ``5b``: CogVideoX-5B, 42 layers, 48 heads x 64, 226 text tokens, latents 13 x 16 x 60 x 90 ->
  226 + 13 * 30 * 45 = 17,776 tokens per sample.

    torchrun --standalone --nproc-per-node N benchmarks/bench_parallel.py --out DIR [--preset 1.5-5b|5b]
             [--tiny] [--save-output] [--warmup 2] [--reps 3]
    python3 benchmarks/bench_parallel.py --compare BASE_DIR OTHER_DIR [OTHER_DIR ...] [--out DIR]

What one run records (rank 0 writes DIR/result.json and DIR/result.md; ``--save-output`` adds
DIR/output.pt, the full step output in the model dtype, about 23 MB for 1.5-5B):

* ms: median of ``--reps`` timed steps after ``--warmup`` steps; each step is fenced by barriers
  and timed with CUDA events on every rank; ``ms`` is the slowest rank's median (per-rank medians in
  ``ms_per_rank``). On CPU (``--tiny``) the events are ``time.perf_counter``.
* peak_gib_per_rank: ``torch.cuda.max_memory_allocated`` of each rank over the warm-up and timed
  steps (peak stats reset after the model is built and cast; ``weights_gib`` is what the model and
  inputs hold before the step).
* a2a: one more step in which every ``torch.distributed.all_to_all_single`` call (the two per block
  that ``cogvideox_kernels.parallel`` makes) is fenced by CUDA events on the calling stream, so the
  time counts the NCCL transfer plus any wait for a slower peer; ``a2a_share`` = a2a ms / that step's
  ms, per rank and the max over ranks; ``a2a_calls`` per step (2 x layers for N > 1, 0 for N = 1).
  On GPUs with N > 1, rank 0 also profiles one step with torch.profiler (``profile``: NCCL kernel ms,
  of which SendRecv/AllToAll kernels, and all kernel ms); ``--no-profile`` skips it.
* parity: a fingerprint of the float32 output (shape, norm, mean, |mean|, 64 values at fixed evenly
  spaced flat indices), the same on every rank (``ranks_identical``), and a checksum of the weights
  (sum, sum of |w|, float64), equal on every rank (else rank 0's weights are broadcast, noted) and
  across runs, so ``--compare`` can tell that two runs used the same model.
* env: GPU name, torch / triton / diffusers / NCCL / CUDA versions, commit
  (``COGVIDEOX_KERNELS_COMMIT`` or ``git rev-parse``), date, the command line.

``--compare BASE OTHER...`` (plain python, no torchrun): BASE is the N = 1 run's folder, each OTHER a
run of the same preset; per OTHER it reports the speedup (BASE ms / OTHER ms), the relative difference
of the fingerprints, and, when both folders hold output.pt, the exact rel err ||a - b|| / ||b|| in
float64; a folder without result.json (a run that failed, or N above the GPU count) is listed as not
run. The budget is 1e-2 for bf16/fp16 (DESIGN.md) and 1e-5 for float32 (``--budget`` overrides);
for 1.5-5B (not ``--tiny``) the issue's bar is a speedup >= 1.8 on 2 GPUs and >= 3.4 on 4. With
``--out`` it writes compare_<preset>.json / .md there. Exit status 1 when a parity check fails or a
run is missing (not for a missed speed bar), 2 when the base run is unusable.

``--tiny``: a tiny model of the preset's layout (2 layers, 6 heads x 16, 7 text tokens, a few
latents; weights N(0, 0.2) so every part matters) on CPU with gloo in float32, to check this script's
logic without a GPU (tests/bench/test_bench_parallel.py runs N = 1 and 2 and compares). On CPU diffusers'
``enable_parallelism`` computes ``rank % torch.accelerator.device_count()``, which divides by zero
without an accelerator: only under ``--tiny`` on CPU this script makes that count 1 (as
tests/parallel/test_parallel.py does). ``--tiny --device cuda`` runs the tiny model on the GPUs (NCCL, bf16):
a quick smoke test before the real sizes.

NVLink multicast stays off: the first lines set NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1
and NVSHMEM_DISABLE_NVLS=1 before torch is imported, in every rank.

Next session (multi-GPU; not run yet when this was written)
----------------------------------------------------------
Ask ``status`` first; take ``nvidia-h200-x4`` (N = 1, 2, 4) if lent, else ``nvidia-h200-x2`` (the loop
skips N above the GPU count; compare then reports N = 4 as not run). diffusers is not in the device
image: carry ``.whl`` (it holds diffusers-0.42.1-py3-none-any.whl; its other needs are there). Put the
commit of the tree you send (``git rev-parse --short HEAD``, with no uncommitted edits) in place of SHA.
One ``run`` call, ``carry=[".whl"]``, ``timeout_s=600``; estimate: 1.5-5B about 6-7 s a step on one
GPU, each run 2 warm-up + 3 timed (+ a2a + profile steps for N > 1) plus about 20 s of import and
build, so about 4-5 minutes in all; each torchrun is capped at 180 s::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 COGVIDEOX_KERNELS_COMMIT=SHA; nvidia-smi topo -m > $OUT/topo.txt 2>&1; G=$(nvidia-smi -L | wc -l); B=benchmarks/bench_parallel.py; R=/tmp/cp; for p in 1.5-5b 5b; do for n in 1 2 4; do [ $n -le $G ] || continue; timeout 180 python3 -m torch.distributed.run --standalone --nproc-per-node $n $B --preset $p --out $R/${p}_n$n --save-output >> $OUT/log.txt 2>&1; done; python3 $B --compare $R/${p}_n1 $R/${p}_n2 $R/${p}_n4 --out $OUT >> $OUT/log.txt 2>&1; done; grep -h "^|" $OUT/compare_*.md; tail -n 30 $OUT/log.txt

What comes back: topo.txt, log.txt, compare_1.5-5b.{json,md}, compare_5b.{json,md} (6 files; the
compare JSONs embed every run's full result.json, the .md is the table). The outputs (.pt, 23 MB for
1.5-5B) stay in /tmp/cp on the machine: they are over the 16 MiB a returned file may have, and the
compare has already used them. If time is short, run the 1.5-5B loop alone first. A smoke test first,
if in doubt (about a minute): the same loop with ``--tiny --device cuda`` and N = 1, 2.

The bar (issue 8): for the CogVideoX1.5-5B step, speedup >= 1.8x on 2 GPUs and >= 3.4x on 4 GPUs over
one GPU, outputs equal to one GPU's within the DESIGN.md budget (rel err <= 1e-2 in bf16). The table
then goes to benchmarks/results/ with the GPU kind, versions and commit. If the bf16 rel err between
N = 1 and N > 1 is over 1e-2, rerun both with ``--dtype float32`` (more memory, fine on an H200) to
tell the Ulysses path from bf16 rounding in GEMMs of other shapes.
"""
from __future__ import annotations

import os

# NVLink multicast off, before torch (and NCCL) are imported: KINDS.md of the device tool says why.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source tree without an install
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from cogvideox_kernels.bench.common import Stopwatch, environment, profiled_kernel_ms  # noqa: E402
from cogvideox_kernels.bench.presets import MODELS  # noqa: E402


def _spec(m) -> dict:  # a model size of bench/presets.py as this script's spec (latents with 16 channels)
    t, h, w = m.latents
    return dict(model=m.diffusers_config(), batch=m.batch, text_len=m.text_len, latents=(t, 16, h, w))


PRESETS = {name: _spec(MODELS[name]) for name in ("1.5-5b", "5b")}
_TINY_COMMON = dict(num_attention_heads=6, attention_head_dim=16, num_layers=2, in_channels=4, out_channels=4,
                    time_embed_dim=24, text_embed_dim=12, patch_size=2, use_rotary_positional_embeddings=True,
                    sample_height=8, sample_width=12, max_text_seq_length=7)
TINY = {
    # 7 text + 2 x 4 x 6 = 55 tokens, 7 + 3 x 24 = 79: neither divides by 2 or 3 (uneven splits)
    "1.5-5b": dict(model=dict(_TINY_COMMON, patch_size_t=2, patch_bias=False, sample_frames=13),
                   batch=2, text_len=7, latents=(4, 4, 8, 12)),
    "5b": dict(model=dict(_TINY_COMMON, sample_frames=9), batch=2, text_len=7, latents=(3, 4, 8, 12)),
}
# issue 8's bar for the 1.5-5B step: speedup over one GPU
SPEEDUP_BAR = {"1.5-5b": {2: 1.8, 4: 3.4}}
BUDGET = {"bfloat16": 1e-2, "float16": 1e-2, "float32": 1e-5}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ------------------------------------------------------------------------------------------------
# setup


def spec_for(preset: str, tiny: bool) -> dict:
    return (TINY if tiny else PRESETS)[preset]


def tokens_of(spec) -> tuple[int, int]:
    """(text tokens, video tokens) per sample."""
    cfg = spec["model"]
    frames, _, height, width = spec["latents"]
    pt = cfg.get("patch_size_t") or 1
    p = cfg["patch_size"]
    return spec["text_len"], (frames // pt) * (height // p) * (width // p)


def init_distributed(device_type: str):
    """(rank, world, device). Under torchrun: env rendezvous; run as plain python: a 1-rank group."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench_parallel: no CUDA GPU here; use --tiny (CPU, gloo) to check the script")
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"bench_parallel: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        kwargs = dict(backend="nccl", device_id=device)
    else:
        device = torch.device("cpu")
        kwargs = dict(backend="gloo")
    if launched:
        dist.init_process_group(**kwargs)
    else:
        store = Path(tempfile.mkdtemp(prefix="bench_parallel_")) / "rendezvous"
        dist.init_process_group(init_method=f"file://{store}", rank=0, world_size=1, **kwargs)
    return dist.get_rank(), dist.get_world_size(), device


def build_model(spec, device, dtype, tiny: bool):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):  # made and initialised on the device (fast for the real sizes)
        model = CogVideoXTransformer3DModel(**spec["model"])
    if tiny:  # default init leaves parts near zero; at this size large weights make every part matter
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2, generator=g)
    return model.to(dtype).eval().requires_grad_(False)


def make_inputs(model, spec, device, dtype) -> dict:
    """The step's inputs as CogVideoXPipeline builds them (random latents and text embeddings)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg = model.config
    B = spec["batch"]
    frames, channels, height, width = spec["latents"]
    g = torch.Generator(device=device).manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(B, frames, channels, height, width, generator=g, device=device).to(dtype),
        encoder_hidden_states=torch.randn(B, spec["text_len"], cfg.text_embed_dim, generator=g,
                                          device=device).to(dtype),
        timestep=torch.full((B,), 500, dtype=torch.long, device=device), return_dict=False)
    if cfg.ofs_embed_dim:
        inputs["ofs"] = torch.full((B,), 2.0, device=device)
    if cfg.use_rotary_positional_embeddings:
        p = cfg.patch_size
        grid = (height // p, width // p)
        if cfg.patch_size_t is None:  # CogVideoX 1.0 (grid == the sample grid here: crop = whole grid)
            rope = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=((0, 0), grid),
                                           grid_size=grid, temporal_size=frames, device=device)
        else:  # CogVideoX 1.5
            rope = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=grid,
                                           temporal_size=(frames + cfg.patch_size_t - 1) // cfg.patch_size_t,
                                           grid_type="slice",
                                           max_size=(cfg.sample_height // p, cfg.sample_width // p), device=device)
        inputs["image_rotary_emb"] = rope
    return inputs


def weights_checksum(model) -> list[float]:
    total = abs_total = 0.0
    with torch.no_grad():
        for p in model.parameters():
            total += p.sum(dtype=torch.float64).item()
            abs_total += p.abs().sum(dtype=torch.float64).item()
    return [total, abs_total]


def fingerprint(out: torch.Tensor, samples: int = 64) -> dict:
    x = out.detach().float().flatten()
    idx = torch.linspace(0, x.numel() - 1, min(samples, x.numel()), device=x.device).round().long()
    xd = x.double()
    return dict(shape=list(out.shape), dtype=str(out.dtype).replace("torch.", ""), norm=xd.norm().item(),
                mean=xd.mean().item(), abs_mean=xd.abs().mean().item(), finite=bool(torch.isfinite(x).all()),
                indices=idx.tolist(), samples=x[idx].tolist())


# ------------------------------------------------------------------------------------------------
# timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(step, device):
    """Barrier, one step, barrier: (ms of the step on this rank, output)."""
    watch = Stopwatch(device)
    dist.barrier()
    _sync(device)
    t0 = watch.mark()
    out = step()
    t1 = watch.mark()
    _sync(device)
    ms = watch.ms(t0, t1)
    dist.barrier()
    return ms, out


class A2ATimer:
    """Times every ``torch.distributed.all_to_all_single`` made inside the ``with`` (the Ulysses
    all-to-alls of cogvideox_kernels.parallel call it through the module, so the patch sees them)."""

    def __init__(self, device):
        self.watch = Stopwatch(device)
        self.pairs = []

    def __enter__(self):
        self.original = dist.all_to_all_single
        original, watch, pairs = self.original, self.watch, self.pairs

        def timed(*args, **kwargs):
            t0 = watch.mark()
            result = original(*args, **kwargs)
            pairs.append((t0, watch.mark()))
            return result

        dist.all_to_all_single = timed
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.original
        return False

    def total_ms(self) -> float:  # after a sync
        return sum(self.watch.ms(a, b) for a, b in self.pairs)


def profile_step(step, device) -> dict:
    """Kernel time of one step by torch.profiler (CUDA activity): NCCL, of which send/recv
    (all_to_all_single), and all kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ms, out = timed_step(step, device)
    del out
    nccl = a2a = total = 0.0
    for ms_k, key in profiled_kernel_ms(prof):
        total += ms_k
        name = key.lower()
        if "nccl" in name:
            nccl += ms_k
            if "sendrecv" in name or "alltoall" in name:
                a2a += ms_k
    return dict(step_ms=round(ms, 2), kernel_ms=round(total, 2), nccl_kernel_ms=round(nccl, 2),
                a2a_kernel_ms=round(a2a, 2), a2a_kernel_share=round(a2a / ms, 4) if ms else None)


# ------------------------------------------------------------------------------------------------
# environment and files


def run_environment(device) -> dict:
    """bench/common.py's environment record plus the NVLink multicast switches this script sets."""
    return dict(environment(device), nvls={k: os.environ.get(k) for k in
                                           ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")})


MD_FIELDS = ("device", "N", "preset", "tokens/sample", "ms", "peak GiB per rank", "a2a share", "a2a ms",
             "commit")


def md_row(r: dict) -> str:
    a2a = "" if r["a2a_share"] is None else f"{r['a2a_share']:.3f}"
    a2a_ms = "" if r["a2a_ms_max"] is None else f"{r['a2a_ms_max']:.1f}"
    peaks = "" if r["peak_gib_per_rank"] is None else " / ".join(f"{g:.2f}" for g in r["peak_gib_per_rank"])
    cells = [r["env"]["gpu"] or "cpu", r["world_size"], r["preset"] + (" (tiny)" if r["tiny"] else ""),
             r["tokens_per_sample"], f"{r['ms']:.1f}", peaks, a2a, a2a_ms, r["env"]["commit"]]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_header() -> list[str]:
    return ["| " + " | ".join(MD_FIELDS) + " |", "|" + " --- |" * len(MD_FIELDS)]


# ------------------------------------------------------------------------------------------------
# one run


def run(args) -> int:
    device_type = args.device if args.device != "auto" else ("cpu" if args.tiny else "cuda")
    dtype_name = args.dtype or ("float32" if device_type == "cpu" else "bfloat16")
    dtype = DTYPES[dtype_name]
    spec = spec_for(args.preset, args.tiny)
    rank, world, device = init_distributed(device_type)
    try:
        rc = _run(args, spec, rank, world, device, dtype_name, dtype)
    except BaseException:
        traceback.print_exc()
        rc = 1
    # Leave without interpreter teardown: with gloo, the sub-groups that diffusers' enable_parallelism
    # creates can abort in their thread destructors at exit ("terminate called without an active
    # exception", seen here in about 1 run of 5) after the results were written. Every rank passed the
    # final barrier in _run, so nothing is left to wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _run(args, spec, rank, world, device, dtype_name, dtype) -> int:
    from diffusers import ContextParallelConfig

    from cogvideox_kernels.integrations import diffusers as integration

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 runs are true float32
    torch.backends.cudnn.allow_tf32 = False
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    out_dir = Path(args.out)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("result.json", "result.md", "output.pt"):
            (out_dir / stale).unlink(missing_ok=True)
    cfg = spec["model"]
    heads = cfg["num_attention_heads"]
    if heads % world:
        raise SystemExit(f"bench_parallel: {heads} heads do not divide by {world} ranks (Ulysses needs that)")
    notes = []

    t_build = time.perf_counter()
    model = build_model(spec, device, dtype, args.tiny)
    inputs = make_inputs(model, spec, device, dtype)
    checksum = weights_checksum(model)
    sums = [None] * world
    dist.all_gather_object(sums, checksum)
    weights_agree = all(s == sums[0] for s in sums)
    if not weights_agree:  # same seed should give the same weights; if not, rank 0's are the truth
        notes.append(f"weights differed across ranks {sums}; broadcast from rank 0")
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
        checksum = weights_checksum(model)
    integration.apply(model, backend=args.backend)
    if world > 1:
        if device.type == "cpu" and args.tiny and torch.accelerator.device_count() == 0:
            # diffusers: device = rank % torch.accelerator.device_count() -> ZeroDivisionError on a
            # CPU-only host; one "device" is the truth for CPU processes (as tests/parallel/test_parallel.py does).
            torch.accelerator.device_count = lambda: 1
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world, ulysses_anything=True))
    build_s = time.perf_counter() - t_build

    def step():
        with torch.no_grad():
            return model(**inputs)[0]

    cuda = device.type == "cuda"
    if cuda:
        _sync(device)
        torch.cuda.empty_cache()
        weights_gib = torch.cuda.memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    ms_first, out = timed_step(step, device)
    first_call_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        _, out = timed_step(step, device)
    times = []
    for _ in range(args.reps):
        del out
        ms, out = timed_step(step, device)
        times.append(ms)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    median_ms = statistics.median(times)
    fp = fingerprint(out)

    # the all-to-all share, in one more step
    a2a_ms = a2a_step_ms = None
    a2a_calls = 0
    if world > 1 and not args.no_a2a:
        del out
        with A2ATimer(device) as a2a:
            a2a_step_ms, out = timed_step(step, device)
        a2a_ms, a2a_calls = a2a.total_ms(), len(a2a.pairs)
        if fingerprint(out) != fp:
            notes.append("the a2a-timed step's output differs from the timed steps' (non-deterministic?)")
    profile = None
    if cuda and world > 1 and not args.no_profile:
        if rank == 0:
            try:
                profile = profile_step(step, device)
            except Exception as exc:  # noqa: BLE001 - the other figures still count
                traceback.print_exc()
                profile = dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
        else:
            timed_step(step, device)  # the same step on the other ranks (collectives need every rank)

    per_rank = dict(ms=median_ms, reps=times, first_ms=ms_first, peak_gib=peak_gib, a2a_ms=a2a_ms,
                    a2a_step_ms=a2a_step_ms, a2a_calls=a2a_calls, fingerprint=fp)
    gathered = [None] * world
    dist.all_gather_object(gathered, per_rank)
    if rank == 0:
        text_len, video = tokens_of(spec)
        shares = [None if g["a2a_ms"] is None else g["a2a_ms"] / g["a2a_step_ms"] for g in gathered]
        result = dict(
            preset=args.preset, tiny=args.tiny, world_size=world, device_type=device.type, dtype=dtype_name,
            backend=args.backend, num_layers=cfg["num_layers"], heads=heads, head_dim=cfg["attention_head_dim"],
            batch=spec["batch"], latents=list(spec["latents"]), text_tokens=text_len, video_tokens=video,
            tokens_per_sample=text_len + video, warmup=args.warmup, reps=args.reps,
            ms=round(max(g["ms"] for g in gathered), 3), ms_per_rank=[round(g["ms"], 3) for g in gathered],
            ms_reps_rank0=[round(t, 3) for t in times], first_call_s=round(first_call_s, 2),
            build_s=round(build_s, 2),
            weights_gib=round(weights_gib, 3) if cuda else None,
            peak_gib_per_rank=[round(g["peak_gib"], 3) for g in gathered] if cuda else None,
            a2a_calls=gathered[0]["a2a_calls"],
            a2a_ms_per_rank=None if a2a_ms is None else [round(g["a2a_ms"], 3) for g in gathered],
            a2a_ms_max=None if a2a_ms is None else round(max(g["a2a_ms"] for g in gathered), 3),
            a2a_step_ms_per_rank=None if a2a_ms is None else [round(g["a2a_step_ms"], 3) for g in gathered],
            a2a_share_per_rank=None if a2a_ms is None else [round(s, 4) for s in shares],
            a2a_share=None if a2a_ms is None else round(max(shares), 4),
            profile=profile, fingerprint=fp, ranks_identical=all(g["fingerprint"] == fp for g in gathered),
            weights_checksum=checksum, weights_agree=weights_agree, output_file=None, notes=notes,
            env=run_environment(device))
        if args.save_output:
            torch.save(out.detach().cpu().contiguous(), out_dir / "output.pt")
            result["output_file"] = "output.pt"
        (out_dir / "result.json").write_text(json.dumps(result, indent=1))
        title = f"# bench_parallel: {result['preset']}{' (tiny)' if args.tiny else ''}, N = {world}"
        (out_dir / "result.md").write_text("\n".join([title, ""] + md_header() + [md_row(result)]) + "\n")
        print(md_row(result), flush=True)
        print(f"bench_parallel: wrote {out_dir / 'result.json'}", flush=True)
    dist.barrier()
    return 0


# ------------------------------------------------------------------------------------------------
# compare


def _load(path: Path) -> tuple[dict, Path]:
    f = path / "result.json" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no result.json (the run did not finish?)")
    return json.loads(f.read_text()), f.parent


def _rel(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom else float("inf")


def compare(paths, out=None, budget=None) -> int:
    try:
        base, base_dir = _load(Path(paths[0]))
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"bench_parallel --compare: the base run: {exc}", file=sys.stderr)
        return 2
    others, missing = [], []
    for p in paths[1:]:  # a run that did not finish (or a world size the machine lacks) is reported, not fatal
        try:
            others.append(_load(Path(p)))
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            print(f"bench_parallel --compare: skipped {p}: {exc}", file=sys.stderr)
            missing.append(f"{p}: {exc}")
    budget = budget if budget is not None else BUDGET.get(base["dtype"], 1e-2)
    rows, failed = [], False
    base_out = None
    if base.get("output_file") and (base_dir / base["output_file"]).is_file():
        base_out = torch.load(base_dir / base["output_file"]).double()
    for other, other_dir in others:
        row = dict(preset=other["preset"], tiny=other["tiny"], world_size=other["world_size"], ms=other["ms"],
                   base_ms=base["ms"], speedup=round(base["ms"] / other["ms"], 3) if other["ms"] else None,
                   peak_gib_per_rank=other["peak_gib_per_rank"], a2a_share=other["a2a_share"],
                   a2a_ms_max=other["a2a_ms_max"], budget=budget, problems=[],
                   a2a_kernel_share=(other.get("profile") or {}).get("a2a_kernel_share"))
        same = [k for k in ("preset", "tiny", "dtype", "latents", "text_tokens", "num_layers") if base[k] != other[k]]
        if same:
            row["problems"].append(f"runs differ in {same}")
        if other["weights_checksum"] != base["weights_checksum"]:
            row["problems"].append(f"weights differ: checksum {other['weights_checksum']} vs "
                                   f"{base['weights_checksum']}")
        if not other["ranks_identical"]:
            row["problems"].append("ranks returned different outputs")
        fa, fb = other["fingerprint"], base["fingerprint"]
        row["fingerprint_rel_diff"] = _rel(fa["samples"], fb["samples"]) if fa["indices"] == fb["indices"] else None
        row["norm_rel_diff"] = abs(fa["norm"] - fb["norm"]) / fb["norm"] if fb["norm"] else None
        if not (fa["finite"] and fb["finite"]):
            row["problems"].append("non-finite output")
        row["rel_err"] = None
        if base_out is not None and other.get("output_file") and (other_dir / other["output_file"]).is_file():
            o = torch.load(other_dir / other["output_file"]).double()
            if o.shape == base_out.shape:
                row["rel_err"] = ((o - base_out).norm() / base_out.norm()).item()
            else:
                row["problems"].append(f"output shapes differ {tuple(o.shape)} vs {tuple(base_out.shape)}")
        check = row["rel_err"] if row["rel_err"] is not None else row["fingerprint_rel_diff"]
        row["parity_measure"] = "full output" if row["rel_err"] is not None else "fingerprint"
        row["within_budget"] = check is not None and check <= budget and not row["problems"]
        failed |= not row["within_budget"]
        bar = None if other["tiny"] else SPEEDUP_BAR.get(other["preset"], {}).get(other["world_size"])
        row["speedup_bar"] = bar
        row["meets_bar"] = None if bar is None or row["speedup"] is None else row["speedup"] >= bar
        rows.append(row)
    lines = [f"# Context parallelism (Ulysses): {base['preset']}{' (tiny)' if base['tiny'] else ''}, "
             f"{base['env']['gpu'] or 'cpu'}", "",
             f"torch {base['env']['torch']}, diffusers {base['env']['diffusers']}, triton {base['env']['triton']}, "
             f"NCCL {base['env']['nccl']}, commit {base['env']['commit']}, {base['env']['date']}. One step, B = "
             f"{base['batch']}, {base['tokens_per_sample']} tokens per sample, {base['dtype']}, random weights. "
             f"ms = slowest rank's median of {base['reps']} steps; rel err vs N = 1 ({base['dtype']} budget "
             f"{budget:g}).", "",
             "| N | ms | speedup | bar | peak GiB per rank | a2a share | a2a kernel share (profiler, rank 0) "
             "| rel err vs N=1 | within budget | problems |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    peaks = lambda p: "" if p is None else " / ".join(f"{g:.2f}" for g in p)  # noqa: E731
    lines.append(f"| 1 | {base['ms']:.1f} | 1.00 | | {peaks(base['peak_gib_per_rank'])} | | | | | |")
    for r in rows:
        err = r["rel_err"] if r["rel_err"] is not None else r["fingerprint_rel_diff"]
        err_s = "" if err is None else f"{err:.3e}" + ("" if r["rel_err"] is not None else " (fingerprint)")
        bar = "" if r["speedup_bar"] is None else f">= {r['speedup_bar']} ({'met' if r['meets_bar'] else 'MISSED'})"
        share = "" if r["a2a_share"] is None else f"{r['a2a_share']:.3f}"
        kshare = "" if r["a2a_kernel_share"] is None else f"{r['a2a_kernel_share']:.3f}"
        lines.append(f"| {r['world_size']} | {r['ms']:.1f} | {r['speedup']:.2f} | {bar} | "
                     f"{peaks(r['peak_gib_per_rank'])}"
                     f" | {share} | {kshare} | {err_s} | {'yes' if r['within_budget'] else 'NO'} | {'; '.join(r['problems'])} |")
    lines += [f"| - | | | | | | | | | not run: {m} |" for m in missing]
    failed |= bool(missing)
    print("\n".join(lines))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"compare_{base['preset']}{'_tiny' if base['tiny'] else ''}"
        (out / f"{name}.json").write_text(json.dumps(dict(base=base, others=[o for o, _ in others], rows=rows,
                                                         missing=missing, failed=failed), indent=1))
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for result.json / result.md (/ output.pt); with --compare: "
                                      "where compare_<preset>.json/.md go")
    parser.add_argument("--preset", default="1.5-5b", choices=sorted(PRESETS))
    parser.add_argument("--tiny", action="store_true", help="tiny model of the preset's layout (CPU, gloo, fp32)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto: cpu with --tiny, else cuda")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                        help="apply(model, backend=...)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 with --tiny)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--save-output", action="store_true", help="rank 0 saves the full output as output.pt")
    parser.add_argument("--no-a2a", action="store_true", help="skip the all-to-all timing step")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler step (GPU, N > 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU")
    parser.add_argument("--compare", nargs="+", metavar="DIR",
                        help="BASE (N = 1) and other run folders: speedup and parity; no torchrun")
    parser.add_argument("--budget", type=float, default=None, help="parity budget for --compare")
    args = parser.parse_args(argv)
    if args.compare:
        if len(args.compare) < 2:
            parser.error("--compare needs the N = 1 run's folder and at least one other")
        return compare(args.compare, args.out, args.budget)
    if not args.out:
        parser.error("--out is required")
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 2
    if args.warmup < 1 or args.reps < 1:
        parser.error("--warmup and --reps must be >= 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
