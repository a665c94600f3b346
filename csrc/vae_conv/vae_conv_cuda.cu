// CUDA path of the fused VAE conv: GroupNorm-apply (+ spatial-norm modulation) + SiLU + causal
// (kt, 3, 3) conv + bias + residual, bf16/fp16, stride 1. Three steps on the caller's stream:
//
// 1. Statistics (only with GroupNorm): each group of x is one contiguous span; blocks reduce
//    slices of it (float per thread, shifted by the group's first element; double across the
//    block) into partial sums, a second tiny kernel turns them into the per-(b, c) coefficients
//    (a, d) of norm(v) = v * a + d.
// 2. Activation pass: reads x once, applies norm, modulation and SiLU in float32, rounds once,
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
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/mma_sm80.cuh"
#include "vae_conv/vae_conv.h"

namespace cvk {
namespace vae {
namespace {

using namespace cvk::sm80;

#define VAE_CUDA_CHECK(expr)                                                                   \
  do {                                                                                         \
    cudaError_t err_ = (expr);                                                                 \
    if (err_ != cudaSuccess)                                                                   \
      throw std::runtime_error(std::string("vae_conv3d_cuda: ") + #expr + " failed: " +        \
                               cudaGetErrorString(err_));                                      \
  } while (0)

// ------------------------------------------------------------------------------------------------
// 1. GroupNorm statistics
// ------------------------------------------------------------------------------------------------
constexpr int kStatThreads = 256;

template <typename T, bool VEC>
__global__ void __launch_bounds__(kStatThreads)
    _vae_gn_partial_kernel(const T* __restrict__ x, int64_t span, int64_t chunk, int splits,
                           double* __restrict__ partial) {
  const int64_t bg = blockIdx.y;
  const T* base = x + bg * span;
  const float pivot = to_float(base[0]);
  const int64_t lo = int64_t(blockIdx.x) * chunk;
  const int64_t hi = lo + chunk < span ? lo + chunk : span;
  float s = 0.0f, ss = 0.0f;
  if constexpr (VEC) {  // span and chunk are multiples of 8, x is 16-byte aligned
    for (int64_t i = lo + int64_t(threadIdx.x) * 8; i < hi; i += int64_t(kStatThreads) * 8) {
      const uint4 v = *reinterpret_cast<const uint4*>(base + i);
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float2 f = unpack2(words[q], T{});
        const float a = f.x - pivot, b = f.y - pivot;
        s += a + b;
        ss += a * a + b * b;
      }
    }
  } else {
    for (int64_t i = lo + threadIdx.x; i < hi; i += kStatThreads) {
      const float a = to_float(base[i]) - pivot;
      s += a;
      ss += a * a;
    }
  }
  double ds = s, dss = ss;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    ds += __shfl_down_sync(0xffffffffu, ds, o);
    dss += __shfl_down_sync(0xffffffffu, dss, o);
  }
  __shared__ double red[2][kStatThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    red[0][warp] = ds;
    red[1][warp] = dss;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double a = 0.0, b = 0.0;
    for (int w = 0; w < kStatThreads / 32; ++w) {
      a += red[0][w];
      b += red[1][w];
    }
    partial[(bg * splits + blockIdx.x) * 2] = a;
    partial[(bg * splits + blockIdx.x) * 2 + 1] = b;
  }
}

template <typename T>
__global__ void _vae_gn_coef_kernel(const T* __restrict__ x, const double* __restrict__ partial,
                                    int splits, int64_t span, int64_t c_in, int groups,
                                    const T* __restrict__ gamma, const T* __restrict__ beta,
                                    float eps, float* __restrict__ coef) {
  const int64_t bg = blockIdx.x;
  const int64_t b = bg / groups;
  const int64_t g = bg % groups;
  const int64_t cpg = c_in / groups;
  __shared__ double s_mean, s_rstd;
  if (threadIdx.x == 0) {
    double s = 0.0, ss = 0.0;
    for (int i = 0; i < splits; ++i) {  // fixed order: deterministic
      s += partial[(bg * splits + i) * 2];
      ss += partial[(bg * splits + i) * 2 + 1];
    }
    const GroupStats st = group_stats(s, ss, double(span), double(to_float(x[bg * span])), double(eps));
    s_mean = st.mean;
    s_rstd = st.rstd;
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < cpg; c += blockDim.x) {
    const int64_t ch = g * cpg + c;
    const double a = s_rstd * (gamma ? double(to_float(gamma[ch])) : 1.0);
    const double d = (beta ? double(to_float(beta[ch])) : 0.0) - s_mean * a;
    coef[(b * c_in + ch) * 2] = float(a);
    coef[(b * c_in + ch) * 2 + 1] = float(d);
  }
}

// ------------------------------------------------------------------------------------------------
// 2. Activation pass: act(x) to channels-last, the new cache, the cache to channels-last
// ------------------------------------------------------------------------------------------------
constexpr int kPrepPx = 64, kPrepCh = 32, kPrepThreads = 256;

struct PrepArgs {
  VaeConvParams p;
  const float* coef;  // null: no GroupNorm
  void* act;
  void* cache_cl;
  int frames_total;  // T (+ kt-1 cache frames)
};

// Block: 64 pixels x 32 channels of one frame (blockIdx.z = b * frames_total + f; f >= T are the
// cache's frames, copied without the transform). Reads NCTHW along pixels, writes NTHWC along
// channels through a shared-memory tile.
template <typename T>
__global__ void __launch_bounds__(kPrepThreads) _vae_prep_kernel(PrepArgs a) {
  __shared__ T tile[kPrepPx][kPrepCh + 2];
  const VaeConvParams& p = a.p;
  const int64_t HW = p.height * p.width, C = p.c_in, Tn = p.frames;
  const int nc = p.kt - 1;
  const bool has_cache = p.cache != nullptr;
  const int64_t p0 = int64_t(blockIdx.x) * kPrepPx;
  const int64_t c0 = int64_t(blockIdx.y) * kPrepCh;
  const int64_t b = blockIdx.z / a.frames_total;
  const int64_t f = blockIdx.z % a.frames_total;
  const bool is_cache = f >= Tn;
  const int64_t fs = is_cache ? f - Tn : f;  // frame inside x or the cache
  const int64_t nf = is_cache ? nc : Tn;
  const T* src = static_cast<const T*>(is_cache ? p.cache : p.x);
  const T* scale = static_cast<const T*>(p.scale);
  const T* shift = static_cast<const T*>(p.shift);
  T* new_cache = static_cast<T*>(p.new_cache);
#pragma unroll 4
  for (int k = 0; k < kPrepPx * kPrepCh / kPrepThreads; ++k) {
    const int e = threadIdx.x + k * kPrepThreads;
    const int ch = e / kPrepPx, px = e % kPrepPx;
    const int64_t c = c0 + ch, pix = p0 + px;
    if (c >= C || pix >= HW) continue;
    const int64_t off = ((b * C + c) * nf + fs) * HW + pix;
    float v = to_float(src[off]);
    if (!is_cache) {
      if (a.coef) v = fmaf(v, a.coef[(b * C + c) * 2], a.coef[(b * C + c) * 2 + 1]);
      if (scale) v = fmaf(v, to_float(scale[off]), to_float(shift[off]));
      if (p.silu) v = v * __frcp_rn(1.0f + __expf(-v));
    }
    const T out = from_float<T>(v);
    tile[px][ch] = out;
    for (int i = 0; i < nc; ++i) {  // new_cache slot i is padded frame T + i
      const FrameSource s = padded_source(Tn + i, p.kt, p.pad_mode, has_cache);
      const bool mine = is_cache ? (s.kind == kFromCache && s.frame == fs)
                                 : ((s.kind == kFromInput && s.frame == f) || (s.kind == kFromZero && f == 0));
      if (mine) new_cache[((b * C + c) * nc + i) * HW + pix] = s.kind == kFromZero ? from_float<T>(0.0f) : out;
    }
  }
  __syncthreads();
  T* dst = static_cast<T*>(is_cache ? a.cache_cl : a.act);
#pragma unroll 4
  for (int k = 0; k < kPrepPx * kPrepCh / kPrepThreads; ++k) {
    const int e = threadIdx.x + k * kPrepThreads;
    const int px = e / kPrepCh, ch = e % kPrepCh;
    const int64_t c = c0 + ch, pix = p0 + px;
    if (c < C && pix < HW) dst[((b * nf + fs) * HW + pix) * C + c] = tile[px][ch];
  }
}

// The same with 16-byte accesses (H*W % 8 == 0, C_in % 8 == 0, 16-byte aligned tensors): a thread
// reads 8 pixels of one channel (its norm coefficients once), writes 8 channels of one pixel.
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = unpack2(w[q], __nv_bfloat16{});
    v[2 * q] = f.x;
    v[2 * q + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = unpack2(w[q], __half{});
    v[2 * q] = f.x;
    v[2 * q + 1] = f.y;
  }
}
template <typename T>
__device__ __forceinline__ uint4 pack8(const T (&v)[8]) {
  return make_uint4(pack2(v[0], v[1]), pack2(v[2], v[3]), pack2(v[4], v[5]), pack2(v[6], v[7]));
}

template <typename T>
__global__ void __launch_bounds__(kPrepThreads) _vae_prep_vec_kernel(PrepArgs a) {
  static_assert(kPrepCh * kPrepPx / 8 == kPrepThreads, "one 8-element chunk per thread and phase");
  __shared__ T tile[kPrepCh][kPrepPx + 2];  // 33-word rows: both phases bank-conflict free
  const VaeConvParams& p = a.p;
  const int64_t HW = p.height * p.width, C = p.c_in, Tn = p.frames;
  const int nc = p.kt - 1;
  const bool has_cache = p.cache != nullptr;
  const int64_t p0 = int64_t(blockIdx.x) * kPrepPx;
  const int64_t c0 = int64_t(blockIdx.y) * kPrepCh;
  const int64_t b = blockIdx.z / a.frames_total;
  const int64_t f = blockIdx.z % a.frames_total;
  const bool is_cache = f >= Tn;
  const int64_t fs = is_cache ? f - Tn : f;
  const int64_t nf = is_cache ? nc : Tn;
  {
    const int ch = threadIdx.x >> 3, px0 = (threadIdx.x & 7) * 8;
    const int64_t c = c0 + ch, pix = p0 + px0;
    if (c < C && pix < HW) {  // H*W % 8 == 0: the 8 pixels are all in or all out
      const int64_t off = ((b * C + c) * nf + fs) * HW + pix;
      float v[8];
      load8(static_cast<const T*>(is_cache ? p.cache : p.x) + off, v);
      if (!is_cache) {
        if (a.coef) {
          const float ca = a.coef[(b * C + c) * 2], cd = a.coef[(b * C + c) * 2 + 1];
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = fmaf(v[i], ca, cd);
        }
        if (p.scale) {
          float sc[8], sh[8];
          load8(static_cast<const T*>(p.scale) + off, sc);
          load8(static_cast<const T*>(p.shift) + off, sh);
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = fmaf(v[i], sc[i], sh[i]);
        }
        if (p.silu) {
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = v[i] * __frcp_rn(1.0f + __expf(-v[i]));
        }
      }
      T out[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        out[i] = from_float<T>(v[i]);
        tile[ch][px0 + i] = out[i];
      }
      for (int i = 0; i < nc; ++i) {  // new_cache slot i is padded frame T + i
        const FrameSource s = padded_source(Tn + i, p.kt, p.pad_mode, has_cache);
        const bool mine = is_cache ? (s.kind == kFromCache && s.frame == fs)
                                   : ((s.kind == kFromInput && s.frame == f) || (s.kind == kFromZero && f == 0));
        if (mine)
          *reinterpret_cast<uint4*>(static_cast<T*>(p.new_cache) + ((b * C + c) * nc + i) * HW + pix) =
              s.kind == kFromZero ? make_uint4(0u, 0u, 0u, 0u) : pack8(out);
      }
    }
  }
  __syncthreads();
  {
    const int px = threadIdx.x >> 2, cc = (threadIdx.x & 3) * 8;
    const int64_t c = c0 + cc, pix = p0 + px;
    if (c < C && pix < HW) {  // C % 8 == 0: the 8 channels are all in or all out
      T v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = tile[cc + i][px];
      T* dst = static_cast<T*>(is_cache ? a.cache_cl : a.act);
      *reinterpret_cast<uint4*>(dst + ((b * nf + fs) * HW + pix) * C + c) = pack8(v);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// 3. Implicit-GEMM conv (kh = kw = 3) on the tensor cores
// ------------------------------------------------------------------------------------------------
constexpr int kBM = 128;                  // output channels per block
constexpr int kTH = 16, kTW = 16;         // output pixel tile (rows x columns) per block
constexpr int kCK = 16;                   // input channels per pipeline step (one k16 mma step)
constexpr int kHaloW = kTW + 2, kHaloH = kTH + 2, kHaloPx = kHaloW * kHaloH;  // 18 x 18
constexpr int kTaps2d = 9;
constexpr int kLdA = kTaps2d * kCK + 8;   // weight row in smem: 9 taps x 16 ch + 16 B pad (304 B)
constexpr int kLdH = kCK + 8;             // halo pixel row: 16 ch + 16 B pad (48 B)
constexpr int kStageA = kBM * kLdA;       // elements
constexpr int kStageH = kHaloPx * kLdH;
constexpr int kStage = kStageA + kStageH;
constexpr int kConvThreads = 256;         // 8 warps: 2 (64 channels) x 4 (64 pixels = 4 rows)
constexpr int kAChunksPerRow = kTaps2d * kCK / 8;                       // 18
constexpr int kAChunks = kBM * kAChunksPerRow / kConvThreads;           // 9 per thread
constexpr int kHChunks = (kHaloPx * 2 + kConvThreads - 1) / kConvThreads;  // 3 per thread
static_assert(kBM * kAChunksPerRow % kConvThreads == 0, "weight chunks split evenly");
// ldmatrix rows: 304 B and 48 B strides put 8 consecutive rows in 8 distinct 4-bank groups.

struct ConvArgs {
  const void* act;       // [B, T, H, W, C_in]
  const void* cache_cl;  // [B, kt-1, H, W, C_in] or null
  const void* weight;    // [C_out, kt, C_in/16, 9, 16]
  const void* bias;
  const void* residual;
  void* y;
  int64_t c_in, c_out, frames, height, width;
  int kt, pad_mode, tiles_w;
  int pair_store;  // W even and y / residual 4-byte aligned: store output pairs
};

template <typename T, int STAGES, bool DBUF, bool RES_FIRST>
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
  for (int s = 0; s < STAGES - 1; ++s) {
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
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // step kc is visible; the slot read in step kc-1 may be refilled
    {
      const int next = kc + STAGES - 1;
      if (next < nk) load_stage(next % STAGES, next);
      cp_async_commit();
    }
    const T* sA = smem + (kc % STAGES) * kStage;
    const T* sH = sA + kStageA;
    // Fragments double-buffered by hand (the asm statements keep their order): the ldmatrix of
    // tap s + 1 is issued before the mma of tap s.
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
    if constexpr (DBUF) {
      load_frags(0, 0);
#pragma unroll
      for (int tap = 0; tap < kTaps2d; ++tap) {
        if (tap + 1 < kTaps2d) load_frags((tap + 1) & 1, tap + 1);
        mma_frags(tap & 1);
      }
    } else {  // fewer live registers, the warp scheduler hides the ldmatrix latency
#pragma unroll
      for (int tap = 0; tap < kTaps2d; ++tap) {
        load_frags(0, tap);
        mma_frags(0);
      }
    }
  }
  cp_async_wait<0>();  // no copy may be in flight when the block exits

  // Epilogue: bias + residual in float32, one rounding. Accumulator (i, j, r): channel
  // wm*64 + i*16 + lane/4 (+8 for r >= 2), pixel row wn*4 + j/2, column (j%2)*8 + (lane%4)*2 (+1).
  const T* bias = static_cast<const T*>(a.bias);
  const T* residual = static_cast<const T*>(a.residual);
  T* y = static_cast<T*>(a.y);
  const int g8 = lane >> 2, q4 = lane & 3;
  // Output offset of accumulator pair (i, hr, j), or -1 outside the tensor.
  auto out_offset = [&](int i, int hr, int j) -> int64_t {
    const int co = co0 + wm * 64 + i * 16 + g8 + hr * 8;
    const int h = h0 + wn * 4 + j / 2;
    const int w = w0 + (j % 2) * 8 + q4 * 2;
    if (co >= a.c_out || h >= H || w >= W) return -1;
    return ((b * a.c_out + co) * Tn + t) * HW + int64_t(h) * W + w;
  };
  const bool w_tail = !a.pair_store;  // odd W (or unaligned): the second element may be past W
  auto second_ok = [&](int j) { return !w_tail || w0 + (j % 2) * 8 + q4 * 2 + 1 < W; };
  if (RES_FIRST && residual) {
    // Pass 1: every residual load before any store (a store to y could alias residual for the
    // compiler, which then serialises load -> store -> load), added into the accumulators.
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int64_t o = out_offset(i, hr, j);
          if (o < 0) continue;
          if (a.pair_store) {
            const float2 r = unpack2(__ldg(reinterpret_cast<const unsigned int*>(residual + o)), T{});
            acc[i][j][hr * 2] += r.x;
            acc[i][j][hr * 2 + 1] += r.y;
          } else {
            acc[i][j][hr * 2] += to_float(residual[o]);
            if (second_ok(j)) acc[i][j][hr * 2 + 1] += to_float(residual[o + 1]);
          }
        }
    residual = nullptr;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int co = co0 + wm * 64 + i * 16 + g8 + hr * 8;
      const float bv = (bias && co < a.c_out) ? to_float(bias[co]) : 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t o = out_offset(i, hr, j);
        if (o < 0) continue;
        float v0 = acc[i][j][hr * 2] + bv, v1 = acc[i][j][hr * 2 + 1] + bv;
        if (a.pair_store) {  // w even, W even: w + 1 < W and the pair is 4-byte aligned
          if (residual) {
            const float2 r = unpack2(*reinterpret_cast<const uint32_t*>(residual + o), T{});
            v0 += r.x;
            v1 += r.y;
          }
          *reinterpret_cast<uint32_t*>(y + o) = pack2(from_float<T>(v0), from_float<T>(v1));
        } else {
          if (residual) v0 += to_float(residual[o]);
          y[o] = from_float<T>(v0);
          if (second_ok(j)) {
            if (residual) v1 += to_float(residual[o + 1]);
            y[o + 1] = from_float<T>(v1);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------
struct Variant {
  const char* name;
  int stages;
  bool dbuf;       // fragments double-buffered by hand
  bool res_first;  // residual loaded in a pass of its own before the stores
};
constexpr Variant kVariants[] = {{"halo16x16_bm128_s4", 4, true, false},
                                 {"halo16x16_bm128_s3", 3, true, false},
                                 {"halo16x16_bm128_s4_single_frag", 4, false, false},
                                 {"halo16x16_bm128_s3_res_first", 3, true, true}};
// variant 0: variant 2, 1-2% faster than variant 1 at all three VAE shapes in both H200 runs
// (a7485c5, a12da88). Variant 4 (residual first) is NOT measured yet.
constexpr int kDefaultVariant = 2;
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);

int device_max_smem(int device) {
  int v = 0;
  VAE_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return v;
}

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    VAE_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) VAE_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
};

void invalid(const std::string& what) { throw std::invalid_argument("vae_conv3d_cuda: " + what); }

template <typename T, int STAGES, bool DBUF, bool RES_FIRST>
void launch_conv(const ConvArgs& c, int64_t batch, int device, cudaStream_t stream) {
  const size_t smem = size_t(STAGES) * kStage * sizeof(T);
  if (smem > size_t(device_max_smem(device)))
    invalid("the conv tile needs " + std::to_string(smem) + " bytes of shared memory, more than the device allows");
  auto kernel = _vae_conv3x3_fwd_kernel<T, STAGES, DBUF, RES_FIRST>;
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

template <typename T>
void run(const VaeConvParams& p, const VaeConvWorkspace& ws, int device, cudaStream_t stream, int variant) {
  if (p.kh != 3 || p.kw != 3) invalid("only kh = kw = 3 is supported (got " + std::to_string(p.kh) + "x" + std::to_string(p.kw) + ")");
  if (p.kt < 1 || p.kt > 5) invalid("kt must be in [1, 5], got " + std::to_string(p.kt));
  if (p.c_in % kCK != 0) invalid("C_in must be a multiple of 16, got " + std::to_string(p.c_in));
  if (!ws.act || (p.cache && !ws.cache_cl) || (p.groups > 0 && (!ws.partial || !ws.coef)) || ws.splits < 1)
    invalid("missing workspace");
  if (variant < 0 || variant > kNumVariants)
    invalid("variant=" + std::to_string(variant) + " is out of range [0, " + std::to_string(kNumVariants) + "]");
  const int64_t HW = p.height * p.width;
  const int nc = p.kt - 1;
  const uintptr_t x_addr = reinterpret_cast<uintptr_t>(p.x);

  if (p.groups > 0) {
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

  PrepArgs pa;
  pa.p = p;
  pa.coef = p.groups > 0 ? ws.coef : nullptr;
  pa.act = ws.act;
  pa.cache_cl = ws.cache_cl;
  pa.frames_total = int(p.frames + (p.cache ? nc : 0));
  const int64_t prep_z = p.batch * pa.frames_total;
  const int64_t prep_y = (p.c_in + kPrepCh - 1) / kPrepCh;
  const int64_t prep_x = (HW + kPrepPx - 1) / kPrepPx;
  if (prep_z > 65535 || prep_y > 65535 || prep_x > 0x7fffffffLL) invalid("grid too large for this shape");
  const uintptr_t prep_addr = x_addr | reinterpret_cast<uintptr_t>(p.scale) | reinterpret_cast<uintptr_t>(p.shift) |
                              reinterpret_cast<uintptr_t>(p.cache) | reinterpret_cast<uintptr_t>(p.new_cache) |
                              reinterpret_cast<uintptr_t>(ws.act) | reinterpret_cast<uintptr_t>(ws.cache_cl);
  const dim3 prep_grid{unsigned(prep_x), unsigned(prep_y), unsigned(prep_z)};
  if (HW % 8 == 0 && p.c_in % 8 == 0 && prep_addr % 16 == 0)
    _vae_prep_vec_kernel<T><<<prep_grid, kPrepThreads, 0, stream>>>(pa);
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
  c.height = p.height;
  c.width = p.width;
  c.kt = p.kt;
  c.pad_mode = p.pad_mode;
  c.tiles_w = int((p.width + kTW - 1) / kTW);
  const uintptr_t out_addr = reinterpret_cast<uintptr_t>(p.y) | reinterpret_cast<uintptr_t>(p.residual);
  c.pair_store = (p.width % 2 == 0 && out_addr % 4 == 0) ? 1 : 0;
  if (reinterpret_cast<uintptr_t>(p.weight) % 16 != 0) invalid("the packed weight must be 16-byte aligned");
  const Variant& v = kVariants[(variant == 0 ? kDefaultVariant : variant) - 1];
  if (v.res_first)
    launch_conv<T, 3, true, true>(c, p.batch, device, stream);
  else if (v.stages == 4 && v.dbuf)
    launch_conv<T, 4, true, false>(c, p.batch, device, stream);
  else if (v.stages == 4)
    launch_conv<T, 4, false, false>(c, p.batch, device, stream);
  else
    launch_conv<T, 3, true, false>(c, p.batch, device, stream);
}

}  // namespace

void vae_conv3d_cuda(const VaeConvParams& p, const VaeConvWorkspace& ws, int dtype, int device,
                     std::uintptr_t stream_int, int variant) {
  DeviceGuard guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_int);
  switch (dtype) {
    case kBFloat16: run<__nv_bfloat16>(p, ws, device, stream, variant); break;
    case kFloat16: run<__half>(p, ws, device, stream, variant); break;
    default:
      invalid("dtype code " + std::to_string(dtype) + " is not supported (2 fp16, 3 bf16)");
  }
}

std::vector<std::string> vae_conv_cuda_variants() {
  std::vector<std::string> names;
  for (const Variant& v : kVariants) names.emplace_back(v.name);
  return names;
}

}  // namespace vae
}  // namespace cvk
