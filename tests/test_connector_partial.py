"""Partial chunks through the connector's halves, without an engine: a grown prompt hits
its predecessor's every full block, a full chunk replaces the partials it extends,
partials are evicted like any chunk, and TP ranks each store and load their shard."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: the connector runs on vLLM's connector API")
from connector_rig import (
    BLOCK,
    CHUNK,
    Rig,
    cached_step,
    finish,
    geometry,
    hit,
    loads_of,
    prompt,
    request,
    same_pages,
    step_output,
)
from lmcache_ext.geometry import shard_root
from lmcache_ext.keys import chunk_keys, partial_keys
from lmcache_ext.testing.kv_layouts import page_view


def chat(rounds: int, first: int, grow: int, seed: int) -> list[list[int]]:
    """Prompts of a conversation: each one the previous prompt plus `grow` new tokens."""
    prompts = [prompt(first, seed)]
    for r in range(1, rounds):
        prompts.append(prompts[-1] + prompt(grow, seed + r))
    return prompts


def blocks_for(n_tokens: int, base: int) -> list[int]:
    return list(range(base, base + -(-n_tokens // BLOCK)))


@pytest.mark.parametrize("tp", [1, 2])
def test_each_round_of_a_chat_hits_every_full_block_of_the_previous_prompt(tp):
    rig = Rig(tp=tp, save_unfull_chunk=True)
    prompts = chat(3, first=CHUNK + 2 * BLOCK + 5, grow=70, seed=1)  # 101, 171, 241 tokens
    previous: list[int] = []
    for r, tokens in enumerate(prompts):
        req, blocks = request(f"r{r}", tokens), blocks_for(len(tokens), 20 * r)
        expected = len(prompts[r - 1]) // BLOCK * BLOCK if r else 0
        assert hit(rig.scheduler, req) == expected
        plan = rig.step([(req, blocks, 0)])
        assert sum(len(item.copy.block_ids) for item in loads_of(plan)) * BLOCK == expected
        for cache in rig.caches:  # every rank loaded its own shard's bytes
            assert same_pages(cache, blocks[: expected // BLOCK], cache, previous[: expected // BLOCK])
        stored = sorted(len(item.copy.block_ids) for item in plan.stores)
        tail_blocks = len(tokens) % CHUNK // BLOCK
        assert stored[0] == tail_blocks and set(stored[1:]) == {CHUNK // BLOCK}  # the full chunks, then the tail
        previous = blocks
    # what remains in host memory: every full chunk of the last prompt and its partial
    # one; each earlier partial was replaced by the full chunk that extends it
    assert rig.scheduler.stats() == {"host_chunks": len(prompts[-1]) // CHUNK + 1, "pinned_slots": 0}


def test_a_partial_then_the_full_chunk_of_the_same_tokens():
    rig = Rig(save_unfull_chunk=True)
    tokens = prompt(2 * CHUNK + 8, seed=2)
    short = tokens[: CHUNK + 3 * BLOCK + 1]  # a chunk and three blocks, then one token
    rig.step([(request("a", short), blocks_for(len(short), 0), 0)])
    assert rig.scheduler.stats()["host_chunks"] == 2  # the full chunk and the 3-block partial
    b = request("b", tokens)
    assert hit(rig.scheduler, b) == CHUNK + 3 * BLOCK
    plan = rig.step([(b, blocks_for(len(tokens), 10), 0)])
    assert [len(i.copy.block_ids) for i in plan.stores] == [4]  # chunk 1 in full; chunk 0 is present
    assert rig.scheduler.stats()["host_chunks"] == 2  # the full chunk 1 replaced the partial
    # another request with the same two chunks hits both full chunks: chunk 1 holds b's
    # blocks, the first three of which b loaded from the partial
    c = request("c", tokens[: 2 * CHUNK] + prompt(20, seed=3))
    assert hit(rig.scheduler, c) == 2 * CHUNK
    rig.step([(c, blocks_for(len(c.all_token_ids), 30), 0)])
    assert same_pages(rig.caches[0], list(range(30, 38)), rig.caches[0], list(range(10, 18)))
    assert same_pages(rig.caches[0], list(range(34, 37)), rig.caches[0], list(range(4, 7)))


def test_partial_and_full_keys_never_collide_and_a_shorter_partial_is_replaced_by_a_longer_one():
    ns = geometry().namespace
    tokens = prompt(3 * CHUNK, seed=4)
    full = chunk_keys(tokens, ns)
    partials = [
        k for c in range(3) for k in partial_keys(tokens, ns, start=c * CHUNK, prev_key=full[c - 1] if c else None)
    ]
    assert len(partials) == 3 * (CHUNK // BLOCK - 1) and len(set(partials + full)) == len(partials) + 3
    rig = Rig(save_unfull_chunk=True)
    rig.step([(request("a", tokens[: CHUNK + BLOCK + 1]), blocks_for(CHUNK + BLOCK + 1, 0), 0)])
    rig.step([(request("b", tokens[: CHUNK + 3 * BLOCK + 1]), blocks_for(CHUNK + 3 * BLOCK + 1, 10), 0)])
    assert rig.scheduler.stats()["host_chunks"] == 2  # chunk 0 and the 3-block partial; the 1-block one went


def test_the_vllm_hit_inside_a_partial_chunk_is_not_loaded_again():
    rig = Rig(save_unfull_chunk=True)
    tokens = prompt(CHUNK + 3 * BLOCK + 1, seed=5)
    rig.step([(request("a", tokens), blocks_for(len(tokens), 0), 0)])
    grown = request("b", tokens + prompt(40, seed=6))
    local = CHUNK + BLOCK  # vLLM's own prefix cache holds chunk 0 and one block more
    assert hit(rig.scheduler, grown, local) == 2 * BLOCK
    plan = rig.step([(grown, blocks_for(len(grown.all_token_ids), 20), local)])
    assert [(i.copy.first, i.copy.chunk_blocks, i.copy.block_ids) for i in plan.loads] == [(1, 3, (25, 26))]
    assert same_pages(rig.caches[0], [25, 26], rig.caches[0], [5, 6])


def test_partials_are_evicted_like_full_chunks_when_the_pool_is_full():
    rig = Rig(save_unfull_chunk=True, max_local_cpu_size=4 * 16 / 1024 / 1024)  # 4 slots of 16 KiB
    assert rig.scheduler._slots.num_slots == 4
    prompts = [prompt(CHUNK + 2 * BLOCK + 1, seed=10 + i) for i in range(3)]  # a chunk and a partial each
    for i, tokens in enumerate(prompts):
        rig.step([(request(f"p{i}", tokens), blocks_for(len(tokens), 10 * i), 0)])
    assert rig.scheduler.stats() == {"host_chunks": 4, "pinned_slots": 0}
    # the oldest prompt lost both of its entries (LRU), the newest hits in full
    assert hit(rig.scheduler, request("x", prompts[0] + [1])) == 0
    assert hit(rig.scheduler, request("y", prompts[2] + [1])) == CHUNK + 2 * BLOCK


def test_with_save_decode_cache_the_generated_blocks_are_stored_when_the_request_finishes():
    rig = Rig(save_unfull_chunk=True, save_decode_cache=True)
    tokens = prompt(CHUNK + BLOCK - 1, seed=7)  # the prompt's tail is not a whole block
    req = request("a", tokens)
    rig.step([(req, blocks_for(len(tokens) + 2 * BLOCK, 0), 0)])
    computed = len(tokens)
    for _ in range(2 * BLOCK + 5):  # decode: each step computes the token sampled before
        tokens.append(len(tokens) % 997)
        rig.run(rig.scheduler.build_plan(cached_step("a", computed, None, 1)))
        computed += 1
    tokens.append(3)  # the last sampled token: no KV computed for it
    assert finish(rig.scheduler, "a") is False  # vLLM frees its blocks now ...
    plan = rig.scheduler.build_plan(cached_step("b", 0, None, 0))
    assert plan.released == ["a"] and [i.copy.block_ids for i in plan.stores] == [(4, 5, 6)]  # 3 past the chunk
    original = [page_view(t)[[0, 1, 2, 3, 4, 5, 6]].clone() for t in rig.caches[0]]
    w = rig.workers[0]
    w.handle_preemptions(plan)  # ... and the next step gathers the partial before anything can reuse them
    for t in rig.caches[0]:
        page_view(t)[[4, 5, 6]] = 0  # the reuse: this step's forward writes another request's KV there
    w.load(plan)
    w.save(plan)
    w.flush()
    rig.scheduler.apply_report(w.take_report())
    assert w.get_finished({"a"}) == (None, None)
    grown = request("c", tokens + prompt(30, seed=8))
    assert hit(rig.scheduler, grown) == CHUNK + 3 * BLOCK
    rig.scheduler.plan_load(grown, (list(range(20, 28)),), CHUNK + 3 * BLOCK)
    rig.run(rig.scheduler.build_plan(step_output()))
    assert all(torch.equal(page_view(t)[list(range(20, 27))], o) for t, o in zip(rig.caches[0], original))


def test_a_partial_on_disk_is_hit_after_a_restart_by_every_tp_rank(tmp_path):
    rig = Rig(tmp_path, tp=2, save_unfull_chunk=True)
    tokens = prompt(CHUNK + 2 * BLOCK + 3, seed=9)
    rig.step([(request("a", tokens), blocks_for(len(tokens), 0), 0)])
    sources = [[t.clone() for t in cache] for cache in rig.caches]
    for w in rig.workers:
        w.close()
    key = partial_keys(
        tokens, geometry(2).namespace, start=CHUNK, prev_key=chunk_keys(tokens, geometry(2).namespace)[0]
    )[1]
    for r in range(2):  # each rank wrote its shard of the partial: two blocks' bytes
        path = shard_root(tmp_path / "kv", r) / key.hex()[:2] / key.hex()
        assert path.exists()
    fresh = Rig(tmp_path, tp=2, seed=20, save_unfull_chunk=True)
    grown = request("b", tokens + prompt(50, seed=10))
    assert fresh.matched(grown) == CHUNK + 2 * BLOCK
    fresh.step([(grown, blocks_for(len(grown.all_token_ids), 30), 0)])
    for cache, source in zip(fresh.caches, sources):
        assert same_pages(cache, list(range(30, 36)), source, list(range(6)))


def test_a_prompt_of_whole_blocks_hits_the_first_blocks_of_its_own_longer_partial():
    """A decode instance gets the very prompt its prefill instance stored: when that ends
    on a block, its partial chunk ends past the hit's limit (a token must be left), and
    the hit takes the partial's first blocks instead of none of it."""
    rig = Rig(save_unfull_chunk=True)
    tokens = prompt(CHUNK + 3 * BLOCK, seed=7)  # a full chunk and a partial of three whole blocks
    rig.step([(request("p", tokens), blocks_for(len(tokens), 0), 0)])
    again = request("d", tokens)
    assert hit(rig.scheduler, again) == CHUNK + 2 * BLOCK  # every block but the last, which vLLM computes
    plan = rig.step([(again, blocks_for(len(tokens), 20), 0)])
    assert sum(len(i.copy.block_ids) for i in loads_of(plan)) == CHUNK // BLOCK + 2
    assert same_pages(rig.caches[0], list(range(20, 26)), rig.caches[0], list(range(6)))
