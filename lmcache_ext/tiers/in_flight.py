"""Chunks a prefill instance is still writing into the shared tier, as a decode
instance sees them (disaggregated prefill).

A producer (vLLM's ``kv_producer``) marks each chunk in the remote tier before any rank
writes it: a key of its own beside the chunk's records, set with an expiry
(``pd_marker_ttl_ms``), deleted once every rank's write has ended, well or not. A
consumer (``kv_consumer``) that finds a chunk's records missing but its mark there, or
a chunk the producer named in the request's ``kv_transfer_params``, answers "not yet"
and asks again, up to ``pd_wait_ms`` from the first time it saw that chunk pending.
Past that deadline the chunk is a miss and vLLM computes it. A mark still there at the
deadline (a producer that crashed, or one slower than the deadline) is not waited for
again until it would have expired, so a crashed producer's marks cost one wait per
chunk, not one per request. This module is that bookkeeping, without the network."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

POLL_S = 0.005
"""How often a consumer asks again about a chunk in flight."""


class PendingChunks:
    """A consumer's deadlines for chunks in flight. `settle` turns one probe's answer
    into present (True), absent (False) or still in flight (None: ask again later)."""

    def __init__(self, wait_s: float, mark_ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if wait_s <= 0:
            raise ValueError(f"wait_s = {wait_s!r}: expected a positive number of seconds to wait")
        self._wait_s = wait_s
        self._mark_ttl_s = mark_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._deadline: dict[bytes, float] = {}  # chunk key -> when to stop waiting for it
        self._expected: set[bytes] = set()  # named by a producer's kv_transfer_params
        self._seen_marked: set[bytes] = set()  # waited for on a mark that a probe found
        self._given_up: dict[bytes, float] = {}  # marked chunks waited out -> when their mark expires
        self.waited_out = 0  # chunks whose deadline passed while they were still in flight

    def expect(self, keys: Iterable[bytes]) -> None:
        """A producer says it stores `keys` (a request's kv_transfer_params): wait for
        them, marked or not, from now."""
        now = self._clock()
        with self._lock:
            for key in keys:
                self._expected.add(key)
                self._deadline.setdefault(key, now + self._wait_s)

    def settle(self, key: bytes, present: bool, marked: bool) -> bool | None:
        """What a probe that found `key`'s records `present` and its mark `marked` means."""
        now = self._clock()
        with self._lock:
            if present:
                self._forget(key)
                return True
            if not (marked and self._given_up.get(key, 0.0) <= now) and key not in self._expected:
                self._forget(key)
                return False
            deadline = self._deadline.setdefault(key, now + self._wait_s)
            if marked:
                self._seen_marked.add(key)
            if now < deadline:
                return None
            self.waited_out += 1
            if marked:
                self._given_up[key] = now + self._mark_ttl_s
            self._forget(key)
            if len(self._given_up) > 65536:  # drop marks that have expired by now
                self._given_up = {k: t for k, t in self._given_up.items() if t > now}
            return False

    def unreachable(self, key: bytes) -> bool | None:
        """The store could not be asked about `key` this time. A chunk already seen in
        flight is still waited for, up to its deadline (one failed probe on a loaded
        machine must not cost the hit); any other is a miss now: nothing is known to be
        coming, and a store that is down must not hold every request to its deadline."""
        now = self._clock()
        with self._lock:
            if key in self._seen_marked and now < self._deadline.get(key, 0.0):
                return None
            self._forget(key)
            return False

    def waiting(self) -> int:
        """Chunks being waited for now."""
        with self._lock:
            return len(self._deadline)

    def _forget(self, key: bytes) -> None:
        self._deadline.pop(key, None)
        self._expected.discard(key)
        self._seen_marked.discard(key)
