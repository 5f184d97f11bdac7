"""What travels between the connector's halves each step, as plain data.

Scheduler -> workers: `StepPlan` (vLLM's connector metadata). Workers ->
scheduler: `WorkerReport` (vLLM's connector worker metadata), summed over TP
ranks by `aggregate`, so the scheduler acts on a key only once every rank has
reported it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from lmcache_ext.plans import SlotCopy, TierTransfer


@dataclass(frozen=True)
class KeyedCopy:
    """A slot copy of the chunk named `key`."""

    key: bytes
    copy: SlotCopy


@dataclass
class StepPlan(KVConnectorMetadata):
    """One step's work for every worker: loads before the forward, stores after it."""

    reads: list[TierTransfer] = field(default_factory=list)  # lower tier -> slot, for loads
    loads: list[KeyedCopy] = field(default_factory=list)  # slot -> paged
    stores: list[KeyedCopy] = field(default_factory=list)  # paged -> slot
    writes: list[TierTransfer] = field(default_factory=list)  # slot -> lower tiers, after the stores
    failed_blocks: list[int] = field(default_factory=list)  # promised but not loadable: recompute
    clear_tiers: bool = False  # a cache reset: clear the lower tiers (delete disk files) before anything else


@dataclass
class WorkerReport(KVConnectorWorkerMetadata):
    """Per key, how many ranks reported each outcome since the last step."""

    stored: Counter = field(default_factory=Counter)  # slot filled from the paged cache
    store_failed: Counter = field(default_factory=Counter)
    loaded: Counter = field(default_factory=Counter)  # slot copied into the paged cache
    load_failed: Counter = field(default_factory=Counter)
    written: Counter = field(default_factory=Counter)  # a tier write finished (ok or not), per tier

    def aggregate(self, other: KVConnectorWorkerMetadata) -> WorkerReport:
        assert isinstance(other, WorkerReport)
        return WorkerReport(
            self.stored + other.stored,
            self.store_failed + other.store_failed,
            self.loaded + other.loaded,
            self.load_failed + other.load_failed,
            self.written + other.written,
        )

    def is_empty(self) -> bool:
        return not (self.stored or self.store_failed or self.loaded or self.load_failed or self.written)
