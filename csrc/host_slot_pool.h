// The host tier's memory: one arena of equal, page-aligned slots (a slot holds
// one full KV chunk), mapped once, page-locked for DMA when a CUDA device is
// there, and handed out by an O(1) thread-safe allocator with per-slot
// reference counts (a transfer pins the slot it reads or writes, so eviction
// cannot free it underneath: invariant 2 in docs/architecture.md).
//
// The arena is never inherited by a forked child (MADV_DONTFORK): a fork would
// otherwise copy tens of GiB of page-locked memory into the child, or leave the
// parent's DMA mapping pointing at pages the child now shares.
//
// Ranks that hold the same KV (an MLA cache on every TP rank, KV heads vLLM
// replicates) live in different processes: one of them creates a shared arena
// (create_shared: an anonymous memfd, gone with its last mapping) and the others
// attach to it, so one copy of each chunk serves them all. Each process keeps its
// own free list and reference counts (the planner gives every rank the same slot
// ids); the arena also holds one stamp per slot, through which the rank that fills
// a slot from a lower tier tells the others that its bytes are there.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "status.h"

namespace lmc {

// Whether the arena is page-locked with cudaHostRegister.
enum class PinMode {
  kAuto,    // when a CUDA device is visible, else plain memory
  kNever,   // plain memory (CPU-only use, or a caller that stages itself)
  kAlways,  // page-locked or creation fails with kUnavailable
};

// The calling thread's current CUDA device (for page-locking).
constexpr int kCurrentDevice = -1;

class HostSlotPool {
 public:
  // Every slot starts on a page boundary: O_DIRECT and vector copies need it.
  static constexpr int64_t kSlotAlignment = 4096;
  // Arenas of at least this size ask for transparent huge pages.
  static constexpr int64_t kHugePageBytes = int64_t{2} << 20;

  // Maps slot_stride(slot_bytes) * num_slots bytes and faults them in (see
  // is_populated). With `lock`, also tries mlock and stays unlocked (see
  // is_mlocked) when that is not permitted. Page-locking (pin, when a CUDA device
  // is visible) registers the arena with `device` (kCurrentDevice: the calling
  // thread's) and fails creation, with CUDA's error text, when it cannot: a pool
  // left pageable would fail every CUDA copy later, mid-serving.
  static Status create(int64_t slot_bytes, int64_t num_slots, PinMode pin, bool lock, int device,
                       std::unique_ptr<HostSlotPool>* out);
  // As create, in a memfd that other processes attach to: shared_fd() names it while
  // this pool lives. Its memory is reserved now (fallocate), so a size the system
  // cannot back fails here, not with SIGBUS at a first touch.
  static Status create_shared(int64_t slot_bytes, int64_t num_slots, PinMode pin, bool lock, int device,
                              std::unique_ptr<HostSlotPool>* out);
  // Maps the shared arena at `path` (another process's /proc/<pid>/fd/<fd>), which
  // must have been created with the same slot_bytes and num_slots.
  static Status attach(const std::string& path, int64_t slot_bytes, int64_t num_slots, PinMode pin, bool lock,
                       int device, std::unique_ptr<HostSlotPool>* out);
  // The stride that create() would use for slot_bytes (rounded up to
  // kSlotAlignment), so callers can size a pool from a byte budget.
  static Status stride_for(int64_t slot_bytes, int64_t* stride);

  ~HostSlotPool();
  HostSlotPool(const HostSlotPool&) = delete;
  HostSlotPool& operator=(const HostSlotPool&) = delete;

  // A free slot with refcount 1, or -1 when none is free (never blocks).
  int64_t alloc();
  // Returns the slot to the free list; it must hold no pin (refcount 1).
  Status free(int64_t slot);
  // One more (pin) or one fewer (unpin) holder of an allocated slot.
  Status pin(int64_t slot);
  Status unpin(int64_t slot);

  // 0 for a free slot, 1 when allocated, 1 + pins when pinned.
  Status refcount(int64_t slot, int64_t* out) const;
  Status slot_address(int64_t slot, char** out) const;

  int64_t num_slots() const { return num_slots_; }
  int64_t num_free() const;
  int64_t slot_bytes() const { return slot_bytes_; }
  int64_t slot_stride() const { return slot_stride_; }
  int64_t arena_bytes() const { return slot_stride_ * num_slots_; }
  char* base() const { return base_; }
  bool is_page_locked() const { return page_locked_; }
  // The CUDA device the arena is registered with, -1 when not page-locked.
  int device() const { return page_locked_ ? device_ : -1; }
  // The arena's first byte as kernels address it (0 when not page-locked): the host
  // address, except on platforms without cudaDevAttrCanUseHostPointerForRegisteredMem.
  int64_t device_base() const { return device_base_; }
  // The address kernels use for host address `ptr`: translated when it lies in a
  // page-locked arena whose device address differs from its host address.
  static int64_t device_address_of(int64_t ptr);
  bool is_mlocked() const { return mlocked_; }
  bool is_populated() const { return populated_; }
  // Created shared or attached to a shared arena.
  bool is_shared() const { return shared_; }
  // The memfd of an arena created shared (open while the pool lives), else -1.
  int shared_fd() const { return fd_; }

  // The slot's stamp, seen by every process that maps the arena: stored with release
  // order after the slot's bytes were written, so a waiter that sees it sees them.
  Status set_stamp(int64_t slot, int64_t stamp);
  // Waits up to timeout_ms for the slot's stamp to be `stamp` or `-stamp` (a filler's
  // failure); *seen is the last value read, whether it matched or the time ran out.
  Status wait_stamp(int64_t slot, int64_t stamp, int64_t timeout_ms, int64_t* seen) const;

 private:
  enum class Backing { kPrivate, kCreateShared, kAttach };
  static Status make(Backing backing, const std::string& path, int64_t slot_bytes, int64_t num_slots, PinMode pin,
                     bool lock, int device, std::unique_ptr<HostSlotPool>* out);
  HostSlotPool(char* base, int64_t slot_bytes, int64_t slot_stride, int64_t num_slots, int64_t mapped_bytes);
  // madvise, populate, mlock and page-lock the freshly mapped arena.
  Status prepare(PinMode pin, bool lock, int device);
  Status check_slot(int64_t slot) const;
  // Registers the arena with `device` and records where kernels address it.
  Status page_lock(int device);
  // Checks the slot id, then runs fn(refcount of that slot) under the lock;
  // `Self` is HostSlotPool or const HostSlotPool, so getters and updates share it.
  template <typename Self, typename Fn>
  static Status with_refcount(Self& self, int64_t slot, Fn&& fn);

  int64_t* stamps() const { return reinterpret_cast<int64_t*>(base_ + arena_bytes()); }

  char* const base_;
  const int64_t slot_bytes_;
  const int64_t slot_stride_;
  const int64_t num_slots_;
  const int64_t mapped_bytes_;  // the slots, then one page-rounded stamp per slot
  bool shared_ = false;
  int fd_ = -1;
  bool page_locked_ = false;
  int device_ = -1;
  int64_t device_base_ = 0;
  bool mlocked_ = false;
  bool populated_ = false;  // every page faulted in at creation

  mutable std::mutex mutex_;
  std::vector<int64_t> free_slots_;  // a stack: the next alloc takes the back
  std::vector<int64_t> refcounts_;
};

}  // namespace lmc
