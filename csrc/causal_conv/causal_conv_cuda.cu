// CUDA causal temporal convolution (kh = kw = 1), NCTHW.
//
// Per batch b and output frame t the op is a GEMM over pixels:
//   y[co, t, p] = sum_k A[co, k] * B_t[k, p] + bias[co],   k = ci * kt + j,
//   A[co, k] = weight[co, ci, j] (the weight's own contiguous layout, no repacking),
//   B_t[k, p] = xpad[ci, t*st + j, p] (each row k is one frame of one channel, found through
//   padded_source(): input frame, cache frame, frame 0 again, or zeros - never a padded copy).
// bf16/fp16: mma.sync m16n8k16 on tensor cores, fp32 accumulation, multi-stage cp.async pipeline
// with 16-byte loads along pixels. A block owns (batch, C_out slice, pixel tile, run of output
// frames) and streams one continuous pipeline over all its output frames, so the pipeline never
// drains between frames and the kt frames an output needs were just read by the previous output
// (L2 hits). Optionally (A_RESIDENT) the block's weight slice stays in shared memory for its
// whole life; with a persistent grid (fewer blocks than work items) it is loaded once per block
// and the pipeline also runs on across pixel tiles. fp32/fp64: a plain shared-memory tiled FMA kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "causal_conv/causal_conv.h"

namespace cvk {
namespace {

#define CVK_CUDA_CHECK(expr)                                                                   \
  do {                                                                                         \
    cudaError_t err_ = (expr);                                                                 \
    if (err_ != cudaSuccess)                                                                   \
      throw std::runtime_error(std::string("causal_conv3d_cuda: ") + #expr + " failed: " +     \
                               cudaGetErrorString(err_));                                      \
  } while (0)

// ------------------------------------------------------------------------------------------------
// PTX helpers
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte async copy; src_bytes = 0 writes zeros (masked rows/columns, zero padding frames).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
struct MmaOp;
template <>
struct MmaOp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct MmaOp<__half> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  __nv_bfloat162 v(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack2(__half lo, __half hi) {
  __half2 v(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ------------------------------------------------------------------------------------------------
// Tensor-core kernel (bf16 / fp16)
// ------------------------------------------------------------------------------------------------
constexpr int kBK = 32;      // k per pipeline stage (two m16n8k16 steps)
constexpr int kWarpM = 64;   // warp tile: 64 output channels x 32 pixels
constexpr int kWarpN = 32;
constexpr int kPad = 8;      // 16-byte row padding: ldmatrix rows land in distinct banks

template <int BM, int BN, int STAGES, bool A_RESIDENT>
struct TileConfig {
  static constexpr int kWarps = (BM / kWarpM) * (BN / kWarpN);
  static constexpr int kThreads = kWarps * 32;
  // Streamed tiles want two blocks per SM (caps registers at 128 for 256 threads).
  static constexpr int kMinBlocks = (!A_RESIDENT && kThreads <= 256) ? 2 : 1;
  static constexpr int kLdA = kBK + kPad;  // streamed A stage row (elements)
  static constexpr int kLdB = BN + kPad;
  static constexpr int kStageA = A_RESIDENT ? 0 : BM * kLdA;
  static constexpr int kStageB = kBK * kLdB;
  // Resident A: [BM][K_pad + kPad], K_pad = K rounded up to kBK (runtime).
  static size_t smem_bytes(int64_t k_total) {
    const size_t stages = size_t(STAGES) * (kStageA + kStageB) * 2;
    if (!A_RESIDENT) return stages;
    const int64_t k_pad = (k_total + kBK - 1) / kBK * kBK;
    return stages + size_t(BM) * size_t(k_pad + kPad) * 2;
  }
};

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

// Walks a block's work: items blockIdx.x, blockIdx.x + gridDim.x, ... (one item when the grid
// covers them all; persistent blocks otherwise), each a run of output frames of one pixel tile,
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

template <typename T, int BM, int BN, int STAGES, bool A_RESIDENT, bool VEC, bool TAP_MAJOR>
__global__ void __launch_bounds__(TileConfig<BM, BN, STAGES, A_RESIDENT>::kThreads,
                                  TileConfig<BM, BN, STAGES, A_RESIDENT>::kMinBlocks)
    _causal_conv3d_fwd_kernel(GemmArgs g) {
  using Cfg = TileConfig<BM, BN, STAGES, A_RESIDENT>;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kWarpsN = BN / kWarpN;
  constexpr int kMT = kWarpM / 16;  // m16 tiles per warp
  constexpr int kNT = kWarpN / 8;   // n8 tiles per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const CausalConvParams& p = g.p;

  const int64_t co0 = int64_t(blockIdx.y) * BM;
  WorkCursor work;  // what the consumer computes next
  work.start_item(g, int(blockIdx.x), BN);
  if (work.done) return;
  WorkCursor fetch = work;  // what the loader fetches next (STAGES-1 steps ahead)

  const int64_t k_pad = g.k_chunks * kBK;
  const int lda_res = int(k_pad) + kPad;
  T* sA_res = smem + size_t(STAGES) * (Cfg::kStageA + Cfg::kStageB);
  auto stage_a = [&](int s) { return smem + s * (Cfg::kStageA + Cfg::kStageB); };
  auto stage_b = [&](int s) { return smem + s * (Cfg::kStageA + Cfg::kStageB) + Cfg::kStageA; };

  static_assert(!TAP_MAJOR || (VEC && !A_RESIDENT), "tap-major order: 16-byte loads, streamed A");
  TapMajorLoader<T, BM, BN, kThreads> tap_loader;
  if constexpr (TAP_MAJOR) tap_loader.init(g, co0);

  int load_slot = 0;
  auto load_next = [&]() {
    if (!fetch.done) {
      if constexpr (TAP_MAJOR) {
        tap_loader.load(stage_a(load_slot), stage_b(load_slot), g, fetch.t, fetch.kc, fetch.b, fetch.p0);
      } else {
        if constexpr (!A_RESIDENT)
          load_a_block<T, BM, kThreads, VEC>(stage_a(load_slot), Cfg::kLdA, g, co0, fetch.kc * kBK, kBK);
        load_b_stage<T, BN, kThreads, VEC>(stage_b(load_slot), Cfg::kLdB, g, fetch.b, fetch.t,
                                           fetch.kc * kBK, fetch.p0);
      }
      load_slot = load_slot + 1 == STAGES ? 0 : load_slot + 1;
      fetch.advance(g, BN);
    }
    cp_async_commit();
  };

  // The resident weight slice travels in the first commit group.
  if constexpr (A_RESIDENT) load_a_block<T, BM, kThreads, VEC>(sA_res, lda_res, g, co0, 0, int(k_pad));
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) load_next();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int wm = warp / kWarpsN;
  const int wn = warp % kWarpsN;
  const int g8 = lane / 4;  // accumulator row within an m16 tile (and +8)
  const int q4 = lane % 4;  // accumulator column pair
  // ldmatrix lane -> (row, column) of a 16x16 block, identical for A and (trans) B.
  const int lm_row = lane % 16;
  const int lm_col = (lane / 16) * 8;

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);

  int slot = 0;
  while (!work.done) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // slot `slot` is visible; the slot read last iteration is free to refill
    load_next();

    const int s = slot;
    const int kc = work.kc;
    const T* sA;
    int lda;
    if constexpr (A_RESIDENT) {
      sA = sA_res + kc * kBK;
      lda = lda_res;
    } else {
      sA = stage_a(s);
      lda = Cfg::kLdA;
    }
    const T* sB = stage_b(s);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[kMT][4];
      uint32_t bf[kNT / 2][4];
#pragma unroll
      for (int i = 0; i < kMT; ++i)
        ldmatrix_x4(af[i], sA + (wm * kWarpM + i * 16 + lm_row) * lda + kk + lm_col);
#pragma unroll
      for (int j = 0; j < kNT / 2; ++j)
        ldmatrix_x4_trans(bf[j], sB + (kk + lm_row) * Cfg::kLdB + wn * kWarpN + j * 16 + lm_col);
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j)
          MmaOp<T>::run(acc[i][j], af[i], bf[j / 2][(j % 2) * 2], bf[j / 2][(j % 2) * 2 + 1]);
    }

    if (kc == g.k_chunks - 1) {  // output frame work.t is complete: bias, store, reset
      const int64_t t = work.t, b = work.b, p0 = work.p0;
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int64_t co = co0 + wm * kWarpM + i * 16 + g8 + half * 8;
          if (co >= p.c_out) continue;
          const float bv = bias ? to_float(bias[co]) : 0.0f;
          T* row = y + frame_offset(b, co, t, p.c_out, p.frames_out, p.hw);
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
            const int64_t pix = p0 + wn * kWarpN + j * 8 + q4 * 2;
            const T v0 = from_float<T>(acc[i][j][half * 2] + bv);
            const T v1 = from_float<T>(acc[i][j][half * 2 + 1] + bv);
            if constexpr (VEC) {  // hw % 8 == 0: the pair is in range and 4-byte aligned
              if (pix < p.hw) *reinterpret_cast<uint32_t*>(row + pix) = pack2(v0, v1);
            } else {
              if (pix < p.hw) row[pix] = v0;
              if (pix + 1 < p.hw) row[pix + 1] = v1;
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;
    }
    slot = slot + 1 == STAGES ? 0 : slot + 1;
    work.advance(g, BN);
  }
  cp_async_wait<0>();  // no copy may be in flight when the block exits
}

// ------------------------------------------------------------------------------------------------
// Frame-ring kernel (bf16 / fp16; C_in % 32 == 0, H*W % 8 == 0, 16-byte aligned bases).
//
// A block owns one C_out slice (BM rows, weights resident in shared memory for the block's whole
// life, gathered once into tap-major order [BM][kt * C_in]) and walks pixel tiles persistently
// (tile = blockIdx.y, + gridDim.y, ...). For each pixel tile it slides over ALL output frames,
// keeping the padded input frames of that tile ([C_in][BN] each) in a ring of `slots` >= kt
// shared-memory slots. Every padded frame of a tile is loaded exactly once (cp.async, one commit
// group per frame), so x is read from global memory once per C_out slice instead of kt times.
//
// Frame sequence: the block's distinct frames in the order it uses them. Padded frame P
// (p_used = (T_out - 1) * st + kt of them are read) is unique frame u = max(P - off, 0), where
// off = kt - 1 when the front padding replicates x's frame 0 (no cache: padded frames 0..kt-1 are
// all x's frame 0, loaded once) and 0 otherwise; seq = tile_iter * (p_used - off) + u lives in
// slot seq % slots. Frame P is last read by output t = min(P / st, T_out - 1) through tap
// P - t * st, so after tap j of output t the block frees unique frame u(t*st + j) when j < st (or
// when t is the last output: every tap) and t*st + j >= off. Each free, in seq order, refills
// its slot with seq + slots (the frame `slots` ahead, possibly of the next tile) and commits one
// group (empty past the end). Before output t the committed groups are slots + (frees so far), so
// its newest frame is complete once at most slots - kt + max(off - t*st, 0) groups are pending.
// (A Python emulation of this schedule checked every read against the frame it must see.)
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async_wait_dyn(int n) {
  switch (n) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    case 6: cp_async_wait<6>(); break;
    default: cp_async_wait<7>(); break;
  }
}

template <int BM, int BN, int WM, int WN>
struct RingConfig {
  static constexpr int kWarpsM = BM / WM;
  static constexpr int kWarpsN = BN / WN;
  static constexpr int kThreads = kWarpsM * kWarpsN * 32;
  static constexpr int kLdB = BN + kPad;  // ring slot row (elements); 16-byte row padding
  static_assert(WM % 16 == 0 && WN % 16 == 0 && BM % WM == 0 && BN % WN == 0, "ring tile");
  static size_t weight_bytes(int64_t k_total) { return size_t(BM) * size_t(k_total + kPad) * 2; }
  static size_t slot_bytes(int64_t c_in) { return size_t(c_in) * kLdB * 2; }
};

struct RingArgs {
  CausalConvParams p;
  int slots;      // ring slots (>= kt)
  int pix_tiles;  // per batch
  int n_tiles;    // batch * pix_tiles
  int p_used;     // padded frames the outputs read: (T_out - 1) * st + kt
  int dedup_front;  // 1: replicate padding without cache, the kt-1 front frames share x's frame 0
};

template <typename T, int BM, int BN, int WM, int WN>
__global__ void __launch_bounds__(RingConfig<BM, BN, WM, WN>::kThreads, 1)
    _causal_conv3d_ring_fwd_kernel(RingArgs r) {
  using Cfg = RingConfig<BM, BN, WM, WN>;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kLdB = Cfg::kLdB;
  constexpr int kMT = WM / 16;
  constexpr int kNT = WN / 8;
  constexpr int kChunksPerRow = BN / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const CausalConvParams& p = r.p;
  const int C = int(p.c_in), kt = p.kt, st = p.stride;
  const int K = C * kt;
  const int ldw = K + kPad;
  const int hw = int(p.hw);
  const int t_out = int(p.frames_out);
  const int slots = r.slots;
  const int off = r.dedup_front ? kt - 1 : 0;
  const int u_used = r.p_used - off;  // distinct frames per tile
  T* sW = reinterpret_cast<T*>(smem_raw);
  T* ring = sW + size_t(BM) * ldw;
  const int slot_elems = C * kLdB;
  const int co0 = int(blockIdx.x) * BM;
  if (int(blockIdx.y) >= r.n_tiles) return;

  // Resident weights, gathered from [C_out, C_in, kt] into tap-major rows [j * C_in + ci]
  // (plain loads in global order; once per block). Visible after the first __syncthreads below.
  {
    const T* w = static_cast<const T*>(p.weight);
    for (int e = threadIdx.x; e < BM * K; e += kThreads) {
      const int row = e / K;
      const int rem = e - row * K;
      const int ci = rem / kt;
      const int j = rem - ci * kt;
      const int co = co0 + row;
      sW[row * ldw + j * C + ci] = co < p.c_out ? w[int64_t(co) * K + rem] : from_float<T>(0.0f);
    }
  }

  // Loader: the next frame of the block's sequence.
  const T* x = static_cast<const T*>(p.x);
  const T* cache = static_cast<const T*>(p.cache);
  const bool has_cache = cache != nullptr;
  int ld_tile = int(blockIdx.y), ld_frame = 0, ld_slot = 0;
  auto issue_next = [&]() {
    if (ld_tile < r.n_tiles) {
      const int b = ld_tile / r.pix_tiles;
      const int p0 = (ld_tile - b * r.pix_tiles) * BN;
      const FrameSource s = padded_source(ld_frame + off, kt, p.pad_mode, has_cache);
      const T* base = x;
      int64_t cstride = 0;
      if (s.kind != kFromZero) {
        const int64_t nf = s.kind == kFromInput ? p.frames : int64_t(kt - 1);
        base = (s.kind == kFromInput ? x : cache) + (int64_t(b) * C * nf + s.frame) * p.hw + p0;
        cstride = nf * p.hw;
      }
      T* dst = ring + ld_slot * slot_elems;
      const int chunks = C * kChunksPerRow;
      for (int c = threadIdx.x; c < chunks; c += kThreads) {
        const int ci = c / kChunksPerRow;
        const int col = (c % kChunksPerRow) * 8;
        const bool ok = s.kind != kFromZero && p0 + col < hw;
        cp_async_16(dst + ci * kLdB + col, ok ? base + ci * cstride + col : x, ok ? 16 : 0);
      }
      ld_slot = ld_slot + 1 == slots ? 0 : ld_slot + 1;
      if (++ld_frame == u_used) {
        ld_frame = 0;
        ld_tile += int(gridDim.y);
      }
    }
    cp_async_commit();
  };
  for (int s = 0; s < slots; ++s) issue_next();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int wm = warp / Cfg::kWarpsN;
  const int wn = warp % Cfg::kWarpsN;
  const int g8 = lane / 4;
  const int q4 = lane % 4;
  const int lm_row = lane % 16;
  const int lm_col = (lane / 16) * 8;
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  // Per-thread bias values (fixed C_out slice).
  float bv[kMT][2];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int co = co0 + wm * WM + i * 16 + g8 + h * 8;
      bv[i][h] = (bias && co < p.c_out) ? to_float(bias[co]) : 0.0f;
    }
  // Fragment base offsets (elements) inside sW / a ring slot.
  const T* a_base = sW + (wm * WM + lm_row) * ldw + lm_col;
  const int b_off = lm_row * kLdB + wn * WN + lm_col;

  int seq_slot0 = 0;  // slot of the current tile's padded frame 0
  for (int tile = int(blockIdx.y); tile < r.n_tiles; tile += int(gridDim.y)) {
    const int b = tile / r.pix_tiles;
    const int p0 = (tile - b * r.pix_tiles) * BN;
    for (int t = 0; t < t_out; ++t) {
      cp_async_wait_dyn(slots - kt + max(off - t * st, 0));
      __syncthreads();  // this output's kt frames (and the weights) are visible to every warp
      float acc[kMT][kNT][4];
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
      const bool last = t == t_out - 1;
      for (int tap = 0; tap < kt; ++tap) {
        const int P = t * st + tap;
        int slot = seq_slot0 + max(P - off, 0);
        slot %= slots;
        const T* sA = a_base + tap * C;
        const T* sB = ring + slot * slot_elems + b_off;
        // Fragments double-buffered by hand (the asm statements keep their order): the ldmatrix
        // of k step s + 1 is issued before the mma of step s. C_in % 32 == 0.
        uint32_t af[2][kMT][4];
        uint32_t bf[2][kNT / 2][4];
        auto load_frags = [&](int buf, int ci) {
#pragma unroll
          for (int i = 0; i < kMT; ++i) ldmatrix_x4(af[buf][i], sA + i * 16 * ldw + ci);
#pragma unroll
          for (int j = 0; j < kNT / 2; ++j) ldmatrix_x4_trans(bf[buf][j], sB + ci * kLdB + j * 16);
        };
        auto mma_frags = [&](int buf) {
#pragma unroll
          for (int i = 0; i < kMT; ++i)
#pragma unroll
            for (int j = 0; j < kNT; ++j)
              MmaOp<T>::run(acc[i][j], af[buf][i], bf[buf][j / 2][(j % 2) * 2],
                            bf[buf][j / 2][(j % 2) * 2 + 1]);
        };
        load_frags(0, 0);
#pragma unroll 1
        for (int ci = 0; ci < C; ci += 32) {
          load_frags(1, ci + 16);
          mma_frags(0);
          if (ci + 32 < C) load_frags(0, ci + 32);
          mma_frags(1);
        }
        if ((last || tap < st) && P >= off) {  // last read of this frame: refill its slot
          __syncthreads();
          issue_next();
        }
      }
      // Epilogue: bias, round once, 4-byte stores (H*W % 8 == 0: pairs stay in range).
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int co = co0 + wm * WM + i * 16 + g8 + h * 8;
          if (co >= p.c_out) continue;
          T* row = y + frame_offset(b, co, t, p.c_out, p.frames_out, p.hw);
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
            const int pix = p0 + wn * WN + j * 8 + q4 * 2;
            if (pix < hw)
              *reinterpret_cast<uint32_t*>(row + pix) =
                  pack2(from_float<T>(acc[i][j][h * 2] + bv[i][h]),
                        from_float<T>(acc[i][j][h * 2 + 1] + bv[i][h]));
          }
        }
      }
    }
    seq_slot0 = (seq_slot0 + u_used) % slots;
  }
  cp_async_wait<0>();  // no copy may be in flight when the block exits
}

// ------------------------------------------------------------------------------------------------
// fp32 / fp64: shared-memory tiled FMA (correct, not tuned). 16x16 threads, 64x64 outputs.
// ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(256) _causal_conv3d_fwd_fma_kernel(CausalConvParams p,
                                                                     int64_t k_total) {
  constexpr int kTile = 64, kKB = 16;
  __shared__ T sA[kKB][kTile + 1];
  __shared__ T sB[kKB][kTile];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t p0 = int64_t(blockIdx.x) * kTile;
  const int64_t co_tiles = (p.c_out + kTile - 1) / kTile;
  const int64_t co0 = (int64_t(blockIdx.y) % co_tiles) * kTile;
  const int64_t t = int64_t(blockIdx.y) / co_tiles;
  const int64_t b = blockIdx.z;
  const T* x = static_cast<const T*>(p.x);
  const T* cache = static_cast<const T*>(p.cache);
  const T* w = static_cast<const T*>(p.weight);
  T acc[4][4] = {};
  for (int64_t k0 = 0; k0 < k_total; k0 += kKB) {
    for (int e = threadIdx.x; e < kKB * kTile; e += 256) {
      const int kr = e / kTile, col = e % kTile;
      const int64_t k = k0 + kr;
      const int64_t co = co0 + col;
      sA[kr][col] = (k < k_total && co < p.c_out) ? w[co * k_total + k] : T(0);
      const int64_t pix = p0 + col;
      T v = T(0);
      if (k < k_total && pix < p.hw) {
        const int64_t ci = k / p.kt;
        const int j = int(k - ci * p.kt);
        const FrameSource s = tap_source(t, j, p.stride, p.kt, p.pad_mode, cache != nullptr);
        if (s.kind != kFromZero)
          v = ((s.kind == kFromInput ? x : cache) +
               source_offset(s, b, ci, p.c_in, p.frames, p.kt, p.hw))[pix];
      }
      sB[kr][col] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kKB; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += sA[kk][ty * 4 + i] * sB[kk][tx + 16 * j];
    __syncthreads();
  }
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t co = co0 + ty * 4 + i;
    if (co >= p.c_out) continue;
    T* row = y + frame_offset(b, co, t, p.c_out, p.frames_out, p.hw);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t pix = p0 + tx + 16 * j;
      if (pix < p.hw) row[pix] = acc[i][j] + (bias ? bias[co] : T(0));
    }
  }
}

// new_cache frame i = padded frame T + i, copied from wherever it lives, one Word at a time.
template <typename Word>
__global__ void _causal_conv3d_new_cache_kernel(CausalConvParams p, int elem_bytes,
                                                int64_t words_per_frame) {
  const int nc = p.kt - 1;
  const int64_t frame_id = blockIdx.y;  // (b * C + c) * nc + i
  const int i = int(frame_id % nc);
  const int64_t bc = frame_id / nc;
  const int64_t c = bc % p.c_in, b = bc / p.c_in;
  const FrameSource s = new_cache_source(i, p.frames, p.kt, p.pad_mode, p.cache != nullptr);
  Word* dst = static_cast<Word*>(p.new_cache) + frame_id * words_per_frame;
  const Word* src = nullptr;
  if (s.kind != kFromZero) {
    const int64_t off = source_offset(s, b, c, p.c_in, p.frames, p.kt, p.hw);  // elements
    const char* base = static_cast<const char*>(s.kind == kFromInput ? p.x : p.cache);
    src = reinterpret_cast<const Word*>(base + off * elem_bytes);
  }
  for (int64_t w = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; w < words_per_frame;
       w += int64_t(gridDim.x) * blockDim.x)
    dst[w] = src ? src[w] : Word{};
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------
struct Variant {
  const char* name;
  int bm, bn, stages;
  bool a_resident;
};
// Tile configurations a benchmark can force (variant i+1); variant 0 picks automatically.
constexpr Variant kVariants[] = {
    {"bm128_bn128_s4", 128, 128, 4, false}, {"bm64_bn128_s4", 64, 128, 4, false},
    {"bm128_bn64_s4", 128, 64, 4, false},   {"bm128_bn128_s3_resA", 128, 128, 3, true},
    {"bm64_bn128_s4_resA", 64, 128, 4, true}, {"bm128_bn256_s3", 128, 256, 3, false},
    {"bm128_bn256_s3_resA", 128, 256, 3, true}, {"bm64_bn256_s4_resA", 64, 256, 4, true},
    {"bm128_bn128_s3_resA_persistent", 128, 128, 3, true},
    {"bm64_bn128_s4_resA_persistent", 64, 128, 4, true},
    {"bm128_bn128_s4_persistent", 128, 128, 4, false},
    {"bm128_bn256_s3_resA_persistent", 128, 256, 3, true},
    // tap-major K order (need weight_packed [C_out, kt, C_in]; not measured yet)
    {"bm128_bn128_s4_tapmajor", 128, 128, 4, false},
    {"bm128_bn128_s4_tapmajor_persistent", 128, 128, 4, false},
    {"bm128_bn256_s3_tapmajor", 128, 256, 3, false},
    // frame ring: resident weights, each padded frame of a pixel tile loaded once (persistent)
    {"ring_bm128_bn64_w32x32", 128, 64, 0, true},
    {"ring_bm128_bn128_w64x32", 128, 128, 0, true},
    {"ring_bm64_bn64_w32x32_occ2", 64, 64, 0, true},
    {"ring_bm64_bn128_w32x32", 64, 128, 0, true},
    {"ring_bm64_bn32_w32x16", 64, 32, 0, true},
    {"ring_bm32_bn64_w16x32", 32, 64, 0, true},
    {"ring_bm32_bn32_w16x16", 32, 32, 0, true},
    {"ring_bm64_bn64_w32x32", 64, 64, 0, true},
    {"ring_bm128_bn64_w64x32", 128, 64, 0, true},
    {"ring_bm128_bn128_w64x64", 128, 128, 0, true},
    {"ring_bm64_bn64_w64x32", 64, 64, 0, true},
};
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);

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

template <typename T, int BM, int BN, int STAGES, bool A_RESIDENT, bool VEC, bool TAP_MAJOR = false>
void launch_mma(const CausalConvParams& p, int device, cudaStream_t stream, bool persistent) {
  using Cfg = TileConfig<BM, BN, STAGES, A_RESIDENT>;
  GemmArgs g;
  g.p = p;
  g.k_total = p.c_in * p.kt;
  g.ci_chunks = (p.c_in + kBK - 1) / kBK;
  g.k_chunks = TAP_MAJOR ? p.kt * g.ci_chunks : (g.k_total + kBK - 1) / kBK;
  if (TAP_MAJOR && (p.weight_packed == nullptr || p.c_in % 8 != 0))
    throw std::invalid_argument("causal_conv3d_cuda: tap-major variants need weight_packed "
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
  const size_t smem = Cfg::smem_bytes(g.k_total);
  const int max_smem = device_max_smem(device);
  if (smem > size_t(max_smem))
    throw std::invalid_argument("causal_conv3d_cuda: tile needs " + std::to_string(smem) +
                                " bytes of shared memory, more than the device allows");
  auto kernel = _causal_conv3d_fwd_kernel<T, BM, BN, STAGES, A_RESIDENT, VEC, TAP_MAJOR>;
  CVK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int64_t blocks_x = g.items;
  if (persistent) {  // as many blocks as fit at once; each walks items with stride gridDim.x
    int per_sm = 0;
    CVK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Cfg::kThreads, smem));
    const int64_t resident = int64_t(per_sm < 1 ? 1 : per_sm) * sms;
    const int64_t per_co = (resident + co_tiles - 1) / co_tiles;
    blocks_x = blocks_x < per_co ? blocks_x : per_co;
  }
  if (g.items > 0x7fffffffLL || p.hw >= 0x7fffffffLL || p.frames_out >= 0x7fffffffLL ||
      co_tiles > 65535)
    throw std::invalid_argument("causal_conv3d_cuda: grid too large for this shape");
  dim3 grid(unsigned(blocks_x), unsigned(co_tiles), 1);
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(g);
  CVK_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int BM, int BN, int STAGES, bool A_RESIDENT, bool TAP_MAJOR = false>
void launch_mma_vec(const CausalConvParams& p, bool vec, int device, cudaStream_t stream,
                    bool persistent) {
  if (vec && (!TAP_MAJOR || p.c_in % 8 == 0))
    launch_mma<T, BM, BN, STAGES, A_RESIDENT, true, TAP_MAJOR>(p, device, stream, persistent);
  else
    launch_mma<T, 64, 128, 3, false, false>(p, device, stream, false);  // any H*W, any C
}

// Frame-ring launcher. Ring slots: as many as fit next to the weights in the shared-memory budget
// (max_smem / min_blocks), at most kt + 2 * st (more only delays the first output). A variant
// whose weights and kt slots do not fit this C_in raises a ValueError naming shared memory.
template <typename T, int BM, int BN, int WM, int WN>
void launch_ring(const CausalConvParams& p, int device, cudaStream_t stream, int min_blocks) {
  using Cfg = RingConfig<BM, BN, WM, WN>;
  const int64_t k_total = p.c_in * p.kt;
  const size_t w_bytes = Cfg::weight_bytes(k_total);
  const size_t slot_bytes = Cfg::slot_bytes(p.c_in);
  const int max_smem = device_max_smem(device);
  const size_t budget = min_blocks > 1 ? size_t(max_smem) / size_t(min_blocks) - 1024 : size_t(max_smem);
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

// Ring variants need C_in % 32 == 0, the 16-byte path and kt >= stride (every padded frame up to
// the last one used is then read by some output); otherwise the general kernel runs.
template <typename T, int BM, int BN, int WM, int WN>
void launch_ring_or_fallback(const CausalConvParams& p, bool vec, int device, cudaStream_t stream,
                             int min_blocks) {
  if (vec && p.c_in % 32 == 0 && p.kt >= p.stride)
    launch_ring<T, BM, BN, WM, WN>(p, device, stream, min_blocks);
  else
    launch_mma_vec<T, 128, 128, 4, false>(p, vec, device, stream, false);
}

template <typename T>
void dispatch_mma(const CausalConvParams& p, bool vec, int device, cudaStream_t stream, int variant) {
  if (variant == 0) {
    // The general default of the raw binding: streamed 128x128 tiles, 4 stages, any C_in, no
    // packed weight needed. Python's causal_conv3d_native never sends 0 for bf16/fp16 shapes the
    // faster variants cover: it picks the measured-fastest per shape class (native.py,
    // auto_cuda_variant: the frame ring, variant 17, for C_in <= 128; tap-major, variant 13,
    // above; H100 sweep at 0ec08ba in benchmarks/results/conv_notes.md).
    variant = 1;
  }
  switch (variant) {
    case 1: launch_mma_vec<T, 128, 128, 4, false>(p, vec, device, stream, false); break;
    case 2: launch_mma_vec<T, 64, 128, 4, false>(p, vec, device, stream, false); break;
    case 3: launch_mma_vec<T, 128, 64, 4, false>(p, vec, device, stream, false); break;
    case 4: launch_mma_vec<T, 128, 128, 3, true>(p, vec, device, stream, false); break;
    case 5: launch_mma_vec<T, 64, 128, 4, true>(p, vec, device, stream, false); break;
    case 6: launch_mma_vec<T, 128, 256, 3, false>(p, vec, device, stream, false); break;
    case 7: launch_mma_vec<T, 128, 256, 3, true>(p, vec, device, stream, false); break;
    case 8: launch_mma_vec<T, 64, 256, 4, true>(p, vec, device, stream, false); break;
    case 9: launch_mma_vec<T, 128, 128, 3, true>(p, vec, device, stream, true); break;
    case 10: launch_mma_vec<T, 64, 128, 4, true>(p, vec, device, stream, true); break;
    case 11: launch_mma_vec<T, 128, 128, 4, false>(p, vec, device, stream, true); break;
    case 12: launch_mma_vec<T, 128, 256, 3, true>(p, vec, device, stream, true); break;
    case 13: launch_mma_vec<T, 128, 128, 4, false, true>(p, vec, device, stream, false); break;
    case 14: launch_mma_vec<T, 128, 128, 4, false, true>(p, vec, device, stream, true); break;
    case 15: launch_mma_vec<T, 128, 256, 3, false, true>(p, vec, device, stream, false); break;
    case 16: launch_ring_or_fallback<T, 128, 64, 32, 32>(p, vec, device, stream, 1); break;
    case 17: launch_ring_or_fallback<T, 128, 128, 64, 32>(p, vec, device, stream, 1); break;
    case 18: launch_ring_or_fallback<T, 64, 64, 32, 32>(p, vec, device, stream, 2); break;
    case 19: launch_ring_or_fallback<T, 64, 128, 32, 32>(p, vec, device, stream, 1); break;
    case 20: launch_ring_or_fallback<T, 64, 32, 32, 16>(p, vec, device, stream, 1); break;
    case 21: launch_ring_or_fallback<T, 32, 64, 16, 32>(p, vec, device, stream, 1); break;
    case 22: launch_ring_or_fallback<T, 32, 32, 16, 16>(p, vec, device, stream, 1); break;
    case 23: launch_ring_or_fallback<T, 64, 64, 32, 32>(p, vec, device, stream, 1); break;
    case 24: launch_ring_or_fallback<T, 128, 64, 64, 32>(p, vec, device, stream, 1); break;
    case 25: launch_ring_or_fallback<T, 128, 128, 64, 64>(p, vec, device, stream, 1); break;
    case 26: launch_ring_or_fallback<T, 64, 64, 64, 32>(p, vec, device, stream, 1); break;
    default:
      throw std::invalid_argument("causal_conv3d_cuda: variant=" + std::to_string(variant) +
                                  " is out of range [0, " + std::to_string(kNumVariants) + "]");
  }
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

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    CVK_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) CVK_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
};

}  // namespace

void causal_conv3d_cuda(const CausalConvParams& p, int dtype, int device, std::uintptr_t stream_int,
                        int variant) {
  DeviceGuard guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_int);
  // 16-byte vector loads need every frame and weight row to start on a 16-byte boundary.
  const uintptr_t bases = reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.cache) |
                          reinterpret_cast<uintptr_t>(p.weight) |
                          reinterpret_cast<uintptr_t>(p.weight_packed);
  const bool vec = p.hw % 8 == 0 && (p.c_in * p.kt) % 8 == 0 && bases % 16 == 0;
  switch (dtype) {
    case kBFloat16: dispatch_mma<__nv_bfloat16>(p, vec, device, stream, variant); break;
    case kFloat16: dispatch_mma<__half>(p, vec, device, stream, variant); break;
    case kFloat32: launch_fma<float>(p, stream); break;
    case kFloat64: launch_fma<double>(p, stream); break;
    default:
      throw std::invalid_argument("causal_conv3d_cuda: dtype code " + std::to_string(dtype) +
                                  " is not supported (0 fp32, 1 fp64, 2 fp16, 3 bf16)");
  }
  const int elem_bytes = dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2;
  launch_new_cache(p, elem_bytes, stream);
}

std::vector<std::string> causal_conv_cuda_variants() {
  std::vector<std::string> names;
  for (const Variant& v : kVariants) names.emplace_back(v.name);
  return names;
}

}  // namespace cvk
