// Index, padding and normalisation maths of the fused VAE conv, shared by the C++ CPU path and
// the CUDA kernels (every function is __host__ __device__ under nvcc).
//
// The op:  a = act(x)            act = [GroupNorm-apply] [* scale + shift] [SiLU], in float32
//          xpad = [front ; a]    front = cache (kt-1 frames, already activated), copies of a's
//                                frame 0 (replicate) or zeros; no padded copy is ever made
//          y = conv(xpad) + bias [+ residual]   (kt, kh, kw), stride 1, spatial zero padding
//          new_cache = last kt-1 frames of xpad
// GroupNorm statistics: per batch element and group, over the group's channels and every frame,
// row and column of x as given (what nn.GroupNorm computes on a [B, C, T, H, W] tensor); or,
// with norm_coef, coefficients computed elsewhere (over a longer clip than x: frame chunks of one
// frame batch share their batch's statistics).
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define VAE_HD __host__ __device__ __forceinline__
#else
#define VAE_HD inline
#endif

namespace cvk {
namespace vae {

enum PadMode : int { kPadReplicate = 0, kPadZeros = 1 };
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Every tensor is contiguous: x, scale, shift [B, C_in, T, H, W]; weight [C_out, C_in, kt, kh, kw]
// (CPU) or packed [C_out, kt, C_in/16, kh*kw, 16] (CUDA); bias [C_out]; norm_weight, norm_bias
// [C_in]; cache and new_cache [B, C_in, kt-1, H, W]; residual and y [B, C_out, T, H, W]. Except
// that x, scale / shift, residual and y may each be T consecutive frames of a contiguous tensor of
// more frames (a frame chunk of a frame batch, read and written in place): *_tc is that tensor's
// frame count (element (b, c, t, i) at ((b * C + c) * tc + t) * H * W + i), 0 meaning T.
// Optional tensors are null.
//
// The spatial norm's modulation comes either as scale / shift tensors or from its latent: zq
// [B, zq_c, zq_t, zq_h, zq_w] (contiguous), zq_index (int32 [T + H + W]: the zq frame, row and
// column each frame, row and column of x reads: diffusers' nearest resizing), scale_weight /
// shift_weight [C_in, zq_c] and scale_bias / shift_bias [C_in] (optional): see modulation().
struct VaeConvParams {
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  const void* norm_weight = nullptr;
  const void* norm_bias = nullptr;
  const void* scale = nullptr;
  const void* shift = nullptr;
  const void* cache = nullptr;
  const void* residual = nullptr;
  const float* norm_coef = nullptr;  // [B, C_in, 2] (a, d): GroupNorm-apply v * a + d given, groups == 0
  const void* zq = nullptr;
  const int32_t* zq_index = nullptr;
  const void* scale_weight = nullptr;
  const void* scale_bias = nullptr;
  const void* shift_weight = nullptr;
  const void* shift_bias = nullptr;
  void* y = nullptr;
  void* new_cache = nullptr;
  int64_t batch = 0, c_in = 0, c_out = 0, frames = 0, height = 0, width = 0;
  int kt = 3, kh = 3, kw = 3;
  int pad_mode = kPadReplicate;
  int groups = 0;  // 0: no GroupNorm
  float eps = 1e-6f;
  bool silu = false;
  int64_t x_tc = 0, scale_tc = 0, res_tc = 0, y_tc = 0;  // frames of the containing tensors (0: T)
  int64_t zq_c = 0, zq_t = 0, zq_h = 0, zq_w = 0;          // zq's sizes (zq given)
};

// Offset in zq of channel 0 of the zq pixel that x's element (b, frame f, pixel pix) reads; channel
// k is k * zq_t * zq_h * zq_w further.
VAE_HD int64_t zq_offset(const VaeConvParams& p, int64_t b, int64_t f, int64_t pix) {
  const int64_t h = pix / p.width, w = pix - h * p.width;
  const int32_t* idx = p.zq_index;
  return ((b * p.zq_c * p.zq_t + idx[f]) * p.zq_h + idx[p.frames + h]) * p.zq_w + idx[p.frames + p.height + w];
}

// The frame count a tensor's channel stride is made of (see VaeConvParams).
VAE_HD int64_t frames_of(int64_t tc, int64_t frames) { return tc > 0 ? tc : frames; }

enum SourceKind : int { kFromInput = 0, kFromCache = 1, kFromZero = 2 };
struct FrameSource {
  int kind;
  int64_t frame;  // frame of x (kFromInput) or of the cache (kFromCache)
};

// Padded frame P (0 <= P < T + kt - 1): the first kt-1 are the cache, copies of frame 0
// (replicate) or zeros; the rest are x's (activated) frames. Output frame t reads P = t + j
// through temporal tap j; new_cache slot i is P = T + i.
VAE_HD FrameSource padded_source(int64_t padded_frame, int kt, int pad_mode, bool has_cache) {
  const int64_t front = kt - 1;
  if (padded_frame >= front) return FrameSource{kFromInput, padded_frame - front};
  if (has_cache) return FrameSource{kFromCache, padded_frame};
  if (pad_mode == kPadReplicate) return FrameSource{kFromInput, 0};
  return FrameSource{kFromZero, 0};
}

// Input row (or column) read by output row `out` through spatial tap `tap` of a k-wide kernel
// with zero padding k/2; -1 when it falls in the padding.
VAE_HD int64_t spatial_source(int64_t out, int tap, int k, int64_t size) {
  const int64_t in = out + tap - k / 2;
  return (in >= 0 && in < size) ? in : -1;
}

// Elements of one GroupNorm group of x: it is one contiguous span of x starting at
// (b * groups + g) * span, because the group's channels are neighbours in [B, C, T, H, W].
VAE_HD int64_t group_span(int64_t c_in, int groups, int64_t frames, int64_t hw) {
  return c_in / groups * frames * hw;
}

// GroupNorm-apply folded into one multiply-add per element: norm(v) = v * a + d with
// a = rstd * gamma, d = beta - mean * a. The statistics come as sums of (v - pivot) and
// (v - pivot)^2 over the group's `count` elements (shifting by one of its own elements keeps the
// variance accurate when |mean| >> std). Biased variance, like nn.GroupNorm.
struct GroupStats {
  double mean, rstd;
};
VAE_HD GroupStats group_stats(double sum, double sumsq, double count, double pivot, double eps) {
  const double m = sum / count;
  double var = sumsq / count - m * m;
  var = var > 0.0 ? var : 0.0;
  return GroupStats{pivot + m, 1.0 / sqrt(var + eps)};
}

VAE_HD float silu(float v) { return v / (1.0f + expf(-v)); }
VAE_HD double silu(double v) { return v / (1.0 + exp(-v)); }

}  // namespace vae
}  // namespace cvk
