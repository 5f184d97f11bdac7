"""One host pool for the TP ranks that hold the same KV (`Geometry.replicas`: every rank
of an MLA cache, the ranks over which vLLM replicates a KV head).

Those ranks are processes of one engine. Each keeping its own copy of every chunk costs
`replicas` times the host memory (8 copies at TP=8), so the group's first rank creates
its arena shared and the others map it: one copy serves them all. A rendezvous file in
the temporary directory names the arena; it is found by the engine's name, which holds
the ranks' parent process (the engine core that started them), so two engines never
meet. Whoever cannot share (another host, no memfd, a first rank that never came) keeps
a private pool, with a warning: sharing saves memory, it never costs a request.
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

RENDEZVOUS_WAIT_S = 60.0  # a first rank maps and faults in its whole arena first: seconds for a large pool


@dataclass
class RankPool:
    """A rank's host pool, and whether it follows: maps the first replica's arena, whose
    rank fills the slots (gathers and tier reads) for the group."""

    pool: HostSlotPool
    follows: bool = False
    rendezvous: Path | None = None  # the note the first replica published, removed at close (or a minute on)

    def close(self) -> None:
        if self.rendezvous is not None:
            self.rendezvous.unlink(missing_ok=True)


def engine_name(engine_id: str, data_parallel_rank: int, executor_backend: object, nodes: int) -> str:
    """The name under which the ranks of one engine find each other's pool: "" (each
    rank keeps its own) unless vLLM's multiprocessing executor started them on one host,
    as children of the same process."""
    if executor_backend != "mp" or nodes > 1:
        return ""
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in engine_id)
    return f"{safe_id}-dp{data_parallel_rank}-{os.getppid()}"


def open_rank_pool(config: CacheConfig, geometry: Geometry, rank: int, engine: str) -> RankPool:
    """The host pool of TP rank `rank`: shared with its replicas when `engine` names an
    engine whose ranks can share, else its own."""
    slot_bytes = geometry.slot_bytes
    if geometry.replicas == 1 or not engine:
        return RankPool(HostSlotPool.for_config(config, slot_bytes))
    path = rendezvous_path(engine, rank // geometry.replicas)
    if rank % geometry.replicas == 0:
        return _create(config, slot_bytes, path)
    return _attach(config, slot_bytes, path, rank)


def rendezvous_path(engine: str, group: int) -> Path:
    return Path(tempfile.gettempdir()) / f"lmcache_ext-{engine}-replicas{group}.pool"


def _create(config: CacheConfig, slot_bytes: int, path: Path) -> RankPool:
    """The first replica: a shared arena, published; or its own, and a note saying why,
    so that the others stop waiting."""
    try:
        pool = HostSlotPool.for_config(config, slot_bytes, shared=True)
    except (RuntimeError, MemoryError) as e:
        logger.warning(
            "lmcache_ext: the host pool cannot be shared with this rank's replicas (%s): each keeps its own", e
        )
        _publish(path, {"private": str(e)})
        return RankPool(HostSlotPool.for_config(config, slot_bytes), rendezvous=path)
    pid = os.getpid()
    _publish(path, {"pid": pid, "start": _start_time(pid), "parent": os.getppid(), "fd": pool.shared_fd})
    return RankPool(pool, rendezvous=path)


def _attach(config: CacheConfig, slot_bytes: int, path: Path, rank: int) -> RankPool:
    """A later replica: the first one's arena once it is published and its creator lives,
    else (it said it keeps its own, or none came in RENDEZVOUS_WAIT_S) a pool of its own."""
    deadline = time.monotonic() + RENDEZVOUS_WAIT_S
    why = f"no first replica published its pool in {RENDEZVOUS_WAIT_S:.0f} s ({path})"
    while time.monotonic() < deadline:
        note = _read(path)
        if note is not None and "private" in note:
            why = f"the first replica keeps its own: {note['private']}"
            break
        if note is not None and _is_sibling(note):
            try:
                pool = HostSlotPool.for_config(config, slot_bytes, attach=f"/proc/{note['pid']}/fd/{note['fd']}")
            except (RuntimeError, ValueError, MemoryError) as e:
                why = str(e)
                break
            return RankPool(pool, follows=True)
        time.sleep(0.05)
    logger.warning("lmcache_ext worker %d: keeps a host pool of its own: %s", rank, why)
    return RankPool(HostSlotPool.for_config(config, slot_bytes))


def _publish(path: Path, note: dict[str, object]) -> None:
    """Write the note whole or not at all (a reader never sees half of it). Past
    RENDEZVOUS_WAIT_S every replica has read it, so it goes then, even where the engine
    never closes its workers."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(note))
    os.replace(partial, path)
    forget = threading.Timer(RENDEZVOUS_WAIT_S, path.unlink, kwargs={"missing_ok": True})
    forget.daemon = True
    forget.start()


def _read(path: Path) -> dict | None:
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def _is_sibling(note: dict) -> bool:
    """The note's creator still runs (not a crashed run's note under a reused pid) and is
    a child of this rank's parent: a rank of the same engine."""
    try:
        pid = int(note["pid"])
        return note["parent"] == os.getppid() and note["start"] == _start_time(pid)
    except (KeyError, TypeError, ValueError, OSError):
        return False


def _start_time(pid: int) -> int:
    """When process `pid` started, in clock ticks since boot (/proc/<pid>/stat field 22)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])
