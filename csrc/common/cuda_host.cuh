// Host-side helpers shared by the extension's CUDA launchers: a checked CUDA call that throws with the
// op's name, and a guard that makes the tensors' device current for a launch and restores it after.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define CVK_CHECK_CUDA(op, expr)                                                                \
  do {                                                                                         \
    cudaError_t err_ = (expr);                                                                 \
    if (err_ != cudaSuccess)                                                                   \
      throw std::runtime_error(std::string(op) + ": " + #expr + " failed: " + cudaGetErrorString(err_)); \
  } while (0)

namespace cvk {

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    CVK_CHECK_CUDA("DeviceGuard", cudaGetDevice(&previous_));
    if (previous_ != device) CVK_CHECK_CUDA("DeviceGuard", cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace cvk
