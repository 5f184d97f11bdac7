// The CUDA build's runtime queries, device scopes and host-memory registration. The
// module is imported on machines with no GPU and no driver, so nothing here may fail
// or abort when the driver is missing: device_count() reports 0 instead.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "cuda_api.h"
#include "cuda_device.h"

#ifndef LMCACHE_EXT_CUDA_ARCHS
#error "LMCACHE_EXT_CUDA_ARCHS must be defined by the build (a comma-separated list such as \"80,90\")"
#endif

namespace lmc::cuda {

// A failed call also leaves its error as the thread's "last error"; clearing it here
// keeps a later cudaGetLastError() check from blaming the next, unrelated launch.
Status check_cuda(cudaError_t err, const std::string& call) {
  if (err == cudaSuccess) return Status::Ok();
  cudaGetLastError();
  return Status::CudaError(call + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
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

// The driver's view of the thread's current context, reached through the runtime
// (the module links no libcuda). Null entries where the driver lacks them: then a
// scope sets its device and leaves it current.
struct DriverContextCalls {
  PFN_cuCtxGetCurrent_v4000 get = nullptr;
  PFN_cuCtxSetCurrent_v4000 set = nullptr;
};

template <typename Fn>
Fn driver_entry(const char* symbol) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion(symbol, &fn, 12000, cudaEnableDefault, &found) != cudaSuccess ||
      found != cudaDriverEntryPointSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return reinterpret_cast<Fn>(fn);
}

const DriverContextCalls& driver_context_calls() {
  static const DriverContextCalls calls{driver_entry<PFN_cuCtxGetCurrent_v4000>("cuCtxGetCurrent"),
                                        driver_entry<PFN_cuCtxSetCurrent_v4000>("cuCtxSetCurrent")};
  return calls;
}

std::string devices_visible(int count) {
  return std::to_string(count) + (count == 1 ? " CUDA device is visible" : " CUDA devices are visible");
}

}  // namespace

Status DeviceScope::enter(int device, const std::string& call) {
  const int count = device_count();
  if (count == 0) return Status::Unavailable(call + " needs a CUDA device, and none is visible");
  if (device < 0 || device >= count)
    return Status::InvalidArgument("device = " + std::to_string(device) +
                                   " is out of range: " + devices_visible(count));
  const DriverContextCalls& driver = driver_context_calls();
  CUcontext before = nullptr;
  const bool known = driver.get != nullptr && driver.set != nullptr && driver.get(&before) == CUDA_SUCCESS;
  int current = -1;
  if (known && before != nullptr && cudaGetDevice(&current) == cudaSuccess && current == device) return Status::Ok();
  Status st = check_cuda(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
  if (!st.ok()) return st;
  saved_ = before;
  restore_ = known;
  return Status::Ok();
}

DeviceScope::~DeviceScope() {
  if (restore_) driver_context_calls().set(static_cast<CUcontext>(saved_));
}

Status current_device(int* device) {
  if (device_count() == 0) return Status::Unavailable("no CUDA device is visible");
  return check_cuda(cudaGetDevice(device), "cudaGetDevice");
}

Status host_register(void* ptr, std::size_t bytes, int device, int64_t* device_ptr) {
  if (ptr == nullptr) return Status::InvalidArgument("host_register: ptr is a null address");
  if (bytes == 0) return Status::InvalidArgument("host_register: bytes = 0 must be positive");
  DeviceScope scope;
  Status st = scope.enter(device, "cudaHostRegister");
  if (!st.ok()) return st;
  const std::string on = " on CUDA device " + std::to_string(device);
  int host_pointer_works = 0;
  st = check_cuda(cudaDeviceGetAttribute(&host_pointer_works, cudaDevAttrCanUseHostPointerForRegisteredMem, device),
                  "cudaDeviceGetAttribute(CanUseHostPointerForRegisteredMem)" + on);
  if (!st.ok()) return st;
  st = check_cuda(cudaHostRegister(ptr, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped),
                  "cudaHostRegister(" + std::to_string(bytes) + " bytes)" + on);
  if (!st.ok()) return st;
  void* mapped = ptr;
  if (!host_pointer_works) {
    st = check_cuda(cudaHostGetDevicePointer(&mapped, ptr, 0), "cudaHostGetDevicePointer" + on);
    if (!st.ok()) {
      cudaHostUnregister(ptr);
      return st;
    }
  }
  *device_ptr = reinterpret_cast<int64_t>(mapped);
  return Status::Ok();
}

Status host_unregister(void* ptr, int device) {
  if (ptr == nullptr) return Status::InvalidArgument("host_unregister: ptr is a null address");
  DeviceScope scope;
  Status st = scope.enter(device, "cudaHostUnregister");
  if (!st.ok()) return st;
  return check_cuda(cudaHostUnregister(ptr), "cudaHostUnregister");
}

}  // namespace lmc::cuda
