"""What travels between the connector's halves each step: the planner's `StepPlan` and
`WorkerReport` (lmcache_ext.plans), as vLLM's connector metadata and connector worker
metadata. Every planned item has an id, unique in the scheduler's lifetime; vLLM sums
the ranks' reports with `aggregate`, so the scheduler acts on an item only once every
rank has reported it (invariant 8). Items outlive steps: an asynchronous load or save
is reported in whichever later step it ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from lmcache_ext import plans
from lmcache_ext.plans import AsyncLoad, FetchItem, LoadItem, StoreItem


@dataclass
class StepPlan(plans.StepPlan, KVConnectorMetadata):
    """One step's plan, as vLLM's connector metadata."""


@dataclass
class WorkerReport(plans.WorkerReport, KVConnectorWorkerMetadata):
    """What one rank (or, aggregated, every rank) reports, as vLLM's worker metadata."""


__all__ = ["AsyncLoad", "FetchItem", "LoadItem", "StepPlan", "StoreItem", "WorkerReport"]
