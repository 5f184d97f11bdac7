"""Disaggregated prefill with two CacheEngines on one real Redis: a prefill instance
(kv_producer) stores and never hits; a decode instance (kv_consumer) hits what it stored,
byte for byte, and stores nothing unless it keeps its decode caches; a decode instance
that looks while the prefill instance's writes are still in flight waits for them, up to
pd_wait_ms. Then the kv_transfer_params a prefill instance hands its decode instance."""

from __future__ import annotations

import logging
import random
import time
from types import SimpleNamespace

import pytest

pytest.importorskip(
    "glide_sync", reason="valkey-glide-sync is not installed: the remote tier needs it (lmcache_ext[remote])"
)

import torch

from lmcache_ext.config import GB, CacheConfig
from lmcache_ext.engine import CacheEngine
from lmcache_ext.testing.kv_layouts import make_layers, page_view
from lmcache_ext.tiers.remote import RemoteTier

LAYERS, BLOCKS, BLOCK, CHUNK = 2, 64, 16, 64  # 4 blocks a chunk
HEADS, WIDTH = 2, 32
CHUNK_BYTES = LAYERS * (CHUNK // BLOCK) * HEADS * BLOCK * WIDTH * 2
PROMPT = 2 * CHUNK + 2 * BLOCK + 8  # two full chunks, a partial one of two full blocks, 8 tokens more
HIT = 2 * CHUNK + 2 * BLOCK  # what a decode instance finds of it
PROMPT_BLOCKS = list(range(1, 11))  # the prompt's 10 full blocks (block 0 is left alone)
SLOW_WRITE_S = 0.5


def cache(seed: int) -> list[torch.Tensor]:
    return make_layers("LBHNC", LAYERS, BLOCKS, HEADS, BLOCK, WIDTH, torch.bfloat16, seed=seed)


def engine(url: str, seed: int, role: str, **kw: object) -> CacheEngine:
    settings = {
        "chunk_size": CHUNK,
        "max_local_cpu_size": 64 * CHUNK_BYTES / GB,
        "remote_url": url,
        "remote_timeout_ms": 300,
        "remote_connections": 3,  # a prompt's three writes at once
        "kv_role": role,
        **kw,
    }
    return CacheEngine(CacheConfig(**settings), cache(seed), BLOCK, model="tiny")


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(n)]


def same_pages(a: CacheEngine, a_ids: list[int], b: CacheEngine, b_ids: list[int]) -> bool:
    return all(torch.equal(page_view(x)[a_ids], page_view(y)[b_ids]) for x, y in zip(a._kv.tensors, b._kv.tensors))


def presence(engine: CacheEngine):
    """The engine's view of the remote tier (its counts are not in `stats`)."""
    return engine._planner._holdings["remote"]


def records(redis) -> list[str]:
    return [k for k in redis.cli("KEYS", "*").split() if k.endswith("}") and ":inflight:" not in k]


def marks(redis) -> list[str]:
    return [k for k in redis.cli("KEYS", "*").split() if ":inflight:" in k]


@pytest.fixture
def slow_writes(monkeypatch):
    """Every remote write waits SLOW_WRITE_S before it is sent: a prefill instance's chunks stay in flight."""
    write = RemoteTier._write

    def slow(self, client, key, payload):
        time.sleep(SLOW_WRITE_S)
        return write(self, client, key, payload)

    monkeypatch.setattr(RemoteTier, "_write", slow)


@pytest.fixture(scope="module")
def tp():
    """lmcache_ext.integration.vllm.transfer_params (its package imports vLLM: seconds, once)."""
    pytest.importorskip("vllm", reason="lmcache_ext.integration.vllm imports vLLM")
    from lmcache_ext.integration.vllm import transfer_params

    return transfer_params


def test_a_producer_stores_and_never_hits_and_a_consumer_loads_its_chunks_byte_for_byte(redis):
    tokens = prompt(PROMPT, seed=1)
    with engine(redis.url, 1, "kv_producer") as producer, engine(redis.url, 2, "kv_consumer") as consumer:
        assert producer.store(tokens, PROMPT_BLOCKS) == HIT
        assert producer.lookup(tokens) == 0  # its own host tier holds them: a prefill instance computes anyway
        producer.flush()
        assert producer.stats()["remote_writes_ok"] == 3  # two chunks and the partial one
        assert len(records(redis)) == 3 and marks(redis) == []  # every mark went once its chunk was written
        assert producer.lookup(tokens) == 0 and producer.retrieve(tokens, list(range(20, 30))) == 0

        assert consumer.lookup(tokens) == HIT
        assert consumer.retrieve(tokens, list(range(20, 30))) == HIT
        assert same_pages(consumer, list(range(20, 30)), producer, PROMPT_BLOCKS)
        stats = consumer.stats()
        assert stats["hit_tokens_remote"] == HIT and stats["remote_reads_hit"] == 3  # the lookup fetched them
        assert stats["loaded_tokens_host"] == HIT
        assert consumer.lookup(tokens[: CHUNK + 8]) == CHUNK  # a prefix hits as before


def test_a_consumer_stores_nothing_of_its_own(redis):
    long, short = prompt(PROMPT, seed=2), prompt(3 * BLOCK, seed=3)
    with engine(redis.url, 1, "kv_consumer") as consumer:
        assert consumer.store(long, PROMPT_BLOCKS) == 0
        assert consumer.store(short, [1, 2, 3]) == 0  # a prompt shorter than a chunk too
        consumer.flush()
        assert redis.cli("DBSIZE") == "0"
        stats = consumer.stats()
        assert stats["host_chunks"] == 0 and stats["pinned_slots"] == 0
        assert consumer.lookup(long) == 0 and consumer.lookup(short) == 0


def test_a_consumer_that_keeps_its_decode_cache_stores(redis):
    tokens = prompt(PROMPT, seed=4)
    with (
        engine(redis.url, 1, "kv_consumer", save_decode_cache=True) as consumer,
        engine(redis.url, 2, "kv_consumer") as other,
    ):
        assert consumer.store(tokens, PROMPT_BLOCKS) == HIT
        consumer.flush()
        assert len(records(redis)) == 3 and marks(redis) == []  # a consumer never marks
        assert consumer.lookup(tokens) == HIT  # from its host tier
        assert other.retrieve(tokens, list(range(20, 30))) == HIT
        assert same_pages(other, list(range(20, 30)), consumer, PROMPT_BLOCKS)


def test_a_consumer_looking_while_the_producer_writes_waits_for_the_chunks(redis, slow_writes):
    tokens = prompt(PROMPT, seed=5)
    with engine(redis.url, 1, "kv_producer") as producer, engine(redis.url, 2, "kv_consumer") as consumer:
        stored = time.monotonic()  # every write is submitted after this, and lands SLOW_WRITE_S later
        assert producer.store(tokens, PROMPT_BLOCKS) == HIT
        producer._planner.wait_announced()  # what a prefill instance does before its answer leaves
        assert presence(producer).counts["marked_chunks"] == 3
        assert producer.stats()["remote_writes_pending"] == 3  # none has landed
        started = time.monotonic()
        assert consumer.lookup(tokens) == HIT
        ended = time.monotonic()
        assert ended - stored >= SLOW_WRITE_S and ended - started >= SLOW_WRITE_S * 0.8
        assert presence(consumer).counts["waits_expired"] == 0
        assert consumer.retrieve(tokens, list(range(20, 30))) == HIT
        assert same_pages(consumer, list(range(20, 30)), producer, PROMPT_BLOCKS)
        producer.flush()
        producer._planner.wait_announced()
        assert marks(redis) == [] and len(records(redis)) == 3


def test_a_consumer_waits_no_longer_than_pd_wait_ms(redis, slow_writes):
    tokens = prompt(PROMPT, seed=6)
    with (
        engine(redis.url, 1, "kv_producer") as producer,
        engine(redis.url, 2, "kv_consumer", pd_wait_ms=100) as consumer,
    ):
        assert producer.store(tokens, PROMPT_BLOCKS) == HIT
        producer._planner.wait_announced()
        assert producer.stats()["remote_writes_pending"] == 3
        started = time.monotonic()
        assert consumer.lookup(tokens) == 0  # nothing had landed within 100 ms: computed instead
        assert 0.09 <= time.monotonic() - started < SLOW_WRITE_S * 0.8
        assert presence(consumer).counts["waits_expired"] == 2  # each full chunk waited out once
        started = time.monotonic()
        assert consumer.retrieve(tokens, list(range(20, 30))) == 0  # "absent" is kept a while: no second wait
        assert time.monotonic() - started < 0.09
        producer.flush()


def test_a_consumer_does_not_wait_for_chunks_nobody_marked(redis, slow_writes):
    tokens = prompt(PROMPT, seed=7)
    with engine(redis.url, 1, "kv_both") as both, engine(redis.url, 2, "kv_consumer") as consumer:
        assert both.store(tokens, PROMPT_BLOCKS) == HIT  # an ordinary instance marks nothing
        both._planner.wait_announced()
        assert both.stats()["remote_writes_pending"] == 3 and marks(redis) == []
        started = time.monotonic()
        assert consumer.lookup(tokens) == 0
        assert time.monotonic() - started < SLOW_WRITE_S * 0.8
        both.flush()


def test_a_consumer_told_what_the_producer_stored_waits_without_marks(redis, slow_writes, tp):
    """The kv_transfer_params path: the producer's marks are not needed (here: an
    ordinary instance that marks nothing), the planner's `expect` names the chunks.
    CacheEngine has no call for it: this goes through its planner."""
    tokens = prompt(PROMPT, seed=8)
    with engine(redis.url, 1, "kv_both") as both, engine(redis.url, 2, "kv_consumer") as consumer:
        planner = consumer._planner
        req = planner.request("decode-1", tokens, len(tokens))
        assert len(planner.keys(req, HIT)) == 2
        partial = planner.partial_candidates(req, 2, HIT)[-1]  # the last chunk the producer stores
        request = SimpleNamespace(request_id="decode-1", kv_transfer_params=tp.transfer_params(HIT, partial))
        told = tp.stored_by_producer(request)
        assert told == (HIT, partial.hex())
        assert not planner.expect(req, HIT, bytes(16).hex())  # keyed apart: never waited for
        assert both.store(tokens, PROMPT_BLOCKS) == HIT
        assert both.stats()["remote_writes_pending"] == 3
        assert planner.expect(req, *told)
        started = time.monotonic()
        assert consumer.lookup(tokens) == HIT
        assert time.monotonic() - started >= SLOW_WRITE_S * 0.8
        planner.finished(req)
        both.flush()


# -- kv_transfer_params --


def req(params: object, request_id: str = "r-1") -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, kv_transfer_params=params)


def test_transfer_params_round_trip(tp, caplog):
    key = bytes(range(16))
    params = tp.transfer_params(160, key)
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    with caplog.at_level(logging.WARNING):
        assert tp.stored_by_producer(req(params)) == (160, key.hex())
        assert tp.stored_by_producer(req(tp.transfer_params(0, None))) is None  # stored nothing
        assert tp.stored_by_producer(req(None)) is None
        assert tp.stored_by_producer(req({"do_remote_prefill": True})) is None  # another connector's
        assert tp.stored_by_producer(SimpleNamespace()) is None
    assert caplog.records == []
    assert tp.wants_transfer_params(req({"do_remote_decode": True}))
    assert not tp.wants_transfer_params(req({"do_remote_decode": False}))
    assert not tp.wants_transfer_params(req(None)) and not tp.wants_transfer_params(SimpleNamespace())


@pytest.mark.parametrize(
    "ours",
    [
        "160",
        [160, "00"],
        {},
        {"tokens": "160", "last_key": "00ff"},
        {"tokens": True, "last_key": "00ff"},
        {"tokens": -16, "last_key": "00ff"},
        {"tokens": 16.0, "last_key": "00ff"},
        {"tokens": 160, "last_key": None},
        {"tokens": 160, "last_key": "0ff"},
        {"tokens": 160, "last_key": "zz"},
        {"tokens": 160, "last_key": 255},
    ],
)
def test_malformed_transfer_params_are_logged_and_ignored(tp, caplog, ours):
    with caplog.at_level(logging.WARNING):
        assert tp.stored_by_producer(req({"lmcache_ext": ours}, "r-bad")) is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "r-bad" in record.getMessage() and repr(ours) in record.getMessage()
