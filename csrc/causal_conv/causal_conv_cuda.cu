// Launchers of the CUDA causal temporal convolution (kh = kw = 1): one entry point picks the kernel
// (cuda_tiles.h: choose_cuda_kernel), sizes its grid and launches it on the caller's stream. The
// kernels: cuda_kernels.cuh (MMA core: cuda_mma.cuh, loaders: cuda_loaders.cuh).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "causal_conv/causal_conv.h"
#include "causal_conv/cuda_kernels.cuh"
#include "causal_conv/cuda_tiles.h"

namespace cvk {
namespace {

int device_sms(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (!cached[device])
    CVK_CUDA_CHECK(cudaDeviceGetAttribute(&cached[device], cudaDevAttrMultiProcessorCount, device));
  return cached[device];
}
int device_max_smem(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 227 * 1024;
  if (!cached[device])
    CVK_CUDA_CHECK(
        cudaDeviceGetAttribute(&cached[device], cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return cached[device];
}

template <typename T, typename Cfg, bool VEC, bool TAP_MAJOR>
void launch_mma(const CausalConvParams& p, int device, cudaStream_t stream) {
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, STAGES = Cfg::kStages;
  GemmArgs g;
  g.p = p;
  g.k_total = p.c_in * p.kt;
  g.ci_chunks = (p.c_in + kBK - 1) / kBK;
  g.k_chunks = TAP_MAJOR ? p.kt * g.ci_chunks : (g.k_total + kBK - 1) / kBK;
  if (TAP_MAJOR && (p.weight_packed == nullptr || p.c_in % 8 != 0))
    throw std::invalid_argument("causal_conv3d_cuda: the tap-major kernel needs weight_packed "
                                "([C_out, kt, C_in]) and C_in % 8 == 0");
  const int64_t co_tiles = (p.c_out + BM - 1) / BM;
  g.pix_tiles = (p.hw + BN - 1) / BN;
  // Split output frames over items only as far as needed to fill the GPU (about 4 blocks per SM):
  // the longer an item's run of frames, the more of its input re-reads hit L2.
  const int sms = device_sms(device);
  const int64_t base_items = g.pix_tiles * co_tiles * p.batch;
  const int64_t want = 4 * int64_t(sms);
  int64_t splits = (want + base_items - 1) / base_items;
  splits = splits < 1 ? 1 : (splits > p.frames_out ? p.frames_out : splits);
  g.frames_per_item = (p.frames_out + splits - 1) / splits;
  g.splits = (p.frames_out + g.frames_per_item - 1) / g.frames_per_item;
  g.items = p.batch * g.pix_tiles * g.splits;
  const size_t smem = Cfg::smem_bytes();
  const int max_smem = device_max_smem(device);
  if (smem > size_t(max_smem))
    throw std::invalid_argument("causal_conv3d_cuda: tile needs " + std::to_string(smem) +
                                " bytes of shared memory, more than the device allows");
  auto kernel = _causal_conv3d_fwd_kernel<T, BM, BN, STAGES, VEC, TAP_MAJOR>;
  CVK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const int64_t blocks_x = g.items;  // one work item per block
  if (g.items > 0x7fffffffLL || p.hw >= 0x7fffffffLL || p.frames_out >= 0x7fffffffLL ||
      co_tiles > 65535)
    throw std::invalid_argument("causal_conv3d_cuda: grid too large for this shape");
  dim3 grid(unsigned(blocks_x), unsigned(co_tiles), 1);
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(g);
  CVK_CUDA_CHECK(cudaGetLastError());
}

// Frame-ring launcher. Ring slots: as many as fit next to the weights in the shared memory of a
// block, at most kt + 2 * st (more only delays the first output). choose_cuda_kernel takes the ring
// only when the weights and kt slots fit; otherwise this raises a ValueError naming shared memory.
template <typename T, typename Cfg>
void launch_ring(const CausalConvParams& p, int device, cudaStream_t stream) {
  constexpr int BM = Cfg::kBM, BN = Cfg::kBN, WM = Cfg::kWM, WN = Cfg::kWN;
  const int64_t k_total = p.c_in * p.kt;
  const size_t w_bytes = Cfg::weight_bytes(k_total);
  const size_t slot_bytes = Cfg::slot_bytes(p.c_in);
  const int max_smem = device_max_smem(device);
  const size_t budget = size_t(max_smem);  // one block per SM
  int64_t slots = w_bytes < budget ? int64_t((budget - w_bytes) / slot_bytes) : 0;
  const int64_t cap = p.kt + 2 * p.stride;
  slots = slots > cap ? cap : slots;
  if (slots < p.kt)
    throw std::invalid_argument("causal_conv3d_cuda: frame-ring tile needs " +
                                std::to_string(w_bytes + size_t(p.kt) * slot_bytes) +
                                " bytes of shared memory, more than the device allows");
  const size_t smem = w_bytes + size_t(slots) * slot_bytes;
  RingArgs r;
  r.p = p;
  r.slots = int(slots);
  const int64_t pix_tiles = (p.hw + BN - 1) / BN;
  const int64_t n_tiles = pix_tiles * p.batch;
  const int64_t co_slices = (p.c_out + BM - 1) / BM;
  if (n_tiles > 0x7fffffffLL || p.hw >= 0x7fffffffLL || p.frames_out >= 0x7fffffffLL ||
      co_slices > 0x7fffffffLL || k_total * BM >= 0x7fffffffLL)
    throw std::invalid_argument("causal_conv3d_cuda: grid too large for this shape");
  r.pix_tiles = int(pix_tiles);
  r.n_tiles = int(n_tiles);
  r.p_used = int((p.frames_out - 1) * p.stride + p.kt);
  r.dedup_front = (p.pad_mode == kPadReplicate && p.cache == nullptr) ? 1 : 0;
  auto kernel = _causal_conv3d_ring_fwd_kernel<T, BM, BN, WM, WN>;
  CVK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int per_sm = 0;
  CVK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Cfg::kThreads, smem));
  const int64_t resident = int64_t(per_sm < 1 ? 1 : per_sm) * device_sms(device);
  // Persistent: every C_out slice gets resident / co_slices tile walkers (slices of one tile are
  // neighbours in launch order, so a frame's re-read by the other slices hits L2).
  int64_t grid_y = resident / co_slices;
  grid_y = grid_y < 1 ? 1 : (grid_y > n_tiles ? n_tiles : grid_y);
  if (grid_y > 65535) grid_y = 65535;
  dim3 grid(unsigned(co_slices), unsigned(grid_y), 1);
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(r);
  CVK_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_fma(const CausalConvParams& p, cudaStream_t stream) {
  const int64_t co_tiles = (p.c_out + 63) / 64;
  const int64_t pix_tiles = (p.hw + 63) / 64;
  if (co_tiles * p.frames_out > 65535 || p.batch > 65535 || pix_tiles > 0x7fffffffLL)
    throw std::invalid_argument("causal_conv3d_cuda: grid too large for this shape");
  dim3 grid(unsigned(pix_tiles), unsigned(co_tiles * p.frames_out), unsigned(p.batch));
  _causal_conv3d_fwd_fma_kernel<T><<<grid, 256, 0, stream>>>(p, p.c_in * p.kt);
  CVK_CUDA_CHECK(cudaGetLastError());
}

void launch_new_cache(const CausalConvParams& p, int elem_bytes, cudaStream_t stream) {
  const int nc = p.kt - 1;
  if (nc == 0) return;
  const int64_t frames = p.batch * p.c_in * nc;
  if (frames > 65535) {
    // Rare (B * C * (kt-1) > 65535): one launch per group of frames would be needed; keep simple.
    throw std::invalid_argument("causal_conv3d_cuda: B * C * (kt-1) > 65535 is not supported");
  }
  const int64_t frame_bytes = p.hw * elem_bytes;
  const int64_t threads = 256;
  auto grid_x = [&](int64_t words) {
    int64_t blocks = (words + threads - 1) / threads;
    return unsigned(blocks > 1024 ? 1024 : blocks);
  };
  const uintptr_t all = reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.cache) |
                        reinterpret_cast<uintptr_t>(p.new_cache);
  if (frame_bytes % 16 == 0 && all % 16 == 0) {
    const int64_t words = frame_bytes / 16;
    _causal_conv3d_new_cache_kernel<uint4>
        <<<dim3(grid_x(words), unsigned(frames)), threads, 0, stream>>>(p, elem_bytes, words);
  } else if (elem_bytes == 2) {
    _causal_conv3d_new_cache_kernel<uint16_t>
        <<<dim3(grid_x(p.hw), unsigned(frames)), threads, 0, stream>>>(p, elem_bytes, p.hw);
  } else if (elem_bytes == 4) {
    _causal_conv3d_new_cache_kernel<uint32_t>
        <<<dim3(grid_x(p.hw), unsigned(frames)), threads, 0, stream>>>(p, elem_bytes, p.hw);
  } else {
    _causal_conv3d_new_cache_kernel<uint64_t>
        <<<dim3(grid_x(p.hw), unsigned(frames)), threads, 0, stream>>>(p, elem_bytes, p.hw);
  }
  CVK_CUDA_CHECK(cudaGetLastError());
}

using cvk::DeviceGuard;

// The 16-byte loads need every frame and weight row to start on a 16-byte boundary.
bool bases_aligned(const CausalConvParams& p) {
  const uintptr_t bases = reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.cache) |
                          reinterpret_cast<uintptr_t>(p.weight) |
                          reinterpret_cast<uintptr_t>(p.weight_packed);
  return bases % 16 == 0;
}

template <typename T>
void launch_tensor_core(const CausalConvParams& p, CudaKernel kernel, int device, cudaStream_t stream) {
  switch (kernel) {
    case CudaKernel::kRing: launch_ring<T, RingTile>(p, device, stream); break;
    case CudaKernel::kTapMajor: launch_mma<T, StreamedTile, true, true>(p, device, stream); break;
    case CudaKernel::kStreamed: launch_mma<T, StreamedTile, true, false>(p, device, stream); break;
    default: launch_mma<T, MaskedTile, false, false>(p, device, stream); break;
  }
}

}  // namespace

int causal_conv3d_cuda_max_smem(int device) { return device_max_smem(device); }

void causal_conv3d_cuda(const CausalConvParams& p, int dtype, int device, std::uintptr_t stream_int) {
  DeviceGuard guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_int);
  const bool half = dtype == kBFloat16 || dtype == kFloat16;
  const CudaKernel kernel =
      choose_cuda_kernel(half, p.c_in, p.kt, p.stride, p.hw, bases_aligned(p), device_max_smem(device));
  switch (dtype) {
    case kBFloat16: launch_tensor_core<__nv_bfloat16>(p, kernel, device, stream); break;
    case kFloat16: launch_tensor_core<__half>(p, kernel, device, stream); break;
    case kFloat32: launch_fma<float>(p, stream); break;
    case kFloat64: launch_fma<double>(p, stream); break;
    default:
      throw std::invalid_argument("causal_conv3d_cuda: dtype code " + std::to_string(dtype) +
                                  " is not supported (0 fp32, 1 fp64, 2 fp16, 3 bf16)");
  }
  const int elem_bytes = dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2;
  launch_new_cache(p, elem_bytes, stream);
}

}  // namespace cvk
