// The fused VAE conv's CUDA tile and pipeline choice, in one place (compare
// csrc/causal_conv/cuda_tiles.h). Plain C++: nothing here needs nvcc.
//
// Conv kernel (cuda_conv.cuh): a block owns kBM output channels x a kTH x kTW pixel tile of one
// output frame; 8 warps of 64 channels x 4 pixel rows; a pipeline step is one temporal tap and kCK
// input channels (the 18x18 halo + the weights of the 9 spatial taps); kStages cp.async stages;
// fragments double-buffered by hand; the residual is read in the epilogue next to the stores.
// Picked from the H200 runs at a7485c5, a12da88 and 991a837 (benchmarks/results/vae_conv_notes.md):
// 3 stages were 1-2% faster than 4, single-buffered fragments no faster, reading the residual in a
// pass of its own before the stores 13-25% slower at the two large shapes.
#pragma once

namespace cvk {
namespace vae {

// ---- conv kernel ---------------------------------------------------------------------------------
constexpr int kBM = 128;           // output channels per block
constexpr int kTH = 16, kTW = 16;  // output pixel tile (rows x columns) per block
constexpr int kCK = 16;            // input channels per pipeline step (one k16 mma step)
constexpr int kStages = 3;         // cp.async pipeline depth
constexpr int kConvThreads = 256;  // 8 warps: 2 (64 channels each) x 4 (4 pixel rows each)

// Shared-memory layout that follows from the tile. ldmatrix rows: the 304 B and 48 B strides put 8
// consecutive rows in 8 distinct 4-bank groups.
constexpr int kHaloW = kTW + 2, kHaloH = kTH + 2, kHaloPx = kHaloW * kHaloH;  // 18 x 18
constexpr int kTaps2d = 9;
constexpr int kLdA = kTaps2d * kCK + 8;  // weight row in smem: 9 taps x 16 ch + 16 B pad (304 B)
constexpr int kLdH = kCK + 8;            // halo pixel row: 16 ch + 16 B pad (48 B)
constexpr int kStageA = kBM * kLdA;      // elements
constexpr int kStageH = kHaloPx * kLdH;
constexpr int kStage = kStageA + kStageH;
constexpr int kAChunksPerRow = kTaps2d * kCK / 8;                          // 18 16-byte chunks
constexpr int kAChunks = kBM * kAChunksPerRow / kConvThreads;              // 9 per thread
constexpr int kHChunks = (kHaloPx * 2 + kConvThreads - 1) / kConvThreads;  // 3 per thread
static_assert(kBM * kAChunksPerRow % kConvThreads == 0, "weight chunks split evenly");
static_assert(kBM == 2 * 64 && kTH == 4 * 4 && kTW == 16 && kConvThreads == 8 * 32,
              "the warp layout of cuda_conv.cuh: 2 x 4 warps of 64 channels x 4 rows of 16 pixels");

// ---- statistics and activation passes (cuda_prep.cuh) ---------------------------------------------
constexpr int kStatThreads = 256;                       // per block of the GroupNorm partial sums
constexpr int kPrepPx = 64, kPrepCh = 32, kPrepThreads = 256;  // activation pass: pixels x channels
constexpr int kZqModThreads = 256;  // per block of the modulation table (zq given): one zq pixel per thread

}  // namespace vae
}  // namespace cvk
