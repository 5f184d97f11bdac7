#include "bindings.h"

namespace lmc::py_bind {

void bind_host_pool(pybind11::module_&) {}

}  // namespace lmc::py_bind
