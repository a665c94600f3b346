// Entry points of the causal temporal convolution (kh = kw = 1). See causal_conv_index.h.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "causal_conv/causal_conv_index.h"

namespace cvk {

// C++ CPU path: a straightforward loop nest; fp32/fp64 accumulate in double, fp16/bf16 in float.
void causal_conv3d_cpu(const CausalConvParams& p, int dtype);

// CUDA path: launches on `stream` (a cudaStream_t as an integer) of device `device`.
// variant 0 picks a tile configuration; 1.. force one (see causal_conv_cuda_variants()).
void causal_conv3d_cuda(const CausalConvParams& p, int dtype, int device, std::uintptr_t stream,
                        int variant);
std::vector<std::string> causal_conv_cuda_variants();

}  // namespace cvk
