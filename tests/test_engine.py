"""CacheEngine end to end on CPU caches: exact bytes after store -> wipe -> retrieve,
prefix hits, eviction to disk and reload, restart, corruption, disk full, threads."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lmcache_ext import ops
from lmcache_ext.config import GB, STAGING_SLOTS, CacheConfig
from lmcache_ext.engine import CacheEngine
from lmcache_ext.keys import chunk_keys
from lmcache_ext.testing.filesystems import direct_io_supported
from lmcache_ext.testing.kv_layouts import make_layers, page_view

LAYERS, BLOCKS, BLOCK = 4, 96, 16
CHUNK = 64  # 4 blocks a chunk
HEADS, WIDTH = 2, 32  # page = 2 * 16 * 32 * 2 bytes = 2 KiB; a chunk = 4 layers * 4 blocks * 2 KiB
CHUNK_BYTES = LAYERS * (CHUNK // BLOCK) * HEADS * BLOCK * WIDTH * 2


def new_cache(seed: int) -> list[torch.Tensor]:
    return make_layers("LBHNC", LAYERS, BLOCKS, HEADS, BLOCK, WIDTH, torch.bfloat16, seed=seed)


def config(tmp_path: Path | None = None, host_chunks: int = 64, disk_chunks: int = 64, **kw) -> CacheConfig:
    disk = (
        dict(local_disk=str(tmp_path / "kv"), max_local_disk_size=disk_chunks * (CHUNK_BYTES + 4096) / GB)
        if tmp_path
        else {}
    )
    return CacheConfig(chunk_size=CHUNK, max_local_cpu_size=host_chunks * CHUNK_BYTES / GB, **disk, **kw)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(n)]


def blocks_of(cache: list[torch.Tensor], ids: list[int]) -> list[torch.Tensor]:
    return [page_view(kv)[ids].clone() for kv in cache]


def assert_same_blocks(
    dst: list[torch.Tensor], dst_ids: list[int], src: list[torch.Tensor], src_ids: list[int]
) -> None:
    for layer, (d, s) in enumerate(zip(dst, src)):
        assert torch.equal(page_view(d)[dst_ids], page_view(s)[src_ids]), f"layer {layer}"


def test_store_wipe_retrieve_into_other_blocks_is_byte_exact():
    cache = new_cache(1)
    original = [page_view(kv).clone() for kv in cache]
    tokens = prompt(3 * CHUNK + 10, seed=1)  # 3 full chunks, the tail is not stored
    src = list(range(0, 13))
    with CacheEngine(config(), cache, BLOCK) as engine:
        assert engine.lookup(tokens) == 0
        assert engine.store(tokens, src) == 3 * CHUNK
        assert engine.lookup(tokens) == 3 * CHUNK
        for kv in cache:
            kv.zero_()
        dst = list(range(50, 63))
        assert engine.retrieve(tokens, dst) == 3 * CHUNK
        for layer, kv in enumerate(cache):
            assert torch.equal(page_view(kv)[dst[:12]], original[layer][src[:12]])
            assert torch.count_nonzero(page_view(kv)[dst[12]]) == 0  # the unstored tail block
        stats = engine.stats()
        assert stats["stored_tokens_host"] == 3 * CHUNK
        assert stats["loaded_tokens_host"] == 3 * CHUNK
        assert stats["hit_tokens_host"] == 3 * CHUNK
        assert stats["lookup_tokens"] == 2 * len(tokens)


def test_a_shared_prefix_hits_partially_and_loads_only_that_prefix():
    cache = new_cache(2)
    doc = prompt(2 * CHUNK, seed=2)
    first = doc + prompt(CHUNK, seed=3)
    second = doc + prompt(CHUNK, seed=4)
    with CacheEngine(config(), cache, BLOCK) as engine:
        assert engine.store(first, list(range(12))) == 3 * CHUNK
        assert engine.lookup(second) == 2 * CHUNK
        assert engine.lookup(second[: CHUNK + 5]) == CHUNK
        assert engine.retrieve(second, list(range(40, 52))) == 2 * CHUNK
        assert_same_blocks(cache, list(range(40, 48)), cache, list(range(8)))
        assert engine.store(second, list(range(40, 52))) == 3 * CHUNK  # only the new chunk is gathered
        assert engine.stats()["stored_tokens_host"] == 4 * CHUNK


def test_storing_twice_gathers_once():
    cache = new_cache(3)
    tokens = prompt(2 * CHUNK, seed=5)
    with CacheEngine(config(), cache, BLOCK) as engine:
        engine.store(tokens, list(range(8)))
        engine.store(tokens, list(range(8, 16)))
        assert engine.stats()["stored_tokens_host"] == 2 * CHUNK


def test_host_eviction_falls_back_to_disk_and_reloads_exact_bytes(tmp_path):
    cache = new_cache(4)
    prompts = [prompt(2 * CHUNK, seed=10 + i) for i in range(4)]
    with CacheEngine(config(tmp_path, host_chunks=3), cache, BLOCK) as engine:
        for i, p in enumerate(prompts):
            assert engine.store(p, list(range(8 * i, 8 * i + 8))) == 2 * CHUNK
            engine.flush()
        stats = engine.stats()
        assert stats["evictions_host"] >= 5 and stats["host_chunks"] <= 3
        assert stats["stored_tokens_disk"] == 8 * CHUNK
        expected = blocks_of(cache, list(range(8)))
        assert engine.lookup(prompts[0]) == 2 * CHUNK
        assert engine.retrieve(prompts[0], list(range(64, 72))) == 2 * CHUNK
        for layer, kv in enumerate(cache):
            assert torch.equal(page_view(kv)[64:72], expected[layer])
        assert engine.stats()["loaded_tokens_disk"] == 2 * CHUNK
        # promoted back into host memory: the next load comes from there
        assert engine.retrieve(prompts[0], list(range(72, 80))) == 2 * CHUNK
        assert engine.stats()["loaded_tokens_host"] == 2 * CHUNK


def test_disk_files_bypass_the_page_cache_by_default(tmp_path):
    """O_DIRECT is the default; where the filesystem refuses it every file goes through
    the page cache instead, and the bytes are the same either way."""
    direct = direct_io_supported(tmp_path / "kv")
    cache = new_cache(4)
    prompts = [prompt(2 * CHUNK, seed=30 + i) for i in range(2)]
    with CacheEngine(config(tmp_path, host_chunks=2), cache, BLOCK) as engine:
        for i, p in enumerate(prompts):
            engine.store(p, list(range(8 * i, 8 * i + 8)))
            engine.flush()
        expected = blocks_of(cache, list(range(8)))
        assert engine.retrieve(prompts[0], list(range(64, 72))) == 2 * CHUNK  # evicted from host: from disk
        for layer, kv in enumerate(cache):
            assert torch.equal(page_view(kv)[64:72], expected[layer])
        stats = engine.stats()
    assert stats["disk_writes_ok"] == 4 and stats["loaded_tokens_disk"] == 2 * CHUNK
    assert (stats["disk_direct_writes"], stats["disk_direct_reads"]) == (4 * direct, 2 * direct)


def test_a_restarted_engine_finds_the_disk_cache(tmp_path):
    cache = new_cache(5)
    tokens = prompt(3 * CHUNK, seed=20)
    expected = blocks_of(cache, list(range(12)))
    with CacheEngine(config(tmp_path), cache, BLOCK) as engine:
        engine.store(tokens, list(range(12)))
    fresh = new_cache(6)
    with CacheEngine(config(tmp_path), fresh, BLOCK) as engine:
        assert engine.lookup(tokens) == 3 * CHUNK
        assert engine.retrieve(tokens, list(range(30, 42))) == 3 * CHUNK
        for layer, kv in enumerate(fresh):
            assert torch.equal(page_view(kv)[30:42], expected[layer])


def stored_files(tmp_path: Path) -> list[Path]:
    """The chunk files: named by their key's 32 hex digits."""
    return sorted(p for p in (tmp_path / "kv").rglob("*") if p.is_file() and len(p.name) == 32)


@pytest.mark.parametrize("damage", ["flip_payload_byte", "truncate", "flip_header_byte"])
def test_a_damaged_file_is_a_miss_never_wrong_bytes(tmp_path, damage):
    cache = new_cache(7)
    tokens = prompt(3 * CHUNK, seed=30)
    with CacheEngine(config(tmp_path), cache, BLOCK) as engine:
        engine.store(tokens, list(range(12)))
        second = chunk_keys(tokens, engine.namespace)[1]
    files = stored_files(tmp_path)
    assert len(files) == 3
    (victim,) = [f for f in files if f.name == second.hex()]
    data = bytearray(victim.read_bytes())
    if damage == "flip_payload_byte":
        data[-100] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) - 1000]
    else:
        data[20] ^= 0xFF
    victim.write_bytes(bytes(data))

    fresh = new_cache(9)
    before = blocks_of(fresh, list(range(40, 52)))
    with CacheEngine(config(tmp_path), fresh, BLOCK) as engine:
        assert engine.lookup(tokens) == 3 * CHUNK  # the damage is found on read
        assert engine.retrieve(tokens, list(range(40, 52))) == CHUNK
        expected = blocks_of(cache, list(range(4)))
        for layer, kv in enumerate(fresh):
            assert torch.equal(page_view(kv)[40:44], expected[layer])
        assert engine.stats()["failures_disk_read"] == 1
        assert engine.lookup(tokens) == CHUNK  # the bad file is gone
        assert not victim.exists()
        # the blocks after the failed chunk were not written with stale bytes from it
        for layer, kv in enumerate(fresh):
            assert torch.equal(page_view(kv)[44:52], before[layer][4:])


def test_a_full_disk_costs_stores_not_the_engine(tmp_path):
    cache = new_cache(10)
    prompts = [prompt(2 * CHUNK, seed=40 + i) for i in range(6)]
    with CacheEngine(config(tmp_path, host_chunks=2, disk_chunks=3), cache, BLOCK) as engine:
        for i, p in enumerate(prompts):
            assert engine.store(p, list(range(8 * i, 8 * i + 8))) == 2 * CHUNK
            engine.flush()
        assert len(stored_files(tmp_path)) <= 3
        assert engine.lookup(prompts[-1]) == 2 * CHUNK
        expected = blocks_of(cache, list(range(40, 48)))
        assert engine.retrieve(prompts[-1], list(range(80, 88))) == 2 * CHUNK
        for layer, kv in enumerate(cache):
            assert torch.equal(page_view(kv)[80:88], expected[layer])
        assert engine.lookup(prompts[0]) == 0


def test_unfull_chunks_are_stored_when_asked(tmp_path):
    cache = new_cache(11)
    tokens = prompt(CHUNK + 2 * BLOCK + 5, seed=50)  # a chunk, two more full blocks, 5 tokens
    with CacheEngine(config(tmp_path, save_unfull_chunk=True), cache, BLOCK) as engine:
        assert engine.store(tokens, list(range(7))) == CHUNK + 2 * BLOCK
        engine.flush()
    fresh = new_cache(12)
    with CacheEngine(config(tmp_path, save_unfull_chunk=True), fresh, BLOCK) as engine:
        assert engine.lookup(tokens) == CHUNK + 2 * BLOCK
        assert engine.lookup(tokens[: CHUNK + BLOCK]) == CHUNK  # a different partial length
        assert engine.retrieve(tokens, list(range(20, 27))) == CHUNK + 2 * BLOCK
        assert_same_blocks(fresh, list(range(20, 26)), cache, list(range(6)))


def test_threads_storing_and_retrieving_different_prompts(tmp_path):
    cache = new_cache(13)
    errors: list[str] = []

    def worker(t: int) -> None:
        rng = random.Random(t)
        for round_ in range(6):
            tokens = prompt(2 * CHUNK, seed=1000 * t + round_)
            src = list(range(t * 16, t * 16 + 8))
            dst = list(range(t * 16 + 8, t * 16 + 16))
            for kv in cache:
                page_view(kv)[src] = torch.randint(0, 256, page_view(kv)[src].shape, dtype=torch.uint8)
            expected = blocks_of(cache, src)
            if engine.store(tokens, src) != 2 * CHUNK:
                errors.append(f"thread {t} round {round_}: store")
            got = engine.retrieve(tokens, dst)
            if got != 2 * CHUNK or any(
                not torch.equal(page_view(kv)[dst], expected[layer]) for layer, kv in enumerate(cache)
            ):
                errors.append(f"thread {t} round {round_}: retrieve {got}")
            if rng.random() < 0.5:
                engine.flush()

    # 12 slots: room for every thread's chunks in flight (pinned until their disk write
    # ends), but far fewer than the 48 chunks stored, so slots are evicted and reused.
    with CacheEngine(config(tmp_path, host_chunks=12), cache, BLOCK) as engine:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        engine.flush()
        stats = engine.stats()
        assert stats["pinned_slots"] == 0 and stats["evictions_host"] > 0
        assert stats["stored_tokens_disk"] == 48 * CHUNK


def test_bad_calls_are_refused_before_anything_moves():
    cache = new_cache(14)
    tokens = prompt(2 * CHUNK, seed=60)
    with pytest.raises(ValueError, match="chunk_size = 100 is not a positive multiple of block_size = 16|100.*16"):
        CacheEngine(CacheConfig(chunk_size=100), cache, BLOCK)
    with CacheEngine(config(), cache, BLOCK) as engine:
        with pytest.raises(ValueError, match=r"store: len\(block_ids\) = 7 is too short: the tokens fill 8 blocks"):
            engine.store(tokens, list(range(7)))
        with pytest.raises(ValueError, match=r"store: block_ids\[5\] = 1 repeats block_ids\[1\]"):
            engine.store(tokens, [0, 1, 2, 3, 4, 1, 6, 7])
        with pytest.raises(ValueError, match=r"block_ids\[0\] = 96 is out of range: the cache has 96 blocks"):
            engine.store(tokens, list(range(96, 104)))
        assert engine.lookup(tokens) == 0
        assert engine.stats()["pinned_slots"] == 0
    with pytest.raises(RuntimeError, match="the cache engine is closed"):
        engine.lookup(tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not ops.cuda_available(), reason="needs a CUDA device and a CUDA build")
def test_cuda_cache_round_trip_through_pinned_slots(tmp_path):
    cache = make_layers("LBNHC", LAYERS, BLOCKS, HEADS, BLOCK, WIDTH, torch.bfloat16, device="cuda", seed=15)
    original = [page_view(kv).clone() for kv in cache]
    tokens = prompt(3 * CHUNK, seed=70)
    with CacheEngine(config(tmp_path), cache, BLOCK) as engine:
        assert engine._pool.is_page_locked
        assert engine.store(tokens, list(range(12))) == 3 * CHUNK
        engine.flush()
    for kv in cache:
        kv.zero_()
    with CacheEngine(config(tmp_path), cache, BLOCK) as engine:  # from disk, through a slot
        assert engine.retrieve(tokens, list(range(40, 52))) == 3 * CHUNK
    for layer, kv in enumerate(cache):
        assert torch.equal(page_view(kv)[40:52], original[layer][:12])


KILLED_WRITER = """
import sys
sys.path.insert(0, {tests!r})
import test_engine as t
from lmcache_ext.engine import CacheEngine
engine = CacheEngine(t.big_chunk_config(t.Path({root!r})), t.big_chunk_cache(), t.BLOCK)
for i in range(6):
    engine.store(t.prompt(4 * t.CHUNK, seed=80 + i), list(range(16 * i, 16 * i + 16)))
print("stored", flush=True)
engine.flush()
"""


def big_chunk_cache() -> list[torch.Tensor]:
    """8 layers of 64 KiB pages: 2 MiB chunks, so disk writes take long enough to be cut."""
    return make_layers("LBHNC", 8, BLOCKS, 8, BLOCK, 256, torch.bfloat16, seed=16)


def big_chunk_config(tmp_path: Path) -> CacheConfig:
    return CacheConfig(
        chunk_size=CHUNK, max_local_cpu_size=0.25, local_disk=str(tmp_path / "kv"), max_local_disk_size=1.0
    )


def test_a_killed_writer_leaves_nothing_a_later_engine_would_misread(tmp_path):
    """SIGKILL while disk writes are in flight: a new engine on the same directory
    sees whole files only; each prompt hits with exact bytes or misses."""
    script = KILLED_WRITER.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "stored"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    source, restored = big_chunk_cache(), [torch.zeros_like(kv) for kv in big_chunk_cache()]
    with CacheEngine(big_chunk_config(tmp_path), restored, BLOCK) as engine:
        assert not list((tmp_path / "kv").rglob("*.tmp"))
        for i in range(6):
            got = engine.retrieve(prompt(4 * CHUNK, seed=80 + i), list(range(16 * i, 16 * i + 16)))
            blocks = list(range(16 * i, 16 * i + got // BLOCK))
            assert_same_blocks(restored, blocks, source, blocks)


def test_without_the_host_tier_a_few_staging_slots_serve_the_disk(tmp_path):
    cache = new_cache(18)
    prompts = [prompt(2 * CHUNK, seed=90 + i) for i in range(6)]
    with CacheEngine(config(tmp_path, local_cpu=False), cache, BLOCK) as engine:
        assert engine.stats()["host_slots"] == STAGING_SLOTS
        for i, p in enumerate(prompts):
            assert engine.store(p, list(range(8 * i, 8 * i + 8))) == 2 * CHUNK
            engine.flush()
        expected = blocks_of(cache, list(range(8)))
        assert engine.retrieve(prompts[0], list(range(80, 88))) == 2 * CHUNK
        for layer, kv in enumerate(cache):
            assert torch.equal(page_view(kv)[80:88], expected[layer])
        assert engine.stats()["loaded_tokens_disk"] == 2 * CHUNK


def test_reset_drops_host_and_disk_chunks_for_this_engine_and_after_a_restart(tmp_path):
    cache = new_cache(20)
    tokens = prompt(2 * CHUNK, seed=200)
    with CacheEngine(config(tmp_path), cache, BLOCK) as engine:
        assert engine.store(tokens, list(range(8))) == 2 * CHUNK
        engine.flush()
        old_namespace = engine.namespace
        assert engine.reset() is True
        assert engine.namespace != old_namespace and engine.lookup(tokens) == 0
        assert engine.retrieve(tokens, list(range(40, 48))) == 0
        engine.flush()
        stats = engine.stats()
        assert (stats["host_chunks"], stats["host_slots_free"], stats["disk_files"]) == (0, 64, 0)
        assert engine.store(tokens, list(range(8))) == 2 * CHUNK  # stored afresh, in the new epoch
    with CacheEngine(config(tmp_path), new_cache(21), BLOCK) as restarted:
        assert restarted.namespace == engine.namespace and restarted.lookup(tokens) == 2 * CHUNK


def test_a_reset_that_cannot_write_its_epoch_is_refused(tmp_path):
    with CacheEngine(config(tmp_path), new_cache(22), BLOCK) as engine:
        tokens = prompt(CHUNK, seed=201)
        engine.store(tokens, list(range(4)))
        (tmp_path / "kv" / "epoch").mkdir()
        assert engine.reset() is False and engine.lookup(tokens) == CHUNK


def test_lookup_promises_only_what_the_host_slots_can_take(tmp_path):
    cache = new_cache(23)
    tokens = prompt(4 * CHUNK, seed=202)
    with CacheEngine(config(tmp_path), cache, BLOCK) as engine:
        engine.store(tokens, list(range(16)))
    with CacheEngine(config(tmp_path, host_chunks=2), new_cache(24), BLOCK) as small:
        assert small.lookup(tokens) == 2 * CHUNK  # four chunks on disk, two slots to load them through
        assert small.retrieve(tokens, list(range(20, 36))) == 2 * CHUNK


def slow_copies(monkeypatch, delay: float) -> threading.Event:
    """Make every gather and scatter wait `delay` seconds before copying; the event is
    set when the first one starts."""
    started = threading.Event()
    for name in ("gather", "scatter"):
        real = getattr(ops, name)

        def slow(*args, _real=real, **kwargs):
            started.set()
            time.sleep(delay)
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, slow)
    return started


def test_async_store_and_retrieve_are_exact_and_nothing_is_visible_before_its_copy_ends(monkeypatch):
    cache = new_cache(30)
    tokens = prompt(2 * CHUNK, seed=300)
    with CacheEngine(config(), cache, BLOCK) as engine:
        started = slow_copies(monkeypatch, 0.3)
        pending = engine.store_async(tokens, list(range(8)))
        assert started.wait(5)
        assert engine.lookup(tokens) == 0 and engine.retrieve(tokens, list(range(40, 48))) == 0  # still copying
        assert pending.result(timeout=10) == 2 * CHUNK
        assert engine.lookup(tokens) == 2 * CHUNK
        loaded = engine.retrieve_async(tokens, list(range(60, 68)))
        assert loaded.result(timeout=10) == 2 * CHUNK
        assert_same_blocks(cache, list(range(60, 68)), cache, list(range(8)))
        assert engine.stats()["pinned_slots"] == 0
        late = engine.store_async(prompt(CHUNK, seed=301), list(range(20, 24)))
    assert late.result(timeout=10) == CHUNK  # close let the queued store finish
