// lmcache_ext._C: the module entry, build_info(), and status -> exception.
#include <pybind11/pybind11.h>

#include "bindings.h"
#include "cuda_api.h"

namespace py = pybind11;

namespace lmc::py_bind {

void throw_if_error(const Status& status) {
  switch (status.code()) {
    case StatusCode::kOk:
      return;
    case StatusCode::kInvalidArgument:
      throw py::value_error(status.message());
    case StatusCode::kOutOfMemory:
      PyErr_SetString(PyExc_MemoryError, status.message().c_str());
      throw py::error_already_set();
    default:
      throw std::runtime_error(status.message());
  }
}

}  // namespace lmc::py_bind

PYBIND11_MODULE(_C, m) {
  m.doc() = "lmcache_ext native core: paged-KV copy kernels and the pinned host slot pool";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["version"] = LMCACHE_EXT_VERSION;
        info["cuda"] = lmc::cuda::built_with_cuda();
        info["cuda_archs"] = lmc::cuda::built_archs();
        info["cuda_runtime_version"] = lmc::cuda::runtime_version();
        return info;
      },
      "What this module was built with: version, CUDA yes/no, CUDA archs, cudart version.");
  m.def("cuda_device_count", &lmc::cuda::device_count,
        "CUDA devices visible now; 0 without CUDA, a driver or a device.");
  lmc::py_bind::bind_page_copy(m);
  lmc::py_bind::bind_host_slot_pool(m);
}
