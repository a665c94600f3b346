// The CUDA kernels of the causal temporal convolution (kh = kw = 1), NCTHW. Included once, by
// causal_conv_cuda.cu (the launchers); tile shapes and the choice of kernel: cuda_tiles.h.
//
// Per batch b and output frame t the op is a GEMM over pixels:
//   y[co, t, p] = sum_k A[co, k] * B_t[k, p] + bias[co],   k = ci * kt + j,
//   A[co, k] = weight[co, ci, j], B_t[k, p] = xpad[ci, t*st + j, p] (each row k is one frame of one
//   channel, found through padded_source(): input frame, cache frame, frame 0 again, or zeros).
// bf16/fp16: mma.sync m16n8k16 on tensor cores with fp32 accumulation.
//  * _causal_conv3d_fwd_kernel (streamed, tap-major, masked): a block owns (batch, C_out slice, pixel
//    tile, run of output frames) and streams one multi-stage cp.async pipeline over all its output
//    frames, so the pipeline never drains between frames and the kt frames an output needs were just
//    read by the previous output (L2 hits). TAP_MAJOR orders K as (tap, channel) over a weight copy
//    [C_out, kt, C_in]; VEC = false loads elements with full masks (any H*W, any C).
//  * _causal_conv3d_ring_fwd_kernel: resident weights, a shared-memory ring of input frames.
// fp32/fp64: a plain shared-memory tiled FMA kernel. The new cache is a copy kernel.
#pragma once
#include "causal_conv/cuda_loaders.cuh"

namespace cvk {
namespace {

// ------------------------------------------------------------------------------------------------
// Streamed tensor-core kernel (bf16 / fp16)
// ------------------------------------------------------------------------------------------------
template <typename T, int BM, int BN, int STAGES, bool VEC, bool TAP_MAJOR>
__global__ void __launch_bounds__(TileConfig<BM, BN, STAGES>::kThreads, TileConfig<BM, BN, STAGES>::kMinBlocks)
    _causal_conv3d_fwd_kernel(GemmArgs g) {
  using Cfg = TileConfig<BM, BN, STAGES>;
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

  auto stage_a = [&](int s) { return smem + s * (Cfg::kStageA + Cfg::kStageB); };
  auto stage_b = [&](int s) { return smem + s * (Cfg::kStageA + Cfg::kStageB) + Cfg::kStageA; };

  static_assert(!TAP_MAJOR || VEC, "tap-major order: 16-byte loads");
  TapMajorLoader<T, BM, BN, kThreads> tap_loader;
  if constexpr (TAP_MAJOR) tap_loader.init(g, co0);

  int load_slot = 0;
  auto load_next = [&]() {
    if (!fetch.done) {
      if constexpr (TAP_MAJOR) {
        tap_loader.load(stage_a(load_slot), stage_b(load_slot), g, fetch.t, fetch.kc, fetch.b, fetch.p0);
      } else {
        load_a_block<T, BM, kThreads, VEC>(stage_a(load_slot), Cfg::kLdA, g, co0, fetch.kc * kBK, kBK);
        load_b_stage<T, BN, kThreads, VEC>(stage_b(load_slot), Cfg::kLdB, g, fetch.b, fetch.t,
                                           fetch.kc * kBK, fetch.p0);
      }
      load_slot = load_slot + 1 == STAGES ? 0 : load_slot + 1;
      fetch.advance(g, BN);
    }
    cp_async_commit();
  };

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
    const T* sA = stage_a(s);
    const int lda = Cfg::kLdA;
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

}  // namespace
}  // namespace cvk
