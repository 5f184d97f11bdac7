"""A disk race made deterministic: every disk read waits until some disk write has ended
(and the tier's pending writes with it), so a write planned after a lookup lands before
the read the lookup promised. The tests prove with it that a promised disk hit survives
the eviction that write needs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from lmcache_ext.tiers.disk import DiskTier


def hold_reads_until_a_write(timeout_s: float = 30.0) -> Callable[[], None]:
    """Patch `DiskTier` in this process; returns the call that undoes it."""
    written = threading.Event()
    real_write, real_read = DiskTier.submit_write, DiskTier.read_into

    def write(tier: DiskTier, key: bytes, payload: Any, on_done: Callable[[bool], None] | None = None) -> Any:
        def done(ok: bool) -> None:
            if on_done is not None:
                on_done(ok)
            written.set()

        return real_write(tier, key, payload, done)

    def read_after_a_write(tier: DiskTier, key: bytes, out: Any) -> bool:
        written.wait(timeout_s)
        tier.flush()
        return real_read(tier, key, out)

    setattr(DiskTier, "submit_write", write)  # noqa: B010 (a method replaced for the whole process)
    setattr(DiskTier, "read_into", read_after_a_write)  # noqa: B010

    def undo() -> None:
        setattr(DiskTier, "submit_write", real_write)  # noqa: B010
        setattr(DiskTier, "read_into", real_read)  # noqa: B010

    return undo
