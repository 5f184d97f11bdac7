#include "host_slot_pool.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <limits>
#include <map>
#include <new>
#include <string>
#include <thread>
#include <utility>

#include "cuda_api.h"

namespace lmc {

namespace {

constexpr int64_t kMaxInt64 = std::numeric_limits<int64_t>::max();
#ifdef MADV_POPULATE_WRITE
constexpr int kMadvPopulateWrite = MADV_POPULATE_WRITE;
#else
constexpr int kMadvPopulateWrite = 23;  // Linux 5.14 uapi value; older headers lack the name
#endif

std::string slot_name(int64_t slot) { return "slot " + std::to_string(slot); }

// Page-locked arenas whose device address differs from their host address, by host
// start: [start, end) maps to device_base + (ptr - start). Empty on platforms where
// kernels use host addresses of registered memory directly.
struct DeviceMapping {
  int64_t end;
  int64_t device_base;
};
std::mutex g_mappings_mutex;
std::map<int64_t, DeviceMapping> g_mappings;

int64_t address_of(const char* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); }

std::string pin_name(PinMode pin) { return pin == PinMode::kAlways ? "always" : "auto"; }

// `bytes` of memory starting on an `align` boundary: anonymous, or the first bytes of
// file `fd` shared. mmap only aligns to pages and transparent huge pages need 2
// MiB-aligned ranges, so this reserves `align - page` bytes more, maps over the
// aligned part and trims both ends. Anonymous memory is mapped without MAP_NORESERVE
// (a shared file's pages are reserved by new_memfd): a size the system cannot back
// fails here rather than crashing on first touch.
Status map_aligned(int64_t bytes, int64_t align, int fd, char** out) {
  const int64_t slack = align - HostSlotPool::kSlotAlignment;
  if (bytes > kMaxInt64 - slack) return Status::OutOfMemory("the mapping overflows 64 bits");
  void* raw = mmap(nullptr, static_cast<size_t>(bytes + slack), fd < 0 ? PROT_READ | PROT_WRITE : PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | (fd < 0 ? 0 : MAP_NORESERVE), -1, 0);
  if (raw == MAP_FAILED) return Status::OutOfMemory(std::strerror(errno));
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + align - 1) / align * align;
  const size_t head = aligned - start;
  const size_t tail = static_cast<size_t>(slack) - head;
  if (fd >= 0 && mmap(reinterpret_cast<void*>(aligned), static_cast<size_t>(bytes), PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
    const int err = errno;
    munmap(raw, static_cast<size_t>(bytes + slack));
    return Status::OutOfMemory(std::strerror(err));
  }
  if (head > 0) munmap(raw, head);
  if (tail > 0) munmap(reinterpret_cast<char*>(aligned) + bytes, tail);
  *out = reinterpret_cast<char*>(aligned);
  return Status::Ok();
}

// One int64 stamp per slot, after the slots, rounded up to whole pages.
int64_t stamp_bytes(int64_t num_slots) {
  const int64_t bytes = num_slots * static_cast<int64_t>(sizeof(int64_t));
  return (bytes + HostSlotPool::kSlotAlignment - 1) / HostSlotPool::kSlotAlignment * HostSlotPool::kSlotAlignment;
}

// The file behind a shared arena of `bytes`: a memfd whose pages are reserved now.
Status new_memfd(int64_t bytes, int* out) {
  const int fd = memfd_create("lmcache_ext host pool", MFD_CLOEXEC);
  if (fd < 0) return Status::Unavailable(std::string("memfd_create failed: ") + std::strerror(errno));
  int err = EINTR;  // shmem's fallocate stops at a pending signal: try again
  while (err == EINTR) err = fallocate(fd, 0, 0, static_cast<off_t>(bytes)) == 0 ? 0 : errno;
  if (err == EOPNOTSUPP) err = ftruncate(fd, static_cast<off_t>(bytes)) == 0 ? 0 : errno;
  if (err != 0) {
    close(fd);
    return Status::OutOfMemory("cannot reserve " + std::to_string(bytes) +
                               " bytes of shared memory: " + std::strerror(err));
  }
  *out = fd;
  return Status::Ok();
}

// Opens the shared arena at `path` and checks that it is `bytes` long.
Status open_shared(const std::string& path, int64_t bytes, int* out) {
  const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return Status::Unavailable("cannot open the shared host pool " + path + ": " + std::strerror(errno));
  struct stat st{};
  const int64_t size = fstat(fd, &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
  if (size != bytes) {
    close(fd);
    return Status::InvalidArgument("the shared host pool " + path + " holds " + std::to_string(size) +
                                   " bytes: expected " + std::to_string(bytes) +
                                   " (the same slot_bytes and num_slots as its creator)");
  }
  *out = fd;
  return Status::Ok();
}

}  // namespace

Status HostSlotPool::stride_for(int64_t slot_bytes, int64_t* stride) {
  if (slot_bytes <= 0)
    return Status::InvalidArgument("slot_bytes = " + std::to_string(slot_bytes) +
                                   ": expected a positive number of bytes");
  if (slot_bytes > kMaxInt64 - (kSlotAlignment - 1))
    return Status::InvalidArgument("slot_bytes = " + std::to_string(slot_bytes) +
                                   " is too large: rounded up to a multiple of " + std::to_string(kSlotAlignment) +
                                   " it overflows 64 bits");
  *stride = (slot_bytes + kSlotAlignment - 1) / kSlotAlignment * kSlotAlignment;
  return Status::Ok();
}

Status HostSlotPool::create(int64_t slot_bytes, int64_t num_slots, PinMode pin, bool lock, int device,
                            std::unique_ptr<HostSlotPool>* out) {
  return make(Backing::kPrivate, "", slot_bytes, num_slots, pin, lock, device, out);
}

Status HostSlotPool::create_shared(int64_t slot_bytes, int64_t num_slots, PinMode pin, bool lock, int device,
                                   std::unique_ptr<HostSlotPool>* out) {
  return make(Backing::kCreateShared, "", slot_bytes, num_slots, pin, lock, device, out);
}

Status HostSlotPool::attach(const std::string& path, int64_t slot_bytes, int64_t num_slots, PinMode pin, bool lock,
                            int device, std::unique_ptr<HostSlotPool>* out) {
  return make(Backing::kAttach, path, slot_bytes, num_slots, pin, lock, device, out);
}

Status HostSlotPool::make(Backing backing, const std::string& path, int64_t slot_bytes, int64_t num_slots, PinMode pin,
                          bool lock, int device, std::unique_ptr<HostSlotPool>* out) {
  int64_t stride = 0;
  Status st = stride_for(slot_bytes, &stride);
  if (!st.ok()) return st;
  if (num_slots <= 0)
    return Status::InvalidArgument("num_slots = " + std::to_string(num_slots) +
                                   ": expected a positive number of slots");
  // stamp_bytes(num_slots) < num_slots * 8 + 4096, so this bound keeps every product in range
  if (num_slots > (kMaxInt64 - kSlotAlignment) / (stride + static_cast<int64_t>(sizeof(int64_t))))
    return Status::InvalidArgument("slot_bytes = " + std::to_string(slot_bytes) + " x num_slots = " +
                                   std::to_string(num_slots) + ": the arena size overflows 64 bits");
  if (device < kCurrentDevice)
    return Status::InvalidArgument("device = " + std::to_string(device) +
                                   ": expected a CUDA device index, or -1 for the calling thread's "
                                   "current device");
  if (pin == PinMode::kAlways && cuda::device_count() == 0)
    return Status::Unavailable(
        "pin = always: page-locking the host pool needs a CUDA device, and no CUDA device is "
        "visible");

  const int64_t arena = stride * num_slots;
  const int64_t mapped = arena + stamp_bytes(num_slots);
  int fd = -1;
  if (backing == Backing::kCreateShared) st = new_memfd(mapped, &fd);
  if (backing == Backing::kAttach) st = open_shared(path, mapped, &fd);
  if (!st.ok()) return st;
  const bool huge = arena >= kHugePageBytes;
  char* base = nullptr;
  st = map_aligned(mapped, huge ? kHugePageBytes : kSlotAlignment, fd, &base);
  if (backing == Backing::kAttach) close(fd);  // the mapping keeps the memory
  if (!st.ok()) {
    if (backing == Backing::kCreateShared) close(fd);
    return Status::OutOfMemory("cannot map the host pool: " + std::to_string(num_slots) + " slots x " +
                               std::to_string(stride) + " bytes = " + std::to_string(arena) +
                               " bytes: " + st.message());
  }
  std::unique_ptr<HostSlotPool> pool;
  try {
    pool.reset(new HostSlotPool(base, slot_bytes, stride, num_slots, mapped));
  } catch (const std::bad_alloc&) {
    munmap(base, static_cast<size_t>(mapped));
    if (backing == Backing::kCreateShared) close(fd);
    return Status::OutOfMemory("cannot allocate the free list of " + std::to_string(num_slots) + " slots");
  }
  pool->shared_ = backing != Backing::kPrivate;
  if (backing == Backing::kCreateShared) pool->fd_ = fd;
  st = pool->prepare(pin, lock, device);
  if (!st.ok()) return st;
  *out = std::move(pool);
  return Status::Ok();
}

Status HostSlotPool::prepare(PinMode pin, bool lock, int device) {
  const size_t mapped = static_cast<size_t>(mapped_bytes_);
  // Before registering: a fork must neither copy the arena into the child nor
  // share its pages with it (see host_slot_pool.h).
  if (madvise(base_, mapped, MADV_DONTFORK) != 0)
    return Status::Unavailable("madvise(MADV_DONTFORK) of the host pool failed: " + std::string(std::strerror(errno)));
  // A hint only: without transparent huge pages the pool works the same.
  if (arena_bytes() >= kHugePageBytes) (void)madvise(base_, static_cast<size_t>(arena_bytes()), MADV_HUGEPAGE);
  // Fault every page in now, in the kernel (~4 GB/s here), instead of on the first
  // store into each slot: first touches from user space run at well under 1 GB/s on
  // VMs and would land in the serving path. Kernels before 5.14 lack it: lazy then.
  populated_ = madvise(base_, mapped, kMadvPopulateWrite) == 0;
  if (lock) {
    // Not permitted (RLIMIT_MEMLOCK, no CAP_IPC_LOCK) is not an error: the pool
    // just stays swappable. A failure may have locked a part, so undo it.
    mlocked_ = mlock(base_, mapped) == 0;
    if (!mlocked_) munlock(base_, mapped);
  }
  if (pin != PinMode::kNever && cuda::device_count() > 0) {
    Status st = page_lock(device);
    if (!st.ok())
      return Status(st.code(), "pin = " + pin_name(pin) + ": cannot page-lock the host pool of " +
                                   std::to_string(arena_bytes()) + " bytes: " + st.message() +
                                   " (pin = 'never' keeps it pageable, for a KV cache that is not on a "
                                   "CUDA device)");
  }
  return Status::Ok();
}

HostSlotPool::HostSlotPool(char* base, int64_t slot_bytes, int64_t slot_stride, int64_t num_slots, int64_t mapped_bytes)
    : base_(base),
      slot_bytes_(slot_bytes),
      slot_stride_(slot_stride),
      num_slots_(num_slots),
      mapped_bytes_(mapped_bytes),
      free_slots_(static_cast<size_t>(num_slots)),
      refcounts_(static_cast<size_t>(num_slots), 0) {
  // Slot 0 on top of the stack; the capacity stays num_slots, so free() never allocates.
  for (int64_t i = 0; i < num_slots; ++i) free_slots_[static_cast<size_t>(i)] = num_slots - 1 - i;
}

Status HostSlotPool::page_lock(int device) {
  if (device == kCurrentDevice) {
    Status st = cuda::current_device(&device);
    if (!st.ok()) return st;
  }
  int64_t device_base = 0;
  Status st = cuda::host_register(base_, static_cast<size_t>(arena_bytes()), device, &device_base);
  if (!st.ok()) return st;
  page_locked_ = true;
  device_ = device;
  device_base_ = device_base;
  if (device_base != address_of(base_)) {
    std::lock_guard<std::mutex> lk(g_mappings_mutex);
    g_mappings[address_of(base_)] = {address_of(base_) + arena_bytes(), device_base};
  }
  return Status::Ok();
}

int64_t HostSlotPool::device_address_of(int64_t ptr) {
  std::lock_guard<std::mutex> lk(g_mappings_mutex);
  auto it = g_mappings.upper_bound(ptr);
  if (it == g_mappings.begin()) return ptr;
  --it;
  return ptr < it->second.end ? it->second.device_base + (ptr - it->first) : ptr;
}

HostSlotPool::~HostSlotPool() {
  const size_t bytes = static_cast<size_t>(mapped_bytes_);
  if (page_locked_) {
    {
      std::lock_guard<std::mutex> lk(g_mappings_mutex);
      g_mappings.erase(address_of(base_));
    }
    (void)cuda::host_unregister(base_, device_);
  }
  if (mlocked_) munlock(base_, bytes);
  munmap(base_, bytes);
  if (fd_ >= 0) close(fd_);
}

Status HostSlotPool::check_slot(int64_t slot) const {
  if (slot < 0 || slot >= num_slots_)
    return Status::InvalidArgument("slot = " + std::to_string(slot) + " is out of range: the pool has " +
                                   std::to_string(num_slots_) + " slots");
  return Status::Ok();
}

int64_t HostSlotPool::alloc() {
  std::lock_guard<std::mutex> lk(mutex_);
  if (free_slots_.empty()) return -1;
  const int64_t slot = free_slots_.back();
  free_slots_.pop_back();
  refcounts_[static_cast<size_t>(slot)] = 1;
  return slot;
}

template <typename Self, typename Fn>
Status HostSlotPool::with_refcount(Self& self, int64_t slot, Fn&& fn) {
  Status st = self.check_slot(slot);
  if (!st.ok()) return st;
  std::lock_guard<std::mutex> lk(self.mutex_);
  return fn(self.refcounts_[static_cast<size_t>(slot)]);
}

Status HostSlotPool::free(int64_t slot) {
  return with_refcount(*this, slot, [&](int64_t& count) {
    if (count == 0) return Status::InvalidArgument(slot_name(slot) + " is not allocated (freed twice?)");
    if (count > 1) {
      const int64_t pins = count - 1;
      return Status::InvalidArgument(slot_name(slot) + " is still pinned by " + std::to_string(pins) +
                                     (pins == 1 ? " transfer" : " transfers"));
    }
    count = 0;
    free_slots_.push_back(slot);
    return Status::Ok();
  });
}

Status HostSlotPool::pin(int64_t slot) {
  return with_refcount(*this, slot, [&](int64_t& count) {
    if (count == 0)
      return Status::InvalidArgument(slot_name(slot) + " is not allocated: only an allocated slot can be pinned");
    ++count;
    return Status::Ok();
  });
}

Status HostSlotPool::unpin(int64_t slot) {
  return with_refcount(*this, slot, [&](int64_t& count) {
    if (count <= 1)
      return Status::InvalidArgument(slot_name(slot) + " holds no pin to release (refcount " + std::to_string(count) +
                                     ")");
    --count;
    return Status::Ok();
  });
}

Status HostSlotPool::refcount(int64_t slot, int64_t* out) const {
  return with_refcount(*this, slot, [&](const int64_t& count) {
    *out = count;
    return Status::Ok();
  });
}

Status HostSlotPool::slot_address(int64_t slot, char** out) const {
  Status st = check_slot(slot);
  if (!st.ok()) return st;
  *out = base_ + slot * slot_stride_;
  return Status::Ok();
}

Status HostSlotPool::set_stamp(int64_t slot, int64_t stamp) {
  Status st = check_slot(slot);
  if (!st.ok()) return st;
  __atomic_store_n(stamps() + slot, stamp, __ATOMIC_RELEASE);
  return Status::Ok();
}

Status HostSlotPool::wait_stamp(int64_t slot, int64_t stamp, int64_t timeout_ms, int64_t* seen) const {
  Status st = check_slot(slot);
  if (!st.ok()) return st;
  if (timeout_ms < 0)
    return Status::InvalidArgument("timeout_ms = " + std::to_string(timeout_ms) + ": expected 0 or more");
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  auto pause = std::chrono::microseconds(20);  // a fill takes a tier read: ms, so a short poll costs nothing
  while (true) {
    const int64_t value = __atomic_load_n(stamps() + slot, __ATOMIC_ACQUIRE);
    *seen = value;
    if (value == stamp || value == -stamp || Clock::now() >= deadline) return Status::Ok();
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
}

int64_t HostSlotPool::num_free() const {
  std::lock_guard<std::mutex> lk(mutex_);
  return static_cast<int64_t>(free_slots_.size());
}

}  // namespace lmc
