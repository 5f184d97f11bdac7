"""The metrics of lmcache_ext, defined once (`METRICS`) for `CacheEngine` and the vLLM
connector alike: series named ``lmcache_ext:<name>``, each with at most one label of
its own (``tier``, ``kind`` or ``op``).

Counting and exporting are apart. A `Recorder` counts into a `Payload`, a plain
dict of str keys (vLLM ships the connector's between processes with msgpack):

    {"counters":   {name: {label: amount}},
     "gauges":     {name: {label: {part: value}}},
     "histograms": {name: {label: [seconds, ...]}}}

An unlabelled series uses the label "". A gauge's parts are summed when exported: each
TP rank reports its own disk usage as part ``str(rank)``, and a part keeps its latest
value. `merge` adds one payload to another (vLLM merges the workers' with the
scheduler's, step after step). A `PromSink` makes the Prometheus series of every
definition with the metric classes it is given and adds payloads to them: the
connector's sink uses vLLM's classes and labels (so it is on vLLM's ``/metrics``,
multi-process aware), the engine's uses prometheus_client's in the default registry.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

PREFIX = "lmcache_ext:"
TIERS = ("host", "disk", "remote")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Payload = dict[str, dict[str, Any]]


class Kind(str, enum.Enum):
    COUNTER = "counters"
    GAUGE = "gauges"
    HISTOGRAM = "histograms"


@dataclass(frozen=True)
class Metric:
    """One series: `name` without the prefix, its kind, its help text, its own label."""

    name: str
    kind: Kind
    doc: str
    label: str = ""

    @property
    def full_name(self) -> str:
        return PREFIX + self.name


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("lookup_tokens", Kind.COUNTER, "Prompt tokens looked up, past what vLLM's own prefix cache held"),
        Metric("hit_tokens", Kind.COUNTER, "Looked-up tokens found, by the tier that held them", "tier"),
        Metric("miss_tokens", Kind.COUNTER, "Looked-up tokens found in no tier"),
        Metric("stored_tokens", Kind.COUNTER, "Tokens written into a tier", "tier"),
        Metric("stored_bytes", Kind.COUNTER, "Bytes written into a tier (every TP rank's shard)", "tier"),
        Metric(
            "loaded_tokens", Kind.COUNTER, "Tokens loaded into the paged KV cache, by the tier they came from", "tier"
        ),
        Metric("loaded_bytes", Kind.COUNTER, "Bytes loaded into the paged KV cache (every TP rank's shard)", "tier"),
        Metric("failures", Kind.COUNTER, "Failed operations, by kind (each costs hits, never a wrong token)", "kind"),
        Metric("evictions", Kind.COUNTER, "Chunks evicted from a tier", "tier"),
        Metric("usage_bytes", Kind.GAUGE, "Bytes held in a tier (all TP ranks)", "tier"),
        Metric("capacity_bytes", Kind.GAUGE, "Bytes a tier may hold (all TP ranks)", "tier"),
        Metric(
            "lookup_wait_seconds",
            Kind.HISTOGRAM,
            "How long a request's lookup answered 'not yet': a remote probe or fetch, or a prefill instance's chunks in flight",
        ),
        Metric(
            "transfer_seconds",
            Kind.HISTOGRAM,
            "Latency of transfers: store (paged cache to host), load (to the paged cache), <tier>_write",
            "op",
        ),
    )
}


def empty_payload() -> Payload:
    return {kind.value: {} for kind in Kind}


def merge(into: Payload, other: Mapping[str, Any]) -> Payload:
    """Add `other` to `into` (and return it): counters add up, a gauge part keeps the
    latest value, histogram observations join. Raises ValueError, naming it, on a
    name that is not one of `METRICS` or is filed under the wrong kind."""
    for kind_name, series in other.items():
        kind = _kind(kind_name)
        mine = into.setdefault(kind.value, {})
        for name, by_label in series.items():
            _metric(name, kind)
            target = mine.setdefault(name, {})
            for label, value in by_label.items():
                if kind is Kind.COUNTER:
                    target[label] = target.get(label, 0) + value
                elif kind is Kind.GAUGE:
                    target.setdefault(label, {}).update(value)
                else:
                    target.setdefault(label, []).extend(value)
    return into


def flatten(payload: Mapping[str, Any]) -> dict[str, int | float]:
    """One number per series and label, named ``<name>`` or ``<name>_<label>``: counters
    as counted, gauges summed over their parts, histograms as their count and total
    seconds (``<name>_<label>_count`` / ``_sum``). What logs and ``stats()`` show."""
    out: dict[str, int | float] = {}
    for kind_name, series in payload.items():
        kind = _kind(kind_name)
        for name, by_label in series.items():
            for label, value in by_label.items():
                flat = f"{name}_{label}" if label else name
                if kind is Kind.COUNTER:
                    out[flat] = value
                elif kind is Kind.GAUGE:
                    out[flat] = sum(value.values())
                else:
                    out[f"{flat}_count"] = len(value)
                    out[f"{flat}_sum"] = sum(value)
    return out


def is_empty(payload: Mapping[str, Any]) -> bool:
    return not any(payload.get(kind.value) for kind in Kind)


class Recorder:
    """Counts into a payload until `take`; thread-safe (transfer threads count too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._payload = empty_payload()

    def count(self, name: str, amount: int, label: str = "") -> None:
        if amount:
            self._add({Kind.COUNTER.value: {name: {label: amount}}})

    def gauge(self, name: str, value: int, label: str = "", part: str = "") -> None:
        self._add({Kind.GAUGE.value: {name: {label: {part: value}}}})

    def observe(self, name: str, seconds: float, label: str = "") -> None:
        self._add({Kind.HISTOGRAM.value: {name: {label: [seconds]}}})

    def _add(self, piece: Payload) -> None:
        with self._lock:
            merge(self._payload, piece)

    def lookup(self, asked: int, hits_by_tier: Mapping[str, int]) -> None:
        """A lookup of `asked` tokens found `hits_by_tier`; the rest are misses."""
        self.count("lookup_tokens", asked)
        for tier, tokens in hits_by_tier.items():
            self.count("hit_tokens", tokens, tier)
        self.count("miss_tokens", asked - sum(hits_by_tier.values()))

    def stored(self, tier: str, tokens: int, nbytes: int) -> None:
        self.count("stored_tokens", tokens, tier)
        self.count("stored_bytes", nbytes, tier)

    def loaded(self, tier: str, tokens: int, nbytes: int) -> None:
        self.count("loaded_tokens", tokens, tier)
        self.count("loaded_bytes", nbytes, tier)

    def evicted(self, tier: str, chunks: int = 1) -> None:
        self.count("evictions", chunks, tier)

    def failed(self, kind: str, times: int = 1) -> None:
        self.count("failures", times, kind)

    def usage(self, tier: str, nbytes: int, capacity: int | None = None, part: str = "") -> None:
        self.gauge("usage_bytes", nbytes, tier, part)
        if capacity is not None:
            self.gauge("capacity_bytes", capacity, tier, part)

    @contextmanager
    def timer(self, op: str) -> Iterator[None]:
        """Observe how long the block takes as a `transfer_seconds` of `op`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe("transfer_seconds", time.perf_counter() - start, op)

    def take(self) -> Payload:
        """Everything counted since the last call."""
        with self._lock:
            payload, self._payload = self._payload, empty_payload()
        return payload


class PromSink:
    """The Prometheus series of every metric in `METRICS`, made with the given metric
    classes and the caller's own labels first (vLLM's ``model_name`` and ``engine``).

    A registry refuses a name twice, so making a sink with prometheus_client's own
    classes first drops any earlier sink's series from the default registry (a
    process exports one sink's series: the last one made; vLLM makes its loggers anew,
    for instance, when an engine restarts in the same process)."""

    def __init__(
        self, counter: type = Counter, gauge: type = Gauge, histogram: type = Histogram, labelnames: Sequence[str] = ()
    ) -> None:
        if (counter, gauge, histogram) == (Counter, Gauge, Histogram):
            _unregister_ours()
        self._lock = threading.Lock()
        self._series: dict[str, Any] = {}
        self._parts: dict[tuple[Any, ...], dict[str, int]] = {}
        for m in METRICS.values():
            labels = [*labelnames, *([m.label] if m.label else [])]
            if m.kind is Kind.COUNTER:
                self._series[m.name] = counter(name=m.full_name, documentation=m.doc, labelnames=labels)
            elif m.kind is Kind.GAUGE:
                self._series[m.name] = gauge(
                    name=m.full_name, documentation=m.doc, labelnames=labels, multiprocess_mode="mostrecent"
                )
            else:
                self._series[m.name] = histogram(
                    name=m.full_name, documentation=m.doc, labelnames=labels, buckets=LATENCY_BUCKETS
                )

    def observe(self, payload: Mapping[str, Any], labelvalues: Sequence[Any] = ()) -> None:
        """Add a payload to the series, under `labelvalues` for the sink's own labels."""
        merge(empty_payload(), payload)  # checks every name before any series changes
        with self._lock:
            for kind_name, series in payload.items():
                kind = Kind(kind_name)
                for name, by_label in series.items():
                    for label, value in by_label.items():
                        self._add(kind, name, [*labelvalues, *([label] if METRICS[name].label else [])], value)

    def _add(self, kind: Kind, name: str, labelvalues: list[Any], value: Any) -> None:
        series = self._series[name]
        child = series.labels(*labelvalues) if labelvalues else series
        if kind is Kind.COUNTER:
            child.inc(value)
        elif kind is Kind.GAUGE:
            parts = self._parts.setdefault((name, *labelvalues), {})
            parts.update(value)
            child.set(sum(parts.values()))
        else:
            for seconds in value:
                child.observe(seconds)


def _kind(name: str) -> Kind:
    try:
        return Kind(name)
    except ValueError:
        raise ValueError(f"metrics payload section {name!r}: expected one of {[k.value for k in Kind]}") from None


def _metric(name: str, kind: Kind) -> Metric:
    metric = METRICS.get(name)
    if metric is None or metric.kind is not kind:
        raise ValueError(
            f"metric {name!r} under {kind.value!r}: expected one of "
            f"{sorted(n for n, m in METRICS.items() if m.kind is kind)}"
        )
    return metric


def _unregister_ours() -> None:
    for collector in list(REGISTRY._collector_to_names):  # prometheus_client has no public listing
        if getattr(collector, "_name", "").startswith(PREFIX):
            REGISTRY.unregister(collector)


_engine_sink: PromSink | None = None
_engine_sink_lock = threading.Lock()


def engine_sink() -> PromSink:
    """The process's sink for `CacheEngine`s, made at first use (every engine in a
    process adds to the same series)."""
    global _engine_sink
    with _engine_sink_lock:
        if _engine_sink is None:
            _engine_sink = PromSink()
        return _engine_sink


class EngineStats(Recorder):
    """One `CacheEngine`'s counts: kept for its ``stats()``, and added to the process's
    Prometheus series (`engine_sink`) as they come."""

    def _add(self, piece: Payload) -> None:
        super()._add(piece)
        engine_sink().observe(piece)

    def snapshot(self) -> dict[str, int | float]:
        """Every series so far, flattened (`flatten`); names absent are zero."""
        with self._lock:
            return flatten(self._payload)
