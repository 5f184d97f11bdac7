"""Chunk keys: a prompt's tokens cut into chunks, each named by a chained 128-bit hash.

A request's tokens are cut into chunks of ``namespace.chunk_size`` tokens. Full
chunk ``i`` gets the key ``h_i = xxh3_128(h_{i-1} || tokens of chunk i)``, where
``h_{-1}`` is the namespace fingerprint and the tokens are little-endian uint32.
A key therefore names the whole prefix up to the end of its chunk, under one
namespace (model, dtype, layout, shard, ...): equal keys mean equal KV bytes.
Keys are plain 16-byte ``bytes``: cheap to hash, compare and store in headers,
and the same in every process and on every host (never Python's ``hash()``).

Optionally the trailing partial chunk gets a key too (``include_partial``). Its
hashed input is ``h_{i-1} || tokens || b"P" || uint32 length``: the odd tag
byte makes its length differ from every full chunk's input (a multiple of 4
bytes), and the input length differs between partial lengths, so a partial key
never comes from the same bytes as a full or another partial chunk's key.

The state that a Mamba-type layer keeps at a chunk's end is a record of its own, keyed
``state_key(h_i) = xxh3_128(h_i || b"S")``: 17 bytes of input, shorter than any chunk's.

What tokens alone do not say about a chunk (the images or prompt embeddings behind
its placeholder tokens, say) enters its key as *extra* bytes: ``extra_of(begin,
end)`` gives them for the chunk of tokens ``[begin, end)``, and the hashed input
becomes ``h_{i-1} || tokens || b"X" || xxh3_128(extra) [|| b"P" || length]``. The
inputs' lengths tell the four kinds apart: modulo 4 a full chunk's is 0 without
extras and 1 with them, a partial chunk's 1 without and 2 with; and a full chunk
with extras would need C+3 tokens to match a plain partial chunk's length.

Growing requests (chunked prefill, decode) extend their key list without
rehashing the earlier chunks::

    keys += chunk_keys(tokens, ns, start=len(keys) * ns.chunk_size,
                       prev_key=keys[-1] if keys else None)
"""

from __future__ import annotations

import array
import dataclasses
import functools
import json
import operator
import struct
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import xxhash

if TYPE_CHECKING:
    import torch

ChunkKey = bytes
"""A chunk key: the 16-byte xxh3-128 digest (big-endian canonical form)."""

FORMAT_VERSION = 2
"""Version of the stored chunk format; bump it when the bytes stored for a key change meaning
(2: a chunk's records hold KV heads, not a TP rank's shard)."""

KEY_BYTES = 16
TOKEN_LIMIT = 2**32
_TOKEN_BYTES = 4
_FINGERPRINT_DOMAIN = b"lmcache_ext.namespace.v1\n"
_PARTIAL_TAG = b"P"
_EXTRA_TAG = b"X"
_STATE_TAG = b"S"
_OPTIONAL_STRS = ("cache_namespace", "epoch", "kv_groups")
_OPTIONAL_FIELDS = (*_OPTIONAL_STRS, "kv_heads")
_digest = xxhash.xxh3_128_digest

Tokens = Union[Sequence[int], np.ndarray, "torch.Tensor"]
ExtraOf = Callable[[int, int], bytes | None]
"""``extra_of(begin, end)``: what besides its tokens tells the chunk ``[begin, end)`` apart, or None."""


class UnkeyableRequest(ValueError):
    """A request carries an extra key that cannot be encoded deterministically: it is
    neither looked up nor stored."""


def _check_str(name: str, value: object, *, allow_empty: bool) -> None:
    if not isinstance(value, str) or not (allow_empty or value):
        raise ValueError(f"Namespace.{name} = {value!r}: expected a {'' if allow_empty else 'non-empty '}str")


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"Namespace.{name} = {value!r}: expected {expected}")


@dataclasses.dataclass(frozen=True)
class Namespace:
    """Everything that changes the bytes stored for a token prefix; it seeds every key chain.

    ``revision`` may be ``""`` for a model without one (a local path). ``dtype`` and
    ``layout`` are names as the caller spells them (e.g. ``"bfloat16"``, ``"LBNHC"``):
    spell them the same way everywhere that shares a cache. ``cache_salt`` and
    ``lora_id`` are per request (see ``for_request``); ``None`` differs from ``""``
    and the int 1 from the str ``"1"``. ``cache_namespace`` is the operator's own
    separator (e.g. a weights version) and ``epoch`` changes at each cache reset, so
    chunks stored before a reset are never hit after it.
    """

    model: str
    revision: str
    dtype: str
    layout: str
    block_size: int
    page_bytes: int
    num_layers: int
    tp_size: int
    tp_rank: int
    chunk_size: int
    cache_salt: str | None = None
    lora_id: str | int | None = None
    format_version: int = FORMAT_VERSION
    cache_namespace: str = ""
    epoch: str = ""
    kv_groups: str = ""  # the KV cache groups of a hybrid model (kv_groups.layout_of); "" for one full group
    kv_heads: int = 0  # KV heads, for records kept per head (any TP size reads them); 0: per TP shard

    def __post_init__(self) -> None:
        for name in ("model", "dtype", "layout"):
            _check_str(name, getattr(self, name), allow_empty=False)
        for name in ("revision", *_OPTIONAL_STRS):
            _check_str(name, getattr(self, name), allow_empty=True)
        _check_int("kv_heads", self.kv_heads, minimum=0)
        for name in ("block_size", "page_bytes", "num_layers", "tp_size", "chunk_size", "format_version"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("tp_rank", self.tp_rank, minimum=0)
        if self.tp_rank >= self.tp_size:
            raise ValueError(
                f"Namespace.tp_rank = {self.tp_rank} is out of range: expected 0 <= tp_rank < tp_size = {self.tp_size}"
            )
        if self.chunk_size % self.block_size:
            raise ValueError(
                f"Namespace.chunk_size = {self.chunk_size} is not a multiple of block_size = {self.block_size}"
            )
        if self.cache_salt is not None and not isinstance(self.cache_salt, str):
            raise ValueError(f"Namespace.cache_salt = {self.cache_salt!r}: expected None or a str")
        if self.lora_id is not None and (not isinstance(self.lora_id, (str, int)) or isinstance(self.lora_id, bool)):
            raise ValueError(f"Namespace.lora_id = {self.lora_id!r}: expected None, a str or an int")

    @functools.cached_property
    def fingerprint(self) -> bytes:
        """16 bytes: xxh3-128 of a domain tag and the sorted-key JSON of every field.
        Fields added after format 1 (`_OPTIONAL_FIELDS`) enter only when set, so the
        keys of caches written before they existed stay the same."""
        fields = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in _OPTIONAL_FIELDS or getattr(self, f.name)
        }
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        return _digest(_FINGERPRINT_DOMAIN + canonical)

    def for_request(self, cache_salt: str | None = None, lora_id: str | int | None = None) -> Namespace:
        """This namespace with a request's cache salt and LoRA id (both replaced, ``None`` included)."""
        return dataclasses.replace(self, cache_salt=cache_salt, lora_id=lora_id)

    def with_epoch(self, epoch: str) -> Namespace:
        """This namespace in another cache epoch (see `lmcache_ext.epoch`)."""
        return dataclasses.replace(self, epoch=epoch)


def _bad_token_message(tokens: Sequence[Any], offset: int) -> str:
    """Name the first element that array.array rejected (it takes the same ints as operator.index)."""
    for i, token in enumerate(tokens):
        try:
            value = operator.index(token)
        except TypeError:
            return f"tokens[{offset + i}] = {token!r} is a {type(token).__name__}; expected an int token id"
        if not 0 <= value < TOKEN_LIMIT:
            return f"tokens[{offset + i}] = {value} is out of range: expected a token id in [0, 2**32)"
    raise AssertionError("array.array rejected a sequence of valid token ids")


def _checked_source(tokens: Tokens) -> np.ndarray | Sequence[Any]:
    """Check the kind, shape and dtype of ``tokens``; tensors become (zero-copy) numpy arrays."""
    torch = sys.modules.get("torch")  # a tensor implies torch is loaded; never import it here
    if torch is not None and isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens has dtype {tokens.dtype}; expected an integer dtype")
        if tokens.device.type != "cpu":
            raise ValueError(f"tokens is on {tokens.device}; expected a cpu tensor")
        tokens = tokens.numpy()
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1:
            raise ValueError(f"tokens has shape {tokens.shape}; expected a 1-D sequence of token ids")
        if tokens.dtype.kind not in "iu":
            raise ValueError(f"tokens has dtype {tokens.dtype}; expected an integer dtype")
        return tokens
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise ValueError(
            f"tokens is a {type(tokens).__name__}; "
            "expected a sequence of ints, a 1-D integer numpy array or a 1-D integer torch tensor"
        )
    return tokens


def _token_bytes(tokens: np.ndarray | Sequence[Any], begin: int, end: int | None = None) -> memoryview:
    """tokens[begin:end] as little-endian uint32 bytes, after checking that every id fits."""
    if isinstance(tokens, np.ndarray):
        ids = tokens[begin:end]
        if ids.size and (
            (ids.dtype.kind == "i" and ids.min() < 0)
            or (ids.dtype.itemsize > _TOKEN_BYTES and ids.max() >= TOKEN_LIMIT)
        ):
            i = int(np.flatnonzero((ids < 0) | (ids >= TOKEN_LIMIT))[0])
            raise ValueError(f"tokens[{begin + i}] = {ids[i]} is out of range: expected a token id in [0, 2**32)")
        return np.ascontiguousarray(ids, dtype="<u4").data.cast("B")
    # array.fromlist is the fastest conversion measured, and a list slice alone costs nearly as much,
    # hence no slice from 0 (benchmarks/RESULTS.md, chunk keys).
    part = tokens[begin:end] if begin or end is not None else tokens
    try:
        if isinstance(part, list):
            buf = array.array("I")
            buf.fromlist(part)
        else:
            buf = array.array("I", part)
    except (TypeError, OverflowError):
        raise ValueError(_bad_token_message(part, begin)) from None
    if sys.byteorder != "little":
        buf.byteswap()
    return memoryview(buf).cast("B")


def chunk_keys(
    tokens: Tokens,
    namespace: Namespace,
    *,
    start: int = 0,
    prev_key: ChunkKey | None = None,
    include_partial: bool = False,
    extra_of: ExtraOf | None = None,
) -> list[ChunkKey]:
    """Keys of the chunks of ``tokens`` from token ``start`` on, one per full chunk.

    ``tokens`` is the request's whole token sequence so far: a sequence of ints, or a
    1-D integer numpy array or CPU torch tensor; each id from ``start`` on must be in
    [0, 2**32), the trailing partial chunk's too.
    ``keys[j]`` names the chunk of tokens ``[start + j*C, start + (j+1)*C)`` with
    ``C = namespace.chunk_size``; tokens after the last full chunk get no key unless
    ``include_partial``, which appends one key for them (when there are any).

    To extend earlier keys, pass ``start`` (a multiple of ``C``: the tokens already
    keyed) and ``prev_key``, the key of the full chunk ending at ``start``; the result
    equals the tail of a one-shot computation. ``start = 0`` needs ``prev_key = None``.
    ``extra_of`` (see the module docstring) is asked once per key, with the chunk's
    absolute token range.
    """
    source = _checked_source(tokens)
    chunk_size = namespace.chunk_size
    num_tokens = len(source)
    prev_key = _seed_key(namespace, num_tokens, start, prev_key)
    data = _token_bytes(source, start)
    keys: list[ChunkKey] = []
    chunk_bytes = chunk_size * _TOKEN_BYTES
    full_bytes = (num_tokens - start) // chunk_size * chunk_bytes
    for offset in range(0, full_bytes, chunk_bytes):
        begin = start + offset // _TOKEN_BYTES
        tail = _extra_tail(extra_of, begin, begin + chunk_size)
        prev_key = _digest(prev_key + data[offset : offset + chunk_bytes] + tail)
        keys.append(prev_key)
    if include_partial and len(data) > full_bytes:
        keys.append(_partial_key(prev_key, data[full_bytes:], start + full_bytes // _TOKEN_BYTES, extra_of))
    return keys


def _seed_key(namespace: Namespace, num_tokens: int, start: int, prev_key: ChunkKey | None) -> bytes:
    """The key that chains into the chunk at `start`, after checking `start` and `prev_key`."""
    chunk_size = namespace.chunk_size
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= num_tokens or start % chunk_size:
        raise ValueError(
            f"start = {start!r}: expected a multiple of chunk_size = {chunk_size} in [0, len(tokens) = {num_tokens}]"
        )
    if start == 0:
        if prev_key is not None:
            raise ValueError(f"prev_key = {prev_key!r} with start = 0: the first chunk is seeded by the namespace")
        return namespace.fingerprint
    if not isinstance(prev_key, bytes) or len(prev_key) != KEY_BYTES:
        raise ValueError(
            f"prev_key = {prev_key!r} with start = {start}: expected the {KEY_BYTES}-byte key of the chunk ending there"
        )
    return prev_key


def _partial_key(prev_key: bytes, data: memoryview, begin: int, extra_of: ExtraOf | None) -> ChunkKey:
    """The key of the partial chunk whose tokens (as uint32 bytes) are `data`, from token `begin` on."""
    tail = _extra_tail(extra_of, begin, begin + len(data) // _TOKEN_BYTES)
    return _digest(prev_key + data + tail + _PARTIAL_TAG + struct.pack("<I", len(data) // _TOKEN_BYTES))


def partial_keys(
    tokens: Tokens,
    namespace: Namespace,
    *,
    start: int,
    prev_key: ChunkKey | None,
    end: int | None = None,
    extra_of: ExtraOf | None = None,
) -> list[ChunkKey]:
    """Keys of the partial chunks at ``start`` that end on a block: ``keys[j]`` is the
    key that ``chunk_keys(tokens[:start + (j+1)*B], include_partial=True)`` ends with
    (``B = namespace.block_size``), for each length of whole blocks, shorter than a
    chunk, that ``tokens`` holds. These are the partials a lookup may hit where the
    full chunk at ``start`` is missing (a grown prompt meets its predecessor's tail).
    ``start`` and ``prev_key`` are as in `chunk_keys`; tokens from ``end`` on (when
    given) are not looked at, as if ``tokens`` ended there.
    """
    source = _checked_source(tokens)
    prev_key = _seed_key(namespace, len(source), start, prev_key)
    block = namespace.block_size
    stop = min(len(source), start + namespace.chunk_size - block, len(source) if end is None else max(end, start))
    stop -= (stop - start) % block
    data = _token_bytes(source, start, stop)
    step = block * _TOKEN_BYTES
    return [_partial_key(prev_key, data[:n], start, extra_of) for n in range(step, len(data) + 1, step)]


def state_key(key: ChunkKey) -> ChunkKey:
    """The key of the Mamba-type state at the end of the chunk `key` names."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"key = {key!r}: expected a {KEY_BYTES}-byte chunk key")
    return _digest(key + _STATE_TAG)


def _extra_tail(extra_of: ExtraOf | None, begin: int, end: int) -> bytes:
    """The tagged digest of the chunk's extra bytes, or nothing when it has none."""
    extra = extra_of(begin, end) if extra_of is not None else None
    if extra is None:
        return b""
    if not isinstance(extra, bytes):
        raise ValueError(f"extra_of({begin}, {end}) returned a {type(extra).__name__}; expected bytes or None")
    return _EXTRA_TAG + _digest(extra)
