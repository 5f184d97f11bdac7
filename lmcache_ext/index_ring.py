"""Block ids and chunk tables on their way to a CUDA copy, through a small ring of
pinned buffers.

A kernel reads its block ids and chunk table from device memory. Copied there from
pageable host memory, CUDA first synchronizes the stream, so the host would wait for
everything queued before (vLLM's whole forward pass). From pinned memory the copy is
asynchronous, and the source must stay unchanged until the copy has run. Each entry
of the ring is a pinned buffer, a device buffer and an event recorded after the copy
that used them; an entry is reused only once its event has passed, which the GPU has
long done unless more copies than the ring has entries are queued at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

RING_ENTRIES = 8
# int64 values per entry at first (128 KiB: the block ids of 2M tokens at block size 128),
# grown to the next power of two when a copy needs more. Entries are allocated when the
# ring is made: allocating page-locked memory is an implicit synchronization point.
INITIAL_CAPACITY = 16384


class _Entry:
    def __init__(self, device: torch.device) -> None:
        self.host = torch.empty(0, dtype=torch.int64)
        self.device = torch.empty(0, dtype=torch.int64, device=device)
        self.event: torch.cuda.Event | None = None  # recorded after the last copy that used the buffers
        self.grow(INITIAL_CAPACITY)

    def grow(self, need: int) -> None:
        capacity = 1 << (need - 1).bit_length()
        self.host = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
        self.device = torch.empty(capacity, dtype=torch.int64, device=self.device.device)


class IndexRing:
    """Uploads of int64 index arrays to one CUDA device."""

    def __init__(self, device: torch.device, entries: int = RING_ENTRIES) -> None:
        if entries < 1:
            raise ValueError(f"entries = {entries}: expected a positive number of ring entries")
        self._entries = [_Entry(device) for _ in range(entries)]
        self._next = 0
        self._lock = threading.Lock()  # held from an upload until its copy is queued

    @contextmanager
    def upload(self, ids: torch.Tensor, table: Sequence[int], stream: torch.cuda.Stream) -> Iterator[tuple[int, int]]:
        """Queue ids (a CPU int64 tensor) and table on `stream`; yields their device
        addresses (the table's is 0 when it is empty). Queue the copy that reads them on
        `stream` inside the with block: the entry is released when the block ends."""
        n, need = ids.numel(), ids.numel() + len(table)
        with self._lock:
            entry = self._entries[self._next]
            self._next = (self._next + 1) % len(self._entries)
            if entry.event is not None:
                entry.event.synchronize()
            if entry.host.numel() < need:
                entry.grow(need)
            entry.host[:n].copy_(ids)
            if table:
                entry.host[n:need].copy_(torch.tensor(table, dtype=torch.int64))
            with torch.cuda.stream(stream):
                entry.device[:need].copy_(entry.host[:need], non_blocking=True)
            base = entry.device.data_ptr()
            try:
                yield base, (base + 8 * n if table else 0)
            finally:
                entry.event = torch.cuda.Event()
                entry.event.record(stream)


_rings: dict[int, IndexRing] = {}
_rings_lock = threading.Lock()


def ring_for(device: torch.device) -> IndexRing:
    """The ring of a CUDA device, made on first use."""
    with _rings_lock:
        ring = _rings.get(device.index)
        if ring is None:
            ring = _rings[device.index] = IndexRing(device)
        return ring
