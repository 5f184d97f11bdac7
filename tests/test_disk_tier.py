"""The local-disk tier: byte-exact round trips, restart, LRU under a cap, every kind of
bad file as a counted miss, write faults that cost only the store, and close."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
import xxhash

from lmcache_ext.testing.filesystems import direct_io_supported
from lmcache_ext.tiers import disk
from lmcache_ext.tiers.disk import DiskTier

GiB = 1 << 30
SIZES = [1, 4095, 4096, (1 << 20) + 3]
# Byte offsets of the header fields, from the layout "<8sHH16s16sQQQ".
MAGIC_AT, VERSION_AT, FLAGS_AT, KEY_AT, NAMESPACE_AT, LENGTH_AT, PAYLOAD_SUM_AT, HEADER_SUM_AT = (
    0,
    8,
    10,
    12,
    28,
    44,
    52,
    60,
)


def key(i: int) -> bytes:
    return xxhash.xxh3_128_digest(str(i).encode())


def slot(n: int, seed: int | None = None, aligned: bool = True) -> torch.Tensor:
    """A host slot of `n` bytes over page-aligned memory (or 1 byte past it), random if seeded."""
    offset = 0 if aligned else 1
    t = torch.frombuffer(mmap.mmap(-1, n + offset), dtype=torch.uint8, count=n, offset=offset)
    if seed is not None:
        t.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    return t


def chunk_files(root: Path) -> list[Path]:
    """Every file below the fan-out directories, temp files included."""
    return sorted(p for p in root.glob("*/*") if p.is_file())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def make_tier(root: Path):
    tiers: list[DiskTier] = []

    def make(
        capacity: int = GiB,
        threads: int = 2,
        o_direct: bool = False,
        at: Path | None = None,
        namespace: bytes = disk.NO_NAMESPACE,
    ) -> DiskTier:
        tier = DiskTier(at or root, capacity, threads=threads, o_direct=o_direct, namespace=namespace)
        tiers.append(tier)
        return tier

    yield make
    for tier in tiers:
        tier.close()


def store(tier: DiskTier, k: bytes, payload: torch.Tensor) -> None:
    assert tier.submit_write(k, payload).result(timeout=30) is True


def read_back(tier: DiskTier, k: bytes, n: int, aligned: bool = True) -> torch.Tensor | None:
    out = slot(n, aligned=aligned)
    return out if tier.read_into(k, out) else None


def test_header_layout_is_fixed():
    assert disk.HEADER.format == "<8sHH16s16sQQQ"
    assert disk.HEADER.size == HEADER_SUM_AT + 8
    assert disk.HEADER_SIZE == 4096


@pytest.mark.parametrize("o_direct", [False, True], ids=["buffered", "o_direct"])
def test_a_read_asks_for_header_and_payload_in_one_request(make_tier, monkeypatch, o_direct):
    tier = make_tier(o_direct=o_direct)
    n = 3 * 4096 + 100  # a last partial block: through the bounce page with O_DIRECT
    payload = slot(n, seed=5)
    store(tier, key(5), payload)
    offsets, real = [], os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, at: offsets.append(at) or real(fd, bufs, at))
    out = read_back(tier, key(5), n)
    assert out is not None and torch.equal(out, payload)
    assert offsets == [0]


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("o_direct", [False, True], ids=["buffered", "o_direct"])
@pytest.mark.parametrize("n", SIZES)
def test_round_trip_is_byte_exact(make_tier, root, n, o_direct, aligned):
    tier = make_tier(o_direct=o_direct)
    payload = slot(n, seed=n, aligned=aligned)
    done = []
    future = tier.submit_write(key(n), payload, done.append)
    assert future.result(timeout=30) is True
    assert done == [True]
    out = read_back(tier, key(n), n, aligned)
    assert out is not None and torch.equal(out, payload)

    padded = -(-n // 4096) * 4096 if o_direct else n
    assert tier.path_of(key(n)).stat().st_size == 4096 + padded
    assert tier.usage_bytes == 4096 + padded
    direct = int(o_direct and aligned and direct_io_supported(root))
    stats = tier.stats()
    assert (stats["direct_writes"], stats["direct_reads"]) == (direct, direct)
    assert (stats["writes_ok"], stats["reads_hit"], stats["files"]) == (1, 1, 1)


def test_buffers_other_than_byte_tensors(make_tier):
    tier = make_tier()
    data = os.urandom(3001)
    assert tier.submit_write(key(1), data).result(timeout=30)
    out = bytearray(3001)
    assert tier.read_into(key(1), out) and bytes(out) == data

    halves = torch.randn(1000, dtype=torch.float16)
    store(tier, key(2), halves)
    got = torch.empty(1000, dtype=torch.float16)
    assert tier.read_into(key(2), got) and torch.equal(got.view(torch.int16), halves.view(torch.int16))


@pytest.mark.parametrize(("written_with", "read_with"), [(True, False), (False, True)])
def test_files_read_back_whatever_the_o_direct_setting(make_tier, root, written_with, read_with):
    n = 3 * 4096 + 100
    payload = slot(n, seed=7)
    with DiskTier(root, GiB, o_direct=written_with) as writer:
        store(writer, key(0), payload)
    reader = make_tier(o_direct=read_with)
    out = read_back(reader, key(0), n)
    assert out is not None and torch.equal(out, payload)


def test_restart_keeps_keys_bytes_and_lru_order(make_tier, root):
    payloads = {i: slot(10_000 + i, seed=i) for i in range(3)}
    with DiskTier(root, GiB) as first:
        for i, p in payloads.items():
            store(first, key(i), p)
        assert read_back(first, key(0), payloads[0].numel()) is not None  # a hit: the most recently used
        assert first.keys() == [key(1), key(2), key(0)]

    second = make_tier()
    assert second.keys() == [key(1), key(2), key(0)]
    assert second.usage_bytes == sum(4096 + p.numel() for p in payloads.values())
    for i, p in payloads.items():
        assert second.contains(key(i))
        out = read_back(second, key(i), p.numel())
        assert out is not None and torch.equal(out, p)


def test_a_write_past_the_capacity_is_refused_and_nothing_is_evicted(make_tier, root):
    n = 10_000
    tier = make_tier(capacity=3 * (4096 + n))
    for i in range(3):
        store(tier, key(i), slot(n, seed=i))
    done = []
    assert tier.submit_write(key(3), slot(n, seed=3), done.append).result(timeout=30) is False
    assert done == [False] and tier.stats()["writes_failed"] == {"no_room": 1}
    assert tier.keys() == [key(0), key(1), key(2)] and len(chunk_files(root)) == 3  # the planner evicts, not the tier
    assert tier.remove(key(0)) is True
    store(tier, key(3), slot(n, seed=3))
    assert tier.keys() == [key(1), key(2), key(3)]


def test_object_bigger_than_the_capacity_is_not_stored(make_tier, root):
    tier = make_tier(capacity=8192)
    done = []
    assert tier.submit_write(key(0), slot(5000, seed=0), done.append).result(timeout=30) is False
    assert done == [False]
    assert tier.stats()["writes_failed"] == {"too_large": 1}
    assert not tier.contains(key(0)) and chunk_files(root) == []
    store(tier, key(1), slot(4000, seed=1))


def test_write_of_a_stored_key_is_skipped(make_tier):
    tier = make_tier()
    first = slot(5000, seed=1)
    store(tier, key(0), first)
    inode = tier.path_of(key(0)).stat().st_ino
    store(tier, key(0), slot(5000, seed=2))
    assert tier.path_of(key(0)).stat().st_ino == inode
    out = read_back(tier, key(0), 5000)
    assert out is not None and torch.equal(out, first)
    assert (tier.stats()["writes_ok"], tier.stats()["writes_skipped"]) == (1, 1)


def test_remove(make_tier, root):
    tier = make_tier()
    store(tier, key(0), slot(5000, seed=0))
    assert tier.remove(key(0)) is True
    assert not tier.contains(key(0)) and chunk_files(root) == [] and tier.usage_bytes == 0
    assert tier.remove(key(0)) is False


def test_clear_forgets_every_key_at_once_and_deletes_the_files_in_the_background(make_tier, root):
    tier = make_tier()
    for i in range(5):
        store(tier, key(i), slot(5000, seed=i))
    assert tier.clear() == 5
    assert tier.keys() == [] and tier.usage_bytes == 0 and read_back(tier, key(0), 5000) is None
    tier.flush()
    assert chunk_files(root) == [] and tier.stats()["cleared"] == 5
    store(tier, key(0), slot(5000, seed=9))  # the tier keeps working
    assert torch.equal(read_back(tier, key(0), 5000), slot(5000, seed=9))
    tier.close()
    assert make_tier(at=root).keys() == [key(0)]


def test_a_file_written_under_another_namespace_is_a_miss(make_tier, root):
    tier = make_tier(namespace=b"A" * 16)
    store(tier, key(0), slot(5000, seed=0))
    tier.close()
    other = make_tier(namespace=b"B" * 16)
    assert other.read_into(key(0), slot(5000)) is False
    assert other.stats()["reads_corrupt"] == {"wrong_namespace": 1}
    with pytest.raises(ValueError, match=r"namespace = b'short': expected 16 bytes"):
        make_tier(namespace=b"short", at=root / "elsewhere")


def test_directories_and_files_are_private_to_the_owner(make_tier, root):
    tier = make_tier()
    store(tier, key(0), slot(100, seed=0))
    assert root.stat().st_mode & 0o777 == 0o700
    assert tier.path_of(key(0)).parent.stat().st_mode & 0o777 == 0o700
    assert tier.path_of(key(0)).stat().st_mode & 0o777 == 0o600


def flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x40]))


def overwrite(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


N = 5000
CORRUPTIONS = {
    "payload_byte": (lambda p, other: flip(p, 4096 + N // 2), "bad_payload_checksum"),
    "last_payload_byte": (lambda p, other: flip(p, 4096 + N - 1), "bad_payload_checksum"),
    "magic": (lambda p, other: flip(p, MAGIC_AT), "bad_magic"),
    "version": (lambda p, other: overwrite(p, VERSION_AT, struct.pack("<H", 1)), "bad_version"),
    "unknown_flag": (lambda p, other: overwrite(p, FLAGS_AT, struct.pack("<H", 0x8000)), "bad_version"),
    "key_field": (lambda p, other: flip(p, KEY_AT + 3), "bad_header_checksum"),
    "namespace_field": (lambda p, other: flip(p, NAMESPACE_AT + 5), "bad_header_checksum"),
    "length_field": (lambda p, other: flip(p, LENGTH_AT), "bad_header_checksum"),
    "payload_checksum_field": (lambda p, other: flip(p, PAYLOAD_SUM_AT), "bad_header_checksum"),
    "header_checksum_field": (lambda p, other: flip(p, HEADER_SUM_AT + 7), "bad_header_checksum"),
    "truncated_payload": (lambda p, other: os.truncate(p, p.stat().st_size - 1), "wrong_file_size"),
    "truncated_header": (lambda p, other: os.truncate(p, 30), "wrong_file_size"),
    "bytes_appended": (lambda p, other: append(p, b"\0"), "wrong_file_size"),
    "file_of_another_key": (lambda p, other: shutil.copyfile(other, p), "wrong_key"),
}


@pytest.mark.parametrize("o_direct", [False, True], ids=["buffered", "o_direct"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_file_is_a_counted_miss_and_is_deleted(make_tier, root, case, o_direct):
    corrupt, kind = CORRUPTIONS[case]
    tier = make_tier(o_direct=o_direct)
    store(tier, key(0), slot(N, seed=0))
    store(tier, key(1), slot(N, seed=1))
    path = tier.path_of(key(0))
    corrupt(path, tier.path_of(key(1)))

    out = slot(N, seed=99)
    assert tier.read_into(key(0), out) is False
    assert not path.exists()
    assert not tier.contains(key(0))
    stats = tier.stats()
    assert stats["reads_corrupt"] == {kind: 1}
    assert (stats["reads_hit"], stats["reads_miss"], stats["files"]) == (0, 0, 1)
    assert tier.usage_bytes == tier.path_of(key(1)).stat().st_size
    assert tier.read_into(key(0), out) is False
    assert tier.stats()["reads_miss"] == 1


def test_length_other_than_the_callers_is_a_miss(make_tier):
    tier = make_tier()
    store(tier, key(0), slot(N, seed=0))
    assert tier.read_into(key(0), slot(N - 1)) is False
    assert tier.stats()["reads_corrupt"] == {"wrong_length": 1}
    assert not tier.path_of(key(0)).exists() and not tier.contains(key(0))


def test_vanished_file_is_a_miss_and_leaves_the_index(make_tier):
    tier = make_tier()
    store(tier, key(0), slot(N, seed=0))
    tier.path_of(key(0)).unlink()
    assert tier.read_into(key(0), slot(N)) is False
    assert not tier.contains(key(0)) and tier.usage_bytes == 0
    assert tier.stats()["reads_miss"] == 1


def test_read_error_is_a_miss_that_keeps_the_file(make_tier, monkeypatch):
    tier = make_tier()
    payload = slot(N, seed=0)
    store(tier, key(0), payload)

    def failing_read(fd, bufs, offset):
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "preadv", failing_read)
        assert tier.read_into(key(0), slot(N)) is False
    assert tier.stats()["reads_failed"] == {"EIO": 1}
    assert tier.contains(key(0))
    out = read_back(tier, key(0), N)
    assert out is not None and torch.equal(out, payload)


def test_leftover_and_foreign_files_are_removed_at_start_and_never_read(make_tier, root):
    with DiskTier(root, GiB) as first:
        store(first, key(0), slot(N, seed=0))
        store(first, key(1), slot(N, seed=1))
        final = first.path_of(key(1))
        shutil.copyfile(final, final.with_name(final.name + ".3.tmp"))  # a killed writer's temp file
        first.remove(key(1))
        misplaced = root / ("00" if key(2).hex()[:2] != "00" else "01") / key(2).hex()
        shutil.copyfile(first.path_of(key(0)), misplaced)
        (final.parent / "notes.txt").write_bytes(b"not a chunk")
        first.path_of(key(3)).write_bytes(b"too short for a header")

    tier = make_tier()
    assert tier.stats()["removed_at_start"] == 4
    assert chunk_files(root) == [tier.path_of(key(0))]
    assert tier.keys() == [key(0)]
    for k in (key(1), key(2), key(3)):
        assert not tier.contains(k)
        assert tier.read_into(k, slot(N)) is False
    assert tier.stats()["reads_miss"] == 3


def test_disk_full_fails_the_store_only(make_tier, root, monkeypatch):
    tier = make_tier()
    real_pwritev = os.pwritev
    seen_temp = []

    def full_after_the_header(fd, bufs, offset):
        if offset == 0:
            return real_pwritev(fd, bufs[:1], offset)
        seen_temp.extend(chunk_files(root))
        raise OSError(errno.ENOSPC, "No space left on device")

    done = []
    with monkeypatch.context() as patch:
        patch.setattr(os, "pwritev", full_after_the_header)
        assert tier.submit_write(key(0), slot(N, seed=0), done.append).result(timeout=30) is False
    assert done == [False]
    assert [p.name.endswith(".tmp") for p in seen_temp] == [True]  # the partial file existed...
    assert chunk_files(root) == []  # ...and is gone
    assert not tier.contains(key(0)) and tier.usage_bytes == 0
    assert tier.stats()["writes_failed"] == {"ENOSPC": 1}

    payload = slot(N, seed=1)
    store(tier, key(0), payload)
    out = read_back(tier, key(0), N)
    assert out is not None and torch.equal(out, payload)


def test_unwritable_directory_fails_the_store_only(make_tier, root):
    tier = make_tier()
    blocked = tier.path_of(key(0)).parent
    blocked.rmdir()
    blocked.write_bytes(b"")  # the fan-out directory is now a file: ENOTDIR
    done = []
    assert tier.submit_write(key(0), slot(N, seed=0), done.append).result(timeout=30) is False
    assert done == [False] and not tier.contains(key(0))
    assert tier.stats()["writes_failed"] == {"ENOTDIR": 1}
    other = next(i for i in range(1, 100) if key(i)[0] != key(0)[0])
    store(tier, key(other), slot(N, seed=1))
    assert tier.contains(key(other))


def test_o_direct_falls_back_to_buffered_on_einval(make_tier, monkeypatch):
    real_open = os.open
    direct_opens = []

    def no_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            direct_opens.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    tier = make_tier(o_direct=True)
    payloads = [slot(n, seed=n) for n in SIZES]
    for i, p in enumerate(payloads):
        store(tier, key(i), p)
    for i, p in enumerate(payloads):
        out = read_back(tier, key(i), p.numel())
        assert out is not None and torch.equal(out, p)
    assert len(direct_opens) == 1  # tried once, then buffered for good
    stats = tier.stats()
    assert (stats["direct_writes"], stats["direct_reads"], stats["writes_ok"]) == (0, 0, len(SIZES))


def test_concurrent_writes_from_several_threads(make_tier):
    tier = make_tier(threads=3)
    payloads = {t * 100 + i: slot(1000 + 4093 * i + t, seed=t * 100 + i) for t in range(4) for i in range(8)}
    futures = {}

    def submit(thread: int) -> None:
        for i in range(8):
            futures[thread * 100 + i] = tier.submit_write(key(thread * 100 + i), payloads[thread * 100 + i])

    threads = [threading.Thread(target=submit, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tier.flush()
    assert all(f.done() and f.result() is True for f in futures.values())
    for i, p in payloads.items():
        out = read_back(tier, key(i), p.numel())
        assert out is not None and torch.equal(out, p)
    assert tier.stats()["writes_ok"] == len(payloads)
    assert tier.usage_bytes == sum(4096 + p.numel() for p in payloads.values())


class GatedWrites:
    """Holds every pwritev until released, so a write can be seen in flight."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self._pwritev = os.pwritev

    def __call__(self, fd, bufs, offset):
        self.entered.set()
        assert self.release.wait(30)
        return self._pwritev(fd, bufs, offset)


def test_key_is_invisible_until_its_file_is_complete(make_tier, root, monkeypatch):
    size = 4096 + N
    tier = make_tier(capacity=size + size // 2)
    gate = GatedWrites()
    monkeypatch.setattr(os, "pwritev", gate)
    payload = slot(N, seed=0)
    future = tier.submit_write(key(0), payload)
    assert gate.entered.wait(30)

    assert not tier.contains(key(0)) and tier.keys() == []
    assert tier.read_into(key(0), slot(N)) is False
    assert [p.name.endswith(".tmp") for p in chunk_files(root)] == [True]
    assert not tier.path_of(key(0)).exists()
    # The write in flight holds its room: another one does not fit under the cap.
    assert tier.submit_write(key(1), slot(N, seed=1)).result(timeout=30) is False
    assert tier.stats()["writes_failed"] == {"no_room": 1}

    gate.release.set()
    assert future.result(timeout=30) is True
    assert tier.contains(key(0)) and chunk_files(root) == [tier.path_of(key(0))]
    out = read_back(tier, key(0), N)
    assert out is not None and torch.equal(out, payload)


def test_failing_on_done_does_not_stop_the_tier(make_tier):
    tier = make_tier()

    def broken(ok: bool) -> None:
        raise RuntimeError("callback bug")

    assert tier.submit_write(key(0), slot(N, seed=0), broken).result(timeout=30) is True
    assert tier.contains(key(0))
    store(tier, key(1), slot(N, seed=1))


def test_close_waits_for_writes_and_later_calls_raise(make_tier, root, monkeypatch):
    tier = make_tier()
    gate = GatedWrites()
    monkeypatch.setattr(os, "pwritev", gate)
    future = tier.submit_write(key(0), slot(N, seed=0))
    assert gate.entered.wait(30)
    closer = threading.Thread(target=tier.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # close() is waiting on the gated write
    gate.release.set()
    closer.join(30)
    assert not closer.is_alive()
    assert future.done() and future.result() is True
    assert tier.path_of(key(0)).exists()

    calls = [
        lambda: tier.submit_write(key(1), slot(N)),
        lambda: tier.read_into(key(0), slot(N)),
        lambda: tier.contains(key(0)),
        lambda: tier.remove(key(0)),
        lambda: tier.keys(),
        lambda: tier.flush(),
        lambda: tier.stats(),
        lambda: tier.usage_bytes,
        lambda: tier.capacity_bytes,
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="disk tier is closed"):
            call()
    tier.close()
    assert make_tier().contains(key(0))  # the root was released and the file kept


def test_one_tier_per_root(make_tier, root):
    make_tier()
    with pytest.raises(ValueError, match=r"root = '.*cache' is in use by another DiskTier"):
        DiskTier(root, GiB)


def test_constructor_validates_its_arguments(tmp_path, root):
    for capacity in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"capacity_bytes = {capacity!r}: expected an int > 0"):
            DiskTier(root, capacity)
    for threads in (0, -2, 2.0):
        with pytest.raises(ValueError, match=rf"threads = {threads!r}: expected an int >= 1"):
            DiskTier(root, GiB, threads=threads)
    assert not root.exists()  # nothing was created for a bad argument

    (tmp_path / "a_file").write_bytes(b"")
    bad_root = tmp_path / "a_file" / "cache"
    with pytest.raises(ValueError, match=rf"root = '{bad_root}' cannot hold the disk cache \(Not a directory\)"):
        DiskTier(bad_root, GiB)


def test_bad_arguments_raise_before_anything_is_written(make_tier, root):
    tier = make_tier()
    with pytest.raises(ValueError, match=r"key = b'short' is not a chunk key: expected 16 bytes"):
        tier.submit_write(b"short", slot(N))
    with pytest.raises(ValueError, match=r"key = 7 is not a chunk key"):
        tier.contains(7)
    with pytest.raises(ValueError, match="payload is empty; expected at least 1 byte"):
        tier.submit_write(key(0), b"")
    with pytest.raises(ValueError, match="payload is a list; expected a CPU torch.Tensor or a buffer"):
        tier.submit_write(key(0), [1, 2, 3])
    with pytest.raises(ValueError, match=r"payload with shape \(4, 4\) and strides \(1, 4\) is not contiguous"):
        tier.submit_write(key(0), torch.zeros(4, 4, dtype=torch.uint8).t())
    with pytest.raises(ValueError, match="out is read-only; expected a writable buffer"):
        tier.read_into(key(0), bytes(10))
    assert chunk_files(root) == [] and tier.stats()["writes_ok"] == 0


def test_a_replicas_reader_reads_the_owners_files_while_it_runs_and_misses_bad_ones_without_deleting(make_tier, root):
    owner = make_tier(namespace=b"A" * 16)  # holds the root's lock: the reader takes none
    payload = slot(5000, seed=3)
    store(owner, key(0), payload)
    reader = disk.DiskReader(root, b"A" * 16)
    out = slot(5000)
    assert reader.read_into(key(0), out) and torch.equal(out, payload)
    assert reader.read_into(key(1), slot(5000)) is False  # never written
    assert disk.DiskReader(root, b"B" * 16).read_into(key(0), slot(5000)) is False  # another cache's
    path = owner.path_of(key(0))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert reader.read_into(key(0), slot(5000)) is False and path.exists()  # the owner deletes bad files
    assert reader.submit_write(key(2), payload).result() and not owner.path_of(key(2)).exists()
    assert reader.remove(key(0)) is False and reader.clear() == 0 and path.exists()
    owner.close()
