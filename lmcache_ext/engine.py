"""CacheEngine: the planner (lmcache_ext.planner) and an executor in one process, for
callers outside vLLM, tests and benchmarks.

Tokens are cut into chunks of ``chunk_size`` tokens; block ``i`` of a request's
block list holds its tokens ``[i*block_size, (i+1)*block_size)``. A chunk is
stored as its blocks' pages, ``[layer][block][page]``, in one host slot, and
written through to the lower tiers in the background when they are configured;
its host slot stays pinned until every tier's write has ended. Each call is one
step of the planner's plans, run here at once; a lookup that the planner answers
"ask again" (remote chunks being fetched into host slots) runs the fetches first.

A hybrid model's cache (`groups`: its KV cache groups, as vLLM's hybrid KV cache
manager forms them) takes one block list per group, and its chunks keep per group the
blocks a hit ending there reads (`lmcache_ext.kv_groups`). As in vLLM, block 0 is the
null block: it is never stored, and a retrieve leaves it and every block outside a
group's window at the hit's end alone.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeAlias

import torch

from lmcache_ext import ops
from lmcache_ext.config import CacheConfig
from lmcache_ext.executor import TransferExecutor
from lmcache_ext.geometry import NULL_BLOCK, Geometry
from lmcache_ext.keys import Namespace
from lmcache_ext.kv_groups import MAMBA, KVGroup
from lmcache_ext.metrics import EngineStats
from lmcache_ext.planner import CachedRequest, ChunkPlanner, Hit
from lmcache_ext.plans import LoadItem, Plan, SlotCopy, Source, StepPlan, StoreItem, TierTransfer, WorkerReport
from lmcache_ext.tiers import build_storage, open_holdings

KVCaches: TypeAlias = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
Tokens: TypeAlias = Sequence[int] | torch.Tensor
BlockIds: TypeAlias = Sequence[int] | torch.Tensor | Sequence[Sequence[int]]  # a hybrid's: one list per group


class CacheEngine:
    """Store, look up and retrieve the KV cache of token prefixes in one process."""

    def __init__(
        self,
        config: CacheConfig,
        kv_caches: KVCaches,
        block_size: int,
        *,
        model: str = "unnamed",
        revision: str = "",
        tp_size: int = 1,
        tp_rank: int = 0,
        groups: Sequence[KVGroup] = (),
    ) -> None:
        """One rank (`tp_rank` of `tp_size`) of a model's cache: its keys name that rank,
        and its disk files live in that rank's directory. `groups`: a hybrid model's KV
        cache groups, whose layer names `kv_caches` maps to their views."""
        config.check_block_size(block_size)
        self._config = config
        self._kv: ops.PagedLayers | ops.PagedGroups
        if groups:
            if not isinstance(kv_caches, Mapping):
                raise ValueError("kv_caches is a sequence; with groups it must map each group's layer names to views")
            mamba = [g.layer_names[0] for g in groups if g.kind == MAMBA]
            if mamba:
                raise ValueError(
                    f"groups has Mamba-type groups (from {mamba[0]}): a CacheEngine keeps attention KV; "
                    "Mamba-type state is cached through the vLLM connector, which vLLM tells where each state is"
                )
            sizes = {g.block_size for g in groups}
            if max(sizes) != block_size or any(block_size % size for size in sizes):
                raise ValueError(
                    f"the groups have block sizes {sorted(sizes)}; expected the largest to be block_size = "
                    f"{block_size} and each to divide it"
                )
            self._kv = ops.PagedGroups.from_groups(kv_caches, groups)
            first = self._kv.groups[0]
        else:
            self._kv = first = ops.PagedLayers.from_tensors(kv_caches)
        self._block_size = block_size
        geometry = Geometry.of_cache(
            model=model,
            revision=revision,
            dtype=str(first.tensors[0].dtype),
            layout=first.layout,
            block_size=block_size,
            page_bytes=first.page_bytes,
            num_layers=self._kv.num_layers,
            chunk_size=config.chunk_size,
            tp_size=tp_size,
            tp_rank=tp_rank,
            ranks=1,
            device_type=self._kv.device.type,
            groups=tuple(groups),
        )
        self._geometry = geometry
        self._storage = build_storage(config, geometry, tp_rank)
        self._pool = self._storage.pool
        self._stats = EngineStats()
        self._planner = ChunkPlanner(
            config, geometry, self._pool, open_holdings(config, geometry, ranks=[tp_rank]), metrics=self._stats
        )
        self._executor = TransferExecutor(
            self._kv,
            self._pool,
            self._storage.tiers,
            read_threads=self._storage.read_threads,
            cuda_copy_path=config.cuda_copy_path,
        )
        self._lock = threading.RLock()  # the planner's state: callers' threads and tier write callbacks
        self._transfers = ThreadPoolExecutor(1, thread_name_prefix="lmcache-engine")
        if config.cpu_copy_threads:
            ops.set_cpu_copy_options(threads=config.cpu_copy_threads)
        self._closed = False
        self._close_lock = threading.Lock()

    # -- public API --

    def lookup(self, tokens: Tokens) -> int:
        """Length of the longest cached prefix of `tokens`, in tokens: whole chunks, then
        with save_unfull_chunk the longest stored partial chunk that `tokens` extend
        (whole blocks). Chunks found only in the remote store are fetched into host slots
        first: what a lookup counts, a retrieve finds."""
        self._check_open()
        with self._lock:
            req = self._planner.request("lookup", tokens, len(tokens))
            hit = self._hit(req)
            self._planner.finished(req)
        self._stats.lookup(len(tokens), hit.by_source(hit.tokens))
        return hit.tokens

    def store(self, tokens: Tokens, block_ids: BlockIds) -> int:
        """Store the chunks of `tokens` held in `block_ids`; returns how many leading
        tokens are now cached (stored by this call or before). Full chunks only,
        unless save_unfull_chunk. Lower tiers are written in the background."""
        self._check_open()
        with self._stats.timer("store"):
            with self._lock:
                req = self._planner.request("store", tokens, len(tokens))
                tables = self._tables(block_ids, self._storable_blocks(len(tokens)), "store")
                plan = self._planner.take_plan()
                room = self._planner.plan_stores(req, tables, len(tokens), plan)
                self._housekeep(plan)  # the records evicted to make room go before the writes
            if not room:
                self._stats.failed("no_free_slot")
            self._planner.wait_announced()  # a producer's marks are out before any record is written
            try:  # outside the lock: the slots are pinned, and lookups go on meanwhile
                gathered = self._executor.run(Plan(gathers=tuple(item.copy for item in plan.stores))).gathers
            except BaseException:
                gathered = tuple(False for _ in plan.stores)
                raise
            finally:
                self._stored(plan, gathered)
            self._stats.usage(
                Source.HOST,
                (self._pool.num_slots - self._pool.num_free) * self._pool.slot_bytes,
                self._pool.num_slots * self._pool.slot_bytes,
            )
            self._storage.record(self._stats)  # here, not in a write's callback: a tier may hold its lock there
            chunk = self._config.chunk_size
            cached = req.stored * chunk
            whole = cached == len(tokens) // chunk * chunk
            if room and self._config.stores and self._config.save_unfull_chunk and whole:
                cached = len(tokens) // self._block_size * self._block_size
            return cached

    def _stored(self, plan: StepPlan, gathered: Sequence[bool]) -> None:
        """Report the plan's gathers, then write each filled slot to its tiers (a failed
        gather reports its writes as done)."""
        report, writes, store_of = WorkerReport(), [], {}
        for item, ok in zip(plan.stores, gathered):
            (report.stored if ok else report.store_failed)[item.id] += 1
            if not ok:
                report.written[item.id] += len(item.writes)
                continue
            self._stats.stored(Source.HOST, self._tokens(item.copy), item.nbytes)
            for tier in item.writes:
                writes.append(TierTransfer(tier, item.key, item.copy.slot, item.nbytes))
                store_of[(tier, item.key)] = item
        with self._lock:
            self._planner.apply_report(report)
        self._executor.run(Plan(writes=tuple(writes)), on_write_done=lambda w, ok: self._written(w, store_of, ok))

    def store_async(self, tokens: Tokens, block_ids: BlockIds) -> Future[int]:
        """`store` on the engine's transfer thread: returns at once, with a future of what
        `store` returns. The caller keeps the KV in `block_ids` unchanged until the future
        is done. A chunk becomes visible to lookups only once its copy is complete (invariant 1)."""
        self._check_open()
        return self._transfers.submit(self.store, tokens, block_ids)

    def retrieve_async(self, tokens: Tokens, block_ids: BlockIds) -> Future[int]:
        """`retrieve` on the engine's transfer thread: returns at once; `block_ids` hold
        the loaded prefix once the future is done."""
        self._check_open()
        return self._transfers.submit(self.retrieve, tokens, block_ids)

    def retrieve(self, tokens: Tokens, block_ids: BlockIds) -> int:
        """Load the longest cached prefix of `tokens` into `block_ids`; returns its
        length in tokens. Stops at the first miss or at a chunk that fails its checks."""
        self._check_open()
        with self._stats.timer("load"):
            with self._lock:
                req = self._planner.request("retrieve", tokens, len(tokens))
                hit = self._hit(req)
                tables = self._tables(block_ids, hit.tokens // self._block_size, "retrieve")
                self._planner.plan_load(req, hit, self._geometry.read_at(tables, hit.tokens), hit.tokens)
                self._planner.finished(req)
                plan = self._planner.take_plan()
                self._housekeep(plan)
            items = plan.loads + [item for job in plan.async_loads for item in job.items]
            good: list[LoadItem] = []
            read_ok: dict[bytes, bool] = {}
            try:  # outside the lock: the slots are pinned
                reads = [item.read for item in items if item.read is not None]
                read_ok = dict(zip((r.key for r in reads), self._executor.run(Plan(reads=tuple(reads))).reads))
                good = list(itertools.takewhile(lambda item: read_ok.get(item.key, True), items))
                self._executor.run(Plan(scatters=tuple(item.copy for item in good)))  # none past a failed chunk
            finally:
                self._loaded(items, good, read_ok)
            return sum(self._tokens(item.copy) for item in good)

    def _loaded(self, items: Sequence[LoadItem], good: Sequence[LoadItem], read_ok: dict[bytes, bool]) -> None:
        """Report the loads: `good` (the leading items) are in their blocks, the rest not."""
        report = WorkerReport()
        for i, item in enumerate(items):
            (report.loaded if i < len(good) else report.load_failed)[item.id] += 1
            tier = item.origin
            if i < len(good):
                self._stats.loaded(tier, self._tokens(item.copy), self._geometry.copy_bytes(item.copy))
            elif not read_ok.get(item.key, True):
                self._stats.failed(f"{tier}_read")
        with self._lock:
            self._planner.apply_report(report)

    def reset(self) -> bool:
        """Drop everything cached before this call, e.g. after the model's weights changed
        in place: no later lookup hits a chunk stored before it, in host memory or on
        disk, after a restart too (a new epoch enters every key; see lmcache_ext.epoch).
        Host slots not in use are freed at once, the disk files are deleted in the
        background. False, with nothing changed, when the new epoch cannot be written
        to the disk tier's directory."""
        self._check_open()
        with self._lock:
            if not self._planner.reset():
                return False
            self._housekeep(self._planner.take_plan())
            return True

    def stats(self) -> dict[str, Any]:
        """Counters of this engine plus the current state of its tiers."""
        self._storage.record(self._stats)
        with self._lock:
            self._planner.count_evictions()
            out: dict[str, Any] = self._stats.snapshot()
            out.update(
                host_slots=self._pool.num_slots,
                host_slots_free=self._pool.num_free,
                host_chunks=self._planner.host_chunks(),
                pinned_slots=self._planner.pinned_slots(),
            )
        for name, tier in self._storage.tiers.items():
            out.update({f"{name}_{k}": v for k, v in tier.stats().items()})
        return out

    def flush(self) -> None:
        """Wait until every background tier write has finished."""
        self._storage.flush()

    def close(self) -> None:
        """Finish pending tier writes, then release the slot pool. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._transfers.shutdown(wait=True)  # queued stores and retrieves end first
            self._closed = True
        self._storage.close()
        self._planner.close()
        self._executor.close()

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def namespace(self) -> Namespace:
        return self._planner.namespace

    # -- helpers --

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the cache engine is closed")

    def _hit(self, req: CachedRequest) -> Hit:
        """The planner's hit for the whole of `req`'s tokens, after running the fetches it
        asks for (remote chunks into host slots) until it answers."""
        while (hit := self._planner.find_hit(req, 0, len(req.tokens), wait=True)) is None:
            self._housekeep(self._planner.take_plan())
        return hit

    def _housekeep(self, plan: StepPlan) -> None:
        """What a plan asks before its loads and stores: the records the planner evicts,
        a reset's clearing of the lower tiers, and the fetches into host slots, reported."""
        self._planner.add_evictions(plan)
        for name, keys in plan.evictions.items():
            for key in keys:
                self._storage.tiers[name].remove(key)
        plan.evictions.clear()
        if plan.clear_tiers:
            for tier in self._storage.tiers.values():
                tier.clear()
        if plan.fetches:
            fetched = self._executor.run(Plan(reads=tuple(f.read for f in plan.fetches))).reads
            report = WorkerReport()
            for fetch, ok in zip(plan.fetches, fetched):
                (report.loaded if ok else report.load_failed)[fetch.id] += 1
                if not ok:
                    self._stats.failed(f"{fetch.read.tier}_read")
            self._planner.apply_report(report)

    def _tokens(self, copy: SlotCopy) -> int:
        return len(copy.block_ids) * self._block_size

    def _storable_blocks(self, num_tokens: int) -> int:
        """Blocks that hold the chunks a store of `num_tokens` tokens takes: full chunks,
        then with save_unfull_chunk the full blocks after them."""
        chunk = self._config.chunk_size
        if self._config.save_unfull_chunk:
            return num_tokens // self._block_size
        return num_tokens // chunk * (chunk // self._block_size)

    def _tables(self, block_ids: BlockIds, need: int, what: str) -> list[list[int]]:
        """The `need` blocks that hold the chunks, one list per group (one for a model
        without groups), checked: enough of them, in range, and no repeats but the null
        block's (a repeat would make two chunks write the same block)."""
        if not isinstance(self._kv, ops.PagedGroups):
            return [self._block_list(self._kv, block_ids, need, what, "block_ids")]
        if isinstance(block_ids, torch.Tensor) or len(block_ids) != len(self._kv.groups):
            raise ValueError(f"{what}: block_ids must be {len(self._kv.groups)} lists, one per KV cache group")
        return [
            self._block_list(kv, ids, need * self._geometry.ratio(group), what, f"block_ids[{g}]", group.block_size)
            for g, (kv, ids, group) in enumerate(zip(self._kv.groups, block_ids, self._geometry.groups))
        ]

    def _block_list(
        self, kv: ops.PagedLayers, block_ids: Any, need: int, what: str, name: str, block_size: int = 0
    ) -> list[int]:
        ids = block_ids.tolist() if isinstance(block_ids, torch.Tensor) else list(block_ids)
        if len(ids) < need:
            raise ValueError(
                f"{what}: len({name}) = {len(ids)} is too short: the tokens fill {need} blocks "
                f"of {block_size or self._block_size} tokens"
            )
        ids = ops.check_block_ids(kv, ids[:need]).tolist()
        seen: dict[int, int] = {}
        for i, b in enumerate(ids):
            if b in seen and not (self._geometry.hybrid and b == NULL_BLOCK):
                raise ValueError(f"{what}: {name}[{i}] = {b} repeats {name}[{seen[b]}]")
            seen[b] = i
        return ids

    def _written(self, write: TierTransfer, store_of: dict[tuple[str, bytes], StoreItem], ok: bool) -> None:
        """A tier write ended (on that tier's thread): count it, and report it to the
        planner, which releases the slot after the chunk's last write."""
        item = store_of[(write.tier, write.key)]
        if ok:
            self._stats.stored(write.tier, self._tokens(item.copy), write.nbytes)
        else:
            self._stats.failed(f"{write.tier}_write")
        report = WorkerReport()
        report.written[item.id] += 1
        with self._lock:
            self._planner.apply_report(report)
