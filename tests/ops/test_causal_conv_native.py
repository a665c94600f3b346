"""The extension's causal temporal conv (C++ CPU path in CI, CUDA kernel on a GPU) against the
plain-PyTorch reference: odd channel counts and frame sizes, T = 1, kt 1..5, stride 1 and 2, both
pad modes, with and without bias and cache, chunked == whole, and the errors for bad input."""
import os
import shutil

import pytest
import torch

from cogvideox_kernels import _ext
from cogvideox_kernels.ops.causal_conv import causal_conv3d, causal_conv3d_reference
from helpers import rel_err

needs_ext = pytest.mark.skipif(not _ext.extension_available(),
                               reason="cogvideox_kernels._C is not built" + _ext.extension_error())

BUDGET = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make_inputs(B, C_in, C_out, T, H, W, kt, dtype, device, *, bias=True, cache=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x = rnd(B, C_in, T, H, W)
    w = rnd(C_out, C_in, kt, 1, 1) / (C_in * kt) ** 0.5
    b = rnd(C_out) if bias else None
    c = rnd(B, C_in, kt - 1, H, W) if cache else None
    return x, w, b, c


def check_against_reference(x, w, b, c, stride, pad_mode, backend, **kw):
    y, new_cache = causal_conv3d(x, w, b, stride=stride, pad_mode=pad_mode, cache=c, backend=backend, **kw)
    ref, ref_cache = causal_conv3d_reference(x, w, b, stride=stride, pad_mode=pad_mode, cache=c,
                                             compute_dtype=torch.float64)
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = rel_err(y, ref)
    assert err <= BUDGET[x.dtype], f"rel err {err:.2e} > {BUDGET[x.dtype]:.0e}"
    if x.dtype in (torch.bfloat16, torch.float16):
        # never more than 2x the error of PyTorch's own same-dtype conv
        own, _ = causal_conv3d_reference(x, w, b, stride=stride, pad_mode=pad_mode, cache=c,
                                         compute_dtype=x.dtype)
        assert err <= 2 * rel_err(own, ref) + 1e-6, f"rel err {err:.2e} vs torch's own {rel_err(own, ref):.2e}"
    assert torch.equal(new_cache, ref_cache)
    return err


def test_extension_is_built():
    """The tests below skip without the extension; this one says that it is missing (a broken build
    must not pass as a clean run)."""
    assert _ext.extension_available(), "cogvideox_kernels._C is not built" + _ext.extension_error()


# ------------------------------------------------------------------------------------------------
# CPU (CI): the C++ path
# ------------------------------------------------------------------------------------------------
CHANNELS = [(3, 5), (5, 3), (17, 17)]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pad_mode", ["replicate", "zeros"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kt", [1, 2, 3, 4, 5])
def test_cpp_matches_reference(kt, stride, pad_mode, dtype):
    case = kt * 4 + stride * 2 + (pad_mode == "zeros")
    C_in, C_out = CHANNELS[case % 3]
    T = (5, 6, 9)[case % 3]
    x, w, b, c = make_inputs(2, C_in, C_out, T, 5, 7, kt, dtype, "cpu", bias=case % 2 == 0,
                             cache=(case // 2) % 2 == 1 and kt > 1, seed=case)
    check_against_reference(x, w, b, c, stride, pad_mode, "cpp")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kt", [1, 3, 5])
def test_cpp_single_frame_and_dtypes(kt, dtype):
    x, w, b, c = make_inputs(1, 17, 5, 1, 3, 5, kt, dtype, "cpu", seed=kt)
    for stride in (1, 2):
        check_against_reference(x, w, b, None, stride, "replicate", "cpp")
        check_against_reference(x, w, b, c, stride, "zeros", "cpp")


def run_chunked(x, w, b, stride, pad_mode, lengths, backend):
    cache, outs, t0 = None, [], 0
    for n in lengths:
        y, cache = causal_conv3d(x[:, :, t0:t0 + n].contiguous(), w, b, stride=stride, pad_mode=pad_mode, cache=cache,
                                 backend=backend)
        outs.append(y)
        t0 += n
    return torch.cat(outs, dim=2), cache


@needs_ext
@pytest.mark.parametrize("stride, lengths", [(1, (3, 1, 5)), (2, (4, 2, 3)), (2, (2, 6, 1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpp_chunked_equals_whole(stride, lengths, dtype):
    x, w, b, _ = make_inputs(1, 5, 3, sum(lengths), 3, 5, 3, dtype, "cpu", seed=11)
    whole, whole_cache = causal_conv3d(x, w, b, stride=stride, backend="cpp")
    chunked, chunk_cache = run_chunked(x, w, b, stride, "replicate", lengths, "cpp")
    assert torch.equal(whole, chunked)
    assert torch.equal(whole_cache, chunk_cache)


@needs_ext
def test_cpp_is_what_auto_picks_on_cpu(monkeypatch):
    monkeypatch.delenv("COGVIDEOX_KERNELS_BACKEND", raising=False)
    x, w, b, _ = make_inputs(1, 3, 5, 4, 3, 5, 3, torch.float32, "cpu")
    calls = []
    import cogvideox_kernels.ops.causal_conv.native as native
    real = native._causal_conv3d_op
    monkeypatch.setattr(native, "_causal_conv3d_op", lambda *a: calls.append(a) or real(*a))
    check_against_reference(x, w, b, None, 1, "replicate", "auto")
    assert len(calls) == 1 and calls[0][6] == "cpp"


@needs_ext
def test_unsupported_kernel_falls_back_or_raises():
    x, _, _, _ = make_inputs(1, 3, 5, 4, 5, 7, 3, torch.float32, "cpu")
    w = torch.randn(5, 3, 3, 3, 3)
    y, _ = causal_conv3d(x, w, None, backend="auto")  # (3,3,3): the reference runs
    ref, _ = causal_conv3d_reference(x, w, None, compute_dtype=torch.float64)
    assert rel_err(y, ref) <= 1e-5
    with pytest.raises(ValueError, match="not supported by the native kernel"):
        causal_conv3d(x, w, None, backend="cpp")
    with pytest.raises(ValueError, match="not supported by the native kernel"):
        causal_conv3d(x, torch.randn(5, 3, 6, 1, 1), None, backend="cpp")  # kt = 6
    with pytest.raises(ValueError, match="not supported by the native kernel"):
        causal_conv3d(x, torch.randn(5, 3, 3, 1, 1), None, stride=3, backend="cpp")


@needs_ext
def test_bad_inputs_raise():
    x, w, b, c = make_inputs(1, 3, 5, 4, 5, 7, 3, torch.float32, "cpu", cache=True)
    # (views are fine: tests/ops/test_strides.py; the raw op refuses them, it reads packed memory)
    with pytest.raises(ValueError, match="x must be contiguous"):
        torch.ops.cogvideox_kernels.causal_conv3d(x.transpose(3, 4), w, b, c, 1, "replicate", "cpp")
    with pytest.raises(ValueError, match="cache must have shape"):
        causal_conv3d(x, w, b, cache=c[:, :, :1], backend="cpp")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='cuda' cannot run on cpu"):
            causal_conv3d(x, w, b, backend="cuda")
    with pytest.raises(ValueError, match="dtype"):
        causal_conv3d(x, w.double(), b, backend="cpp")


KERNEL_CHOICES = [  # (dtype, C_in, kt, stride, H*W, aligned) -> the CUDA kernel (cuda_tiles.h)
    ((torch.bfloat16, 128, 3, 1, 480 * 720, True), "ring"), ((torch.float16, 128, 3, 2, 480 * 720, True), "ring"),
    ((torch.bfloat16, 256, 3, 1, 240 * 360, True), "tapmajor"), ((torch.bfloat16, 512, 3, 2, 60 * 90, True), "tapmajor"),
    ((torch.bfloat16, 128, 1, 2, 16, True), "tapmajor"),  # the ring needs kt >= stride
    ((torch.bfloat16, 96, 5, 1, 64, True), "tapmajor"),  # weights + 5 frame slots do not fit 227 KB
    ((torch.bfloat16, 24, 3, 1, 16, True), "tapmajor"), ((torch.bfloat16, 20, 2, 1, 16, True), "streamed"),
    ((torch.bfloat16, 20, 3, 1, 16, True), "masked"),  # C_in * kt % 8 != 0
    ((torch.bfloat16, 64, 3, 1, 35, True), "masked"),  # H*W % 8 != 0
    ((torch.bfloat16, 128, 3, 1, 64, False), "masked"),  # a base not 16-byte aligned
    ((torch.float32, 128, 3, 1, 64, True), "fma"), ((torch.float64, 3, 1, 1, 5, True), "fma"),
]


@needs_ext
def test_cuda_kernel_choice_by_shape_class():
    """The one choice of CUDA kernel (csrc/causal_conv/cuda_tiles.h) for Hopper's 227 KB of shared
    memory: the measured-fastest per shape class (benchmarks/results/conv_notes.md). Pure C++: answered
    in the CPU build too."""
    from cogvideox_kernels.ops.causal_conv.native import cuda_kernel

    for (dtype, c_in, kt, stride, hw, aligned), want in KERNEL_CHOICES:
        assert cuda_kernel(dtype, c_in, kt, stride, hw, 227 * 1024, aligned) == want, (c_in, kt, stride, hw)
    assert cuda_kernel(torch.bfloat16, 128, 3, 1, 64, 100 * 1024) == "tapmajor"  # a smaller GPU: no ring


@needs_ext
def test_cuda_available_matches_build():
    flag = os.environ.get("COGVIDEOX_KERNELS_CUDA", "AUTO").upper()
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc") or os.environ.get("CUDACXX")
    assert _ext._C.cuda_available() == _ext.cuda_available()
    if flag == "OFF":
        assert not _ext.cuda_available()
    elif flag == "ON" or nvcc:
        assert _ext.cuda_available(), "nvcc is here but the extension was built without CUDA"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):  # no GPU (or no CUDA in the build): a clear error, no crash
            _ext._C.causal_conv3d_cuda(1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 8, 3, 1, 0, 3, 0, 0)
        with pytest.raises(RuntimeError):
            _ext._C.causal_conv3d_cuda_max_smem(0)


class _TemporalConv(torch.nn.Module):
    def __init__(self, C, kt, device, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(C, C, kt, 1, 1, device=device, dtype=dtype) / C)
        self.bias = torch.nn.Parameter(torch.randn(C, device=device, dtype=dtype))

    def forward(self, x, cache):
        y, new_cache = causal_conv3d(x, self.weight, self.bias, stride=1, cache=cache)
        return y * 2, new_cache


@needs_ext
def test_compile_fullgraph_cpu():
    torch._dynamo.reset()
    mod = _TemporalConv(5, 3, "cpu", torch.float32)
    x, _, _, c = make_inputs(1, 5, 5, 4, 3, 5, 3, torch.float32, "cpu", cache=True)
    with torch.no_grad():
        eager = mod(x, c)
        compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")(x, c)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


# ------------------------------------------------------------------------------------------------
# GPU: the CUDA kernel
# ------------------------------------------------------------------------------------------------
needs_cuda_ext = pytest.mark.skipif(not _ext.cuda_available(), reason="extension built without CUDA")
REAL_SHAPES = [(1, 128, 6, 480, 720), (1, 256, 6, 240, 360), (1, 512, 6, 60, 90)]


def gpu_reference(x, w, b, c, stride, pad_mode):
    """float32 reference on the GPU with TF32 off (cuDNN would use TF32 for float32 convs)."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return causal_conv3d_reference(x, w, b, stride=stride, pad_mode=pad_mode, cache=c,
                                       compute_dtype=torch.float32)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


@needs_ext
@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_real_shapes(shape, stride):
    B, C, T, H, W = shape
    x, w, b, _ = make_inputs(B, C, C, T, H, W, 3, torch.bfloat16, "cuda", seed=C)
    y, new_cache = causal_conv3d(x, w, b, stride=stride, backend="cuda")
    ref, ref_cache = gpu_reference(x, w, b, None, stride, "replicate")
    own, _ = causal_conv3d_reference(x, w, b, stride=stride, compute_dtype=torch.bfloat16)
    err, own_err = rel_err(y, ref), rel_err(own, ref)
    assert err <= 1e-2 and err <= 2 * own_err, f"rel err {err:.2e} (torch bf16 {own_err:.2e})"
    assert torch.equal(new_cache, ref_cache)


# Cases for each tensor-core kernel: (B, C_in, C_out, T, H, W, kt, stride, pad_mode, cache), all taking
# that kernel on an H100/H200 (checked against cuda_kernel before running).
KERNEL_CASES = {
    "ring": [(2, 64, 96, 5, 10, 12, 3, 1, "zeros", False), (2, 64, 96, 6, 10, 12, 3, 2, "replicate", True),
             (1, 64, 40, 1, 9, 8, 3, 1, "replicate", False), (1, 32, 64, 9, 5, 16, 4, 2, "zeros", True),
             (3, 96, 16, 4, 3, 8, 2, 1, "replicate", True), (1, 128, 128, 7, 48, 72, 3, 1, "replicate", False)],
    "tapmajor": [(1, 256, 192, 7, 24, 40, 3, 2, "replicate", True), (1, 96, 320, 7, 8, 16, 5, 1, "replicate", True),
                 (1, 16, 24, 3, 4, 6, 3, 1, "replicate", False), (2, 24, 40, 5, 16, 24, 1, 2, "zeros", False),
                 (1, 128, 64, 4, 8, 8, 1, 2, "replicate", False)],
    "streamed": [(1, 20, 48, 7, 6, 20, 2, 2, "replicate", True), (2, 12, 40, 5, 8, 8, 2, 1, "zeros", False)],
    "masked": [(2, 17, 17, 6, 9, 13, 3, 1, "replicate", True), (1, 32, 48, 7, 5, 9, 1, 2, "zeros", False),
               (1, 64, 64, 5, 5, 7, 3, 2, "replicate", True)],
}


@needs_ext
@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", list(KERNEL_CASES))
def test_cuda_each_kernel(kernel, dtype):
    """Every tensor-core kernel auto can pick, through its shape class: batches, pixel tails,
    zero/replicate/cache padding, T = 1, both strides, against a float32 reference."""
    from cogvideox_kernels.ops.causal_conv.native import _max_smem, cuda_kernel

    for i, (B, C_in, C_out, T, H, W, kt, stride, pad_mode, cache) in enumerate(KERNEL_CASES[kernel]):
        assert cuda_kernel(dtype, C_in, kt, stride, H * W, _max_smem(torch.cuda.current_device())) == kernel
        x, w, b, c = make_inputs(B, C_in, C_out, T, H, W, kt, dtype, "cuda", cache=cache, seed=100 + i)
        y, nc = causal_conv3d(x, w, b, stride=stride, pad_mode=pad_mode, cache=c, backend="cuda")
        ref, ref_cache = gpu_reference(x, w, b, c, stride, pad_mode)
        assert rel_err(y, ref) <= 1e-2, (kernel, i, rel_err(y, ref))
        assert torch.equal(nc, ref_cache)


@needs_ext
@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_unaligned_base_takes_the_masked_kernel():
    """A contiguous x whose data starts 2 bytes past a 16-byte boundary: the 16-byte kernels cannot
    load it, the masked one runs (same answer as an aligned copy)."""
    x, w, b, _ = make_inputs(1, 128, 128, 5, 8, 16, 3, torch.bfloat16, "cuda", seed=4)
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
    shifted = storage[1:].view(x.shape)
    shifted.copy_(x)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    y, nc = causal_conv3d(shifted, w, b, backend="cuda")
    want, want_cache = causal_conv3d(x, w, b, backend="cuda")  # the ring kernel
    ref, _ = gpu_reference(x, w, b, None, 1, "replicate")
    assert rel_err(y, ref) <= 1e-2 and rel_err(want, ref) <= 1e-2
    assert torch.equal(nc, want_cache)


@needs_ext
@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("kt", [1, 2, 3, 4, 5])
def test_cuda_odd_shapes(kt, dtype):
    for i, (C_in, C_out, T, H, W) in enumerate([(3, 5, 1, 5, 7), (17, 17, 6, 9, 13), (24, 40, 5, 16, 24)]):
        for stride in (1, 2):
            for pad_mode in ("replicate", "zeros"):
                x, w, b, c = make_inputs(2, C_in, C_out, T, H, W, kt, dtype, "cuda", bias=i != 1,
                                         cache=stride == 2 and kt > 1, seed=kt * 10 + i)
                y, nc = causal_conv3d(x, w, b, stride=stride, pad_mode=pad_mode, cache=c, backend="cuda")
                ref, ref_cache = causal_conv3d_reference(x, w, b, stride=stride, pad_mode=pad_mode, cache=c,
                                                         compute_dtype=torch.float64)
                err = rel_err(y, ref)
                assert err <= BUDGET[dtype], f"{(C_in, C_out, T, H, W, stride, pad_mode)}: {err:.2e}"
                assert torch.equal(nc, ref_cache)


@needs_ext
@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_matches_cpp():
    x, w, b, c = make_inputs(1, 24, 16, 5, 8, 12, 3, torch.float32, "cpu", cache=True, seed=3)
    y_cpu, nc_cpu = causal_conv3d(x, w, b, cache=c, backend="cpp")
    y_gpu, nc_gpu = causal_conv3d(x.cuda(), w.cuda(), b.cuda(), cache=c.cuda(), backend="cuda")
    assert rel_err(y_gpu.cpu(), y_cpu) <= 1e-5
    assert torch.equal(nc_gpu.cpu(), nc_cpu)


@needs_ext
@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("stride, lengths", [(1, (5, 3, 9)), (2, (4, 8, 5))])
def test_cuda_chunked_equals_whole(stride, lengths):
    x, w, b, _ = make_inputs(1, 128, 128, sum(lengths), 30, 45, 3, torch.bfloat16, "cuda", seed=5)
    whole, whole_cache = causal_conv3d(x, w, b, stride=stride, backend="cuda")
    chunked, chunk_cache = run_chunked(x, w, b, stride, "replicate", lengths, "cuda")
    assert torch.equal(whole, chunked)
    assert torch.equal(whole_cache, chunk_cache)


@needs_ext
@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_compile_fullgraph():
    torch._dynamo.reset()
    mod = _TemporalConv(64, 3, "cuda", torch.bfloat16)
    x, _, _, c = make_inputs(1, 64, 64, 5, 16, 24, 3, torch.bfloat16, "cuda", cache=True)
    with torch.no_grad():
        eager = mod(x, c)
        compiled = torch.compile(mod, fullgraph=True)(x, c)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


@needs_ext
@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_uses_current_stream():
    x, w, b, _ = make_inputs(1, 128, 128, 6, 96, 96, 3, torch.bfloat16, "cuda", seed=9)
    ref, _ = causal_conv3d(x, w, b, backend="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y, _ = causal_conv3d(x, w, b, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(y, ref)
