"""Both halves of the connector for a model with no KV cache (no KV cache groups: an
encoder-only or attention-free model). vLLM still calls every hook; each does nothing."""

from __future__ import annotations

from typing import Any

from lmcache_ext.integration.vllm.metadata import StepPlan, WorkerReport
from lmcache_ext.metrics import Payload, empty_payload
from lmcache_ext.plans import TierName


class IdleSide:
    """Nothing cached, nothing planned, nothing moved; a reset has nothing to drop."""

    # -- scheduler half --

    def on_new_request(self, request: Any) -> None:
        return None

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[TierName, int]:
        return {}

    def plan_load(self, request: Any, tables: Any, num_external_tokens: int) -> None:
        return None

    def build_plan(self, scheduler_output: Any) -> StepPlan:
        return StepPlan()

    def apply_report(self, report: WorkerReport | None) -> None:
        return None

    def finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        return False, None

    def has_pending_work(self) -> bool:
        return False

    def reset(self) -> bool:
        return True

    # -- worker half --

    def register(self, kv_caches: dict[str, Any]) -> None:
        return None

    def unregister(self) -> None:
        return None

    def restore(self) -> None:
        return None

    def load(self, plan: StepPlan) -> None:
        return None

    def handle_preemptions(self, plan: StepPlan) -> None:
        return None

    def wait_layer(self, layer_name: str) -> None:
        return None

    def save_layer(self, plan: StepPlan, layer_name: str) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[None, None]:
        return None, None

    def save(self, plan: StepPlan) -> None:
        return None

    def take_report(self) -> WorkerReport | None:
        return None

    def take_metrics(self) -> Payload:
        return empty_payload()

    def take_failed_loads(self) -> set[str]:
        return set()

    def take_load_errors(self) -> set[int]:
        return set()

    def close(self) -> None:
        return None
