"""The connector's worker half: a data mover. It runs each step's plan on its own TP
shard and reports per item id what happened.

`WorkerSide` is what the connector calls; the work is done by four parts, one job each:

- `worker_plans.PlanRunner`: the executor and the tiers, vLLM's KV views (register,
  sleep mode's unregister and restore), the loads before the forward and the stores
  after it, and what they report;
- `worker_jobs.BackgroundJobs`: the loader and saver threads, the jobs running on them,
  an idle step's wait for them;
- `held_requests.HeldRequests`: the gathers still reading each request's blocks, which
  `handle_preemptions` waits for before vLLM reuses a released request's blocks;
- `worker_layers.StepLayers`: the step's layerwise loads and saves (`use_layerwise`).
"""

from __future__ import annotations

import torch

from lmcache_ext.config import CacheConfig
from lmcache_ext.geometry import Geometry
from lmcache_ext.integration.vllm.held_requests import HeldRequests
from lmcache_ext.integration.vllm.metadata import StepPlan, WorkerReport
from lmcache_ext.integration.vllm.worker_jobs import BackgroundJobs
from lmcache_ext.integration.vllm.worker_layers import StepLayers
from lmcache_ext.integration.vllm.worker_plans import PlanRunner
from lmcache_ext.metrics import Payload


class WorkerSide:
    """The worker half's hooks, each handed to the part that does its job."""

    def __init__(self, config: CacheConfig, geometry: Geometry, tp_rank: int, engine: str = "") -> None:
        """`engine`: the name under which this engine's replicas share a host pool
        (`replica_pool.engine_name`; "" keeps the rank's own)."""
        self._jobs = BackgroundJobs(tp_rank)
        self._layers = StepLayers(self._jobs)
        self._plans = PlanRunner(config, geometry, tp_rank, self._jobs, HeldRequests(), self._layers, engine)

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take vLLM's per-layer views (`PlanRunner.register`)."""
        self._plans.register(kv_caches)

    def unregister(self) -> None:
        """Sleep mode: wait for every transfer that touches the KV cache, then forget it."""
        self._plans.unregister()

    def restore(self) -> None:
        """The KV cache's memory is back: bind the registered views again."""
        self._plans.restore()

    def load(self, plan: StepPlan) -> None:
        """Before the forward: the step's loads (`PlanRunner.load`)."""
        self._plans.load(plan)

    def wait_layer(self, layer_name: str) -> None:
        """Layerwise: return once this step's loads have put `layer_name` in place."""
        self._layers.wait(layer_name)

    def save_layer(self, plan: StepPlan, layer_name: str) -> None:
        """Layerwise: the forward has written `layer_name`; gather its pages of this
        step's stores."""
        self._plans.save_layer(plan, layer_name)

    def save(self, plan: StepPlan) -> None:
        """After the forward: the step's stores (`PlanRunner.save`)."""
        self._plans.save(plan)

    def handle_preemptions(self, plan: StepPlan) -> None:
        """First in each step: end the gathers that read the released requests' blocks."""
        self._plans.handle_preemptions(plan)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(None: vLLM never keeps a request's blocks for our stores; requests whose
        background loads ended, each reported exactly once)."""
        return None, self._plans.take_loaded() or None

    def drain(self) -> None:
        """Wait until every background load and gather has ended (tier writes go on)."""
        self._jobs.drain()

    def take_report(self) -> WorkerReport | None:
        return self._plans.take_report()

    def take_metrics(self) -> Payload:
        """What this rank counted since the last call, with its tiers' usage and evictions."""
        return self._plans.take_metrics()

    def take_load_errors(self) -> set[int]:
        return self._plans.take_load_errors()

    def take_failed_loads(self) -> set[str]:
        """Requests whose background loads failed (a hybrid model's load errors)."""
        return self._plans.take_failed_loads()

    def flush(self) -> None:
        """Wait until every background transfer and tier write submitted so far has ended."""
        self._jobs.drain()
        if self._plans.storage is not None:
            self._plans.storage.flush()

    def close(self) -> None:
        """Let pending loads and stores end (nothing half-written becomes visible), then
        release the tiers and the executor."""
        self._jobs.close()
        self._layers.close()
        self._plans.close()
