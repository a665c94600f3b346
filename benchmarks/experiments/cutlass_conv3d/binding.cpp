// torch side of the CUTLASS sm90 conv3d experiment: checks the tensors, allocates the output and
// calls conv3d_sm90.cu. Built at run time on the GPU machine by bench.py (torch.utils.cpp_extension.load).
// Only torch/extension.h is used (no ATen CUDA headers): the stream comes in as an integer.
#include <torch/extension.h>

#include "conv3d_sm90.h"

namespace {

void check_bf16_cuda(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == torch::kBFloat16, name, " must be bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
}

// x: [N, C, D, H, W] with channel stride 1 (e.g. channels_last_3d, or a frame slice of one);
// w: [K, C, T, R, S] with channel stride 1; bias: [K]. Returns y [N, K, Z, P, Q] in channels_last_3d
// (written into `out` when given: it must be exactly that, e.g. NaN-filled by a test).
torch::Tensor conv3d_fprop(torch::Tensor x, torch::Tensor w, torch::Tensor bias, std::vector<int64_t> padding,
                           int64_t config, int64_t stream, std::optional<torch::Tensor> out) {
  check_bf16_cuda(x, "x", 5);
  check_bf16_cuda(w, "weight", 5);
  check_bf16_cuda(bias, "bias", 1);
  TORCH_CHECK_VALUE(padding.size() == 3, "padding must be (pad_d, pad_h, pad_w), got ", padding.size(), " values");
  TORCH_CHECK_VALUE(x.size(1) == w.size(1), "x has ", x.size(1), " channels but weight expects ", w.size(1));
  TORCH_CHECK_VALUE(bias.size(0) == w.size(0) && bias.is_contiguous(),
                    "bias must be contiguous [", w.size(0), "], got ", bias.sizes());
  TORCH_CHECK_VALUE(x.stride(1) == 1, "x needs channel stride 1 (channels_last_3d), got strides ", x.strides());
  TORCH_CHECK_VALUE(w.stride(1) == 1, "weight needs channel stride 1 (channels_last_3d), got strides ", w.strides());
  TORCH_CHECK_VALUE(x.get_device() == w.get_device() && x.get_device() == bias.get_device(),
                    "x, weight and bias must be on one device");
  // TMA: 16-byte aligned base addresses and strides (8 bf16); the bias is read in 16-byte vectors.
  for (int64_t d = 0; d < 5; ++d) {
    TORCH_CHECK_VALUE(x.stride(d) % 8 == 0 || d == 1, "x strides must be multiples of 8 elements, got ", x.strides());
    TORCH_CHECK_VALUE(w.stride(d) % 8 == 0 || d == 1, "weight strides must be multiples of 8 elements, got ", w.strides());
  }
  for (const torch::Tensor* t : {&x, &w, &bias})
    TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "x, weight and bias must be 16-byte aligned");
  TORCH_CHECK_VALUE(x.size(1) % 8 == 0 && w.size(0) % 8 == 0, "channel counts must be multiples of 8, got C ",
                    x.size(1), ", K ", w.size(0));
  TORCH_CHECK_VALUE(config >= 0 && config < cutlass_conv3d::num_configs(), "config must be in [0, ",
                    cutlass_conv3d::num_configs(), "), got ", config);

  cutlass_conv3d::Problem p;
  p.n = x.size(0); p.c = x.size(1); p.d = x.size(2); p.h = x.size(3); p.w_ = x.size(4);
  p.k = w.size(0); p.t = w.size(2); p.r = w.size(3); p.s = w.size(4);
  p.pad_d = padding[0]; p.pad_h = padding[1]; p.pad_w = padding[2];
  // torch dim order (n, c, d, h, w) -> CUTLASS's (n, d, h, w, c)
  const int order[5] = {0, 2, 3, 4, 1};
  for (int i = 0; i < 5; ++i) { p.x_stride[i] = x.stride(order[i]); p.w_stride[i] = w.stride(order[i]); }
  const int64_t z = p.d + 2 * p.pad_d - p.t + 1, pp = p.h + 2 * p.pad_h - p.r + 1, q = p.w_ + 2 * p.pad_w - p.s + 1;
  TORCH_CHECK_VALUE(z > 0 && pp > 0 && q > 0, "empty output for x ", x.sizes(), " weight ", w.sizes());
  torch::Tensor y;
  if (out.has_value()) {
    y = *out;
    check_bf16_cuda(y, "out", 5);
    TORCH_CHECK_VALUE(y.sizes() == torch::IntArrayRef({p.n, p.k, z, pp, q}) &&
                          y.is_contiguous(torch::MemoryFormat::ChannelsLast3d),
                      "out must be a channels_last_3d [", p.n, ", ", p.k, ", ", z, ", ", pp, ", ", q, "] tensor, got ",
                      y.sizes(), " strides ", y.strides());
  } else {
    y = torch::empty({p.n, p.k, z, pp, q}, x.options().memory_format(torch::MemoryFormat::ChannelsLast3d));
  }
  p.x = x.data_ptr(); p.w = w.data_ptr(); p.bias = bias.data_ptr(); p.y = y.data_ptr();

  std::string err = cutlass_conv3d::run(static_cast<int>(config), p, reinterpret_cast<void*>(stream));
  TORCH_CHECK(err.empty(), "cutlass conv3d (", cutlass_conv3d::config_name(config), "): ", err);
  return y;
}

std::vector<std::string> configs() {
  std::vector<std::string> out;
  for (int i = 0; i < cutlass_conv3d::num_configs(); ++i)
    out.push_back(std::string(cutlass_conv3d::config_name(i)) + " (" + cutlass_conv3d::describe(i) + ")");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv3d_fprop", &conv3d_fprop, "CUTLASS sm90 implicit-GEMM conv3d fprop (bf16, bias)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("padding"), py::arg("config"), py::arg("stream"),
        py::arg("out") = py::none());
  m.def("configs", &configs);
}
