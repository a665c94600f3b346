// Python bindings of the fused VAE conv. Tensors arrive as raw addresses (ints, 0 = none), sizes
// and the stream as integers; Python (ops/vae_conv/native.py) has checked them already, the
// checks here only guard against misuse of the raw binding.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "vae_conv/vae_conv.h"

namespace py = pybind11;

namespace cvk {
namespace vae {
namespace {

template <typename P = const void*>
P ptr(std::uintptr_t a) {
  return reinterpret_cast<P>(a);
}

VaeConvParams make_params(const py::dict& t, const py::dict& s) {
  VaeConvParams p;
  auto addr = [&](const char* name) -> std::uintptr_t {
    return t.contains(name) ? t[name].cast<std::uintptr_t>() : 0;
  };
  p.x = ptr(addr("x"));
  p.weight = ptr(addr("weight"));
  p.bias = ptr(addr("bias"));
  p.norm_weight = ptr(addr("norm_weight"));
  p.norm_bias = ptr(addr("norm_bias"));
  p.scale = ptr(addr("scale"));
  p.shift = ptr(addr("shift"));
  p.cache = ptr(addr("cache"));
  p.residual = ptr(addr("residual"));
  p.norm_coef = ptr<const float*>(addr("norm_coef"));
  p.zq = ptr(addr("zq"));
  p.zq_index = ptr<const int32_t*>(addr("zq_index"));
  p.scale_weight = ptr(addr("scale_weight"));
  p.scale_bias = ptr(addr("scale_bias"));
  p.shift_weight = ptr(addr("shift_weight"));
  p.shift_bias = ptr(addr("shift_bias"));
  p.y = ptr<void*>(addr("y"));
  p.new_cache = ptr<void*>(addr("new_cache"));
  p.batch = s["batch"].cast<int64_t>();
  p.c_in = s["c_in"].cast<int64_t>();
  p.c_out = s["c_out"].cast<int64_t>();
  p.frames = s["frames"].cast<int64_t>();
  p.height = s["height"].cast<int64_t>();
  p.width = s["width"].cast<int64_t>();
  p.kt = s["kt"].cast<int>();
  p.kh = s["kh"].cast<int>();
  p.kw = s["kw"].cast<int>();
  p.pad_mode = s["pad_mode"].cast<int>();
  p.groups = s["groups"].cast<int>();
  p.eps = s["eps"].cast<float>();
  p.silu = s["silu"].cast<bool>();
  auto frames_size = [&](const char* name) -> int64_t { return s.contains(name) ? s[name].cast<int64_t>() : 0; };
  p.x_tc = frames_size("x_tc");
  p.scale_tc = frames_size("scale_tc");
  p.res_tc = frames_size("res_tc");
  p.y_tc = frames_size("y_tc");
  p.zq_c = frames_size("zq_c");
  p.zq_t = frames_size("zq_t");
  p.zq_h = frames_size("zq_h");
  p.zq_w = frames_size("zq_w");
  if (p.zq && (!p.zq_index || !p.scale_weight || !p.shift_weight || p.zq_c < 1 || p.zq_t < 1 || p.zq_h < 1 ||
               p.zq_w < 1 || p.scale || (p.groups == 0 && !p.norm_coef)))
    throw std::invalid_argument("vae_conv3d: zq needs zq_index, scale_weight, shift_weight, sizes zq_c/t/h/w >= 1, "
                                "GroupNorm on and no scale / shift");
  if (!p.zq && (p.zq_index || p.scale_weight || p.shift_weight || p.scale_bias || p.shift_bias))
    throw std::invalid_argument("vae_conv3d: zq_index and the modulation weights come with zq");
  for (int64_t tc : {p.x_tc, p.scale_tc, p.res_tc, p.y_tc})
    if (tc != 0 && tc < p.frames) throw std::invalid_argument("vae_conv3d: *_tc must be 0 or >= frames");
  if (p.batch < 1 || p.c_in < 1 || p.c_out < 1 || p.frames < 1 || p.height < 1 || p.width < 1)
    throw std::invalid_argument("vae_conv3d: every size must be >= 1");
  if (p.kt < 1 || p.kh < 1 || p.kw < 1 || p.kh % 2 == 0 || p.kw % 2 == 0)
    throw std::invalid_argument("vae_conv3d: kt >= 1 and odd kh, kw are supported");
  if (p.pad_mode != kPadReplicate && p.pad_mode != kPadZeros)
    throw std::invalid_argument("vae_conv3d: pad_mode code must be 0 (replicate) or 1 (zeros)");
  if (p.groups < 0 || (p.groups > 0 && p.c_in % p.groups != 0))
    throw std::invalid_argument("vae_conv3d: groups=" + std::to_string(p.groups) +
                                " must divide c_in=" + std::to_string(p.c_in));
  if (p.norm_coef && p.groups != 0)
    throw std::invalid_argument("vae_conv3d: norm_coef replaces the statistics: groups must be 0");
  if ((p.scale == nullptr) != (p.shift == nullptr))
    throw std::invalid_argument("vae_conv3d: scale and shift come together");
  if (!p.x || !p.weight || !p.y || (p.kt > 1 && !p.new_cache))
    throw std::invalid_argument("vae_conv3d: x, weight, y and new_cache need addresses");
  return p;
}

}  // namespace

#ifndef COGVIDEOX_WITH_CUDA
void vae_conv3d_cuda(const VaeConvParams&, const VaeConvWorkspace&, int, int, std::uintptr_t) {
  throw std::runtime_error("vae_conv3d_cuda: the extension was built without CUDA (no nvcc)");
}
void vae_gn_coef_cuda(const VaeConvParams&, const VaeConvWorkspace&, int, int, std::uintptr_t) {
  throw std::runtime_error("vae_gn_coef_cuda: the extension was built without CUDA (no nvcc)");
}
#endif

void register_vae_conv(py::module_& m) {
  m.def(
      "vae_conv3d_cpu",
      [](const py::dict& tensors, const py::dict& sizes, int dtype) {
        const VaeConvParams p = make_params(tensors, sizes);
        py::gil_scoped_release release;
        vae_conv3d_cpu(p, dtype);
      },
      py::arg("tensors"), py::arg("sizes"), py::arg("dtype"),
      "Fused VAE conv on the CPU. tensors: name -> address of a contiguous tensor (x, weight "
      "[C_out, C_in, kt, kh, kw], bias, norm_weight, norm_bias, scale, shift, cache, residual, y, "
      "new_cache); sizes: batch, c_in, c_out, frames, height, width, kt, kh, kw, pad_mode (0 "
      "replicate, 1 zeros), groups (0 = no GroupNorm), eps, silu");
  m.def(
      "vae_conv3d_cuda",
      [](const py::dict& tensors, const py::dict& sizes, int dtype, int device, std::uintptr_t stream) {
        const VaeConvParams p = make_params(tensors, sizes);
        VaeConvWorkspace ws;
        auto addr = [&](const char* name) -> std::uintptr_t {
          return tensors.contains(name) ? tensors[name].cast<std::uintptr_t>() : 0;
        };
        ws.act = reinterpret_cast<void*>(addr("act"));
        ws.cache_cl = reinterpret_cast<void*>(addr("cache_cl"));
        ws.partial = reinterpret_cast<double*>(addr("partial"));
        ws.coef = reinterpret_cast<float*>(addr("coef"));
        ws.zq_mod = reinterpret_cast<void*>(addr("zq_mod"));
        ws.splits = sizes["splits"].cast<int>();
        vae_conv3d_cuda(p, ws, dtype, device, stream);
      },
      py::arg("tensors"), py::arg("sizes"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      "Fused VAE conv on a CUDA device, launched on `stream` (cudaStream_t as an int). Like "
      "vae_conv3d_cpu, with weight packed [C_out, kt, C_in/16, 9, 16] and the workspaces act, "
      "cache_cl, partial, coef, zq_mod (addresses) and splits (size)");
  m.def(
      "vae_gn_coef_cuda",
      [](const py::dict& tensors, const py::dict& sizes, int dtype, int device, std::uintptr_t stream) {
        auto addr = [&](const char* name) -> std::uintptr_t {
          return tensors.contains(name) ? tensors[name].cast<std::uintptr_t>() : 0;
        };
        VaeConvParams p;
        p.x = ptr(addr("x"));
        p.norm_weight = ptr(addr("norm_weight"));
        p.norm_bias = ptr(addr("norm_bias"));
        p.batch = sizes["batch"].cast<int64_t>();
        p.c_in = sizes["c_in"].cast<int64_t>();
        p.frames = sizes["frames"].cast<int64_t>();
        p.height = sizes["height"].cast<int64_t>();
        p.width = sizes["width"].cast<int64_t>();
        p.groups = sizes["groups"].cast<int>();
        p.eps = sizes["eps"].cast<float>();
        VaeConvWorkspace ws;
        ws.partial = reinterpret_cast<double*>(addr("partial"));
        ws.coef = reinterpret_cast<float*>(addr("coef"));
        ws.splits = sizes["splits"].cast<int>();
        if (!p.x || !ws.partial || !ws.coef || p.groups < 1 || p.c_in % p.groups != 0 || p.batch < 1 ||
            p.frames < 1 || p.height < 1 || p.width < 1 || ws.splits < 1)
          throw std::invalid_argument("vae_gn_coef_cuda: x, partial, coef, sizes >= 1 and groups dividing c_in");
        vae_gn_coef_cuda(p, ws, dtype, device, stream);
      },
      py::arg("tensors"), py::arg("sizes"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      "GroupNorm coefficients only (the statistics pass of vae_conv3d_cuda): tensors x, norm_weight, "
      "norm_bias, partial, coef (float32 [B, C, 2] out: norm(v) = v * a + d); sizes batch, c_in, frames, "
      "height, width, groups, eps, splits");
}

}  // namespace vae
}  // namespace cvk
