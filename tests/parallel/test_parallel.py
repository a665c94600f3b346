"""Ulysses context parallelism (``cogvideox_kernels.parallel``) on CPU: 2 and 3 processes spawned with
``torch.multiprocessing``, the gloo backend, a ``file://`` rendezvous in the test's tmp dir (no ports,
so parallel pytest workers never collide). Each rank compares its result with the single-process
result it computes itself on the same seeded inputs."""
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cogvideox_kernels.models.transformer import build_transformer
from cogvideox_kernels.ops import rope3d_attention
from cogvideox_kernels.ops.rope import rope3d_freqs
from cogvideox_kernels.parallel import (disable_context_parallel, enable_context_parallel, gather_sequence,
                                        sequence_split_sizes, shard_sequence, ulysses_rope3d_attention)
from helpers import rel_err


def _poison_empty():
    # As tests/conftest.py does in the main process: fresh float buffers start as NaN, so an element
    # a collective or kernel never writes fails the comparison.
    real_empty, real_like = torch.empty, torch.empty_like

    def poisoned(t):
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: poisoned(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poisoned(real_like(*a, **k))


def _worker(rank, world, init_file, cases, result_dir):
    torch.set_num_threads(1)
    _poison_empty()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for case in cases:
            CASES[case](rank, world)
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(world, cases, tmp_path):
    """Run CASES[case](rank, world) for each case on ``world`` gloo processes (one spawn: starting
    processes costs more than the cases); fail with the failing ranks' tracebacks."""
    init_file = tmp_path / "rendezvous"
    try:
        mp.start_processes(_worker, args=(world, str(init_file), list(cases), str(tmp_path)), nprocs=world,
                           join=True, start_method="spawn")
    except Exception as exc:  # show the failing rank's own traceback
        errors = sorted(tmp_path.glob("rank*.err"))
        raise AssertionError("\n".join(p.read_text() for p in errors) or str(exc)) from None


# ---------------------------------------------------------------- cases run inside each rank

def _qkv(B, S, H, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, H, D, generator=g) for _ in range(3)]


def _tables(S, text_len, D):
    # Real interleaved RoPE3D tables for a video grid of S - text_len tokens (T x 1 x 1 here),
    # perturbed so every position differs.
    n = S - text_len
    sin, cos = rope3d_freqs(max(n, 1), 1, 1, hidden_size=D, num_heads=1)
    return cos[:n].contiguous(), sin[:n].contiguous()


def _norms(D, seed):
    g = torch.Generator().manual_seed(seed)
    return [(1 + 0.3 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g)) for _ in range(2)]


def case_attention(rank, world):
    """Ulysses output == single-process output: even/uneven S, text inside rank 0 / spanning ranks /
    absent / everything, with and without RoPE and QK-norm, heads = world and 2 * world."""
    D = 8
    checked = 0
    for S in (12, 13, 4 * world + 1):
        for text_len in sorted({0, 5, S // world + 2, S}):
            for rope in (True, False):
                for norms in (True, False):
                    for H in (world, 2 * world):
                        seed = S * 1000 + text_len * 10 + H
                        q, k, v = _qkv(2, S, H, D, seed)
                        cos, sin = _tables(S, text_len, D) if rope else (None, None)
                        q_norm, k_norm = _norms(D, seed) if norms else (None, None)
                        kw = dict(text_len=text_len, cos=cos, sin=sin, q_norm=q_norm, k_norm=k_norm, eps=1e-6)
                        ref = rope3d_attention(q, k, v, backend="reference", **kw)
                        local = [shard_sequence(t, None) for t in (q, k, v)]
                        out = ulysses_rope3d_attention(*local, backend="reference", **kw)
                        lens = sequence_split_sizes(S, world)
                        start = sum(lens[:rank])
                        assert out.shape == (2, lens[rank], H, D)
                        err = rel_err(out, ref[:, start:start + lens[rank]])
                        assert err <= 1e-5, (S, text_len, rope, norms, H, err)
                        # explicit per-rank lengths give the same; the gathered output is the full one
                        out2 = ulysses_rope3d_attention(*local, backend="reference", seq_lens=lens, **kw)
                        assert torch.equal(out, out2)
                        assert rel_err(gather_sequence(out, None), ref) <= 1e-5
                        checked += 1
    assert checked > 50
    # each rank holding [its text slice ; its video slice] (diffusers' layout): text_lens/seq_lens
    S, H, text_len = 17, 2 * world, 7
    q, k, v = _qkv(2, S, H, D, 99)
    cos, sin = _tables(S, text_len, D)
    q_norm, k_norm = _norms(D, 99)
    kw = dict(text_len=text_len, cos=cos, sin=sin, q_norm=q_norm, k_norm=k_norm)
    ref = rope3d_attention(q, k, v, backend="reference", **kw)
    text_lens = sequence_split_sizes(text_len, world)
    video_lens = sequence_split_sizes(S - text_len, world)
    local = [torch.cat((shard_sequence(t[:, :text_len], None), shard_sequence(t[:, text_len:], None)), 1)
             for t in (q, k, v)]
    out = ulysses_rope3d_attention(*local, backend="reference", text_lens=text_lens,
                                   seq_lens=[a + b for a, b in zip(text_lens, video_lens)], **kw)
    t0, v0 = sum(text_lens[:rank]), text_len + sum(video_lens[:rank])
    expected = torch.cat((ref[:, t0:t0 + text_lens[rank]], ref[:, v0:v0 + video_lens[rank]]), 1)
    assert rel_err(out, expected) <= 1e-5
    # bf16 (the real dtype) through the same path: within the DESIGN.md budget of a float32 reference
    S, H = 13, 2 * world
    q, k, v = _qkv(1, S, H, D, 5)
    cos, sin = _tables(S, 4, D)
    ref = rope3d_attention(q, k, v, text_len=4, cos=cos, sin=sin, backend="reference")
    local = [shard_sequence(t.bfloat16(), None) for t in (q, k, v)]
    out = ulysses_rope3d_attention(*local, text_len=4, cos=cos, sin=sin, backend="reference")
    assert out.dtype == torch.bfloat16 and rel_err(gather_sequence(out, None), ref) <= 1e-2
    # strided q/k/v views of one QKV tensor, as the model passes them
    S, H = 11, 2 * world
    qkv = torch.randn(1, S, 3, H, D, generator=torch.Generator().manual_seed(7))
    q, k, v = qkv.unbind(2)
    cos, sin = _tables(S, 3, D)
    ref = rope3d_attention(q, k, v, text_len=3, cos=cos, sin=sin, backend="reference")
    local = shard_sequence(qkv, None).unbind(2)
    out = ulysses_rope3d_attention(*local, text_len=3, cos=cos, sin=sin, backend="reference")
    assert rel_err(gather_sequence(out, None), ref) <= 1e-5
    # precision="int8": each rank quantizes all tokens of its heads, as one process does
    ref8 = rope3d_attention(q, k, v, text_len=3, cos=cos, sin=sin, backend="reference", precision="int8")
    out8 = ulysses_rope3d_attention(*local, text_len=3, cos=cos, sin=sin, backend="reference",
                                    precision="int8")
    assert rel_err(gather_sequence(out8, None), ref8) <= 1e-5 and rel_err(ref8, ref) > 1e-4


def case_errors(rank, world):
    """Clear errors, raised the same way on every rank before any collective."""
    D = 8
    S = 2 * world + 1
    q, k, v = _qkv(1, S, world + 1, D, 0)  # heads not divisible by the world size
    local = [shard_sequence(t, None) for t in (q, k, v)]
    with pytest.raises(ValueError, match=rf"heads={world + 1} .*not divisible.*world size {world}"):
        ulysses_rope3d_attention(*local, text_len=0)
    q, k, v = _qkv(1, S, world, D, 0)
    local = [shard_sequence(t, None) for t in (q, k, v)]
    wrong = [n + 1 for n in sequence_split_sizes(S, world)]  # every rank's own entry is wrong
    with pytest.raises(ValueError, match=r"S_local=\d+ tokens .* seq_lens="):
        ulysses_rope3d_attention(*local, text_len=0, seq_lens=wrong)
    with pytest.raises(ValueError, match="at least one token per rank"):
        shard_sequence(torch.randn(1, world - 1, 2), None)
    # tables of another length than the global sequence: the op's own check, on the gathered sequence
    cos, sin = _tables(S + 1, 0, D)
    with pytest.raises(ValueError, match="cos must have shape"):
        ulysses_rope3d_attention(*local, text_len=0, cos=cos, sin=sin, seq_lens=sequence_split_sizes(S, world))
    with pytest.raises(ValueError, match="text_lens"):
        ulysses_rope3d_attention(*local, text_len=1, text_lens=[1] + [0] * (world - 1))
    with pytest.raises(ValueError, match="text_lens"):
        ulysses_rope3d_attention(*local, text_len=1, text_lens=[0] * world, seq_lens=sequence_split_sizes(S, world))
    # still in step after the errors: a normal call works
    out = ulysses_rope3d_attention(*local, text_len=1)
    ref = rope3d_attention(q, k, v, text_len=1)
    lens = sequence_split_sizes(S, world)
    assert rel_err(out, ref[:, sum(lens[:rank]):sum(lens[:rank + 1])]) <= 1e-5


TINY = dict(hidden_size=48, num_heads=6, num_layers=2, num_frames=9, text_hidden_size=20, latent_channels=4,
            time_embed_dim=24, sample_height=4, sample_width=6, mlp_ratio=2.0)


def _model_case(rank, world, backend):
    torch.manual_seed(0)  # same weights on every rank
    model = build_transformer(**TINY, backend="reference", num_video_experts=2).eval()
    g = torch.Generator().manual_seed(1)
    # 2 frames x 2 x 3 patches = 12 video tokens; text 7 spans ranks; 19 tokens divide by neither 2 nor 3
    latents = torch.randn(2, 2, 4, 4, 6, generator=g)
    text = torch.randn(2, 7, 20, generator=g)
    timestep = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        ref = model(latents, text, timestep)
        model.backend = backend
        with enable_context_parallel(model) as handle:
            assert handle.state.seq_lens is None
            out = model(latents, text, timestep)
            again = model(latents, text, timestep)  # a second forward with the same hooks
        assert rel_err(out, ref) <= 1e-5
        assert torch.equal(out, again)
        # removed: the single-process model again, every rank the same (forwards never replaced)
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert all(m.attention is rope3d_attention for m in model.modules() if hasattr(m, "attention"))
        model.backend = "reference"
        assert torch.equal(model(latents, text, timestep), ref)
        # text only in rank 0's slice (text 1) and a plain enable/disable pair
        handle = enable_context_parallel(model)
        with pytest.raises(ValueError, match="already enabled"):
            enable_context_parallel(model)
        short = text[:, :1]
        out = model(latents, short, timestep)
        disable_context_parallel(model)
        assert rel_err(out, model(latents, short, timestep)) <= 1e-5


def case_model_reference(rank, world):
    _model_case(rank, world, "reference")


def case_model_triton(rank, world):
    _model_case(rank, world, "triton")


def case_model_errors(rank, world):
    torch.manual_seed(0)
    model = build_transformer(**{**TINY, "num_heads": 4}, backend="reference")
    if 4 % world:
        with pytest.raises(ValueError, match=rf"num_heads=4 is not divisible .* world size {world}"):
            enable_context_parallel(model)
    with pytest.raises(TypeError, match="CogVideoXTransformer"):
        enable_context_parallel(torch.nn.Linear(2, 2))


def _diffusers_model(name, heads, seed=0):
    from diffusers import CogVideoXTransformer3DModel

    config = {"2b": dict(attention_head_dim=40, use_rotary_positional_embeddings=False),
              "5b": dict(attention_head_dim=16, use_rotary_positional_embeddings=True),
              "1.5-5b": dict(attention_head_dim=16, use_rotary_positional_embeddings=True, patch_size_t=2,
                             ofs_embed_dim=24)}[name]
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(num_attention_heads=heads, in_channels=4, out_channels=4, time_embed_dim=24,
                                        text_embed_dim=12, num_layers=2, sample_width=6, sample_height=4,
                                        sample_frames=13, patch_size=2, max_text_seq_length=7, **config).eval()
    with torch.no_grad():  # random weights large enough that every part matters
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _diffusers_inputs(model, frames=4, text_len=7, seed=1):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    inputs = dict(hidden_states=torch.randn(2, frames, 4, 4, 6, generator=g),
                  encoder_hidden_states=torch.randn(2, text_len, 12, generator=g),
                  timestep=torch.tensor([10, 700]), return_dict=False)
    if cfg.ofs_embed_dim:
        inputs["ofs"] = torch.full((2,), 2.0)
    if cfg.use_rotary_positional_embeddings:
        grid = (2, 3)
        if cfg.patch_size_t is None:  # as CogVideoXPipeline builds them
            rope = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=((0, 0), grid),
                                           grid_size=grid, temporal_size=frames)
        else:
            rope = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=grid,
                                           temporal_size=(frames + 1) // 2, grid_type="slice", max_size=grid)
        inputs["image_rotary_emb"] = rope
    return inputs


def case_diffusers(rank, world):
    """diffusers' enable_parallelism(ContextParallelConfig(ulysses_degree=world)) with our processor ==
    diffusers' own single-process output, for the 2B (no RoPE), 5B and 1.5-5B layouts."""
    from diffusers import ContextParallelConfig

    from cogvideox_kernels.integrations import diffusers as integration

    # diffusers picks its device as rank % torch.accelerator.device_count(), which is 0 on a CPU-only
    # host (ZeroDivisionError); one "device" is the truth for CPU processes.
    torch.accelerator.device_count = lambda: 1
    calls = []  # (local tokens, text_len) of each Ulysses call our processor makes

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], kw["text_len"]))
        return ulysses_rope3d_attention(q, k, v, **kw)

    integration.ulysses_rope3d_attention = spy
    for name in ("2b", "5b", "1.5-5b"):
        model = _diffusers_model(name, heads=2 * world)
        inputs = _diffusers_inputs(model)
        calls.clear()
        with torch.no_grad():
            ref = model(**inputs)[0]
            integration.apply(model, backend="reference")
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world, ulysses_anything=True))
            out = model(**inputs)[0]
            assert out.shape == ref.shape
            # every block's attention went through Ulysses with this rank's share of the 7 + 24 tokens
            frames = 2 if name == "1.5-5b" else 4
            assert calls == [(sequence_split_sizes(7, world)[rank] + sequence_split_sizes(frames * 6, world)[rank],
                              7)] * 2, calls
            calls.clear()
            assert rel_err(out, ref) <= 1e-5, name
            # another frame count (and, with RoPE, text length) in the same model; 2B's sin-cos positions
            # need the full max_text_seq_length
            other = _diffusers_inputs(model, frames=2, text_len=7 if name == "2b" else world + 1, seed=3)
            out = model(**other)[0]
        with pytest.raises(ValueError, match="context-parallel"):
            integration.remove(model)
        # the same inputs without context parallelism, on a fresh copy of the weights
        single = _diffusers_model(name, heads=2 * world)
        with torch.no_grad():
            assert rel_err(out, single(**other)[0]) <= 1e-5, name


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


# ---------------------------------------------------------------- the tests


def test_split_sizes_follow_tensor_split():
    for S in range(0, 9):
        for world in (1, 2, 3, 4):
            sizes = sequence_split_sizes(S, world)
            assert sizes == [t.shape[0] for t in torch.arange(S).tensor_split(world)]
    with pytest.raises(ValueError, match="world_size=0"):
        sequence_split_sizes(4, 0)


def test_needs_an_initialised_group():
    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_sequence(torch.zeros(1, 4, 2), None)


@pytest.mark.parametrize("world", [2, 3])
def test_ulysses_attention_equals_single_process_and_errors(world, tmp_path):
    spawn(world, ["attention", "errors"], tmp_path)


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_model_context_parallel_equals_single_process(world, tmp_path):
    spawn(world, ["model_reference", "model_errors"], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_model_context_parallel_triton(world, tmp_path, interpret):
    spawn(world, ["model_triton"], tmp_path)


@pytest.mark.slow
def test_diffusers_enable_parallelism_hosts_our_processor(tmp_path):
    pytest.importorskip("diffusers")
    spawn(2, ["diffusers"], tmp_path)
