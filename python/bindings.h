// Shared by the binding files of lmcache_ext._C: each binds one part of csrc/.
#pragma once

#include <pybind11/pybind11.h>

#include "status.h"

namespace lmc::py_bind {

// The one place a C++ Status becomes a Python exception:
// kInvalidArgument -> ValueError, kOutOfMemory -> MemoryError, others -> RuntimeError.
void throw_if_error(const Status& status);

void bind_page_copy(pybind11::module_& m);
void bind_host_slot_pool(pybind11::module_& m);

}  // namespace lmc::py_bind
