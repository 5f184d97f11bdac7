"""The remote tier on real servers: two CacheEngines with their own host pools and no
shared disk share chunks through Redis or Valkey byte for byte; every fault costs hits
or a store only; TLS with an ACL user; secrets never logged; namespaces and integrity
keep foreign records out."""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip(
    "glide_sync", reason="valkey-glide-sync is not installed: the remote tier needs it (lmcache_ext[remote])"
)

import torch

from lmcache_ext.config import GB, CacheConfig
from lmcache_ext.engine import CacheEngine
from lmcache_ext.keys import chunk_keys
from lmcache_ext.testing.kv_layouts import make_layers, page_view
from lmcache_ext.testing.remote_servers import free_port
from lmcache_ext.tiers import remote
from lmcache_ext.tiers.remote import RemoteConfigError, RemoteStore

LAYERS, BLOCKS, BLOCK, CHUNK = 2, 64, 16, 64  # 4 blocks a chunk
HEADS, WIDTH = 2, 32  # 2 KiB pages (bf16): a chunk is 16 KiB
CHUNK_BYTES = LAYERS * (CHUNK // BLOCK) * HEADS * BLOCK * WIDTH * 2


def cache(seed: int) -> list[torch.Tensor]:
    return make_layers("LBHNC", LAYERS, BLOCKS, HEADS, BLOCK, WIDTH, torch.bfloat16, seed=seed)


def config(url: str, **kw: object) -> CacheConfig:
    settings = {
        "chunk_size": CHUNK,
        "max_local_cpu_size": 64 * CHUNK_BYTES / GB,
        "remote_url": url,
        "remote_timeout_ms": 300,
        "remote_max_value_bytes": 65536,
        **kw,
    }
    return CacheConfig(**settings)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(n)]


def same_pages(a: list[torch.Tensor], a_ids: list[int], b: list[torch.Tensor], b_ids: list[int]) -> bool:
    return all(torch.equal(page_view(x)[a_ids], page_view(y)[b_ids]) for x, y in zip(a, b))


def engine(url: str, seed: int, **kw: object) -> CacheEngine:
    return CacheEngine(config(url, **kw), cache(seed), BLOCK, model="tiny")


def store_then_share(url: str, **kw: object) -> tuple[CacheEngine, CacheEngine, list[int]]:
    """Engine a stores 3 chunks and flushes; engine b (its own empty host pool) asks."""
    tokens = prompt(3 * CHUNK, seed=1)
    a, b = engine(url, 1, **kw), engine(url, 2, **kw)
    assert a.store(tokens, list(range(12))) == 3 * CHUNK
    a.flush()
    return a, b, tokens


def test_two_engines_share_chunks_byte_for_byte(server):
    a, b, tokens = store_then_share(server.url)
    with a, b:
        assert a.stats()["remote_writes_ok"] == 3
        assert b.retrieve(tokens, list(range(20, 32))) == 3 * CHUNK  # fetched into host slots, then loaded
        assert same_pages(b._kv.tensors, list(range(20, 32)), a._kv.tensors, list(range(12)))
        stats = b.stats()
        assert stats["loaded_tokens_remote"] == 3 * CHUNK and stats["remote_reads_hit"] == 3
        assert b.lookup(tokens) == 3 * CHUNK
        assert b.retrieve(tokens, list(range(40, 52))) == 3 * CHUNK  # promoted: now a host hit
        assert b.stats()["loaded_tokens_host"] == 3 * CHUNK and b.stats()["remote_reads_hit"] == 3


def test_chunks_larger_than_a_value_are_split_into_parts_read_all_or_nothing(redis):
    """16 layers: 128 KiB chunks, stored as a manifest and two 64 KiB parts each."""
    wide = lambda seed: make_layers("LBHNC", 16, BLOCKS, HEADS, BLOCK, WIDTH, torch.bfloat16, seed=seed)  # noqa: E731
    tokens = prompt(2 * CHUNK, seed=5)
    with (
        CacheEngine(config(redis.url), wide(5), BLOCK, model="wide") as writer,
        CacheEngine(config(redis.url), wide(6), BLOCK, model="wide") as reader,
    ):
        writer.store(tokens, list(range(8)))
        writer.flush()
        keys = redis.cli("KEYS", "*").split()
        manifests = sorted(k for k in keys if k.endswith("}"))
        assert len(manifests) == 2 and sorted(k for k in keys if not k.endswith("}")) == sorted(
            f"{m}:{i}" for m in manifests for i in (0, 1)
        )
        assert reader.retrieve(tokens[:CHUNK], list(range(20, 24))) == CHUNK
        assert same_pages(reader._kv.tensors, list(range(20, 24)), writer._kv.tensors, list(range(4)))
        for manifest in manifests:
            redis.cli("DEL", manifest + ":1")
        assert reader.lookup(tokens) == CHUNK  # chunk 0 is in its host tier now; chunk 1's fetch misses a part
        assert reader.retrieve(tokens, list(range(30, 38))) == CHUNK
        assert reader.stats()["remote_reads_bad"] == {"missing_part": 1}


def test_a_server_down_at_start_costs_hits_until_it_comes_up(redis, caplog):
    url = f"redis://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING):
        started = time.monotonic()
        down = engine(url, 1)
        assert time.monotonic() - started < 5
    with down:
        tokens = prompt(2 * CHUNK, seed=2)
        assert down.store(tokens, list(range(8))) == 2 * CHUNK  # the host tier still works
        down.flush()
        assert down.stats()["remote_writes_skipped"] == 2
        assert caplog.text.count("is not answering") == 2  # once per connection: the planner's probe, the I/O
        assert engine(url, 9).lookup(tokens) == 0


def test_a_server_killed_mid_run_then_restarted_costs_hits_and_comes_back(redis, caplog):
    a, b, tokens = store_then_share(redis.url)
    with a, b, caplog.at_level(logging.INFO):
        redis.kill()
        started = time.monotonic()
        assert b.lookup(tokens) == 0 and b.retrieve(tokens, list(range(20, 32))) == 0
        more = prompt(CHUNK, seed=3)
        assert a.store(more, list(range(40, 44))) == CHUNK
        a.flush()
        assert time.monotonic() - started < 5  # every call gave up within its timeout
        assert "is not answering" in caplog.text
        redis.restart()  # an empty server: the tier reconnects by itself
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            again = prompt(CHUNK, seed=int(time.monotonic() * 1000))
            a.store(again, list(range(48, 52)))
            a.flush()
            if b.lookup(again) == CHUNK:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the remote tier did not come back within 40 s of the restart")
        assert "answers again" in caplog.text
        assert a.stats()["pinned_slots"] == 0 and b.stats()["pinned_slots"] == 0


def test_a_slow_server_times_out_without_hanging_the_caller(redis):
    a, b, tokens = store_then_share(redis.url)
    with a, b:
        redis.pause(2.0)
        started = time.monotonic()
        assert b.retrieve(tokens, list(range(20, 32))) == 0
        assert time.monotonic() - started < 1.5
        assert b.stats()["pinned_slots"] == 0


def test_faults_of_calls_in_flight_together_back_off_once_and_later_faults_double_it(monkeypatch):
    """One slow moment of the server times out every thread's call at once: that is one
    fault, not one per thread (four threads used to back off 0.5 + 1 + 2 + 4 s)."""
    clock = [100.0]
    monkeypatch.setattr(remote.time, "monotonic", lambda: clock[0])
    health = remote.Health("redis://127.0.0.1:1")
    for _ in range(4):
        health.failed(TimeoutError("timed out"))
        clock[0] += 0.01
    assert not health.usable()
    clock[0] = 100.0 + remote.BACKOFF_FIRST_S
    assert health.usable()
    health.failed(TimeoutError("timed out"))  # the first call after the backoff fails too
    clock[0] += 2 * remote.BACKOFF_FIRST_S - 0.01
    assert not health.usable()
    clock[0] += 0.01
    assert health.usable()
    health.succeeded()
    health.failed(TimeoutError("timed out"))  # a new burst starts from the first backoff
    clock[0] += remote.BACKOFF_FIRST_S
    assert health.usable()


def test_a_full_server_fails_stores_only_with_one_warning(redis, caplog):
    redis.cli("CONFIG", "SET", "maxmemory", "1mb")
    redis.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
    redis.cli("DEBUG", "POPULATE", "2000", "ballast", "1000")  # 2 MB of other data
    with engine(redis.url, 1) as a:
        tokens = prompt(2 * CHUNK, seed=4)
        assert a.store(tokens, list(range(8))) == 2 * CHUNK
        a.flush()
        assert a.stats()["remote_writes_failed"] == {"full": 2}
        assert a.stats()["failures_remote_write"] == 2
        assert a.stats()["pinned_slots"] == 0
        assert a.retrieve(tokens, list(range(20, 28))) == 2 * CHUNK  # from its host tier
    burst = [r.getMessage() for r in caplog.records if "remote writes to" in r.getMessage()]
    assert len(burst) == 1 and "failing (full: " in burst[0]  # two faults, one line


def test_an_evicting_server_turns_old_chunks_into_misses(redis):
    """allkeys-lru samples keys, so which old record goes first is not exact: most of
    them miss, and whatever still loads is byte-exact."""
    redis.cli("CONFIG", "SET", "maxmemory", "2mb")
    redis.cli("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    old = [prompt(CHUNK, seed=10 + i) for i in range(10)]
    with engine(redis.url, 1) as a, engine(redis.url, 2) as b:
        for i, tokens in enumerate(old):
            a.store(tokens, list(range(4 * i, 4 * i + 4)))
        a.flush()
        for i in range(200):  # 3.2 MiB of later chunks push the old ones out
            a.store(prompt(CHUNK, seed=100 + i), list(range(40, 44)))
            a.flush()
        loaded = [b.retrieve(tokens, list(range(48, 52))) for tokens in old]
        assert loaded.count(0) >= 8
        for i, got in enumerate(loaded):
            if got:
                assert b.retrieve(old[i], list(range(52, 56))) == CHUNK
                assert same_pages(b._kv.tensors, list(range(52, 56)), a._kv.tensors, list(range(4 * i, 4 * i + 4)))
        assert b.stats()["pinned_slots"] == 0


@pytest.mark.parametrize("damage", ["delete", "truncate", "corrupt", "foreign"])
def test_a_value_damaged_before_its_fetch_is_a_miss(redis, damage):
    a, b, tokens = store_then_share(redis.url)
    with a, b:
        manifest = sorted(k for k in redis.cli("KEYS", "*").split() if k.endswith("}"))[0]
        part = manifest + ":0"
        if damage == "delete":
            redis.cli("DEL", manifest)
        elif damage == "truncate":
            redis.cli("EVAL", "redis.call('SET', KEYS[1], string.sub(redis.call('GET', KEYS[1]), 1, 100))", "1", part)
        elif damage == "corrupt":
            redis.cli("SETRANGE", part, "7", "X")
        else:
            other = sorted(k for k in redis.cli("KEYS", "*").split() if k.endswith("}"))[1]
            redis.cli("COPY", other, manifest, "REPLACE")
        got = b.retrieve(tokens, list(range(20, 32)))
        assert got < 3 * CHUNK
        assert same_pages(b._kv.tensors, list(range(20, 20 + got // BLOCK)), a._kv.tensors, list(range(got // BLOCK)))
        assert b.stats()["pinned_slots"] == 0


def test_tls_with_an_acl_user_and_the_password_never_shown(tls_redis, caplog):
    node, certs = tls_redis
    secret = "kv-secret-pw"
    url = f"rediss://kvuser:{secret}@127.0.0.1:{node.port}"
    with caplog.at_level(logging.DEBUG):
        a, b, tokens = store_then_share(url, remote_tls_ca_file=str(certs["ca"]))
        with a, b:
            assert b.retrieve(tokens, list(range(20, 32))) == 3 * CHUNK
            assert same_pages(b._kv.tensors, list(range(20, 32)), a._kv.tensors, list(range(12)))
            assert secret not in repr(a._config) and secret not in str(a._config.to_dict())
        with pytest.raises(RemoteConfigError, match=r"authentication refused") as wrong:
            engine(f"rediss://kvuser:not-the-{secret}@127.0.0.1:{node.port}", 3, remote_tls_ca_file=str(certs["ca"]))
        with pytest.raises(RemoteConfigError, match=r"TLS verification failed") as untrusted:
            engine(url, 4)
        env_password = engine(
            f"rediss://kvuser@127.0.0.1:{node.port}", 5, remote_password=secret, remote_tls_ca_file=str(certs["ca"])
        )
        assert env_password.lookup(tokens) == 3 * CHUNK
        env_password.close()
    for shown in (caplog.text, str(wrong.value), str(untrusted.value)):
        assert secret not in shown
    assert "kvuser:***@" in str(untrusted.value)


def test_two_namespaces_on_one_server_never_see_each_other(redis):
    tokens = prompt(2 * CHUNK, seed=6)
    with engine(redis.url, 1) as a, CacheEngine(config(redis.url), cache(2), BLOCK, model="another") as b:
        a.store(tokens, list(range(8)))
        a.flush()
        assert b.lookup(tokens) == 0
    with CacheEngine(config(redis.url, remote_key_prefix="other:"), cache(3), BLOCK, model="tiny") as c:
        assert c.lookup(tokens) == 0


def test_with_an_integrity_key_a_record_written_without_it_is_a_miss(redis):
    key = "integrity-secret-0123456789"
    tokens = prompt(2 * CHUNK, seed=7)
    with engine(redis.url, 1) as forger:  # reaches the store, lacks the secret
        forger.store(tokens, list(range(8)))
        forger.flush()
    with engine(redis.url, 2, remote_integrity_key=key) as guarded:
        assert guarded.retrieve(tokens, list(range(20, 28))) == 0
        assert guarded.stats()["remote_reads_bad"] == {"untagged": 2}
    redis.cli("FLUSHALL")
    with engine(redis.url, 3, remote_integrity_key=key) as writer:
        writer.store(tokens, list(range(8)))
        writer.flush()
    with engine(redis.url, 4, remote_integrity_key="another-secret-0123456") as other:
        assert other.retrieve(tokens, list(range(20, 28))) == 0
        assert other.stats()["remote_reads_bad"] == {"bad_tag": 2}
    with engine(redis.url, 5, remote_integrity_key=key) as reader:
        assert reader.retrieve(tokens, list(range(20, 28))) == 2 * CHUNK


def test_a_cluster_shares_chunks_and_a_dead_node_costs_only_its_keys(cluster):
    tokens = [prompt(CHUNK, seed=200 + i) for i in range(12)]
    with engine(cluster.url, 1) as a:
        for i, t in enumerate(tokens):
            assert a.store(t, list(range(4 * (i % 16), 4 * (i % 16) + 4))) == CHUNK
        a.flush()
        assert a.stats()["remote_writes_ok"] == 12
    with engine(cluster.url, 2) as b:
        victim = cluster.nodes[0]
        victim.kill()
        hits = [b.retrieve(t, list(range(40, 44))) for t in tokens]
        assert 0 < hits.count(CHUNK) < 12  # the chunks on the live nodes still hit
        assert b.stats()["pinned_slots"] == 0
        victim.start()


def test_writes_beyond_the_backlog_are_skipped_never_queued(redis):
    with engine(redis.url, 1, remote_write_backlog=1) as a:
        redis.pause(1.0)
        for i in range(4):
            a.store(prompt(CHUNK, seed=300 + i), list(range(4 * i, 4 * i + 4)))
        a.flush()
        stats = a.stats()
        assert stats["remote_writes_skipped_backlog"] >= 2 and stats["pinned_slots"] == 0


def test_misconfiguration_fails_at_start_and_unreachability_does_not(tmp_path):
    cfg = config(f"redis://127.0.0.1:{free_port()}")
    store = RemoteStore(cfg, bytes(16))  # unreachable: no error
    store.close()
    assert threading.active_count() < 200
    with pytest.raises(ValueError, match=r"remote_tls_cert_file .* is set without its pair"):
        config("rediss://127.0.0.1:1", remote_tls_cert_file=str(Path(__file__)))


def test_chunk_keys_name_the_records(redis):
    tokens = prompt(CHUNK, seed=8)
    with engine(redis.url, 1) as a:
        a.store(tokens, list(range(4)))
        a.flush()
        key = chunk_keys(tokens, a.namespace)[0].hex()
        names = redis.cli("KEYS", "*").split()
        assert any(n.startswith("lmcache_ext:") and n.endswith(f":0:{{{key}}}") for n in names)
