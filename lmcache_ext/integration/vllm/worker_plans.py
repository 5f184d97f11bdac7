"""How the worker runs each step's plan on its own TP shard, and what it reports per
item id, so the scheduler learns what happened.

- Loads of host hits run in `start_load_kv`, before the forward. Loads that read a
  lower tier first run on the loader thread, in the background; their request is
  reported through `get_finished` (finished_recving) once they ended, after their
  failed blocks joined the load errors.
- Stores run on the saver thread after the step (async_save; on CUDA the gathers are
  queued on the copy stream in `wait_for_save`, ordered after the forward, and only
  the tier writes wait on the saver thread).
- Sleep mode (vLLM 0.33): `unregister` waits for every transfer that touches the KV
  cache, then forgets its addresses; until `restore` re-reads them from the views
  registered at start-up, a step that would copy blocks raises, naming why.
- Replicas sharing a host pool (`replica_pool`): the first rank of the group fills the
  slots, gathering and reading from the lower tiers, and stamps each slot it read; a
  rank that follows gathers and reads nothing, waits for the stamp of each slot it
  loads from, and reports its share of every item, so the planner's accounting is that
  of any TP cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch

from lmcache_ext import ops
from lmcache_ext.config import CacheConfig
from lmcache_ext.executor import TransferExecutor
from lmcache_ext.geometry import Geometry
from lmcache_ext.integration.vllm.held_requests import HeldRequests
from lmcache_ext.integration.vllm.metadata import AsyncLoad, FetchItem, LoadItem, StepPlan, StoreItem, WorkerReport
from lmcache_ext.integration.vllm.worker_jobs import BackgroundJobs
from lmcache_ext.integration.vllm.worker_layers import StepLayers
from lmcache_ext.memory import HostSlotPool
from lmcache_ext.metrics import Payload, Recorder
from lmcache_ext.plans import Plan, PlanResult, TierTransfer
from lmcache_ext.tiers import Storage, build_storage

logger = logging.getLogger(__name__)

FOLLOW_WAIT_MS = 60_000  # a follower's wait for the first replica's read of a slot: past any tier's timeout


class PlanRunner:
    """The executor and the tiers of one rank, vLLM's KV views, and what its transfers
    report: per item id, the load errors, the requests whose background loads ended,
    the metrics."""

    def __init__(
        self,
        config: CacheConfig,
        geometry: Geometry,
        tp_rank: int,
        jobs: BackgroundJobs,
        held: HeldRequests,
        layers: StepLayers,
        engine: str = "",
    ) -> None:
        self._config = config
        self._engine = engine  # whose replicas share a host pool (`replica_pool.engine_name`)
        self._geometry = geometry
        self._rank = tp_rank
        self._jobs = jobs
        self._held = held
        self._layers = layers
        self._executor: TransferExecutor | None = None
        self.storage: Storage | None = None
        self._follows = False  # the first replica fills this rank's (shared) slots
        self._fills_shared = False  # this rank fills slots that its replicas read too
        self._lock = threading.Lock()
        self._report = WorkerReport()
        self._load_errors: set[int] = set()
        self._metrics = Recorder()
        self._token_share = 1 if tp_rank == 0 else 0  # tokens count once: rank 0's; bytes on every rank
        self._kv_caches: dict[str, torch.Tensor] = {}  # vLLM's views, re-read by restore()
        self._loaded: set[str] = set()  # requests whose background loads ended, not yet reported
        self._failed_loads: set[str] = set()  # a hybrid model's: its load errors, per request

    # -- vLLM's KV cache --

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take vLLM's per-layer views; build the slot pool and the disk tier (once: a
        later call only binds the new views, keeping every cached chunk)."""
        kv = self._paged(kv_caches)
        self._kv_caches = dict(kv_caches)
        groups = self._geometry.groups
        self._layers.bind(
            [n for g in groups for n in g.layer_names] if groups else kv_caches, self._config.use_layerwise
        )
        if self._executor is not None:
            self._executor.bind(kv)
            return
        cfg = self._config
        storage = build_storage(cfg, self._geometry, self._rank, self._engine)
        self.storage = storage
        self._follows = storage.follows
        self._fills_shared = storage.pool.is_shared and not storage.follows
        self._executor = TransferExecutor(
            kv, storage.pool, storage.tiers, read_threads=storage.read_threads, cuda_copy_path=cfg.cuda_copy_path
        )
        if cfg.cpu_copy_threads:
            ops.set_cpu_copy_options(threads=cfg.cpu_copy_threads)
        first = self._rank - self._rank % self._geometry.replicas
        logger.info(
            "lmcache_ext worker %d: %d host slots of %d bytes%s, lower tiers: %s",
            self._rank,
            storage.pool.num_slots,
            storage.pool.slot_bytes,
            f" (rank {first}'s, shared)" if storage.pool.is_shared else "",
            ", ".join(storage.tiers) or "none",
        )

    def unregister(self) -> None:
        """vLLM is about to release the KV cache's memory: wait for every transfer that
        touches it, then forget its addresses until `restore`."""
        if self._executor is None:
            return  # never registered: nothing to forget
        self._jobs.drain()
        self._executor.bind(None)
        logger.info("lmcache_ext worker %d: KV cache unregistered (sleep mode); cached chunks are kept", self._rank)

    def restore(self) -> None:
        """The KV cache's memory is back: bind the registered views again."""
        self._executor_checked().bind(self._paged(self._kv_caches))
        logger.info("lmcache_ext worker %d: KV cache restored", self._rank)

    def _paged(self, kv_caches: dict[str, torch.Tensor]) -> ops.PagedLayers | ops.PagedGroups:
        g = self._geometry
        if g.groups:
            return ops.PagedGroups.from_groups(kv_caches, g.groups)
        kv = ops.PagedLayers.from_tensors(kv_caches)
        if (kv.num_layers, kv.page_bytes) != (g.num_layers, g.page_bytes):
            raise ValueError(
                f"register_kv_caches got {kv.num_layers} layers of {kv.page_bytes}-byte pages; the KV cache "
                f"config says {g.num_layers} layers of {g.page_bytes}-byte pages"
            )
        _check_heads(kv, g)
        return kv

    # -- the step's hooks --

    def load(self, plan: StepPlan) -> None:
        """A cache reset's clearing of the lower tiers first; then the loads of host hits
        into the planned blocks; then the background loads and fetches start. Failures
        become load errors, so vLLM recomputes those blocks (invariant 3)."""
        if plan.clear_tiers and self.storage is not None:
            for name, tier in self.storage.tiers.items():
                logger.info(
                    "lmcache_ext worker %d: cache reset, %d %s records deleted in the background",
                    self._rank,
                    tier.clear(),
                    name,
                )
        with self._lock:
            self._load_errors.update(plan.failed_blocks)
        if plan.idle:
            self._jobs.idle_wait()
        if plan.loads and self._layers.enabled:
            self._start_layer_loads(plan.loads)
        elif plan.loads:
            self._run_loads(plan.loads)
        for job in plan.async_loads:
            self._jobs.load(self._load_in_background, job)
        if plan.fetches:
            self._jobs.load(self._fetch, plan.fetches)

    def save_layer(self, plan: StepPlan, layer_name: str) -> None:
        """Layerwise: the forward has written `layer_name`; gather its pages of this
        step's stores."""
        stores = _after_forward(plan)
        if self._layers.enabled and stores and not self._follows:
            self._layers.save_layer(self._executor_checked(), plan, stores, layer_name)

    def save(self, plan: StepPlan) -> None:
        """End the step's layerwise loads; gather the planned chunks into their slots
        and write them to the lower tiers: in the background with async_save (on CUDA
        the gathers are queued here, on the copy stream, and only the writes wait),
        else before this returns."""
        self._finish_layer_loads()
        started = self._layers.take_save(plan)
        stores = _after_forward(plan)
        if not stores:
            return
        self._held.gathering(stores)
        executor = self._executor_checked()
        items = tuple(i.copy for i in stores)
        if self._follows:  # the first replica gathers the same KV into the shared slots
            gather = _already((True,) * len(items))
        elif self._layers.enabled:
            gather = (started if started is not None else self._layers.new_save(executor, items)).finish
        else:

            def gather() -> tuple[bool, ...]:
                return self._run(Plan(gathers=items)).gathers

        if executor.device.type == "cuda":  # queued on the forward's thread, after its stream's work
            gather = _already(gather())
        if self._config.async_save:
            self._jobs.save(self._store, stores, gather)
        else:
            self._store(stores, gather)

    def handle_preemptions(self, plan: StepPlan) -> None:
        """vLLM may reuse the released requests' blocks from this step on (they were
        preempted, or finished with a store still reading them): gather their stores
        planned at the finish, then wait for every gather that still reads them. vLLM
        calls this first in each step, before it zeroes, copies or computes into a block, so
        the records the planner evicted are deleted here too, before any write of the step."""
        self._evict(plan)
        released = set(plan.released)
        stores = [item for item in plan.stores if item.req_id in released]
        if stores:
            self._held.gathering(stores)
            gathered = (
                (True,) * len(stores)
                if self._follows
                else self._run(Plan(gathers=tuple(i.copy for i in stores))).gathers
            )
            self._store(stores, _already(gathered))
        if self._geometry.hybrid:  # vLLM frees blocks of running requests too (those out of their windows)
            self._held.wait_all()
        elif released:
            self._held.wait_released(released)

    # -- transfers --

    def _evict(self, plan: StepPlan) -> None:
        """Delete the records the planner evicted to make room for its writes."""
        if self.storage is None:
            return
        for name, keys in plan.evictions.items():
            tier = self.storage.tiers[name]
            for key in keys:
                tier.remove(key)

    def _fetch(self, fetches: Sequence[FetchItem]) -> None:
        """Read remote records into host slots ahead of any promise (a follower: its first
        replica does); report each."""
        if self._follows:
            oks: Sequence[bool] = (True,) * len(fetches)
        else:
            oks = self._run(Plan(reads=tuple(f.read for f in fetches))).reads
        with self._lock:
            for fetch, ok in zip(fetches, oks):
                (self._report.loaded if ok else self._report.load_failed)[fetch.id] += 1
                if not ok:
                    self._metrics.failed(f"{fetch.read.tier}_read")

    def _run_loads(self, items: Sequence[LoadItem], wait: bool = False) -> bool:
        """Fill slots from the lower tiers, then copy them into the planned blocks;
        report each item, and make a failed one's blocks load errors. Whether all loaded.
        `wait`: the copies have ended before the report (a background load's blocks are
        read by a later step, and once every rank reported, the planner may hand the
        slots to a rank that shares them for its next read)."""
        with self._metrics.timer("load"):
            filled = self._fill(items)
            copies = tuple(i.copy for i, ok in zip(items, filled) if ok)
            scattered = iter(self._run(Plan(scatters=copies)).scatters)
            if wait:
                self._executor_checked().wait_slots([copy.slot for copy in copies])
        oks = [ok and next(scattered) for ok in filled]
        self._report_loads(items, oks)
        return all(oks)

    def _start_layer_loads(self, items: Sequence[LoadItem]) -> None:
        """Fill slots from the lower tiers, then start the per-layer scatters of the
        items whose slot is filled; the others are reported failed at once."""
        filled = self._fill(items)
        unread = [i for i, ok in zip(items, filled) if not ok]
        self._report_loads(unread, [False] * len(unread))
        loading = [i for i, ok in zip(items, filled) if ok]
        if loading:
            self._layers.start_loads(self._executor_checked(), loading)

    def _fill(self, items: Sequence[LoadItem]) -> list[bool]:
        """Read the slots of `items` that a lower tier fills; whether each slot holds its
        chunk (a host hit's does). In a shared pool the first replica reads and stamps
        each slot with its item (negated when the read failed); a follower waits for it."""
        reading = [i for i in items if i.read is not None]
        pool = self._storage_checked().pool
        if self._follows:
            read_ok = self._wait_filled(pool, reading)
        else:
            read_ok = [False] * len(reading)
            try:
                read_ok = list(self._run(Plan(reads=tuple(i.read for i in reading if i.read is not None))).reads)
            finally:  # a read that raised is a failure the followers see too, not a stamp they wait out
                if self._fills_shared:
                    for item, ok in zip(reading, read_ok):
                        pool.set_stamp(item.copy.slot, (item.id + 1) * (1 if ok else -1))
        ok_of = {i.id: ok for i, ok in zip(reading, read_ok)}
        return [ok_of.get(i.id, True) for i in items]

    def _wait_filled(self, pool: HostSlotPool, items: Sequence[LoadItem]) -> list[bool]:
        """Whether the first replica filled each item's slot, all within FOLLOW_WAIT_MS."""
        deadline = time.monotonic() + FOLLOW_WAIT_MS / 1000
        filled = []
        for item in items:
            stamp = item.id + 1
            left_ms = max(int((deadline - time.monotonic()) * 1000), 0)
            seen = pool.wait_stamp(item.copy.slot, stamp, left_ms)
            if seen not in (stamp, -stamp):
                logger.warning(
                    "lmcache_ext worker %d: the first replica did not fill slot %d in %d ms: a miss",
                    self._rank,
                    item.copy.slot,
                    FOLLOW_WAIT_MS,
                )
            filled.append(seen == stamp)
        return filled

    def _finish_layer_loads(self) -> None:
        """Every layer of the step's layerwise loads is in place: report them (a failed
        copy makes every one of them load errors, before vLLM asks for those)."""
        finished = self._layers.finish_loads()
        if finished is not None:
            items, ok = finished
            self._report_loads(items, [ok] * len(items))

    def _report_loads(self, items: Sequence[LoadItem], oks: Sequence[bool]) -> None:
        with self._lock:
            for item, ok in zip(items, oks):
                (self._report.loaded if ok else self._report.load_failed)[item.id] += 1
                tier = item.origin
                if ok:
                    self._metrics.loaded(tier, self._tokens(item.copy.block_ids), self._geometry.copy_bytes(item.copy))
                else:
                    self._metrics.failed(f"{tier}_read")
                    if not self._geometry.hybrid:  # vLLM maps block ids to requests with one group only
                        self._load_errors.update(item.copy.block_ids)

    def _load_in_background(self, job: AsyncLoad) -> None:
        """The request's loads; whatever happens, it is reported, with every block that
        did not load among the load errors first."""
        ok = False
        try:
            ok = self._run_loads(job.items, wait=True)
        except Exception:
            logger.exception("lmcache_ext worker %d: the loads of request %s failed", self._rank, job.req_id)
            with self._lock:
                for item in job.items:
                    self._report.load_failed[item.id] += 1
                    self._load_errors.update(item.copy.block_ids)
        finally:
            with self._lock:
                self._load_errors.update(job.failed_blocks)
                if self._geometry.hybrid and (not ok or job.failed_blocks):
                    self._failed_loads.add(job.req_id)
                self._loaded.add(job.req_id)

    def _store(self, items: Sequence[StoreItem], gather: Callable[[], tuple[bool, ...]]) -> None:
        """Gather (or collect the gathers queued already), report, then write each filled
        slot to its tiers. A failed gather reports its writes as done, so every rank
        reports each."""
        try:
            with self._metrics.timer("store"):
                gathered = gather()
                if self._fills_shared:  # the replicas read these slots once the report is in
                    self._executor_checked().wait_slots([item.copy.slot for item in items])
        except Exception:
            gathered = tuple(False for _ in items)
            logger.exception("lmcache_ext worker %d: %d gathers failed", self._rank, len(items))
        writes, item_of = [], {}
        with self._lock:
            for item, ok in zip(items, gathered):
                (self._report.stored if ok else self._report.store_failed)[item.id] += 1
                if not ok:
                    self._metrics.failed("store")
                    if item.writes:  # a zero count would name an item the scheduler has released
                        self._report.written[item.id] += len(item.writes)
                    continue
                self._metrics.stored("host", self._tokens(item.copy.block_ids), self._chunk_bytes(item))
                for tier in item.writes:
                    writes.append(TierTransfer(tier, item.key, item.copy.slot, self._chunk_bytes(item)))
                    item_of[(tier, item.key)] = item
        self._held.gathered(items)  # after the report: `handle_preemptions` returns with its stores reported
        start = time.perf_counter()
        self._run(
            Plan(writes=tuple(writes)),
            on_write_done=lambda w, ok: self._written(w, item_of[(w.tier, w.key)], ok, start),
        )

    def _written(self, write: TierTransfer, item: StoreItem, ok: bool, start: float) -> None:
        """A tier write ended; once every tier's has, the slot is free to evict (a failed
        write costs that tier's copy only)."""
        tier = write.tier
        self._metrics.observe("transfer_seconds", time.perf_counter() - start, f"{tier}_write")
        if ok:
            self._metrics.stored(tier, self._tokens(item.copy.block_ids), write.nbytes)
        else:
            self._metrics.failed(f"{tier}_write")
        with self._lock:
            self._report.written[item.id] += 1

    # -- what the connector collects --

    def take_loaded(self) -> set[str]:
        """The requests whose background loads ended since the last call."""
        with self._lock:
            loaded, self._loaded = self._loaded, set()
        return loaded

    def take_report(self) -> WorkerReport | None:
        with self._lock:
            report, self._report = self._report, WorkerReport()
        return None if report.is_empty() else report

    def take_metrics(self) -> Payload:
        """What this rank counted since the last call, with its tiers' usage and evictions."""
        if self.storage is not None:
            self.storage.record(self._metrics, part=str(self._rank))
        return self._metrics.take()

    def take_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return set() if self._geometry.hybrid else errors

    def take_failed_loads(self) -> set[str]:
        """Requests whose background loads failed since the last call (a hybrid model's)."""
        with self._lock:
            failed, self._failed_loads = self._failed_loads, set()
        return failed

    def close(self) -> None:
        """Release the tiers and the executor (once no transfer runs)."""
        if self.storage is not None:
            self.storage.close()
        if self._executor is not None:
            self._executor.close()

    def _run(self, plan: Plan, on_write_done: Callable[[TierTransfer, bool], None] | None = None) -> PlanResult:
        return self._executor_checked().run(plan, on_write_done)

    def _storage_checked(self) -> Storage:
        if self.storage is None:
            raise RuntimeError("register_kv_caches was not called before the first transfer")
        return self.storage

    def _executor_checked(self) -> TransferExecutor:
        if self._executor is None:
            raise RuntimeError("register_kv_caches was not called before the first transfer")
        return self._executor

    def _tokens(self, block_ids: Sequence[int]) -> int:
        """Tokens in `block_ids` as this rank counts them (`_token_share`)."""
        return len(block_ids) * self._geometry.block_size * self._token_share

    def _chunk_bytes(self, item: StoreItem) -> int:
        return item.nbytes or self._geometry.chunk_bytes(len(item.copy.block_ids))


def _check_heads(kv: ops.PagedLayers, g: Geometry) -> None:
    """Records kept per KV head split pages as the layout vLLM named says; raise if the
    views vLLM handed over are ordered otherwise (a record would mix heads)."""
    heads, runs = ops.head_order(kv)
    if g.heads > 1 and (heads, runs) != (g.heads, g.head_runs):
        raise ValueError(
            f"register_kv_caches got views {tuple(kv.tensors[0].shape)} with strides {kv.tensors[0].stride()}: "
            f"{heads} KV heads in {runs} runs per page; the KV cache layout says {g.heads} heads in {g.head_runs} runs"
        )


def _after_forward(plan: StepPlan) -> list[StoreItem]:
    """The plan's stores gathered after the forward: all but those of released requests,
    which `handle_preemptions` gathered before it."""
    released = set(plan.released)
    return [item for item in plan.stores if item.req_id not in released]


def _already(gathered: tuple[bool, ...]) -> Callable[[], tuple[bool, ...]]:
    """The outcome of gathers queued already, as the callable `_store` takes."""
    return lambda: gathered
