"""The connector's scheduler half: finds hits, owns the directory, plans each step.

It decides everything — which chunks exist, which host slot holds them, what to
evict, what each worker copies — and the workers only execute the plan, so TP
ranks cannot disagree. Slot ids come from an accounting twin of the workers'
pools (same slot count, no bytes); disk presence is read from every rank's files,
remote presence from a background probe of every rank's records: while that probe
is out, a lookup answers None (vLLM asks again next step) instead of waiting on the
network. The probe starts as soon as vLLM hands over a new request.

A hit promises only chunks that can be loaded: the lookup counts the host slots a
load would need (see `CacheDirectory.lookup`), after the loads already planned in
this step, so vLLM never has to recompute a promised block for want of a slot.
Keys chain vLLM's own block-hash extras (request_keys), and `reset` starts a new
cache epoch (lmcache_ext.epoch).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from lmcache_ext import _C
from lmcache_ext.config import CacheConfig
from lmcache_ext.directory import CacheDirectory, Reserve, Source
from lmcache_ext.epoch import next_epoch, read_epoch
from lmcache_ext.integration.vllm.metadata import KeyedCopy, StepPlan, WorkerReport
from lmcache_ext.integration.vllm.request_keys import UnkeyableRequest, extra_of
from lmcache_ext.integration.vllm.shards import Geometry, rank_key, rank_root
from lmcache_ext.keys import ChunkKey, ExtraOf, Namespace, chunk_keys
from lmcache_ext.memory import PinnedSlotPool
from lmcache_ext.plans import SlotCopy, TierTransfer
from lmcache_ext.tiers import Presence
from lmcache_ext.tiers.disk import chunk_path
from lmcache_ext.tiers.remote import RemotePresence, RemoteStore

logger = logging.getLogger(__name__)


class DiskPresence:
    """Whether every rank holds a complete file of a key's shard (files appear only by
    rename, so an existing file is a whole one)."""

    def __init__(self, root: Path, geometry: Geometry) -> None:
        self._roots = [rank_root(root, rank) for rank in range(geometry.tp_size)]
        self._geometry = geometry

    def contains(self, key: ChunkKey) -> bool:
        return all(chunk_path(root, rank_key(key, rank, self._geometry)).exists() for rank, root in enumerate(self._roots))


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


class SchedulerSide:
    def __init__(self, config: CacheConfig, geometry: Geometry) -> None:
        self._config = config
        self._geometry = geometry
        g = geometry
        slot_bytes = g.chunk_bytes(g.blocks_per_chunk)
        num_slots = PinnedSlotPool.slots_for_config(config, slot_bytes)
        self._slots = _C.HostSlotPool(1, num_slots, pin="never")  # the same slot ids, no bytes
        lower: list[tuple[Source, Presence]] = []
        if config.local_disk:
            lower.append((Source.DISK, DiskPresence(Path(config.local_disk), g)))
        self._remote: RemotePresence | None = None
        self._closers: list[Callable[[], None]] = []
        if config.remote_url:
            store = RemoteStore(config, g.namespace.fingerprint, connections=1)
            self._remote = RemotePresence(store, lambda key: [(rank_key(key, r, g), r) for r in range(g.tp_size)])
            self._closers = [self._remote.close, store.close]
            lower.append((Source.REMOTE, self._remote))
        self._write_tiers = [source for source, _ in lower]  # a stored chunk goes to every lower tier
        self._directory = CacheDirectory(self._slots, lower)
        self._namespace = dataclasses.replace(
            geometry.namespace, cache_namespace=config.cache_namespace, epoch=read_epoch(config.local_disk)
        )
        self._requests: dict[str, _Request] = {}
        self._next = StepPlan()
        self._tally: dict[str, Counter] = {k: Counter() for k in ("stored", "store_failed", "loaded", "load_failed", "written")}
        self._promoting: dict[ChunkKey, Source] = {}  # lower-tier hits being read into host slots
        self._writing: set[ChunkKey] = set()  # slots still read by tier writes

    # -- hits --

    def on_new_request(self, request: Any) -> None:
        """Start asking the remote tier about the request's chunks right away."""
        if self._remote is not None:
            self._remote.answered(self._keys(self._state(request), len(request.all_token_ids)))

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int | None:
        """Cached tokens beyond vLLM's own hit that can be loaded now, leaving at least
        one token to compute; None while the remote tier's answer is still out. Chunks
        inside vLLM's hit need not be cached: the chained key of a later chunk names
        its whole prefix."""
        state = self._state(request)
        chunk = self._config.chunk_size
        state.asked = num_computed_tokens
        state.found_from = num_computed_tokens // chunk
        keys = self._keys(state, len(request.all_token_ids))[state.found_from :]
        state.found = self._directory.lookup(keys, share_pending=True)
        if self._remote is not None and len(state.found) < len(keys):
            if not self._remote.answered(keys[len(state.found) :]):
                return None
            state.found = self._directory.lookup(keys, share_pending=True)
        bs = self._geometry.block_size
        hit = min((state.found_from + len(state.found)) * chunk, (request.num_tokens - 1) // bs * bs)
        return max(hit - num_computed_tokens, 0)

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[Source, int]:
        """Tokens [asked, asked + num_external_tokens) of the request, by the tier that held
        their chunk at the hit query (vLLM asks right after it)."""
        state = self._state(request)
        chunk, start, end = self._config.chunk_size, state.asked, state.asked + num_external_tokens
        sources: dict[Source, int] = {}
        for c, source in enumerate(state.found, start=state.found_from):
            tokens = min((c + 1) * chunk, end) - max(c * chunk, start)
            if tokens > 0:
                sources[source] = sources.get(source, 0) + tokens
        return sources

    def plan_load(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        """Pin the chunks behind `num_external_tokens` and plan their copy into `block_ids`
        (all of the request's blocks: vLLM's hit first, then ours)."""
        if num_external_tokens <= 0:
            return
        state = self._state(request)
        g = self._geometry
        first_block = state.asked // g.block_size
        end_block = (state.asked + num_external_tokens) // g.block_size
        first_chunk = first_block // g.blocks_per_chunk
        keys = state.keys[first_chunk : (end_block - 1) // g.blocks_per_chunk + 1]
        covered = first_block
        for c, load in enumerate(self._directory.reserve_loads(keys, share_pending=True), start=first_chunk):
            lo, hi = max(c * g.blocks_per_chunk, first_block), min((c + 1) * g.blocks_per_chunk, end_block)
            copy = SlotCopy(load.slot, tuple(block_ids[lo:hi]), g.blocks_per_chunk, lo - c * g.blocks_per_chunk)
            self._next.loads.append(KeyedCopy(load.key, copy))
            if load.source is not Source.HOST:
                self._promoting[load.key] = load.source
                self._next.reads.append(TierTransfer(load.source, load.key, load.slot, g.chunk_bytes(g.blocks_per_chunk)))
            covered = hi
        if covered < end_block:  # a disk file vanished since the lookup (the workers' disk tier evicts on its own)
            logger.info("request %s: %d promised blocks are no longer cached; vLLM recomputes them",
                        request.request_id, end_block - covered)
            self._next.failed_blocks.extend(block_ids[covered:end_block])

    # -- stores --

    def build_plan(self, scheduler_output: Any) -> StepPlan:
        """This step's plan: the loads planned since the last one, and stores of every
        chunk whose tokens are all computed by the end of this step."""
        plan, self._next = self._next, StepPlan()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._plan_stores(state, new.num_computed_tokens + scheduled.get(new.req_id, 0), plan)
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
            self._plan_stores(state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), plan)
        return plan

    def _plan_stores(self, state: _Request, computed: int, plan: StepPlan) -> None:
        g = self._geometry
        limit = len(state.tokens) if self._config.save_decode_cache else state.prompt_len
        keys = self._keys(state, min(computed, limit))
        while state.stored < len(keys):
            c = state.stored
            blocks = state.block_ids[c * g.blocks_per_chunk : (c + 1) * g.blocks_per_chunk]
            if len(blocks) < g.blocks_per_chunk:
                return
            slot = self._directory.reserve_store(keys[c])
            if slot is Reserve.NO_SLOT or (slot is Reserve.PRESENT and keys[c] in self._promoting):
                return  # try again next step: a disk read that fails leaves the chunk to store
            state.stored += 1
            if slot is Reserve.PRESENT:
                continue
            plan.stores.append(KeyedCopy(keys[c], SlotCopy(slot, tuple(blocks))))
            plan.writes += [TierTransfer(tier, keys[c], slot, g.chunk_bytes(g.blocks_per_chunk)) for tier in self._write_tiers]

    # -- results --

    def apply_report(self, report: WorkerReport | None) -> None:
        """Act on keys that every rank that works on them has reported."""
        if report is None:
            return
        for name in self._tally:
            self._tally[name].update(getattr(report, name))
        g, tally = self._geometry, self._tally
        for key in list(tally["stored"] | tally["store_failed"]):
            if tally["stored"][key] + tally["store_failed"][key] < g.tp_size:
                continue
            ok = not tally["store_failed"].pop(key, 0)
            tally["stored"].pop(key, None)
            self._directory.commit(key, ok)
            if ok and self._write_tiers:
                self._writing.add(key)
            else:
                self._directory.release(key)
        for key in list(tally["written"]):
            if tally["written"][key] >= g.tp_size * len(self._write_tiers) and key in self._writing:
                tally["written"].pop(key)
                self._writing.discard(key)
                self._directory.release(key)
        for key in list(tally["loaded"] | tally["load_failed"]):
            failed = tally["load_failed"].pop(key, 0)
            total = tally["loaded"].pop(key, 0) + failed
            loads, left = divmod(total, g.tp_size)  # one report per rank per planned load
            if left:
                tally["loaded"][key] = left
            if not loads:
                continue
            if key in self._promoting:
                source = self._promoting.pop(key)
                self._directory.commit(key, failed == 0)
                if failed and source is Source.REMOTE and self._remote is not None:
                    self._remote.forget(key)
            for _ in range(loads):
                self._directory.release(key)

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

    def finished(self, request_id: str) -> None:
        """The request is done (or aborted): forget it. Its stores were copied to host
        slots inside the steps that planned them, so its blocks can be freed now."""
        self._requests.pop(request_id, None)

    def close(self) -> None:
        """Stop the remote probe and its connection."""
        for close in self._closers:
            close()

    def stats(self) -> dict[str, int]:
        return {"host_chunks": self._directory.host_chunks(), "pinned_slots": self._directory.pinned_slots()}

    # -- helpers --

    def _state(self, request: Any) -> _Request:
        state = self._requests.get(request.request_id)
        if state is None:
            state = _Request(request.all_token_ids, self._namespace, extra_of(request), prompt_len=request.num_prompt_tokens)
            self._requests[request.request_id] = state
        return state

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
