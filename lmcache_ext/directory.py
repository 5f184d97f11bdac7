"""The planner's host bookkeeping: where each chunk lives, which host slot holds it,
what is pinned, what to evict. Pure bookkeeping — it never touches a byte.

A host entry becomes visible to lookups only once its bytes are complete
(``commit``), and a pinned entry (a transfer is reading or writing its slot) is
never evicted: invariants 1 and 2 (docs/architecture.md). Eviction is LRU over ready,
unpinned host entries; a chunk that is also on disk only loses its host copy.

A lookup answers only what a load could pin right now (invariant 9): a chunk in a lower tier
counts only while a host slot can be had to promote it into (a free slot, or one
taken from an unpinned entry that the same load does not use), so every hit that
is promised can be loaded, whatever earlier reservations already hold.
"""

from __future__ import annotations

import enum
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from lmcache_ext.plans import Source, TierName
from lmcache_ext.tiers import TierHoldings

Key = bytes


class SlotAllocator(Protocol):
    """Hands out host slot ids: the pinned pool's own allocator (O(1), in C++)."""

    def alloc(self) -> int | None: ...

    def free(self, slot: int) -> None: ...

    @property
    def num_free(self) -> int: ...


class Reserve(enum.Enum):
    """Outcome of asking for a slot to store a chunk into."""

    PRESENT = "present"  # already held (or being written) by a tier: nothing to do
    NO_SLOT = "no_slot"  # every slot is pinned or being filled


@dataclass(frozen=True)
class PlannedLoad:
    """A chunk to load: its slot, and the tier it is first read from (unless host)."""

    key: Key
    slot: int
    source: TierName


@dataclass
class _HostEntry:
    slot: int
    ready: bool = False
    pins: int = 1
    retired: bool = False  # cleared while pinned: never visible again, dropped at its last release


class CacheDirectory:
    """Host slots of one pool, plus presence in lower tiers, for chunk keys.

    Slot ids come from `slots`; an evicted entry's slot passes straight to its new
    owner, and a dropped entry's slot goes back to `slots`."""

    def __init__(
        self,
        slots: SlotAllocator,
        lower_tiers: Sequence[tuple[TierName, TierHoldings]] = (),
        on_evict: Callable[[Key], None] | None = None,
    ) -> None:
        """`on_evict(key)` runs under the directory's lock: it must not call back into it."""
        self._lock = threading.Lock()
        self._slots = slots
        self._host: OrderedDict[Key, _HostEntry] = OrderedDict()  # oldest use first
        self._lower = list(lower_tiers)
        self._on_evict = on_evict

    # -- queries (no side effects: vLLM may ask the same thing many times) --

    def lookup(self, keys: Sequence[Key]) -> list[TierName]:
        """The tier of each leading key that `reserve_loads(keys)` would pin now; stops at
        the first miss, at a chunk being filled, or where no slot could be had."""
        with self._lock:
            return [source for _, source in self._loadable(keys)]

    def lookup_partial(self, keys: Sequence[Key], partials: Sequence[Key]) -> tuple[int, TierName] | None:
        """The longest of `partials` (partial chunks that follow `keys`, shortest first)
        that one load of every key of `keys` and that partial could pin now: its index
        and tier; None when there is none. `keys` must be loadable (`lookup` says so)."""
        return self.lookup_last([(keys, partial) for partial in partials])

    def lookup_last(self, candidates: Sequence[tuple[Sequence[Key], Key]]) -> tuple[int, TierName] | None:
        """The last of `candidates` (each: the keys a load needs, then one more) whose
        last key is held and that one load could pin now: its index and the last key's
        tier; None when there is none."""
        with self._lock:
            for i in range(len(candidates) - 1, -1, -1):
                keys, last = candidates[i]
                entry = self._host.get(last)
                if (entry is None or not entry.ready) and (entry is not None or self._lower_source(last) is None):
                    continue
                found = self._loadable([*keys, last])
                if len(found) == len(keys) + 1:
                    return i, found[-1][1]
        return None

    def filling(self, key: Key) -> bool:
        """Whether `key`'s slot is being filled (stored, or read from a lower tier): it
        is not loadable yet, and will soon be, unless the fill fails."""
        with self._lock:
            entry = self._host.get(key)
            return entry is not None and not entry.ready and not entry.retired

    def _loadable(self, keys: Sequence[Key]) -> list[tuple[Key, TierName]]:
        """The leading keys a load can pin, with their tier. Host entries are pinned
        before slots are taken, so a lower-tier key counts while the free slots plus
        the unpinned ready entries outside this load outnumber the lower-tier keys
        before it."""
        found: list[tuple[Key, TierName]] = []
        for key in keys:
            entry = self._host.get(key)
            if entry is not None:
                if not entry.ready:
                    break  # being filled: not loadable yet
                found.append((key, Source.HOST))
                continue
            source = self._lower_source(key)
            if source is None:
                break
            found.append((key, source))
        lower = [i for i, (_, source) in enumerate(found) if source != Source.HOST]
        spare = self._spare_slots(len(lower), {key for key, source in found if source == Source.HOST})
        return found if spare >= len(lower) else found[: lower[spare]]

    def _spare_slots(self, wanted: int, used: set[Key]) -> int:
        """Slots that can be taken now without evicting `used`, counted up to `wanted`."""
        spare = self._slots.num_free
        if spare >= wanted:
            return spare
        for key, entry in self._host.items():  # oldest first, as _take_slot evicts
            if entry.ready and entry.pins == 0 and key not in used:
                spare += 1
                if spare == wanted:
                    break
        return spare

    def _lower_source(self, key: Key) -> TierName | None:
        return next((source for source, tier in self._lower if tier.contains(key)), None)

    def pinned_slots(self) -> int:
        with self._lock:
            return sum(1 for e in self._host.values() if e.pins > 0)

    def host_chunks(self) -> int:
        """Chunks whose bytes are complete in host slots."""
        with self._lock:
            return sum(1 for e in self._host.values() if e.ready)

    # -- stores --

    def reserve_store(self, key: Key) -> int | Reserve:
        """A pinned slot to gather `key` into, or why there is none."""
        with self._lock:
            if key in self._host or self._lower_source(key) is not None:
                return Reserve.PRESENT
            slot = self._take_slot()
            if slot is None:
                return Reserve.NO_SLOT
            self._host[key] = _HostEntry(slot)
            return slot

    def reserve_fill(self, key: Key, keep: Sequence[Key] = ()) -> int | None:
        """A pinned slot to fill `key` into from a tier that lookups do not see (a fetch
        from the remote store), taken without evicting `keep`; None when there is none.
        The entry turns visible at `commit`, like a store's."""
        with self._lock:
            if key in self._host:
                return None
            slot = self._take_slot(set(keep))
            if slot is None:
                return None
            self._host[key] = _HostEntry(slot)
            return slot

    # -- loads --

    def reserve_loads(self, keys: Sequence[Key]) -> list[PlannedLoad]:
        """Pin the leading loadable keys (`lookup` names them); a lower-tier hit gets a
        fresh slot to be read into (promotion), which stays invisible to other loads
        until `commit`."""
        with self._lock:
            loadable = self._loadable(keys)
            for key, source in loadable:  # pin host hits first: no slot taken below evicts them
                if source == Source.HOST:
                    self._host[key].pins += 1
                    self._host.move_to_end(key)
            plans = []
            for key, source in loadable:
                if source != Source.HOST:
                    slot = self._take_slot()
                    assert slot is not None, "_loadable counted a slot that _take_slot could not find"
                    self._host[key] = _HostEntry(slot)
                plans.append(PlannedLoad(key, self._host[key].slot, source))
        return plans

    def discard(self, keys: Sequence[Key]) -> None:
        """Drop the host copies of `keys` (a full chunk replaces the partial chunks it
        extends): a slot no transfer uses is freed now, a pinned one turns invisible and
        is freed at its last release. Absent keys are skipped; lower tiers keep theirs."""
        with self._lock:
            for key in keys:
                entry = self._host.get(key)
                if entry is None or entry.retired:
                    continue
                if entry.pins == 0:
                    self._drop(key)
                else:
                    entry.ready, entry.retired = False, True

    def clear(self) -> int:
        """Forget every entry (a cache reset): an unpinned one frees its slot now, a
        pinned one turns invisible and is dropped at its last release. Returns how
        many are still pinned."""
        with self._lock:
            pinned = 0
            for key, entry in list(self._host.items()):
                if entry.pins == 0:
                    self._drop(key)
                else:
                    entry.ready, entry.retired = False, True
                    pinned += 1
            return pinned

    # -- completion --

    def commit(self, key: Key, ok: bool) -> None:
        """The reserved slot of `key` was filled (ok) or not. A filled slot becomes
        visible; a failed one stays invisible and is dropped, its slot freed, when its
        pin is released. Either way the filler still holds its pin: call release()."""
        with self._lock:
            entry = self._host[key]
            entry.ready = ok and not entry.retired
            if entry.ready:
                self._host.move_to_end(key)

    def release(self, key: Key) -> None:
        """Drop one pin taken by reserve_store / reserve_loads. An entry is dropped only
        here, when its last pin goes, so a release never reaches another reservation."""
        with self._lock:
            entry = self._host.get(key)
            if entry is None or entry.pins <= 0:
                raise ValueError(f"key {key.hex()} is not pinned: release() without a reservation")
            entry.pins -= 1
            if entry.pins == 0 and not entry.ready:
                self._drop(key)

    # -- slots --

    def _take_slot(self, keep: set[Key] | frozenset[Key] = frozenset()) -> int | None:
        slot = self._slots.alloc()
        if slot is not None:
            return slot
        for key, entry in self._host.items():  # oldest first
            if entry.ready and entry.pins == 0 and key not in keep:
                del self._host[key]
                if self._on_evict is not None:
                    self._on_evict(key)
                return entry.slot
        return None

    def _drop(self, key: Key) -> None:
        self._slots.free(self._host.pop(key).slot)
