"""The remote tier against its client's own SET/GET loop of the same bytes, in one run,
on a local server that this script starts (redis-server, or --server for another).

One JSON line per figure:
- store and load GB/s of 1, 4 and 16 MiB chunks through `RemoteTier` (records with a
  header and checksum, split into parts, loads straight into the host slot) vs
  valkey-glide's plain `set` / `get` of the same bytes (bar >= 0.7);
- the same with an integrity key (HMAC-SHA256 of every record);
- the lookup latency of 32 chunks x TP ranks (one pipelined probe);
- with --clients, the client candidates' SET / GET of the same values: valkey-glide
  (sync) and redis-py with hiredis, the numbers behind the choice of client.
Run: python benchmarks/remote.py [--reps 9] [--clients] [--server redis://host:port]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import glide_sync as glide
import torch

from engine import emit, median_time
from lmcache_ext.config import CacheConfig
from lmcache_ext.remote_url import parse_remote_url
from lmcache_ext.testing.remote_servers import Server, redis_binary
from lmcache_ext.tiers.remote import RemotePresence, RemoteStore, RemoteTier

SIZES_MIB = (1, 4, 16)


def median_s(fn: Callable[[], object], reps: int) -> float:
    """The median time of `fn` after one warm-up call."""
    fn()
    return median_time(fn, reps)


def raw_client(url: str) -> glide.GlideClient:
    ep = parse_remote_url(url)
    host, port = ep.hosts[0]
    return glide.GlideClient.create(
        glide.GlideClientConfiguration([glide.NodeAddress(host, port)], request_timeout=10_000)
    )


def tier_vs_client(url: str, reps: int, integrity: str | None) -> None:
    client = raw_client(url)
    cfg = CacheConfig(remote_url=url, remote_timeout_ms=10_000, remote_integrity_key=integrity)
    store = RemoteStore(cfg, bytes(16))
    tier = RemoteTier(store, rank=0)
    for mib in SIZES_MIB:
        n = mib << 20
        slot = torch.randint(0, 256, (n,), dtype=torch.uint8)
        value = slot.numpy().tobytes()
        key = os.urandom(16)
        t_raw_set = median_s(lambda: client.set(b"raw", value), reps)
        t_raw_get = median_s(lambda: client.get(b"raw"), reps)
        t_store = median_s(lambda: tier.submit_write(key, slot).result(), reps)
        out = torch.empty_like(slot)
        t_load = median_s(lambda: tier.read_into(key, out), reps)
        assert torch.equal(out, slot)
        emit(
            {
                "figure": "remote tier vs client",
                "integrity": bool(integrity),
                "value_mib": mib,
                "store_gbps": round(n / t_store / 1e9, 2),
                "client_set_gbps": round(n / t_raw_set / 1e9, 2),
                "store_ratio": round(t_raw_set / t_store, 3),
                "load_gbps": round(n / t_load / 1e9, 2),
                "client_get_gbps": round(n / t_raw_get / 1e9, 2),
                "load_ratio": round(t_raw_get / t_load, 3),
            }
        )
    tier.close()
    store.close()
    client.close()


def lookup_latency(url: str, reps: int) -> None:
    cfg = CacheConfig(remote_url=url, remote_timeout_ms=10_000)
    store = RemoteStore(cfg, bytes(16))
    for tp in (1, 2, 8):

        def shards(key: bytes, tp: int = tp) -> list[tuple[bytes, int]]:
            return [(key + bytes([r]), r) for r in range(tp)]

        presence = RemotePresence(store, shards)
        keys = [os.urandom(16) for _ in range(32)]
        t = median_s(lambda: presence.probe(keys), reps)
        emit({"figure": "remote lookup", "chunks": 32, "tp_ranks": tp, "keys": 32 * tp, "ms": round(t * 1e3, 3)})
        presence.close()
    store.close()


def clients(url: str, reps: int) -> None:
    import redis

    ep = parse_remote_url(url)
    host, port = ep.hosts[0]
    candidates: dict[str, Any] = {
        "valkey-glide-sync": raw_client(url),
        "redis-py+hiredis": redis.Redis(host=host, port=port),
    }
    for mib in SIZES_MIB:
        value = os.urandom(mib << 20)
        for name, client in candidates.items():
            t_set = median_s(lambda: client.set(b"candidate", value), reps)
            t_get = median_s(lambda: client.get(b"candidate"), reps)
            emit(
                {
                    "figure": "client",
                    "client": name,
                    "value_mib": mib,
                    "set_gbps": round(len(value) / t_set / 1e9, 2),
                    "get_gbps": round(len(value) / t_get / 1e9, 2),
                }
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--clients", action="store_true", help="also compare the client libraries")
    parser.add_argument("--server", help="a redis:// URL to use instead of starting redis-server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if args.server is None:
            binary = redis_binary()
            if binary is None:
                sys.exit("redis-server is not installed: apt-get install redis-server, or pass --server")
            server = Server(binary, Path(tmp)).start()
        url = args.server if server is None else server.url
        try:
            tier_vs_client(url, args.reps, None)
            tier_vs_client(url, args.reps, "benchmark-integrity-key")
            lookup_latency(url, max(args.reps, 20))
            if args.clients:
                clients(url, args.reps)
        finally:
            if server is not None:
                server.kill()


if __name__ == "__main__":
    main()
