// pybind11 bindings of the extension. Not linked against torch: every tensor arrives as a raw
// pointer plus sizes/strides, and CUDA launches take the stream as an integer.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace cvk {
void register_causal_conv(py::module_& m);  // csrc/causal_conv/
namespace vae {
void register_vae_conv(py::module_& m);  // csrc/vae_conv/
}
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "cogvideox_kernels native extension (C++ CPU paths, CUDA kernels when built with nvcc)";
  m.def("cuda_available", []() {
#ifdef COGVIDEOX_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the extension was compiled with its CUDA kernels");
  cvk::register_causal_conv(m);
  cvk::vae::register_vae_conv(m);
}
