"""The remote tier: chunk records in Redis or Valkey — one node, a cluster, TLS, a unix
socket — shared by every vLLM instance that points at the same server.

Client: valkey-glide's synchronous client (a Rust core). What decides it against
redis-py with hiredis (``benchmarks/remote.py --clients``) is that it can GET
straight into a caller's buffer, so a load lands in the host slot without a copy.
It speaks TLS (with client certificates), ACL users, unix sockets and cluster
topology discovery, and reconnects by itself after a server restart.

Layout. A chunk shard of key ``k`` on TP rank ``r`` is a *manifest* at
``<prefix><namespace hex>:<r>:{<k hex>}`` — a record header (``tiers.record``) with
``FLAG_PARTS``, the part size, and with an integrity secret a tag — and its payload
in parts of at most ``remote_max_value_bytes`` at ``<manifest key>:<i>``. The braces
are a hash tag: in a cluster every part sits in the manifest's slot, so a write is
one MULTI/EXEC of parts and manifest (a reader sees all of a chunk or none of it)
and a read is one MGET of manifest and parts, the parts landing straight in the
slot. A later eviction of a part makes that chunk a miss, never wrong bytes.
Nothing is ever unpickled (invariant 5).

Faults cost hits, never a crash or a hang (invariant 4): every call has ``remote_timeout_ms``; a
connectivity fault puts the tier in backoff (0.5 s doubling to 30 s) during which
reads miss and writes are skipped, counted; a warning marks the start of each burst
and an info line its end. Misconfiguration (authentication refused, a TLS
certificate not trusted) fails at start-up; a server that is merely unreachable at
start leaves the tier off while a background thread keeps trying.
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from struct import Struct
from typing import Any

import glide_sync as glide
from glide_shared.exceptions import CircuitBreakerError, ClosingError, GlideError, RequestError
from glide_shared.exceptions import ConnectionError as GlideConnectionError
from glide_shared.exceptions import TimeoutError as GlideTimeoutError

from lmcache_ext.config import CacheConfig
from lmcache_ext.remote_url import RemoteEndpoint, mask_password, parse_remote_url
from lmcache_ext.tiers import TierHoldings
from lmcache_ext.tiers.faults import FaultLog
from lmcache_ext.tiers.host_buffer import byte_view
from lmcache_ext.tiers.in_flight import POLL_S, PendingChunks
from lmcache_ext.tiers.record import (
    FLAG_MAC,
    FLAG_PARTS,
    HEADER,
    TAG_BYTES,
    BadRecord,
    RecordMac,
    check_header,
    check_payload,
    encode_header,
    payload_checksum,
)

logger = logging.getLogger(__name__)

PART_SIZE = Struct("<Q")
MANIFEST_ROOM = HEADER.size + PART_SIZE.size + TAG_BYTES
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 30.0
_AUTH_REFUSED = ("WRONGPASS", "NOAUTH", "invalid username-password", "AUTH failed")

CONNECTIVITY = (ClosingError, GlideConnectionError, GlideTimeoutError, CircuitBreakerError)
"""Faults of the connection rather than answers of the server: they start a backoff."""

glide.Logger.set_logger_config(glide.LogLevel.OFF)  # faults are logged here, once per burst


class RemoteConfigError(ValueError):
    """remote_url or its settings cannot work: raised at start-up, never later."""


def misconfiguration(exc: BaseException, endpoint: RemoteEndpoint, config: CacheConfig) -> str | None:
    """What is wrong with the settings behind a failed connection, or None for a
    server that is merely unreachable. The client reports a certificate it does not
    trust as a timeout, so a TLS endpoint gets one handshake of its own to tell."""
    if any(mark in str(exc) for mark in _AUTH_REFUSED):
        return f"authentication refused ({exc})"
    return tls_problem(endpoint, config) if endpoint.tls else None


def tls_problem(endpoint: RemoteEndpoint, config: CacheConfig) -> str | None:
    """A TLS handshake with the first host: why it fails for want of trust or a
    client certificate, or None when it works or the host is unreachable."""
    context = ssl.create_default_context(cafile=config.remote_tls_ca_file)
    if not config.remote_tls_verify:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if config.remote_tls_cert_file:
        context.load_cert_chain(config.remote_tls_cert_file, config.remote_tls_key_file)
    host, port = endpoint.hosts[0]
    try:
        with socket.create_connection((host, port), timeout=config.remote_timeout_ms / 1000) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as exc:
        return (
            f"TLS verification failed ({exc.verify_message}; set remote_tls_ca_file to the CA that signed the server)"
        )
    except ssl.SSLError as exc:
        return f"TLS handshake failed ({exc.reason})"
    except OSError:
        return None


class Health:
    """Whether the server is worth asking now. A connectivity fault starts a backoff
    (doubling up to BACKOFF_MAX_S) during which nothing is sent; the first fault of a
    burst is a warning, the first success after it an info line. Faults of calls that
    were in flight together (one slow moment of the server, seen by every thread) end
    in the same backoff: only a fault after a backoff has run out doubles it."""

    def __init__(self, shown_url: str) -> None:
        self._shown = shown_url
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = 0.0

    def usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            first = self._backoff == 0.0
            if now >= self._down_until:
                self._backoff = min(BACKOFF_MAX_S, self._backoff * 2 or BACKOFF_FIRST_S)
                self._down_until = now + self._backoff
        if first:
            logger.warning(
                "remote tier %s is not answering (%s): its hits and stores are skipped, retrying with backoff",
                self._shown,
                exc,
            )

    def succeeded(self) -> None:
        with self._lock:
            recovered, self._backoff = self._backoff > 0.0, 0.0
        if recovered:
            logger.info("remote tier %s answers again", self._shown)


class RemoteStore:
    """The clients of one remote_url, their health, and the names of records in the
    store under one namespace fingerprint."""

    def __init__(self, config: CacheConfig, namespace: bytes, connections: int | None = None) -> None:
        assert config.remote_url is not None, "RemoteStore needs a remote_url"
        self.config = config
        self.endpoint = parse_remote_url(config.remote_url)
        self.shown_url = mask_password(config.remote_url)
        self.namespace = namespace
        self.health = Health(self.shown_url)
        self.mac = RecordMac(config.remote_integrity_key.encode()) if config.remote_integrity_key else None
        self._prefix = config.remote_key_prefix.encode() + namespace.hex().encode() + b":"
        self._wanted = connections or config.remote_connections
        self._clients: list[Any] = []
        self._closed = threading.Event()
        self._reconnecting = threading.Lock()
        self._thread_slot = threading.local()  # which client this thread uses
        self._next_slot = itertools.count()
        try:
            self._clients = [self._new_client() for _ in range(self._wanted)]
        except GlideError as exc:
            problem = misconfiguration(exc, self.endpoint, config)
            if problem:
                raise RemoteConfigError(f"remote_url = {self.shown_url}: {problem}") from None
            self.health.failed(exc)
            self._start_reconnect()

    # -- names --

    def manifest_key(self, shard_key: bytes, rank: int) -> bytes:
        return self._prefix + f"{rank}:{{{shard_key.hex()}}}".encode()

    def marker_key(self, chunk_key: bytes) -> bytes:
        """Where a producer marks a chunk it is writing (lmcache_ext.tiers.in_flight)."""
        return self._prefix + b"inflight:{" + chunk_key.hex().encode() + b"}"

    @staticmethod
    def part_key(manifest_key: bytes, index: int) -> bytes:
        return manifest_key + f":{index}".encode()

    # -- calls --

    def call(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(client)`, or raise Unavailable: while backing off, before the first
        connection, or on a connectivity fault (which starts a backoff). A server's
        error answer (RequestError: out of memory, wrong type, ...) is raised as is."""
        clients = self._clients
        if not clients or not self.health.usable():
            raise Unavailable("backing off" if clients else "not connected")
        try:
            result = fn(clients[self._slot() % len(clients)])
        except CONNECTIVITY as exc:
            self.health.failed(exc)
            if isinstance(exc, ClosingError):  # that client is gone for good: make new ones
                self._clients = []
                self._start_reconnect()
            raise Unavailable(type(exc).__name__) from exc
        except GlideError:
            self.health.succeeded()
            raise
        self.health.succeeded()
        return result

    def _slot(self) -> int:
        """A number of this thread's own, so that threads spread over the clients."""
        slot = getattr(self._thread_slot, "n", None)
        if slot is None:
            slot = self._thread_slot.n = next(self._next_slot)
        return slot

    def close(self) -> None:
        self._closed.set()
        clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except GlideError:
                pass

    def _start_reconnect(self) -> None:
        if self._reconnecting.acquire(blocking=False):
            threading.Thread(target=self._reconnect, name="lmcache-remote-connect", daemon=True).start()

    def _reconnect(self) -> None:
        """Keep trying to connect, with backoff, until connected or closed."""
        try:
            self._connect_with_backoff()
        finally:
            self._reconnecting.release()

    def _connect_with_backoff(self) -> None:
        delay = BACKOFF_FIRST_S
        while not self._closed.wait(delay):
            try:
                clients = [self._new_client() for _ in range(self._wanted)]
            except GlideError as exc:
                problem = misconfiguration(exc, self.endpoint, self.config)
                if problem:
                    logger.error("remote tier %s refuses this client: %s", self.shown_url, problem)
                delay = min(BACKOFF_MAX_S, delay * 2)
                continue
            if self._closed.is_set():
                for client in clients:
                    client.close()
                return
            self._clients = clients
            self.health.succeeded()
            return

    def _new_client(self) -> Any:
        ep, cfg = self.endpoint, self.config
        if ep.unix_path:
            addresses = [glide.NodeAddress(unix_socket_path=ep.unix_path)]
        else:
            addresses = [glide.NodeAddress(host, port) for host, port in ep.hosts]
        password = cfg.remote_password or ep.password
        credentials = glide.ServerCredentials(password, ep.username) if password else None
        tls = None
        if ep.tls:
            ca = open(cfg.remote_tls_ca_file, "rb").read() if cfg.remote_tls_ca_file else None
            tls = glide.TlsAdvancedConfiguration(
                use_insecure_tls=not cfg.remote_tls_verify,
                root_pem_cacerts=ca,
                client_cert_path=cfg.remote_tls_cert_file,
                client_key_path=cfg.remote_tls_key_file,
            )
        timeout = cfg.remote_timeout_ms
        if ep.cluster:
            cluster = glide.AdvancedGlideClusterClientConfiguration(connection_timeout=timeout, tls_config=tls)
            return glide.GlideClusterClient.create(
                glide.GlideClusterClientConfiguration(
                    addresses, use_tls=ep.tls, credentials=credentials, request_timeout=timeout, advanced_config=cluster
                )
            )
        advanced = glide.AdvancedGlideClientConfiguration(connection_timeout=timeout, tls_config=tls)
        return glide.GlideClient.create(
            glide.GlideClientConfiguration(
                addresses,
                use_tls=ep.tls,
                credentials=credentials,
                request_timeout=timeout,
                database_id=ep.db,
                advanced_config=advanced,
            )
        )


class Unavailable(Exception):
    """The remote tier cannot be asked right now (a miss or a skipped store, counted)."""


def _batch(store: RemoteStore) -> Any:
    return glide.ClusterBatch(is_atomic=False) if store.endpoint.cluster else glide.Batch(is_atomic=False)


class RemotePresence(TierHoldings):
    """Which chunks the store holds, probed in the background: the planner asks without
    waiting on the network. One pipelined round trip checks the manifests of every TP
    rank's shard of a batch of chunks; answers are kept `fresh_s` seconds. The server
    evicts and deletes records on its own, so the planner fetches a chunk found here
    into a host slot before it promises it (`fetch_first`).

    Disaggregated prefill (lmcache_ext.tiers.in_flight): with `mark_ttl_s` (a producer)
    each chunk the planner will write here is marked in the store first, and the mark
    deleted once every rank's write ended; with `pending` (a consumer) the probe also
    asks for the marks of missing chunks, and a chunk in flight stays unanswered (asked
    again every `in_flight.POLL_S`) until it lands or its deadline passes. Marks, probes
    and deletions go through one thread, in order."""

    fetch_first = True
    asks_network = True

    def __init__(
        self,
        store: RemoteStore,
        shard_keys: Callable[[bytes], Sequence[tuple[bytes, int]]],
        fresh_s: float = 2.0,
        owns_store: bool = False,
        *,
        mark_ttl_s: float | None = None,
        pending: PendingChunks | None = None,
    ) -> None:
        """`shard_keys(chunk_key)`: the (shard key, rank) pairs that make the chunk;
        `owns_store`: `close` closes `store` too."""
        self._store = store
        self._owns_store = owns_store
        self._shard_keys = shard_keys
        self._fresh_s = fresh_s
        self._mark_ttl_ms = None if mark_ttl_s is None else max(1, round(mark_ttl_s * 1000))
        self._pending = pending
        self._lock = threading.Lock()
        self._known: dict[bytes, tuple[bool | None, float]] = {}  # chunk key -> (present; None: in flight, when)
        self._asking: set[bytes] = set()
        self._marks: dict[str, list[bytes]] = {"set": [], "delete": []}  # marks to send, by what to do
        self._last_mark: Future[None] | None = None
        self._prober = ThreadPoolExecutor(1, thread_name_prefix="lmcache-remote-probe")
        self._mark_faults = FaultLog(logger, f"in-flight marks in the remote tier {store.shown_url}")
        self._wait_faults = FaultLog(logger, "waits for a prefill instance's chunks")
        self.counts: Counter[str] = Counter()

    def contains(self, key: bytes) -> bool:
        """Whether a fresh probe found `key` (never asks the network)."""
        with self._lock:
            known = self._known.get(key)
        return known is not None and known[0] is True and time.monotonic() - known[1] < self._fresh_s

    def answered(self, keys: Sequence[bytes]) -> bool:
        """True when every key has a fresh answer; otherwise start probing the others
        (unless a probe already asks for them, or one just found them in flight) and
        return False."""
        now = time.monotonic()
        unknown, new = False, []
        with self._lock:
            for key in keys:
                known = self._known.get(key)
                if known is not None and known[0] is not None and now - known[1] < self._fresh_s:
                    continue
                unknown = True
                in_flight = known is not None and known[0] is None and now - known[1] < POLL_S
                if key not in self._asking and not in_flight:
                    new.append(key)
            self._asking.update(new)
        if new:
            self._prober.submit(self._probe, new)
        return not unknown

    def probe(self, keys: Sequence[bytes]) -> None:
        """Probe `keys` now and wait for the answer (for callers that may block); a
        consumer waits out chunks in flight here too, up to their deadline."""
        keys = list(keys)
        while keys:
            self._probe(keys)
            with self._lock:
                keys = [k for k in keys if self._known.get(k, (False, 0.0))[0] is None]
            if keys:
                time.sleep(POLL_S)

    def forget(self, key: bytes) -> None:
        """A load found `key` missing or bad: do not promise it again on an old answer."""
        with self._lock:
            self._known[key] = (False, time.monotonic())

    def expect(self, keys: Sequence[bytes]) -> None:
        """A producer named `keys` as stored (a request's kv_transfer_params): a consumer
        waits for them as for marked chunks."""
        if self._pending is not None:
            self._pending.expect(keys)
            with self._lock:
                for key in keys:
                    if self._known.get(key, (None, 0.0))[0] is False:
                        del self._known[key]  # an old "absent" must not end the wait

    def announce(self, key: bytes) -> None:
        """A producer will write `key` here: mark it in flight first (in the background;
        `wait_announced` waits for the marks sent so far)."""
        if self._mark_ttl_ms is not None:
            self._queue_mark("set", key)

    def written(self, key: bytes) -> None:
        """Every rank's write of `key` ended: its mark goes (a consumer waits no more)."""
        if self._mark_ttl_ms is not None:
            self._queue_mark("delete", key)

    def wait_announced(self, timeout_s: float) -> None:
        """Wait, at most `timeout_s`, until the marks announced so far are in the store."""
        with self._lock:
            last = self._last_mark
        if last is not None:
            try:
                last.result(timeout_s)
            except FutureTimeout:
                self.counts["mark_late"] += 1

    def close(self) -> None:
        self._prober.shutdown(wait=True)
        if self._owns_store:
            self._store.close()

    def _queue_mark(self, what: str, key: bytes) -> None:
        with self._lock:
            queued = any(self._marks.values())
            self._marks[what].append(key)
            if not queued:
                self._last_mark = self._prober.submit(self._send_marks)

    def _send_marks(self) -> None:
        """Send every mark queued so far in one pipelined batch, sets first: a write that
        ended before its mark was sent leaves no mark behind. One command per key (a
        cluster refuses keys of several slots in one)."""
        with self._lock:
            marks, self._marks = self._marks, {"set": [], "delete": []}
        batch = _batch(self._store)
        expiry = glide.ExpirySet(glide.ExpiryType.MILLSEC, self._mark_ttl_ms)
        for key in marks["set"]:
            batch.set(self._store.marker_key(key), b"1", expiry=expiry)
        for key in marks["delete"]:
            batch.delete([self._store.marker_key(key)])
        try:
            self._store.call(lambda client: client.exec(batch, raise_on_error=False))
        except (Unavailable, GlideError) as exc:
            self.counts["mark_failed"] += 1
            self._mark_faults.failed(type(exc).__name__, exc)
            return
        self._mark_faults.succeeded()
        self.counts["marked_chunks"] += len(marks["set"])

    def _probe(self, keys: list[bytes]) -> None:
        shards = [self._shard_keys(k) for k in keys]
        try:
            present, marked = self._store.call(lambda client: self._exists(client, keys, shards))
        except (Unavailable, GlideError) as exc:
            self.counts["probe_failed"] += 1
            logger.debug("remote probe of %d chunks failed: %s", len(keys), exc)
            pending = self._pending
            answers: list[bool | None] = [False if pending is None else pending.unreachable(k) for k in keys]
        else:
            answers = [self._settle(key, ok, mark) for key, ok, mark in zip(keys, present, marked)]
        now = time.monotonic()
        with self._lock:
            for key, answer in zip(keys, answers):
                self._known[key] = (answer, now)
            self._asking.difference_update(keys)
            if len(self._known) > 65536:  # drop stale answers now and then
                self._known = {k: v for k, v in self._known.items() if now - v[1] < self._fresh_s}
        self.counts["probed_chunks"] += len(keys)

    def _settle(self, key: bytes, present: bool, marked: bool) -> bool | None:
        if self._pending is None:
            return present
        before = self._pending.waited_out
        answer = self._pending.settle(key, present, marked)
        if self._pending.waited_out > before:
            self.counts["waits_expired"] += 1
            self._wait_faults.failed("deadline passed", "computed instead")
        elif answer:
            self._wait_faults.succeeded()
        return answer

    def _exists(
        self, client: Any, keys: list[bytes], shards: list[Sequence[tuple[bytes, int]]]
    ) -> tuple[list[bool], list[bool]]:
        batch = _batch(self._store)
        for pairs in shards:
            for shard, rank in pairs:
                batch.exists([self._store.manifest_key(shard, rank)])
        if self._pending is not None:
            for key in keys:
                batch.exists([self._store.marker_key(key)])
        answers = iter(client.exec(batch, raise_on_error=False) or [])
        present = [[next(answers, 0) == 1 for _ in pairs] for pairs in shards]  # every answer read, in order
        marked = [next(answers, 0) == 1 for _ in keys] if self._pending is not None else [False] * len(keys)
        return [all(shard) for shard in present], marked


class RemoteTier:
    """One TP rank's reads and writes of chunk records, from and into host slots.

    `read_into` runs on the caller's thread (the executor's readers) and leaves the
    payload in `out` with no copy; `submit_write` queues a write-behind on this tier's
    threads, at most `remote_write_backlog` at a time: beyond that a store is skipped
    (on_done(False), counted), never queued without bound."""

    def __init__(self, store: RemoteStore, rank: int, owns_store: bool = False) -> None:
        """`owns_store`: `close` closes `store` too."""
        self._store = store
        self._rank = rank
        self._owns_store = owns_store
        cfg = store.config
        self._part_bytes = cfg.remote_max_value_bytes
        self._ttl = glide.ExpirySet(glide.ExpiryType.SEC, cfg.remote_ttl_s) if cfg.remote_ttl_s else None
        self._part_ttl = glide.ExpirySet(glide.ExpiryType.SEC, cfg.remote_ttl_s + 1) if cfg.remote_ttl_s else None
        self._backlog = cfg.remote_write_backlog
        self._writers = ThreadPoolExecutor(cfg.remote_connections, thread_name_prefix="lmcache-remote-write")
        self._lock = threading.Lock()
        self._pending: set[Future[bool]] = set()
        self._counts: Counter[str] = Counter()
        self._reads_bad: Counter[str] = Counter()
        self._writes_failed: Counter[str] = Counter()
        self._write_faults = FaultLog(logger, f"remote writes to {store.shown_url}")
        self._read_faults = FaultLog(logger, f"remote reads from {store.shown_url}")

    # -- reads --

    def read_into(self, key: bytes, out: Any) -> bool:
        """Read the chunk shard `key` into `out` (a writable buffer of its payload
        length): False on a miss, a bad record or a fault, counted by kind."""
        view = byte_view(out, "out", writable=True)
        manifest = self._store.manifest_key(key, self._rank)
        try:
            self._store.call(lambda client: self._read(client, key, manifest, view))
        except BadRecord as bad:
            self._count(self._reads_bad, bad.kind)
            if bad.kind not in ("missing", "missing_part"):  # evicted by the server: a plain miss
                self._read_faults.failed(bad.kind, f"key {key.hex()}")
            return False
        except (Unavailable, GlideError) as exc:
            self._count(self._counts, "reads_skipped" if isinstance(exc, Unavailable) else "reads_failed")
            return False
        self._count(self._counts, "reads_hit")
        self._read_faults.succeeded()
        return True

    def _read(self, client: Any, key: bytes, manifest_key: bytes, out: memoryview) -> None:
        """One MGET of the manifest and the parts this tier's part size implies; a
        manifest written with another part size costs a second MGET."""
        manifest = memoryview(bytearray(MANIFEST_ROOM))
        parts = self._read_parts(client, manifest_key, out, self._part_bytes, [manifest])
        if parts is None:
            raise BadRecord("missing")
        length, part_bytes, header, rest = self._check_manifest(manifest[: int(parts[0])], key, len(out))
        if part_bytes != self._part_bytes and self._read_parts(client, manifest_key, out, part_bytes, []) is None:
            raise BadRecord("missing_part")
        check_payload(out, header)
        mac = self._store.mac
        if mac is not None:
            if not header.flags & FLAG_MAC:
                raise BadRecord("untagged")
            mac.check(rest[PART_SIZE.size :], bytes(manifest[: HEADER.size + PART_SIZE.size]), out)

    def _read_parts(
        self, client: Any, manifest_key: bytes, out: memoryview, part_bytes: int, before: list[memoryview]
    ) -> list[bytes] | None:
        """MGET `before`'s keys (the manifest) and the parts of `part_bytes` into `out`;
        the answers for `before`, or None when the manifest is missing. Raises
        BadRecord when a part is missing or of the wrong length."""
        store = self._store
        n = math.ceil(len(out) / part_bytes)
        slices = [out[i * part_bytes : (i + 1) * part_bytes] for i in range(n)]
        keys = [manifest_key] * len(before) + [store.part_key(manifest_key, i) for i in range(n)]
        got = client.mget(keys, buffers=before + slices)
        if any(g is None for g in got[: len(before)]):
            return None
        for length, part in zip(got[len(before) :], slices):
            if length is None:
                raise BadRecord("missing_part")
            if int(length) != len(part):
                raise BadRecord("wrong_length")
        return got[: len(before)]

    def _check_manifest(self, manifest: memoryview, key: bytes, length: int) -> tuple[int, int, Any, memoryview]:
        header = check_header(manifest, key, self._store.namespace, length)
        if not header.flags & FLAG_PARTS:
            raise BadRecord("bad_version")
        rest = manifest[HEADER.size :]
        if len(rest) != PART_SIZE.size + (TAG_BYTES if header.flags & FLAG_MAC else 0):
            raise BadRecord("truncated")
        (part_bytes,) = PART_SIZE.unpack_from(rest)
        if part_bytes == 0:
            raise BadRecord("bad_part_size")
        return length, part_bytes, header, rest

    # -- writes --

    def submit_write(self, key: bytes, payload: Any, on_done: Callable[[bool], None] | None = None) -> Future[bool]:
        """Write `payload` as the chunk shard `key` in the background; the caller keeps
        it unchanged until on_done(ok) has run."""
        view = byte_view(payload, "payload", writable=False)
        with self._lock:
            if len(self._pending) >= self._backlog:
                self._counts["writes_skipped_backlog"] += 1
                future: Future[bool] = Future()
                future.set_result(False)
                if on_done is not None:
                    on_done(False)
                return future
            future = self._writers.submit(self._write_job, key, view, on_done)
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _write_job(self, key: bytes, payload: memoryview, on_done: Callable[[bool], None] | None) -> bool:
        try:
            self._store.call(lambda client: self._write(client, key, payload))
            ok = True
            self._count(self._counts, "writes_ok")
            self._write_faults.succeeded()
        except GlideError as exc:
            ok = False
            kind = "full" if "OOM" in str(exc) or "maxmemory" in str(exc) else "refused"
            self._count(self._writes_failed, kind)
            self._write_faults.failed(kind, exc)
        except Unavailable:
            ok = False
            self._count(self._counts, "writes_skipped")
        if on_done is not None:
            try:
                on_done(ok)
            except Exception:
                logger.exception("on_done of the remote write of key %s raised", key.hex())
        return ok

    def _write(self, client: Any, key: bytes, payload: memoryview) -> None:
        """Parts, then the manifest, in one MULTI/EXEC: visible all at once."""
        store = self._store
        manifest_key = store.manifest_key(key, self._rank)
        flags = FLAG_PARTS | (FLAG_MAC if store.mac is not None else 0)
        manifest = encode_header(key, store.namespace, len(payload), payload_checksum(payload), flags)
        manifest += PART_SIZE.pack(self._part_bytes)
        if store.mac is not None:
            manifest += store.mac.tag(manifest, payload)
        batch = glide.ClusterBatch(is_atomic=True) if store.endpoint.cluster else glide.Batch(is_atomic=True)
        for i in range(max(1, math.ceil(len(payload) / self._part_bytes))):
            part = payload[i * self._part_bytes : (i + 1) * self._part_bytes]
            batch.set(store.part_key(manifest_key, i), part, expiry=self._part_ttl)
        batch.set(manifest_key, manifest, expiry=self._ttl)
        answers = client.exec(batch, raise_on_error=False)
        for answer in answers or [RequestError("the write transaction was aborted")]:
            if answer != "OK":
                raise answer if isinstance(answer, RequestError) else RequestError(f"a write answered {answer!r}")

    # -- the rest of the tier interface --

    def remove(self, key: bytes) -> bool:
        """Delete the record of shard `key` (its manifest: the parts alone are a miss);
        False when there was none or the store could not be reached."""
        manifest = self._store.manifest_key(key, self._rank)
        try:
            return bool(self._store.call(lambda client: client.delete([manifest])))
        except (Unavailable, GlideError):
            return False

    def clear(self) -> int:
        """Nothing to delete: the store is shared, and a reset's new epoch already hides
        every chunk stored before it."""
        return 0

    def flush(self) -> None:
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.result()

    def close(self) -> None:
        self.flush()
        self._writers.shutdown(wait=True)
        if self._owns_store:
            self._store.close()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self._counts,
                "reads_bad": dict(self._reads_bad),
                "writes_failed": dict(self._writes_failed),
                "writes_pending": len(self._pending),
            }

    def _forget(self, future: Future[bool]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _count(self, counter: Counter[str], kind: str) -> None:
        with self._lock:
            counter[kind] += 1
