"""The connector's halves with a remote tier on a real server: a lookup answers None while
its probe is out, then hits what another instance stored, and loads it byte for byte;
under TP every rank's shard must be there; a failed remote load is not promised again."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "glide_sync",
    reason="valkey-glide-sync is not installed: the connector's remote tier needs it (lmcache_ext[remote])",
)

from connector_rig import CHUNK, Rig, hit, prompt, reads_of, request, same_pages
from lmcache_ext.plans import Source


def stored_remotely(url: str, tokens: list[int], tp: int = 1) -> Rig:
    writer = Rig(tp=tp, remote_url=url)
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
    assert reader.scheduler.hit_sources(b, 2 * CHUNK) == {Source.REMOTE: 2 * CHUNK}
    plan = reader.step([(b, list(range(20, 29)), 0)])
    assert [r.tier for r in reads_of(plan)] == [Source.REMOTE] * 2 and reader.recved == {"b"}
    assert reader.workers[0].take_load_errors() == set()
    assert same_pages(reader.caches[0], list(range(20, 28)), writer.caches[0], list(range(8)))
    c = request("c", tokens)  # promoted: a host hit, answered at once
    assert reader.scheduler.num_new_matched_tokens(c, 0) == (2 * CHUNK, False)
    assert reader.scheduler.hit_sources(c, 2 * CHUNK) == {Source.HOST: 2 * CHUNK}


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


def test_a_remote_load_that_fails_is_recomputed_and_not_promised_again(redis):
    tokens = prompt(CHUNK + 1, seed=4)
    stored_remotely(redis.url, tokens)
    reader = Rig(seed=40, remote_url=redis.url)
    a = request("a", tokens)
    assert reader.matched(a) == CHUNK
    for key in redis.cli("KEYS", "*").split():
        redis.cli("DEL", key)  # gone between the probe and the load
    plan = reader.step([(a, list(range(40, 45)), 0)])
    assert len(reads_of(plan)) == 1 and reader.recved == {"a"}
    assert reader.workers[0].take_load_errors() == {40, 41, 42, 43}
    b = request("b", tokens)
    assert reader.matched(b) == 0  # the old answer is not reused (after a probe of its partial chunks)
    assert reader.scheduler.stats()["pinned_slots"] == 0
