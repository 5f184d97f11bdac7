"""Plans: what the worker side must move, as plain data (ints, bytes, tuples).

The scheduler side (directory) decides; the executor only carries these out, so
every TP rank runs the same plan on its own shard and ranks cannot disagree.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Source(str, enum.Enum):
    """Where a chunk's bytes are: host slots, or a tier below them."""

    HOST = "host"
    DISK = "disk"
    REMOTE = "remote"


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
class TierTransfer:
    """The first `nbytes` of host slot `slot` to or from the record of `key` in `tier`
    (a tier below host memory)."""

    tier: Source
    key: bytes
    slot: int
    nbytes: int


@dataclass(frozen=True)
class Plan:
    """Run in this order: tier reads, scatters (slot -> paged), gathers (paged -> slot),
    then tier writes, which finish in the background."""

    reads: tuple[TierTransfer, ...] = ()
    scatters: tuple[SlotCopy, ...] = ()
    gathers: tuple[SlotCopy, ...] = ()
    writes: tuple[TierTransfer, ...] = ()


@dataclass(frozen=True)
class PlanResult:
    """Per item of the plan's reads, scatters and gathers: done (True) or failed."""

    reads: tuple[bool, ...]
    scatters: tuple[bool, ...]
    gathers: tuple[bool, ...]
