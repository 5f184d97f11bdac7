"""Chunks in flight between a prefill and a decode instance (lmcache_ext.tiers.in_flight):
the consumer's deadlines on a fake clock, then the producer's marks and the consumer's
waits on real servers: a mark is waited for until its chunk lands or the deadline
passes, an expired mark not at all, and a dead server costs a miss, never a hang."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest

from lmcache_ext.tiers.in_flight import PendingChunks

WAIT_S, TTL_S = 1.0, 10.0
A, B, C = b"a" * 16, b"b" * 16, b"c" * 16


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pending(clock: Clock) -> PendingChunks:
    return PendingChunks(WAIT_S, TTL_S, clock=clock)


# -- PendingChunks, without the network --


def test_a_marked_missing_chunk_is_in_flight_until_it_lands(pending, clock):
    assert pending.settle(A, present=False, marked=True) is None
    clock.now += WAIT_S * 0.9
    assert pending.settle(A, present=False, marked=True) is None
    assert pending.waiting() == 1
    assert pending.settle(A, present=True, marked=False) is True
    assert pending.waiting() == 0 and pending.waited_out == 0


def test_a_marked_chunk_still_missing_at_its_deadline_is_a_miss(pending, clock):
    assert pending.settle(A, present=False, marked=True) is None
    clock.now += WAIT_S
    assert pending.settle(A, present=False, marked=True) is False
    assert pending.waited_out == 1 and pending.waiting() == 0


def test_a_failed_probe_keeps_a_chunk_seen_in_flight_waiting_and_misses_any_other(pending, clock):
    """A store that cannot be asked once (a loaded machine) must not cost a hit already on
    its way; one that cannot be asked about a chunk nobody saw coming is a miss at once."""
    assert pending.settle(A, present=False, marked=True) is None
    assert pending.unreachable(A) is None  # still waited for
    assert pending.settle(A, present=True, marked=False) is True  # and it lands
    pending.expect([B])
    assert pending.unreachable(B) is False  # named, but never seen in flight
    assert pending.unreachable(C) is False
    assert pending.settle(A, present=False, marked=True) is None
    clock.now += WAIT_S
    assert pending.unreachable(A) is False and pending.waiting() == 0  # past its deadline


def test_a_waited_out_mark_is_not_waited_for_again_until_it_would_have_expired(pending, clock):
    pending.settle(A, present=False, marked=True)
    clock.now += WAIT_S
    assert pending.settle(A, present=False, marked=True) is False  # given up: its mark expires at now + TTL_S
    clock.now += TTL_S - 0.01
    assert pending.settle(A, present=False, marked=True) is False  # at once: no second wait
    assert pending.waited_out == 1 and pending.waiting() == 0
    assert pending.settle(B, present=False, marked=True) is None  # another chunk's mark is still waited for
    clock.now += 0.02
    assert pending.settle(A, present=False, marked=True) is None  # a mark set since: waited for again
    assert pending.settle(A, present=True, marked=False) is True


def test_an_expected_chunk_is_waited_for_without_a_mark(pending, clock):
    pending.expect([A])
    clock.now += WAIT_S / 2
    assert pending.settle(A, present=False, marked=False) is None
    assert pending.waiting() == 1
    clock.now += WAIT_S / 2  # the deadline counts from expect
    assert pending.settle(A, present=False, marked=False) is False
    assert pending.waited_out == 1
    assert pending.settle(A, present=False, marked=False) is False  # no longer expected


def test_an_expected_chunk_that_lands_is_present(pending):
    pending.expect([A, B])
    assert pending.settle(A, present=True, marked=False) is True
    assert pending.settle(B, present=False, marked=False) is None
    assert pending.waiting() == 1


def test_an_unmarked_unexpected_missing_chunk_is_a_miss_at_once(pending):
    assert pending.settle(A, present=False, marked=False) is False
    assert pending.waiting() == 0 and pending.waited_out == 0
    assert pending.settle(A, present=True, marked=False) is True


@pytest.mark.parametrize("wait_s", [0, -1.5])
def test_a_wait_that_is_not_positive_is_refused(wait_s):
    with pytest.raises(ValueError, match=rf"wait_s = {wait_s!r}"):
        PendingChunks(wait_s, TTL_S)


# -- RemotePresence on real servers --

glide = pytest.importorskip(
    "glide_sync", reason="valkey-glide-sync is not installed: the remote tier needs it (lmcache_ext[remote])"
)

from lmcache_ext.config import CacheConfig  # noqa: E402
from lmcache_ext.tiers.remote import RemotePresence, RemoteStore, RemoteTier  # noqa: E402

NAMESPACE = bytes(range(16))
KEY = bytes(range(100, 116))
PAYLOAD = os.urandom(150_000)  # three parts


def shard_keys(key: bytes) -> list[tuple[bytes, int]]:
    return [(key, 0)]


@pytest.fixture
def open_store() -> Iterator[Callable[[str], RemoteStore]]:
    """RemoteStores on a server's url (a small part size: the record has parts), closed after the test."""
    opened: list[RemoteStore] = []

    def make(url: str) -> RemoteStore:
        config = CacheConfig(remote_url=url, remote_timeout_ms=300, remote_max_value_bytes=65536)
        opened.append(RemoteStore(config, NAMESPACE))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def presences() -> Iterator[Callable[..., RemotePresence]]:
    made: list[RemotePresence] = []

    def make(store: RemoteStore, **kw: object) -> RemotePresence:
        made.append(RemotePresence(store, shard_keys, **kw))
        return made[-1]

    yield make
    for presence in made:
        presence.close()


def answer(presence: RemotePresence, keys: list[bytes], within_s: float = 3.0) -> float:
    """Ask `answered` until it is True (as the scheduler does, step after step); how long it took."""
    started = time.monotonic()
    while not presence.answered(keys):
        assert time.monotonic() - started < within_s, f"no answer about {keys} within {within_s} s"
        time.sleep(0.002)
    return time.monotonic() - started


def marked(producer: RemotePresence, key: bytes) -> None:
    producer.announce(key)
    producer.wait_announced(1.0)
    assert producer.counts["marked_chunks"] >= 1 and producer.counts["mark_failed"] == 0


def test_a_producer_marks_a_chunk_with_an_expiry_and_unmarks_it_once_written(redis, open_store, presences):
    store = open_store(redis.url)
    producer = presences(store, mark_ttl_s=5.0)
    marked(producer, KEY)
    marker = store.marker_key(KEY).decode()
    assert redis.cli("EXISTS", marker) == "1"
    assert 0 < int(redis.cli("PTTL", marker)) <= 5000
    producer.written(KEY)
    producer.wait_announced(1.0)
    assert redis.cli("EXISTS", marker) == "0"


def test_a_presence_without_a_role_marks_nothing(redis, open_store, presences):
    store = open_store(redis.url)
    both = presences(store)
    both.announce(KEY)
    both.wait_announced(1.0)
    assert redis.cli("DBSIZE") == "0"


def test_a_consumer_waits_for_a_marked_chunk_until_it_lands(server, open_store, presences):
    store = open_store(server.url)
    producer = presences(store, mark_ttl_s=5.0)
    consumer = presences(open_store(server.url), pending=PendingChunks(3.0, 5.0))
    marked(producer, KEY)
    started = time.monotonic()
    while time.monotonic() - started < 0.1:  # the record is missing, its mark there: no answer yet
        assert consumer.answered([KEY]) is False
        assert not consumer.contains(KEY)
        time.sleep(0.005)
    assert RemoteTier(store, 0).submit_write(KEY, PAYLOAD).result() is True
    assert answer(consumer, [KEY]) < 1.0
    assert consumer.contains(KEY)
    assert consumer.counts["waits_expired"] == 0
    out = bytearray(len(PAYLOAD))
    assert RemoteTier(store, 0).read_into(KEY, out) and bytes(out) == PAYLOAD


def test_a_consumer_gives_up_on_a_marked_chunk_at_its_deadline(redis, open_store, presences):
    producer = presences(open_store(redis.url), mark_ttl_s=5.0)
    consumer = presences(open_store(redis.url), pending=PendingChunks(0.1, 5.0))
    marked(producer, KEY)
    took = answer(consumer, [KEY])
    assert 0.09 <= took < 1.0
    assert not consumer.contains(KEY)
    assert consumer.counts["waits_expired"] == 1
    started = time.monotonic()
    consumer.probe([KEY])  # the mark is still there: waited out once, not again
    assert time.monotonic() - started < 0.09 and not consumer.contains(KEY)
    assert consumer.counts["waits_expired"] == 1


def test_a_blocking_probe_waits_out_a_marked_chunk_up_to_its_deadline(redis, open_store, presences):
    producer = presences(open_store(redis.url), mark_ttl_s=5.0)
    consumer = presences(open_store(redis.url), pending=PendingChunks(0.1, 5.0))
    marked(producer, KEY)
    started = time.monotonic()
    consumer.probe([KEY])
    assert 0.09 <= time.monotonic() - started < 1.0
    assert consumer.answered([KEY]) and not consumer.contains(KEY)
    assert consumer.counts["waits_expired"] == 1


def test_an_expired_mark_is_not_waited_for(redis, open_store, presences):
    store = open_store(redis.url)
    producer = presences(store, mark_ttl_s=0.05)
    consumer = presences(open_store(redis.url), pending=PendingChunks(3.0, 5.0))
    marked(producer, KEY)
    time.sleep(0.1)
    assert redis.cli("EXISTS", store.marker_key(KEY).decode()) == "0"  # a crashed producer's mark is gone
    assert answer(consumer, [KEY]) < 0.5
    assert not consumer.contains(KEY)
    assert consumer.counts["waits_expired"] == 0


def test_a_consumer_answers_at_once_with_the_server_dead(server, open_store, presences):
    producer = presences(open_store(server.url), mark_ttl_s=5.0)
    consumer = presences(open_store(server.url), pending=PendingChunks(3.0, 5.0))
    marked(producer, KEY)
    server.kill()
    started = time.monotonic()
    consumer.probe([KEY])
    assert time.monotonic() - started < 1.0  # one timed-out round trip at most, not the 3 s wait
    assert not consumer.contains(KEY)
    assert answer(consumer, [B]) < 1.0 and not consumer.contains(B)
    assert consumer.counts["probe_failed"] >= 1 and consumer.counts["waits_expired"] == 0


def test_a_consumer_does_not_wait_for_expected_chunks_with_the_server_dead(server, open_store, presences):
    """Chunks a producer named (kv_transfer_params) are waited for without marks, but a
    store that cannot be asked will not deliver them: a miss at once, as for marks."""
    consumer = presences(open_store(server.url), pending=PendingChunks(2.0, 5.0))
    consumer.expect([KEY])
    server.kill()
    started = time.monotonic()
    consumer.probe([KEY])
    assert time.monotonic() - started < 1.0, "waited out pd_wait_ms against a dead server"
    assert not consumer.contains(KEY)


def test_a_chunk_missing_one_shard_is_absent_and_the_next_chunks_answers_stay_its_own(server, open_store):
    """Every shard's answer is read in order: a chunk whose first shard is missing must
    not shift the answers of the chunks after it (with marks asked too)."""
    store = open_store(server.url)
    first, second, third = (bytes([n]) * 16 for n in (1, 2, 3))
    for key, ranks in ((first, (1,)), (second, (0, 1)), (third, (1,))):
        for rank in ranks:
            assert RemoteTier(store, rank).submit_write(key, PAYLOAD).result() is True
    for pending in (None, PendingChunks(0.05, 1.0)):
        presence = RemotePresence(store, lambda key: [(key, 0), (key, 1)], pending=pending)
        try:
            presence.probe([first, second, third])
            assert [presence.contains(k) for k in (first, second, third)] == [False, True, False]
        finally:
            presence.close()
