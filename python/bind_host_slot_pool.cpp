// Bindings of the pinned host slot pool. The class exposes the whole arena
// through the buffer protocol, so torch.frombuffer() gives zero-copy slot views
// that keep the pool alive.
#include <pybind11/pybind11.h>

#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings.h"
#include "host_slot_pool.h"

namespace py = pybind11;

namespace lmc::py_bind {

namespace {

PinMode parse_pin(const std::string& pin) {
  if (pin == "auto") return PinMode::kAuto;
  if (pin == "never") return PinMode::kNever;
  if (pin == "always") return PinMode::kAlways;
  throw py::value_error("pin = '" + pin + "': expected 'auto', 'never' or 'always'");
}

std::unique_ptr<HostSlotPool> make_pool(int64_t slot_bytes, int64_t num_slots, const std::string& pin, bool lock,
                                        int device, bool shared, const std::string& attach) {
  const PinMode mode = parse_pin(pin);
  if (shared && !attach.empty())
    throw py::value_error("shared = True and attach = '" + attach +
                          "': expected one of them (shared creates an arena, attach maps another's)");
  std::unique_ptr<HostSlotPool> pool;
  Status st;
  {
    // mlock and cudaHostRegister touch every page of the arena: seconds for a large pool.
    py::gil_scoped_release release;
    if (!attach.empty())
      st = HostSlotPool::attach(attach, slot_bytes, num_slots, mode, lock, device, &pool);
    else if (shared)
      st = HostSlotPool::create_shared(slot_bytes, num_slots, mode, lock, device, &pool);
    else
      st = HostSlotPool::create(slot_bytes, num_slots, mode, lock, device, &pool);
  }
  throw_if_error(st);
  return pool;
}

// Slot-state calls release the GIL so that Python threads contend on the
// pool's own lock, as the C++ transfer threads do.
void call_released(HostSlotPool& pool, Status (HostSlotPool::*fn)(int64_t), int64_t slot) {
  Status st;
  {
    py::gil_scoped_release release;
    st = (pool.*fn)(slot);
  }
  throw_if_error(st);
}

}  // namespace

void bind_host_slot_pool(py::module_& m) {
  py::class_<HostSlotPool, std::unique_ptr<HostSlotPool>>(
      m, "HostSlotPool", py::buffer_protocol(),
      "One host arena of num_slots equal slots (each slot_bytes long, 4096-aligned), "
      "mapped once; page-locked for CUDA when pin allows and a device is visible. "
      "Buffer protocol: the whole arena as writable bytes.")
      .def(py::init(&make_pool), py::arg("slot_bytes"), py::arg("num_slots"), py::arg("pin") = "auto",
           py::arg("lock") = false, py::arg("device") = kCurrentDevice, py::kw_only(), py::arg("shared") = false,
           py::arg("attach") = "",
           "pin: 'auto' (page-lock when a CUDA device is visible), 'never', or 'always' "
           "(RuntimeError when no device is visible). Page-locking that fails raises with "
           "CUDA's error text. device: the CUDA device to register with (-1: the calling "
           "thread's current device). lock: try mlock; is_mlocked tells whether it held. "
           "shared: the arena is a memfd that other processes attach to (shared_fd). "
           "attach: the path of another process's shared arena of the same shape "
           "(/proc/<pid>/fd/<shared_fd>), mapped instead of a new one.")
      .def_static(
          "stride_for",
          [](int64_t slot_bytes) {
            int64_t stride = 0;
            throw_if_error(HostSlotPool::stride_for(slot_bytes, &stride));
            return stride;
          },
          py::arg("slot_bytes"), "The slot stride a pool of this slot_bytes uses (rounded up to 4096).")
      .def(
          "alloc",
          [](HostSlotPool& pool) -> py::object {
            int64_t slot = 0;
            {
              py::gil_scoped_release release;
              slot = pool.alloc();
            }
            if (slot < 0) return py::none();
            return py::int_(slot);
          },
          "A free slot with refcount 1, or None when every slot is taken.")
      .def(
          "free", [](HostSlotPool& pool, int64_t slot) { call_released(pool, &HostSlotPool::free, slot); },
          py::arg("slot"), "Return an allocated slot that holds no pin to the free list.")
      .def(
          "pin", [](HostSlotPool& pool, int64_t slot) { call_released(pool, &HostSlotPool::pin, slot); },
          py::arg("slot"), "Add a holder to an allocated slot (a transfer in flight).")
      .def(
          "unpin", [](HostSlotPool& pool, int64_t slot) { call_released(pool, &HostSlotPool::unpin, slot); },
          py::arg("slot"), "Release one pin taken with pin().")
      .def(
          "refcount",
          [](const HostSlotPool& pool, int64_t slot) {
            int64_t count = 0;
            throw_if_error(pool.refcount(slot, &count));
            return count;
          },
          py::arg("slot"), "0 when free, 1 when allocated, 1 + pins when pinned.")
      .def(
          "address",
          [](const HostSlotPool& pool, int64_t slot) {
            char* ptr = nullptr;
            throw_if_error(pool.slot_address(slot, &ptr));
            return reinterpret_cast<uintptr_t>(ptr);
          },
          py::arg("slot"), "Host address of the slot's first byte.")
      .def(
          "set_stamp",
          [](HostSlotPool& pool, int64_t slot, int64_t stamp) { throw_if_error(pool.set_stamp(slot, stamp)); },
          py::arg("slot"), py::arg("stamp"),
          "Publish `stamp` for the slot to every process mapping the arena, after the "
          "slot's bytes (release order).")
      .def(
          "wait_stamp",
          [](const HostSlotPool& pool, int64_t slot, int64_t stamp, int64_t timeout_ms) {
            int64_t seen = 0;
            Status st;
            {
              py::gil_scoped_release release;
              st = pool.wait_stamp(slot, stamp, timeout_ms, &seen);
            }
            throw_if_error(st);
            return seen;
          },
          py::arg("slot"), py::arg("stamp"), py::arg("timeout_ms"),
          "Wait up to timeout_ms for the slot's stamp to be `stamp` or `-stamp`; returns "
          "the last stamp seen (the caller compares it).")
      .def_property_readonly("is_shared", &HostSlotPool::is_shared,
                             "Created shared, or attached to another process's shared arena.")
      .def_property_readonly("shared_fd", &HostSlotPool::shared_fd,
                             "The memfd of an arena created shared (open while the pool lives), else -1.")
      .def_property_readonly("num_slots", &HostSlotPool::num_slots)
      .def_property_readonly("num_free", &HostSlotPool::num_free)
      .def_property_readonly("slot_bytes", &HostSlotPool::slot_bytes)
      .def_property_readonly("slot_stride", &HostSlotPool::slot_stride)
      .def_property_readonly("arena_bytes", &HostSlotPool::arena_bytes)
      .def_property_readonly("base_address",
                             [](const HostSlotPool& pool) { return reinterpret_cast<uintptr_t>(pool.base()); })
      .def_property_readonly("is_page_locked", &HostSlotPool::is_page_locked,
                             "Registered with cudaHostRegister (fast and zero-copy DMA).")
      .def_property_readonly("device", &HostSlotPool::device,
                             "The CUDA device the arena is registered with, -1 when not page-locked.")
      .def_property_readonly("device_base_address", &HostSlotPool::device_base,
                             "The arena's first byte as CUDA kernels address it (0 when not "
                             "page-locked).")
      .def_property_readonly("is_mlocked", &HostSlotPool::is_mlocked,
                             "lock=True was asked for and mlock was permitted.")
      .def_property_readonly("is_populated", &HostSlotPool::is_populated,
                             "Every page was faulted in at creation (MADV_POPULATE_WRITE).")
      .def("__repr__",
           [](py::handle self) {
             const auto& pool = self.cast<const HostSlotPool&>();
             const std::string type_name = py::str(py::type::handle_of(self).attr("__name__"));
             return type_name + "(slot_bytes=" + std::to_string(pool.slot_bytes()) +
                    ", num_slots=" + std::to_string(pool.num_slots()) +
                    ", num_free=" + std::to_string(pool.num_free()) +
                    ", page_locked=" + (pool.is_page_locked() ? "True" : "False") +
                    ", mlocked=" + (pool.is_mlocked() ? "True" : "False") +
                    ", shared=" + (pool.is_shared() ? "True" : "False") + ")";
           })
      .def_buffer([](HostSlotPool& pool) {
        return py::buffer_info(pool.base(), 1, py::format_descriptor<uint8_t>::format(), 1, {pool.arena_bytes()},
                               {int64_t{1}}, /*readonly=*/false);
      });
  m.def(
      "device_addresses",
      [](std::vector<int64_t> ptrs) {
        for (int64_t& p : ptrs) p = HostSlotPool::device_address_of(p);
        return ptrs;
      },
      py::arg("ptrs"),
      "The addresses CUDA kernels use for these host addresses: translated inside a "
      "page-locked pool that the device addresses elsewhere "
      "(cudaDevAttrCanUseHostPointerForRegisteredMem = 0), unchanged otherwise.");
}

}  // namespace lmc::py_bind
