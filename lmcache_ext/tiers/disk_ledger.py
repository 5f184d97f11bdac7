"""The planner's ledger of every rank's disk directory: which chunks are whole on every
rank, in LRU order, and what to delete to make room for a write.

The planner decides disk eviction, not the workers' disk tiers. A hit is promised at
a lookup and read later, by another process, and a worker that evicted on its own
could delete a promised file in between — under vLLM's default
`kv_load_failure_policy` ("fail") that fails the user's request. Pinning files in the
workers cannot close that window: the lookup has promised the hit before any worker
hears of the read. So the ledger admits each write (evicting least recently used
chunks that no planned read holds), the step's plan tells every rank which files to
delete before it writes, and a planned read pins its chunk until every rank has read
it. The workers' tiers only refuse a write beyond their capacity, which the ledger
never asks for.

The files stay the truth about presence: a chunk counts only while its file exists on
every rank (a write that failed, or a file deleted behind our back, is a miss, and a
chunk missing on some rank is deleted on the others). At start-up the ledger reads
the directories (files appear only by rename, so an existing file is a whole one),
orders chunks by their files' mtimes (hits and writes set them), and evicts down to
the capacity (a restart with a smaller one).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmcache_ext.tiers import TierHoldings
from lmcache_ext.tiers.disk import chunk_path, file_size, is_tier_root, scan_root


@dataclass
class _Entry:
    size: int  # bytes of one rank's file
    writing: bool = False  # admitted, some rank's write has not ended
    pins: int = 0  # planned reads not yet reported by every rank


class DiskLedger(TierHoldings):
    """The chunks on the disk directories `roots` (one per rank, each capped at
    `capacity` bytes), whose files are padded for O_DIRECT when `padded`."""

    def __init__(self, roots: Sequence[Path], capacity: int, padded: bool) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity = {capacity!r}: expected an int > 0 (bytes per rank)")
        self._roots = [Path(root) for root in roots]
        self._capacity = capacity
        self._padded = padded
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # oldest use first
        self._usage = 0
        self._evictions = 0
        self._to_delete: list[bytes] = []
        self._scan()

    def contains(self, key: bytes) -> bool:
        entry = self._entries.get(key)
        if entry is None or entry.writing:
            return False
        if all(chunk_path(root, key).exists() for root in self._roots):
            return True
        if not entry.pins:  # gone on some rank: delete it on the others
            self._drop(key)
            self._to_delete.append(key)
        return False

    def admit(self, key: bytes, nbytes: int) -> bool:
        """Make room for one file of `nbytes` of payload on each rank; False (nothing
        changed) when the file is bigger than the capacity or planned reads and writes
        in flight hold the rest."""
        if key in self._entries:
            return True  # stored or being stored: every tier skips the rewrite
        size = file_size(nbytes, self._padded)
        victims, freed = [], 0
        for old, entry in self._entries.items():  # oldest first
            if self._usage - freed + size <= self._capacity:
                break
            if not entry.writing and not entry.pins:
                victims.append(old)
                freed += entry.size
        if self._usage - freed + size > self._capacity:
            return False
        for old in victims:
            self._drop(old)
        self._evictions += len(victims)
        self._to_delete += victims
        self._entries[key] = _Entry(size, writing=True)
        self._usage += size
        return True

    def written(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.writing = False
            self._entries.move_to_end(key)

    def pin(self, key: bytes) -> None:
        entry = self._entries[key]
        entry.pins += 1
        self._entries.move_to_end(key)

    def unpin(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.pins -= 1

    def forget(self, key: bytes) -> None:
        """A read of `key` failed on some rank (a bad file is deleted by the rank that read
        it): drop it, and delete it on the other ranks."""
        entry = self._entries.get(key)
        if entry is not None and not entry.pins:
            self._drop(key)
            self._to_delete.append(key)

    def take_evictions(self) -> list[bytes]:
        """The keys whose files every rank deletes next, each once."""
        keys, self._to_delete = self._to_delete, []
        return keys

    def clear(self) -> None:
        self._entries.clear()
        self._usage = 0
        self._to_delete = []

    def stats(self) -> dict[str, int]:
        return {"evictions": self._evictions}

    def _drop(self, key: bytes) -> None:
        self._usage -= self._entries.pop(key).size

    def _scan(self) -> None:
        """The chunks whose files exist on every rank, least recently used first (by the
        first rank's mtimes); the others are deleted. Then evict down to the capacity."""
        per_rank = [
            {key: (mtime, size) for mtime, key, size in scan_root(root)[0]} if is_tier_root(root) else {}
            for root in self._roots
        ]
        everywhere = set(per_rank[0]).intersection(*per_rank[1:])
        self._to_delete += sorted(set().union(*per_rank) - everywhere)
        for key in sorted(everywhere, key=lambda k: per_rank[0][k][0]):
            self._entries[key] = _Entry(per_rank[0][key][1])
            self._usage += per_rank[0][key][1]
        while self._usage > self._capacity:
            key = next(iter(self._entries))
            self._drop(key)
            self._to_delete.append(key)
            self._evictions += 1
