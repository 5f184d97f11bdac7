"""Plans: what the worker side must move, as plain data (ints, bytes, tuples, lists).

The planner decides; executors only carry these out, so every TP rank runs the same
plan on its own shard and ranks cannot disagree. `Plan` is one executor call;
`StepPlan` is one step's work for every rank, and `WorkerReport` what the ranks say
back, per item id (invariant 8). Nothing here imports vLLM: the connector's metadata
classes only add vLLM's base classes to these.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

TierName = str
"""A tier's name: where a chunk's bytes are, as a hit source and a metrics label."""


class Source:
    """The names of the host tier and of the built-in lower tiers (`lmcache_ext.tiers`
    registers the lower ones; a new tier brings its own name)."""

    HOST: TierName = "host"
    DISK: TierName = "disk"
    REMOTE: TierName = "remote"


@dataclass(frozen=True)
class GroupPages:
    """A hybrid model's pages of KV cache group `group` (`kv_groups`): `block_ids` to or
    from the group's section of a slot, which starts `section` bytes into the slot and
    holds `section_blocks` pages per layer, laid out [layer][block][page];
    `block_ids[0]` is the section's page `first`."""

    group: int
    block_ids: tuple[int, ...]
    section: int
    section_blocks: int
    first: int = 0


@dataclass(frozen=True)
class SlotCopy:
    """The pages of `block_ids` (every layer) to or from host slot `slot`. The slot
    holds a chunk of `chunk_blocks` blocks laid out [layer][block][page] from its
    start; `block_ids` are that chunk's blocks `first`, `first + 1`, ... (a load may
    skip blocks vLLM already has, or stop short of the request's last token). A hybrid
    model's chunk holds a section per KV cache group instead, and `groups` says what
    moves (`block_ids` are then its first group's, for counting)."""

    slot: int
    block_ids: tuple[int, ...]
    chunk_blocks: int = 0  # 0: len(block_ids)
    first: int = 0
    groups: tuple[GroupPages, ...] = ()

    @property
    def whole(self) -> bool:
        """True when the copy covers the chunk's every block (of its one group)."""
        return not self.groups and self.first == 0 and self.chunk_blocks in (0, len(self.block_ids))


@dataclass(frozen=True)
class TierTransfer:
    """The first `nbytes` of host slot `slot` to or from the record of `key` in `tier`
    (a tier below host memory)."""

    tier: TierName
    key: bytes
    slot: int
    nbytes: int


@dataclass(frozen=True)
class Plan:
    """Run in this order: tier reads, scatters (slot -> paged), gathers (paged -> slot),
    then tier writes, which finish in the background."""

    reads: tuple[TierTransfer, ...] = ()
    scatters: tuple[SlotCopy, ...] = ()
    gathers: tuple[SlotCopy, ...] = ()
    writes: tuple[TierTransfer, ...] = ()


@dataclass(frozen=True)
class PlanResult:
    """Per item of the plan's reads, scatters and gathers: done (True) or failed."""

    reads: tuple[bool, ...]
    scatters: tuple[bool, ...]
    gathers: tuple[bool, ...]


@dataclass(frozen=True)
class LoadItem:
    """Chunk `key` from its host slot into a request's blocks, after filling the slot
    from `read` (a lower tier) when the chunk is not in host memory yet."""

    id: int
    key: bytes
    copy: SlotCopy
    read: TierTransfer | None = None
    origin: TierName = Source.HOST  # the tier it counts as a hit of (a fetched chunk: the tier it came from)


@dataclass(frozen=True)
class AsyncLoad:
    """One request's loads, run in the background; the request is reported finished
    (vLLM's finished_recving) once they all ended. `failed_blocks` could not be
    planned at all and are load errors from the start."""

    req_id: str
    items: tuple[LoadItem, ...]
    failed_blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class FetchItem:
    """Chunk `read.key` from a tier whose records can vanish on their own (the remote
    store) into host slot `read.slot`, before any request is promised it."""

    id: int
    read: TierTransfer


@dataclass(frozen=True)
class StoreItem:
    """Chunk `key` from a request's blocks into host slot `copy.slot`, then into the
    lower tiers `writes`."""

    id: int
    req_id: str
    key: bytes
    copy: SlotCopy
    writes: tuple[TierName, ...] = ()
    nbytes: int = 0  # the chunk's bytes in its slot and records (0: the whole slot copy's)


@dataclass
class StepPlan:
    """One step's work for every rank."""

    loads: list[LoadItem] = field(default_factory=list)  # host hits, before this step's forward
    async_loads: list[AsyncLoad] = field(default_factory=list)  # lower-tier hits, in the background
    fetches: list[FetchItem] = field(default_factory=list)  # remote records into host slots, in the background
    stores: list[StoreItem] = field(default_factory=list)  # after the forward (a released request's: before it)
    failed_blocks: list[int] = field(default_factory=list)  # promised to a synchronous load but not loadable
    # Requests whose blocks vLLM may reuse from this step on (preempted, or finished while
    # a store still read them): their gathers end before anything in the step writes a block.
    released: list[str] = field(default_factory=list)
    evictions: dict[TierName, list[bytes]] = field(default_factory=dict)  # records to delete, before any write
    clear_tiers: bool = False  # a cache reset: clear the lower tiers (delete disk files) before anything else
    idle: bool = False  # nothing is scheduled: the step only waits for transfers


@dataclass
class WorkerReport:
    """Per item id, how many ranks reported each outcome since the last report."""

    loaded: Counter = field(default_factory=Counter)  # load or fetch item: the chunk is in place
    load_failed: Counter = field(default_factory=Counter)
    stored: Counter = field(default_factory=Counter)  # store item: the slot holds the chunk
    store_failed: Counter = field(default_factory=Counter)
    written: Counter = field(default_factory=Counter)  # store item: one tier's write ended (ok or not)

    def aggregate(self, other: WorkerReport) -> WorkerReport:
        """The sum of two ranks' reports (vLLM sums the ranks' metadata this way)."""
        assert isinstance(other, WorkerReport)
        return type(self)(
            self.loaded + other.loaded,
            self.load_failed + other.load_failed,
            self.stored + other.stored,
            self.store_failed + other.store_failed,
            self.written + other.written,
        )

    def is_empty(self) -> bool:
        return not (self.stored or self.store_failed or self.loaded or self.load_failed or self.written)
