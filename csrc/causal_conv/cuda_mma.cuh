// Tensor-core building blocks of the causal conv kernels: the shared sm_80 helpers
// (common/mma_sm80.cuh: cp.async, ldmatrix, mma.sync m16n8k16 with fp32 accumulation, 16-bit
// conversions) under the names these kernels use, and the launchers' CUDA error check.
// Included once, by causal_conv_cuda.cu.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/cuda_host.cuh"
#include "common/mma_sm80.cuh"

namespace cvk {
namespace {

#define CVK_CUDA_CHECK(expr) CVK_CHECK_CUDA("causal_conv3d_cuda", expr)

using sm80::cp_async_16;
using sm80::cp_async_commit;
using sm80::cp_async_wait;
using sm80::cp_async_wait_dyn;
using sm80::from_float;
using sm80::ldmatrix_x4;
using sm80::ldmatrix_x4_trans;
using sm80::pack2;
using sm80::smem_addr;
using sm80::to_float;
template <typename T>
using MmaOp = sm80::Mma16816<T>;

}  // namespace
}  // namespace cvk
