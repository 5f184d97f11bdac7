"""The connector's scheduler half: finds hits, owns the directory, plans each step.

It decides everything — which chunks exist, which host slot holds them, what to
evict, what each worker copies — and the workers only execute the plan, so TP
ranks cannot disagree. Slot ids come from an accounting twin of the workers'
pools (same slot count, no bytes); disk presence is read from every rank's files,
remote presence from a background probe of every rank's records: while that probe
is out, a lookup answers None (vLLM asks again next step) instead of waiting on the
network. The probe starts as soon as vLLM hands over a new request.

A hit promises only chunks that can be loaded (invariant 9): the lookup counts the host slots a
load would need (see `CacheDirectory.lookup`), after the loads already planned in
this step, so vLLM never has to recompute a promised block for want of a slot.
Keys chain vLLM's own block-hash extras (request_keys), and `reset` starts a new
cache epoch (lmcache_ext.epoch).

Transfers outlive steps. With `async_load` (by default on CUDA engines, not on CPU
ones) a hit that needs a lower tier is loaded in the background: vLLM parks the
request (`load_kv_async`) until the workers report it through `get_finished`. A store is
gathered in the background after the step's forward. A finished request never keeps
its blocks (`request_finished` is False): vLLM frees them at once, so its prefix cache
resets cleanly right after `generate`, and the next plan lists the request among the
`released` ones whose gathers were still out; each worker ends those gathers (and
gathers a finished request's last partial chunk) in `handle_preemptions`, which vLLM
calls before anything in that step can write a block. Every planned item has an id,
and the scheduler acts on an item once every rank has reported it (invariant 8). A
chunk being filled for one load is never promised to another: a lookup that reaches it
answers None and asks again.

Partial chunks (save_unfull_chunk): a prompt's last partial chunk is stored once the
prompt is computed, and a lookup hits, where the full chunks end, the longest stored
partial of the first missing chunk that the request extends (`keys.partial_keys`: one
candidate per block length). A full chunk, or a longer partial, replaces the
partials it extends in host memory (`CacheDirectory.discard`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcache_ext import _C
from lmcache_ext.config import CacheConfig
from lmcache_ext.directory import CacheDirectory, Reserve, Source
from lmcache_ext.epoch import next_epoch, read_epoch
from lmcache_ext.integration.vllm.metadata import AsyncLoad, LoadItem, StepPlan, StoreItem, WorkerReport
from lmcache_ext.integration.vllm.request_keys import UnkeyableRequest, extra_of
from lmcache_ext.integration.vllm.shards import Geometry, rank_key, rank_root
from lmcache_ext.keys import ChunkKey, ExtraOf, Namespace, chunk_keys, partial_keys
from lmcache_ext.memory import HostSlotPool
from lmcache_ext.metrics import Payload, Recorder
from lmcache_ext.plans import SlotCopy, TierTransfer
from lmcache_ext.tiers import Presence
from lmcache_ext.tiers.disk import chunk_path

if TYPE_CHECKING:
    from lmcache_ext.tiers.remote import RemotePresence

logger = logging.getLogger(__name__)


class DiskPresence:
    """Whether every rank holds a complete file of a key's shard (files appear only by
    rename, so an existing file is a whole one)."""

    def __init__(self, root: Path, geometry: Geometry) -> None:
        self._roots = [rank_root(root, rank) for rank in range(geometry.tp_size)]
        self._geometry = geometry

    def contains(self, key: ChunkKey) -> bool:
        return all(
            chunk_path(root, rank_key(key, rank, self._geometry)).exists() for rank, root in enumerate(self._roots)
        )


@dataclass
class _Request:
    """What the scheduler half remembers of one request."""

    tokens: Any  # the request's token list (vLLM's, growing with decode tokens)
    namespace: Namespace
    extra: ExtraOf  # what besides tokens enters each chunk's key (vLLM's block-hash extras)
    keys: list[ChunkKey] = field(default_factory=list)
    keyable: bool = True  # False: an extra key could not be encoded; never hit nor stored
    block_ids: list[int] = field(default_factory=list)
    prompt_len: int = 0
    stored: int = 0  # chunks [0, stored) are stored or were found present
    asked: int = 0  # num_computed_tokens of the last hit query (vLLM's local prefix-cache hit)
    found: list[Source] = field(default_factory=list)  # tiers of the loadable chunks from found_from on
    found_from: int = 0  # the chunk holding token `asked`: the first one a load may need
    hit_keys: list[ChunkKey] = field(default_factory=list)  # keys of those chunks, a partial one last
    tail_blocks: int = 0  # blocks of that partial chunk (0: every hit chunk is full)
    load_async: bool = False  # what the last hit query told vLLM
    computed: int = 0  # tokens whose KV is computed by the end of the last scheduled step
    prompt_partial: bool = False  # the prompt's partial chunk was planned (or had nothing to store)


@dataclass
class _Item:
    """A planned load or store until every rank has reported it."""

    key: ChunkKey
    store: bool
    promotes: Source | None = None  # a load that fills its slot from this tier first
    writes_left: int = 0  # a store: tier writes (all ranks) still to report
    req_id: str = ""  # a store: the request whose blocks it reads


class SchedulerSide:
    def __init__(self, config: CacheConfig, geometry: Geometry) -> None:
        self._config = config
        self._geometry = geometry
        g = geometry
        slot_bytes = g.chunk_bytes(g.blocks_per_chunk)
        num_slots = HostSlotPool.slots_for_config(config, slot_bytes)
        self._slots = _C.HostSlotPool(1, num_slots, pin="never")  # the same slot ids, no bytes
        lower: list[tuple[Source, Presence]] = []
        if config.local_disk:
            lower.append((Source.DISK, DiskPresence(Path(config.local_disk), g)))
        self._remote: RemotePresence | None = None
        self._closers: list[Callable[[], None]] = []
        if config.remote_url:  # its client is an optional extra: imported only when asked for
            from lmcache_ext.tiers.remote import RemotePresence, RemoteStore

            store = RemoteStore(config, g.namespace.fingerprint, connections=1)
            self._remote = RemotePresence(store, lambda key: [(rank_key(key, r, g), r) for r in range(g.tp_size)])
            self._closers = [self._remote.close, store.close]
            lower.append((Source.REMOTE, self._remote))
        self._write_tiers = [source for source, _ in lower]  # a stored chunk goes to every lower tier
        self._metrics = Recorder()
        self._host_used = -1  # the host usage last reported
        self._directory = CacheDirectory(self._slots, lower, on_evict=lambda key: self._metrics.evicted("host"))
        self._namespace = dataclasses.replace(
            geometry.namespace, cache_namespace=config.cache_namespace, epoch=read_epoch(config.local_disk)
        )
        self._requests: dict[str, _Request] = {}
        self._next = StepPlan()
        self._ids = itertools.count()
        self._items: dict[int, _Item] = {}
        self._tally: dict[str, Counter] = {
            k: Counter() for k in ("stored", "store_failed", "loaded", "load_failed", "written")
        }
        self._gathering: Counter[str] = Counter()  # per request, stores some rank has not reported yet
        self._async_load = config.loads_async(geometry.device_type)

    # -- hits --

    def on_new_request(self, request: Any) -> None:
        """Start asking the remote tier about the request's chunks right away, and about
        the partial chunks at its first chunk missing here (most often also the first
        one missing there), so that one round trip usually answers the hit query."""
        if self._remote is not None:
            state = self._state(request)
            keys = self._keys(state, len(request.all_token_ids))
            first_missing = len(self._directory.lookup(keys))
            self._remote.answered(keys + self._partial_candidates(state, first_missing, self._hit_limit(request)))

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Cached tokens beyond vLLM's own hit that can be loaded now, leaving at least
        one token to compute, and whether they load in the background (some come from a
        lower tier, and background loads are on: see `CacheConfig`). None while the
        remote tier's answer is still out, or while a chunk of the hit is being filled
        for another request. Chunks
        inside vLLM's hit need not be cached: the chained key of a later chunk names
        its whole prefix. Where the full chunks end, a stored partial chunk that this
        request's tokens extend is hit up to its last block (with save_unfull_chunk)."""
        state = self._state(request)
        chunk = self._config.chunk_size
        state.asked = num_computed_tokens
        state.found_from = num_computed_tokens // chunk
        keys = self._keys(state, len(request.all_token_ids))[state.found_from :]
        state.found = self._directory.lookup(keys)
        if self._remote is not None and len(state.found) < len(keys):
            if not self._remote.answered(keys[len(state.found) :]):
                return None, False
            state.found = self._directory.lookup(keys)
        if len(state.found) < len(keys) and self._directory.filling(keys[len(state.found)]):
            return None, False  # soon a host hit: cheaper than loading it twice
        state.hit_keys, state.tail_blocks = keys[: len(state.found)], 0
        limit = self._hit_limit(request)
        partials = self._partial_candidates(state, state.found_from + len(state.found), limit)
        if self._remote is not None and partials and not self._remote.answered(partials):
            return None, False
        partial = self._directory.lookup_partial(state.hit_keys, partials) if partials else None
        if partial is not None:
            state.hit_keys.append(partials[partial[0]])
            state.found.append(partial[1])
            state.tail_blocks = partial[0] + 1
        hit = min(self._chunk_end(state, state.found_from + len(state.found) - 1), limit)
        tokens = max(hit - num_computed_tokens, 0)
        lower = any(source is not Source.HOST for source in state.found[: math.ceil(tokens / chunk) + 1])
        state.load_async = bool(tokens) and lower and self._async_load
        return tokens, state.load_async

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[Source, int]:
        """Tokens [asked, asked + num_external_tokens) of the request, by the tier that held
        their chunk at the hit query (vLLM asks right after it)."""
        state = self._state(request)
        chunk, start, end = self._config.chunk_size, state.asked, state.asked + num_external_tokens
        sources: dict[Source, int] = {}
        for c, source in enumerate(state.found, start=state.found_from):
            tokens = min(self._chunk_end(state, c), end) - max(c * chunk, start)
            if tokens > 0:
                sources[source] = sources.get(source, 0) + tokens
        return sources

    def plan_load(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        """Pin the chunks behind `num_external_tokens` and plan their copy into `block_ids`
        (all of the request's blocks: vLLM's hit first, then ours): before the next
        forward, or in the background when the hit query said so."""
        if num_external_tokens <= 0:
            return
        state = self._state(request)
        g = self._geometry
        first_block = state.asked // g.block_size
        end_block = (state.asked + num_external_tokens) // g.block_size
        first_chunk = first_block // g.blocks_per_chunk
        keys = state.hit_keys[: (end_block - 1) // g.blocks_per_chunk + 1 - first_chunk]
        covered, items = first_block, []
        for c, load in enumerate(self._directory.reserve_loads(keys), start=first_chunk):
            blocks = (self._chunk_end(state, c) - c * self._config.chunk_size) // g.block_size
            lo, hi = max(c * g.blocks_per_chunk, first_block), min(c * g.blocks_per_chunk + blocks, end_block)
            copy = SlotCopy(load.slot, tuple(block_ids[lo:hi]), blocks, lo - c * g.blocks_per_chunk)
            lower = load.source is not Source.HOST
            read = TierTransfer(load.source, load.key, load.slot, g.chunk_bytes(blocks)) if lower else None
            items.append(
                LoadItem(self._new_item(_Item(load.key, False, load.source if lower else None)), load.key, copy, read)
            )
            covered = hi
        failed = block_ids[covered:end_block]
        if failed:  # a disk file vanished since the lookup (the workers' disk tier evicts on its own)
            logger.info(
                "request %s: %d promised blocks are no longer cached; vLLM recomputes them",
                request.request_id,
                end_block - covered,
            )
        if state.load_async:
            self._next.async_loads.append(AsyncLoad(request.request_id, tuple(items), tuple(failed)))
        else:
            self._next.loads += items
            self._next.failed_blocks += failed

    # -- stores --

    def build_plan(self, scheduler_output: Any) -> StepPlan:
        """This step's plan: the loads planned since the last one, and stores of every
        chunk whose tokens are all computed by the end of this step."""
        plan, self._next = self._next, StepPlan()
        preempted = sorted(scheduler_output.preempted_req_ids or ())
        plan.released += preempted
        for req_id in preempted:  # vLLM reuses their blocks: nothing is stored from them until resumed
            if (state := self._requests.get(req_id)) is not None:
                state.block_ids, state.computed = [], 0
        plan.idle = not scheduler_output.total_num_scheduled_tokens
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._plan_stores(new.req_id, state, new.num_computed_tokens + scheduled.get(new.req_id, 0), plan)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids and new_blocks is not None:
                state.block_ids = list(new_blocks[0])
            elif new_blocks is not None:
                state.block_ids.extend(new_blocks[0])
            self._plan_stores(req_id, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), plan)
        return plan

    def _plan_stores(self, req_id: str, state: _Request, computed: int, plan: StepPlan) -> None:
        """Stores of the full chunks computed by the end of this step; once the prompt is
        computed, with save_unfull_chunk, of the full blocks of its last partial chunk."""
        g = self._geometry
        state.computed = computed
        limit = len(state.tokens) if self._config.save_decode_cache else state.prompt_len
        keys = self._keys(state, min(computed, limit))
        while state.stored < len(keys):
            c = state.stored
            blocks = state.block_ids[c * g.blocks_per_chunk : (c + 1) * g.blocks_per_chunk]
            if len(blocks) < g.blocks_per_chunk:
                return
            slot = self._directory.reserve_store(keys[c])
            if slot is Reserve.NO_SLOT or (slot is Reserve.PRESENT and self._directory.filling(keys[c])):
                return  # try again next step: a read that fails leaves the chunk to store
            state.stored += 1
            if slot is Reserve.PRESENT:
                continue
            self._store(plan, req_id, keys[c], slot, blocks)
            if self._config.save_unfull_chunk:  # the full chunk replaces the partials it extends
                self._directory.discard(self._partial_candidates(state, c, (c + 1) * self._config.chunk_size))
        if self._config.save_unfull_chunk and not state.prompt_partial and computed >= state.prompt_len:
            state.prompt_partial = True
            self._store_partial(plan, req_id, state, state.prompt_len)

    def _store_partial(self, plan: StepPlan, req_id: str, state: _Request, upto: int) -> None:
        """Store the full blocks of the partial chunk among the first `upto` tokens, once
        every full chunk before it is stored; it replaces the shorter partials it extends."""
        g, chunk = self._geometry, self._config.chunk_size
        c, blocks = upto // chunk, upto % chunk // g.block_size
        if not blocks or state.stored != c:
            return
        partials = self._partial_candidates(state, c, c * chunk + blocks * g.block_size)
        block_ids = state.block_ids[c * g.blocks_per_chunk : c * g.blocks_per_chunk + blocks]
        if len(partials) != blocks or len(block_ids) != blocks:
            return  # an extra key that cannot be encoded, or blocks vLLM no longer lists
        slot = self._directory.reserve_store(partials[-1])
        if isinstance(slot, Reserve):
            return
        self._store(plan, req_id, partials[-1], slot, block_ids)
        self._directory.discard(partials[:-1])

    def _store(self, plan: StepPlan, req_id: str, key: ChunkKey, slot: int, block_ids: list[int]) -> None:
        writes = tuple(self._write_tiers)
        item = self._new_item(_Item(key, True, writes_left=self._geometry.tp_size * len(writes), req_id=req_id))
        plan.stores.append(StoreItem(item, req_id, key, SlotCopy(slot, tuple(block_ids)), writes))
        self._gathering[req_id] += 1

    # -- results --

    def apply_report(self, report: WorkerReport | None) -> None:
        """Act on items that every rank has reported."""
        if report is None:
            return
        for name in self._tally:
            self._tally[name].update(getattr(report, name))
        tp, tally = self._geometry.tp_size, self._tally
        for outcome, failure in (("stored", "store_failed"), ("loaded", "load_failed")):
            for item_id in list(tally[outcome] | tally[failure]):
                if tally[outcome][item_id] + tally[failure][item_id] < tp:
                    continue
                ok = not tally[failure].pop(item_id, 0)
                tally[outcome].pop(item_id, None)
                self._item_done(item_id, ok)
        for item_id in list(tally["written"]):  # every rank reports each tier write, failed gathers too
            item = self._items[item_id]
            item.writes_left -= tally["written"].pop(item_id)
            if item.writes_left == 0:
                self._release(item_id)

    def _item_done(self, item_id: int, ok: bool) -> None:
        item = self._items[item_id]
        if item.store:
            self._directory.commit(item.key, ok)
            self._gathering[item.req_id] -= 1
            if not self._gathering[item.req_id]:
                del self._gathering[item.req_id]
            if item.writes_left == 0:  # else the last tier write releases the slot
                self._release(item_id)
            return
        if item.promotes is not None:
            self._directory.commit(item.key, ok)
            if not ok and item.promotes is Source.REMOTE and self._remote is not None:
                self._remote.forget(item.key)
        self._release(item_id)

    def _new_item(self, item: _Item) -> int:
        item_id = next(self._ids)
        self._items[item_id] = item
        return item_id

    def _release(self, item_id: int) -> None:
        self._directory.release(self._items.pop(item_id).key)

    def has_pending_work(self) -> bool:
        """Items not yet reported by every rank: the engine must keep stepping to hear of them."""
        return bool(self._items)

    def reset(self) -> bool:
        """Drop everything cached before this call (vLLM's `reset_prefix_cache(
        reset_connector=True)`, e.g. after a weight update): a new epoch enters every
        key, so no later lookup hits a chunk stored before it, on any tier, after a
        restart too, and stores still in flight land under old keys nobody asks for.
        Requests known so far are forgotten (their KV may predate the update: they
        store nothing more, and a preempted one is keyed afresh when it comes back).
        Unpinned host slots are freed now, pinned ones at their last release; each
        worker deletes its disk files in the next step (the shared remote store keeps
        its records, which the new epoch already hides). False, with nothing changed,
        when the new epoch cannot be made durable in the disk tier's directory."""
        epoch = next_epoch(self._config.local_disk)
        if epoch is None:
            return False
        self._namespace = self._namespace.with_epoch(epoch)
        self._requests.clear()
        pinned = self._directory.clear()
        self._next.clear_tiers = bool(self._write_tiers)
        logger.info("KV cache reset: new epoch %s; %d host chunks still in transfer drop when it ends", epoch, pinned)
        return True

    def finished(self, request_id: str) -> bool:
        """The request is done (or aborted): forget it. With save_decode_cache and
        save_unfull_chunk, the full blocks of its last partial chunk go into the next
        step's plan first. Always False: vLLM frees the blocks now, and when a store
        still reads them the next plan lists the request as `released`, so every worker
        ends that store in `handle_preemptions`, before the blocks can be written again."""
        state = self._requests.pop(request_id, None)
        if state is not None and self._config.save_unfull_chunk and self._config.save_decode_cache:
            self._store_partial(self._next, request_id, state, min(state.computed, len(state.tokens)))
        if self._gathering.get(request_id):
            self._next.released.append(request_id)
        return False

    def close(self) -> None:
        """Stop the remote probe and its connection."""
        for close in self._closers:
            close()

    def take_metrics(self) -> Payload:
        """Host evictions since the last call, and the host pool's usage (all ranks) when it changed."""
        used = self._slots.num_slots - self._slots.num_free
        if used != self._host_used:
            self._host_used = used
            rank_bytes = self._geometry.chunk_bytes(self._geometry.blocks_per_chunk) * self._geometry.tp_size
            self._metrics.usage("host", used * rank_bytes, self._slots.num_slots * rank_bytes)
        return self._metrics.take()

    def stats(self) -> dict[str, int]:
        return {"host_chunks": self._directory.host_chunks(), "pinned_slots": self._directory.pinned_slots()}

    # -- helpers --

    def _state(self, request: Any) -> _Request:
        state = self._requests.get(request.request_id)
        if state is None:
            state = _Request(
                request.all_token_ids, self._namespace, extra_of(request), prompt_len=request.num_prompt_tokens
            )
            self._requests[request.request_id] = state
        return state

    def _hit_limit(self, request: Any) -> int:
        """The most tokens a hit may cover: whole blocks, leaving at least one token to compute."""
        bs = self._geometry.block_size
        return (request.num_tokens - 1) // bs * bs

    def _chunk_end(self, state: _Request, c: int) -> int:
        """Where the hit's chunk `c` ends (a token index): its partial chunk ends early."""
        chunk = self._config.chunk_size
        if state.tail_blocks and c == state.found_from + len(state.hit_keys) - 1:
            return c * chunk + state.tail_blocks * self._geometry.block_size
        return (c + 1) * chunk

    def _partial_candidates(self, state: _Request, c: int, end: int) -> list[ChunkKey]:
        """Keys of the partial chunks at chunk `c` of the request that end on a block at
        or before token `end`, shortest first (none without save_unfull_chunk)."""
        chunk = self._config.chunk_size
        if not self._config.save_unfull_chunk or not state.keyable or c > len(state.keys) or end < c * chunk:
            return []
        try:
            return partial_keys(
                state.tokens,
                state.namespace,
                start=c * chunk,
                prev_key=state.keys[c - 1] if c else None,
                end=end,
                extra_of=state.extra,
            )
        except UnkeyableRequest:
            return []

    def _keys(self, state: _Request, upto: int) -> list[ChunkKey]:
        """Keys of the full chunks among the first `upto` tokens, hashing only new ones."""
        chunk = self._config.chunk_size
        want = min(upto, len(state.tokens)) // chunk
        if want > len(state.keys) and state.keyable:
            try:
                state.keys += chunk_keys(
                    state.tokens[: want * chunk],
                    state.namespace,
                    start=len(state.keys) * chunk,
                    prev_key=state.keys[-1] if state.keys else None,
                    extra_of=state.extra,
                )
            except UnkeyableRequest as exc:
                logger.warning("a request's chunks cannot be keyed, so it is neither looked up nor stored: %s", exc)
                state.keyable = False
        return state.keys[:want] if state.keyable else []
