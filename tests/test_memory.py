"""The pinned host slot pool: allocator, reference counts, errors, views, memory flags."""

from __future__ import annotations

import ctypes
import gc
import os
import re
import resource
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import pytest
import torch

from lmcache_ext import _C
from lmcache_ext.memory import HostSlotPool

NO_CUDA_DEVICE = _C.cuda_device_count() == 0
PAGE = 4096
HUGE_PAGE = 2 << 20
REPO_ROOT = Path(__file__).resolve().parents[1]


def pool_state(pool: HostSlotPool) -> tuple[int, list[int]]:
    return pool.num_free, [pool.refcount(s) for s in range(pool.num_slots)]


def locked_kib() -> int:
    """This process's mlocked memory, from the kernel's own accounting."""
    return int(re.search(r"VmLck:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head):
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= address < high
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds address {address:#x}")


# --- allocation and reference counts -------------------------------------------------


def test_alloc_hands_out_every_slot_once_then_none() -> None:
    pool = HostSlotPool(1000, 4, pin="never")
    slots = [pool.alloc() for _ in range(4)]
    assert sorted(slots) == [0, 1, 2, 3]
    assert pool.alloc() is None
    assert pool_state(pool) == (0, [1, 1, 1, 1])


def test_freed_slot_is_handed_out_again() -> None:
    pool = HostSlotPool(1000, 3, pin="never")
    slots = [pool.alloc() for _ in range(3)]
    pool.free(slots[1])
    assert pool_state(pool)[0] == 1
    assert pool.refcount(slots[1]) == 0
    assert pool.alloc() == slots[1]
    assert pool.alloc() is None
    for s in slots:
        pool.free(s)
    assert pool_state(pool) == (3, [0, 0, 0])


def test_pin_and_unpin_count_holders() -> None:
    pool = HostSlotPool(1000, 2, pin="never")
    slot = pool.alloc()
    assert pool.refcount(slot) == 1
    pool.pin(slot)
    pool.pin(slot)
    assert pool.refcount(slot) == 3
    pool.unpin(slot)
    assert pool.refcount(slot) == 2
    pool.unpin(slot)
    assert pool.refcount(slot) == 1
    pool.free(slot)
    assert pool_state(pool) == (2, [0, 0])


@pytest.fixture
def busy_pool() -> tuple[HostSlotPool, dict[str, int]]:
    """A 4-slot pool with one free slot, one allocated, one pinned once, one pinned twice."""
    pool = HostSlotPool(1000, 4, pin="never")
    free, allocated, pinned_once, pinned_twice = (pool.alloc() for _ in range(4))
    pool.free(free)
    pool.pin(pinned_once)
    pool.pin(pinned_twice)
    pool.pin(pinned_twice)
    return pool, {
        "free": free,
        "allocated": allocated,
        "pinned_once": pinned_once,
        "pinned_twice": pinned_twice,
    }


@pytest.mark.parametrize(
    ("method", "which", "message"),
    [
        ("free", "free", "slot {slot} is not allocated (freed twice?)"),
        ("free", "pinned_once", "slot {slot} is still pinned by 1 transfer"),
        ("free", "pinned_twice", "slot {slot} is still pinned by 2 transfers"),
        ("unpin", "allocated", "slot {slot} holds no pin to release (refcount 1)"),
        ("unpin", "free", "slot {slot} holds no pin to release (refcount 0)"),
        ("pin", "free", "slot {slot} is not allocated: only an allocated slot can be pinned"),
    ],
)
def test_misuse_of_a_slot_raises_and_changes_nothing(
    busy_pool: tuple[HostSlotPool, dict[str, int]], method: str, which: str, message: str
) -> None:
    pool, slots = busy_pool
    before = pool_state(pool)
    slot = slots[which]
    with pytest.raises(ValueError) as info:
        getattr(pool, method)(slot)
    assert str(info.value) == message.format(slot=slot)
    assert pool_state(pool) == before


@pytest.mark.parametrize("method", ["free", "pin", "unpin", "refcount", "address", "view"])
@pytest.mark.parametrize("slot", [4, 70, -1])
def test_out_of_range_slot_raises_and_changes_nothing(
    busy_pool: tuple[HostSlotPool, dict[str, int]], method: str, slot: int
) -> None:
    pool, _ = busy_pool
    before = pool_state(pool)
    with pytest.raises(ValueError) as info:
        getattr(pool, method)(slot)
    assert str(info.value) == f"slot = {slot} is out of range: the pool has 4 slots"
    assert pool_state(pool) == before


def test_concurrent_alloc_free_never_shares_a_slot() -> None:
    """8 threads over 5 slots, each until it has held a slot `grants` times (counting grants,
    not attempts: under load a thread may lose every race for a while)."""
    num_threads, grants = 8, 1500
    pool = HostSlotPool(64, 5, pin="never")
    stamps = [ctypes.c_int64.from_address(pool.address(s)) for s in range(pool.num_slots)]
    errors: list[str] = []
    granted = [0] * num_threads
    start = threading.Barrier(num_threads)

    def churn(tid: int) -> None:
        attempt = 0
        while granted[tid] < grants:
            attempt += 1
            slot = pool.alloc()
            if slot is None:
                continue
            mark = (tid << 40) | attempt
            stamps[slot].value = mark
            pool.pin(slot)
            pool.unpin(slot)
            if stamps[slot].value != mark or pool.refcount(slot) != 1:
                errors.append(f"thread {tid}: slot {slot} was taken by another thread")
            granted[tid] += 1
            pool.free(slot)

    def worker(tid: int) -> None:
        start.wait()
        try:
            churn(tid)
        except ValueError as e:
            errors.append(f"thread {tid}: {e}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert granted == [grants] * num_threads
    assert pool_state(pool) == (5, [0] * 5)


# --- construction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slot_bytes", "num_slots", "error", "message"),
    [
        (0, 4, ValueError, "slot_bytes = 0: expected a positive number of bytes"),
        (-4096, 4, ValueError, "slot_bytes = -4096: expected a positive number of bytes"),
        (4096, 0, ValueError, "num_slots = 0: expected a positive number of slots"),
        (4096, -3, ValueError, "num_slots = -3: expected a positive number of slots"),
        (2**63 - 1, 1, ValueError, "slot_bytes = 9223372036854775807 is too large"),
        (1 << 40, 1 << 30, ValueError, "slot_bytes = 1099511627776 x num_slots = 1073741824"),
        (1 << 40, 1 << 20, MemoryError, "cannot map the host pool: 1048576 slots x 1099511627776"),
    ],
)
def test_bad_sizes_raise_naming_the_value(
    slot_bytes: int, num_slots: int, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        HostSlotPool(slot_bytes, num_slots, pin="never")
    assert message in str(info.value)


def test_unknown_pin_mode_raises_naming_it() -> None:
    with pytest.raises(ValueError) as info:
        HostSlotPool(4096, 2, pin="bogus")
    assert str(info.value) == "pin = 'bogus': expected 'auto', 'never' or 'always'"


@pytest.mark.skipif(not NO_CUDA_DEVICE, reason="a CUDA device is visible")
def test_without_a_device_always_fails_and_auto_stays_plain() -> None:
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        HostSlotPool(4096, 2, pin="always")
    assert not HostSlotPool(4096, 2, pin="auto").is_page_locked


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA_DEVICE, reason="needs a CUDA device")
def test_with_a_device_auto_and_always_page_lock() -> None:
    assert HostSlotPool(HUGE_PAGE, 2, pin="always").is_page_locked
    assert HostSlotPool(HUGE_PAGE, 2, pin="auto").is_page_locked
    assert not HostSlotPool(HUGE_PAGE, 2, pin="never").is_page_locked


def test_a_device_index_below_minus_one_is_refused() -> None:
    with pytest.raises(ValueError) as info:
        HostSlotPool(4096, 2, pin="never", device=-2)
    assert str(info.value) == (
        "device = -2: expected a CUDA device index, or -1 for the calling thread's current device"
    )


def test_a_pool_that_is_not_page_locked_has_no_device_address() -> None:
    pool = HostSlotPool(4096, 2, pin="never")
    assert (pool.device, pool.device_base_address) == (-1, 0)
    assert _C.device_addresses([pool.address(1), 12345]) == [pool.address(1), 12345]


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA_DEVICE, reason="needs a CUDA device")
@pytest.mark.parametrize("pin", ["auto", "always"])
def test_page_locking_that_fails_fails_creation_naming_why(pin: str) -> None:
    """A pool left pageable would fail every CUDA copy while serving; creation fails instead."""
    count = _C.cuda_device_count()
    with pytest.raises(ValueError) as info:
        HostSlotPool(4096, 2, pin=pin, device=count)
    assert str(info.value).startswith(
        f"pin = {pin}: cannot page-lock the host pool of 8192 bytes: device = {count} is out of range"
    )


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA_DEVICE, reason="needs a CUDA device")
def test_page_locked_pool_is_addressed_where_the_driver_maps_it() -> None:
    from cuda_driver import can_use_host_pointer, host_device_pointer

    torch.zeros(1, device="cuda")  # a current context on this thread, as in a vLLM worker
    pool = HostSlotPool(HUGE_PAGE, 2, pin="always")
    assert pool.device == torch.cuda.current_device()
    mapped = host_device_pointer(pool.base_address)
    assert pool.device_base_address == (pool.base_address if can_use_host_pointer(pool.device) else mapped)
    inside = pool.address(1) + 5
    assert _C.device_addresses([inside]) == [pool.device_base_address + pool.slot_stride + 5]


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA_DEVICE, reason="needs a CUDA device")
def test_a_pool_dropped_on_a_thread_without_cuda_leaves_no_context_there() -> None:
    """Unregistering makes the pool's device current for the call only: a disk thread that
    drops the last reference keeps no context (elsewhere it would be device 0's)."""
    from cuda_driver import current_context

    torch.zeros(1, device="cuda")
    before = current_context()
    holder = [HostSlotPool(HUGE_PAGE, 2, pin="always")]
    seen: list[int] = []

    def drop() -> None:
        seen.append(current_context())
        holder.pop()
        gc.collect()
        seen.append(current_context())

    thread = threading.Thread(target=drop)
    thread.start()
    thread.join()
    assert seen == [0, 0]
    assert current_context() == before != 0


def test_for_budget_fits_whole_strides() -> None:
    stride = HostSlotPool.stride_for(5000)
    assert stride == 8192
    pool = HostSlotPool.for_budget(3 * stride + stride - 1, 5000, pin="never")
    assert (pool.num_slots, pool.slot_bytes, pool.slot_stride) == (3, 5000, 8192)


def test_for_budget_rejects_a_budget_below_one_slot() -> None:
    with pytest.raises(ValueError) as info:
        HostSlotPool.for_budget(8191, 5000)
    assert str(info.value) == (
        "total_bytes = 8191 holds no slot: slot_bytes = 5000 takes 8192 bytes (a 4096-aligned stride)"
    )
    with pytest.raises(ValueError, match="slot_bytes = 0: expected a positive number of bytes"):
        HostSlotPool.for_budget(1 << 20, 0)
    with pytest.raises(TypeError, match=r"total_bytes = 1500000000\.0: expected an int number"):
        HostSlotPool.for_budget(1.5e9, 5000)


def test_repr_names_the_class_and_counts() -> None:
    pool = HostSlotPool(1000, 3, pin="never")
    pool.alloc()
    assert repr(pool) == (
        "HostSlotPool(slot_bytes=1000, num_slots=3, num_free=2, page_locked=False, mlocked=False, shared=False)"
    )


# --- layout and views -----------------------------------------------------------------


@pytest.mark.parametrize("slot_bytes", [1, 4095, 4096, 4097, 5000, (1 << 20) + 1])
def test_every_slot_is_page_aligned(slot_bytes: int) -> None:
    pool = HostSlotPool(slot_bytes, 5, pin="never")
    stride = pool.slot_stride
    assert stride % PAGE == 0 and slot_bytes <= stride < slot_bytes + PAGE
    assert stride == HostSlotPool.stride_for(slot_bytes)
    assert pool.arena_bytes == 5 * stride
    for s in range(5):
        assert pool.address(s) == pool.base_address + s * stride
        assert pool.address(s) % PAGE == 0


def test_view_is_the_slot_zero_copy() -> None:
    pool = HostSlotPool(5000, 3, pin="never")
    slot = pool.alloc()
    view = pool.view(slot)
    assert (view.dtype, view.shape, view.data_ptr()) == (torch.uint8, (5000,), pool.address(slot))
    pattern = torch.arange(5000, dtype=torch.int64).remainder(251).to(torch.uint8)
    view.copy_(pattern)
    assert torch.equal(pool.view(slot), pattern)
    assert ctypes.string_at(pool.address(slot), 5000) == pattern.numpy().tobytes()
    ctypes.memmove(pool.address(slot) + 10, b"\xfe\xed", 2)
    assert view[9:13].tolist() == [pattern[9].item(), 0xFE, 0xED, pattern[12].item()]


def test_slot_views_do_not_overlap() -> None:
    pool = HostSlotPool(5000, 4, pin="never")
    for s in range(4):
        pool.view(s).fill_(s + 1)
    for s in range(4):
        assert torch.equal(pool.view(s), torch.full((5000,), s + 1, dtype=torch.uint8))


def test_view_keeps_the_arena_alive() -> None:
    pool = HostSlotPool(5000, 2, pin="never")
    alive = weakref.ref(pool)
    view = pool.view(1)
    del pool
    gc.collect()
    assert alive() is not None
    view.fill_(0xAB)
    assert torch.equal(view, torch.full((5000,), 0xAB, dtype=torch.uint8))
    del view
    gc.collect()
    assert alive() is None


# --- huge pages and mlock -------------------------------------------------------------


def test_large_arena_is_huge_page_aligned_and_advised() -> None:
    pool = HostSlotPool(HUGE_PAGE, 2, pin="never")
    assert pool.base_address % HUGE_PAGE == 0
    thp_built = Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    assert ("hg" in vm_flags(pool.base_address)) == thp_built


def test_lock_false_locks_nothing() -> None:
    before = locked_kib()
    pool = HostSlotPool(PAGE, 4, pin="never")
    assert not pool.is_mlocked
    assert locked_kib() == before


def test_lock_true_reports_what_the_kernel_locked() -> None:
    before = locked_kib()
    pool = HostSlotPool(PAGE, 4, pin="never", lock=True)
    assert locked_kib() - before == (16 + 4 if pool.is_mlocked else 0)  # 4 slots, then a page of slot stamps
    del pool
    assert locked_kib() == before


def _forbid_mlock() -> None:
    """In the child before exec: drop CAP_IPC_LOCK and set the mlock limit to 0."""
    pr_capbset_drop, cap_ipc_lock = 24, 14
    ctypes.CDLL(None).prctl(pr_capbset_drop, cap_ipc_lock, 0, 0, 0)
    _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, hard))


def test_lock_true_stays_unlocked_when_mlock_is_not_permitted() -> None:
    child = textwrap.dedent(
        """
        import re
        from pathlib import Path
        from lmcache_ext.memory import HostSlotPool

        caps = int(re.search(r"CapEff:\\s+(\\w+)", Path("/proc/self/status").read_text())[1], 16)
        assert not caps & (1 << 14), "CAP_IPC_LOCK is still effective"
        pool = HostSlotPool(4096, 4, pin="never", lock=True)
        slot = pool.alloc()
        pool.view(slot).fill_(7)
        print(pool.is_mlocked, int(pool.view(slot).sum()))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", child],
        preexec_fn=_forbid_mlock,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", str(7 * 4096)]


def test_the_arena_is_faulted_in_at_creation():
    """A first store into a slot must not pay page faults on the serving path."""

    def rss() -> int:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024

    before = rss()
    pool = HostSlotPool(1 << 20, 64, pin="never")
    assert pool.is_populated
    assert rss() - before >= 60 << 20


def test_slots_for_a_budget_count_the_padded_stride():
    assert HostSlotPool.slots_for(10 * 8192, 4097) == 10
    assert HostSlotPool.slots_for(8191, 4096) == 1
    with pytest.raises(ValueError, match=r"total_bytes = 4095 holds no slot: slot_bytes = 1 takes 4096 bytes"):
        HostSlotPool.slots_for(4095, 1)


FORK_CHILD = """
import os, sys
from lmcache_ext.memory import HostSlotPool
pool = HostSlotPool(2 << 20, 2, pin=sys.argv[1])
pool.view(0).fill_(7)
low, high = pool.base_address, pool.base_address + pool.arena_bytes
pid = os.fork()
if pid == 0:
    with open("/proc/self/maps") as f:
        spans = [[int(x, 16) for x in line.split()[0].split("-")] for line in f]
    os._exit(1 if any(a < high and low < b for a, b in spans) else 0)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), int(pool.view(0)[:4].sum()))
"""


@pytest.mark.parametrize(
    "pin",
    [
        "never",
        pytest.param(
            "always", marks=[pytest.mark.gpu, pytest.mark.skipif(NO_CUDA_DEVICE, reason="needs a CUDA device")]
        ),
    ],
)
def test_a_forked_child_does_not_inherit_the_arena(pin: str) -> None:
    """MADV_DONTFORK: fork neither copies the (page-locked) arena nor shares its pages."""
    pool = HostSlotPool(HUGE_PAGE, 2, pin="never")
    assert "dc" in vm_flags(pool.base_address)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", FORK_CHILD, pin], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "28"]


def shared_pool(slot_bytes: int = 5000, num_slots: int = 4) -> tuple[HostSlotPool, str]:
    pool = HostSlotPool(slot_bytes, num_slots, pin="never", shared=True)
    return pool, f"/proc/{os.getpid()}/fd/{pool.shared_fd}"


def test_an_attached_pool_maps_the_same_bytes_and_stamps_as_its_creator():
    owner, path = shared_pool()
    follower = HostSlotPool(5000, 4, pin="never", attach=path)
    assert owner.is_shared and follower.is_shared and follower.shared_fd == -1
    owner.view(2)[:5] = torch.arange(5, dtype=torch.uint8)
    follower.view(3)[-1] = 9
    assert follower.view(2)[:5].tolist() == [0, 1, 2, 3, 4] and owner.view(3)[-1] == 9
    assert follower.alloc() == 0 and owner.num_free == 4  # each process keeps its own free list
    owner.set_stamp(1, 7)
    assert follower.wait_stamp(1, 7, 0) == 7
    owner.set_stamp(1, -8)  # a filler's failure ends a wait as well
    assert follower.wait_stamp(1, 8, 10_000) == -8
    assert follower.wait_stamp(0, 3, 20) == 0  # nothing came in 20 ms: the last stamp seen


def test_a_child_process_attaches_by_path_and_both_see_each_others_writes():
    owner, path = shared_pool(num_slots=2)
    owner.view(1)[:3] = torch.tensor([5, 6, 7], dtype=torch.uint8)
    child = textwrap.dedent(
        f"""
        from lmcache_ext.memory import HostSlotPool
        pool = HostSlotPool(5000, 2, pin="never", attach={path!r})
        print(pool.view(1)[:3].tolist(), flush=True)
        pool.view(0)[0] = 42
        pool.set_stamp(0, 11)
        """
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[5, 6, 7]"
    assert owner.wait_stamp(0, 11, 10_000) == 11 and owner.view(0)[0] == 42


def test_bad_shared_pool_arguments_name_the_value_and_what_was_expected():
    owner, path = shared_pool()
    with pytest.raises(ValueError, match=r"holds 36864 bytes: expected 45056 \(the same slot_bytes and num_slots"):
        HostSlotPool(5000, 5, pin="never", attach=path)
    with pytest.raises(RuntimeError, match="cannot open the shared host pool /nonexistent: No such file"):
        HostSlotPool(5000, 4, pin="never", attach="/nonexistent")
    with pytest.raises(ValueError, match="shared = True and attach = '/x': expected one of them"):
        HostSlotPool(5000, 4, pin="never", shared=True, attach="/x")
    with pytest.raises(ValueError, match="slot = 4 is out of range: the pool has 4 slots"):
        owner.set_stamp(4, 1)
    with pytest.raises(ValueError, match="timeout_ms = -1: expected 0 or more"):
        owner.wait_stamp(0, 1, -1)
