"""Storage below host memory. A tier is one module that describes itself with a
`TierKind`: its name (as a hit source and a metrics label), whether a config asks for
it, the read threads it needs, how a rank opens its I/O (`TierIO`), how the planner
learns what it holds (`TierHoldings`), and its part of the start-up message.
Everything else — `build_storage` here, the planner, the start-up line — reads those
descriptions, so a new tier (an S3 or a GPUDirect-storage tier) is one new module
plus its config fields, registered with `register_tier`.

Built-in tiers, in lookup order: disk (lmcache_ext.tiers.disk), then remote
(lmcache_ext.tiers.remote_kind: its client is an optional extra, imported only when a
config asks for the remote tier). One record format (`record`) serves them all.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmcache_ext.config import CacheConfig
from lmcache_ext.geometry import Geometry
from lmcache_ext.memory import HostSlotPool
from lmcache_ext.metrics import Recorder
from lmcache_ext.plans import TierName
from lmcache_ext.replica_pool import open_rank_pool

BUILT_IN = ("lmcache_ext.tiers.disk", "lmcache_ext.tiers.remote_kind")
"""Modules whose `TIER` is registered before any other, in this (lookup) order."""


class TierIO(Protocol):
    """One rank's reads and writes of its records in a tier: what executors ask of it."""

    def read_into(self, key: bytes, out: Any) -> bool: ...

    def submit_write(self, key: bytes, payload: Any, on_done: Callable[[bool], None] | None = None) -> Future[bool]: ...

    def remove(self, key: bytes) -> bool: ...

    def clear(self) -> int: ...

    def flush(self) -> None: ...

    def close(self) -> None:
        return None

    def stats(self) -> dict[str, Any]: ...


class TierHoldings(abc.ABC):
    """What the planner knows of the chunks a tier holds, for every rank at once. A
    tier that only answers `contains` needs nothing more; the others say how they
    differ from that:
    - a tier whose knowledge needs the network answers in the background
      (`answered`) or, for callers that may wait, at once (`probe`);
    - a tier whose records can vanish on their own (`fetch_first`) is never promised
      to a load: the planner fetches its chunks into host slots first;
    - a tier whose capacity the planner manages (`admit`) learns of each write and of
      each planned read (`pin`), so it never deletes a chunk a load was promised."""

    fetch_first = False
    asks_network = False  # `answered` may be False: the planner asks it as soon as a request arrives

    @abc.abstractmethod
    def contains(self, key: bytes) -> bool:
        """Whether every rank holds `key`, as far as this tier can tell without waiting."""

    def answered(self, keys: Sequence[bytes]) -> bool:
        """Whether `contains` knows about every one of `keys` now."""
        return True

    def probe(self, keys: Sequence[bytes]) -> None:
        """Learn about `keys` before returning (a tier that always knows: nothing to do)."""
        return None

    def forget(self, key: bytes) -> None:
        """A read found `key` missing or bad: do not count it as held any more."""
        return None

    def admit(self, key: bytes, nbytes: int) -> bool:
        """Whether to write `key` (`nbytes` of payload per rank) to this tier; a tier
        whose capacity the planner manages makes room first (`take_evictions`)."""
        return True

    def written(self, key: bytes) -> None:
        """Every rank's write of `key` ended (not necessarily well)."""
        return None

    def announce(self, key: bytes) -> None:
        """A store of `key` into this tier is planned (a shared tier marks it in flight
        for the consumers of a prefill instance: lmcache_ext.tiers.in_flight)."""
        return None

    def wait_announced(self, timeout_s: float) -> None:
        """Wait, at most `timeout_s`, until what `announce` was told is visible to others."""
        return None

    def expect(self, keys: Sequence[bytes]) -> None:
        """A prefill instance says it stores `keys` here: wait for them as for chunks in flight."""
        return None

    def pin(self, key: bytes) -> None:
        """A load of `key` is planned: keep it until `unpin`."""
        return None

    def unpin(self, key: bytes) -> None:
        return None

    def take_evictions(self) -> list[bytes]:
        """Keys whose records every rank deletes in the next step (a tier whose capacity
        the planner manages); each is given once."""
        return []

    def clear(self) -> None:
        """A cache reset: every rank clears its records in the next step."""
        return None

    def close(self) -> None:
        return None

    def stats(self) -> dict[str, int]:
        """usage_bytes, capacity_bytes and evictions, where the tier has them."""
        return {}


@dataclass(frozen=True)
class TierSetup:
    """What a tier is opened with: the config, the cache's geometry, the fingerprint its
    records carry (16 bytes: the cache that writes them), and the rank whose shards a
    `TierIO` reads and writes (with `reads_only`, reads: a replica of rank 0's)."""

    config: CacheConfig
    geometry: Geometry
    namespace: bytes
    rank: int = 0
    ranks: Sequence[int] = ()  # whose records a `TierHoldings` sees (default: every writer of the geometry)
    reads_only: bool = False

    @property
    def holders(self) -> Sequence[int]:
        return self.ranks or range(self.geometry.writers)


class ReplicaIO:
    """A rank that holds the same KV as an earlier one (`Geometry.replicas`: every rank of
    an MLA model; KV heads vLLM replicates): it reads that rank's records and writes,
    deletes and clears nothing, reporting each write done, so one record per chunk and
    shard serves every replica. Its usage is the writer's. A tier opened `reads_only`
    returns one: around its own I/O for the shard, or a subclass that reads without it
    (`tiers.disk.DiskReader`)."""

    def __init__(self, reader: TierIO | None = None) -> None:
        self._reader = reader

    def read_into(self, key: bytes, out: Any) -> bool:
        return self._reader is not None and self._reader.read_into(key, out)

    def submit_write(self, key: bytes, payload: Any, on_done: Callable[[bool], None] | None = None) -> Future[bool]:
        done: Future[bool] = Future()
        done.set_result(True)
        if on_done is not None:
            on_done(True)
        return done

    def remove(self, key: bytes) -> bool:
        return False

    def clear(self) -> int:
        return 0

    def flush(self) -> None:
        return None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def stats(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class TierKind:
    """One tier, as everything outside its module sees it."""

    name: TierName
    hit_source: str  # vLLM's CacheHitSource value for its hits
    configured: Callable[[CacheConfig], bool]
    open_io: Callable[[TierSetup], TierIO]
    open_holdings: Callable[[TierSetup], TierHoldings]
    describe: Callable[[CacheConfig], str]  # its part of the start-up line
    read_threads: Callable[[CacheConfig], int] = lambda config: 1


_kinds: list[TierKind] = []


def register_tier(kind: TierKind) -> Callable[[], None]:
    """Add `kind` after the tiers registered so far (lookup order); returns the call that
    removes it again."""
    kinds = registered_tiers()
    if any(k.name == kind.name for k in kinds):
        raise ValueError(f"a tier named {kind.name!r} is registered already")
    _kinds.append(kind)
    return lambda: _kinds.remove(kind)


def registered_tiers() -> list[TierKind]:
    """Every registered tier, built-in ones first (their modules are imported on the first call)."""
    if not _kinds:
        _kinds.extend(importlib.import_module(module).TIER for module in BUILT_IN)
    return list(_kinds)


def configured_tiers(config: CacheConfig) -> list[TierKind]:
    """The tiers `config` asks for, in lookup order."""
    return [kind for kind in registered_tiers() if kind.configured(config)]


def tier_kind(name: TierName) -> TierKind:
    kinds = {kind.name: kind for kind in registered_tiers()}
    if name not in kinds:
        raise ValueError(f"tier = {name!r} is not registered: expected one of {', '.join(kinds)}")
    return kinds[name]


@dataclass
class Storage:
    """A process's host pool and the I/O of its lower tiers, in lookup order."""

    pool: HostSlotPool
    tiers: dict[TierName, TierIO]
    read_threads: int = 1
    follows: bool = False  # the pool is its first replica's, whose rank fills it (`replica_pool`)
    unpublish: Callable[[], None] = lambda: None  # removes what the pool published for its replicas
    _reported: dict[tuple[TierName, str], int] = field(default_factory=dict)  # what `record` last saw

    def record(self, recorder: Recorder, part: str = "") -> None:
        """Each lower tier's usage when it changed into `recorder` (`part`: this
        process's share of a gauge)."""
        record_tier_stats(recorder, {name: tier.stats() for name, tier in self.tiers.items()}, self._reported, part)

    def flush(self) -> None:
        for tier in self.tiers.values():
            tier.flush()

    def close(self) -> None:
        """Finish pending writes, then release every tier's threads and connections."""
        for tier in self.tiers.values():
            tier.close()
        self.unpublish()


def record_tier_stats(
    recorder: Recorder, stats: dict[TierName, dict[str, Any]], reported: dict[tuple[TierName, str], int], part: str = ""
) -> None:
    """Usage and capacity gauges of each tier when they changed since `reported`, and
    its evictions since then, into `recorder`."""
    for name, values in stats.items():
        for stat in ("usage_bytes", "capacity_bytes", "evictions"):
            value, seen = values.get(stat), reported.get((name, stat))
            if value is None or value == seen:
                continue
            reported[(name, stat)] = value
            if stat == "evictions":
                recorder.evicted(name, value - (seen or 0))
            else:
                recorder.gauge(stat, value, name, part)


def build_storage(config: CacheConfig, geometry: Geometry, rank: int, engine: str = "") -> Storage:
    """The host pool that `config` asks for, with slots of one chunk (shared by the
    replicas of engine `engine`, `replica_pool`), and the I/O of every configured lower
    tier for TP rank `rank`: its shards' records (`Geometry.shards_of`; one per KV head
    it owns, `heads.HeadShards`, which share the tier's threads and connections), read
    only on every replica but the first (`ReplicaIO`)."""
    kinds = configured_tiers(config)
    rank_pool = open_rank_pool(config, geometry, rank, engine)
    return Storage(
        rank_pool.pool,
        {kind.name: _open_shards(kind, config, geometry, rank) for kind in kinds},
        max([kind.read_threads(config) for kind in kinds], default=1),
        follows=rank_pool.follows,
        unpublish=rank_pool.close,
    )


def _open_shards(kind: TierKind, config: CacheConfig, geometry: Geometry, rank: int) -> TierIO:
    from lmcache_ext.tiers.heads import HeadShards

    shards = geometry.shards_of(rank)
    if len(shards) > 1:  # each head's tier gets its share of the threads and connections
        config = dataclasses.replace(
            config,
            disk_io_threads=max(config.disk_io_threads // len(shards), 1),
            remote_connections=max(config.remote_connections // len(shards), 1),
        )
    ios = [
        kind.open_io(
            TierSetup(config, geometry, geometry.namespace.fingerprint, shard, reads_only=rank % geometry.replicas != 0)
        )
        for shard in shards
    ]
    if len(ios) == 1:
        return ios[0]
    return HeadShards(ios, geometry.page_bytes // (geometry.heads * geometry.head_runs))


def open_holdings(config: CacheConfig, geometry: Geometry, ranks: Sequence[int] = ()) -> dict[TierName, TierHoldings]:
    """What the planner knows of every configured lower tier, in lookup order, for the
    records of `ranks` (default: every rank of `geometry`)."""
    setup = TierSetup(config, geometry, geometry.namespace.fingerprint, ranks=ranks)
    return {kind.name: kind.open_holdings(setup) for kind in configured_tiers(config)}


__all__ = [
    "ReplicaIO",
    "Storage",
    "TierHoldings",
    "TierIO",
    "TierKind",
    "TierSetup",
    "build_storage",
    "configured_tiers",
    "open_holdings",
    "register_tier",
    "registered_tiers",
    "tier_kind",
]
