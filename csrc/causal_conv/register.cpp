// Python bindings of the causal temporal convolution. Tensors arrive as raw addresses (ints),
// sizes and the stream as integers; Python (ops/causal_conv/native.py) has checked them already,
// the checks here only guard against misuse of the raw binding.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "causal_conv/causal_conv.h"
#include "causal_conv/cuda_tiles.h"

namespace py = pybind11;

namespace cvk {
namespace {

CausalConvParams make_params(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias,
                             std::uintptr_t cache, std::uintptr_t y, std::uintptr_t new_cache,
                             int64_t batch, int64_t c_in, int64_t c_out, int64_t frames,
                             int64_t height, int64_t width, int kt, int stride, int pad_mode) {
  if (batch < 1 || c_in < 1 || c_out < 1 || frames < 1 || height < 1 || width < 1)
    throw std::invalid_argument("causal_conv3d: every size must be >= 1");
  if (kt < 1 || kt > 5) throw std::invalid_argument("causal_conv3d: kt=" + std::to_string(kt) +
                                                    " is not supported; kt must be in [1, 5]");
  if (stride != 1 && stride != 2)
    throw std::invalid_argument("causal_conv3d: stride=" + std::to_string(stride) +
                                " is not supported; use 1 or 2");
  if (pad_mode != kPadReplicate && pad_mode != kPadZeros)
    throw std::invalid_argument("causal_conv3d: pad_mode code must be 0 (replicate) or 1 (zeros)");
  if (!x || !weight || !y || (kt > 1 && !new_cache))
    throw std::invalid_argument("causal_conv3d: x, weight, y and new_cache need addresses");
  CausalConvParams p;
  p.x = reinterpret_cast<const void*>(x);
  p.weight = reinterpret_cast<const void*>(weight);
  p.bias = reinterpret_cast<const void*>(bias);
  p.cache = kt > 1 ? reinterpret_cast<const void*>(cache) : nullptr;
  p.y = reinterpret_cast<void*>(y);
  p.new_cache = reinterpret_cast<void*>(new_cache);
  p.batch = batch;
  p.c_in = c_in;
  p.c_out = c_out;
  p.frames = frames;
  p.hw = height * width;
  p.kt = kt;
  p.stride = stride;
  p.pad_mode = pad_mode;
  p.frames_out = causal_output_frames(frames, kt, stride);
  return p;
}

}  // namespace

#ifndef COGVIDEOX_WITH_CUDA
void causal_conv3d_cuda(const CausalConvParams&, int, int, std::uintptr_t) {
  throw std::runtime_error("causal_conv3d_cuda: the extension was built without CUDA (no nvcc)");
}
int causal_conv3d_cuda_max_smem(int) {
  throw std::runtime_error("causal_conv3d_cuda_max_smem: the extension was built without CUDA (no nvcc)");
}
#endif

void register_causal_conv(py::module_& m) {
  m.def(
      "causal_conv3d_cpu",
      [](std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t cache,
         std::uintptr_t y, std::uintptr_t new_cache, int64_t batch, int64_t c_in, int64_t c_out,
         int64_t frames, int64_t height, int64_t width, int kt, int stride, int pad_mode,
         int dtype) {
        const CausalConvParams p = make_params(x, weight, bias, cache, y, new_cache, batch, c_in,
                                               c_out, frames, height, width, kt, stride, pad_mode);
        py::gil_scoped_release release;
        causal_conv3d_cpu(p, dtype);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("cache"), py::arg("y"),
      py::arg("new_cache"), py::arg("batch"), py::arg("c_in"), py::arg("c_out"), py::arg("frames"),
      py::arg("height"), py::arg("width"), py::arg("kt"), py::arg("stride"), py::arg("pad_mode"),
      py::arg("dtype"),
      "Causal temporal conv on the CPU (contiguous tensors given by address; bias/cache 0 = none)");
  m.def(
      "causal_conv3d_cuda",
      [](std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t cache,
         std::uintptr_t y, std::uintptr_t new_cache, int64_t batch, int64_t c_in, int64_t c_out,
         int64_t frames, int64_t height, int64_t width, int kt, int stride, int pad_mode, int dtype,
         int device, std::uintptr_t stream, std::uintptr_t weight_packed) {
        CausalConvParams p = make_params(x, weight, bias, cache, y, new_cache, batch, c_in, c_out,
                                         frames, height, width, kt, stride, pad_mode);
        p.weight_packed = reinterpret_cast<const void*>(weight_packed);
        causal_conv3d_cuda(p, dtype, device, stream);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("cache"), py::arg("y"),
      py::arg("new_cache"), py::arg("batch"), py::arg("c_in"), py::arg("c_out"), py::arg("frames"),
      py::arg("height"), py::arg("width"), py::arg("kt"), py::arg("stride"), py::arg("pad_mode"),
      py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("weight_packed") = 0,
      "Causal temporal conv on a CUDA device, launched on `stream` (cudaStream_t as an int); the "
      "tap-major kernel also reads the weight repacked as [C_out, kt, C_in] (weight_packed)");
  m.def(
      "causal_conv3d_cuda_kernel",
      [](int dtype, int64_t c_in, int kt, int stride, int64_t hw, int max_smem, bool aligned) {
        const bool half = dtype == kBFloat16 || dtype == kFloat16;
        return std::string(cuda_kernel_name(choose_cuda_kernel(half, c_in, kt, stride, hw, aligned, max_smem)));
      },
      py::arg("dtype"), py::arg("c_in"), py::arg("kt"), py::arg("stride"), py::arg("hw"), py::arg("max_smem"),
      py::arg("aligned") = true,
      "The CUDA kernel causal_conv3d_cuda runs for this shape: ring, tapmajor (needs weight_packed), "
      "streamed, masked or fma (pure C++: answers without a GPU)");
  m.def("causal_conv3d_cuda_max_smem", &causal_conv3d_cuda_max_smem, py::arg("device"),
        "The device's opt-in shared memory per block, in bytes (CUDA builds only)");
}

}  // namespace cvk
