"""Connector stats in vLLM's `KVConnectorStats` form, so vLLM's logger prints our
transfer counts ("KV Transfer metrics: ...") next to its own."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats


@dataclass
class LMCacheConnectorStats(KVConnectorStats):
    """Counts since the last report: tokens loaded / stored, failed loads, disk writes."""

    def reset(self) -> None:
        self.data: dict[str, int] = {}

    def aggregate(self, other: KVConnectorStats) -> LMCacheConnectorStats:
        self.data = dict(Counter(self.data) + Counter(other.data))
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())
