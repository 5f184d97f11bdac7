"""One host pool for the TP ranks that hold the same KV (an MLA cache, replicated KV
heads): how the ranks of one engine find the first replica's shared arena, and when a
rank keeps a pool of its own."""

from __future__ import annotations

import json
import logging
import os
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
    assert not open_rank_pool(CONFIG, g, 1, "").pool.is_shared  # no engine name: a pool of its own
    assert not open_rank_pool(CONFIG, geometry(2, 1), 0, engine).pool.is_shared  # no replicas
    for p in pools:
        p.close()
    assert not rendezvous_path(engine, 0).exists() and not rendezvous_path(engine, 1).exists()


def test_a_replica_keeps_its_own_pool_when_its_first_rank_cannot_share_or_never_comes(monkeypatch, caplog):
    g = geometry(2, 2)
    engine = uuid.uuid4().hex
    rendezvous_path(engine, 0).write_text(json.dumps({"private": "memfd_create failed: ENOSYS"}))
    with caplog.at_level(logging.WARNING):
        pool = open_rank_pool(CONFIG, g, 1, engine)
    assert not pool.follows and not pool.pool.is_shared
    assert "the first replica keeps its own: memfd_create failed: ENOSYS" in caplog.text
    rendezvous_path(engine, 0).unlink()

    monkeypatch.setattr(replica_pool, "RENDEZVOUS_WAIT_S", 0.3)
    stale = uuid.uuid4().hex  # a crashed run's note: its pid now names another process
    owner = HostSlotPool(5000, 4, pin="never", shared=True)
    note = {"pid": os.getpid(), "start": 1, "parent": os.getppid(), "fd": owner.shared_fd}
    rendezvous_path(stale, 0).write_text(json.dumps(note))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pool = open_rank_pool(CONFIG, g, 1, stale)
    assert not pool.follows and not pool.pool.is_shared
    assert "no first replica published its pool in 0 s" in caplog.text
    rendezvous_path(stale, 0).unlink()


def test_only_the_multiprocessing_executor_on_one_host_names_an_engine():
    assert engine_name("a/b c", 1, "mp", 1) == f"a_b_c-dp1-{os.getppid()}"
    assert engine_name("e", 0, "ray", 1) == "" and engine_name("e", 0, "mp", 2) == ""


def test_a_published_note_goes_once_every_replica_had_the_time_to_read_it(monkeypatch):
    monkeypatch.setattr(replica_pool, "RENDEZVOUS_WAIT_S", 0.1)
    engine = uuid.uuid4().hex
    owner = open_rank_pool(CONFIG, geometry(2, 2), 0, engine)
    deadline = time.monotonic() + 30
    while rendezvous_path(engine, 0).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not rendezvous_path(engine, 0).exists() and owner.pool.is_shared  # the arena stays
