"""The metrics without an engine: payloads merge as Prometheus needs (counters add, a
gauge's parts sum, histograms join), survive vLLM's serialization, reach a registry
under vLLM's labels, and the connector's halves count tokens once across TP ranks."""

from __future__ import annotations

import functools
import importlib.util

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lmcache_ext.metrics import METRICS, PromSink, Recorder, empty_payload, flatten, merge
from lmcache_ext.plans import Source


def test_counters_add_gauge_parts_sum_and_keep_their_latest_value_histograms_join():
    a, b = Recorder(), Recorder()
    a.lookup(300, {"host": 128, "disk": 64})
    a.usage("disk", 1000, 4000, part="0")
    a.observe("transfer_seconds", 0.5, "load")
    b.lookup(100, {"disk": 64})
    b.usage("disk", 700, 4000, part="1")
    b.usage("disk", 900, 4000, part="0")  # rank 0 again, later: replaces its 1000
    b.observe("transfer_seconds", 0.25, "load")
    flat = flatten(merge(a.take(), b.take()))
    assert flat == {
        "lookup_tokens": 400,
        "hit_tokens_host": 128,
        "hit_tokens_disk": 128,
        "miss_tokens": 144,
        "usage_bytes_disk": 1600,
        "capacity_bytes_disk": 8000,
        "transfer_seconds_load_count": 2,
        "transfer_seconds_load_sum": 0.75,
    }
    assert flatten(a.take()) == {}  # take() empties the recorder


def test_a_payload_naming_an_unknown_metric_or_section_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"metric 'hits' under 'counters': expected one of \[.*'hit_tokens'"):
        merge(empty_payload(), {"counters": {"hits": {"": 1}}})
    with pytest.raises(ValueError, match=r"metric 'usage_bytes' under 'counters'"):
        merge(empty_payload(), {"counters": {"usage_bytes": {"host": 1}}})
    with pytest.raises(ValueError, match=r"payload section 'totals': expected one of \['counters'"):
        merge(empty_payload(), {"totals": {}})


def _registry_classes() -> tuple[CollectorRegistry, type, type, type]:
    registry = CollectorRegistry()
    return (registry, *(functools.partial(cls, registry=registry) for cls in (Counter, Gauge, Histogram)))


def test_a_sink_adds_payloads_to_series_under_the_callers_labels():
    registry, counter, gauge, histogram = _registry_classes()
    sink = PromSink(counter, gauge, histogram, labelnames=["model_name", "engine"])
    rec = Recorder()
    rec.loaded("disk", 256, 4096)
    rec.failed("disk_read")
    rec.usage("disk", 500, part="0")
    rec.usage("disk", 300, part="1")
    rec.observe("transfer_seconds", 0.003, "load")
    sink.observe(rec.take(), ["tiny", "0"])
    rec.loaded("disk", 256, 4096)
    rec.usage("disk", 100, part="1")  # only rank 1 reports this time: rank 0's 500 still counts
    sink.observe(rec.take(), ["tiny", "0"])
    value = registry.get_sample_value
    labels = {"model_name": "tiny", "engine": "0"}
    assert value("lmcache_ext:loaded_tokens_total", {**labels, "tier": "disk"}) == 512
    assert value("lmcache_ext:loaded_bytes_total", {**labels, "tier": "disk"}) == 8192
    assert value("lmcache_ext:failures_total", {**labels, "kind": "disk_read"}) == 1
    assert value("lmcache_ext:usage_bytes", {**labels, "tier": "disk"}) == 600
    assert value("lmcache_ext:transfer_seconds_count", {**labels, "op": "load"}) == 1
    assert value("lmcache_ext:transfer_seconds_bucket", {**labels, "op": "load", "le": "0.005"}) == 1
    documented = {m.full_name for m in METRICS.values()}
    assert {family.name for family in registry.collect()} == documented


# -- the connector's halves (vLLM's stats class and its serialization) --

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed: the connector runs on vLLM's connector API"
)


@needs_vllm
def test_connector_stats_survive_vllm_serialization_and_aggregate_ranks_and_steps():
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from lmcache_ext.integration.vllm.stats import LMCacheConnectorStats

    ranks = [Recorder(), Recorder()]
    for rank, rec in enumerate(ranks):
        rec.stored("host", 256 if rank == 0 else 0, 4096)
        rec.usage("disk", 1000 + rank, part=str(rank))
    stats = LMCacheConnectorStats(data=ranks[0].take()).aggregate(LMCacheConnectorStats(data=ranks[1].take()))
    wire = MsgpackDecoder(dict).decode(MsgpackEncoder().encode(stats.to_dict()))
    rebuilt = LMCacheConnectorStats(data=wire)
    assert rebuilt.reduce() == {"stored_tokens_host": 256, "stored_bytes_host": 8192, "usage_bytes_disk": 2001}
    assert not rebuilt.is_empty() and LMCacheConnectorStats().is_empty()


@needs_vllm
def test_the_halves_count_each_token_once_across_tp_ranks_and_each_ranks_bytes(tmp_path):
    from connector_rig import CHUNK, Rig, geometry, hit, prompt, request
    from lmcache_ext.integration.vllm.stats import LMCacheConnectorStats

    rig = Rig(tmp_path, tp=2)
    tokens = prompt(2 * CHUNK + 1, seed=3)
    rig.step([(request("a", tokens), list(range(9)), 0)])
    b = request("b", tokens)
    assert hit(rig.scheduler, b, 0) == 2 * CHUNK
    rig.step([(b, list(range(20, 29)), 0)])
    stats = LMCacheConnectorStats(data=rig.scheduler.take_metrics())
    for w in rig.workers:
        stats.aggregate(LMCacheConnectorStats(data=w.take_metrics()))
    flat = stats.reduce()
    rank_chunk = geometry(2).chunk_bytes(geometry(2).blocks_per_chunk)
    assert flat["stored_tokens_host"] == flat["stored_tokens_disk"] == 2 * CHUNK
    assert flat["stored_bytes_host"] == flat["stored_bytes_disk"] == 2 * 2 * rank_chunk  # 2 chunks x 2 ranks
    assert flat["loaded_tokens_host"] == 2 * CHUNK and flat["loaded_bytes_host"] == 2 * 2 * rank_chunk
    assert flat["usage_bytes_host"] == 2 * 2 * rank_chunk
    disk_files = [w._plans.storage.tiers[Source.DISK].stats()["usage_bytes"] for w in rig.workers]
    assert flat["usage_bytes_disk"] == sum(disk_files) > 0
    assert flat["transfer_seconds_load_count"] == 2  # one batch of loads on each rank
    assert "failures_disk_read" not in flat
