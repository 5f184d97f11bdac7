"""The worker's background transfers: loads that read a lower tier first run on the
loader thread, as do fetches of remote chunks into host slots; stores run on the saver
thread (async_save), so neither holds up a step.

A step with nothing scheduled gives the background transfers up to IDLE_WAIT_S of its
time: in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) vLLM runs such steps back to back
while a request waits for its load or fetch, and that busy loop would keep the transfer
threads, and so the request's own load, from the GIL.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.02


class BackgroundJobs:
    """The loader and saver threads and the jobs still running on them, so that an idle
    step can yield to them and `drain` can wait for them."""

    def __init__(self, rank: int) -> None:
        self._rank = rank
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="lmcache-load")
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="lmcache-save")
        self._lock = threading.Lock()
        self._running: set[Future[None]] = set()
        self._ended = threading.Condition(self._lock)

    def load(self, fn: Callable[..., None], *args: object) -> Future[None]:
        """Run `fn(*args)` on the loader thread."""
        return self._submit(self._loader, fn, *args)

    def save(self, fn: Callable[..., None], *args: object) -> Future[None]:
        """Run `fn(*args)` on the saver thread."""
        return self._submit(self._saver, fn, *args)

    def idle_wait(self) -> None:
        """An idle step: let the background transfers run, up to IDLE_WAIT_S."""
        with self._lock:
            if self._running:
                self._ended.wait(IDLE_WAIT_S)

    def drain(self) -> None:
        """Wait until every job submitted so far has ended."""
        with self._lock:
            jobs = list(self._running)
        for job in jobs:
            job.result()

    def close(self) -> None:
        """Let every job end, then stop the threads."""
        self.drain()
        self._loader.shutdown(wait=True)
        self._saver.shutdown(wait=True)

    def _submit(self, pool: ThreadPoolExecutor, fn: Callable[..., None], *args: object) -> Future[None]:
        future = pool.submit(fn, *args)
        with self._lock:
            self._running.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._running.discard(future)
            self._ended.notify_all()
        if future.exception() is not None:
            logger.error("lmcache_ext worker %d: a background transfer failed", self._rank, exc_info=future.exception())
