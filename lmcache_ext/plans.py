"""Plans: what the worker side must move, as plain data (ints, bytes, tuples).

The scheduler side (directory) decides; the executor only carries these out, so
every TP rank runs the same plan on its own shard and ranks cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlotCopy:
    """The pages of `block_ids` (every layer) to or from host slot `slot`. The slot
    holds a chunk of `chunk_blocks` blocks laid out [layer][block][page] from its
    start; `block_ids` are that chunk's blocks `first`, `first + 1`, ... (a load may
    skip blocks vLLM already has, or stop short of the request's last token)."""

    slot: int
    block_ids: tuple[int, ...]
    chunk_blocks: int = 0  # 0: len(block_ids)
    first: int = 0

    @property
    def whole(self) -> bool:
        """True when the copy covers the chunk's every block."""
        return self.first == 0 and self.chunk_blocks in (0, len(self.block_ids))


@dataclass(frozen=True)
class DiskTransfer:
    """The first `nbytes` of host slot `slot` to or from the disk file of `key`."""

    key: bytes
    slot: int
    nbytes: int


@dataclass(frozen=True)
class Plan:
    """Run in this order: disk reads, scatters (slot -> paged), gathers (paged -> slot),
    then disk writes, which finish in the background."""

    reads: tuple[DiskTransfer, ...] = ()
    scatters: tuple[SlotCopy, ...] = ()
    gathers: tuple[SlotCopy, ...] = ()
    writes: tuple[DiskTransfer, ...] = ()


@dataclass(frozen=True)
class PlanResult:
    """Per item of the plan's reads, scatters and gathers: done (True) or failed."""

    reads: tuple[bool, ...]
    scatters: tuple[bool, ...]
    gathers: tuple[bool, ...]
