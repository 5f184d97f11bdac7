"""Disaggregated prefill on one machine, as an operator sets it up: a prefill instance
(``kv_producer``) and a decode instance (``kv_consumer``) sharing one Redis or Valkey,
and a proxy in front (vLLM's, run as its own process). What the P/D tests, the
benchmark and ``scripts/pd_demo.sh`` start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from lmcache_ext.testing.remote_servers import free_port


def pd_transfer_config(role: str, remote_url: str, **extra: object) -> dict:
    """The kv-transfer-config of one side: its role, its own host pool, the shared store."""
    return {
        "kv_connector": "LMCacheConnectorV1Dynamic",
        "kv_connector_module_path": "lmcache_ext.integration.vllm",
        "kv_role": role,
        "kv_connector_extra_config": {"max_local_cpu_size": 0.5, "remote_url": remote_url, **extra},
    }


class Proxy:
    """One of vLLM's P/D proxies (`script`) in a subprocess on a free 127.0.0.1 port, in
    front of the prefill and decode servers on `prefill_port` and `decode_port`."""

    def __init__(self, script: Path, prefill_port: int, decode_port: int, log_path: Path | None = None) -> None:
        self.script = script
        self.prefill_port, self.decode_port = prefill_port, decode_port
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="pd_proxy_", suffix=".log")[1])
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Proxy:
        self.port = free_port()
        command = [
            sys.executable,
            str(self.script),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--prefiller-host",
            "127.0.0.1",
            "--prefiller-port",
            str(self.prefill_port),
            "--decoder-host",
            "127.0.0.1",
            "--decoder-port",
            str(self.decode_port),
        ]
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            env = {**os.environ, "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "unused")}
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the proxy exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the proxy did not listen within {timeout:.0f} s: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
