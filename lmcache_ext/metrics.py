"""Prometheus metrics (names under ``lmcache_ext:``) and a per-engine ``stats()`` dict.

The Prometheus collectors are process-wide (a registry refuses a name twice), so
every engine in a process adds to the same series; ``EngineStats`` keeps each
engine's own numbers for tests and logs.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram

TIERS = ("host", "disk")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

LOOKUP_TOKENS = Counter("lmcache_ext:lookup_tokens", "Tokens asked about by lookups")
HIT_TOKENS = Counter("lmcache_ext:hit_tokens", "Tokens found by lookups, by the tier that held them", ["tier"])
STORED_TOKENS = Counter("lmcache_ext:stored_tokens", "Tokens written into a tier", ["tier"])
STORED_BYTES = Counter("lmcache_ext:stored_bytes", "Bytes written into a tier", ["tier"])
LOADED_TOKENS = Counter("lmcache_ext:loaded_tokens", "Tokens loaded into the paged cache, by source tier", ["tier"])
LOADED_BYTES = Counter("lmcache_ext:loaded_bytes", "Bytes loaded into the paged cache, by source tier", ["tier"])
EVICTIONS = Counter("lmcache_ext:evictions", "Chunks evicted from a tier", ["tier"])
FAILURES = Counter("lmcache_ext:failures", "Failed operations by kind", ["kind"])
USAGE_BYTES = Gauge("lmcache_ext:usage_bytes", "Bytes held in a tier", ["tier"])
STORE_SECONDS = Histogram("lmcache_ext:store_seconds", "Latency of store()", buckets=_LATENCY_BUCKETS)
RETRIEVE_SECONDS = Histogram("lmcache_ext:retrieve_seconds", "Latency of retrieve()", buckets=_LATENCY_BUCKETS)


class EngineStats:
    """One engine's counters, mirrored into the process-wide Prometheus series."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Tally[str] = Tally()

    def _add(self, name: str, amount: int) -> None:
        with self._lock:
            self._counts[name] += amount

    def lookup(self, asked: int, hits_by_tier: dict[str, int]) -> None:
        LOOKUP_TOKENS.inc(asked)
        self._add("lookup_tokens", asked)
        for tier, tokens in hits_by_tier.items():
            HIT_TOKENS.labels(tier).inc(tokens)
            self._add(f"hit_tokens_{tier}", tokens)

    def stored(self, tier: str, tokens: int, nbytes: int) -> None:
        STORED_TOKENS.labels(tier).inc(tokens)
        STORED_BYTES.labels(tier).inc(nbytes)
        self._add(f"stored_tokens_{tier}", tokens)
        self._add(f"stored_bytes_{tier}", nbytes)

    def loaded(self, tier: str, tokens: int, nbytes: int) -> None:
        LOADED_TOKENS.labels(tier).inc(tokens)
        LOADED_BYTES.labels(tier).inc(nbytes)
        self._add(f"loaded_tokens_{tier}", tokens)
        self._add(f"loaded_bytes_{tier}", nbytes)

    def evicted(self, tier: str, chunks: int = 1) -> None:
        EVICTIONS.labels(tier).inc(chunks)
        self._add(f"evictions_{tier}", chunks)

    def failed(self, kind: str) -> None:
        FAILURES.labels(kind).inc()
        self._add(f"failures_{kind}", 1)

    def usage(self, tier: str, nbytes: int) -> None:
        USAGE_BYTES.labels(tier).set(nbytes)
        with self._lock:
            self._counts[f"usage_bytes_{tier}"] = nbytes

    def snapshot(self) -> dict[str, int]:
        """All counters so far; names absent from the dict are zero."""
        with self._lock:
            return dict(self._counts)
