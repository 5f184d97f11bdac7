"""Worker side: carries out plans — kernels for paged <-> slot, file I/O for slot <-> disk —
and reports each item done or failed. It decides nothing.

Copies of the same block count go out as one kernel launch over all their slots.
Disk writes run on the disk tier's threads and report through a callback, so a
plan never waits on one (the slot stays pinned by the directory until then).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from lmcache_ext import ops
from lmcache_ext.plans import DiskTransfer, Plan, PlanResult, SlotCopy

WriteDone = Callable[[DiskTransfer, bool], None]


class SlotMemory(Protocol):
    def view(self, slot: int) -> torch.Tensor: ...


class DiskFiles(Protocol):
    def read_into(self, key: bytes, out: torch.Tensor) -> bool: ...

    def submit_write(self, key: bytes, payload: torch.Tensor, on_done: Callable[[bool], None]) -> object: ...


class TransferExecutor:
    """Runs plans against one paged cache, one slot pool and an optional disk tier."""

    def __init__(self, kv: ops.PagedLayers, slots: SlotMemory, disk: DiskFiles | None, read_threads: int = 2) -> None:
        self._kv = kv
        self._slots = slots
        self._disk = disk
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="lmcache-read") if disk else None

    def run(self, plan: Plan, on_write_done: WriteDone | None = None) -> PlanResult:
        reads = self._read(plan.reads)
        unreadable = {r.slot for r, ok in zip(plan.reads, reads) if not ok}
        scatters = self._copy(ops.scatter, plan.scatters, unreadable)
        gathers = self._copy(ops.gather, plan.gathers, set())
        unfilled = {g.slot for g, ok in zip(plan.gathers, gathers) if not ok}
        for w in plan.writes:
            self._write(w, w.slot not in unfilled, on_write_done)
        return PlanResult(tuple(reads), tuple(scatters), tuple(gathers))

    def close(self) -> None:
        if self._readers is not None:
            self._readers.shutdown(wait=True)

    def _payload(self, slot: int, nbytes: int) -> torch.Tensor:
        return self._slots.view(slot)[:nbytes]

    def _read(self, reads: Sequence[DiskTransfer]) -> list[bool]:
        if not reads:
            return []
        if self._disk is None or self._readers is None:
            raise ValueError(f"the plan reads {len(reads)} chunks from disk but there is no disk tier")
        disk = self._disk
        futures = [self._readers.submit(disk.read_into, r.key, self._payload(r.slot, r.nbytes)) for r in reads]
        return [f.result() for f in futures]

    def _copy(self, copy: Callable[..., None], items: Sequence[SlotCopy], skip: set[int]) -> list[bool]:
        """One launch per distinct block count of whole-chunk copies, one per partial
        copy; items whose slot is in `skip` fail."""
        groups: dict[int, list[SlotCopy]] = defaultdict(list)
        for item in items:
            if item.slot in skip:
                continue
            if item.whole:
                groups[len(item.block_ids)].append(item)
            else:
                self._copy_part(copy, item)
        for blocks, members in groups.items():
            block_ids = [b for item in members for b in item.block_ids]
            chunks = [self._slots.view(item.slot) for item in members]
            copy(self._kv, block_ids, chunks, blocks_per_chunk=blocks)
        if items and self._kv.device.type == "cuda":
            torch.cuda.current_stream(self._kv.device).synchronize()
        return [item.slot not in skip for item in items]

    def _copy_part(self, copy: Callable[..., None], item: SlotCopy) -> None:
        """Blocks first.. of a chunk: the slot seen from block `first`, layers still
        chunk_blocks pages apart."""
        offset = item.first * self._kv.chunk_geometry()[1]
        chunk = self._slots.view(item.slot)[offset:]
        copy(self._kv, list(item.block_ids), [chunk], blocks_per_chunk=item.chunk_blocks)

    def _write(self, w: DiskTransfer, filled: bool, on_done: WriteDone | None) -> None:
        report = (lambda ok: on_done(w, ok)) if on_done else (lambda ok: None)
        if not filled or self._disk is None:
            report(False)
            return
        self._disk.submit_write(w.key, self._payload(w.slot, w.nbytes), report)
