"""One host pool for the TP ranks that hold the same KV (`Geometry.replicas`: every rank
of an MLA cache, the ranks over which vLLM replicates a KV head).

Those ranks are processes of one engine. Each keeping its own copy of every chunk costs
`replicas` times the host memory (8 copies at TP=8), so the group's first rank creates
its arena shared and the others map it: one copy serves them all. A note in the
temporary directory names the arena. It is found by the engine's name, which holds
vLLM's engine and instance ids and the ranks' parent process (the engine core that
started them), and a rank attaches only to a live creator with its own parent and the
same pool, so two engines never meet. Whoever cannot share (another host, no memfd, a
first rank that never came) keeps a private pool, with a warning: sharing saves memory,
it never costs a request.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lmcache_ext.config import CacheConfig
from lmcache_ext.geometry import Geometry
from lmcache_ext.memory import HostSlotPool

logger = logging.getLogger(__name__)

RENDEZVOUS_WAIT_S = 60.0  # for a first rank's note; once it says it is creating, as long as the creator lives


@dataclass
class RankPool:
    """A rank's host pool, and whether it follows: maps the first replica's arena, whose
    rank fills the slots (gathers and tier reads) for the group."""

    pool: HostSlotPool
    follows: bool = False
    rendezvous: Path | None = None  # the note the first replica published, removed at close (or a minute on)

    def close(self) -> None:
        if self.rendezvous is not None:
            _forget(self.rendezvous)


def engine_name(engine_id: str, instance_id: str, data_parallel_rank: int, executor_backend: object, nodes: int) -> str:
    """The name under which the ranks of one engine find each other's pool: "" (each
    rank keeps its own) unless vLLM's multiprocessing executor started them on one host,
    as children of the same process."""
    if executor_backend != "mp" or nodes > 1:
        return ""
    ids = "-".join("".join(c if c.isalnum() or c in "-_." else "_" for c in part) for part in (engine_id, instance_id))
    return f"{ids}-dp{data_parallel_rank}-{os.getppid()}"


def open_rank_pool(config: CacheConfig, geometry: Geometry, rank: int, engine: str) -> RankPool:
    """The host pool of TP rank `rank`: shared with its replicas when `engine` names an
    engine whose ranks can share, else its own."""
    slot_bytes = geometry.slot_bytes
    if geometry.replicas == 1:
        return RankPool(HostSlotPool.for_config(config, slot_bytes))
    if not engine:
        logger.warning(
            "lmcache_ext worker %d: keeps a host pool of its own (its replicas' processes were not started by "
            "vLLM's multiprocessing executor on one host, so they cannot map one pool)",
            rank,
        )
        return RankPool(HostSlotPool.for_config(config, slot_bytes))
    path = rendezvous_path(engine, rank // geometry.replicas)
    pool_of = {
        "slot_bytes": slot_bytes,
        "num_slots": HostSlotPool.slots_for_config(config, slot_bytes),
        "namespace": geometry.namespace.fingerprint.hex(),
    }
    if rank % geometry.replicas == 0:
        return _create(config, slot_bytes, path, pool_of)
    return _attach(config, slot_bytes, path, rank, pool_of)


def rendezvous_path(engine: str, group: int) -> Path:
    return Path(tempfile.gettempdir()) / f"lmcache_ext-{engine}-replicas{group}.pool"


def _create(config: CacheConfig, slot_bytes: int, path: Path, pool_of: dict[str, object]) -> RankPool:
    """The first replica: a shared arena, published (first as being created: a large one
    takes a while); or its own, and a note saying why, so that the others stop waiting."""
    me = _identity()
    _publish(path, {**me, "creating": True})
    try:
        pool = HostSlotPool.for_config(config, slot_bytes, shared=True)
    except (RuntimeError, MemoryError) as e:
        logger.warning(
            "lmcache_ext: the host pool cannot be shared with this rank's replicas (%s): each keeps its own", e
        )
        _publish(path, {**me, "private": str(e)}, forget=True)
        return RankPool(HostSlotPool.for_config(config, slot_bytes), rendezvous=path)
    _publish(path, {**me, **pool_of, "fd": pool.shared_fd}, forget=True)
    return RankPool(pool, rendezvous=path)


def _attach(config: CacheConfig, slot_bytes: int, path: Path, rank: int, pool_of: dict[str, object]) -> RankPool:
    """A later replica: the first one's arena once it is published by a live creator of
    the same engine and pool; else (it keeps its own, or none came in RENDEZVOUS_WAIT_S)
    a pool of its own."""
    deadline = time.monotonic() + RENDEZVOUS_WAIT_S
    why = f"no first replica published its pool in {RENDEZVOUS_WAIT_S:.0f} s ({path})"
    while time.monotonic() < deadline:
        note = _read(path)
        if note is None or not _is_sibling(note):
            time.sleep(0.05)
            continue
        if "private" in note:
            why = f"the first replica keeps its own: {note['private']}"
            break
        if note.get("creating"):
            deadline = time.monotonic() + RENDEZVOUS_WAIT_S  # its creator lives: mapping a large arena takes time
            time.sleep(0.05)
            continue
        if {key: note.get(key) for key in pool_of} != pool_of:
            why = f"the first replica's pool {_shape(note)} is not this rank's {_shape(pool_of)}"
            break
        try:
            pool = HostSlotPool.for_config(config, slot_bytes, attach=f"/proc/{note['pid']}/fd/{note['fd']}")
        except (RuntimeError, ValueError, MemoryError) as e:
            why = str(e)
            break
        return RankPool(pool, follows=True)
    logger.warning("lmcache_ext worker %d: keeps a host pool of its own: %s", rank, why)
    return RankPool(HostSlotPool.for_config(config, slot_bytes))


def _publish(path: Path, note: dict[str, object], forget: bool = False) -> None:
    """Write the note whole or not at all (a reader never sees half of it). `forget`:
    past RENDEZVOUS_WAIT_S every replica has read it, so it goes then, even where the
    engine never closes its workers."""
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.")
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(note))
    os.replace(partial, path)
    if forget:
        timer = threading.Timer(RENDEZVOUS_WAIT_S, _forget, args=(path,))
        timer.daemon = True
        timer.start()


def _forget(path: Path) -> None:
    """Remove the note if it is this process's (never one another run put there since)."""
    note = _read(path)
    if note is not None and note.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def _identity() -> dict[str, int]:
    """This process as a note names its creator."""
    pid = os.getpid()
    return {"pid": pid, "start": _start_time(pid), "parent": os.getppid()}


def _is_sibling(note: dict) -> bool:
    """The note's creator still runs (not a crashed run's note under a reused pid) and is
    a child of this rank's parent: a rank of the same engine."""
    try:
        pid = int(note["pid"])
        return note["parent"] == os.getppid() and note["start"] == _start_time(pid)
    except (KeyError, TypeError, ValueError, OSError):
        return False


def _shape(note: dict) -> str:
    return f"({note.get('num_slots')} slots of {note.get('slot_bytes')} bytes, namespace {note.get('namespace')})"


def _start_time(pid: int) -> int:
    """When process `pid` started, in clock ticks since boot (/proc/<pid>/stat field 22)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])
