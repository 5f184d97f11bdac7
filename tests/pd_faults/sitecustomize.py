"""A slow prefill instance, for the P/D tests: every Python process of a server started
with this directory on PYTHONPATH and LMCACHE_EXT_TEST_WRITE_DELAY_FILE set submits
each remote write that many seconds late (the number in that file, read at each write,
so a test slows a running server and speeds it up again). Only the records' writes are
late: the scheduler's in-flight marks go out at once, as they would from a producer
whose store is slow or backlogged."""

import os

_DELAY_FILE = os.environ.get("LMCACHE_EXT_TEST_WRITE_DELAY_FILE")

if _DELAY_FILE:
    import threading
    from concurrent.futures import Future

    from lmcache_ext.tiers import remote

    _submit = remote.RemoteTier.submit_write

    def _delay() -> float:
        try:
            with open(_DELAY_FILE) as f:
                return float(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0.0

    def _late_submit(self, key, payload, on_done=None):
        delay = _delay()
        if delay <= 0:
            return _submit(self, key, payload, on_done)
        outer = Future()

        def submit_now():
            inner = _submit(self, key, payload, on_done)
            inner.add_done_callback(lambda done: outer.set_result(done.result()))

        timer = threading.Timer(delay, submit_now)
        timer.daemon = True
        timer.start()
        return outer

    remote.RemoteTier.submit_write = _late_submit
