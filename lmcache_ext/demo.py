"""``python -m lmcache_ext.demo``: store and reuse of KV caches on a real vLLM engine,
on this machine's CPU, with nothing downloaded.

It builds a small random-weight Llama, then serves a long document with a question
through vLLM with the connector and prints time-to-first-token and hit counts for:
the first request (cold: computed and stored), the same request again (host
tier), another question about the same document (shared prefix), and a third
question after an engine restart (disk tier). A run without the connector gives
the baseline. vLLM's own prefix cache is off, so every hit is ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
from pathlib import Path

from lmcache_ext.integration.vllm.offline import fair_cpu_binding, run_vllm_script
from lmcache_ext.tiny_llama import BENCH, build_tiny_llama

ENGINE = """
{prelude}
import time
from vllm import LLM, SamplingParams
llm = LLM(model={model!r}, max_model_len=8192, seed=0, disable_log_stats=False,
          **{{"enable_prefix_caching": False, **{kwargs!r}}})
first = SamplingParams(temperature=0, max_tokens=1)
llm.generate([{{"prompt_token_ids": {warmup!r}}}], first, use_tqdm=False)  # a long prompt of its own
rows = []
for name, prompt in {prompts!r}:
    start = time.perf_counter()
    out = llm.generate([{{"prompt_token_ids": prompt}}], first, use_tqdm=False)[0]
    rows.append({{"request": name, "ttft_s": time.perf_counter() - start, "prompt_tokens": len(prompt),
                 "cached_tokens": out.num_cached_tokens, "first_token": out.outputs[0].token_ids[0],
                 "first_token_s": out.metrics.first_token_latency}})
    if connector_seconds is not None:
        rows[-1]["connector_s"] = connector_seconds()
del llm
return {{"rows": rows}}
"""


def connector_config(disk: Path, chunk_size: int = 256, **extra: object) -> dict:
    """The kv_transfer_config a user passes to vLLM (here as LLM(..., kv_transfer_config=...))."""
    return {
        "kv_connector": "LMCacheConnectorV1Dynamic",
        "kv_connector_module_path": "lmcache_ext.integration.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "chunk_size": chunk_size,
            "max_local_cpu_size": 1,
            "local_disk": str(disk),
            "max_local_disk_size": 4,
            **extra,
        },
    }


NO_TIMER = "connector_seconds = None"


def serve(
    model: Path,
    prompts: list[tuple[str, list[int]]],
    kwargs: dict,
    prelude: str = NO_TIMER,
    env: dict[str, str] | None = None,
) -> list[dict]:
    """Run the prompts one at a time in a fresh engine process, after a warm-up prompt
    as long as the longest of them (its first long prefill is slower). `prelude` runs
    first and defines `connector_seconds`: None, or a function whose value each row
    reports as `connector_s`. `env` overrides the engine's variables (a TP engine's
    thread binding)."""
    warmup = [3 + i % 997 for i in range(max(len(p) for _, p in prompts))]
    code = ENGINE.format(model=str(model), kwargs=kwargs, prompts=prompts, warmup=warmup, prelude=prelude)
    # the same threads with and without us
    engine_env = {"VLLM_CPU_KVCACHE_SPACE": "2", **fair_cpu_binding(), **(env or {})}
    return run_vllm_script(code, env_extra=engine_env, timeout=600)["rows"]


def print_table(rows: list[dict]) -> None:
    cold = rows[0]["ttft_s"]
    print(f"\n{'request':32} {'TTFT ms':>9} {'vs no cache':>12} {'cached/prompt tokens':>22}")
    for r in rows:
        print(
            f"{r['request']:32} {r['ttft_s'] * 1e3:9.1f} {r['ttft_s'] / cold:12.3f} "
            f"{r['cached_tokens']:>10}/{r['prompt_tokens']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc-tokens", type=int, default=3000)
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the model and the disk cache here (default: a temp directory, removed at the end)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object instead of a table")
    args = parser.parse_args()
    say = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    with tempfile.TemporaryDirectory(prefix="lmcache_ext_demo_") as tmp:
        work = args.workdir or Path(tmp)
        say("building a random-weight Llama and its tokenizer locally (nothing is downloaded)")
        model = build_tiny_llama(work / "model", **dataclasses.asdict(BENCH))
        rng = random.Random(0)
        doc = [rng.randrange(3, BENCH.vocab) for _ in range(args.doc_tokens)]
        q1, q2, q3 = ([rng.randrange(3, BENCH.vocab) for _ in range(40)] for _ in range(3))
        disk = work / "kv"
        say(
            f"model: {BENCH.layers} layers, hidden {BENCH.hidden}; a document of {len(doc)} tokens with 40-token "
            f"questions; disk cache {disk if args.workdir else 'in a temp directory'}; vLLM's own prefix cache off, "
            "so every hit is ours"
        )
        say("1/3 an engine without the connector: the baseline")
        baseline = serve(model, [("no connector: doc+q1", doc + q1)], {})
        say("2/3 an engine with the connector: cold (computed and stored), again (host), another question")
        first = serve(
            model,
            [
                ("cold: doc+q1 (stored)", doc + q1),
                ("again: doc+q1 (host)", doc + q1),
                ("doc+q2 (shared prefix)", doc + q2),
            ],
            {"kv_transfer_config": connector_config(disk)},
        )
        say("3/3 a new engine with the connector on the same disk directory: a third question")
        restarted = serve(
            model, [("after restart: doc+q3 (disk)", doc + q3)], {"kv_transfer_config": connector_config(disk)}
        )
    rows = baseline + first + restarted
    same = baseline[0]["first_token"] == first[0]["first_token"] == first[1]["first_token"]
    if args.json:
        print(json.dumps({"rows": rows, "first_token_identical": same}))
        return
    print_table(rows)
    print(f"greedy first token identical with and without the cache: {same}")
    print("TTFT varies from run to run (by 10% or more on a shared machine); the hit counts do not.")


if __name__ == "__main__":
    main()
