// Entry points of the fused VAE conv (GroupNorm-apply + SiLU + causal (kt, kh, kw) conv + bias +
// residual). See vae_conv_index.h for what it computes.
#pragma once
#include <cstdint>

#include "vae_conv/vae_conv_index.h"

namespace cvk {
namespace vae {

// C++ CPU path: a plain loop nest (statistics and accumulation in double) for any kt >= 1, odd
// kh, kw, any channel count and every float dtype. p.weight is [C_out, C_in, kt, kh, kw].
void vae_conv3d_cpu(const VaeConvParams& p, int dtype);

// Scratch memory the caller (Python, through torch) allocates for a CUDA launch.
struct VaeConvWorkspace {
  void* act = nullptr;        // [B, T, H, W, C_in], x's dtype: act(x), channels-last
  void* cache_cl = nullptr;   // [B, kt-1, H, W, C_in] when a cache is given: the cache, channels-last
  double* partial = nullptr;  // [B * groups, splits, 2] when groups > 0: shifted sums
  float* coef = nullptr;      // [B, C_in, 2] when groups > 0: (a, d) of norm(v) = v * a + d
  void* zq_mod = nullptr;     // [B, C_in, zq_t, zq_h, zq_w, 2], x's dtype, when zq is given: (scale, shift)
  int splits = 1;             // blocks per group of the statistics pass
};

// CUDA path (bf16/fp16, kh = kw = 3, kt in 1..5, C_in % 16 == 0, stride 1): statistics, the
// activation pass (norm, modulation, SiLU; to channels-last; new cache), then the implicit-GEMM
// conv on the tensor cores. p.weight is packed [C_out, kt, C_in/16, 9, 16]. Launches on `stream`
// (a cudaStream_t as an integer) of device `device`.
void vae_conv3d_cuda(const VaeConvParams& p, const VaeConvWorkspace& ws, int dtype, int device,
                     std::uintptr_t stream);

// The statistics pass alone: GroupNorm coefficients of x (p.x, sizes, groups, eps, norm_weight,
// norm_bias) into ws.coef [B, C_in, 2], through ws.partial; the input of p.norm_coef.
void vae_gn_coef_cuda(const VaeConvParams& p, const VaeConvWorkspace& ws, int dtype, int device,
                      std::uintptr_t stream);

}  // namespace vae
}  // namespace cvk
