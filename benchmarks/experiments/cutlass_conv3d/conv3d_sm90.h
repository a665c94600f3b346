// Host entry of the CUTLASS sm90 implicit-GEMM conv3d experiment (issue 14). No torch here, so the
// .cu compiles with plain nvcc + the nvidia-cutlass wheel's headers; binding.cpp adds the torch side.
#pragma once

#include <cstdint>
#include <string>

namespace cutlass_conv3d {

// NDHWC activation, KTRSC filter, NZPQK output (packed), all bf16; bias bf16 [K]. Strides are in
// elements, in [n, d, h, w, c] / [k, t, r, s, c] order; the channel strides must be 1.
struct Problem {
  const void* x = nullptr;  int64_t x_stride[5] = {};
  const void* w = nullptr;  int64_t w_stride[5] = {};
  const void* bias = nullptr;
  void* y = nullptr;
  int n = 0, d = 0, h = 0, w_ = 0, c = 0;  // activation extents
  int k = 0, t = 0, r = 0, s = 0;          // filter extents (k = output channels)
  int pad_d = 0, pad_h = 0, pad_w = 0;     // symmetric zero padding (TMA im2col zero-fill)
};

// Names of the compiled configurations, index = `config` below.
int num_configs();
const char* config_name(int config);

// "dynamic smem N B, T threads, S mainloop stages" of `config` (host-side constants, no GPU needed).
std::string describe(int config);

// Runs `config` on `stream` (a cudaStream_t). Returns "" on success, else what went wrong
// (can_implement refused, a CUDA error, ...).
std::string run(int config, const Problem& p, void* stream);

}  // namespace cutlass_conv3d
