// The fused VAE conv's MMA core: implicit-GEMM causal (kt, 3, 3) conv on the tensor cores over the
// channels-last activation (act / cache_cl from cuda_prep.cuh), + bias + residual, one rounding.
// Included once, by vae_conv_cuda.cu (the launchers); tile and pipeline constants in cuda_tiles.h.
//
// mma.sync m16n8k16 (fp32 accumulation), ldmatrix, a kStages-deep cp.async pipeline. A block owns
// kBM output channels x a kTH x kTW pixel tile of one output frame. Per pipeline step (one temporal
// tap dt, kCK input channels) it loads the 18x18 halo of the source frame (the spatial zero padding
// is a zero-fill of the copy, the temporal padding a choice of source frame) and the weights of the
// 9 spatial taps; the 9 taps are then 9 shifted ldmatrix windows of the same halo (each input pixel
// is fetched once per step, not 9 times).
#pragma once
#include "common/mma_sm80.cuh"
#include "vae_conv/cuda_tiles.h"
#include "vae_conv/vae_conv_index.h"

namespace cvk {
namespace vae {
namespace {

using namespace cvk::sm80;

struct ConvArgs {
  const void* act;       // [B, T, H, W, C_in]
  const void* cache_cl;  // [B, kt-1, H, W, C_in] or null
  const void* weight;    // [C_out, kt, C_in/16, 9, 16]
  const void* bias;
  const void* residual;
  void* y;
  int64_t c_in, c_out, frames, height, width;
  int64_t y_tc, res_tc;  // frames of y's and residual's containing tensors (see VaeConvParams)
  int kt, pad_mode, tiles_w;
  int pair_store;  // W even and y / residual 4-byte aligned: store output pairs
};

template <typename T>
__global__ void __launch_bounds__(kConvThreads, 1) _vae_conv3x3_fwd_kernel(ConvArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x;
  const int64_t C = a.c_in, H = a.height, W = a.width, HW = H * W, Tn = a.frames;
  const int co0 = int(blockIdx.x) * kBM;
  const int h0 = int(blockIdx.y) / a.tiles_w * kTH;
  const int w0 = int(blockIdx.y) % a.tiles_w * kTW;
  const int64_t b = blockIdx.z / Tn, t = blockIdx.z % Tn;
  const int ci_chunks = int(C / kCK);
  const int nk = a.kt * ci_chunks;
  const int64_t k_total = int64_t(nk) * (kTaps2d * kCK);
  const bool has_cache = a.cache_cl != nullptr;
  const T* act = static_cast<const T*>(a.act);
  const T* cache = static_cast<const T*>(a.cache_cl);
  const T* wp = static_cast<const T*>(a.weight);

  // This thread's halo chunks: offset inside one channels-last frame, -1 in the zero padding.
  int64_t h_off[kHChunks];
#pragma unroll
  for (int i = 0; i < kHChunks; ++i) {
    const int c = tid + i * kConvThreads;
    h_off[i] = -1;
    if (c < kHaloPx * 2) {
      const int px = c >> 1, half = c & 1;
      const int h = h0 + px / kHaloW - 1, w = w0 + px % kHaloW - 1;
      if (h >= 0 && h < H && w >= 0 && w < W) h_off[i] = (int64_t(h) * W + w) * C + half * 8;
    }
  }

  // Pipeline step kc = (temporal tap dt, channel chunk cc): weights [128][9 x 16] and the halo.
  auto load_stage = [&](int slot, int kc) {
    T* sA = smem + slot * kStage;
    T* sH = sA + kStageA;
    const int dt = kc / ci_chunks;
    const int cc = kc - dt * ci_chunks;
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const int c = tid + i * kConvThreads;
      const int row = c / kAChunksPerRow, col = (c % kAChunksPerRow) * 8;
      const int co = co0 + row;
      const bool ok = co < a.c_out;
      cp_async_16(sA + row * kLdA + col, ok ? wp + co * k_total + int64_t(kc) * (kTaps2d * kCK) + col : wp,
                  ok ? 16 : 0);
    }
    const FrameSource s = padded_source(t + dt, a.kt, a.pad_mode, has_cache);
    const T* base = s.kind == kFromCache ? cache + ((b * (a.kt - 1) + s.frame) * HW) * C
                                         : act + ((b * Tn + s.frame) * HW) * C;
    base += cc * kCK;
#pragma unroll
    for (int i = 0; i < kHChunks; ++i) {
      const int c = tid + i * kConvThreads;
      if (c < kHaloPx * 2) {
        const bool ok = s.kind != kFromZero && h_off[i] >= 0;
        cp_async_16(sH + (c >> 1) * kLdH + (c & 1) * 8, ok ? base + h_off[i] : act, ok ? 16 : 0);
      }
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nk) load_stage(s, s);
    cp_async_commit();
  }

  const int warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4;
  // ldmatrix lane addresses. A: rows wm*64 + lane%16, k columns (lane/16)*8. B (the halo, rows =
  // pixels, 16 channels each): lanes 0-7 / 8-15 pixels 0-7 (channels 0-7 / 8-15), lanes 16-31
  // pixels 8-15; that gives b0, b1 of two n8 tiles. Warp wn covers output rows wn*4 .. wn*4+3.
  const int a_lane = (wm * 64 + (lane & 15)) * kLdA + (lane >> 4) * 8;
  const int ow = (lane & 7) + ((lane >> 4) << 3);
  const int b_lane = ((wn * 4) * kHaloW + ow) * kLdH + ((lane >> 3) & 1) * 8;

  float acc[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

  for (int kc = 0; kc < nk; ++kc) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // step kc is visible; the slot read in step kc-1 may be refilled
    {
      const int next = kc + kStages - 1;
      if (next < nk) load_stage(next % kStages, next);
      cp_async_commit();
    }
    const T* sA = smem + (kc % kStages) * kStage;
    const T* sH = sA + kStageA;
    // Fragments double-buffered by hand (the asm statements keep their order): the ldmatrix of
    // tap s + 1 is issued before the mma of tap s (one buffer, leaving the latency to the warp
    // scheduler, measured within 1%: vae_conv_notes.md).
    uint32_t af[2][4][4], bf[2][4][4];
    auto load_frags = [&](int buf, int tap) {
      const int dh = tap / 3, dw = tap % 3;
#pragma unroll
      for (int i = 0; i < 4; ++i) ldmatrix_x4(af[buf][i], sA + a_lane + i * 16 * kLdA + tap * kCK);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj)
        ldmatrix_x4(bf[buf][jj], sH + b_lane + ((jj + dh) * kHaloW + dw) * kLdH);
    };
    auto mma_frags = [&](int buf) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
          Mma16816<T>::run(acc[i][j], af[buf][i], bf[buf][j / 2][(j % 2) * 2],
                           bf[buf][j / 2][(j % 2) * 2 + 1]);
    };
    load_frags(0, 0);
#pragma unroll
    for (int tap = 0; tap < kTaps2d; ++tap) {
      if (tap + 1 < kTaps2d) load_frags((tap + 1) & 1, tap + 1);
      mma_frags(tap & 1);
    }
  }
  cp_async_wait<0>();  // no copy may be in flight when the block exits

  // Epilogue: bias + residual in float32, one rounding. Accumulator (i, j, r): channel
  // wm*64 + i*16 + lane/4 (+8 for r >= 2), pixel row wn*4 + j/2, column (j%2)*8 + (lane%4)*2 (+1).
  const T* bias = static_cast<const T*>(a.bias);
  const T* residual = static_cast<const T*>(a.residual);
  // y and residual of frame t of batch element b; channel strides tc * H * W (see VaeConvParams)
  const int64_t y_cs = a.y_tc * HW, r_cs = a.res_tc * HW;
  T* y = static_cast<T*>(a.y) + b * a.c_out * y_cs + t * HW;
  residual += residual ? b * a.c_out * r_cs + t * HW : 0;
  const int g8 = lane >> 2, q4 = lane & 3;
  // Pixel offset of accumulator pair (i, hr, j) inside its channel's frame, or -1 outside the tensor.
  auto out_offset = [&](int i, int hr, int j) -> int64_t {
    const int co = co0 + wm * 64 + i * 16 + g8 + hr * 8;
    const int h = h0 + wn * 4 + j / 2;
    const int w = w0 + (j % 2) * 8 + q4 * 2;
    if (co >= a.c_out || h >= H || w >= W) return -1;
    return int64_t(h) * W + w;
  };
  const bool w_tail = !a.pair_store;  // odd W (or unaligned): the second element may be past W
  auto second_ok = [&](int j) { return !w_tail || w0 + (j % 2) * 8 + q4 * 2 + 1 < W; };
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int co = co0 + wm * 64 + i * 16 + g8 + hr * 8;
      const float bv = (bias && co < a.c_out) ? to_float(bias[co]) : 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t px = out_offset(i, hr, j);
        if (px < 0) continue;
        const int64_t o = co * y_cs + px, ro = co * r_cs + px;
        float v0 = acc[i][j][hr * 2] + bv, v1 = acc[i][j][hr * 2 + 1] + bv;
        if (a.pair_store) {  // w even, W even: w + 1 < W and the pair is 4-byte aligned
          if (residual) {
            const float2 r = unpack2(*reinterpret_cast<const uint32_t*>(residual + ro), T{});
            v0 += r.x;
            v1 += r.y;
          }
          *reinterpret_cast<uint32_t*>(y + o) = pack2(from_float<T>(v0), from_float<T>(v1));
        } else {
          if (residual) v0 += to_float(residual[ro]);
          y[o] = from_float<T>(v0);
          if (second_ok(j)) {
            if (residual) v1 += to_float(residual[ro + 1]);
            y[o + 1] = from_float<T>(v1);
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace vae
}  // namespace cvk
