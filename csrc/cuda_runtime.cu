// The CUDA build's runtime queries and host-memory registration. The module is
// imported on machines with no GPU and no driver, so nothing here may fail or
// abort when the driver is missing: device_count() reports 0 instead.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "cuda_api.h"

#ifndef LMCACHE_EXT_CUDA_ARCHS
#error "LMCACHE_EXT_CUDA_ARCHS must be defined by the build (a comma-separated list such as \"80,90\")"
#endif

namespace lmc::cuda {

// Shared with page_copy_cuda.cu. A failed call also leaves its error as the
// thread's "last error"; clearing it here keeps a later cudaGetLastError()
// check from blaming the next, unrelated launch.
Status check_cuda(cudaError_t err, const std::string& call) {
  if (err == cudaSuccess) return Status::Ok();
  cudaGetLastError();
  return Status::CudaError(call + " failed: " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

bool built_with_cuda() { return true; }

// CMake passes the list comma-separated (a ';' would split the definition);
// we report it ';'-separated, the way LMCACHE_EXT_CUDA_ARCHS is written.
std::string built_archs() {
  std::string archs = LMCACHE_EXT_CUDA_ARCHS;
  std::replace(archs.begin(), archs.end(), ',', ';');
  return archs;
}

int runtime_version() {
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for us
    return 0;
  }
  return count;
}

namespace {

Status require_device(const char* call) {
  if (device_count() > 0) return Status::Ok();
  return Status::Unavailable(std::string(call) + " needs a CUDA device, and none is visible");
}

}  // namespace

Status host_register(void* ptr, std::size_t bytes) {
  if (ptr == nullptr) return Status::InvalidArgument("host_register: ptr is a null address");
  if (bytes == 0) return Status::InvalidArgument("host_register: bytes = 0 must be positive");
  Status st = require_device("cudaHostRegister");
  if (!st.ok()) return st;
  return check_cuda(cudaHostRegister(ptr, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped),
                    "cudaHostRegister(" + std::to_string(bytes) + " bytes)");
}

Status host_unregister(void* ptr) {
  if (ptr == nullptr) return Status::InvalidArgument("host_unregister: ptr is a null address");
  Status st = require_device("cudaHostUnregister");
  if (!st.ok()) return st;
  return check_cuda(cudaHostUnregister(ptr), "cudaHostUnregister");
}

}  // namespace lmc::cuda
