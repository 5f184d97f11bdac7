"""The connector's workers on a host pool that the replicas of one engine share (an MLA
cache, replicated KV heads): the first replica alone gathers and reads from the lower
tiers, a follower waits for its stamp of each slot it loads from, and every rank loads
the same bytes; a failed read of the first replica fails the load on every rank."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: the connector runs on vLLM's connector API")
import torch

from connector_rig import CHUNK, Rig, loads_of, prompt, request, same_pages
from lmcache_ext.integration.vllm import worker_plans
from lmcache_ext.testing.kv_layouts import page_view


def store_then_load(rig: Rig, tokens: list[int], blocks: int) -> None:
    """Store `tokens` from blocks 0.. of every rank, then load them into blocks 20.."""
    rig.step([(request("a", tokens), list(range(blocks)), 0)])
    rig.flush()
    b = request("b", tokens)
    rig.step([(b, list(range(20, 20 + blocks)), 0)])
    assert b.external == (len(tokens) // CHUNK) * CHUNK


@pytest.mark.parametrize("layerwise", [False, True])
def test_the_first_replica_alone_gathers_and_every_rank_loads_its_bytes_from_the_shared_slot(tmp_path, layerwise):
    rig = Rig(tmp_path, tp=2, replicas=2, use_layerwise=layerwise)
    assert rig.workers[1]._plans.storage.follows
    for layer in rig.caches[1]:  # what rank 1 would gather, were it to: not the KV that rank 0 holds
        layer.zero_()
    source = [layer.clone() for layer in rig.caches[0]]
    store_then_load(rig, prompt(2 * CHUNK + 1, seed=3), 9)
    for cache in rig.caches:
        assert same_pages(cache, list(range(20, 28)), source, list(range(8)))
    for w in rig.workers:
        w.close()


def stored_on_disk(tmp_path, tokens: list[int], blocks: int) -> Rig:
    """An engine at TP=2 with replicated KV that stored `tokens` on disk and stopped."""
    writer = Rig(tmp_path, tp=2, replicas=2)
    writer.step([(request("a", tokens), list(range(blocks)), 0)])
    for w in writer.workers:
        w.close()
    return writer


@pytest.mark.parametrize("layerwise", [False, True])
def test_the_first_replica_alone_reads_a_disk_hit_and_its_replica_loads_it_from_the_shared_slot(
    tmp_path, monkeypatch, layerwise
):
    tokens = prompt(2 * CHUNK + 1, seed=4)
    writer = stored_on_disk(tmp_path, tokens, 9)
    fresh = Rig(tmp_path, tp=2, replicas=2, seed=50, use_layerwise=layerwise, concurrent=True)  # rank 1 waits
    follower_disk = fresh.workers[1]._plans.storage.tiers["disk"]
    monkeypatch.setattr(follower_disk, "read_into", lambda key, out: pytest.fail("the follower read the disk"))
    b = request("b", tokens)
    plan = fresh.step([(b, list(range(20, 29)), 0)])
    assert b.external == 2 * CHUNK and all(i.read is not None for i in loads_of(plan)) and fresh.recved == {"b"}
    for cache in fresh.caches:
        assert same_pages(cache, list(range(20, 28)), writer.caches[0], list(range(8)))
    for w in fresh.workers:
        w.close()


def unreadable(key: bytes, out: object) -> bool:
    return False


def broken(key: bytes, out: object) -> bool:
    raise OSError("the disk is gone")


@pytest.mark.parametrize("read_into", [unreadable, broken])
def test_a_failed_read_of_the_first_replica_fails_the_load_on_every_rank_without_a_wait(
    tmp_path, monkeypatch, caplog, read_into
):
    """A read that fails, or raises, is stamped as failed: the follower waiting for it
    fails the load too, at once, and every rank names the chunk's blocks."""
    monkeypatch.setattr(worker_plans, "FOLLOW_WAIT_MS", 2000)
    tokens = prompt(CHUNK + 1, seed=5)
    stored_on_disk(tmp_path, tokens, 5)
    fresh = Rig(tmp_path, tp=2, replicas=2, seed=60, concurrent=True)  # rank 1 waits for rank 0's stamp
    monkeypatch.setattr(fresh.workers[0]._plans.storage.tiers["disk"], "read_into", read_into)
    before = [page_view(layer)[20:24].clone() for layer in fresh.caches[1]]
    b = request("b", tokens)
    with caplog.at_level(logging.WARNING):
        fresh.step([(b, list(range(20, 25)), 0)])
    assert "did not fill slot" not in caplog.text  # the follower saw the failure's stamp, not a timeout
    assert b.external == CHUNK and fresh.recved == {"b"}
    for w in fresh.workers:  # every rank names the chunk's blocks, so vLLM recomputes them
        assert w.take_load_errors() == {20, 21, 22, 23}
    assert all(torch.equal(page_view(layer)[20:24], old) for layer, old in zip(fresh.caches[1], before))
    assert hit_after(fresh, tokens) == 0  # the failed chunk is forgotten
    for w in fresh.workers:
        w.close()


def hit_after(rig: Rig, tokens: list[int]) -> int:
    return rig.scheduler.num_new_matched_tokens(request("c", tokens), 0)[0] or 0


def test_replicas_without_an_engine_name_keep_their_own_pools_and_each_gathers(tmp_path):
    rig = Rig(tmp_path, tp=2, replicas=2, engine="")
    assert not any(w._plans.storage.pool.is_shared for w in rig.workers)
    store_then_load(rig, prompt(CHUNK + 1, seed=6), 5)
    for cache in rig.caches:
        assert same_pages(cache, list(range(20, 24)), rig.caches[0], list(range(4)))
    for w in rig.workers:
        w.close()
