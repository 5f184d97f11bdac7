"""A rank's records when its pages hold several KV heads: one record per head, so that an
engine at another TP size, whose ranks own other sets of heads, reads each head it owns.

A payload is pages of `Geometry.page_bytes`; each page holds the rank's heads in
`head_runs` runs each (one run where a page is head-major, HND; a run per token where
it is token-major, NHD). Head h's record is its runs of every page, in page order: the
bytes a rank owning only head h keeps, whatever TP size wrote them. Splitting and
joining are strided copies on the host, where the payload already is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

ALIGN = 4096

if TYPE_CHECKING:
    from lmcache_ext.tiers import TierIO


class HeadShards:
    """One record per head, each in its shard's own `TierIO` (`ios[i]`: the rank's
    i-th head), of runs of `run_bytes`. A read fills the payload only when every
    head's record is there."""

    def __init__(self, ios: Sequence[TierIO], run_bytes: int) -> None:
        if len(ios) < 2 or run_bytes < 1:
            raise ValueError(f"{len(ios)} heads in runs of {run_bytes} bytes: expected at least 2 heads and 1 byte")
        self._ios = list(ios)
        self._run = run_bytes
        self._buffers = threading.local()
        self._readers = ThreadPoolExecutor(len(self._ios), thread_name_prefix="lmcache-heads")

    def heads(self, payload: Any) -> list[torch.Tensor]:
        return head_views(payload, len(self._ios), self._run)

    def read_into(self, key: bytes, out: Any) -> bool:
        """Every head's record at once (each from its own tier, on a thread of this
        object's), each joined into its runs of `out`."""
        reads = [self._readers.submit(self._read_head, io, key, part) for io, part in zip(self._ios, self.heads(out))]
        return all([read.result() for read in reads])

    def _read_head(self, io: TierIO, key: bytes, part: torch.Tensor) -> bool:
        record = self._record(part.numel())
        if not io.read_into(key, record):
            return False
        part.copy_(record.view(part.shape))
        return True

    def submit_write(self, key: bytes, payload: Any, on_done: Callable[[bool], None] | None = None) -> Future[bool]:
        """Each head's record, copied out of `payload` now, written by its shard's tier."""
        done: Future[bool] = Future()
        left, failed, lock = [len(self._ios)], [False], threading.Lock()

        def one_done(ok: bool) -> None:  # on each head's tier's own threads
            with lock:
                failed[0] |= not ok
                left[0] -= 1
                last = left[0] == 0
            if last:
                try:
                    if on_done is not None:
                        on_done(not failed[0])
                finally:
                    done.set_result(not failed[0])

        for io, part in zip(self._ios, self.heads(payload)):
            record = aligned_bytes(part.numel())
            record.view(part.shape).copy_(part)
            io.submit_write(key, record, one_done)
        return done

    def _record(self, nbytes: int) -> torch.Tensor:
        """This thread's buffer for one head's record, kept between reads (a read thread
        reads one record at a time) so that reads neither fault in fresh pages nor miss
        O_DIRECT's alignment."""
        held = getattr(self._buffers, "record", None)
        if held is None or held.numel() < nbytes:
            held = self._buffers.record = aligned_bytes(nbytes)
        return held[:nbytes]

    def remove(self, key: bytes) -> bool:
        return any([io.remove(key) for io in self._ios])

    def clear(self) -> int:
        return sum(io.clear() for io in self._ios)

    def flush(self) -> None:
        for io in self._ios:
            io.flush()

    def close(self) -> None:
        self._readers.shutdown()
        for io in self._ios:
            io.close()

    def stats(self) -> dict[str, Any]:
        """The heads' counters (of records: one per head) and gauges, summed; counts by
        kind summed by kind."""
        total: dict[str, Any] = {}
        for io in self._ios:
            for name, value in io.stats().items():
                if isinstance(value, dict):
                    merged = total.setdefault(name, {})
                    for kind, count in value.items():
                        merged[kind] = merged.get(kind, 0) + count
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    total[name] = total.get(name, 0) + value
                else:
                    total.setdefault(name, value)
        return total


def head_views(payload: Any, heads: int, run_bytes: int) -> list[torch.Tensor]:
    """Each head's runs in `payload` (runs of every head, in head order, repeated), as
    strided views [runs, run_bytes]."""
    flat = _bytes_of(payload)
    if flat.numel() % (heads * run_bytes):
        raise ValueError(
            f"a payload of {flat.numel()} bytes: expected whole runs of {run_bytes} bytes of {heads} heads"
        )
    runs = flat.view(-1, heads, run_bytes)
    return [runs[:, i, :] for i in range(heads)]


def aligned_bytes(nbytes: int) -> torch.Tensor:
    """`nbytes` uint8 on the host starting on a 4 KiB boundary (what O_DIRECT I/O needs)."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    skip = -raw.data_ptr() % ALIGN
    return raw[skip : skip + nbytes]


def _bytes_of(payload: Any) -> torch.Tensor:
    """`payload` (a contiguous tensor or a writable buffer) as a flat uint8 tensor over its memory."""
    if isinstance(payload, torch.Tensor):
        if not payload.is_contiguous() or payload.device.type != "cpu":
            raise ValueError(
                f"a payload on {payload.device}, contiguous={payload.is_contiguous()}: expected host bytes"
            )
        return payload.view(-1).view(torch.uint8)
    return torch.frombuffer(memoryview(payload).cast("B"), dtype=torch.uint8)
