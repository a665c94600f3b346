// The fused VAE conv's passes before the conv: GroupNorm statistics (partial sums, then per-(b, c)
// coefficients) and the activation pass (norm, modulation, SiLU; to channels-last; the new cache).
// Included once, by vae_conv_cuda.cu (the launchers); block sizes in cuda_tiles.h.
#pragma once
#include "common/mma_sm80.cuh"
#include "vae_conv/cuda_tiles.h"
#include "vae_conv/vae_conv_index.h"

namespace cvk {
namespace vae {
namespace {

using namespace cvk::sm80;

// ------------------------------------------------------------------------------------------------
// 1. GroupNorm statistics
// ------------------------------------------------------------------------------------------------
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
struct PrepArgs {
  VaeConvParams p;
  const float* coef;  // null: no GroupNorm
  const uint32_t* zq_mod;  // p.zq given: the modulation table (see _vae_zq_mod_kernel)
  void* act;
  void* cache_cl;
  int frames_total;  // T (+ kt-1 cache frames)
  int64_t x_tc, scale_tc;  // frames of x's and scale's containing tensors (see VaeConvParams)
};

// The spatial norm's modulation (p.zq given) at zq's own resolution, once per launch: scale / shift =
// conv_y / conv_b of each zq pixel, float32 sums over zq's channels k ascending from 0, the bias added
// last, rounded to T (what diffusers' (1,1,1) convs return on the nearest-resized zq, where every x pixel
// that reads one zq pixel gets that pixel's values). Table [B, C_in, zq_t, zq_h * zq_w] of (scale, shift)
// pairs packed in 32-bit words; the activation pass gathers from it (a few MB: L2 / L1 hits), so the
// per-element cost is one gathered load, not 2 x zq_c multiply-adds. Grid (pixels / threads, C_in, B).
template <typename T>
__global__ void __launch_bounds__(kZqModThreads) _vae_zq_mod_kernel(VaeConvParams p, uint32_t* __restrict__ mod) {
  const int64_t n = p.zq_t * p.zq_h * p.zq_w;  // pixels of one zq channel
  const int64_t i = int64_t(blockIdx.x) * kZqModThreads + threadIdx.x;
  if (i >= n) return;
  const int64_t c = blockIdx.y, b = blockIdx.z;
  const T* zq = static_cast<const T*>(p.zq) + b * p.zq_c * n + i;
  const T* wy = static_cast<const T*>(p.scale_weight) + c * p.zq_c;
  const T* wb = static_cast<const T*>(p.shift_weight) + c * p.zq_c;
  float sc = 0.0f, sh = 0.0f;
  for (int64_t k = 0; k < p.zq_c; ++k) {
    const float z = to_float(zq[k * n]);
    sc = fmaf(to_float(wy[k]), z, sc);
    sh = fmaf(to_float(wb[k]), z, sh);
  }
  if (p.scale_bias) sc += to_float(static_cast<const T*>(p.scale_bias)[c]);
  if (p.shift_bias) sh += to_float(static_cast<const T*>(p.shift_bias)[c]);
  mod[(b * p.c_in + c) * n + i] = pack2(from_float<T>(sc), from_float<T>(sh));
}

// Offset in the table of the zq frame row that x's frame f of channel c reads.
__device__ __forceinline__ int64_t zq_mod_row(const VaeConvParams& p, int64_t b, int64_t c, int64_t f) {
  return ((b * p.c_in + c) * p.zq_t + p.zq_index[f]) * (p.zq_h * p.zq_w);
}
// Offset inside a table row of the zq pixel that x's pixel pix (of a frame) reads.
// (H * W < 2^31, checked by the launcher: 32-bit division.)
__device__ __forceinline__ int32_t zq_mod_pixel(const VaeConvParams& p, int64_t pix) {
  const uint32_t h = uint32_t(pix) / uint32_t(p.width), w = uint32_t(pix) - h * uint32_t(p.width);
  return p.zq_index[p.frames + h] * int32_t(p.zq_w) + p.zq_index[p.frames + p.height + w];
}

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
    const int64_t off = ((b * C + c) * (is_cache ? nf : a.x_tc) + fs) * HW + pix;
    float v = to_float(src[off]);
    if (!is_cache) {
      if (a.coef) v = fmaf(v, a.coef[(b * C + c) * 2], a.coef[(b * C + c) * 2 + 1]);
      const int64_t soff = ((b * C + c) * a.scale_tc + fs) * HW + pix;
      if (scale) v = fmaf(v, to_float(scale[soff]), to_float(shift[soff]));
      if (p.zq) {
        const float2 m = unpack2(a.zq_mod[zq_mod_row(p, b, c, fs) + zq_mod_pixel(p, pix)], T{});
        v = fmaf(v, m.x, m.y);
      }
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
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = unpack2(w[q], T{});
    v[2 * q] = f.x;
    v[2 * q + 1] = f.y;
  }
}
template <typename T>
__device__ __forceinline__ uint4 pack8(const T (&v)[8]) {
  return make_uint4(pack2(v[0], v[1]), pack2(v[2], v[3]), pack2(v[4], v[5]), pack2(v[6], v[7]));
}
// A 16-byte global store that stays one (a plain uint4 store of values read from shared memory as 16-bit
// elements was split by NVVM into four 4-byte stores).
__device__ __forceinline__ void store16(void* dst, uint4 v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

//
// ZQ (p.zq given): the block first writes, for each of its 64 pixels, the offset of the zq pixel it reads
// inside a row of the modulation table (shared memory, 64 ints; x's load is already in flight); a thread
// then gathers its channel's (scale, shift) pairs of its 8 pixels from the table, one 32-bit load per
// distinct zq pixel (the 8 pixels of a thread mostly read one or two).
template <typename T, bool ZQ>
__global__ void __launch_bounds__(kPrepThreads) _vae_prep_vec_kernel(PrepArgs a) {
  static_assert(kPrepCh * kPrepPx / 8 == kPrepThreads, "one 8-element chunk per thread and phase");
  __shared__ T tile[kPrepCh][kPrepPx + 2];  // 33-word rows: both phases bank-conflict free
  __shared__ __align__(16) int32_t zq_pix[ZQ ? kPrepPx : 4];
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
    const bool mine = c < C && pix < HW;  // H*W % 8 == 0: the 8 pixels are all in or all out
    const int64_t off = ((b * C + c) * (is_cache ? nf : a.x_tc) + fs) * HW + pix;
    float v[8];
    if (mine) load8(static_cast<const T*>(is_cache ? p.cache : p.x) + off, v);
    if constexpr (ZQ) {
      if (!is_cache) {  // (block-uniform)
        if (threadIdx.x < kPrepPx && p0 + threadIdx.x < HW) zq_pix[threadIdx.x] = zq_mod_pixel(p, p0 + threadIdx.x);
        __syncthreads();
      }
    }
    if (mine) {
      if (!is_cache) {
        if (a.coef) {
          const float ca = a.coef[(b * C + c) * 2], cd = a.coef[(b * C + c) * 2 + 1];
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = fmaf(v[i], ca, cd);
        }
        if (p.scale) {
          const int64_t soff = ((b * C + c) * a.scale_tc + fs) * HW + pix;
          float sc[8], sh[8];
          load8(static_cast<const T*>(p.scale) + soff, sc);
          load8(static_cast<const T*>(p.shift) + soff, sh);
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = fmaf(v[i], sc[i], sh[i]);
        }
        if constexpr (ZQ) {
          const uint32_t* row = a.zq_mod + zq_mod_row(p, b, c, fs);
          const int4 o0 = *reinterpret_cast<const int4*>(&zq_pix[px0]);
          const int4 o1 = *reinterpret_cast<const int4*>(&zq_pix[px0 + 4]);
          const int32_t o[8] = {o0.x, o0.y, o0.z, o0.w, o1.x, o1.y, o1.z, o1.w};
          uint32_t m = row[o[0]];
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (i > 0 && o[i] != o[i - 1]) m = row[o[i]];
            const float2 ss = unpack2(m, T{});
            v[i] = fmaf(v[i], ss.x, ss.y);
          }
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
        const bool mine_slot = is_cache ? (s.kind == kFromCache && s.frame == fs)
                                        : ((s.kind == kFromInput && s.frame == f) || (s.kind == kFromZero && f == 0));
        if (mine_slot)
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
      store16(dst + ((b * nf + fs) * HW + pix) * C + c, pack8(v));
    }
  }
}

}  // namespace
}  // namespace vae
}  // namespace cvk
