"""Where the remote tier lives: ``remote_url`` parsed into an endpoint, and shown masked.

Accepted forms (``valkey`` may stand for ``redis`` everywhere):

- ``redis://[user:password@]host[:port][/db]``, ``rediss://...`` with TLS;
- ``unix:///path/to/socket[?db=N]`` (a local server's socket; no TLS);
- ``redis-cluster://host:port,host:port,...``, ``rediss-cluster://...`` with TLS: any
  listed node is a seed, the client discovers the rest of the topology.

Parsing contacts nothing; it only checks the form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_PORT = 6379
SCHEMES = (
    "redis",
    "rediss",
    "valkey",
    "valkeys",
    "unix",
    "redis-cluster",
    "rediss-cluster",
    "valkey-cluster",
    "valkeys-cluster",
)
FORMS = (
    "'redis://[user:password@]host[:port][/db]' (or rediss:// for TLS; valkey:// and valkeys:// alike), "
    "'unix:///path/to/socket', or 'redis-cluster://host:port,host:port,...' (rediss-cluster:// for TLS)"
)


@dataclass(frozen=True)
class RemoteEndpoint:
    """A parsed remote_url. `hosts` is empty for a unix socket."""

    cluster: bool
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    unix_path: str | None
    db: int
    username: str | None
    password: str | None


def mask_password(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs, errors and reprs)."""
    return re.sub(r"(://[^/@:,]*:)[^/@]*@", r"\1***@", url)


def parse_remote_url(url: str) -> RemoteEndpoint:
    """Parse `url`; ValueError says what is wrong with it (never showing a password)."""
    scheme, sep, rest = url.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"the scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    if scheme == "unix":
        return _parse_unix(rest)
    cluster = scheme.endswith("-cluster")
    tls = scheme.removesuffix("-cluster") in ("rediss", "valkeys")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        userinfo, hostpart = "", rest
    hostpart, _, path = hostpart.partition("/")
    username, password = _credentials(userinfo)
    hosts = tuple(_host_port(h) for h in hostpart.split(","))
    if len(hosts) > 1 and not cluster:
        raise ValueError("several hosts are a cluster: use redis-cluster:// (or rediss-cluster://)")
    db = _db(path.split("?")[0])
    if cluster and db:
        raise ValueError(f"database {db} in a cluster URL: a cluster has database 0 only")
    return RemoteEndpoint(cluster, tls, hosts, None, db, username, password)


def _parse_unix(rest: str) -> RemoteEndpoint:
    path, _, query = rest.partition("?")
    if not path.startswith("/"):
        raise ValueError("a unix socket needs an absolute path: 'unix:///path/to/socket'")
    db_values = parse_qs(query).get("db", ["0"])
    return RemoteEndpoint(False, False, (), path, _db(db_values[0]), None, None)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _host_port(text: str) -> tuple[str, int]:
    parts = urlsplit("//" + text)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if not parts.hostname or parts.path or port == 0:
        raise ValueError(f"{text!r} is not host[:port] with a port in 1..65535")
    return parts.hostname, port or DEFAULT_PORT


def _db(text: str) -> int:
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"database {text!r} is not a number")
    return int(text)
