// Entry points of the causal temporal convolution (kh = kw = 1). See causal_conv_index.h.
#pragma once
#include <cstdint>

#include "causal_conv/causal_conv_index.h"

namespace cvk {

// C++ CPU path: a straightforward loop nest; fp32/fp64 accumulate in double, fp16/bf16 in float.
void causal_conv3d_cpu(const CausalConvParams& p, int dtype);

// CUDA path: launches on `stream` (a cudaStream_t as an integer) of device `device` the kernel
// choose_cuda_kernel (cuda_tiles.h) picks; the tap-major kernel reads p.weight_packed.
void causal_conv3d_cuda(const CausalConvParams& p, int dtype, int device, std::uintptr_t stream);
// The device's opt-in shared memory per block (what choose_cuda_kernel needs).
int causal_conv3d_cuda_max_smem(int device);

}  // namespace cvk
