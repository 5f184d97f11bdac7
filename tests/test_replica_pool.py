"""One host pool for the TP ranks that hold the same KV (an MLA cache, replicated KV
heads): how the ranks of one engine find the first replica's shared arena, and when a
rank keeps a pool of its own."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid

from lmcache_ext import replica_pool
from lmcache_ext.config import CacheConfig
from lmcache_ext.geometry import Geometry
from lmcache_ext.keys import Namespace
from lmcache_ext.memory import HostSlotPool
from lmcache_ext.replica_pool import engine_name, open_rank_pool, rendezvous_path


def geometry(tp: int, replicas: int) -> Geometry:
    ns = Namespace(
        model="m", revision="", dtype="bfloat16", layout="LBHNC", block_size=16, page_bytes=2048,
        num_layers=2, tp_size=tp // replicas, tp_rank=0, chunk_size=64,
    )  # fmt: skip
    return Geometry(ns, 16, 4, 2, 2048, tp, replicas=replicas)


CONFIG = CacheConfig(chunk_size=64, max_local_cpu_size=0.001)


def test_replicas_of_one_engine_share_the_first_ranks_pool_and_other_groups_and_engines_do_not():
    engine = uuid.uuid4().hex
    g = geometry(4, 2)
    pools = [open_rank_pool(CONFIG, g, rank, engine) for rank in range(4)]
    assert [p.follows for p in pools] == [False, True, False, True]
    assert all(p.pool.is_shared for p in pools)
    pools[0].pool.view(0)[0], pools[2].pool.view(0)[0] = 1, 2
    assert [p.pool.view(0)[0].item() for p in pools] == [1, 1, 2, 2]
    other = open_rank_pool(CONFIG, g, 0, uuid.uuid4().hex)
    assert other.pool.view(0)[0] == 0
    assert not open_rank_pool(CONFIG, geometry(2, 1), 0, engine).pool.is_shared  # no replicas
    for p in pools:
        p.close()
    assert not rendezvous_path(engine, 0).exists() and not rendezvous_path(engine, 1).exists()


def test_a_replica_keeps_its_own_pool_when_its_first_rank_cannot_share_or_no_engine_is_named(caplog):
    g = geometry(2, 2)
    engine = uuid.uuid4().hex
    private = {**replica_pool._identity(), "private": "memfd_create failed: ENOSYS"}
    rendezvous_path(engine, 0).write_text(json.dumps(private))
    with caplog.at_level(logging.WARNING):
        pool = open_rank_pool(CONFIG, g, 1, engine)
    assert not pool.follows and not pool.pool.is_shared
    assert "the first replica keeps its own: memfd_create failed: ENOSYS" in caplog.text
    rendezvous_path(engine, 0).unlink()

    caplog.clear()
    with caplog.at_level(logging.WARNING):  # no engine name: its replicas cannot have started beside it
        pool = open_rank_pool(CONFIG, g, 1, "")
    assert not pool.pool.is_shared and "were not started by vLLM's multiprocessing executor" in caplog.text


def test_only_the_multiprocessing_executor_on_one_host_names_an_engine():
    assert engine_name("a/b c", "x1", 1, "mp", 1) == f"a_b_c-x1-dp1-{os.getppid()}"
    assert engine_name("e", "i", 0, "ray", 1) == "" and engine_name("e", "i", 0, "mp", 2) == ""


def note_of(engine: str) -> dict:
    return json.loads(rendezvous_path(engine, 0).read_text())


def test_a_replica_attaches_only_to_a_live_sibling_with_the_same_pool(monkeypatch, caplog):
    monkeypatch.setattr(replica_pool, "RENDEZVOUS_WAIT_S", 0.3)
    engine = uuid.uuid4().hex
    first = open_rank_pool(CONFIG, geometry(2, 2), 0, engine)
    note = note_of(engine)
    for name, changed in (("another parent", {"parent": note["parent"] + 1}), ("no creator", {"start": 1})):
        rendezvous_path(engine, 0).write_text(json.dumps({**note, **changed}))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            pool = open_rank_pool(CONFIG, geometry(2, 2), 1, engine)
        assert not pool.follows, name
        assert "no first replica published its pool" in caplog.text, name
    rendezvous_path(engine, 0).write_text(json.dumps({**note, "namespace": "00" * 16}))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pool = open_rank_pool(CONFIG, geometry(2, 2), 1, engine)
    assert not pool.follows and "is not this rank's" in caplog.text and "namespace 0000" in caplog.text
    rendezvous_path(engine, 0).write_text(json.dumps(note))
    assert open_rank_pool(CONFIG, geometry(2, 2), 1, engine).follows
    first.close()


def test_a_replica_waits_while_its_first_rank_creates_a_large_pool(monkeypatch):
    monkeypatch.setattr(replica_pool, "RENDEZVOUS_WAIT_S", 0.2)
    engine = uuid.uuid4().hex
    creating = {**replica_pool._identity(), "creating": True}
    rendezvous_path(engine, 0).write_text(json.dumps(creating))
    owner = HostSlotPool.for_config(CONFIG, geometry(2, 2).slot_bytes, shared=True)
    done = {
        **creating,
        "creating": False,
        "slot_bytes": owner.slot_bytes,
        "num_slots": owner.num_slots,
        "namespace": geometry(2, 2).namespace.fingerprint.hex(),
        "fd": owner.shared_fd,
    }
    later = threading.Timer(1.0, lambda: rendezvous_path(engine, 0).write_text(json.dumps(done)))
    later.start()  # five times the wait for a note, after it said it was creating
    pool = open_rank_pool(CONFIG, geometry(2, 2), 1, engine)
    later.join()
    assert pool.follows
    owner.view(0)[0] = 3
    assert pool.pool.view(0)[0] == 3
    rendezvous_path(engine, 0).unlink()


def test_a_published_note_goes_once_every_replica_had_the_time_to_read_it(monkeypatch):
    monkeypatch.setattr(replica_pool, "RENDEZVOUS_WAIT_S", 0.1)
    engine = uuid.uuid4().hex
    owner = open_rank_pool(CONFIG, geometry(2, 2), 0, engine)
    deadline = time.monotonic() + 30
    while rendezvous_path(engine, 0).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not rendezvous_path(engine, 0).exists() and owner.pool.is_shared  # the arena stays


def test_a_rank_removes_only_its_own_note():
    engine = uuid.uuid4().hex
    first = open_rank_pool(CONFIG, geometry(2, 2), 0, engine)
    others = {**note_of(engine), "pid": os.getpid() + 1}  # a later run's note under the same name
    rendezvous_path(engine, 0).write_text(json.dumps(others))
    first.close()
    assert note_of(engine) == others
    rendezvous_path(engine, 0).unlink()
