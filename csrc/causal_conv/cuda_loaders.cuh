// Loaders of the streamed tensor-core kernel: its work cursor and the cp.async fills of one pipeline
// stage (A: weight rows, B: input frames found through padded_source, never a padded copy).
// Included once, by causal_conv_cuda.cu.
#pragma once
#include "causal_conv/causal_conv_index.h"
#include "causal_conv/cuda_mma.cuh"
#include "causal_conv/cuda_tiles.h"

namespace cvk {
namespace {

struct GemmArgs {
  CausalConvParams p;
  int64_t k_total;      // C_in * kt
  int64_t k_chunks;     // ceil(k_total / kBK); tap-major: kt * ci_chunks
  int64_t ci_chunks;    // ceil(C_in / kBK) (tap-major order only)
  int64_t frames_per_item;  // output frames of one work item (the last run may be shorter)
  int64_t splits;       // runs of output frames per (batch, pixel tile)
  int64_t pix_tiles;
  int64_t items;        // batch * pix_tiles * splits work items per C_out tile
};

// Walks a block's work: items blockIdx.x, blockIdx.x + gridDim.x, ... (the launcher gives every
// item its own block, so one item), each a run of output frames of one pixel tile,
// each frame k_chunks pipeline steps. The loader and the consumer each keep one.
// 32-bit fields (the launcher checks items, frames and H*W stay below 2^31): fewer registers.
struct WorkCursor {
  int item, t, t_end, kc, p0, b;
  bool done;
  __device__ void start_item(const GemmArgs& g, int it, int bn) {
    item = it;
    done = it >= g.items;
    if (done) return;
    const int split = it % int(g.splits);
    const int rest = it / int(g.splits);
    p0 = (rest % int(g.pix_tiles)) * bn;
    b = rest / int(g.pix_tiles);
    t = split * int(g.frames_per_item);
    t_end = min(t + int(g.frames_per_item), int(g.p.frames_out));
    kc = 0;
  }
  // One pipeline step on: next k chunk, next output frame, or next item.
  __device__ void advance(const GemmArgs& g, int bn) {
    if (++kc < g.k_chunks) return;
    kc = 0;
    if (++t < t_end) return;
    start_item(g, item + int(gridDim.x), bn);
  }
};

// Fills one B stage: rows k0..k0+kBK (each a (channel, tap) pair -> a source frame), pixels
// p0..p0+BN of output frame t. VEC: 16-byte cp.async (needs H*W % 8 == 0 and aligned bases);
// otherwise element loads with full masks (any H*W, any C).
template <typename T, int BN, int THREADS, bool VEC>
__device__ __forceinline__ void load_b_stage(T* sB, int ldb, const GemmArgs& g, int64_t b,
                                             int64_t t, int64_t k0, int64_t p0) {
  const CausalConvParams& p = g.p;
  const T* x = static_cast<const T*>(p.x);
  const T* cache = static_cast<const T*>(p.cache);
  const bool has_cache = cache != nullptr;
  if constexpr (VEC) {
    constexpr int kChunksPerRow = BN / 8;
    constexpr int kChunks = kBK * kChunksPerRow;
#pragma unroll
    for (int c = threadIdx.x; c < kChunks; c += THREADS) {
      const int row = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      const int k = int(k0) + row;  // k < C_in * kt: small
      const int64_t pix = p0 + col;
      const T* src = x;
      int bytes = 0;
      if (k < g.k_total && pix < p.hw) {
        const int ci = k / p.kt;
        const int j = k - ci * p.kt;
        const FrameSource s = tap_source(t, j, p.stride, p.kt, p.pad_mode, has_cache);
        if (s.kind != kFromZero) {
          src = (s.kind == kFromInput ? x : cache) +
                source_offset(s, b, ci, p.c_in, p.frames, p.kt, p.hw) + pix;
          bytes = 16;
        }
      }
      cp_async_16(sB + row * ldb + col, src, bytes);
    }
  } else {
    for (int e = threadIdx.x; e < kBK * BN; e += THREADS) {
      const int row = e / BN;
      const int col = e % BN;
      const int64_t k = k0 + row;
      const int64_t pix = p0 + col;
      T v = from_float<T>(0.0f);
      if (k < g.k_total && pix < p.hw) {
        const int64_t ci = k / p.kt;
        const int j = int(k - ci * p.kt);
        const FrameSource s = tap_source(t, j, p.stride, p.kt, p.pad_mode, has_cache);
        if (s.kind != kFromZero)
          v = ((s.kind == kFromInput ? x : cache) +
               source_offset(s, b, ci, p.c_in, p.frames, p.kt, p.hw))[pix];
      }
      sB[row * ldb + col] = v;
    }
  }
}

// Fills rows co0..co0+BM, columns k0..k0+ncols of A (weight [C_out, K]) into sA (leading dim lda).
template <typename T, int BM, int THREADS, bool VEC>
__device__ __forceinline__ void load_a_block(T* sA, int lda, const GemmArgs& g, int64_t co0,
                                             int64_t k0, int ncols) {
  const T* w = static_cast<const T*>(g.p.weight);
  if constexpr (VEC) {
    const int chunks_per_row = ncols / 8;
    const int chunks = BM * chunks_per_row;
    for (int c = threadIdx.x; c < chunks; c += THREADS) {
      const int row = c / chunks_per_row;
      const int col = (c % chunks_per_row) * 8;
      const int64_t co = co0 + row;
      const int64_t k = k0 + col;
      const bool ok = co < g.p.c_out && k < g.k_total;
      cp_async_16(sA + row * lda + col, ok ? w + co * g.k_total + k : w, ok ? 16 : 0);
    }
  } else {
    for (int e = threadIdx.x; e < BM * ncols; e += THREADS) {
      const int row = e / ncols;
      const int col = e % ncols;
      const int64_t co = co0 + row;
      const int64_t k = k0 + col;
      sA[row * lda + col] =
          (co < g.p.c_out && k < g.k_total) ? w[co * g.k_total + k] : from_float<T>(0.0f);
    }
  }
}

// Tap-major K order, k = j * C_in + ci (weights repacked [C_out, kt, C_in] by the caller): one
// k step reads one tap j, so its source frame is uniform and each thread's 16-byte chunks are one
// multiply-add from bases it computes once (the (channel, tap) order above pays a division, the
// padding lookup and 64-bit offsets per chunk). Streamed A, 16-byte loads only (C_in % 8 == 0).
template <typename T, int BM, int BN, int THREADS>
struct TapMajorLoader {
  static constexpr int kBChunks = kBK * (BN / 8) / THREADS;  // per thread
  static constexpr int kAChunks = BM * (kBK / 8) / THREADS;
  static_assert(kBK * (BN / 8) % THREADS == 0 && BM * (kBK / 8) % THREADS == 0, "chunk split");
  int b_row[kBChunks], b_col[kBChunks];
  const T* a_src[kAChunks];  // weight row start + column, null for rows past C_out
  int a_col[kAChunks], a_row[kAChunks];

  __device__ void init(const GemmArgs& g, int64_t co0) {
    const T* wp = static_cast<const T*>(g.p.weight_packed);
#pragma unroll
    for (int i = 0; i < kBChunks; ++i) {
      const int c = threadIdx.x + i * THREADS;
      b_row[i] = c / (BN / 8);
      b_col[i] = (c % (BN / 8)) * 8;
    }
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const int c = threadIdx.x + i * THREADS;
      a_row[i] = c / (kBK / 8);
      a_col[i] = (c % (kBK / 8)) * 8;
      const int64_t co = co0 + a_row[i];
      a_src[i] = co < g.p.c_out ? wp + co * g.k_total + a_col[i] : nullptr;
    }
  }

  __device__ void load(T* sA, T* sB, const GemmArgs& g, int t, int kc, int b, int p0) const {
    const CausalConvParams& p = g.p;
    const int j = kc / int(g.ci_chunks);
    const int ci0 = (kc - j * int(g.ci_chunks)) * kBK;
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const bool ok = a_src[i] != nullptr && ci0 + a_col[i] < p.c_in;
      cp_async_16(sA + a_row[i] * (kBK + kPad) + a_col[i],
                  ok ? a_src[i] + int64_t(j) * p.c_in + ci0 : static_cast<const T*>(p.weight_packed),
                  ok ? 16 : 0);
    }
    const FrameSource s = tap_source(t, j, p.stride, p.kt, p.pad_mode, p.cache != nullptr);
    const T* base = static_cast<const T*>(s.kind == kFromCache ? p.cache : p.x);
    int64_t channel_stride = 0;
    if (s.kind != kFromZero) {
      const int64_t nf = s.kind == kFromInput ? p.frames : int64_t(p.kt - 1);
      channel_stride = nf * p.hw;
      base += (int64_t(b) * p.c_in * nf + s.frame) * p.hw + p0;
    }
#pragma unroll
    for (int i = 0; i < kBChunks; ++i) {
      const int ci = ci0 + b_row[i];
      const bool ok = s.kind != kFromZero && ci < p.c_in && p0 + b_col[i] < p.hw;
      cp_async_16(sB + b_row[i] * (BN + kPad) + b_col[i],
                  ok ? base + ci * channel_stride + b_col[i] : static_cast<const T*>(p.x), ok ? 16 : 0);
    }
  }
};

}  // namespace
}  // namespace cvk
