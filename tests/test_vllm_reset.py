"""`reset_prefix_cache(reset_connector=True)` with the connector, as RL loops call it: right
after `generate` and an in-place weight update, with vLLM's prefix cache on and the
connector's defaults (async saves). It succeeds as it does without the connector and no
stale token is served: in-process, in multiprocess mode (the weights changed through
`collective_rpc`), with layerwise saves and through the OpenAI server's endpoint.
Finished requests never keep their blocks, and sleep mode (which resets both caches)
and an abort followed by a reset behave as without the connector. Float32, so that an
answer that differs from a fresh engine's means stale KV."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")
import httpx

from conftest import running_server
from lmcache_ext.demo import connector_config
from lmcache_ext.integration.vllm.offline import run_vllm_script
from lmcache_ext.tiny_llama import build_tiny_llama

pytestmark = pytest.mark.vllm

MAX_TOKENS = 8
MP = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # a callable crosses processes


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


PROMPT = tokens(900, seed=31)  # 3 full chunks and a partial one: stores are still out when generate returns
ABORTED = tokens(700, seed=32)

ENGINE = """
import time
from vllm import LLM, SamplingParams
from lmcache_ext.testing.weights import scale_first_layer as bump

llm = LLM(model={model!r}, max_model_len=4096, seed=0, dtype="float32", disable_log_stats=False, **{kwargs!r})
params = SamplingParams(temperature=0, max_tokens={max_tokens})
prompt = {{"prompt_token_ids": {prompt!r}}}
core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # in-process only

def generate():
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    free = core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() if core is not None else None
    return {{"tokens": list(out.outputs[0].token_ids), "cached": out.num_cached_tokens, "free_blocks": free}}
"""

SEQUENCE = (
    ENGINE
    + """
rounds, resets = [generate()], []
for pause in (0.0, 1.0):  # a reset issued at once, and one after a pause
    llm.collective_rpc("apply_model", args=(bump,)) if {rpc} else llm.apply_model(bump)
    time.sleep(pause)
    resets.append(llm.reset_prefix_cache(reset_connector=True))
    rounds.append(generate())
llm.sleep(level=1)  # resets vLLM's prefix cache and the connector's (it raises where that fails)
llm.wake_up()
rounds.append(generate())
engine = llm.llm_engine
engine.add_request("aborted", {{"prompt_token_ids": {aborted!r}}}, SamplingParams(temperature=0, max_tokens=64))
for _ in range(3):  # its prefill (stores planned) and two decode steps
    engine.step()
engine.abort_request(["aborted"])
resets.append(llm.reset_prefix_cache(reset_connector=True))
rounds.append(generate())
return {{"rounds": rounds, "resets": resets}}
"""
)

FRESH = (
    ENGINE
    + """
outs = []
for _ in range(3):  # the prompt under the original weights, then after one and two updates
    outs.append(generate()["tokens"])
    llm.apply_model(bump)
return {{"tokens": outs}}
"""
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def sequence(model: Path, kwargs: dict, rpc: bool = False, **env: str) -> dict:
    code = SEQUENCE.format(
        model=str(model), kwargs=kwargs, max_tokens=MAX_TOKENS, prompt=PROMPT, aborted=ABORTED, rpc=rpc
    )
    return run_vllm_script(code, env_extra=env, timeout=600)


@pytest.fixture(scope="module")
def fresh(model: Path) -> list[list[int]]:
    """The prompt's answer from an engine without any cache, at each weight version."""
    code = FRESH.format(model=str(model), kwargs={"enable_prefix_caching": False}, max_tokens=MAX_TOKENS, prompt=PROMPT)
    return run_vllm_script(code)["tokens"]


@pytest.fixture(scope="module")
def plain(model: Path) -> dict:
    """The same sequence without the connector: what a reset must do with it too."""
    return sequence(model, {})


def check_sequence(run: dict, fresh: list[list[int]]) -> None:
    rounds = run["rounds"]
    assert run["resets"] == [True, True, True]
    assert [r["cached"] for r in rounds] == [0, 0, 0, 0, 0]  # nothing computed before a reset is served
    assert [r["tokens"] for r in rounds] == [fresh[0], fresh[1], fresh[2], fresh[2], fresh[2]]


def test_without_the_connector_the_sequence_resets_cleanly(plain, fresh):
    check_sequence(plain, fresh)


@pytest.mark.parametrize("layerwise", [False, True], ids=["whole-step", "layerwise"])
def test_a_reset_right_after_generate_succeeds_and_serves_no_stale_kv(model, plain, fresh, tmp_path, layerwise):
    config = connector_config(tmp_path / "kv", max_local_cpu_size=0.25, max_local_disk_size=1, use_layerwise=layerwise)
    ours = sequence(model, {"kv_transfer_config": config})
    check_sequence(ours, fresh)
    # finished requests keep no block: the pool is as free as without the connector after every generate
    assert [r["free_blocks"] for r in ours["rounds"]] == [r["free_blocks"] for r in plain["rounds"]]


def test_a_reset_after_a_weight_update_through_collective_rpc_in_multiprocess_mode(model, fresh, tmp_path):
    config = connector_config(tmp_path / "kv", max_local_cpu_size=0.25, max_local_disk_size=1)
    check_sequence(sequence(model, {"kv_transfer_config": config}, rpc=True, **MP), fresh)


def test_the_servers_reset_endpoint_succeeds_right_after_a_completion(
    model: Path, tmp_path: Path, say: Callable[[str], None]
) -> None:
    config = connector_config(tmp_path / "kv", max_local_cpu_size=0.25, max_local_disk_size=1)
    with running_server(
        say,
        "with the connector and vLLM's prefix cache",
        model,
        tmp_path,
        args=("--max-model-len", "4096", "--enable-prefix-caching"),
        env={"VLLM_SERVER_DEV_MODE": "1"},
        kv_transfer_config=config,
    ) as server:

        def complete() -> dict:
            body = {"model": server.model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
            reply = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
            reply.raise_for_status()
            usage = reply.json()["usage"]
            return {
                "text": reply.json()["choices"][0]["text"],
                "cached": usage["prompt_tokens_details"]["cached_tokens"],
            }

        first, again = complete(), complete()
        assert (first["cached"], again["cached"]) == (0, 896)  # vLLM's prefix cache, to the block
        reset = httpx.post(server.url + "/reset_prefix_cache", params={"reset_external": "true"}, timeout=60)
        assert reset.json() == {"success": True}
        after = complete()
        assert after == {"text": first["text"], "cached": 0}
