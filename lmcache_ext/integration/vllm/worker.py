"""The connector's worker half: a data mover. It runs each step's plan on its own
TP shard — loads before the forward, stores after it, disk and remote writes in
the background — and reports per key what happened.

Sleep mode (vLLM 0.33): `unregister` lets a copy in progress end and then forgets
the paged cache's addresses, so nothing touches memory vLLM is releasing; until
`restore` re-reads them from the views registered at start-up, a step that would
copy blocks raises, naming why. Every copy runs inside its hook, so no transfer
that touches the KV cache outlives one: disk writes read host slots only.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter
from pathlib import Path

import torch

from lmcache_ext import ops
from lmcache_ext.config import CacheConfig
from lmcache_ext.executor import TransferExecutor
from lmcache_ext.integration.vllm.metadata import StepPlan, WorkerReport
from lmcache_ext.integration.vllm.shards import Geometry, rank_key, rank_root
from lmcache_ext.plans import Plan, PlanResult, Source, TierTransfer
from lmcache_ext.tiers import Storage, build_storage

logger = logging.getLogger(__name__)


class WorkerSide:
    def __init__(self, config: CacheConfig, geometry: Geometry, tp_rank: int) -> None:
        self._config = config
        self._geometry = geometry
        self._rank = tp_rank
        self._executor: TransferExecutor | None = None
        self._storage: Storage | None = None
        self._lock = threading.Lock()
        self._report = WorkerReport()
        self._load_errors: set[int] = set()
        self._counts: Counter[str] = Counter()
        self._bad_slots: set[int] = set()  # slots whose last fill was a failed disk read
        self._kv_caches: dict[str, torch.Tensor] = {}  # vLLM's views, re-read by restore()

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take vLLM's per-layer views; build the slot pool and the disk tier (once: a
        later call only binds the new views, keeping every cached chunk)."""
        kv = self._paged(kv_caches)
        self._kv_caches = dict(kv_caches)
        if self._executor is not None:
            self._executor.bind(kv)
            return
        g, cfg = self._geometry, self._config
        storage = build_storage(
            cfg, kv.chunk_bytes(g.blocks_per_chunk), namespace=g.namespace.fingerprint, rank=self._rank,
            disk_root=rank_root(Path(cfg.local_disk), self._rank) if cfg.local_disk else None,
            disk_bytes=cfg.disk_bytes // g.tp_size,
        )
        self._storage = storage
        self._executor = TransferExecutor(kv, storage.pool, storage.tiers,
                                          read_threads=max(cfg.disk_io_threads, cfg.remote_connections))
        if cfg.cpu_copy_threads:
            ops.set_cpu_copy_options(threads=cfg.cpu_copy_threads)
        logger.info("lmcache_ext worker %d: %d host slots of %d bytes, lower tiers: %s", self._rank,
                    storage.pool.num_slots, storage.pool.slot_bytes,
                    ", ".join(t.value for t in storage.tiers) or "none")

    def unregister(self) -> None:
        """vLLM is about to release the KV cache's memory: wait for a copy in progress,
        then forget its addresses until `restore`."""
        if self._executor is None:
            return  # never registered: nothing to forget
        self._executor.bind(None)
        logger.info("lmcache_ext worker %d: KV cache unregistered (sleep mode); cached chunks are kept", self._rank)

    def restore(self) -> None:
        """The KV cache's memory is back: bind the registered views again."""
        self._executor_checked().bind(self._paged(self._kv_caches))
        logger.info("lmcache_ext worker %d: KV cache restored", self._rank)

    def _paged(self, kv_caches: dict[str, torch.Tensor]) -> ops.PagedLayers:
        g = self._geometry
        kv = ops.PagedLayers.from_tensors(kv_caches)
        if (kv.num_layers, kv.page_bytes) != (g.num_layers, g.page_bytes):
            raise ValueError(
                f"register_kv_caches got {kv.num_layers} layers of {kv.page_bytes}-byte pages; the KV cache "
                f"config says {g.num_layers} layers of {g.page_bytes}-byte pages"
            )
        return kv

    def load(self, plan: StepPlan) -> None:
        """A cache reset's disk deletion first, then disk reads into slots, then slots
        into the planned blocks; failures become load errors, so vLLM recomputes those
        blocks."""
        if plan.clear_tiers and self._storage is not None:
            for source, tier in self._storage.tiers.items():
                logger.info("lmcache_ext worker %d: cache reset, %d %s records deleted in the background",
                            self._rank, tier.clear(), source.value)
        with self._lock:
            self._load_errors.update(plan.failed_blocks)
        if not plan.loads:
            return
        # A slot whose read failed in an earlier step holds no chunk; a load planned on
        # it before the scheduler heard of the failure (async scheduling) fails here.
        stale = self._bad_slots - {r.slot for r in plan.reads}
        runnable = [k for k in plan.loads if k.copy.slot not in stale]
        result = self._run(Plan(reads=tuple(self._on_rank(plan.reads)), scatters=tuple(k.copy for k in runnable)))
        for read, ok in zip(plan.reads, result.reads):
            (self._bad_slots.discard if ok else self._bad_slots.add)(read.slot)
        done = {id(k): ok for k, ok in zip(runnable, result.scatters)}
        bs = self._geometry.block_size
        with self._lock:
            for keyed in plan.loads:
                ok = done.get(id(keyed), False)
                (self._report.loaded if ok else self._report.load_failed)[keyed.key] += 1
                self._counts["loaded_tokens" if ok else "failed_load_tokens"] += len(keyed.copy.block_ids) * bs
                if not ok:
                    self._load_errors.update(keyed.copy.block_ids)

    def save(self, plan: StepPlan) -> None:
        """Gather the planned chunks into their slots (done before this returns, so the
        blocks are free again), then start their disk writes."""
        if not plan.stores:
            return
        result = self._run(Plan(gathers=tuple(k.copy for k in plan.stores)))
        bs = self._geometry.block_size
        filled = set()
        with self._lock:
            for keyed, ok in zip(plan.stores, result.gathers):
                if ok:
                    self._bad_slots.discard(keyed.copy.slot)
                (self._report.stored if ok else self._report.store_failed)[keyed.key] += 1
                self._counts["stored_tokens" if ok else "failed_store_tokens"] += len(keyed.copy.block_ids) * bs
                if ok:
                    filled.add(keyed.key)
        base_key = {self._shard(w).key: w.key for w in plan.writes if w.key in filled}
        shards = tuple(self._on_rank([w for w in plan.writes if w.key in filled]))
        self._executor_checked().run(Plan(writes=shards),
                                     on_write_done=lambda w, ok: self._written(w.tier, base_key[w.key], ok))

    def take_report(self) -> WorkerReport | None:
        with self._lock:
            report, self._report = self._report, WorkerReport()
        return None if report.is_empty() else report

    def take_counts(self) -> dict[str, int]:
        """Transfer counts since the last call."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        return dict(counts)

    def take_load_errors(self) -> set[int]:
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def flush(self) -> None:
        """Wait until every tier write submitted so far has ended."""
        if self._storage is not None:
            self._storage.flush()

    def close(self) -> None:
        if self._storage is not None:
            self._storage.close()
        if self._executor is not None:
            self._executor.close()

    def _written(self, tier: Source, key: bytes, ok: bool) -> None:
        """A tier write ended; once every tier's has, the slot is free to evict (a failed
        write costs that tier's copy only)."""
        with self._lock:
            self._report.written[key] += 1
            self._counts[f"{tier.value}_writes" if ok else f"failed_{tier.value}_writes"] += 1

    def _run(self, plan: Plan) -> PlanResult:
        return self._executor_checked().run(plan)

    def _executor_checked(self) -> TransferExecutor:
        if self._executor is None:
            raise RuntimeError("register_kv_caches was not called before the first transfer")
        return self._executor

    def _shard(self, t: TierTransfer) -> TierTransfer:
        return dataclasses.replace(t, key=rank_key(t.key, self._rank, self._geometry))

    def _on_rank(self, transfers: list[TierTransfer]) -> list[TierTransfer]:
        return [self._shard(t) for t in transfers]

