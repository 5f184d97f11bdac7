"""Storage below host memory: one record format (`record`), one interface (`LowerTier`),
and the one place where a process builds its host pool and its tiers (`build_storage`),
for `CacheEngine` and the connector's workers alike. A new tier is added here."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lmcache_ext.config import CacheConfig
from lmcache_ext.memory import HostSlotPool
from lmcache_ext.metrics import Recorder
from lmcache_ext.plans import Source
from lmcache_ext.tiers.disk import DiskTier


class LowerTier(Protocol):
    """What the executor asks of a tier below host memory."""

    def read_into(self, key: bytes, out: Any) -> bool: ...

    def submit_write(self, key: bytes, payload: Any, on_done: Callable[[bool], None] | None = None) -> Future[bool]: ...

    def clear(self) -> int: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class Presence(Protocol):
    """What the directory asks of a tier below host memory: whether it holds a chunk."""

    def contains(self, key: bytes) -> bool: ...


@dataclass
class Storage:
    """A process's host pool and lower tiers (in lookup order: disk, then remote), and
    how the directory of a `CacheEngine` sees those tiers."""

    pool: HostSlotPool
    tiers: dict[Source, LowerTier]
    presence: dict[Source, Presence] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)
    _reported: dict[tuple[Source, str], int] = field(default_factory=dict)  # what `record` last saw

    def record(self, recorder: Recorder, part: str = "") -> None:
        """Each lower tier's usage and capacity when they changed, and its evictions since
        the last call, into `recorder` (`part`: this process's share of a gauge)."""
        for source, tier in self.tiers.items():
            stats = tier.stats()
            for name in ("usage_bytes", "capacity_bytes", "evictions"):
                value, seen = stats.get(name), self._reported.get((source, name))
                if value is None or value == seen:
                    continue
                self._reported[(source, name)] = value
                if name == "evictions":
                    recorder.evicted(source.value, value - (seen or 0))
                else:
                    recorder.gauge(name, value, source.value, part)

    def flush(self) -> None:
        for tier in self.tiers.values():
            tier.flush()

    def close(self) -> None:
        """Finish pending writes, then release every tier's threads and connections."""
        for tier in self.tiers.values():
            tier.close()
        for close in self.closers:
            close()


def build_storage(
    config: CacheConfig,
    slot_bytes: int,
    *,
    namespace: bytes,
    rank: int,
    disk_root: str | Path | None,
    disk_bytes: int,
) -> Storage:
    """The host pool of `slot_bytes` slots that `config` asks for, the disk tier under
    `disk_root` (capped at `disk_bytes`) when there is one, and the remote tier when
    `remote_url` is set, reading and writing the shards of TP rank `rank`. Records
    carry `namespace` (16 bytes): the fingerprint of the cache that writes them."""
    storage = Storage(HostSlotPool.for_config(config, slot_bytes), {})
    if disk_root is not None:
        disk = DiskTier(
            disk_root,
            max(disk_bytes, 1),
            threads=config.disk_io_threads,
            o_direct=config.disk_o_direct,
            namespace=namespace,
        )
        storage.tiers[Source.DISK] = disk
        storage.presence[Source.DISK] = disk
    if config.remote_url:
        from lmcache_ext.tiers.remote import RemotePresence, RemoteStore, RemoteTier

        store = RemoteStore(config, namespace)
        storage.tiers[Source.REMOTE] = RemoteTier(store, rank)
        presence = RemotePresence(store, lambda key: [(key, rank)])
        storage.presence[Source.REMOTE] = presence
        storage.closers += [presence.close, store.close]
    return storage


__all__ = ["DiskTier", "LowerTier", "Presence", "Storage", "build_storage"]
