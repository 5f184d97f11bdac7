"""What besides token ids tells two requests' chunks apart, taken from vLLM itself.

vLLM's own prefix cache chains "extra keys" into each block hash: the multimodal
inputs a block holds (their identifiers and offsets), a hash of the block's prompt
embeddings, the LoRA adapter (name and path) and the cache salt. A chunk key must
separate requests exactly where those do, or a request with another image or other
embeddings would be served KV computed for different inputs. So each chunk key
chains the same extra keys, asked of vLLM's `generate_block_hash_extra_keys` for
the chunk's token range, in a canonical byte encoding (type-tagged and
length-prefixed: deterministic across processes and hosts; never pickle, never
Python's `hash()`).

vLLM's block hashes themselves are not used: with its default settings their seed
is random per process, and a disk or remote cache must outlive the process.
"""

from __future__ import annotations

import struct
from typing import Any

from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys

from lmcache_ext.keys import ExtraOf, UnkeyableRequest


def encode_extra_keys(value: Any) -> bytes:
    """Canonical bytes of vLLM's extra keys: nested tuples or lists of str, bytes,
    int, float, bool and None. Anything else raises UnkeyableRequest."""
    out = bytearray()
    _encode(value, out)
    return bytes(out)


def _encode(value: Any, out: bytearray) -> None:
    if value is None:
        out += b"n"
    elif isinstance(value, bool):
        out += b"T" if value else b"F"
    elif isinstance(value, int):
        text = str(value).encode()
        out += b"i" + struct.pack("<I", len(text)) + text
    elif isinstance(value, float):
        out += b"f" + struct.pack("<d", value)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        out += b"s" + struct.pack("<Q", len(data)) + data
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        out += b"b" + struct.pack("<Q", len(data)) + data
    elif isinstance(value, (tuple, list)):
        out += b"t" + struct.pack("<Q", len(value))
        for item in value:
            _encode(item, out)
    else:
        raise UnkeyableRequest(
            f"an extra key of type {type(value).__name__} ({value!r:.80}): expected "
            "str, bytes, int, float, bool, None or tuples of them"
        )


def extra_of(request: Any) -> ExtraOf:
    """`chunk_keys`'s `extra_of` for one vLLM request: the encoded extra keys of the
    chunk's token range, or None where vLLM has none (plain text without salt or LoRA)."""

    def extra(begin: int, end: int) -> bytes | None:
        keys, _ = generate_block_hash_extra_keys(request, begin, end, 0)
        return None if keys is None else encode_extra_keys(keys)

    return extra
