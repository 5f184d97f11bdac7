"""The connector's halves with a remote tier on a real server: a lookup answers None while
its probe is out and while the chunks are fetched into host slots, then promises host
hits of what another instance stored, and loads them byte for byte; under TP every
rank's shard must be there (a replicated cache's one record serves every rank at any TP size); a record deleted between the probe and the fetch is a
miss, never a failed load, and is not promised later."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "glide_sync",
    reason="valkey-glide-sync is not installed: the connector's remote tier needs it (lmcache_ext[remote])",
)

import time

from connector_rig import CHUNK, Rig, hit, loads_of, prompt, reads_of, request, same_pages
from lmcache_ext.plans import Source


def stored_remotely(url: str, tokens: list[int], tp: int = 1, replicas: int = 1) -> Rig:
    writer = Rig(tp=tp, replicas=replicas, remote_url=url)
    plan = writer.step([(request("writer", tokens), list(range(len(tokens) // 16 + 1)), 0)])
    assert {item.writes for item in plan.stores} == {(Source.REMOTE,)}
    writer.flush()
    return writer


def test_a_lookup_waits_for_the_probe_then_loads_what_another_instance_stored(redis):
    tokens = prompt(2 * CHUNK + 1, seed=1)
    writer = stored_remotely(redis.url, tokens)
    reader = Rig(seed=9, remote_url=redis.url)
    b = request("b", tokens)
    redis.pause(0.5)  # the probe cannot answer yet
    reader.scheduler.on_new_request(b)
    assert hit(reader.scheduler, b) is None
    assert hit(reader.scheduler, b) is None  # still out: vLLM keeps it waiting
    assert reader.matched(b) == 2 * CHUNK
    assert reader.scheduler.hit_sources(b, 2 * CHUNK) == {Source.REMOTE: 2 * CHUNK}  # fetched for it
    plan = reader.step([(b, list(range(20, 29)), 0)])
    assert reads_of(plan) == [] and len(plan.loads) == 2 and not plan.async_loads  # host hits: fetched already
    assert reader.workers[0].take_load_errors() == set()
    assert same_pages(reader.caches[0], list(range(20, 28)), writer.caches[0], list(range(8)))
    c = request("c", tokens)
    assert reader.scheduler.num_new_matched_tokens(c, 0) == (2 * CHUNK, False)
    assert reader.scheduler.hit_sources(c, 2 * CHUNK) == {Source.HOST: 2 * CHUNK}
    assert reader.scheduler.stats()["pinned_slots"] == 0


def test_a_miss_everywhere_is_answered_after_one_probe(redis):
    reader = Rig(remote_url=redis.url)
    a = request("a", prompt(2 * CHUNK + 1, seed=2))
    reader.scheduler.on_new_request(a)
    assert reader.matched(a) == 0


def test_under_tp_every_rank_shard_must_be_in_the_store(redis):
    tokens = prompt(CHUNK + 1, seed=3)
    writer = stored_remotely(redis.url, tokens, tp=2)
    manifests = sorted(k for k in redis.cli("KEYS", "*").split() if k.endswith("}"))
    assert sorted(m.split(":")[-2] for m in manifests) == ["0", "1"]  # one shard per rank
    reader = Rig(tp=2, seed=20, remote_url=redis.url)
    a = request("a", tokens)
    assert reader.matched(a) == CHUNK
    reader.step([(a, list(range(30, 35)), 0)])
    for rank in (0, 1):
        assert same_pages(reader.caches[rank], list(range(30, 34)), writer.caches[rank], list(range(4)))
    redis.cli("DEL", manifests[1])
    other = Rig(tp=2, seed=30, remote_url=redis.url)
    assert other.matched(request("b", tokens)) == 0


def test_a_replicated_cache_at_tp2_writes_one_record_that_an_engine_at_tp1_or_tp2_loads(redis):
    tokens = prompt(CHUNK + 1, seed=6)
    writer = stored_remotely(redis.url, tokens, tp=2, replicas=2)
    manifests = [k for k in redis.cli("KEYS", "*").split() if k.endswith("}")]
    assert [m.split(":")[-2] for m in manifests] == ["0"]  # MLA: rank 0's record serves every rank
    for tp in (1, 2):
        reader = Rig(tp=tp, seed=60 + tp, replicas=tp, remote_url=redis.url)
        a = request(f"a{tp}", tokens)
        assert reader.matched(a) == CHUNK
        reader.step([(a, list(range(30, 35)), 0)])
        for cache in reader.caches:
            assert same_pages(cache, list(range(30, 34)), writer.caches[0], list(range(4)))


def test_a_record_deleted_between_the_probe_and_the_fetch_is_a_miss_not_a_failed_load(redis):
    tokens = prompt(CHUNK + 1, seed=4)
    stored_remotely(redis.url, tokens)
    reader = Rig(seed=40, remote_url=redis.url)
    a = request("a", tokens)
    reader.scheduler.on_new_request(a)
    while reader.scheduler.num_new_matched_tokens(a, 0)[0] is None and not reader.scheduler._planner.next_plan.fetches:
        time.sleep(0.01)  # the probe answers: the chunk is there, and its fetch is planned
    for key in redis.cli("KEYS", "*").split():
        redis.cli("DEL", key)  # gone between the probe and the read
    assert reader.matched(a) == 0  # the fetch missed: nothing was promised
    plan = reader.step([(a, list(range(40, 45)), 0)])
    assert loads_of(plan) == [] and reader.workers[0].take_load_errors() == set()
    assert reader.scheduler.stats()["pinned_slots"] == 0


def test_a_record_deleted_after_the_fetch_costs_nothing(redis):
    tokens = prompt(CHUNK + 1, seed=5)
    writer = stored_remotely(redis.url, tokens)
    reader = Rig(seed=50, remote_url=redis.url)
    a = request("a", tokens)
    assert reader.matched(a) == CHUNK
    for key in redis.cli("KEYS", "*").split():
        redis.cli("DEL", key)  # after the promise: the chunk is in a host slot already
    reader.step([(a, list(range(40, 45)), 0)])
    assert reader.workers[0].take_load_errors() == set()
    assert same_pages(reader.caches[0], list(range(40, 44)), writer.caches[0], list(range(4)))
