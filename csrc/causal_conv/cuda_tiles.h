// The CUDA kernels' tile shapes and the one place that picks a kernel for a shape (compare FA3's
// tile_size.h). Plain C++: the CPU build compiles it too, so the choice is testable without a GPU.
//
// Picked from the H100 sweep at 0ec08ba (benchmarks/results/conv_notes.md; bf16, kt=3):
//  * ring: the frame-ring kernel (resident weights, each input frame of a pixel tile loaded once):
//    0.942 / 0.588 ms at [1,128,6,480,720] stride 1 / 2 (vs 1.226 / 0.697 tap-major). Needs C_in <= 128,
//    C_in % 32 == 0, kt >= stride, and weights + kt frame slots within the shared memory per block;
//  * tap-major: streamed 128x128 tiles with K in (tap, channel) order over a [C_out, kt, C_in] weight
//    copy: 1.099 / 0.590 ms at [1,256,6,240,360], 0.258 / 0.142 at [1,512,6,60,90]. C_in % 8 == 0;
//  * streamed: 128x128 tiles, K in (channel, tap) order over the weight as it is (any C_in);
//  * masked: element loads with full masks, for H*W % 8 != 0, C_in * kt % 8 != 0 or bases that are not
//    16-byte aligned (every tensor-core kernel above loads 16 bytes at a time);
//  * fma: float32 / float64 (shared-memory tiled FMA; correct, not tuned).
#pragma once
#include <cstddef>
#include <cstdint>

namespace cvk {

// Streamed tensor-core kernels: K per pipeline stage (two m16n8k16 steps), the warp tile, and the
// 16-byte row padding that puts ldmatrix rows in distinct banks.
constexpr int kBK = 32;
constexpr int kWarpM = 64;
constexpr int kWarpN = 32;
constexpr int kPad = 8;

template <int BM, int BN, int STAGES>
struct TileConfig {
  static constexpr int kBM = BM, kBN = BN, kStages = STAGES;
  static constexpr int kWarps = (BM / kWarpM) * (BN / kWarpN);
  static constexpr int kThreads = kWarps * 32;
  // Streamed tiles want two blocks per SM (caps registers at 128 for 256 threads).
  static constexpr int kMinBlocks = kThreads <= 256 ? 2 : 1;
  static constexpr int kLdA = kBK + kPad;  // A stage row (elements)
  static constexpr int kLdB = BN + kPad;
  static constexpr int kStageA = BM * kLdA;
  static constexpr int kStageB = kBK * kLdB;
  static size_t smem_bytes() { return size_t(STAGES) * (kStageA + kStageB) * 2; }
};

// Frame ring: a block owns BM output channels (weights resident) and BN pixels; warps of WM x WN.
template <int BM, int BN, int WM, int WN>
struct RingConfig {
  static constexpr int kBM = BM, kBN = BN, kWM = WM, kWN = WN;
  static constexpr int kWarpsM = BM / WM;
  static constexpr int kWarpsN = BN / WN;
  static constexpr int kThreads = kWarpsM * kWarpsN * 32;
  static constexpr int kLdB = BN + kPad;  // ring slot row (elements); 16-byte row padding
  static_assert(WM % 16 == 0 && WN % 16 == 0 && BM % WM == 0 && BN % WN == 0, "ring tile");
  static size_t weight_bytes(int64_t k_total) { return size_t(BM) * size_t(k_total + kPad) * 2; }
  static size_t slot_bytes(int64_t c_in) { return size_t(c_in) * kLdB * 2; }
};

// The shipped tiles.
using RingTile = RingConfig<128, 128, 64, 32>;
using StreamedTile = TileConfig<128, 128, 4>;  // tap-major and streamed
using MaskedTile = TileConfig<64, 128, 3>;

enum class CudaKernel : int { kFma = 0, kMasked = 1, kStreamed = 2, kTapMajor = 3, kRing = 4 };

inline const char* cuda_kernel_name(CudaKernel k) {
  switch (k) {
    case CudaKernel::kFma: return "fma";
    case CudaKernel::kMasked: return "masked";
    case CudaKernel::kStreamed: return "streamed";
    case CudaKernel::kTapMajor: return "tapmajor";
    case CudaKernel::kRing: return "ring";
  }
  return "?";
}

// The kernel for a shape. half: bf16/fp16 (else fma); aligned: x, cache, weight (and the packed
// weight, when given) start on 16-byte boundaries; max_smem: the device's opt-in shared memory per
// block (227 KB on Hopper).
inline CudaKernel choose_cuda_kernel(bool half, int64_t c_in, int kt, int stride, int64_t hw, bool aligned,
                                     int max_smem) {
  if (!half) return CudaKernel::kFma;
  const bool vec = hw % 8 == 0 && (c_in * kt) % 8 == 0 && aligned;
  if (!vec) return CudaKernel::kMasked;
  if (c_in <= 128 && c_in % 32 == 0 && kt >= stride &&
      RingTile::weight_bytes(c_in * kt) + size_t(kt) * RingTile::slot_bytes(c_in) <= size_t(max_smem))
    return CudaKernel::kRing;
  if (c_in % 8 == 0) return CudaKernel::kTapMajor;
  return CudaKernel::kStreamed;
}

}  // namespace cvk
