"""Chunk keys: the chain spec byte for byte, determinism across processes, namespace separation, input checks."""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from lmcache_ext.keys import FORMAT_VERSION, Namespace, chunk_keys, partial_keys

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 4  # tokens per chunk in most tests: small enough to write chunks out by hand

BASE = dict(
    model="meta-llama/Llama-3.1-8B",
    revision="main",
    dtype="bfloat16",
    layout="LBNHC",
    block_size=2,
    page_bytes=65536,
    num_layers=32,
    tp_size=2,
    tp_rank=1,
    chunk_size=CHUNK,
)
NS = Namespace(**BASE)

# A valid value different from the default for every field: keys must change with each.
OTHER_VALUES = dict(
    model="meta-llama/Llama-3.1-70B",
    revision="0e9e39f",
    dtype="float16",
    layout="LBHNC",
    block_size=4,
    page_bytes=65537,
    num_layers=31,
    tp_size=4,
    tp_rank=0,
    chunk_size=8,
    cache_salt="tenant-a",
    lora_id=7,
    format_version=FORMAT_VERSION + 1,
    cache_namespace="weights-v2",
    epoch="0123456789abcdef0123456789abcdef",
    kv_groups="sliding128x2+fullx2",
    kv_heads=8,
)

TOKENS = [1000 + 37 * i for i in range(4 * CHUNK + 3)]  # four full chunks and three tokens


def spec_keys(tokens: list[int], seed: bytes, chunk: int) -> list[bytes]:
    """The documented chain, written out: h_i = xxh3_128(h_{i-1} || uint32le tokens of chunk i)."""
    keys, prev = [], seed
    for begin in range(0, len(tokens) - chunk + 1, chunk):
        prev = xxhash.xxh3_128_digest(prev + struct.pack(f"<{chunk}I", *tokens[begin : begin + chunk]))
        keys.append(prev)
    return keys


def test_keys_follow_the_documented_chain():
    keys = chunk_keys(TOKENS, NS)
    assert keys == spec_keys(TOKENS, NS.fingerprint, CHUNK)
    assert len(keys) == 4 and all(type(k) is bytes and len(k) == 16 for k in keys)


def test_fingerprint_is_pinned():
    # Keys live on disk and in shared stores: an encoding change must be a deliberate format bump.
    assert NS.fingerprint.hex() == "9259d3c6020678b74c073197907df54d"


# A realistic namespace (chunk 256, block 16) with a salt and a LoRA id; 1000 tokens: 3 full chunks + 1 partial.
SUBPROCESS_FIELDS = dict(BASE, block_size=16, chunk_size=256, cache_salt="s", lora_id="adapter")
SUBPROCESS_SCRIPT = f"""
from lmcache_ext.keys import Namespace, chunk_keys
for key in chunk_keys(list(range(1000)), Namespace(**{SUBPROCESS_FIELDS!r}), include_partial=True):
    print(key.hex())
"""


def test_keys_are_the_same_in_processes_with_different_hash_seeds():
    outputs = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        run = subprocess.run(
            [sys.executable, "-c", SUBPROCESS_SCRIPT], env=env, capture_output=True, text=True, check=True
        )
        outputs.append(run.stdout.split())
    here = [k.hex() for k in chunk_keys(list(range(1000)), Namespace(**SUBPROCESS_FIELDS), include_partial=True)]
    assert len(here) == 4
    assert outputs[0] == outputs[1] == here


def test_other_values_cover_every_field():
    assert set(OTHER_VALUES) == {f.name for f in dataclasses.fields(Namespace)}


@pytest.mark.parametrize("field", sorted(OTHER_VALUES))
def test_every_namespace_field_changes_every_key(field):
    other = dataclasses.replace(NS, **{field: OTHER_VALUES[field]})
    assert other.fingerprint != NS.fingerprint
    tokens = TOKENS * 2
    ours, theirs = chunk_keys(tokens, NS), chunk_keys(tokens, other)
    assert not set(ours) & set(theirs)


def test_equal_namespaces_have_equal_fingerprints():
    assert Namespace(**BASE).fingerprint == NS.fingerprint
    assert Namespace(**BASE) == NS and hash(Namespace(**BASE)) == hash(NS)


def test_none_empty_and_int_versus_str_ids_are_different_namespaces():
    fingerprints = {
        NS.for_request(cache_salt=None).fingerprint,
        NS.for_request(cache_salt="").fingerprint,
        NS.for_request(lora_id=1).fingerprint,
        NS.for_request(lora_id="1").fingerprint,
    }
    assert len(fingerprints) == 4


def test_for_request_replaces_salt_and_lora_only():
    salted = NS.for_request(cache_salt="tenant-a", lora_id=3)
    assert salted == dataclasses.replace(NS, cache_salt="tenant-a", lora_id=3)
    assert salted.for_request() == NS
    with pytest.raises(ValueError, match=r"Namespace.lora_id = 1.5: expected None, a str or an int"):
        NS.for_request(lora_id=1.5)


@pytest.mark.parametrize("chunk", range(4))
def test_a_changed_token_changes_its_chunk_key_and_every_later_one(chunk):
    base = chunk_keys(TOKENS, NS)
    for position in (chunk * CHUNK, chunk * CHUNK + CHUNK - 1):
        tokens = list(TOKENS)
        tokens[position] += 1
        keys = chunk_keys(tokens, NS)
        assert keys[:chunk] == base[:chunk]
        assert all(a != b for a, b in zip(keys[chunk:], base[chunk:]))
        assert len(keys) == len(base)


def test_partial_chunk_key_encodes_its_length():
    full = chunk_keys(TOKENS, NS)
    with_partial = chunk_keys(TOKENS, NS, include_partial=True)
    assert with_partial[:4] == full and len(with_partial) == 5
    tail = TOKENS[16:]
    expected = xxhash.xxh3_128_digest(full[-1] + struct.pack("<3I", *tail) + b"P" + struct.pack("<I", 3))
    assert with_partial[4] == expected

    # Every length of the same last chunk: partials differ from each other and from the full key.
    prefix = TOKENS[:CHUNK]
    last = [5, 6, 7, CHUNK - 1]  # a full chunk whose last token equals the length of a 3-token partial
    full_key = chunk_keys(prefix + last, NS)[-1]
    partials = [chunk_keys(prefix + last[:n], NS, include_partial=True)[-1] for n in range(1, CHUNK)]
    assert len(set(partials + [full_key])) == CHUNK


def test_extras_follow_the_documented_chain_and_none_adds_nothing():
    asked = []

    def extra_of(begin: int, end: int) -> bytes | None:
        asked.append((begin, end))
        return b"image-a" if begin <= 9 < end else None  # the chunk holding token 9

    keys = chunk_keys(TOKENS, NS, include_partial=True, extra_of=extra_of)
    assert asked == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 19)]
    plain = chunk_keys(TOKENS, NS, include_partial=True)
    assert keys[:2] == plain[:2] and keys[2] != plain[2] and keys[3:] != plain[3:]
    tagged = b"X" + xxhash.xxh3_128_digest(b"image-a")
    assert keys[2] == xxhash.xxh3_128_digest(keys[1] + struct.pack("<4I", *TOKENS[8:12]) + tagged)
    assert keys[3] == spec_keys(TOKENS[12:16], keys[2], CHUNK)[0]
    assert keys == chunk_keys(TOKENS, NS, include_partial=True, extra_of=lambda b, e: extra_of(b, e) or None)
    extended = chunk_keys(TOKENS, NS, start=2 * CHUNK, prev_key=keys[1], include_partial=True, extra_of=extra_of)
    assert extended == keys[2:]


def test_a_partial_chunk_with_extras_differs_from_every_full_and_plain_key():
    tokens = TOKENS[: CHUNK + 3]
    extra = lambda b, e: b"e"  # noqa: E731
    keys = {
        chunk_keys(tokens, NS, include_partial=True)[-1],
        chunk_keys(tokens, NS, include_partial=True, extra_of=extra)[-1],
        chunk_keys(TOKENS[: 2 * CHUNK], NS)[-1],
        chunk_keys(TOKENS[: 2 * CHUNK], NS, extra_of=extra)[-1],
        chunk_keys(tokens, NS, include_partial=True, extra_of=lambda b, e: b"f")[-1],
    }
    assert len(keys) == 5


def test_extra_of_must_give_bytes_or_none():
    with pytest.raises(ValueError, match=r"extra_of\(0, 4\) returned a str; expected bytes or None"):
        chunk_keys(TOKENS, NS, extra_of=lambda b, e: "text")


def test_include_partial_adds_nothing_when_the_tokens_end_on_a_chunk():
    tokens = TOKENS[: 2 * CHUNK]
    assert chunk_keys(tokens, NS, include_partial=True) == chunk_keys(tokens, NS)


@pytest.mark.parametrize("length", [0, 1, CHUNK - 1])
def test_inputs_shorter_than_a_chunk_have_no_full_chunk_keys(length):
    tokens = TOKENS[:length]
    assert chunk_keys(tokens, NS) == []
    partial = chunk_keys(tokens, NS, include_partial=True)
    assert len(partial) == (1 if length else 0)


def test_extending_equals_one_shot():
    tokens = list(range(7, 7 + 10 * CHUNK + 2))
    one_shot = chunk_keys(tokens, NS)
    one_shot_partial = chunk_keys(tokens, NS, include_partial=True)
    # Grow the request one token at a time (decode) and in uneven steps (chunked prefill).
    for steps in (range(1, len(tokens) + 1), [3, 9, 9, 25, len(tokens)]):
        keys: list[bytes] = []
        for seen in steps:
            keys += chunk_keys(tokens[:seen], NS, start=len(keys) * CHUNK, prev_key=keys[-1] if keys else None)
            assert keys == one_shot[: seen // CHUNK]
    start = 6 * CHUNK
    extended = chunk_keys(tokens, NS, start=start, prev_key=one_shot[5], include_partial=True)
    assert extended == one_shot_partial[6:]
    assert chunk_keys(tokens, NS, start=len(tokens) - 2, prev_key=one_shot[-1]) == []


def test_extending_from_numpy_and_torch_slices_equals_one_shot():
    tokens = np.arange(100, 100 + 5 * CHUNK, dtype=np.int64)
    one_shot = chunk_keys(tokens, NS)
    assert chunk_keys(tokens, NS, start=2 * CHUNK, prev_key=one_shot[1]) == one_shot[2:]
    assert chunk_keys(torch.from_numpy(tokens), NS, start=2 * CHUNK, prev_key=one_shot[1]) == one_shot[2:]


@pytest.mark.parametrize(
    "convert",
    [
        tuple,
        lambda t: [np.int64(x) for x in t],
        lambda t: np.array(t, dtype=np.uint32),
        lambda t: np.array(t, dtype=np.int64),
        lambda t: np.array(t, dtype=np.uint16),
        lambda t: np.array(t, dtype=">u4"),
        lambda t: np.repeat(np.array(t, dtype=np.int32), 2)[::2],
        lambda t: torch.tensor(t, dtype=torch.int64),
        lambda t: torch.tensor(t, dtype=torch.int32),
        lambda t: torch.tensor(t, dtype=torch.int64).repeat_interleave(2)[::2],
    ],
    ids=[
        "tuple",
        "numpy-scalars",
        "np-uint32",
        "np-int64",
        "np-uint16",
        "np-big-endian",
        "np-strided",
        "torch-int64",
        "torch-int32",
        "torch-strided",
    ],
)
def test_every_input_kind_gives_the_list_keys(convert):
    assert chunk_keys(convert(TOKENS), NS, include_partial=True) == chunk_keys(TOKENS, NS, include_partial=True)


def test_largest_token_id_is_accepted():
    tokens = [0, 2**32 - 1] * CHUNK
    keys = chunk_keys(tokens, NS)
    assert keys == chunk_keys(np.array(tokens, dtype=np.uint64), NS) == spec_keys(tokens, NS.fingerprint, CHUNK)


@pytest.mark.parametrize(
    "tokens, message",
    [
        ([1, 2, -1, 4], r"tokens\[2\] = -1 is out of range: expected a token id in \[0, 2\*\*32\)"),
        ([1, 2, 3, 2**32], r"tokens\[3\] = 4294967296 is out of range"),
        ([1, 2.5, 3, 4], r"tokens\[1\] = 2.5 is a float; expected an int token id"),
        ((1, 2, 3, -5), r"tokens\[3\] = -5 is out of range"),
        ((1, "2", 3, 4), r"tokens\[1\] = '2' is a str; expected an int token id"),
        ([[1, 2], [3, 4]], r"tokens\[0\] = \[1, 2\] is a list; expected an int token id"),
        (np.array([1, 2, 3, -7]), r"tokens\[3\] = -7 is out of range"),
        (np.array([1, 2**40, 3, 4], dtype=np.uint64), r"tokens\[1\] = 1099511627776 is out of range"),
        (torch.tensor([5, 6, 7, -2]), r"tokens\[3\] = -2 is out of range"),
        (torch.tensor([5, 2**32, 7, 8]), r"tokens\[1\] = 4294967296 is out of range"),
        (np.array([1.0, 2.0, 3.0, 4.0]), r"tokens has dtype float64; expected an integer dtype"),
        (torch.ones(4), r"tokens has dtype torch.float32; expected an integer dtype"),
        (torch.ones(4, dtype=torch.bfloat16), r"tokens has dtype torch.bfloat16"),
        (torch.ones(4, dtype=torch.bool), r"tokens has dtype torch.bool"),
        (np.ones((2, 4), dtype=np.int64), r"tokens has shape \(2, 4\); expected a 1-D sequence of token ids"),
        (torch.ones(2, 4, dtype=torch.int64), r"tokens has shape \(2, 4\); expected a 1-D"),
        (np.array(3), r"tokens has shape \(\); expected a 1-D"),
        (torch.tensor(3), r"tokens has shape \(\); expected a 1-D"),
        (np.int64(3), r"tokens is a int64; expected a sequence of ints"),
        ("abcd", r"tokens is a str; expected a sequence of ints"),
        ({1, 2, 3, 4}, r"tokens is a set; expected a sequence of ints"),
    ],
    ids=lambda v: None if isinstance(v, str) else type(v).__name__,
)
def test_bad_tokens_raise_with_the_value_named(tokens, message):
    with pytest.raises(ValueError, match=message):
        chunk_keys(tokens, NS, include_partial=True)


@pytest.mark.parametrize("include_partial", [False, True])
def test_bad_token_in_the_partial_chunk_is_named(include_partial):
    tokens = [1] * CHUNK + [2, -3]
    with pytest.raises(ValueError, match=r"tokens\[5\] = -3 is out of range"):
        chunk_keys(tokens, NS, include_partial=include_partial)


def test_bad_token_index_counts_from_the_start_of_the_request():
    keys = chunk_keys(TOKENS[: 2 * CHUNK], NS)
    tokens = TOKENS[: 2 * CHUNK] + [1, 2, -9, 4]
    for kind in (list, np.array, torch.tensor):
        with pytest.raises(ValueError, match=r"tokens\[10\] = -9 is out of range"):
            chunk_keys(kind(tokens), NS, start=2 * CHUNK, prev_key=keys[-1])


def test_non_cpu_tensor_is_refused():
    meta = torch.zeros(4, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=r"tokens is on meta; expected a cpu tensor"):
        chunk_keys(meta, NS)


@pytest.mark.parametrize(
    "start, prev_key, message",
    [
        (2, b"\0" * 16, r"start = 2: expected a multiple of chunk_size = 4 in \[0, len\(tokens\) = 19\]"),
        (-4, b"\0" * 16, r"start = -4: expected a multiple"),
        (20, b"\0" * 16, r"start = 20: expected a multiple"),
        (4.0, b"\0" * 16, r"start = 4.0: expected a multiple"),
        (True, b"\0" * 16, r"start = True: expected a multiple"),
        (0, b"\0" * 16, r"prev_key = b'\\x00.*' with start = 0: the first chunk is seeded by the namespace"),
        (4, None, r"prev_key = None with start = 4: expected the 16-byte key of the chunk ending there"),
        (4, b"\0" * 15, r"prev_key = b'\\x00.*' with start = 4: expected the 16-byte key"),
        (4, "00" * 16, r"prev_key = '0000.*' with start = 4: expected the 16-byte key"),
    ],
)
def test_bad_start_or_prev_key_raise(start, prev_key, message):
    with pytest.raises(ValueError, match=message):
        chunk_keys(TOKENS, NS, start=start, prev_key=prev_key)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"chunk_size": 0}, r"Namespace.chunk_size = 0: expected a positive int"),
        ({"chunk_size": -256}, r"Namespace.chunk_size = -256: expected a positive int"),
        ({"chunk_size": 4.0}, r"Namespace.chunk_size = 4.0: expected a positive int"),
        ({"chunk_size": True}, r"Namespace.chunk_size = True: expected a positive int"),
        ({"chunk_size": 6, "block_size": 4}, r"Namespace.chunk_size = 6 is not a multiple of block_size = 4"),
        ({"block_size": 0}, r"Namespace.block_size = 0: expected a positive int"),
        ({"page_bytes": "65536"}, r"Namespace.page_bytes = '65536': expected a positive int"),
        ({"num_layers": 0}, r"Namespace.num_layers = 0: expected a positive int"),
        ({"tp_size": 0}, r"Namespace.tp_size = 0: expected a positive int"),
        ({"tp_rank": -1}, r"Namespace.tp_rank = -1: expected an int >= 0"),
        ({"tp_rank": 2}, r"Namespace.tp_rank = 2 is out of range: expected 0 <= tp_rank < tp_size = 2"),
        ({"format_version": 0}, r"Namespace.format_version = 0: expected a positive int"),
        ({"model": ""}, r"Namespace.model = '': expected a non-empty str"),
        ({"dtype": None}, r"Namespace.dtype = None: expected a non-empty str"),
        ({"layout": 3}, r"Namespace.layout = 3: expected a non-empty str"),
        ({"revision": None}, r"Namespace.revision = None: expected a str"),
        ({"cache_salt": 5}, r"Namespace.cache_salt = 5: expected None or a str"),
        ({"lora_id": False}, r"Namespace.lora_id = False: expected None, a str or an int"),
    ],
)
def test_bad_namespace_fields_raise_with_field_and_value(changes, message):
    with pytest.raises(ValueError, match=message):
        Namespace(**{**BASE, **changes})


def test_empty_revision_and_salt_are_allowed():
    ns = Namespace(**{**BASE, "revision": "", "cache_salt": ""})
    assert ns.fingerprint != NS.fingerprint


def test_partial_keys_are_the_partial_keys_of_every_block_aligned_prefix_of_a_chunk():
    ns = dataclasses.replace(NS, chunk_size=8, block_size=2)
    tokens = list(range(100, 121))  # two full chunks of 8, then 5 tokens
    full = chunk_keys(tokens, ns)
    for start, prev in ((0, None), (8, full[0]), (16, full[1])):
        keys = partial_keys(tokens, ns, start=start, prev_key=prev)
        lengths = range(2, min(8, len(tokens) - start) + 1, 2)
        expected = [chunk_keys(tokens[: start + n], ns, include_partial=True)[-1] for n in lengths if n < 8]
        assert keys == expected and len(keys) == (3 if start < 16 else 2)
        assert partial_keys(np.array(tokens), ns, start=start, prev_key=prev) == keys
    assert partial_keys(tokens, ns, start=8, prev_key=full[0], end=13) == partial_keys(
        tokens[:13], ns, start=8, prev_key=full[0]
    )
    assert partial_keys(tokens, ns, start=8, prev_key=full[0], end=9) == []  # no whole block before `end`
    assert not set(partial_keys(tokens, ns, start=8, prev_key=full[0])) & set(full)
    with pytest.raises(ValueError, match=r"start = 3: expected a multiple of chunk_size = 8"):
        partial_keys(tokens, ns, start=3, prev_key=full[0])
    with pytest.raises(ValueError, match=r"prev_key = None with start = 8"):
        partial_keys(tokens, ns, start=8, prev_key=None)
    with pytest.raises(ValueError, match=r"tokens\[9\] = -1 is out of range"):
        partial_keys(tokens[:9] + [-1] + tokens[10:], ns, start=8, prev_key=full[0])
