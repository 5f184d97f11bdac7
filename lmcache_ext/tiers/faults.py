"""Faults logged once per burst: a full disk or a damaged directory fails every
operation for a while, and one line says so; the first success after it says how many
operations the burst cost. The counters (``stats()``, the ``failures`` metric) keep
every fault. A fault costs hits, never correctness (invariant 4)."""

from __future__ import annotations

import logging
import threading


class FaultLog:
    """The faults of one kind of operation (`what`, e.g. "disk writes under /x")."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._lock = threading.Lock()
        self._burst = 0  # faults since the last success

    def failed(self, kind: str, detail: object = "") -> None:
        """A fault of `kind`; the first of a burst is a warning (faults cost hits, not correctness)."""
        with self._lock:
            self._burst += 1
            first = self._burst == 1
        if first:
            self._logger.warning(
                "%s failing (%s%s): those chunks are not cached; further faults are counted, "
                "not logged, until one succeeds",
                self._what,
                kind,
                f": {detail}" if detail else "",
            )

    def succeeded(self) -> None:
        with self._lock:
            burst, self._burst = self._burst, 0
        if burst:
            self._logger.info("%s work again, after %d faults", self._what, burst)
