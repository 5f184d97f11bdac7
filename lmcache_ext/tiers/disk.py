"""The local-disk tier: one file per chunk, written behind from a host slot and read
straight back into one.

A chunk of key ``k`` lives at ``<root>/<k[0] as 2 hex>/<k as 32 hex>``; the 256
sub-directories keep each directory small. A file is a record (``tiers.record``: the
header every lower tier uses), its header padded with zeros to ``HEADER_SIZE`` (4096,
so the payload starts block-aligned for O_DIRECT), then the raw payload — never a
pickle (invariant 5). With ``FLAG_PADDED`` the payload is followed by zeros up to the
next 4096 multiple and the header keeps the true length. Directories are created
0700 and files 0600: KV bytes can reveal the prompts they came from.

Decisions:

* Visibility (invariant 1): a write goes to ``<name>.<n>.tmp`` in the same directory
  and is renamed over the final name (``os.replace``, atomic) only once complete; only
  then does the key enter the index that ``contains`` reads. Leftover temp files (a
  killed writer) are never read: they do not parse as a chunk name, so the start-up
  scan deletes them.
* No fsync before the rename. It would slow every write (benchmarks/RESULTS.md) and
  only buy durability across a power cut, and after one a file whose bytes were lost
  fails its checksum and is a miss: a cache loses hits, never correctness.
* Reads (invariant 3): any mismatch of magic, version, key, namespace, header
  checksum, length or file size, or payload checksum, makes the read a miss, deletes
  the file and is counted by kind. An OSError while reading (EIO, ...) is a miss counted as a failed
  read; the file stays.
* Faults (invariant 4): an OSError while writing (ENOSPC, EACCES, EIO, EROFS, ...)
  removes the temp file and reports False; the tier keeps working.
* Capacity counts whole files (header, payload, padding). Which files go to make room
  is not this tier's choice: the planner, which promises hits, decides
  (`tiers.disk_ledger`), so a file a load was promised is never deleted before it is
  read. A write that would take the tier past its capacity (``too_large``: bigger than
  it; ``no_room``: committed and in-flight files hold the rest) is not stored.
* LRU order survives a restart: writes and hits set the file's mtime, which
  orders the planner's ledger after a restart. Headers are checked lazily, on read.
* One root belongs to one ``DiskTier`` at a time (an flock on ``<root>/.lock``), so
  deleting leftover temp files at start-up never hits a live writer's file.
* O_DIRECT (``o_direct=True``): files are written padded; reads and writes use
  O_DIRECT when the caller's buffer address is 4096-aligned, moving the aligned part
  of the payload straight between disk and the buffer and the last partial block
  through a one-page bounce buffer. Where the filesystem answers EINVAL, the tier
  falls back to buffered I/O for good, silently. On by default (``disk_o_direct``):
  chunk files stay out of the page cache, which would hold a second copy of what the
  host tier holds, and the kernel's work on them stays off the cores that compute.
  Buffered I/O is faster on its own, and so is a read of a file still in the page cache
  (a disk hit after a restart), but buffered writes behind each request slowed a chat's
  later rounds, where O_DIRECT writes cost little over no disk tier (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import mmap
import os
import re
import stat
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from lmcache_ext.about import format_bytes
from lmcache_ext.geometry import shard_root
from lmcache_ext.keys import KEY_BYTES
from lmcache_ext.plans import Source
from lmcache_ext.tiers import ReplicaIO, TierHoldings, TierIO, TierKind, TierSetup
from lmcache_ext.tiers.faults import FaultLog
from lmcache_ext.tiers.host_buffer import byte_view
from lmcache_ext.tiers.record import (
    FLAG_PADDED,
    HEADER,
    BadRecord,
    Fields,
    Header,
    check_header,
    check_payload,
    encode_header,
    payload_checksum,
    read_header,
)

log = logging.getLogger(__name__)

BLOCK = 4096
HEADER_SIZE = BLOCK
NO_NAMESPACE = bytes(KEY_BYTES)

_CHUNK_NAME = re.compile(r"[0-9a-f]{32}")
_FANOUT = [f"{i:02x}" for i in range(256)]
_LOCK_NAME = ".lock"


def disk_header(key: bytes, namespace: bytes, payload_len: int, checksum: int, flags: int) -> bytes:
    """The HEADER_SIZE bytes a chunk file starts with: the record header, then zeros."""
    return encode_header(key, namespace, payload_len, checksum, flags).ljust(HEADER_SIZE, b"\0")


def file_size(payload_len: int, padded: bool) -> int:
    """Bytes on disk of a chunk file holding `payload_len` payload bytes."""
    return HEADER_SIZE + (_round_up(payload_len) if padded else payload_len)


def check_header_of_file(block: memoryview, key: bytes, namespace: bytes, payload_len: int, size: int) -> Header:
    """Check the header read from a file of `size` bytes against what the caller expects."""
    if len(block) < HEADER.size:
        raise BadRecord("wrong_file_size")
    header = check_header(block, key, namespace, payload_len)
    if size != file_size(payload_len, bool(header.flags & FLAG_PADDED)):
        raise BadRecord("wrong_file_size")
    return header


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _error_kind(exc: BaseException) -> str:
    """A counter label: the errno name of an OSError, else the exception's class name."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno_{exc.errno}")
    return type(exc).__name__


def _check_key(key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"key = {key!r} is not a chunk key: expected {KEY_BYTES} bytes")
    return key


def _block_aligned(view: memoryview) -> bool:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data % BLOCK == 0


def _advance(bufs: list[memoryview], done: int) -> list[memoryview]:
    """What is left of `bufs` after the first `done` bytes were moved."""
    while bufs and done >= len(bufs[0]):
        done -= len(bufs[0])
        bufs = bufs[1:]
    return [bufs[0][done:], *bufs[1:]] if bufs else bufs


Mover = Callable[[int, list[memoryview], int], int]  # os.preadv or os.pwritev


def move_all(move: Mover, fd: int, bufs: Sequence[memoryview], offset: int) -> int:
    """Run `move` (os.preadv or os.pwritev) until `bufs` are done or it moves nothing (end
    of file, for a read); returns the bytes moved."""
    left = [b for b in bufs if len(b)]
    total = 0
    while left:
        n = move(fd, left, offset + total)
        if n == 0:
            break
        total += n
        left = _advance(left, n)
    return total


def chunk_path(root: Path, key: bytes) -> Path:
    """Where the file of `key` lives under `root`: fanned out by the key's first byte.
    Another process can test a key's presence with it without opening the tier."""
    hex_key = _check_key(key).hex()
    return root / hex_key[:2] / hex_key


def is_tier_root(root: Path) -> bool:
    """Whether `root` is laid out as a disk tier's directory (its 256 sub-directories)."""
    return all((root / sub).is_dir() for sub in _FANOUT)


def numbered_roots(root: Path, prefix: str) -> list[Path]:
    """The tier roots `<prefix><N>` under `root`, by N: "shard" for a cache's shards,
    "rank" for the per-rank directories of format 1."""
    found = [p for p in root.glob(f"{prefix}*") if p.name[len(prefix) :].isdigit() and is_tier_root(p)]
    return sorted(found, key=lambda p: int(p.name[len(prefix) :]))


def scan_root(root: Path) -> tuple[list[tuple[int, bytes, int]], list[Path]]:
    """The chunk files under a tier's `root` as (mtime_ns, key, size), and the paths that
    are not usable chunk files: temp files, unparsable names, files too short to hold
    a header. Reads no file."""
    found, junk = [], []
    for sub in _FANOUT:
        with os.scandir(root / sub) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                if (
                    _CHUNK_NAME.fullmatch(entry.name)
                    and entry.name.startswith(sub)
                    and stat.S_ISREG(st.st_mode)
                    and st.st_size > HEADER_SIZE
                ):
                    found.append((st.st_mtime_ns, bytes.fromhex(entry.name), st.st_size))
                else:
                    junk.append(Path(entry.path))
    return found, junk


def read_file_header(path: Path) -> Fields:
    """The record header at the start of a chunk file (checked: magic, version, header
    checksum); raises BadRecord or OSError."""
    with open(path, "rb") as f:
        return read_header(f.read(HEADER.size))


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class DiskTier:
    """Chunk files under one root directory: an index with a byte cap, background writes
    that become visible only once complete, and checked reads into host slots.

    Thread-safe. `submit_write` callbacks run on the tier's write threads.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity_bytes: int,
        threads: int = 2,
        o_direct: bool = False,
        namespace: bytes = NO_NAMESPACE,
    ) -> None:
        """`namespace` (16 bytes) is written into every file's header and required of
        every file read: the fingerprint of the cache that owns the directory."""
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes = {capacity_bytes!r}: expected an int > 0")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads = {threads!r}: expected an int >= 1")
        if not isinstance(namespace, bytes) or len(namespace) != KEY_BYTES:
            raise ValueError(f"namespace = {namespace!r}: expected {KEY_BYTES} bytes (a namespace fingerprint)")
        self._namespace = namespace
        self._root = Path(root)
        self._lock_fd = self._claim_root()
        self._capacity = capacity_bytes
        self._o_direct = o_direct  # the format: files are padded for O_DIRECT
        self._direct = o_direct  # whether to still try O_DIRECT (off after an EINVAL)
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, oldest use first
        self._usage = 0
        self._reserved = 0  # sizes of writes in flight
        self._closed = False
        self._pending: set[Future[bool]] = set()
        self._temp_ids = itertools.count()
        self._counts: Counter[str] = Counter()
        self._writes_failed: Counter[str] = Counter()
        self._reads_corrupt: Counter[str] = Counter()
        self._reads_failed: Counter[str] = Counter()
        self._write_faults = FaultLog(log, f"disk writes under {self._root}")
        self._read_faults = FaultLog(log, f"disk reads under {self._root}")
        self._scan()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lmcache-disk")

    def _claim_root(self) -> int:
        """Create the root and its sub-directories and lock it for this tier; returns the lock fd."""
        try:
            self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._root / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self._unusable_root(exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for sub in _FANOUT:
                (self._root / sub).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            os.close(fd)
            if isinstance(exc, BlockingIOError):
                raise ValueError(
                    f"root = '{self._root}' is in use by another DiskTier; expected one tier per directory"
                ) from None
            raise self._unusable_root(exc) from exc
        return fd

    def _unusable_root(self, exc: OSError) -> ValueError:
        return ValueError(
            f"root = '{self._root}' cannot hold the disk cache ({exc.strerror}); "
            "expected a directory this process can create and write"
        )

    def _scan(self) -> None:
        """Index the chunk files already under the root, least recently used first;
        delete the files `scan_root` finds unusable."""
        found, junk = scan_root(self._root)
        for path in junk:
            _unlink_quietly(path)
        for _, key, size in sorted(found):
            self._index[key] = size
            self._usage += size
        self._counts["removed_at_start"] = len(junk)

    # ------------------------------------------------------------------ public API

    @property
    def capacity_bytes(self) -> int:
        self._check_open()
        return self._capacity

    @property
    def usage_bytes(self) -> int:
        """Bytes of the committed chunk files."""
        with self._lock:
            self._check_open()
            return self._usage

    def path_of(self, key: bytes) -> Path:
        """Where the file of `key` lives (whether or not it exists)."""
        return chunk_path(self._root, key)

    def contains(self, key: bytes) -> bool:
        """Whether a complete file of `key` is stored (its contents are checked on read)."""
        _check_key(key)
        with self._lock:
            self._check_open()
            return key in self._index

    def keys(self) -> list[bytes]:
        """The stored keys, least recently used first."""
        with self._lock:
            self._check_open()
            return list(self._index)

    def remove(self, key: bytes) -> bool:
        """Delete the file of `key`; False if it was not stored."""
        _check_key(key)
        with self._lock:
            self._check_open()
            return self._drop(key)

    def submit_write(self, key: bytes, payload: Any, on_done: Callable[[bool], None] | None = None) -> Future[bool]:
        """Write `payload` (a CPU tensor or buffer) as the file of `key` in the background.

        The caller keeps `payload` unchanged until `on_done(ok)` has run (on a write
        thread) and the returned future holds `ok`. A key already stored is not
        rewritten (ok is True). A failed write (disk full, I/O error, too large) is
        counted, leaves no file and gives ok False.
        """
        _check_key(key)
        view = byte_view(payload, "payload", writable=False)
        with self._lock:
            self._check_open()
            future = self._pool.submit(self._write_job, key, view, on_done)
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def read_into(self, key: bytes, out: Any) -> bool:
        """Read the payload of `key` into `out` (a writable CPU tensor or buffer whose
        size is the payload length). False on a miss: not stored, or the file failed a
        check (then it is deleted) or could not be read; `out` is then undefined."""
        _check_key(key)
        view = byte_view(out, "out", writable=True)
        with self._lock:
            self._check_open()
            if key not in self._index:
                self._counts["reads_miss"] += 1
                return False
        path = self.path_of(key)
        try:
            direct = self._read_file(path, key, view)
        except BadRecord as bad:
            with self._lock:
                self._reads_corrupt[bad.kind] += 1
            self._read_faults.failed(bad.kind, path)
            return False
        except FileNotFoundError:
            with self._lock:
                self._counts["reads_miss"] += 1
                if key in self._index and not path.exists():
                    self._usage -= self._index.pop(key)
            return False
        except OSError as exc:
            with self._lock:
                self._reads_failed[_error_kind(exc)] += 1
            self._read_faults.failed(_error_kind(exc), exc)
            return False
        self._read_faults.succeeded()
        with self._lock:
            self._counts["reads_hit"] += 1
            self._counts["direct_reads"] += direct
            if key in self._index:
                self._index.move_to_end(key)
        self._stamp(key)
        return True

    def verify(self, key: bytes) -> str | None:
        """Check the whole file of `key` (header, size, payload checksum) against what its
        own header says, whatever namespace wrote it; delete it when a check fails.
        Returns the failed check's kind, or None; an OSError while reading propagates
        and the file stays. For ``python -m lmcache_ext verify``."""
        path = self.path_of(key)
        try:
            fields = read_file_header(path)
            if fields.key != key:
                raise BadRecord("wrong_key")
        except BadRecord as bad:
            with self._lock:
                self._drop(key)
            return bad.kind
        try:
            self._read_checked(
                path, key, memoryview(bytearray(fields.payload_len)), direct=False, namespace=fields.namespace
            )
        except BadRecord as bad:
            return bad.kind  # deleted by _read_checked
        return None

    def clear(self) -> int:
        """Forget every stored chunk and delete its file in the background (a cache
        reset); returns how many. `flush` waits for the deletions too. A write already
        in flight still commits its file afterwards."""
        with self._lock:
            self._check_open()
            keys = list(self._index)
            self._index.clear()
            self._usage = 0
            self._counts["cleared"] += len(keys)
            future = self._pool.submit(self._delete_files, keys)
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return len(keys)

    def flush(self) -> None:
        """Wait until every write (and deletion) submitted before this call has finished."""
        with self._lock:
            self._check_open()
            pending = list(self._pending)
        wait(pending)

    def close(self) -> None:
        """Finish pending writes, stop the write threads and release the root.
        Later calls other than close() raise RuntimeError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
        wait(pending)
        self._pool.shutdown(wait=True)
        os.close(self._lock_fd)

    def stats(self) -> dict[str, Any]:
        """Counters for metrics; the *_failed and reads_corrupt entries map kind -> count."""
        with self._lock:
            self._check_open()
            return {
                "writes_ok": self._counts["writes_ok"],
                "writes_skipped": self._counts["writes_skipped"],
                "writes_failed": dict(self._writes_failed),
                "reads_hit": self._counts["reads_hit"],
                "reads_miss": self._counts["reads_miss"],
                "reads_corrupt": dict(self._reads_corrupt),
                "reads_failed": dict(self._reads_failed),
                "cleared": self._counts["cleared"],
                "removed_at_start": self._counts["removed_at_start"],
                "direct_writes": self._counts["direct_writes"],
                "direct_reads": self._counts["direct_reads"],
                "usage_bytes": self._usage,
                "capacity_bytes": self._capacity,
                "files": len(self._index),
            }

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("disk tier is closed")

    def _forget(self, future: Future[bool]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _stamp(self, key: bytes) -> None:
        """Record a use in the file's mtime, which orders the index after a restart (a
        nanosecond clock, finer than the filesystem's own write stamps)."""
        now = time.time_ns()
        try:
            os.utime(self.path_of(key), ns=(now, now))
        except OSError:
            pass

    def _drop(self, key: bytes) -> bool:
        """Forget `key` and delete its file; the caller holds the lock."""
        size = self._index.pop(key, None)
        if size is None:
            return False
        self._usage -= size
        _unlink_quietly(self.path_of(key))
        return True

    def _delete_files(self, keys: list[bytes]) -> bool:
        for key in keys:
            _unlink_quietly(self.path_of(key))
        return True

    def _disable_direct(self, exc: OSError) -> None:
        if self._direct:
            self._direct = False
            log.info("O_DIRECT is not supported under %s (%s); using buffered I/O", self._root, exc)

    def _write_job(self, key: bytes, payload: memoryview, on_done: Callable[[bool], None] | None) -> bool:
        ok = self._store(key, payload)
        if ok:
            self._write_faults.succeeded()
        if on_done is not None:
            try:
                on_done(ok)
            except Exception:
                log.exception("on_done of the disk write of key %s raised", key.hex())
        return ok

    def _store(self, key: bytes, payload: memoryview) -> bool:
        size = file_size(len(payload), self._o_direct)
        with self._lock:
            if key in self._index:
                self._counts["writes_skipped"] += 1
                return True
            taken = self._usage + self._reserved
            full = "too_large" if size > self._capacity else "no_room" if taken + size > self._capacity else ""
            if full:
                self._writes_failed[full] += 1
                self._write_faults.failed(full, f"{size} bytes, {self._capacity - taken} free of {self._capacity}")
                return False
            self._reserved += size
        path = self.path_of(key)
        temp = path.with_name(f"{path.name}.{next(self._temp_ids)}.tmp")
        try:
            direct = self._write_file(temp, key, payload)
        except Exception as exc:
            if not isinstance(exc, OSError):
                log.exception("disk write of key %s failed", key.hex())
            _unlink_quietly(temp)
            with self._lock:
                self._reserved -= size
                self._writes_failed[_error_kind(exc)] += 1
            self._write_faults.failed(_error_kind(exc), exc)
            return False
        with self._lock:
            self._reserved -= size
            if key in self._index:
                _unlink_quietly(temp)
                self._counts["writes_skipped"] += 1
                return True
            try:
                os.replace(temp, path)
            except OSError as exc:
                _unlink_quietly(temp)
                self._writes_failed[_error_kind(exc)] += 1
                self._write_faults.failed(_error_kind(exc), exc)
                return False
            self._index[key] = size
            self._usage += size
            self._counts["writes_ok"] += 1
            self._counts["direct_writes"] += direct
        self._stamp(key)
        return True

    def _write_file(self, path: Path, key: bytes, payload: memoryview) -> bool:
        """Write the whole chunk file at `path`; returns whether O_DIRECT was used."""
        flags = FLAG_PADDED if self._o_direct else 0
        header = disk_header(key, self._namespace, len(payload), payload_checksum(payload), flags)
        if self._direct and _block_aligned(payload):
            body = len(payload) - len(payload) % BLOCK
            pages = memoryview(mmap.mmap(-1, 2 * BLOCK))  # page-aligned: header and last partial block
            pages[:HEADER_SIZE] = header
            pages[BLOCK : BLOCK + len(payload) - body] = payload[body:]
            tail = [pages[BLOCK:]] if body < len(payload) else []
            try:
                _write_new(path, [pages[:HEADER_SIZE], payload[:body], *tail], os.O_DIRECT)
                return True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _unlink_quietly(path)
                self._disable_direct(exc)
        padding = [memoryview(bytes(_round_up(len(payload)) - len(payload)))] if self._o_direct else []
        _write_new(path, [memoryview(header), payload, *padding], 0)
        return False

    def _read_file(self, path: Path, key: bytes, out: memoryview) -> bool:
        """Read and check the file of `key` into `out`; returns whether O_DIRECT was used.
        A failed check deletes the file (if it is still the indexed one) and raises BadRecord."""
        if self._direct and _block_aligned(out):
            try:
                self._read_checked(path, key, out, direct=True)
                return True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._disable_direct(exc)
        self._read_checked(path, key, out, direct=False)
        return False

    def _read_checked(
        self, path: Path, key: bytes, out: memoryview, direct: bool, namespace: bytes | None = None
    ) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
        try:
            st = os.fstat(fd)
            try:
                _read_payload(fd, st.st_size, key, self._namespace if namespace is None else namespace, out, direct)
            except BadRecord:
                self._delete_bad(key, path, st)
                raise
        finally:
            os.close(fd)

    def _delete_bad(self, key: bytes, path: Path, opened: os.stat_result) -> None:
        """Delete a file that failed a check, unless a new file of `key` has replaced it."""
        with self._lock:
            try:
                current = os.stat(path)
            except OSError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                self._drop(key)


def _write_new(path: Path, bufs: Sequence[memoryview], extra_flags: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | extra_flags, 0o600)
    try:
        if move_all(os.pwritev, fd, bufs, 0) < sum(len(b) for b in bufs):
            raise OSError(errno.EIO, f"could not write all of {path}")
    finally:
        os.close(fd)


def _read_payload(fd: int, size: int, key: bytes, namespace: bytes, out: memoryview, direct: bool) -> None:
    """Read header and payload in one request (one device round trip, not two: with O_DIRECT
    each of a prompt's many small chunk files paid for the second), then check the header
    and the payload's checksum; `out` holds whatever the file held when a check fails. With
    `direct` every read is block-aligned: the last partial block goes through a bounce page."""
    n = len(out)
    pages = memoryview(mmap.mmap(-1, 2 * BLOCK))  # page-aligned: header and last partial block
    body = n - n % BLOCK if direct else n
    tail = [pages[BLOCK:]] if body < n else []
    got = move_all(os.preadv, fd, [pages[:HEADER_SIZE], out[:body], *tail], 0)
    header = check_header_of_file(pages[: min(got, HEADER.size)], key, namespace, n, size)
    if got < HEADER_SIZE + n:
        raise BadRecord("wrong_file_size")  # the file shrank after the size check
    out[body:] = pages[BLOCK : BLOCK + n - body]
    check_payload(out, header)


class DiskReader(ReplicaIO):
    """Reads the chunk files another process's `DiskTier` owns (a replica reads its
    shard's writer's): no index, no lock on the root, no writes; the planner's ledger
    says what is there, and the owner deletes a file that fails a check."""

    def __init__(self, root: str | os.PathLike[str], namespace: bytes) -> None:
        super().__init__()
        self._root = Path(root)
        self._namespace = namespace

    def read_into(self, key: bytes, out: Any) -> bool:
        """Read the payload of `key` into `out`; False when it is missing or fails a check."""
        view = byte_view(out, "out", writable=True)
        try:
            fd = os.open(chunk_path(self._root, key), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            _read_payload(fd, os.fstat(fd).st_size, key, self._namespace, view, False)
            return True
        except (BadRecord, OSError):
            return False
        finally:
            os.close(fd)


def _open_io(setup: TierSetup) -> TierIO:
    config = setup.config
    assert config.local_disk is not None, "the disk tier is opened only when local_disk is set"
    if setup.reads_only:
        return DiskReader(shard_root(config.local_disk, setup.rank), setup.namespace)
    return DiskTier(
        shard_root(config.local_disk, setup.rank),
        max(config.disk_bytes // setup.geometry.writers, 1),
        threads=config.disk_io_threads,
        o_direct=config.disk_o_direct,
        namespace=setup.namespace,
    )


def _open_holdings(setup: TierSetup) -> TierHoldings:
    from lmcache_ext.tiers.disk_ledger import DiskLedger

    config = setup.config
    assert config.local_disk is not None, "the disk tier is opened only when local_disk is set"
    _note_old_format(Path(config.local_disk))
    roots = [shard_root(config.local_disk, rank) for rank in setup.holders]
    return DiskLedger(roots, max(config.disk_bytes // setup.geometry.writers, 1), padded=config.disk_o_direct)


def _note_old_format(root: Path) -> None:
    """One log line for the per-rank directories of format 1 (`keys.FORMAT_VERSION`):
    their keys name another format, so they are never read, and never deleted here."""
    old = [p.name for p in numbered_roots(root, "rank")]
    if old:
        log.warning(
            "lmcache_ext: %s holds chunks of an older format in %s (one directory per TP rank); they are "
            "ignored, and the space is the operator's to free",
            root,
            ", ".join(old),
        )


TIER = TierKind(
    name=Source.DISK,
    hit_source="disk",
    configured=lambda config: bool(config.local_disk),
    open_io=_open_io,
    open_holdings=_open_holdings,
    describe=lambda config: f"disk {config.local_disk} ({format_bytes(config.disk_bytes)})",
    read_threads=lambda config: config.disk_io_threads,
)
