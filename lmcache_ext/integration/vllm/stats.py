"""The connector's metrics in vLLM's two forms: `LMCacheConnectorStats` carries each
step's counts (a `lmcache_ext.metrics` payload) from the workers and the scheduler to
vLLM's front end, where vLLM's logger prints them ("KV Transfer metrics: ...") and
`LMCachePromMetrics` adds them to the ``lmcache_ext:`` series on vLLM's ``/metrics``.

The payload is plain dicts of str keys, so it survives vLLM's serialization between
processes. Tokens are counted by TP rank 0 and the scheduler only, bytes by every rank
(each moves its own shard), so summing over ranks counts a token once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from lmcache_ext.metrics import PromSink, empty_payload, flatten, is_empty, merge


@dataclass
class LMCacheConnectorStats(KVConnectorStats):
    """Counts since the last report, as a `lmcache_ext.metrics` payload."""

    data: dict[str, Any] = field(default_factory=empty_payload)

    def __post_init__(self) -> None:
        self.data = merge(empty_payload(), self.data)  # a copy, checked

    def reset(self) -> None:
        self.data = empty_payload()

    def aggregate(self, other: KVConnectorStats) -> LMCacheConnectorStats:
        merge(self.data, other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        return flatten(self.data)

    def is_empty(self) -> bool:
        return is_empty(self.data)


class LMCachePromMetrics(KVConnectorPromMetrics):
    """The ``lmcache_ext:`` series, made with the metric classes vLLM hands over (its
    multi-process aware ones, or Ray's), under vLLM's per-engine labels."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._sink = PromSink(self._counter_cls, self._gauge_cls, self._histogram_cls, labelnames)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        self._sink.observe(transfer_stats_data, self.per_engine_labelvalues[engine_idx])
