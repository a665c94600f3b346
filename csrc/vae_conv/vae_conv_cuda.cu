// CUDA path of the fused VAE conv: GroupNorm-apply (+ spatial-norm modulation) + SiLU + causal
// (kt, 3, 3) conv + bias + residual, bf16/fp16, stride 1. Three steps on the caller's stream:
//
// 1. Statistics (only with GroupNorm): each group of x is one contiguous span; blocks reduce
//    slices of it (float per thread, shifted by the group's first element; double across the
//    block) into partial sums, a second tiny kernel turns them into the per-(b, c) coefficients
//    (a, d) of norm(v) = v * a + d.
// 2. Activation pass: reads x once, applies norm, modulation (given as scale / shift, or gathered from a
//    table of the spatial norm's (1,1,1) convs computed first at zq's resolution) and SiLU in float32, rounds once,
//    and writes act(x) channels-last [B, T, H, W, C] (the layout the tensor-core loader needs: a
//    spatially shifted window is then a set of 16-byte rows). It also writes the new cache
//    (NCTHW) and moves a given cache to channels-last. No padded copy: the temporal padding stays
//    implicit (step 3 maps padded frames to act / cache / zeros).
// 3. Implicit-GEMM conv, mma.sync m16n8k16 (fp32 accumulation), ldmatrix, a cp.async pipeline.
//    A block owns 128 output channels x a 16x16 pixel tile of one output frame. Per pipeline step
//    (one temporal tap dt, 16 input channels) it loads the 18x18 halo of the source frame (the
//    spatial zero padding is a zero-fill of the copy, the temporal padding a choice of source
//    frame) and the weights of the 9 spatial taps; the 9 taps are then 9 shifted ldmatrix windows
//    of the same halo (each input pixel is fetched once per step, not 9 times). Bias and residual
//    are added in the epilogue before the single rounding.
//
// Files by role: cuda_tiles.h (tile / pipeline constants, the one place they are chosen),
// cuda_prep.cuh (steps 1 and 2), cuda_conv.cuh (step 3, the MMA core), this file (launchers).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_host.cuh"
#include "vae_conv/cuda_conv.cuh"
#include "vae_conv/cuda_prep.cuh"
#include "vae_conv/cuda_tiles.h"
#include "vae_conv/vae_conv.h"

namespace cvk {
namespace vae {
namespace {

#define VAE_CUDA_CHECK(expr) CVK_CHECK_CUDA("vae_conv3d_cuda", expr)

int device_max_smem(int device) {
  int v = 0;
  VAE_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return v;
}

using cvk::DeviceGuard;

void invalid(const std::string& what) { throw std::invalid_argument("vae_conv3d_cuda: " + what); }

template <typename T>
void launch_conv(const ConvArgs& c, int64_t batch, int device, cudaStream_t stream) {
  const size_t smem = size_t(kStages) * kStage * sizeof(T);
  if (smem > size_t(device_max_smem(device)))
    invalid("the conv tile needs " + std::to_string(smem) + " bytes of shared memory, more than the device allows");
  auto kernel = _vae_conv3x3_fwd_kernel<T>;
  VAE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const int64_t tiles = ((c.height + kTH - 1) / kTH) * c.tiles_w;
  const int64_t co_tiles = (c.c_out + kBM - 1) / kBM;
  if (tiles > 65535 || batch * c.frames > 65535 || co_tiles > 0x7fffffffLL)
    invalid("grid too large for this shape (H/16 * W/16 and B * T must stay <= 65535)");
  // Blocks of one pixel tile (all C_out slices) are launch neighbours: they share the halo in L2.
  dim3 grid(unsigned(co_tiles), unsigned(tiles), unsigned(batch * c.frames));
  kernel<<<grid, kConvThreads, smem, stream>>>(c);
  VAE_CUDA_CHECK(cudaGetLastError());
}

// Step 1: GroupNorm statistics of x into ws.coef (p.groups > 0).
template <typename T>
void launch_stats(const VaeConvParams& p, const VaeConvWorkspace& ws, cudaStream_t stream) {
  const int64_t HW = p.height * p.width;
  const uintptr_t x_addr = reinterpret_cast<uintptr_t>(p.x);
  {
    const int64_t span = group_span(p.c_in, p.groups, p.frames, HW);
    int64_t chunk = (span + ws.splits - 1) / ws.splits;
    chunk = (chunk + 7) / 8 * 8;
    const int splits = int((span + chunk - 1) / chunk);  // <= ws.splits
    const int64_t groups_total = p.batch * p.groups;
    if (groups_total > 65535) invalid("B * groups must stay <= 65535");
    const T* x = static_cast<const T*>(p.x);
    const dim3 grid{unsigned(splits), unsigned(groups_total), 1u};
    if (span % 8 == 0 && x_addr % 16 == 0)
      _vae_gn_partial_kernel<T, true><<<grid, kStatThreads, 0, stream>>>(x, span, chunk, splits, ws.partial);
    else
      _vae_gn_partial_kernel<T, false><<<grid, kStatThreads, 0, stream>>>(x, span, chunk, splits, ws.partial);
    VAE_CUDA_CHECK(cudaGetLastError());
    _vae_gn_coef_kernel<T><<<unsigned(groups_total), 128, 0, stream>>>(
        x, ws.partial, splits, span, p.c_in, p.groups, static_cast<const T*>(p.norm_weight),
        static_cast<const T*>(p.norm_bias), p.eps, ws.coef);
    VAE_CUDA_CHECK(cudaGetLastError());
  }
}

template <typename T>
void run(const VaeConvParams& p, const VaeConvWorkspace& ws, int device, cudaStream_t stream) {
  if (p.kh != 3 || p.kw != 3) invalid("only kh = kw = 3 is supported (got " + std::to_string(p.kh) + "x" + std::to_string(p.kw) + ")");
  if (p.kt < 1 || p.kt > 5) invalid("kt must be in [1, 5], got " + std::to_string(p.kt));
  if (p.c_in % kCK != 0) invalid("C_in must be a multiple of 16, got " + std::to_string(p.c_in));
  if (!ws.act || (p.cache && !ws.cache_cl) || (p.groups > 0 && (!ws.partial || !ws.coef)) || (p.zq && !ws.zq_mod) ||
      ws.splits < 1)
    invalid("missing workspace");
  if (p.norm_coef && p.groups > 0) invalid("norm_coef replaces the statistics: groups must be 0");
  if (p.zq && (!p.zq_index || !p.scale_weight || !p.shift_weight || p.scale || (p.groups == 0 && !p.norm_coef)))
    invalid("zq needs zq_index, scale_weight, shift_weight and GroupNorm, and excludes scale / shift");
  if (p.groups > 0 && frames_of(p.x_tc, p.frames) != p.frames) invalid("GroupNorm statistics need x whole (x_tc == T)");
  const int64_t HW = p.height * p.width;
  const int nc = p.kt - 1;
  const uintptr_t x_addr = reinterpret_cast<uintptr_t>(p.x);
  if (p.groups > 0) launch_stats<T>(p, ws, stream);

  PrepArgs pa;
  pa.p = p;
  pa.coef = p.groups > 0 ? ws.coef : p.norm_coef;
  pa.zq_mod = static_cast<const uint32_t*>(ws.zq_mod);
  pa.act = ws.act;
  pa.cache_cl = ws.cache_cl;
  pa.frames_total = int(p.frames + (p.cache ? nc : 0));
  pa.x_tc = frames_of(p.x_tc, p.frames);
  pa.scale_tc = frames_of(p.scale_tc, p.frames);
  const int64_t prep_z = p.batch * pa.frames_total;
  const int64_t prep_y = (p.c_in + kPrepCh - 1) / kPrepCh;
  const int64_t prep_x = (HW + kPrepPx - 1) / kPrepPx;
  if (prep_z > 65535 || prep_y > 65535 || prep_x > 0x7fffffffLL) invalid("grid too large for this shape");
  const uintptr_t prep_addr = x_addr | reinterpret_cast<uintptr_t>(p.scale) | reinterpret_cast<uintptr_t>(p.shift) |
                              reinterpret_cast<uintptr_t>(p.cache) | reinterpret_cast<uintptr_t>(p.new_cache) |
                              reinterpret_cast<uintptr_t>(ws.act) | reinterpret_cast<uintptr_t>(ws.cache_cl);
  const dim3 prep_grid{unsigned(prep_x), unsigned(prep_y), unsigned(prep_z)};
  if (p.zq) {  // the modulation table first (a few MB at most)
    const int64_t n = p.zq_t * p.zq_h * p.zq_w;
    if (p.c_in > 65535 || p.batch > 65535 || HW > 0x7fffffffLL || n > 0x7fffffffLL)
      invalid("zq: C_in and B must stay <= 65535, H * W and zq's pixels below 2^31");
    const dim3 grid{unsigned((n + kZqModThreads - 1) / kZqModThreads), unsigned(p.c_in), unsigned(p.batch)};
    _vae_zq_mod_kernel<T><<<grid, kZqModThreads, 0, stream>>>(p, static_cast<uint32_t*>(ws.zq_mod));
    VAE_CUDA_CHECK(cudaGetLastError());
  }
  if (HW % 8 == 0 && p.c_in % 8 == 0 && prep_addr % 16 == 0 && p.zq)
    _vae_prep_vec_kernel<T, true><<<prep_grid, kPrepThreads, 0, stream>>>(pa);
  else if (HW % 8 == 0 && p.c_in % 8 == 0 && prep_addr % 16 == 0 && !p.zq)
    _vae_prep_vec_kernel<T, false><<<prep_grid, kPrepThreads, 0, stream>>>(pa);
  else
    _vae_prep_kernel<T><<<prep_grid, kPrepThreads, 0, stream>>>(pa);
  VAE_CUDA_CHECK(cudaGetLastError());

  ConvArgs c;
  c.act = ws.act;
  c.cache_cl = p.cache ? ws.cache_cl : nullptr;
  c.weight = p.weight;
  c.bias = p.bias;
  c.residual = p.residual;
  c.y = p.y;
  c.c_in = p.c_in;
  c.c_out = p.c_out;
  c.frames = p.frames;
  c.y_tc = frames_of(p.y_tc, p.frames);
  c.res_tc = frames_of(p.res_tc, p.frames);
  c.height = p.height;
  c.width = p.width;
  c.kt = p.kt;
  c.pad_mode = p.pad_mode;
  c.tiles_w = int((p.width + kTW - 1) / kTW);
  const uintptr_t out_addr = reinterpret_cast<uintptr_t>(p.y) | reinterpret_cast<uintptr_t>(p.residual);
  c.pair_store = (p.width % 2 == 0 && out_addr % 4 == 0) ? 1 : 0;
  if (reinterpret_cast<uintptr_t>(p.weight) % 16 != 0) invalid("the packed weight must be 16-byte aligned");
  launch_conv<T>(c, p.batch, device, stream);
}

}  // namespace

void vae_gn_coef_cuda(const VaeConvParams& p, const VaeConvWorkspace& ws, int dtype, int device,
                      std::uintptr_t stream_int) {
  DeviceGuard guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_int);
  switch (dtype) {
    case kBFloat16: launch_stats<__nv_bfloat16>(p, ws, stream); break;
    case kFloat16: launch_stats<__half>(p, ws, stream); break;
    default:
      invalid("dtype code " + std::to_string(dtype) + " is not supported (2 fp16, 3 bf16)");
  }
}

void vae_conv3d_cuda(const VaeConvParams& p, const VaeConvWorkspace& ws, int dtype, int device,
                     std::uintptr_t stream_int) {
  DeviceGuard guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_int);
  switch (dtype) {
    case kBFloat16: run<__nv_bfloat16>(p, ws, device, stream); break;
    case kFloat16: run<__half>(p, ws, device, stream); break;
    default:
      invalid("dtype code " + std::to_string(dtype) + " is not supported (2 fp16, 3 bf16)");
  }
}

}  // namespace vae
}  // namespace cvk
