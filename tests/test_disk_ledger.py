"""The planner's disk ledger over real disk tiers: it evicts least recently used chunks to
make room for a write, never one a planned read holds, counts a chunk only while every
rank's file exists, and after a restart orders chunks by their files' use and evicts
down to its capacity. The tiers delete only what the ledger names."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lmcache_ext.tiers.disk import DiskTier
from lmcache_ext.tiers.disk_ledger import DiskLedger
from test_disk_tier import GiB, key, slot, store

N = 10_000
SIZE = 4096 + N  # one file: the header block, then the payload


@pytest.fixture
def roots(tmp_path: Path) -> list[Path]:
    return [tmp_path / "rank0", tmp_path / "rank1"]


@pytest.fixture
def tiers(roots: list[Path]):
    """Each rank's disk tier, roomy: the ledger alone decides what goes."""
    opened = [DiskTier(root, GiB) for root in roots]
    yield opened
    for tier in opened:
        tier.close()


def write(tiers: list[DiskTier], ledger: DiskLedger, i: int) -> list[bytes]:
    """Admit chunk `i`, delete what the ledger evicts on every rank, write it, report it."""
    assert ledger.admit(key(i), N)
    evicted = ledger.take_evictions()
    for tier in tiers:
        for k in evicted:
            tier.remove(k)
        store(tier, key(i), slot(N, seed=i))
    ledger.written(key(i))
    return evicted


def test_a_write_evicts_the_least_recently_used_chunk_on_every_rank(roots, tiers):
    ledger = DiskLedger(roots, 3 * SIZE, padded=False)
    assert [write(tiers, ledger, i) for i in range(3)] == [[], [], []]
    assert not ledger.contains(key(3))
    ledger.pin(key(0))  # a read of chunk 0 is planned, then every rank has read it
    ledger.unpin(key(0))
    assert write(tiers, ledger, 3) == [key(1)]  # chunk 0 was used since chunk 1
    assert [tier.keys() for tier in tiers] == [[key(0), key(2), key(3)]] * 2
    assert [ledger.contains(key(i)) for i in range(4)] == [True, False, True, True]
    assert ledger.stats() == {"evictions": 1}


def test_a_chunk_a_read_holds_is_never_evicted_and_no_room_is_refused(roots, tiers):
    ledger = DiskLedger(roots, 2 * SIZE, padded=False)
    write(tiers, ledger, 0)
    write(tiers, ledger, 1)
    ledger.pin(key(0))
    ledger.pin(key(1))
    assert ledger.admit(key(2), N) is False and ledger.take_evictions() == []  # every chunk is promised
    ledger.unpin(key(1))
    assert write(tiers, ledger, 2) == [key(1)]  # the pinned chunk 0 stays, though older
    assert ledger.contains(key(0)) and ledger.admit(key(3), 3 * SIZE) is False  # bigger than the capacity


def test_a_chunk_being_written_is_not_held_and_cannot_be_evicted(roots, tiers):
    ledger = DiskLedger(roots, 1 * SIZE, padded=False)
    assert ledger.admit(key(0), N)
    assert not ledger.contains(key(0))  # admitted, not yet written by every rank
    assert ledger.admit(key(1), N) is False  # the only room is being written
    for tier in tiers:
        store(tier, key(0), slot(N, seed=0))
    ledger.written(key(0))
    assert ledger.contains(key(0))


def test_a_chunk_missing_on_one_rank_is_a_miss_and_is_deleted_on_the_others(roots, tiers):
    ledger = DiskLedger(roots, 4 * SIZE, padded=False)
    write(tiers, ledger, 0)
    tiers[1].path_of(key(0)).unlink()  # behind our back
    assert ledger.contains(key(0)) is False
    assert ledger.take_evictions() == [key(0)]


def test_a_restart_orders_by_use_and_evicts_down_to_a_smaller_capacity(roots, tiers):
    ledger = DiskLedger(roots, 4 * SIZE, padded=False)
    for i in range(3):
        write(tiers, ledger, i)
        time.sleep(0.01)
    assert all(tier.read_into(key(0), slot(N)) for tier in tiers)  # a hit stamps its files
    store(tiers[0], key(9), slot(N, seed=9))  # on one rank only: not a whole chunk
    for tier in tiers:
        tier.close()
    smaller = DiskLedger(roots, 2 * SIZE, padded=False)
    assert smaller.take_evictions() == [key(9), key(1)]
    assert [smaller.contains(key(i)) for i in range(3)] == [True, False, True]
    assert smaller.stats() == {"evictions": 1}


def test_bad_capacity_is_refused(roots):
    for capacity in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"capacity = {capacity!r}: expected an int > 0"):
            DiskLedger(roots, capacity, padded=False)  # type: ignore[arg-type]


def test_a_padded_file_counts_its_padding(roots):
    ledger = DiskLedger(roots[:1], 2 * (4096 + 12288), padded=True)
    assert ledger.admit(key(0), N) and ledger.admit(key(1), N)  # each file: 4096 + N rounded up to 4096
    ledger.written(key(0))
    ledger.written(key(1))
    assert ledger.admit(key(2), N) and ledger.take_evictions() == [key(0)]
