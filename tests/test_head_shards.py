"""Chunks kept per KV head: what an engine at one TP size writes, an engine at another
reads byte for byte, on disk and on Redis/Valkey; a missing head is a miss."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lmcache_ext import ops
from lmcache_ext.config import load_config
from lmcache_ext.executor import TransferExecutor
from lmcache_ext.geometry import Geometry
from lmcache_ext.keys import chunk_keys
from lmcache_ext.plans import Plan, SlotCopy, Source, TierTransfer
from lmcache_ext.tiers import Storage, build_storage, open_holdings
from lmcache_ext.tiers.heads import HeadShards

HEADS, LAYERS, BLOCK, BLOCKS, WIDTH = 4, 3, 4, 2, 8  # WIDTH: bytes of one token of one head (K|V)


def geometry(tp: int, layout: str, total_heads: int = HEADS) -> Geometry:
    """A rank's geometry at TP `tp` of a model with `total_heads` KV heads (replicated
    on tp / total_heads ranks where there are fewer heads than ranks)."""
    heads = max(total_heads // tp, 1)
    return Geometry.of_cache(
        model="m",
        revision="",
        dtype="bfloat16",
        layout=layout,
        block_size=BLOCK,
        page_bytes=heads * BLOCK * WIDTH,
        num_layers=LAYERS,
        chunk_size=BLOCK * BLOCKS,
        tp_size=tp,
        replicas=max(tp // total_heads, 1),
        heads=heads,
        head_runs=1 if layout == "LBHNC" else BLOCK,
    )


def whole_chunk(layout: str, total_heads: int = HEADS, seed: int = 0) -> torch.Tensor:
    """A chunk of every head's KV, [layer, block, H, N, bytes] (HND) or [layer, block, N, H, bytes] (NHD)."""
    shape = (LAYERS, BLOCKS, total_heads, BLOCK, WIDTH)
    if layout != "LBHNC":
        shape = (LAYERS, BLOCKS, BLOCK, total_heads, WIDTH)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def rank_payload(chunk: torch.Tensor, layout: str, g: Geometry, rank: int) -> torch.Tensor:
    """Rank `rank`'s pages of `chunk`: the heads vLLM gives it (a replicated head whole)."""
    first = rank // g.replicas * g.heads
    axis = 2 if layout == "LBHNC" else 3
    return chunk.narrow(axis, first, g.heads).contiguous().view(-1)


def storage(tmp_path: Path, g: Geometry, rank: int, url: str | None = None) -> Storage:
    extra = {"max_local_cpu_size": 0.01, "local_disk": str(tmp_path / "disk"), "max_local_disk_size": 0.01}
    if url is not None:
        extra = {"max_local_cpu_size": 0.01, "remote_url": url}
    return build_storage(load_config(extra, environ={}), g, rank)


def store(tmp_path: Path, g: Geometry, layout: str, chunk: torch.Tensor, key: bytes, url: str | None = None) -> None:
    for rank in range(g.tp_size):
        s = storage(tmp_path, g, rank, url)
        for io in s.tiers.values():
            assert io.submit_write(key, rank_payload(chunk, layout, g, rank)).result(timeout=10)
            io.flush()
            io.close()


def load(
    tmp_path: Path, g: Geometry, rank: int, nbytes: int, key: bytes, url: str | None = None
) -> torch.Tensor | None:
    s = storage(tmp_path, g, rank, url)
    (io,) = s.tiers.values()
    out = torch.zeros(nbytes, dtype=torch.uint8)
    try:
        return out if io.read_into(key, out) else None
    finally:
        io.close()


def chunk_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.parent.parent == root]


KEY = chunk_keys(list(range(BLOCK * BLOCKS)), geometry(1, "LBHNC").namespace)[0]


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize(("written_at", "read_at"), [(2, 1), (1, 2), (1, 4), (4, 2), (2, 4)])
def test_a_chunk_written_at_one_tp_size_reads_byte_exact_at_another(tmp_path, layout, written_at, read_at):
    chunk = whole_chunk(layout)
    writer, reader = geometry(written_at, layout), geometry(read_at, layout)
    assert writer.namespace == reader.namespace
    store(tmp_path, writer, layout, chunk, KEY)
    shard_dirs = sorted(p.name for p in (tmp_path / "disk").iterdir())
    assert shard_dirs == [f"shard{h}" for h in range(HEADS)]
    for rank in range(read_at):
        want = rank_payload(chunk, layout, reader, rank)
        assert torch.equal(load(tmp_path, reader, rank, want.numel(), KEY), want)


# The copies on the CPU twin, and on the CUDA kernels (a `gpu` test: benchmarks/gpu_check.sh)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not ops.cuda_available(), reason="needs a CUDA device and build")],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
def test_paged_caches_at_tp2_store_heads_that_a_cache_at_tp1_loads_byte_exact_through_the_executor(
    tmp_path, device, layout
):
    """A head-sliced chunk's whole path on each device: each TP=2 rank's gather copies its
    pages into a slot (page-locked on CUDA) whose heads are split into their records once
    the copy has ended; the TP=1 rank joins every head's record into a slot and its
    scatter writes its own pages."""
    axis, blocks, into = (1 if layout == "LBHNC" else 2), (5, 9), (2, 7)
    shape = (12, HEADS, BLOCK, WIDTH) if layout == "LBHNC" else (12, BLOCK, HEADS, WIDTH)  # 12 blocks a layer
    whole = [torch.randint(0, 256, shape, dtype=torch.uint8) for _ in range(LAYERS)]
    written: list[bool] = []
    for rank in range(2):
        g = geometry(2, layout)
        s = storage(tmp_path, g, rank)
        mine = [pages.narrow(axis, rank * g.heads, g.heads).contiguous().to(device) for pages in whole]
        executor, slot = TransferExecutor(ops.PagedLayers.from_tensors(mine), s.pool, s.tiers), s.pool.alloc()
        write = TierTransfer(Source.DISK, KEY, slot, g.slot_bytes)
        result = executor.run(
            Plan(gathers=(SlotCopy(slot, blocks),), writes=(write,)), lambda _, ok: written.append(ok)
        )
        s.tiers[Source.DISK].flush()
        assert result.gathers == (True,) and written[rank]
        executor.close()
        s.close()
    g = geometry(1, layout)
    s = storage(tmp_path, g, 0)
    loaded = [torch.zeros_like(pages).to(device) for pages in whole]
    executor, slot = TransferExecutor(ops.PagedLayers.from_tensors(loaded), s.pool, s.tiers), s.pool.alloc()
    read = TierTransfer(Source.DISK, KEY, slot, g.slot_bytes)
    result = executor.run(Plan(reads=(read,), scatters=(SlotCopy(slot, into),)))
    executor.wait_slots([slot])
    assert result.reads == (True,) and result.scatters == (True,)
    for pages, got in zip(whole, loaded):
        assert torch.equal(got.cpu()[list(into)], pages[list(blocks)])
        assert not got.cpu()[[b for b in range(len(pages)) if b not in into]].any()
    executor.close()
    s.close()


def test_heads_replicated_on_several_ranks_are_written_once_and_read_by_every_replica(tmp_path):
    chunk = whole_chunk("LBHNC", total_heads=2)
    at_four, at_one = geometry(4, "LBHNC", total_heads=2), geometry(1, "LBHNC", total_heads=2)
    assert (at_four.replicas, at_four.writers, at_four.namespace) == (2, 2, at_one.namespace)
    store(tmp_path, at_four, "LBHNC", chunk, KEY)
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["shard0", "shard1"]
    assert [len(chunk_files(tmp_path / "disk" / f"shard{h}")) for h in range(2)] == [1, 1]
    assert torch.equal(load(tmp_path, at_one, 0, chunk.numel(), KEY), chunk.view(-1))
    for rank in range(4):
        want = rank_payload(chunk, "LBHNC", at_four, rank)
        assert torch.equal(load(tmp_path, at_four, rank, want.numel(), KEY), want)


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
def test_the_remote_tier_keeps_a_record_per_head_that_any_tp_size_reads(tmp_path, server, layout):
    chunk = whole_chunk(layout, seed=3)
    store(tmp_path, geometry(1, layout), layout, chunk, KEY, server.url)
    reader = geometry(2, layout)
    for rank in range(2):
        want = rank_payload(chunk, layout, reader, rank)
        assert torch.equal(load(tmp_path, reader, rank, want.numel(), KEY, server.url), want)
    holdings = open_holdings(load_config({"remote_url": server.url}, environ={}), reader)
    (remote,) = holdings.values()
    remote.probe([KEY])
    assert remote.contains(KEY)


def test_a_chunk_missing_one_head_is_a_miss_everywhere(tmp_path):
    chunk = whole_chunk("LBHNC")
    writer = geometry(4, "LBHNC")
    store(tmp_path, writer, "LBHNC", chunk, KEY)
    (lost,) = chunk_files(tmp_path / "disk" / "shard2")
    lost.unlink()
    at_one = geometry(1, "LBHNC")
    assert load(tmp_path, at_one, 0, chunk.numel(), KEY) is None
    at_two = geometry(2, "LBHNC")
    want = rank_payload(chunk, "LBHNC", at_two, 0)
    assert torch.equal(load(tmp_path, at_two, 0, want.numel(), KEY), want)
    assert load(tmp_path, at_two, 1, want.numel(), KEY) is None
    config = load_config({"local_disk": str(tmp_path / "disk"), "max_local_disk_size": 0.01}, environ={})
    (ledger,) = open_holdings(config, at_two).values()
    assert not ledger.contains(KEY)


def test_the_namespace_names_heads_not_ranks(tmp_path):
    at = {tp: geometry(tp, "LBHNC").namespace for tp in (1, 2, 4)}
    assert at[1] == at[2] == at[4]
    assert (at[1].tp_size, at[1].tp_rank, at[1].kv_heads, at[1].page_bytes) == (1, 0, HEADS, BLOCK * WIDTH)
    assert geometry(2, "LBHNC").namespace != geometry(2, "LBNHC").namespace
    assert geometry(2, "LBHNC", total_heads=8).namespace != at[2]
    per_rank = Geometry.of_cache(
        model="m", revision="", dtype="bfloat16", layout="LBHNC", block_size=BLOCK,
        page_bytes=2 * BLOCK * WIDTH, num_layers=LAYERS, chunk_size=BLOCK * BLOCKS, tp_size=2,
    )  # fmt: skip
    assert (per_rank.namespace.kv_heads, per_rank.namespace.tp_size, per_rank.writers) == (0, 2, 2)
    assert per_rank.namespace != at[2]


def test_old_per_rank_directories_are_named_once_and_never_read(tmp_path, caplog):
    old = tmp_path / "disk" / "rank0"
    for sub in (f"{i:02x}" for i in range(256)):
        (old / sub).mkdir(parents=True)
    g = geometry(2, "LBHNC")
    config = load_config({"local_disk": str(tmp_path / "disk"), "max_local_disk_size": 0.01}, environ={})
    with caplog.at_level(logging.WARNING):
        open_holdings(config, g)
    lines = [r.getMessage() for r in caplog.records if "older format" in r.getMessage()]
    assert len(lines) == 1 and "rank0" in lines[0]
    assert sorted(p.name for p in old.iterdir())[:2] == ["00", "01"]


@pytest.mark.parametrize(
    ("heads", "runs", "error"),
    [
        (3, 1, r"heads = 3 in 1 runs each, replicas = 1: expected a page of 64 bytes to split"),
        (2, 3, r"heads = 2 in 3 runs each"),
        (0, 1, r"heads = 0 in 1 runs each"),
    ],
)
def test_a_page_that_does_not_split_into_its_heads_is_refused(heads, runs, error):
    with pytest.raises(ValueError, match=error):
        Geometry.of_cache(
            model="m", revision="", dtype="bfloat16", layout="LBHNC", block_size=BLOCK, page_bytes=64,
            num_layers=LAYERS, chunk_size=BLOCK * BLOCKS, heads=heads, head_runs=runs,
        )  # fmt: skip


def test_replicated_ranks_holding_several_heads_are_refused():
    with pytest.raises(ValueError, match=r"replicas = 2: .*replicated ranks to hold one head"):
        Geometry.of_cache(
            model="m", revision="", dtype="bfloat16", layout="LBHNC", block_size=BLOCK, page_bytes=64,
            num_layers=LAYERS, chunk_size=BLOCK * BLOCKS, tp_size=2, replicas=2, heads=2,
        )  # fmt: skip


def test_head_shards_refuse_what_they_cannot_split(tmp_path):
    g = geometry(1, "LBHNC")
    shards = storage(tmp_path, g, 0).tiers["disk"]
    assert isinstance(shards, HeadShards)
    with pytest.raises(ValueError, match=r"a payload of 100 bytes: expected whole runs of 32 bytes of 4 heads"):
        shards.submit_write(KEY, torch.zeros(100, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"a payload on meta, contiguous=True: expected host bytes"):
        shards.read_into(KEY, torch.zeros(128, dtype=torch.uint8, device="meta"))
    with pytest.raises(ValueError, match=r"1 heads in runs of 32 bytes: expected at least 2 heads"):
        HeadShards([shards], 32)
    shards.close()


@pytest.mark.parametrize(("layout", "said"), [("LBNHC", "LBHNC"), ("LBHNC", "LBNHC"), ("BLNHC", "LBHNC")])
def test_views_ordered_otherwise_than_the_layout_says_are_refused(layout, said):
    pytest.importorskip("vllm", reason="vLLM is not installed: the check runs in the connector's worker")
    from lmcache_ext import ops
    from lmcache_ext.integration.vllm.worker_plans import _check_heads
    from lmcache_ext.testing.kv_layouts import make_layers

    g = geometry(2, said)
    views = ops.PagedLayers.from_tensors(make_layers(layout, LAYERS, 4, 2, BLOCK, WIDTH, torch.uint8))
    assert ops.head_order(views) == (2, 1 if layout.endswith("HNC") else BLOCK)
    with pytest.raises(
        ValueError,
        match=r"register_kv_caches got views \(4, 2, 4, 8\) .*: 2 KV heads in \d+ runs per page; the KV cache layout says 2 heads in \d+ runs",
    ):
        _check_heads(views, g)
    _check_heads(views, geometry(2, layout.replace("BL", "LB")))


def test_head_shards_sum_their_heads_counters_and_gauges(tmp_path):
    g = geometry(1, "LBHNC")
    shards = storage(tmp_path, g, 0).tiers["disk"]
    payload = rank_payload(whole_chunk("LBHNC"), "LBHNC", g, 0)
    assert shards.submit_write(KEY, payload).result(timeout=10)
    shards.flush()
    assert not shards.read_into(bytes(16), torch.empty_like(payload))
    stats = shards.stats()
    assert (stats["writes_ok"], stats["reads_miss"]) == (HEADS, HEADS)  # every head's record, read at once
    assert stats["usage_bytes"] >= payload.numel() and isinstance(stats["writes_failed"], dict)
    shards.close()


def test_a_chunks_write_is_done_once_when_its_heads_end_together_on_other_threads():
    """Each head's tier calls back on its own thread: the chunk's write ends exactly once,
    after the last head, and fails when any head failed."""
    import threading
    from concurrent.futures import Future

    class Slow:
        def __init__(self, gate: threading.Barrier, ok: bool) -> None:
            self.gate, self.ok = gate, ok

        def submit_write(self, key, payload, on_done):
            def finish() -> None:
                self.gate.wait()
                on_done(self.ok)

            threading.Thread(target=finish).start()
            return Future()

        def close(self) -> None:
            return None

    for failing in (None, 5):
        for _ in range(50):
            gate = threading.Barrier(8)
            shards = HeadShards([Slow(gate, i != failing) for i in range(8)], 4)  # type: ignore[list-item]
            calls: list[bool] = []
            done = shards.submit_write(KEY, torch.zeros(64, dtype=torch.uint8), calls.append)
            assert done.result(timeout=10) is (failing is None)
            assert calls == [failing is None]
            shards.close()
