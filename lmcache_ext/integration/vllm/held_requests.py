"""The requests whose blocks a gather still reads, so that vLLM reuses them only after.

vLLM never keeps a request's blocks for our stores (nothing is reported as
finished_sending). Why a pending gather reads the right bytes: it reads blocks of
computed tokens, which vLLM never rewrites while the request runs; once the request
finished or was preempted, its blocks are written again only in a later step, whose
plan names it `released`, and `handle_preemptions` (the first hook of every step,
before vLLM zeroes, copies or computes into a block) waits for its gathers and gathers
its stores planned at the finish. On CUDA the current stream also waits (on the GPU)
for every gather it queued.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Sequence

from lmcache_ext.integration.vllm.metadata import StoreItem


class HeldRequests:
    """The count of gathers still running, per request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._saving: Counter[str] = Counter()
        self._saves_done = threading.Condition(self._lock)

    def gathering(self, stores: Sequence[StoreItem]) -> None:
        """The gathers of `stores` are about to start: `wait_released` waits for them."""
        with self._lock:
            for item in stores:
                self._saving[item.req_id] += 1

    def gathered(self, stores: Iterable[StoreItem]) -> None:
        """The gathers of `stores` ended (well or not)."""
        with self._lock:
            for item in stores:
                self._saving[item.req_id] -= 1
                if not self._saving[item.req_id]:
                    del self._saving[item.req_id]
            self._saves_done.notify_all()

    def wait_all(self) -> None:
        """Return once no gather is running (a hybrid model's running requests lose
        blocks to their windows at every step: vLLM may reuse those at once)."""
        with self._lock:
            self._saves_done.wait_for(lambda: not self._saving)

    def wait_released(self, released: set[str]) -> None:
        """Return once no gather of the `released` requests is running."""
        with self._lock:
            self._saves_done.wait_for(lambda: not any(self._saving[r] for r in released))
