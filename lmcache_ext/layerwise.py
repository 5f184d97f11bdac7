"""One step's transfers layer by layer (`use_layerwise`): a load's per-layer scatters run
ahead of the forward and each layer's attention waits for its own layer only; a
store's per-layer gathers start as soon as the forward has written that layer.

On CUDA the copies are queued on the executor's copy stream, one event per layer, and
waiting for a layer makes the current stream wait for that event (the host never
waits). On CPU one copy thread runs the layers in order and sets a `threading.Event`
per layer once its copy has returned; waiting for a layer blocks until it is set.

What holds, whatever fails: a layer is reported ready only after its copy ended; a
failed copy fails every item of the step (a load's blocks become load errors, a
store's chunk is reported failed and never becomes visible); every layer is still
signalled, so a forward never hangs on a failed load. The step ends (`finish`, from
`wait_for_save`) with every layer complete: a layer vLLM never announced (no
`save_kv_layer` call for it) is copied then, so a chunk is stored whole or not at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from lmcache_ext.executor import TransferExecutor
from lmcache_ext.plans import SlotCopy

logger = logging.getLogger(__name__)

Submit = Callable[..., Future]


class LayerwiseLoad:
    """The per-layer scatters of one step's loads, started at once."""

    def __init__(
        self, executor: TransferExecutor, items: Sequence[SlotCopy], num_layers: int, submit: Submit | None
    ) -> None:
        """`submit(fn, *args)` runs the CPU copies on a thread (unused on CUDA)."""
        self._executor = executor
        self._items = tuple(items)
        self._failed = False
        self._events: list[torch.cuda.Event | None] = []
        self._ready = [threading.Event() for _ in range(num_layers)]
        if executor.device.type == "cuda":
            self._queue_all(num_layers)
            self._job: Future | None = None
        else:
            assert submit is not None, "CPU layerwise loads run on a copy thread: submit is required"
            self._job = submit(self._run_all, num_layers)

    def _queue_all(self, num_layers: int) -> None:
        try:
            for layer in range(num_layers):
                self._events.append(self._executor.copy_layer("scatter", self._items, layer))
        except Exception:
            logger.exception("lmcache_ext: queueing layer %d of %d loads failed", len(self._events), len(self._items))
            self._failed = True
        finally:
            for ready in self._ready:
                ready.set()

    def _run_all(self, num_layers: int) -> None:
        try:
            for layer in range(num_layers):
                self._executor.copy_layer("scatter", self._items, layer)
                self._ready[layer].set()
        except Exception:
            logger.exception("lmcache_ext: a layer of %d loads failed", len(self._items))
            self._failed = True
        finally:
            for ready in self._ready:
                ready.set()

    def wait(self, layer: int) -> None:
        """Return once `layer` is in place (CUDA: once the current stream waits for it)."""
        self._ready[layer].wait()
        if layer < len(self._events) and self._events[layer] is not None:
            torch.cuda.current_stream(self._executor.device).wait_event(self._events[layer])

    def finish(self) -> bool:
        """Every layer in place (CUDA: ordered before the current stream's next work); True
        when every copy succeeded."""
        if self._job is not None:
            self._job.result()
        for layer in range(len(self._ready)):
            self.wait(layer)
        return not self._failed


class LayerwiseSave:
    """The per-layer gathers of one step's stores, each started when its layer is written."""

    def __init__(self, executor: TransferExecutor, items: Sequence[SlotCopy], num_layers: int, submit: Submit) -> None:
        self._executor = executor
        self._items = tuple(items)
        self._num_layers = num_layers
        self._submit = submit
        self._lock = threading.Lock()
        self._started: set[int] = set()
        self._jobs: list[Future] = []
        self._last: torch.cuda.Event | None = None
        self._failed = False

    def layer(self, layer: int) -> None:
        """The forward has written `layer`: gather its pages (CUDA: queued after the
        write; CPU: on the copy thread)."""
        with self._lock:
            if layer in self._started:
                return
            self._started.add(layer)
        if self._executor.device.type == "cuda":
            self._gather(layer)
        else:
            self._jobs.append(self._submit(self._gather, layer))

    def _gather(self, layer: int) -> None:
        try:
            event = self._executor.copy_layer("gather", self._items, layer)
            if event is not None:
                self._last = event
        except Exception:
            logger.exception("lmcache_ext: gathering layer %d of %d stores failed", layer, len(self._items))
            self._failed = True

    def finish(self) -> tuple[bool, ...]:
        """Gather the layers not announced, wait for the CPU copies; per item, is its slot
        complete. On CUDA (call it on the forward's thread) the current stream's next work,
        which may reuse the blocks once the store is reported, waits for every gather, and
        a tier write waits for the slot's last copy as usual."""
        for layer in range(self._num_layers):
            if layer not in self._started:
                self._started.add(layer)
                self._gather(layer)
        for job in self._jobs:
            job.result()
        if self._last is not None:
            torch.cuda.current_stream(self._executor.device).wait_event(self._last)
        return tuple(not self._failed for _ in self._items)
