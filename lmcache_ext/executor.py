"""Worker side: carries out plans — kernels for paged <-> slot, tier I/O for slot <->
disk or remote — and reports each item done or failed. It decides nothing.

Copies of the same block count go out as one kernel launch over all their slots.
Tier writes run on the tiers' own threads and report through a callback, so a
plan never waits on one (the slot stays pinned by the directory until then).

On a CUDA cache the copies run (SM kernels, or the copy engines with
cuda_copy_path "dma") on the executor's own stream, ordered against the
caller's current stream by events (`copy_stream`), and `run` returns without waiting
for them: the host waits for a slot's copy only before a tier write reads the slot
or a tier read overwrites it. Such a cache needs page-locked slots; the executor
refuses a pageable pool when it is made, not at the first copy.

`run` may be called from several threads at once (the connector's worker loads on
one while it gathers on another). The paged cache can be unbound and bound again
(vLLM's sleep mode releases its memory): `bind(None)` waits for every run in
progress, and until the next `bind` a plan with copies raises instead of touching
released memory.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol

import torch

from lmcache_ext import ops
from lmcache_ext.copy_stream import CopyStream
from lmcache_ext.plans import GroupPages, Plan, PlanResult, SlotCopy, TierName, TierTransfer
from lmcache_ext.tiers import TierIO

WriteDone = Callable[[TierTransfer, bool], None]
PagedCache = ops.PagedLayers | ops.PagedGroups  # a hybrid model's copies name their groups


class SlotMemory(Protocol):
    def view(self, slot: int) -> torch.Tensor: ...

    @property
    def is_page_locked(self) -> bool: ...


class TransferExecutor:
    """Runs plans against one paged cache, one slot pool and the tiers below it."""

    def __init__(
        self,
        kv: PagedCache,
        slots: SlotMemory,
        tiers: Mapping[TierName, TierIO],
        read_threads: int = 2,
        cuda_copy_path: str = "kernel",
    ) -> None:
        _check_reachable(kv, slots)
        self._kv: PagedCache | None = kv
        self._device = kv.device
        self._gate = _BindGate()
        self._slots = slots
        if cuda_copy_path not in ops.COPY_PATHS:
            raise ValueError(f"cuda_copy_path = {cuda_copy_path!r}: expected one of {', '.join(ops.COPY_PATHS)}")
        self._cuda_path = cuda_copy_path
        self._copies = CopyStream(kv.device) if kv.device.type == "cuda" else None
        self._tiers = dict(tiers)
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="lmcache-read") if tiers else None

    @property
    def device(self) -> torch.device:
        """Where the paged cache is (the last one bound, while none is)."""
        return self._device

    def bind(self, kv: PagedCache | None) -> None:
        """Copy to and from `kv` from now on; None: no paged cache until the next bind.
        Copies still running on the GPU finish first."""
        if kv is not None:
            _check_reachable(kv, self._slots)
        with self._gate.alone():
            if self._copies is not None:
                self._copies.wait_all()
            if kv is not None and kv.device != (self._copies.device if self._copies else torch.device("cpu")):
                self._copies = CopyStream(kv.device) if kv.device.type == "cuda" else None
            self._kv = kv
            if kv is not None:
                self._device = kv.device

    def run(self, plan: Plan, on_write_done: WriteDone | None = None) -> PlanResult:
        with self._gate.shared():
            kv = self._bound(len(plan.scatters) + len(plan.gathers))
            reads = self._read(plan.reads)
            unreadable = {r.slot for r, ok in zip(plan.reads, reads) if not ok}
            scatters = self._copy(kv, ops.scatter, plan.scatters, unreadable)
            gathers = self._copy(kv, ops.gather, plan.gathers, set())
        unfilled = {g.slot for g, ok in zip(plan.gathers, gathers) if not ok}
        for w in plan.writes:
            self._write(w, w.slot not in unfilled, on_write_done)
        return PlanResult(tuple(reads), tuple(scatters), tuple(gathers))

    def copy_layer(self, direction: str, items: Sequence[SlotCopy], layer: int) -> torch.cuda.Event | None:
        """Layer `layer`'s pages of `items`, the layerwise path: "scatter" (slot -> paged)
        or "gather" (paged -> slot), into or from that layer's slice of each slot. On CUDA
        the copy is queued on the copy stream after what the current stream queued so far,
        and the returned event marks its end: the caller decides where the current stream
        waits for it. On CPU the copy has ended when this returns (None)."""
        if direction not in ("scatter", "gather"):
            raise ValueError(f"direction = {direction!r}: expected 'scatter' or 'gather'")
        copy = functools.partial(ops.scatter if direction == "scatter" else ops.gather, layer=layer)
        with self._gate.shared():
            kv = self._bound(len(items))
            if isinstance(kv, ops.PagedGroups):  # the layer's group's pages only
                group, local = kv.layer(layer)
                copy = functools.partial(copy, layer=local)
                items = [dataclasses.replace(i, groups=tuple(p for p in i.groups if p.group == group)) for i in items]
            if self._copies is None:
                self._copy_items(kv, copy, items, {})
                return None
            stream = self._copies.after_current()
            self._copy_items(kv, copy, items, {"stream": stream, "path": self._cuda_path})
            return self._copies.mark([item.slot for item in items])

    def close(self) -> None:
        if self._copies is not None:
            self._copies.wait_all()
        if self._readers is not None:
            self._readers.shutdown(wait=True)

    def wait_slots(self, slots: Sequence[int]) -> None:
        """Block the host until the copies queued for `slots` have finished (on CUDA; a
        CPU copy has finished when `run` returns): a caller that hands the blocks to
        another stream without an event, such as a load that vLLM schedules later."""
        for slot in slots:
            self._wait_slot(slot)

    def _wait_slot(self, slot: int) -> None:
        """The host is about to touch the slot's bytes: its last copy must be done."""
        if self._copies is not None:
            self._copies.wait_slot(slot)

    def _payload(self, slot: int, nbytes: int) -> torch.Tensor:
        return self._slots.view(slot)[:nbytes]

    def _read(self, reads: Sequence[TierTransfer]) -> list[bool]:
        if not reads:
            return []
        missing = {r.tier for r in reads if r.tier not in self._tiers}
        if missing or self._readers is None:
            raise ValueError(f"the plan reads chunks from {sorted(missing)} but this worker has no such tier")
        for r in reads:
            self._wait_slot(r.slot)
        futures = [
            self._readers.submit(self._tiers[r.tier].read_into, r.key, self._payload(r.slot, r.nbytes)) for r in reads
        ]
        return [f.result() for f in futures]

    def _copy(
        self, kv: PagedCache | None, copy: Callable[..., None], items: Sequence[SlotCopy], skip: set[int]
    ) -> list[bool]:
        """One launch per distinct block count of whole-chunk copies, one per partial
        copy; items whose slot is in `skip` fail."""
        runnable = [item for item in items if item.slot not in skip]
        with self._copy_stream([item.slot for item in runnable]) as on_stream:
            self._copy_items(kv, copy, runnable, on_stream)
        return [item.slot not in skip for item in items]

    def _copy_items(
        self,
        kv: PagedCache | None,
        copy: Callable[..., None],
        items: Sequence[SlotCopy],
        on_stream: dict[str, object],
    ) -> None:
        if not items:
            return
        assert kv is not None, "_bound raises when chunks would move and no paged cache is bound"
        groups: dict[int, list[SlotCopy]] = defaultdict(list)
        for item in items:
            if isinstance(kv, ops.PagedGroups):  # a hybrid model's copy names its groups' pages
                for part in item.groups:
                    self._copy_group(kv.groups[part.group], copy, item.slot, part, on_stream)
            elif item.whole:
                groups[len(item.block_ids)].append(item)
            else:
                assert isinstance(kv, ops.PagedLayers)
                self._copy_part(kv, copy, item, on_stream)
        for blocks, members in groups.items():
            assert isinstance(kv, ops.PagedLayers)
            block_ids = [b for item in members for b in item.block_ids]
            chunks = [self._slots.view(item.slot) for item in members]
            copy(kv, block_ids, chunks, blocks_per_chunk=blocks, **on_stream)

    def _bound(self, copies: int) -> PagedCache | None:
        """The bound paged cache; raises when `copies` chunks would move and none is bound."""
        if copies and self._kv is None:
            raise RuntimeError(
                f"the plan copies {copies} chunks to or from the paged KV "
                "cache, but none is bound: vLLM unregistered it for sleep mode (unregister_kv_caches) and "
                "has not restored it (restore_kv_caches)"
            )
        return self._kv

    @contextmanager
    def _copy_stream(self, slots: list[int]) -> Iterator[dict[str, object]]:
        """The copy kwargs that put a copy on the executor's stream (none on CPU)."""
        if self._copies is None or not slots:
            yield {}
            return
        with self._copies.copies(slots) as stream:
            yield {"stream": stream, "path": self._cuda_path}

    def _copy_part(
        self, kv: ops.PagedLayers, copy: Callable[..., None], item: SlotCopy, on_stream: dict[str, object]
    ) -> None:
        """Blocks first.. of a chunk: the slot seen from block `first`, layers still
        chunk_blocks pages apart."""
        offset = item.first * kv.chunk_geometry()[1]
        chunk = self._slots.view(item.slot)[offset:]
        copy(kv, list(item.block_ids), [chunk], blocks_per_chunk=item.chunk_blocks, **on_stream)

    def _copy_group(
        self, kv: ops.PagedLayers, copy: Callable[..., None], slot: int, part: GroupPages, on_stream: dict[str, object]
    ) -> None:
        """One group's pages: its section of the slot, seen from page `first`."""
        offset = part.section + part.first * kv.chunk_geometry()[1]
        chunk = self._slots.view(slot)[offset:]
        copy(kv, list(part.block_ids), [chunk], blocks_per_chunk=part.section_blocks, **on_stream)

    def _write(self, w: TierTransfer, filled: bool, on_done: WriteDone | None) -> None:
        report = (lambda ok: on_done(w, ok)) if on_done else (lambda ok: None)
        tier = self._tiers.get(w.tier)
        if not filled or tier is None:
            report(False)
            return
        self._wait_slot(w.slot)
        tier.submit_write(w.key, self._payload(w.slot, w.nbytes), report)


class _BindGate:
    """Runs share it; a bind takes it alone, once the runs in progress have ended."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._binding = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._binding)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._binding)
            self._binding = True
            self._cond.wait_for(lambda: self._running == 0)
        try:
            yield
        finally:
            with self._cond:
                self._binding = False
                self._cond.notify_all()


def _check_reachable(kv: PagedCache, slots: SlotMemory) -> None:
    """A CUDA kernel reaches host slots only when they are page-locked: refuse a pageable
    pool at start-up instead of failing every copy while serving."""
    if kv.device.type == "cuda" and not slots.is_page_locked:
        raise ValueError(
            f"the KV cache is on {kv.device} but the host slot pool is not page-locked "
            "(pin_host_memory = 'never'?): CUDA copies reach host slots only when they are; "
            "use pin_host_memory = 'auto' or 'always'"
        )
