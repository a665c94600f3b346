// C++ CPU path of the fused VAE conv: the reference loop nest, sharing the padding, cache and
// GroupNorm maths of vae_conv_index.h with the CUDA kernels. Statistics and accumulation in
// double; the activated input is rounded once to x's dtype (what the CUDA kernel's tensor cores
// read and what the cache stores), the output once at the end.
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "vae_conv/vae_conv.h"

namespace cvk {
namespace vae {
namespace {

// 16-bit float codecs (round to nearest even), written without compiler extensions.
float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float fp16_bits_to_float(uint16_t h) {
  const int exp = (h >> 10) & 0x1f;
  const int man = h & 0x3ff;
  float mag;
  if (exp == 0)
    mag = std::ldexp(float(man), -24);
  else if (exp == 31)
    mag = man ? NAN : INFINITY;
  else
    mag = std::ldexp(float(man + 1024), exp - 25);
  return (h & 0x8000u) ? -mag : mag;
}
uint16_t float_to_fp16_bits(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
  const float a = std::fabs(f);
  if (std::isnan(f)) return uint16_t(sign | 0x7e00u);
  if (a >= 65520.0f) return uint16_t(sign | 0x7c00u);  // rounds to infinity
  if (a < 6.103515625e-05f)                            // subnormal: multiples of 2^-24
    return uint16_t(sign | uint16_t(std::nearbyint(a * 16777216.0f)));
  int e;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  float q = std::nearbyint(m * 2048.0f);
  if (q >= 2048.0f) {
    q *= 0.5f;
    ++e;
  }
  const int exp = e - 1 + 15;
  if (exp >= 31) return uint16_t(sign | 0x7c00u);
  return uint16_t(sign | (exp << 10) | (int(q) & 0x3ff));
}

// Element access by dtype code: load as double, store (rounding) from double.
struct Codec {
  int dtype;
  double load(const void* base, int64_t i) const {
    switch (dtype) {
      case kFloat32: return static_cast<const float*>(base)[i];
      case kFloat64: return static_cast<const double*>(base)[i];
      case kFloat16: return fp16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
      default: return bf16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
    }
  }
  void store(void* base, int64_t i, double v) const {
    switch (dtype) {
      case kFloat32: static_cast<float*>(base)[i] = float(v); break;
      case kFloat64: static_cast<double*>(base)[i] = v; break;
      case kFloat16: static_cast<uint16_t*>(base)[i] = float_to_fp16_bits(float(v)); break;
      default: static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(float(v)); break;
    }
  }
  double round(double v) const {  // v as x's dtype holds it
    switch (dtype) {
      case kFloat32: return double(float(v));
      case kFloat64: return v;
      case kFloat16: return fp16_bits_to_float(float_to_fp16_bits(float(v)));
      default: return bf16_bits_to_float(float_to_bf16_bits(float(v)));
    }
  }
};

}  // namespace

void vae_conv3d_cpu(const VaeConvParams& p, int dtype) {
  if (dtype < kFloat32 || dtype > kBFloat16)
    throw std::invalid_argument("vae_conv3d_cpu: dtype code " + std::to_string(dtype) +
                                " is not supported (0 fp32, 1 fp64, 2 fp16, 3 bf16)");
  const Codec io{dtype};
  const int64_t B = p.batch, C = p.c_in, Co = p.c_out, T = p.frames, H = p.height, W = p.width;
  const int64_t HW = H * W;
  const int nc = p.kt - 1;
  const bool has_cache = p.cache != nullptr;
  const int64_t x_tc = frames_of(p.x_tc, T), s_tc = frames_of(p.scale_tc, T);
  const int64_t r_tc = frames_of(p.res_tc, T), y_tc = frames_of(p.y_tc, T);
  if (p.groups > 0 && x_tc != T)
    throw std::invalid_argument("vae_conv3d_cpu: GroupNorm statistics need x whole (x_tc == T)");

  // 1. GroupNorm coefficients per (b, c): norm(v) = v * a + d.
  std::vector<double> coef_a(size_t(B * C), 1.0), coef_d(size_t(B * C), 0.0);
  if (p.norm_coef) {
    for (int64_t i = 0; i < B * C; ++i) {
      coef_a[size_t(i)] = p.norm_coef[2 * i];
      coef_d[size_t(i)] = p.norm_coef[2 * i + 1];
    }
  } else if (p.groups > 0) {
    const int64_t span = group_span(C, p.groups, T, HW);
    const int64_t cpg = C / p.groups;
    for (int64_t bg = 0; bg < B * p.groups; ++bg) {
      const int64_t start = bg * span;
      const double pivot = io.load(p.x, start);
      double s = 0.0, ss = 0.0;
      for (int64_t i = 0; i < span; ++i) {
        const double v = io.load(p.x, start + i) - pivot;
        s += v;
        ss += v * v;
      }
      const GroupStats st = group_stats(s, ss, double(span), pivot, double(p.eps));
      const int64_t b = bg / p.groups, g = bg % p.groups;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const double gamma = p.norm_weight ? io.load(p.norm_weight, c) : 1.0;
        const double beta = p.norm_bias ? io.load(p.norm_bias, c) : 0.0;
        const double a = st.rstd * gamma;
        coef_a[size_t(b * C + c)] = a;
        coef_d[size_t(b * C + c)] = beta - st.mean * a;
      }
    }
  }

  // 2. act(x), rounded to x's dtype, [B, C, T, HW]; the cache as doubles [B, C, kt-1, HW].
  std::vector<double> act(size_t(B * C * T * HW));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t f = 0; f < T; ++f)
        for (int64_t i = 0; i < HW; ++i) {
          const int64_t off = ((b * C + c) * T + f) * HW + i;
          double v = io.load(p.x, ((b * C + c) * x_tc + f) * HW + i);
          if (p.groups > 0 || p.norm_coef) v = v * coef_a[size_t(b * C + c)] + coef_d[size_t(b * C + c)];
          const int64_t soff = ((b * C + c) * s_tc + f) * HW + i;
          if (p.scale) v = v * io.load(p.scale, soff) + io.load(p.shift, soff);
          if (p.zq) {  // scale / shift = conv_y / conv_b of the zq pixel, rounded as diffusers' conv outputs
            const int64_t z0 = zq_offset(p, b, f, i), zstride = p.zq_t * p.zq_h * p.zq_w;
            double sc = p.scale_bias ? io.load(p.scale_bias, c) : 0.0;
            double sh = p.shift_bias ? io.load(p.shift_bias, c) : 0.0;
            for (int64_t k = 0; k < p.zq_c; ++k) {
              const double z = io.load(p.zq, z0 + k * zstride);
              sc += io.load(p.scale_weight, c * p.zq_c + k) * z;
              sh += io.load(p.shift_weight, c * p.zq_c + k) * z;
            }
            v = v * io.round(sc) + io.round(sh);
          }
          if (p.silu) v = silu(v);
          act[size_t(off)] = io.round(v);
        }
  std::vector<double> cache;
  if (has_cache) {
    cache.resize(size_t(B * C * nc * HW));
    for (size_t i = 0; i < cache.size(); ++i) cache[i] = io.load(p.cache, int64_t(i));
  }
  // Plane (b, c) of padded frame P, or null for a zero frame.
  auto plane = [&](int64_t b, int64_t c, int64_t P) -> const double* {
    const FrameSource s = padded_source(P, p.kt, p.pad_mode, has_cache);
    if (s.kind == kFromZero) return nullptr;
    if (s.kind == kFromCache) return cache.data() + ((b * C + c) * nc + s.frame) * HW;
    return act.data() + ((b * C + c) * T + s.frame) * HW;
  };

  // 3. The conv, bias and residual; one rounding.
  std::vector<double> acc(static_cast<size_t>(HW));
  const int64_t taps = int64_t(p.kt) * p.kh * p.kw;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t t = 0; t < T; ++t) {
        const double bias = p.bias ? io.load(p.bias, co) : 0.0;
        for (auto& v : acc) v = bias;
        for (int64_t ci = 0; ci < C; ++ci)
          for (int j = 0; j < p.kt; ++j) {
            const double* src = plane(b, ci, t + j);
            if (!src) continue;
            for (int dh = 0; dh < p.kh; ++dh)
              for (int dw = 0; dw < p.kw; ++dw) {
                const double w = io.load(p.weight, (co * C + ci) * taps + (j * p.kh + dh) * p.kw + dw);
                for (int64_t h = 0; h < H; ++h) {
                  const int64_t hi = spatial_source(h, dh, p.kh, H);
                  if (hi < 0) continue;
                  for (int64_t x = 0; x < W; ++x) {
                    const int64_t wi = spatial_source(x, dw, p.kw, W);
                    if (wi >= 0) acc[size_t(h * W + x)] += w * src[hi * W + wi];
                  }
                }
              }
          }
        const int64_t out = ((b * Co + co) * y_tc + t) * HW, res = ((b * Co + co) * r_tc + t) * HW;
        for (int64_t i = 0; i < HW; ++i) {
          const double r = p.residual ? io.load(p.residual, res + i) : 0.0;
          io.store(p.y, out + i, acc[size_t(i)] + r);
        }
      }

  // 4. new_cache slot i = padded frame T + i (values already in x's dtype: stored exactly).
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int i = 0; i < nc; ++i) {
        const double* src = plane(b, c, T + i);
        const int64_t dst = ((b * C + c) * nc + i) * HW;
        for (int64_t k = 0; k < HW; ++k) io.store(p.new_cache, dst + k, src ? src[k] : 0.0);
      }
}

}  // namespace vae
}  // namespace cvk
