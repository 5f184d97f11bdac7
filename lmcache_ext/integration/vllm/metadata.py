"""What travels between the connector's halves each step, as plain data.

Scheduler -> workers: `StepPlan` (vLLM's connector metadata). Every planned item
has an id, unique in the scheduler's lifetime. Workers -> scheduler: `WorkerReport`
(vLLM's connector worker metadata): per item id, how many ranks reported each
outcome, summed over TP ranks by `aggregate`, so the scheduler acts on an item only
once every rank has reported it (invariant 8). Items outlive steps: an asynchronous load or save
is reported in whichever later step it ends.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from lmcache_ext.plans import SlotCopy, Source, TierTransfer


@dataclass(frozen=True)
class LoadItem:
    """Chunk `key` from its host slot into a request's blocks, after filling the slot
    from `read` (a lower tier) when the chunk is not in host memory yet."""

    id: int
    key: bytes
    copy: SlotCopy
    read: TierTransfer | None = None


@dataclass(frozen=True)
class AsyncLoad:
    """One request's loads, run in the background; the request is reported finished
    (vLLM's finished_recving) once they all ended. `failed_blocks` could not be
    planned at all and are load errors from the start."""

    req_id: str
    items: tuple[LoadItem, ...]
    failed_blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class StoreItem:
    """Chunk `key` from a request's blocks into host slot `copy.slot`, then into the
    lower tiers `writes`."""

    id: int
    req_id: str
    key: bytes
    copy: SlotCopy
    writes: tuple[Source, ...] = ()


@dataclass
class StepPlan(KVConnectorMetadata):
    """One step's work for every worker."""

    loads: list[LoadItem] = field(default_factory=list)  # host hits, before this step's forward
    async_loads: list[AsyncLoad] = field(default_factory=list)  # lower-tier hits, in the background
    stores: list[StoreItem] = field(default_factory=list)  # after the forward (a released request's: before it)
    failed_blocks: list[int] = field(default_factory=list)  # promised to a synchronous load but not loadable
    # Requests whose blocks vLLM may reuse from this step on (preempted, or finished while
    # a store still read them): their gathers end before anything in the step writes a block.
    released: list[str] = field(default_factory=list)
    clear_tiers: bool = False  # a cache reset: clear the lower tiers (delete disk files) before anything else
    idle: bool = False  # nothing is scheduled: the step only waits for transfers


@dataclass
class WorkerReport(KVConnectorWorkerMetadata):
    """Per item id, how many ranks reported each outcome since the last step."""

    loaded: Counter = field(default_factory=Counter)  # load item: the chunk is in the request's blocks
    load_failed: Counter = field(default_factory=Counter)
    stored: Counter = field(default_factory=Counter)  # store item: the slot holds the chunk
    store_failed: Counter = field(default_factory=Counter)
    written: Counter = field(default_factory=Counter)  # store item: one tier's write ended (ok or not)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> WorkerReport:
        assert isinstance(other, WorkerReport)
        return WorkerReport(
            self.loaded + other.loaded,
            self.load_failed + other.load_failed,
            self.stored + other.stored,
            self.store_failed + other.store_failed,
            self.written + other.written,
        )

    def is_empty(self) -> bool:
        return not (self.stored or self.store_failed or self.loaded or self.load_failed or self.written)
