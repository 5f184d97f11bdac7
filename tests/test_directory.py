"""CacheDirectory bookkeeping: visibility, pins, LRU eviction, promotion from a lower tier."""

from __future__ import annotations

import random
import threading

import pytest

from lmcache_ext.directory import CacheDirectory, PlannedLoad, Reserve, Source
from lmcache_ext.memory import HostSlotPool


class FakeDisk:
    def __init__(self, keys=()):
        self.keys = set(keys)

    def contains(self, key: bytes) -> bool:
        return key in self.keys


def slots(n: int) -> HostSlotPool:
    """A real slot allocator with n tiny slots."""
    return HostSlotPool(1, n, pin="never")


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def stored(d: CacheDirectory, key: bytes) -> int:
    slot = d.reserve_store(key)
    assert isinstance(slot, int)
    d.commit(key, True)
    d.release(key)
    return slot


def test_a_chunk_is_visible_only_after_commit():
    d = CacheDirectory(slots(4))
    assert d.lookup([k(1)]) == []
    slot = d.reserve_store(k(1))
    assert slot in range(4)
    assert d.lookup([k(1)]) == []
    assert d.reserve_store(k(1)) is Reserve.PRESENT
    d.commit(k(1), True)
    assert d.lookup([k(1), k(2)]) == [Source.HOST]
    assert d.pinned_slots() == 1
    d.release(k(1))
    assert d.pinned_slots() == 0 and d.host_chunks() == 1


def test_failed_fill_frees_the_slot():
    d = CacheDirectory(slots(1))
    d.reserve_store(k(1))
    assert d.reserve_store(k(2)) is Reserve.NO_SLOT
    d.commit(k(1), False)
    d.release(k(1))  # its pin went with the entry
    assert d.lookup([k(1)]) == []
    assert isinstance(d.reserve_store(k(2)), int)


def test_lru_eviction_skips_pinned_and_unready_entries():
    evicted = []
    d = CacheDirectory(slots(3), on_evict=evicted.append)
    held = {i: stored(d, k(i)) for i in (1, 2, 3)}
    assert sorted(held.values()) == [0, 1, 2]
    loads = d.reserve_loads([k(1)])  # pins 1 and makes it the newest
    assert loads == [PlannedLoad(k(1), held[1], Source.HOST)]
    assert d.reserve_store(k(4)) == held[2]
    assert evicted == [k(2)]
    assert d.reserve_store(k(5)) == held[3]  # k(4) is still being filled, k(1) is pinned
    assert d.reserve_store(k(6)) is Reserve.NO_SLOT
    assert evicted == [k(2), k(3)]
    d.release(k(1))
    assert d.reserve_store(k(6)) == held[1]
    assert d.lookup([k(1)]) == [] and d.lookup([k(2)]) == []


def test_a_loaded_chunk_becomes_most_recently_used():
    d = CacheDirectory(slots(2))
    stored(d, k(1))
    stored(d, k(2))
    for load in d.reserve_loads([k(1)]):
        d.release(load.key)
    stored(d, k(3))
    assert d.lookup([k(1)]) == [Source.HOST] and d.lookup([k(2)]) == []


def test_eviction_keeps_the_disk_copy_and_promotion_brings_it_back():
    disk = FakeDisk()
    d = CacheDirectory(slots(1), [(Source.DISK, disk)])
    stored(d, k(1))
    disk.keys.add(k(1))  # the write-through finished
    stored(d, k(2))  # evicts k(1) from host
    assert d.lookup([k(1), k(2)]) == []  # the one slot holds k(2), which the same load needs
    assert d.lookup([k(1)]) == [Source.DISK]  # k(2) gives up its slot for it
    assert d.reserve_store(k(1)) is Reserve.PRESENT
    loads = d.reserve_loads([k(1)])
    assert [(p.key, p.source) for p in loads] == [(k(1), Source.DISK)]
    assert d.lookup([k(1)]) == [] and d.filling(k(1))  # host copy not ready until the read completes
    d.commit(k(1), True)
    d.release(k(1))
    assert d.lookup([k(1)]) == [Source.HOST]


def test_a_chunk_being_filled_is_loadable_by_no_other_load_until_committed():
    disk = FakeDisk([k(1)])
    d = CacheDirectory(slots(2), [(Source.DISK, disk)])
    (first,) = d.reserve_loads([k(1)])
    assert first.source == Source.DISK
    assert d.reserve_loads([k(1)]) == [] and d.lookup([k(1)]) == [] and d.filling(k(1))
    d.commit(k(1), True)
    (second,) = d.reserve_loads([k(1)])
    assert (second.source, second.slot, d.filling(k(1))) == (Source.HOST, first.slot, False)
    d.release(k(1))
    d.release(k(1))
    assert d.lookup([k(1)]) == [Source.HOST] and d.pinned_slots() == 0


def test_a_chunk_being_stored_is_not_loadable_yet():
    d = CacheDirectory(slots(2))
    d.reserve_store(k(1))
    assert d.reserve_loads([k(1)]) == [] and d.filling(k(1)) and not d.filling(k(2))


def test_failed_disk_read_drops_the_host_reservation():
    disk = FakeDisk([k(7)])
    d = CacheDirectory(slots(1), [(Source.DISK, disk)])
    (load,) = d.reserve_loads([k(7)])
    d.commit(k(7), False)
    disk.keys.clear()  # the disk tier deletes a file that failed its checks
    assert d.lookup([k(7)]) == []
    assert d.reserve_store(k(8)) is Reserve.NO_SLOT  # the failed slot is held until release
    d.release(k(7))
    assert isinstance(d.reserve_store(k(8)), int)


def test_reserve_loads_stops_at_a_miss_an_unready_chunk_or_no_slot():
    disk = FakeDisk([k(3), k(4)])
    d = CacheDirectory(slots(2), [(Source.DISK, disk)])
    stored(d, k(1))
    assert [p.key for p in d.reserve_loads([k(1), k(9), k(1)])] == [k(1)]
    d.release(k(1))
    d.reserve_store(k(2))  # being filled
    assert [p.key for p in d.reserve_loads([k(1), k(2)])] == [k(1)]
    d.release(k(1))
    d.commit(k(2), True)
    d.release(k(2))
    # two slots, both holding ready chunks: loading k(3), k(4) from disk evicts them in LRU order
    plans = d.reserve_loads([k(3), k(4)])
    assert [(p.key, p.source) for p in plans] == [(k(3), Source.DISK), (k(4), Source.DISK)]
    assert d.reserve_loads([k(1)]) == []


def test_release_without_a_pin_names_the_key():
    d = CacheDirectory(slots(1))
    stored(d, k(5))
    with pytest.raises(ValueError, match=k(5).hex()):
        d.release(k(5))
    with pytest.raises(ValueError, match=k(6).hex()):
        d.release(k(6))


def test_concurrent_stores_and_loads_never_share_a_pinned_slot():
    pool = slots(8)
    d = CacheDirectory(pool)
    holders: dict[int, tuple[bytes, int]] = {}  # slot -> (key, pins held by the workers)
    guard = threading.Lock()
    errors = []

    def hold(slot: int, key: bytes) -> None:
        with guard:
            held_key, pins = holders.get(slot, (key, 0))
            if held_key != key:
                errors.append(f"slot {slot} handed to {key.hex()} while {held_key.hex()} pins it")
            holders[slot] = (key, pins + 1)

    def drop(slot: int) -> None:
        with guard:
            key, pins = holders[slot]
            if pins == 1:
                del holders[slot]
            else:
                holders[slot] = (key, pins - 1)

    def worker(seed: int) -> None:
        try:
            churn(seed)
        except Exception as e:  # a misuse error in a thread must fail the test, not vanish
            errors.append(repr(e))

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(2000):
            key = k(rng.randrange(32))
            if rng.random() < 0.5:
                slot = d.reserve_store(key)
                if isinstance(slot, int):
                    hold(slot, key)
                    d.commit(key, rng.random() < 0.9)
                    drop(slot)
                    d.release(key)
            else:
                for load in d.reserve_loads([key]):
                    hold(load.slot, load.key)
                    drop(load.slot)
                    d.release(load.key)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert d.pinned_slots() == 0
    assert 0 < d.host_chunks() <= 8
    assert pool.num_free == 8 - d.host_chunks()


def test_a_lookup_counts_only_lower_tier_keys_that_can_get_a_slot():
    disk = FakeDisk([k(i) for i in range(10, 16)])
    d = CacheDirectory(slots(4), [(Source.DISK, disk)])
    stored(d, k(1))
    keys = [k(1)] + [k(i) for i in range(10, 16)]
    assert d.lookup(keys) == [Source.HOST] + [Source.DISK] * 3  # k(1) stays: its load uses it
    first = d.reserve_loads(keys)
    assert [(p.key, p.source) for p in first] == [(k(1), Source.HOST)] + [(k(i), Source.DISK) for i in (10, 11, 12)]
    assert d.lookup([k(i) for i in range(13, 16)]) == []  # every slot is pinned by that load
    for p in first:
        if p.source == Source.DISK:
            d.commit(p.key, True)
        d.release(p.key)
    assert d.lookup([k(i) for i in range(13, 16)]) == [Source.DISK] * 3  # unpinned entries give way


def test_a_reservation_never_evicts_a_host_hit_of_the_same_load():
    disk = FakeDisk([k(2)])
    d = CacheDirectory(slots(2), [(Source.DISK, disk)])
    stored(d, k(9))  # the oldest entry: the one eviction takes
    stored(d, k(3))
    assert d.lookup([k(2), k(3)]) == [Source.DISK, Source.HOST]
    loads = d.reserve_loads([k(2), k(3)])
    assert [(p.key, p.source) for p in loads] == [(k(2), Source.DISK), (k(3), Source.HOST)]
    assert loads[0].slot != loads[1].slot
    assert d.lookup([k(9)]) == []  # k(9) gave its slot


def test_clear_frees_idle_slots_now_and_pinned_ones_at_their_last_release():
    pool = slots(4)
    d = CacheDirectory(pool)
    stored(d, k(1))
    d.reserve_loads([k(1)])  # a load in flight
    d.reserve_store(k(2))  # a store in flight
    stored(d, k(3))
    assert d.clear() == 2 and pool.num_free == 2
    assert d.lookup([k(1)]) == [] and d.host_chunks() == 0
    d.commit(k(2), True)  # the store completes after the reset: never visible
    assert d.lookup([k(2)]) == []
    d.release(k(1))
    d.release(k(2))
    assert pool.num_free == 4 and d.pinned_slots() == 0


def test_lookup_partial_takes_the_longest_partial_that_a_load_of_the_whole_hit_can_pin():
    disk = FakeDisk([k(12)])
    d = CacheDirectory(slots(2), [(Source.DISK, disk)])
    stored(d, k(1))
    stored(d, k(11))
    partials = [k(11), k(12), k(13)]  # 1, 2 and 3 blocks: the 2-block one is on disk, the 3-block one nowhere
    assert d.lookup_partial([k(1)], partials) == (1, Source.DISK)  # k(11) can give up its slot for it
    assert d.lookup_partial([k(1)], [k(13)]) is None
    d.reserve_loads([k(11)])  # a load pins k(11): no slot is left for a read from disk
    assert d.lookup_partial([k(1)], partials) == (0, Source.HOST)
    assert d.lookup_partial([k(1)], [k(12)]) is None  # and k(1) is part of this load
    assert d.lookup_partial([], [k(12)]) == (0, Source.DISK)  # k(1) can give up its slot


def test_discard_frees_an_idle_partial_now_and_a_pinned_one_at_its_last_release():
    d = CacheDirectory(slots(3))
    stored(d, k(1))
    stored(d, k(2))
    (load,) = d.reserve_loads([k(2)])
    d.discard([k(1), k(2), k(3)])  # k(3) is absent: skipped
    assert d.lookup([k(1)]) == [] and d.lookup([k(2)]) == [] and not d.filling(k(2))
    assert d.host_chunks() == 0 and d.pinned_slots() == 1
    d.release(k(2))
    assert d.pinned_slots() == 0 and [isinstance(stored(d, k(i)), int) for i in (4, 5, 6)] == [True] * 3
