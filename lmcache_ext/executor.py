"""Worker side: carries out plans — kernels for paged <-> slot, tier I/O for slot <->
disk or remote — and reports each item done or failed. It decides nothing.

Copies of the same block count go out as one kernel launch over all their slots.
Tier writes run on the tiers' own threads and report through a callback, so a
plan never waits on one (the slot stays pinned by the directory until then).

The paged cache can be unbound and bound again (vLLM's sleep mode releases its
memory): `bind(None)` waits for a copy in progress, and until the next `bind` a
plan with copies raises instead of touching released memory.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import threading

import torch

from lmcache_ext import ops
from lmcache_ext.plans import Plan, PlanResult, SlotCopy, Source, TierTransfer
from lmcache_ext.tiers import LowerTier

WriteDone = Callable[[TierTransfer, bool], None]


class SlotMemory(Protocol):
    def view(self, slot: int) -> torch.Tensor: ...


class TransferExecutor:
    """Runs plans against one paged cache, one slot pool and the tiers below it."""

    def __init__(self, kv: ops.PagedLayers, slots: SlotMemory, tiers: Mapping[Source, LowerTier],
                 read_threads: int = 2) -> None:
        self._kv: ops.PagedLayers | None = kv
        self._kv_lock = threading.Lock()  # held by copies; bind() waits for them
        self._slots = slots
        self._tiers = dict(tiers)
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="lmcache-read") if tiers else None

    def bind(self, kv: ops.PagedLayers | None) -> None:
        """Copy to and from `kv` from now on; None: no paged cache until the next bind."""
        with self._kv_lock:
            self._kv = kv

    def run(self, plan: Plan, on_write_done: WriteDone | None = None) -> PlanResult:
        with self._kv_lock:
            kv = self._kv
            if (plan.scatters or plan.gathers) and kv is None:
                raise RuntimeError(
                    f"the plan copies {len(plan.scatters) + len(plan.gathers)} chunks to or from the paged KV "
                    "cache, but none is bound: vLLM unregistered it for sleep mode (unregister_kv_caches) and "
                    "has not restored it (restore_kv_caches)"
                )
            reads = self._read(plan.reads)
            unreadable = {r.slot for r, ok in zip(plan.reads, reads) if not ok}
            scatters = self._copy(kv, ops.scatter, plan.scatters, unreadable)
            gathers = self._copy(kv, ops.gather, plan.gathers, set())
        unfilled = {g.slot for g, ok in zip(plan.gathers, gathers) if not ok}
        for w in plan.writes:
            self._write(w, w.slot not in unfilled, on_write_done)
        return PlanResult(tuple(reads), tuple(scatters), tuple(gathers))

    def close(self) -> None:
        if self._readers is not None:
            self._readers.shutdown(wait=True)

    def _payload(self, slot: int, nbytes: int) -> torch.Tensor:
        return self._slots.view(slot)[:nbytes]

    def _read(self, reads: Sequence[TierTransfer]) -> list[bool]:
        if not reads:
            return []
        missing = {r.tier.value for r in reads if r.tier not in self._tiers}
        if missing or self._readers is None:
            raise ValueError(f"the plan reads chunks from {sorted(missing)} but this worker has no such tier")
        futures = [self._readers.submit(self._tiers[r.tier].read_into, r.key, self._payload(r.slot, r.nbytes))
                   for r in reads]
        return [f.result() for f in futures]

    def _copy(self, kv: ops.PagedLayers | None, copy: Callable[..., None], items: Sequence[SlotCopy],
              skip: set[int]) -> list[bool]:
        """One launch per distinct block count of whole-chunk copies, one per partial
        copy; items whose slot is in `skip` fail."""
        groups: dict[int, list[SlotCopy]] = defaultdict(list)
        for item in items:
            if item.slot in skip:
                continue
            if item.whole:
                groups[len(item.block_ids)].append(item)
            else:
                self._copy_part(kv, copy, item)
        for blocks, members in groups.items():
            block_ids = [b for item in members for b in item.block_ids]
            chunks = [self._slots.view(item.slot) for item in members]
            copy(kv, block_ids, chunks, blocks_per_chunk=blocks)
        if items and kv is not None and kv.device.type == "cuda":
            torch.cuda.current_stream(kv.device).synchronize()
        return [item.slot not in skip for item in items]

    def _copy_part(self, kv: ops.PagedLayers, copy: Callable[..., None], item: SlotCopy) -> None:
        """Blocks first.. of a chunk: the slot seen from block `first`, layers still
        chunk_blocks pages apart."""
        offset = item.first * kv.chunk_geometry()[1]
        chunk = self._slots.view(item.slot)[offset:]
        copy(kv, list(item.block_ids), [chunk], blocks_per_chunk=item.chunk_blocks)

    def _write(self, w: TierTransfer, filled: bool, on_done: WriteDone | None) -> None:
        report = (lambda ok: on_done(w, ok)) if on_done else (lambda ok: None)
        tier = self._tiers.get(w.tier)
        if not filled or tier is None:
            report(False)
            return
        tier.submit_write(w.key, self._payload(w.slot, w.nbytes), report)
