// CUDA-build internals shared by the .cu files: error text and the device scope of
// an entry point.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "status.h"

namespace lmc::cuda {

// kOk, or kCudaError naming the call and CUDA's error name and text.
Status check_cuda(cudaError_t err, const std::string& call);

// Makes a device current on the calling thread for one entry point. On leaving, the
// context that was current before (none included) is current again, so the caller's
// device is unchanged and a thread that had no context keeps none bound.
class DeviceScope {
 public:
  DeviceScope() = default;
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

  // Checks `device` against the visible devices (naming `call` when there is none)
  // and makes it current.
  Status enter(int device, const std::string& call);

 private:
  void* saved_ = nullptr;  // a CUcontext
  bool restore_ = false;
};

}  // namespace lmc::cuda
