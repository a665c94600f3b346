// C++ CPU path of the causal temporal convolution: the reference loop nest, sharing the padding
// maths of causal_conv_index.h with the CUDA kernels. Correct for every shape the op accepts and
// fast enough for the small shapes of tests.
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "causal_conv/causal_conv.h"

namespace cvk {
namespace {

// --- 16-bit float conversions (round to nearest even), so no compiler extension is needed ---
inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  float mag;
  if (exp == 0) {
    mag = std::ldexp(float(man), -24);  // zero and subnormals
  } else if (exp == 31) {
    mag = man ? NAN : INFINITY;
  } else {
    mag = std::ldexp(float(man | 0x400u), int(exp) - 25);
  }
  uint32_t u;
  std::memcpy(&u, &mag, 4);
  u |= sign;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_fp16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return uint16_t(sign | 0x7e00u);
  if (a >= 65520.0f) return uint16_t(sign | 0x7c00u);  // rounds to inf
  if (a < 6.103515625e-05f) {                           // subnormal range: units of 2^-24
    const float q = std::nearbyint(a * 16777216.0f);    // default rounding: to nearest even
    return uint16_t(sign | uint16_t(q));
  }
  int e;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  // 11 significant bits: value = round(m * 2^11) * 2^(e-11)
  float q = std::nearbyint(m * 2048.0f);
  if (q >= 2048.0f) {
    q *= 0.5f;
    e += 1;
  }
  const uint32_t exp = uint32_t(e - 1 + 15);
  if (exp >= 31) return uint16_t(sign | 0x7c00u);
  return uint16_t(sign | (exp << 10) | (uint32_t(q) & 0x3ffu));
}

template <typename Acc, typename Load>
void conv_loop(const CausalConvParams& p, const Acc* x, const Acc* cache, const Acc* weight,
               const Acc* bias, Load store_row) {
  const int64_t hw = p.hw;
  std::vector<Acc> acc(static_cast<size_t>(hw));
  const bool has_cache = cache != nullptr;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t t = 0; t < p.frames_out; ++t) {
      for (int64_t co = 0; co < p.c_out; ++co) {
        const Acc init = bias ? bias[co] : Acc(0);
        for (int64_t i = 0; i < hw; ++i) acc[i] = init;
        for (int64_t ci = 0; ci < p.c_in; ++ci) {
          for (int j = 0; j < p.kt; ++j) {
            const FrameSource s = tap_source(t, j, p.stride, p.kt, p.pad_mode, has_cache);
            if (s.kind == kFromZero) continue;
            const Acc* src = (s.kind == kFromInput ? x : cache) +
                             source_offset(s, b, ci, p.c_in, p.frames, p.kt, hw);
            const Acc w = weight[(co * p.c_in + ci) * p.kt + j];
            for (int64_t i = 0; i < hw; ++i) acc[i] += w * src[i];
          }
        }
        store_row(frame_offset(b, co, t, p.c_out, p.frames_out, hw), acc.data());
      }
    }
  }
}

// new_cache = the last kt-1 frames of the padded input, copied from wherever they live.
template <typename T>
void write_new_cache(const CausalConvParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* cache = static_cast<const T*>(p.cache);
  T* out = static_cast<T*>(p.new_cache);
  const int nc = p.kt - 1;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t c = 0; c < p.c_in; ++c)
      for (int i = 0; i < nc; ++i) {
        const FrameSource s = new_cache_source(i, p.frames, p.kt, p.pad_mode, cache != nullptr);
        T* dst = out + frame_offset(b, c, i, p.c_in, nc, p.hw);
        if (s.kind == kFromZero) {
          std::memset(dst, 0, size_t(p.hw) * sizeof(T));
        } else {
          const T* src = (s.kind == kFromInput ? x : cache) +
                         source_offset(s, b, c, p.c_in, p.frames, p.kt, p.hw);
          std::memcpy(dst, src, size_t(p.hw) * sizeof(T));
        }
      }
}

template <typename T>
void run_full_precision(const CausalConvParams& p) {
  // Accumulate in double; fp32 inputs are widened once so the loop stays one type.
  std::vector<double> x(static_cast<size_t>(p.batch * p.c_in * p.frames * p.hw));
  std::vector<double> w(size_t(p.c_out * p.c_in * p.kt)), bias, cache;
  const T* xs = static_cast<const T*>(p.x);
  for (size_t i = 0; i < x.size(); ++i) x[i] = double(xs[i]);
  const T* ws = static_cast<const T*>(p.weight);
  for (size_t i = 0; i < w.size(); ++i) w[i] = double(ws[i]);
  if (p.bias) {
    bias.resize(size_t(p.c_out));
    for (size_t i = 0; i < bias.size(); ++i) bias[i] = double(static_cast<const T*>(p.bias)[i]);
  }
  if (p.cache) {
    cache.resize(size_t(p.batch * p.c_in * (p.kt - 1) * p.hw));
    for (size_t i = 0; i < cache.size(); ++i) cache[i] = double(static_cast<const T*>(p.cache)[i]);
  }
  T* y = static_cast<T*>(p.y);
  conv_loop<double>(p, x.data(), p.cache ? cache.data() : nullptr, w.data(),
                    p.bias ? bias.data() : nullptr, [&](int64_t off, const double* row) {
                      for (int64_t i = 0; i < p.hw; ++i) y[off + i] = T(row[i]);
                    });
}

template <float (*ToFloat)(uint16_t), uint16_t (*FromFloat)(float)>
void run_half(const CausalConvParams& p) {
  auto widen = [](const void* src, int64_t n) {
    std::vector<float> out(static_cast<size_t>(n));
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) out[size_t(i)] = ToFloat(s[i]);
    return out;
  };
  std::vector<float> x = widen(p.x, p.batch * p.c_in * p.frames * p.hw);
  std::vector<float> w = widen(p.weight, p.c_out * p.c_in * p.kt);
  std::vector<float> bias = p.bias ? widen(p.bias, p.c_out) : std::vector<float>();
  std::vector<float> cache =
      p.cache ? widen(p.cache, p.batch * p.c_in * (p.kt - 1) * p.hw) : std::vector<float>();
  uint16_t* y = static_cast<uint16_t*>(p.y);
  conv_loop<float>(p, x.data(), p.cache ? cache.data() : nullptr, w.data(),
                   p.bias ? bias.data() : nullptr, [&](int64_t off, const float* row) {
                     for (int64_t i = 0; i < p.hw; ++i) y[off + i] = FromFloat(row[i]);
                   });
}

}  // namespace

void causal_conv3d_cpu(const CausalConvParams& p, int dtype) {
  switch (dtype) {
    case kFloat32:
      run_full_precision<float>(p);
      write_new_cache<float>(p);
      break;
    case kFloat64:
      run_full_precision<double>(p);
      write_new_cache<double>(p);
      break;
    case kFloat16:
      run_half<fp16_to_float, float_to_fp16>(p);
      write_new_cache<uint16_t>(p);
      break;
    case kBFloat16:
      run_half<bf16_to_float, float_to_bf16>(p);
      write_new_cache<uint16_t>(p);
      break;
    default:
      throw std::invalid_argument("causal_conv3d_cpu: dtype code " + std::to_string(dtype) +
                                  " is not supported (0 fp32, 1 fp64, 2 fp16, 3 bf16)");
  }
}

}  // namespace cvk
