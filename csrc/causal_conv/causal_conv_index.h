// Index and padding maths of the causal temporal convolution, shared by the C++ CPU path and the
// CUDA kernels (every function is __host__ __device__ under nvcc).
//
// The padded input is [cache or front padding (kt-1 frames) ; x (T frames)]. No padded copy is ever
// made: each padded frame index is mapped to where its data lives (see padded_source).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define CVK_HD __host__ __device__ __forceinline__
#else
#define CVK_HD inline
#endif

namespace cvk {

enum PadMode : int { kPadReplicate = 0, kPadZeros = 1 };
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Everything a launch needs. Pointers are raw (the extension is not linked against torch); all
// tensors are contiguous: x [B, C_in, T, H, W], weight [C_out, C_in, kt] (kh = kw = 1), bias
// [C_out] or null, cache [B, C_in, kt-1, H, W] or null, y [B, C_out, T_out, H, W],
// new_cache [B, C_in, kt-1, H, W].
struct CausalConvParams {
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* weight_packed = nullptr;  // [C_out, kt, C_in] copy, for the tap-major CUDA kernel
  const void* bias = nullptr;
  const void* cache = nullptr;
  void* y = nullptr;
  void* new_cache = nullptr;
  int64_t batch = 0, c_in = 0, c_out = 0, frames = 0, hw = 0;
  int64_t frames_out = 0;
  int kt = 1, stride = 1, pad_mode = kPadReplicate;
};

CVK_HD int64_t causal_output_frames(int64_t frames, int kt, int stride) {
  // (T + kt-1 - kt) // st + 1
  return (frames - 1) / stride + 1;
}

// Where a frame of the padded input comes from.
enum SourceKind : int { kFromInput = 0, kFromCache = 1, kFromZero = 2 };
struct FrameSource {
  int kind;
  int64_t frame;  // frame index inside x (kFromInput) or cache (kFromCache)
};

// Padded frame P (0 <= P < T + kt - 1): the first kt-1 are the cache, copies of x's frame 0
// (replicate) or zeros; the rest are x's frames.
CVK_HD FrameSource padded_source(int64_t padded_frame, int kt, int pad_mode, bool has_cache) {
  const int64_t front = kt - 1;
  if (padded_frame >= front) return FrameSource{kFromInput, padded_frame - front};
  if (has_cache) return FrameSource{kFromCache, padded_frame};
  if (pad_mode == kPadReplicate) return FrameSource{kFromInput, 0};
  return FrameSource{kFromZero, 0};
}

// Input frame read by output frame t through temporal tap j.
CVK_HD FrameSource tap_source(int64_t out_frame, int tap, int stride, int kt, int pad_mode,
                              bool has_cache) {
  return padded_source(out_frame * stride + tap, kt, pad_mode, has_cache);
}

// new_cache frame i (0 <= i < kt-1) is padded frame T + i: the last kt-1 frames of the padded input.
CVK_HD FrameSource new_cache_source(int64_t i, int64_t frames, int kt, int pad_mode, bool has_cache) {
  return padded_source(frames + i, kt, pad_mode, has_cache);
}

// Element offsets (int64: a [1, 128, 49, 768, 1360] tensor has 6.5e9 elements) of the first pixel
// of frame `frame` of channel c in a [B, C, F, H*W] tensor.
CVK_HD int64_t frame_offset(int64_t b, int64_t c, int64_t frame, int64_t channels, int64_t frames,
                            int64_t hw) {
  return ((b * channels + c) * frames + frame) * hw;
}

// Offset of a source frame (x has T frames, the cache kt-1), or -1 for a zero frame.
CVK_HD int64_t source_offset(FrameSource s, int64_t b, int64_t c, int64_t channels, int64_t frames,
                             int kt, int64_t hw) {
  if (s.kind == kFromZero) return -1;
  const int64_t nf = s.kind == kFromInput ? frames : int64_t(kt - 1);
  return frame_offset(b, c, s.frame, channels, nf, hw);
}

}  // namespace cvk
