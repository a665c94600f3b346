"""COGVIDEOX_KERNELS_VAE_CONV_CUDNN_CHANNELS (integrations/diffusers/resnet.py): the ResNet convs whose input
channels it names run on vae_conv3d's "cudnn" backend (Triton pass under the interpreter here), the others on
the block's backend; still diffusers' block over its frame batches (whole and in frame chunks); off (unset, or
no conv matching) the calls and outputs are today's; read once at import, a bad value fails there by name."""
import os
import subprocess
import sys

import pytest
import torch

from cogvideox_kernels import _ext

pytest.importorskip("diffusers")
import test_vae_resnet as base  # noqa: E402  (tests/integrations: blocks and helpers)
from tiny import OpSpy, rel_err  # noqa: E402

from cogvideox_kernels.integrations.diffusers import resnet  # noqa: E402
from cogvideox_kernels.integrations.diffusers.resnet import KernelResnetForward  # noqa: E402
from cogvideox_kernels.ops.vae_conv.cudnn_route import parse_cudnn_channels  # noqa: E402

needs_ext = pytest.mark.skipif(not _ext.extension_available(), reason="cogvideox_kernels._C is not built")


def _run(block, backend, x, zq, monkeypatch, channels):
    monkeypatch.setattr(resnet, "CUDNN_CHANNELS", channels)
    spy = OpSpy(monkeypatch)
    out = base.run_batches(KernelResnetForward(block, backend), x, zq, (3, 2))
    return out, [kw["backend"] for _, kw in spy.vae_conv_calls]


def _inputs(name, seed):
    C_in, C_out, options = base.BLOCKS[name]
    block = base.make_block(C_in, C_out, seed=seed, **options)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, C_in, 5, 6, 7, generator=g) + 0.3
    zq = torch.randn(2, 4, 5, 3, 4, generator=g) if "spatial_norm_dim" in options else None
    return block, x, zq


@needs_ext
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "frame-chunks"])
@pytest.mark.parametrize("name", ["groupnorm 1x1 shortcut", "spatial norm 1x1 shortcut", "spatial norm"])
def test_switch_routes_matching_convs_to_cudnn(interpret, name, chunked, monkeypatch):
    """8 -> 12 blocks: "12" sends conv2 (12 in) to cudnn and keeps conv1 (8 in) on the C++ path; "8+" sends
    both; outputs and caches within the float32 budget of diffusers' block either way."""
    block, x, zq = _inputs(name, seed=31)
    ref = base.run_batches(block, x, zq, (3, 2))
    if chunked:
        monkeypatch.setattr(resnet, "CHUNK_ABOVE", 0)
        monkeypatch.setattr(resnet, "CHUNK_BYTES", 1)
    C_out = base.BLOCKS[name][1]
    for value in (f"{C_out}", "8+"):
        ours, backends = _run(block, "cpp", x, zq, monkeypatch, parse_cudnn_channels(value))
        calls_per_line = len(backends) // 4  # (2 batches x 2 lines; frame chunks: one call per frame)
        want = {"12": ["cpp", "cudnn"], "8": ["cudnn", "cudnn"], "8+": ["cudnn", "cudnn"]}[value]
        per_line = [backends[i * calls_per_line] for i in range(4)] if not chunked or zq is None else None
        if per_line is not None:
            assert per_line == want * 2, backends
        else:
            assert set(backends) == set(want), backends
        assert "cudnn" in backends
        for (out, cache), (ref_out, ref_cache) in zip(ours, ref):
            assert rel_err(out, ref_out) <= base.BUDGET
            for key in ("norm1", "norm2"):  # (the fused (1,1,1) convs' never-read "cache" comes back None)
                if key in ref_cache:
                    ref_cache[key] = cache[key]
            base.compare_caches(cache, ref_cache, base.BUDGET)


@needs_ext
@pytest.mark.parametrize("name", list(base.BLOCKS))
def test_switch_off_is_unchanged(interpret, name, monkeypatch):
    """Unset (no ranges), or set to channels no conv has: every call on the block's backend, outputs and caches
    bit for bit the same."""
    block, x, zq = _inputs(name, seed=41)
    off, backends_off = _run(block, "cpp", x, zq, monkeypatch, ())
    other, backends_other = _run(block, "cpp", x, zq, monkeypatch, parse_cudnn_channels("64,256+"))
    assert set(backends_off) == set(backends_other) == {"cpp"}
    for (a, ca), (b, cb) in zip(off, other):
        assert torch.equal(a, b)
        assert list(ca) == list(cb)


@needs_ext
def test_switch_without_the_interpreter_keeps_the_block_backend(monkeypatch):
    """On CPU tensors the cudnn backend needs TRITON_INTERPRET=1; without it the switch changes nothing."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    block, x, zq = _inputs("spatial norm", seed=51)
    ours, backends = _run(block, "cpp", x, zq, monkeypatch, parse_cudnn_channels("8"))
    assert set(backends) == {"cpp"}


def test_reference_backend_is_never_rerouted(monkeypatch):
    block, x, zq = _inputs("groupnorm", seed=61)
    _, backends = _run(block, "reference", x, zq, monkeypatch, parse_cudnn_channels("8"))
    assert set(backends) == {"reference"}


def _import_channels(value):
    env = dict(os.environ, COGVIDEOX_KERNELS_VAE_CONV_CUDNN_CHANNELS=value)
    if value is None:
        env.pop("COGVIDEOX_KERNELS_VAE_CONV_CUDNN_CHANNELS", None)
    code = ("from cogvideox_kernels.integrations.diffusers import resnet; "
            "print(resnet.CUDNN_CHANNELS, resnet.CUDNN_DEFAULT_CUDA)")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_switch_is_read_at_import():
    run = _import_channels(" 512, 256+")
    assert run.returncode == 0 and run.stdout.strip() == "((256, None), (512, 512)) ()", run.stderr[-2000:]
    run = _import_channels(None)  # unset: 128+ on CUDA tensors only
    assert run.returncode == 0 and run.stdout.strip() == "() ((128, None),)", run.stderr[-2000:]
    run = _import_channels("off")
    assert run.returncode == 0 and run.stdout.strip() == "() ()", run.stderr[-2000:]
    run = _import_channels("256 512")
    assert run.returncode != 0 and "COGVIDEOX_KERNELS_VAE_CONV_CUDNN_CHANNELS='256 512'" in run.stderr


def test_default_applies_on_cuda_only(monkeypatch):
    """Variable unset: CUDNN_DEFAULT_CUDA routes CUDA tensors only; CPU tensors keep the block's backend."""
    monkeypatch.setattr(resnet, "CUDNN_CHANNELS", ())
    monkeypatch.setattr(resnet, "CUDNN_DEFAULT_CUDA", parse_cudnn_channels("8+"))
    x, w = torch.randn(1, 8, 2, 4, 4), torch.randn(8, 8, 3, 3, 3)
    assert resnet._conv_backend("cpp", x, w) == "cpp"
    monkeypatch.setattr(resnet, "CUDNN_CHANNELS", parse_cudnn_channels("8+"))  # a set variable applies everywhere
    assert resnet._conv_backend("cpp", x, w) == ("cudnn" if resnet.registry.availability(
        "vae_conv3d", x.device)["cudnn"] is None else "cpp")
