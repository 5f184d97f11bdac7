"""The one planner: every decision about hits, loads and stores, for any serving engine.

It turns a request's tokens and extras into chunk keys, looks them up across the
tiers (full chunks, then the partial chunk that follows them, asking tiers whose
knowledge needs the network in the background), plans loads and stores into step
plans, and keeps the per-rank ledger of what is in flight. It imports nothing of
vLLM: the connector's scheduler half (`integration.vllm.scheduler`) only translates
vLLM's requests and scheduler output into these calls, and `CacheEngine` is this
planner plus an executor in one process.

A hit promises only chunks that can be loaded (invariant 9): host hits, and chunks of
tiers whose records stay until the planner deletes them (disk: `tiers.disk_ledger`),
counted against the host slots a load would need (`CacheDirectory.lookup`). A chunk of
a tier whose records can vanish on their own (the remote store) is first fetched
into a host slot (`StepPlan.fetches`): the lookup answers None ("ask again") until it
is there, then a host hit. A chunk being filled (stored, fetched, promoted) is never
promised to another load: the lookup answers None and asks again. So a promised hit
can fail only on damaged bytes.

Every planned item has an id, and the planner acts on an item once every rank has
reported it (invariant 8): a store's chunk becomes visible then (invariant 1), and a
slot is released once every tier's write has ended (invariant 2).

Partial chunks (save_unfull_chunk): a prompt's last partial chunk is stored once the
prompt is computed, and a lookup hits, where the full chunks end, the longest stored
partial of the first missing chunk that the request extends (`keys.partial_keys`: one
candidate per block length). A full chunk, or a longer partial, replaces the partials
it extends in host memory (`CacheDirectory.discard`).

Mamba-type state (a model with such KV cache groups, `Geometry.keeps_state`): vLLM
keeps a state only where a step ended on a block, and names its block in that step;
`store_states` stores it then, as a record of its own (`keys.state_key` of the chunk
it ends). A hit ends only at a chunk whose state is loadable with every chunk before it,
and its load writes that state into the block vLLM gave the hit's last block.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmcache_ext.config import CacheConfig
from lmcache_ext.directory import CacheDirectory, PlannedLoad, Reserve, SlotAllocator
from lmcache_ext.epoch import next_epoch, read_epoch
from lmcache_ext.geometry import BlockTables, Geometry
from lmcache_ext.keys import ChunkKey, ExtraOf, Namespace, UnkeyableRequest, chunk_keys, partial_keys, state_key
from lmcache_ext.metrics import Recorder
from lmcache_ext.plans import (
    AsyncLoad,
    FetchItem,
    GroupPages,
    LoadItem,
    SlotCopy,
    Source,
    StepPlan,
    StoreItem,
    TierName,
    TierTransfer,
    WorkerReport,
)
from lmcache_ext.tiers import TierHoldings

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class CachedRequest:
    """What the planner remembers of one request: its keys, hashed once, and how far
    its stores have got."""

    req_id: str
    tokens: Any  # the request's token list (the engine's own, growing with decode tokens)
    namespace: Namespace
    extra: ExtraOf | None  # what besides tokens enters each chunk's key
    prompt_len: int
    keys: list[ChunkKey] = field(default_factory=list)
    keyable: bool = True  # False: an extra key could not be encoded; never hit nor stored
    stored: int = 0  # chunks [0, stored) are stored or were found present
    gone: int | None = None  # the first chunk not stored because vLLM freed its kept blocks
    prompt_partial: bool = False  # the prompt's partial chunk was planned (or had nothing to store)
    partial: tuple[int, ChunkKey] | None = None  # the partial chunk stored or found present: (its end, key)
    # Chunks fetched for it (and the tier they came from), pinned until its load is planned.
    held: dict[ChunkKey, TierName] = field(default_factory=dict)
    done: bool = False


@dataclass(frozen=True)
class Hit:
    """One answer to a hit query: the chunks a load of the request can take, from the
    chunk holding token `start` on, their tiers, and where each ends (a partial one
    early); `tokens` of them can be loaded beyond `start`."""

    start: int
    first_chunk: int
    keys: tuple[ChunkKey, ...]
    sources: tuple[TierName, ...]
    ends: tuple[int, ...]  # token index where each chunk ends
    chunk_size: int
    tokens: int
    load_async: bool  # some of them come from a lower tier and background loads are on
    state: ChunkKey | None = None  # the Mamba-type state at the hit's end (`Geometry.keeps_state`)

    def by_source(self, num_tokens: int) -> dict[TierName, int]:
        """Tokens [start, start + num_tokens), by the tier that holds their chunk."""
        begin, end = self.start, self.start + num_tokens
        out: dict[TierName, int] = {}
        for c, (source, chunk_end) in enumerate(zip(self.sources, self.ends)):
            tokens = min(chunk_end, end) - max((self.first_chunk + c) * self.chunk_size, begin)
            if tokens > 0:
                out[source] = out.get(source, 0) + tokens
        return out


@dataclass
class _Item:
    """A planned load, fetch or store until every rank has reported it."""

    key: ChunkKey
    kind: str  # "load", "fetch" or "store"
    tier: TierName | None = None  # a load or fetch: the tier it reads first (None: host)
    writes: tuple[TierName, ...] = ()  # a store: the tiers it is written to
    writes_left: int = 0  # a store: tier writes (all ranks) still to report
    request: CachedRequest | None = None  # a store: whose blocks it reads; a fetch: who holds it


class ChunkPlanner:
    """Hits, loads and stores of one cache, planned for `geometry.tp_size` ranks.

    `slots` hands out host slot ids (the pool's own allocator, or an accounting twin of
    the workers' pools); `holdings` says what each lower tier holds, in lookup order
    (`tiers.open_holdings`). Plans accumulate until `take_plan`."""

    def __init__(
        self,
        config: CacheConfig,
        geometry: Geometry,
        slots: SlotAllocator,
        holdings: dict[TierName, TierHoldings],
        *,
        new_plan: Callable[[], StepPlan] = StepPlan,
        metrics: Recorder | None = None,
    ) -> None:
        self._config = config
        self._geometry = geometry
        self._holdings = dict(holdings)
        self._fetch_tiers = [(name, h) for name, h in holdings.items() if h.fetch_first]
        self.metrics = metrics or Recorder()
        self._directory = CacheDirectory(
            slots,
            [(name, h) for name, h in holdings.items() if not h.fetch_first],
            on_evict=lambda key: self.metrics.evicted(Source.HOST),
        )
        self._namespace = dataclasses.replace(
            geometry.namespace, cache_namespace=config.cache_namespace, epoch=read_epoch(config.local_disk)
        )
        self._new_plan = new_plan
        self._next = new_plan()
        self._ids = itertools.count()
        self._items: dict[int, _Item] = {}
        self._tally: dict[str, Counter] = {
            k: Counter() for k in ("stored", "store_failed", "loaded", "load_failed", "written")
        }
        self._holders: set[CachedRequest] = set()  # requests holding fetched chunks
        self._async_load = config.loads_async(geometry.device_type)
        self._evictions_seen: dict[tuple[TierName, str], int] = {}

    # -- requests --

    def request(self, req_id: str, tokens: Any, prompt_len: int, extra: ExtraOf | None = None) -> CachedRequest:
        """A new request's state, keyed in the current epoch."""
        return CachedRequest(req_id, tokens, self._namespace, extra, prompt_len)

    def keys(self, req: CachedRequest, upto: int) -> list[ChunkKey]:
        """Keys of the full chunks among the first `upto` tokens, hashing only new ones."""
        chunk = self._config.chunk_size
        want = min(upto, len(req.tokens)) // chunk
        if want > len(req.keys) and req.keyable:
            try:
                req.keys += chunk_keys(
                    req.tokens[: want * chunk],
                    req.namespace,
                    start=len(req.keys) * chunk,
                    prev_key=req.keys[-1] if req.keys else None,
                    extra_of=req.extra,
                )
            except UnkeyableRequest as exc:
                logger.warning("a request's chunks cannot be keyed, so it is neither looked up nor stored: %s", exc)
                req.keyable = False
        return req.keys[:want] if req.keyable else []

    def partial_candidates(self, req: CachedRequest, c: int, end: int) -> list[ChunkKey]:
        """Keys of the partial chunks at chunk `c` of the request that end on a block at
        or before token `end`, shortest first (none without save_unfull_chunk)."""
        chunk = self._config.chunk_size
        if not self._config.save_unfull_chunk or not req.keyable or c > len(req.keys) or end < c * chunk:
            return []
        try:
            return partial_keys(
                req.tokens,
                req.namespace,
                start=c * chunk,
                prev_key=req.keys[c - 1] if c else None,
                end=end,
                extra_of=req.extra,
            )
        except UnkeyableRequest:
            return []

    # -- hits --

    def prefetch(self, req: CachedRequest, limit: int) -> None:
        """Start asking the tiers that answer in the background about the request's chunks,
        and about the partial chunks at its first chunk missing here (most often also the
        first one missing there), so that one round trip usually answers the hit query."""
        if not any(h.asks_network for h in self._holdings.values()):
            return
        keys = self.keys(req, len(req.tokens))
        first_missing = len(self._directory.lookup(keys))
        wanted = keys + self.partial_candidates(req, first_missing, self._partial_end(req, limit))
        if self._geometry.keeps_state:
            wanted += [state_key(key) for key in keys]
        for holdings in self._holdings.values():
            holdings.answered(wanted)

    def find_hit(self, req: CachedRequest, start: int, limit: int, wait: bool = False) -> Hit | None:
        """The chunks a load of the request can take from the chunk holding token `start`
        (what the engine has already) up to token `limit`; None: ask again later — a
        tier's answer is still out, a chunk is being filled, or chunks are being fetched
        into host slots for this request (their fetches are in the next plan). With
        `wait` the tiers are asked at once and only fetches answer None."""
        chunk = self._config.chunk_size
        first = start // chunk
        if not self._config.loads:  # a prefill instance computes every prompt
            return Hit(start, first, (), (), (), chunk, 0, False)
        keys = self.keys(req, len(req.tokens))[first:]
        found = self._directory.lookup(keys)
        if len(found) < len(keys):
            if not self._answered(keys[len(found) :], wait):
                return None
            found = self._directory.lookup(keys)
        if len(found) < len(keys):
            if not wait and self._directory.filling(keys[len(found)]):
                return None  # soon a host hit: cheaper than loading it twice
            if self._fetch(
                req, first + len(found), keys[len(found) :], keys[: len(found)], self._geometry.blocks_per_chunk
            ):
                return None
        hit_keys, tiers = keys[: len(found)], list(found)
        ends = [(first + c + 1) * chunk for c in range(len(hit_keys))]
        partials = self.partial_candidates(req, first + len(found), self._partial_end(req, limit))
        if partials:
            if not self._answered(partials, wait):
                return None
            if not wait and any(self._directory.filling(p) for p in partials):
                return None  # a partial is being stored or fetched: soon a longer host hit
            partial = self._directory.lookup_partial(hit_keys, partials)
            if partial is None and self._fetch_partial(req, first + len(found), hit_keys, partials):
                return None
            if partial is not None:
                hit_keys = [*hit_keys, partials[partial[0]]]
                tiers.append(partial[1])
                ends.append((first + len(found)) * chunk + (partial[0] + 1) * self._geometry.block_size)
        with_state = False
        if self._geometry.keeps_state:
            taken = self._state_end(req, first, hit_keys, start, limit, wait)
            if taken is None:
                return None
            hit_keys, tiers, ends, with_state = hit_keys[:taken], tiers[:taken], ends[:taken], taken > 0
        end = min(ends[-1], limit) if ends else start
        if self._geometry.hybrid:  # a group's kept pages are those of a hit ending where its chunk ends
            end = max((e for e in ends if e <= limit), default=start)
        tokens = max(end - start, 0)
        lower = any(tier != Source.HOST for tier in tiers[: math.ceil(tokens / chunk) + 1])
        sources = [req.held.get(key, tier) for key, tier in zip(hit_keys, tiers)]  # a fetched chunk: its tier's hit
        # A hybrid model's loads all run in the background: vLLM hears of a failed one only per request then.
        load_async = bool(tokens) and (lower and self._async_load or self._geometry.hybrid)
        state = state_key(hit_keys[-1]) if with_state else None
        return Hit(start, first, tuple(hit_keys), tuple(sources), tuple(ends), chunk, tokens, load_async, state)

    def _partial_end(self, req: CachedRequest, limit: int) -> int:
        """Where the partial chunks a hit may take end at the latest: on the request's
        last full block, since a load may take the first blocks of a longer partial
        (a prompt of whole blocks then hits the partial chunk its producer stored);
        `limit` for a hybrid model, whose kept pages are those of a hit ending where
        its chunk ends."""
        if self._geometry.hybrid:
            return limit
        return len(req.tokens) // self._geometry.block_size * self._geometry.block_size

    def _state_end(
        self, req: CachedRequest, first: int, keys: Sequence[ChunkKey], start: int, limit: int, wait: bool
    ) -> int | None:
        """How many of `keys` (chunks `first`, `first + 1`, ..., loadable) a hit takes: the
        most that end in (`start`, `limit`] at a chunk whose Mamba-type state one load
        could pin with them (0: none). None: ask again (a tier's answer is out, a state
        is being filled, or one is fetched)."""
        chunk = self._config.chunk_size
        lengths = [n for n in range(1, len(keys) + 1) if start < (first + n) * chunk <= limit]
        states = [state_key(keys[n - 1]) for n in lengths]
        if not states:
            return 0
        if not self._answered(states, wait) or (not wait and any(self._directory.filling(k) for k in states)):
            return None
        taken = self._directory.lookup_last([(keys[:n], key) for n, key in zip(lengths, states)])
        longest = -1 if taken is None else taken[0]
        for i in range(len(states) - 1, longest, -1):  # a longer state that a fetch-first tier holds
            if any(h.contains(states[i]) for _, h in self._fetch_tiers):
                fetched = self._fetch(req, 0, [states[i]], keys[: lengths[i]], 0, self._geometry.state_bytes)
                if fetched:
                    return None
                break
        return 0 if taken is None else lengths[taken[0]]

    def _answered(self, keys: Sequence[ChunkKey], wait: bool) -> bool:
        """Whether every tier knows about `keys` now (with `wait`: after asking)."""
        answered = True
        for holdings in self._holdings.values():
            if not holdings.answered(keys):
                if wait:
                    holdings.probe(keys)
                else:
                    answered = False
        return answered

    def _fetch(
        self,
        req: CachedRequest,
        chunk: int,
        keys: Sequence[ChunkKey],
        keep: Sequence[ChunkKey],
        blocks: int,
        nbytes: int = 0,
    ) -> bool:
        """Plan fetches of the leading `keys` (chunks `chunk`, `chunk + 1`, ... of `blocks`
        blocks, or records of `nbytes`) that a fetch-first tier holds into host slots
        (taken without evicting `keep`), held for `req`; whether any was planned."""
        planned = False
        for c, key in enumerate(keys, start=chunk):
            tier = next((name for name, h in self._fetch_tiers if h.contains(key)), None)
            slot = self._directory.reserve_fill(key, keep) if tier is not None else None
            if tier is None or slot is None:
                break
            read = TierTransfer(tier, key, slot, nbytes or self._geometry.chunk_bytes(blocks, c))
            item_id = self._new_item(_Item(key, "fetch", tier=tier, request=req))
            self._next.fetches.append(FetchItem(item_id, read))
            req.held[key] = tier
            self._holders.add(req)
            planned = True
        return planned

    def _fetch_partial(
        self, req: CachedRequest, chunk: int, hit_keys: Sequence[ChunkKey], partials: Sequence[ChunkKey]
    ) -> bool:
        """Fetch the longest of `partials` that a fetch-first tier holds, when that is
        longer than any partial a load could take now."""
        for i in range(len(partials) - 1, -1, -1):
            if any(h.contains(partials[i]) for _, h in self._fetch_tiers):
                return self._fetch(req, chunk, [partials[i]], hit_keys, i + 1)
        return False

    # -- loads --

    def plan_load(self, req: CachedRequest, hit: Hit, tables: BlockTables, num_tokens: int) -> None:
        """Pin the chunks behind `num_tokens` of `hit` and plan their copy into `tables`
        (all of the request's blocks, per KV cache group: the engine's own hit first, then
        ours), before the next forward or, as the hit said, in the background. The chunks
        fetched for the request are let go: the load pins what it takes."""
        try:
            if num_tokens > 0:
                self._plan_load(req, hit, tables, num_tokens)
        finally:
            self._let_go(req)

    def _plan_load(self, req: CachedRequest, hit: Hit, tables: BlockTables, num_tokens: int) -> None:
        g, chunk = self._geometry, self._config.chunk_size
        first_block = hit.start // g.block_size
        end_block = (hit.start + num_tokens) // g.block_size
        copies = []  # per chunk: (blocks, first, last, each group's pages), up to the first it cannot fill
        for c in range(hit.first_chunk, (end_block - 1) // g.blocks_per_chunk + 1):
            blocks = (hit.ends[c - hit.first_chunk] - c * chunk) // g.block_size
            lo, hi = max(c * g.blocks_per_chunk, first_block), min(c * g.blocks_per_chunk + blocks, end_block)
            base = c * g.blocks_per_chunk
            parts = g.group_pages(tables, c, blocks, lo - base, hi - base, load=True)
            if parts is None:
                logger.warning(
                    "request %s: chunk %d cannot fill the blocks vLLM gave it; it is recomputed", req.req_id, c
                )
                break
            copies.append((blocks, lo, hi, parts))
        state = self._state_pages(req, hit, tables, end_block, len(copies))
        covered, items = first_block, []
        wanted = [*hit.keys[: len(copies)], *([hit.state] if hit.state and state else [])]
        loads = self._directory.reserve_loads(wanted)
        if state is not None and len(loads) == len(wanted):
            last = loads.pop()
            items.append(self._load_item(req, last, SlotCopy(last.slot, (), 0, 0, state), g.state_bytes))
        else:
            state = None
        for c, (load, (blocks, lo, hi, parts)) in enumerate(zip(loads, copies), start=hit.first_chunk):
            base = c * g.blocks_per_chunk
            copy = SlotCopy(load.slot, tuple(tables[g.base_group][lo:hi]), blocks, lo - base, parts)
            items.append(self._load_item(req, load, copy, g.chunk_bytes(blocks, c)))
            covered = hi
        if g.keeps_state and state is None:  # without its state no block of the hit is usable
            covered = first_block
        failed = list(tables[g.base_group][covered:end_block])
        if failed:  # a file vanished behind our back since the lookup
            logger.info(
                "request %s: %d promised blocks are no longer cached; they are recomputed", req.req_id, len(failed)
            )
        if hit.load_async:
            self._next.async_loads.append(AsyncLoad(req.req_id, tuple(items), tuple(failed)))
        else:
            self._next.loads += items
            self._next.failed_blocks += failed

    def _load_item(self, req: CachedRequest, load: PlannedLoad, copy: SlotCopy, nbytes: int) -> LoadItem:
        """The load of `copy` from `load`'s slot (read first from its tier, unless host)."""
        lower = load.source != Source.HOST
        read = TierTransfer(load.source, load.key, load.slot, nbytes) if lower else None
        if lower:
            self._holdings[load.source].pin(load.key)
        item = _Item(load.key, "load", tier=load.source if lower else None)
        origin = req.held.get(load.key, load.source)  # a fetched chunk counts as its tier's hit
        return LoadItem(self._new_item(item), load.key, copy, read, origin)

    def _state_pages(
        self, req: CachedRequest, hit: Hit, tables: BlockTables, end_block: int, chunks: int
    ) -> tuple[GroupPages, ...] | None:
        """Where the hit's Mamba-type state goes: the blocks vLLM gave its last block, when
        the load takes every chunk of the hit up to its end."""
        if hit.state is None:
            return None
        if chunks < len(hit.keys) or end_block * self._geometry.block_size != hit.ends[-1]:
            logger.warning(
                "request %s: a hit without its state at its end cannot be used; it is recomputed", req.req_id
            )
            return None
        blocks = {i: t[end_block - 1] for i, t in enumerate(tables) if len(t) >= end_block}
        parts = self._geometry.state_pages(blocks)
        if parts is None:
            logger.warning(
                "request %s: vLLM gave no block for the state at the hit's end; it is recomputed", req.req_id
            )
        return parts

    # -- stores --

    def plan_stores(
        self, req: CachedRequest, tables: BlockTables, computed: int, plan: StepPlan, computed_before: int = 0
    ) -> bool:
        """Into `plan`, stores of the full chunks computed in `tables` (the request's
        blocks, per KV cache group) by the end of this step, of which `computed_before`
        were computed before it; once the prompt is computed, with save_unfull_chunk, of
        the full blocks of its last partial chunk. A hybrid model's chunk whose kept
        blocks vLLM has freed is skipped. False when a chunk found no free host slot
        (the rest waits for a later call)."""
        if not self._config.stores:  # a decode instance without save_decode_cache
            return True
        g = self._geometry
        limit = len(req.tokens) if self._config.save_decode_cache else req.prompt_len
        keys = self.keys(req, min(computed, limit))
        while req.stored < len(keys):
            c = req.stored
            if len(tables[g.base_group]) < (c + 1) * g.blocks_per_chunk:
                return True
            if any(h.contains(keys[c]) for _, h in self._fetch_tiers):
                req.stored += 1  # fetched when a request wants it
                continue
            bpc = g.blocks_per_chunk
            parts = g.group_pages(tables, c, bpc, 0, bpc, load=False, computed=computed_before)
            if parts is None:
                req.gone = c if req.gone is None else req.gone
                req.stored += 1  # its pages are gone
                continue
            slot = self._directory.reserve_store(keys[c])
            if slot is Reserve.NO_SLOT:
                return False
            if slot is Reserve.PRESENT and self._directory.filling(keys[c]):
                return True  # try again next step: a read that fails leaves the chunk to store
            req.stored += 1
            if slot is Reserve.PRESENT:
                continue
            copy = SlotCopy(slot, tuple(tables[g.base_group][c * bpc : (c + 1) * bpc]), 0, 0, parts)
            self._store(plan, req, keys[c], copy, g.chunk_bytes(bpc, c))
            if self._config.save_unfull_chunk:  # the full chunk replaces the partials it extends
                self._directory.discard(self.partial_candidates(req, c, (c + 1) * self._config.chunk_size))
        if self._config.save_unfull_chunk and not req.prompt_partial and computed >= req.prompt_len:
            req.prompt_partial = True
            return self.store_partial(plan, req, tables, req.prompt_len, computed_before)
        return True

    def store_partial(
        self, plan: StepPlan, req: CachedRequest, tables: BlockTables, upto: int, computed_before: int = 0
    ) -> bool:
        """Into `plan`, a store of the full blocks of the partial chunk among the first
        `upto` tokens, once every full chunk before it is stored; it replaces the shorter
        partials it extends (`computed_before`: as in `plan_stores`). False when it found
        no free host slot."""
        g, chunk = self._geometry, self._config.chunk_size
        c, blocks = upto // chunk, upto % chunk // g.block_size
        if not blocks or req.stored != c or not self._config.stores:
            return True
        partials = self.partial_candidates(req, c, c * chunk + blocks * g.block_size)
        ids = tables[g.base_group][c * g.blocks_per_chunk : c * g.blocks_per_chunk + blocks]
        parts = g.group_pages(tables, c, blocks, 0, blocks, load=False, computed=computed_before)
        if len(partials) != blocks or len(ids) != blocks or parts is None:
            return True  # an extra key that cannot be encoded, or blocks no longer listed or held
        slot = self._directory.reserve_store(partials[-1])
        if slot is Reserve.NO_SLOT:
            return False
        req.partial = (c * chunk + blocks * g.block_size, partials[-1])
        if isinstance(slot, Reserve):
            return True
        self._store(plan, req, partials[-1], SlotCopy(slot, tuple(ids), 0, 0, parts), g.chunk_bytes(blocks, c))
        self._directory.discard(partials[:-1])
        return True

    def store_states(self, req: CachedRequest, states: dict[int, dict[int, int]], plan: StepPlan) -> None:
        """Into `plan`, stores of the Mamba-type state that vLLM keeps at chunk ends, which
        it handed over this step (`states`: tokens at the state's end -> group -> block
        id; valid in this step only). A state with no free slot is not stored (a later
        hit ends earlier)."""
        chunk, g = self._config.chunk_size, self._geometry
        limit = len(req.tokens) if self._config.save_decode_cache else req.prompt_len
        if not self._config.stores:
            return
        for end, blocks in sorted(states.items()):
            keys = self.keys(req, end) if end % chunk == 0 and end <= limit else []
            parts = g.state_pages(blocks)
            if len(keys) != end // chunk or not keys or parts is None:
                continue
            key = state_key(keys[-1])
            if any(h.contains(key) for _, h in self._fetch_tiers):
                continue
            slot = self._directory.reserve_store(key)
            if not isinstance(slot, Reserve):
                self._store(plan, req, key, SlotCopy(slot, (), 0, 0, parts), g.state_bytes)

    def _store(self, plan: StepPlan, req: CachedRequest, key: ChunkKey, copy: SlotCopy, nbytes: int) -> None:
        shard = self._geometry.shard_bytes(nbytes)
        writes = tuple(name for name, h in self._holdings.items() if h.admit(key, shard))
        for name in writes:
            self._holdings[name].announce(key)
        item = _Item(key, "store", writes=writes, writes_left=self._geometry.tp_size * len(writes), request=req)
        plan.stores.append(StoreItem(self._new_item(item), req.req_id, key, copy, writes, nbytes))

    # -- disaggregated prefill --

    def stored_extent(self, req: CachedRequest) -> tuple[int, ChunkKey | None]:
        """How many leading tokens of the request its stores cover (planned, or found
        already held), and the key of the last chunk among them: what a prefill
        instance tells its decode instance (`expect`). They end before a hybrid's
        first chunk whose kept blocks vLLM freed: that one never arrives, and no hit
        reaches past it."""
        chunk = self._config.chunk_size
        stored = req.stored if req.gone is None else req.gone
        keys = req.keys[:stored]
        if req.partial is not None and req.partial[0] // chunk == stored:  # it follows the full chunks
            return req.partial
        return (len(keys) * chunk, keys[-1]) if keys else (0, None)

    def expect(self, req: CachedRequest, tokens: int, last_key: str) -> bool:
        """A prefill instance stored the request's first `tokens` (whose last chunk's key
        is `last_key`, in hex): the tiers wait for those chunks as for chunks in flight.
        False, waiting for nothing, when this request's own keys of those tokens end
        elsewhere (another model, tokenization or salt: they would never arrive)."""
        chunk, block = self._config.chunk_size, self._geometry.block_size
        if tokens <= 0 or tokens % block or tokens > len(req.tokens):
            return False
        wanted = list(self.keys(req, tokens))
        if tokens % chunk:
            partials = self.partial_candidates(req, tokens // chunk, tokens)
            if len(partials) != tokens % chunk // block:
                return False
            wanted.append(partials[-1])
        if not wanted or wanted[-1].hex() != last_key:
            logger.info(
                "request %s: the prefill instance's chunks are keyed apart from this instance's; not waited for",
                req.req_id,
            )
            return False
        for holdings in self._holdings.values():
            holdings.expect(wanted)
        return True

    def wait_announced(self) -> None:
        """Wait (at most `remote_timeout_ms`) until every store planned so far is marked
        in flight where other instances look: a prefill instance calls it before its
        answer leaves, so its decode instance never looks before the marks are there."""
        for holdings in self._holdings.values():
            holdings.wait_announced(self._config.remote_timeout_ms / 1000)

    # -- plans and reports --

    @property
    def next_plan(self) -> StepPlan:
        """The plan that the next `take_plan` returns (loads and fetches planned so far)."""
        return self._next

    def take_plan(self) -> StepPlan:
        """The plan built since the last call (its stores are added by `plan_stores`)."""
        plan, self._next = self._next, self._new_plan()
        return plan

    def add_evictions(self, plan: StepPlan) -> None:
        """Into `plan`, once its stores are planned: the records every rank deletes
        before it writes anything (room the stores' writes were admitted into)."""
        for name, holdings in self._holdings.items():
            if keys := holdings.take_evictions():
                plan.evictions.setdefault(name, []).extend(keys)

    def apply_report(self, report: WorkerReport | None) -> None:
        """Act on the items that every rank has reported."""
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
                for name in item.writes:
                    self._holdings[name].written(item.key)
                self._release(item_id)

    def _item_done(self, item_id: int, ok: bool) -> None:
        item = self._items[item_id]
        if item.kind == "store":
            self._directory.commit(item.key, ok)
            item.request = None  # its blocks are read: the request may reuse them
            if item.writes_left == 0:  # else the last tier write releases the slot
                self._release(item_id)
            return
        if item.tier is not None:
            self._directory.commit(item.key, ok)
            if item.kind == "load":
                self._holdings[item.tier].unpin(item.key)
            if not ok:
                self._holdings[item.tier].forget(item.key)
        req = item.request
        if item.kind == "fetch" and req is not None and ok and not req.done and item.key in req.held:
            del self._items[item_id]  # the request holds the pin until its load is planned
            return
        if item.kind == "fetch" and req is not None and item.key in req.held:
            del req.held[item.key]
        self._release(item_id)

    def _new_item(self, item: _Item) -> int:
        item_id = next(self._ids)
        self._items[item_id] = item
        return item_id

    def _release(self, item_id: int) -> None:
        self._directory.release(self._items.pop(item_id).key)

    def _let_go(self, req: CachedRequest) -> None:
        """Release the pins of chunks fetched for `req` whose fetch has ended."""
        in_flight = {item.key for item in self._items.values() if item.kind == "fetch" and item.request is req}
        still = {key: tier for key, tier in req.held.items() if key in in_flight}
        for key in req.held:
            if key not in in_flight:
                self._directory.release(key)
        req.held = still
        if not still:
            self._holders.discard(req)

    def stores_pending(self, req_id: str) -> bool:
        """Whether some rank has not yet reported a store that reads the request's blocks."""
        return any(
            item.kind == "store" and item.request is not None and item.request.req_id == req_id
            for item in self._items.values()
        )

    def finished(self, req: CachedRequest) -> None:
        """The request is done (or aborted): let go of what it holds."""
        req.done = True
        self._let_go(req)

    def has_pending_work(self) -> bool:
        """Items not yet reported by every rank: the engine must keep stepping to hear of them."""
        return bool(self._items)

    def reset(self) -> bool:
        """Drop everything cached before this call: a new epoch enters every key, so no
        later lookup hits a chunk stored before it, on any tier, after a restart too, and
        stores still in flight land under old keys nobody asks for. Unpinned host slots
        are freed now, pinned ones at their last release; every rank clears its lower
        tiers in the next step (the shared remote store keeps its records, which the new
        epoch already hides). Requests made before it must be made again (`request`).
        False, with nothing changed, when the new epoch cannot be made durable in the
        disk tier's directory."""
        epoch = next_epoch(self._config.local_disk)
        if epoch is None:
            return False
        self._namespace = self._namespace.with_epoch(epoch)
        for req in list(self._holders):
            self.finished(req)
        pinned = self._directory.clear()
        for holdings in self._holdings.values():
            holdings.clear()
        self._next.clear_tiers = bool(self._holdings)
        logger.info("KV cache reset: new epoch %s; %d host chunks still in transfer drop when it ends", epoch, pinned)
        return True

    def count_evictions(self) -> None:
        """Count each lower tier's evictions since the last call into `metrics`."""
        for name, holdings in self._holdings.items():
            evictions = holdings.stats().get("evictions")
            if evictions is not None:
                seen = self._evictions_seen.get((name, "evictions"), 0)
                if evictions > seen:
                    self.metrics.evicted(name, evictions - seen)
                self._evictions_seen[(name, "evictions")] = evictions

    def close(self) -> None:
        for holdings in self._holdings.values():
            holdings.close()

    @property
    def namespace(self) -> Namespace:
        return self._namespace

    def host_chunks(self) -> int:
        return self._directory.host_chunks()

    def pinned_slots(self) -> int:
        return self._directory.pinned_slots()
