"""The CUDA stream an executor's copies run on, ordered against vLLM's stream by events.

A copy waits (on the GPU) for what the current stream queued before it: the forward
pass that wrote the KV cache, or the last use of blocks about to be loaded. The current
stream then waits (on the GPU) for the copy: the next forward must neither read
blocks before their load lands nor overwrite blocks before their store has read
them. The host never waits for either; it waits for a slot's event only where it
touches that slot's bytes itself (a disk write reads them, a disk read overwrites
them), and for every copy before the paged cache goes away (sleep mode, close).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


class CopyStream:
    """A dedicated stream on one CUDA device and the event of each slot's last copy."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device=device)
        self._slot_events: dict[int, torch.cuda.Event] = {}
        self._last: torch.cuda.Event | None = None

    @contextmanager
    def copies(self, slots: Iterable[int]) -> Iterator[torch.cuda.Stream]:
        """Queue copies that read or write `slots` on the yielded stream."""
        stream = self.after_current()
        try:
            yield stream
        finally:
            torch.cuda.current_stream(self.device).wait_event(self.mark(slots))

    def after_current(self) -> torch.cuda.Stream:
        """The copy stream, ordered after what the current stream queued so far (the
        layer the forward just wrote, the last use of blocks about to be loaded)."""
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        return self._stream

    def mark(self, slots: Iterable[int]) -> torch.cuda.Event:
        """An event after the copies queued so far, remembered as `slots`' last copy.
        The caller makes the current stream wait for it where it needs the bytes (a
        layerwise load: before that layer's attention, not before the whole forward)."""
        done = torch.cuda.Event()
        done.record(self._stream)
        for slot in slots:
            self._slot_events[slot] = done
        self._last = done
        return done

    def wait_slot(self, slot: int) -> None:
        """Block the host until the last copy queued for `slot` has finished."""
        event = self._slot_events.pop(slot, None)
        if event is not None:
            event.synchronize()

    def wait_all(self) -> None:
        """Block the host until every copy queued so far has finished."""
        if self._last is not None:
            self._last.synchronize()
        self._slot_events.clear()
        self._last = None
