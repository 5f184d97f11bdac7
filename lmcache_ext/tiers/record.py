"""The one record format of every tier below host memory: a fixed binary header, then
the raw payload — never a pickle (invariant 5; invariants are numbered in docs/architecture.md).

Header (``HEADER``, little-endian, 68 bytes): magic ``LMCXCHNK``, format version,
flags, the 16-byte chunk key, the 16-byte namespace fingerprint of the cache that
wrote it, the payload length, the payload's xxh3-64, and an xxh3-64 of every field
before it. A reader names the key, namespace and length it expects: a record that
names anything else, or whose checksums fail, is a miss (`BadRecord`), never wrong
bytes. A disk file pads the header to 4096 bytes so its payload is block-aligned; a
remote value follows the header directly.

With an integrity secret (``remote_integrity_key``) a record also carries an
HMAC-SHA256 tag over header and payload (``FLAG_MAC``), appended after the payload: a
writer that can reach a shared store but lacks the secret cannot make another
instance load KV it forged. Checksums catch damage; only the tag catches intent.
"""

from __future__ import annotations

import hashlib
import hmac
from struct import Struct
from typing import NamedTuple

import xxhash

from lmcache_ext.keys import KEY_BYTES

MAGIC = b"LMCXCHNK"
RECORD_FORMAT_VERSION = 2
"""Version of the record header (`HEADER`); what the payload's bytes mean is versioned
by the key's namespace (`lmcache_ext.keys.FORMAT_VERSION`)."""
FLAG_PADDED = 1  # disk: the payload is followed by zeros up to a 4096 multiple
FLAG_MAC = 2  # a TAG_BYTES tag over header and payload follows the payload
FLAG_PARTS = 4  # remote: the payload is stored in parts under other keys (see tiers.remote)
KNOWN_FLAGS = FLAG_PADDED | FLAG_MAC | FLAG_PARTS
TAG_BYTES = 32
# magic, format version, flags, key, namespace, payload length, payload xxh3-64, xxh3-64 of the fields before it
HEADER = Struct(f"<8sHH{KEY_BYTES}s{KEY_BYTES}sQQQ")
_CHECKED_BYTES = HEADER.size - 8  # the header checksum covers every field before it


class BadRecord(Exception):
    """A record failed a check; `kind` names which, for the counters."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Header(NamedTuple):
    flags: int
    payload_checksum: int


class Fields(NamedTuple):
    """What a record's header says about it."""

    key: bytes
    namespace: bytes
    payload_len: int
    header: Header


def payload_checksum(payload: memoryview | bytes) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def encode_header(key: bytes, namespace: bytes, payload_len: int, checksum: int, flags: int) -> bytes:
    """The HEADER.size bytes a record starts with."""
    fields = (MAGIC, RECORD_FORMAT_VERSION, flags, key, namespace, payload_len, checksum)
    head = HEADER.pack(*fields, 0)
    return HEADER.pack(*fields, xxhash.xxh3_64_intdigest(head[:_CHECKED_BYTES]))


def read_header(block: memoryview | bytes) -> Fields:
    """A record header's fields, once its magic, version and checksum hold; raises BadRecord."""
    if len(block) < HEADER.size:
        raise BadRecord("truncated")
    magic, version, flags, stored_key, stored_ns, stored_len, checksum, header_checksum = HEADER.unpack_from(block)
    if magic != MAGIC:
        raise BadRecord("bad_magic")
    if version != RECORD_FORMAT_VERSION or flags & ~KNOWN_FLAGS:
        raise BadRecord("bad_version")
    if xxhash.xxh3_64_intdigest(memoryview(block)[:_CHECKED_BYTES]) != header_checksum:
        raise BadRecord("bad_header_checksum")
    return Fields(stored_key, stored_ns, stored_len, Header(flags, checksum))


def check_header(block: memoryview | bytes, key: bytes, namespace: bytes, payload_len: int) -> Header:
    """Check a record's header against what the reader expects; raises BadRecord."""
    fields = read_header(block)
    if fields.key != key:
        raise BadRecord("wrong_key")
    if fields.namespace != namespace:
        raise BadRecord("wrong_namespace")
    if fields.payload_len != payload_len:
        raise BadRecord("wrong_length")
    return fields.header


def check_payload(payload: memoryview | bytes, header: Header) -> None:
    if payload_checksum(payload) != header.payload_checksum:
        raise BadRecord("bad_payload_checksum")


class RecordMac:
    """HMAC-SHA256 tags of records under one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError(f"an integrity secret of {len(secret)} bytes is too short: expected at least 16")
        self._secret = secret

    def tag(self, header: bytes, *payload: memoryview | bytes) -> bytes:
        mac = hmac.new(self._secret, header, hashlib.sha256)
        for part in payload:
            mac.update(part)
        return mac.digest()

    def check(self, tag: memoryview | bytes, header: bytes, *payload: memoryview | bytes) -> None:
        if not hmac.compare_digest(bytes(tag), self.tag(header, *payload)):
            raise BadRecord("bad_tag")
