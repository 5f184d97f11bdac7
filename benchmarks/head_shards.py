"""Chunks kept per KV head against one record per TP rank (format 1), in one run.

One JSON line per figure:
- disk store (submit + flush) and load GB/s of a TP=1 rank's chunks kept as one record
  per KV head (`tiers.heads.HeadShards`: a strided split on store, a join on load),
  against the same chunks kept as one record per rank, for head-major (LBHNC, vLLM's
  CPU layout) and token-major pages (LBNHC, FlashAttention's); the ratio per head /
  per rank;
- the host split alone: GB/s of splitting a chunk into its heads' records against a
  plain copy of the same bytes;
- MLA at TP=2: bytes and files written per stored chunk with rank 0 writing for every
  replica, against each rank writing its own copy (before e78c34a);
- MLA on the host tier: a follower's load (scatter GB/s) from the first replica's
  shared pool, which it attached (`replica_pool`), against one from a pool of the rank's
  own, and the host bytes per chunk either way.
Run: python benchmarks/head_shards.py [--layers 32] [--chunks 16] [--disk-dir DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmcache_ext import ops
from lmcache_ext.config import load_config
from lmcache_ext.geometry import Geometry
from lmcache_ext.keys import chunk_keys
from lmcache_ext.memory import HostSlotPool
from lmcache_ext.tiers import TierIO, build_storage
from lmcache_ext.tiers.heads import HeadShards, aligned_bytes, head_views

BLOCK, CHUNK, HEAD_DIM, HEADS = 16, 256, 128, 8  # Llama-3-8B's KV: 8 heads of 128, bf16
REPEATS = 3


def geometry(layers: int, layout: str, per_head: bool, tp: int = 1, heads: int = HEADS, replicas: int = 1) -> Geometry:
    page = BLOCK * heads * 2 * HEAD_DIM * 2  # K|V of each token and head, bf16
    return Geometry.of_cache(
        model="bench",
        revision="",
        dtype="bfloat16",
        layout=layout,
        block_size=BLOCK,
        page_bytes=page,
        num_layers=layers,
        chunk_size=CHUNK,
        tp_size=tp,
        replicas=replicas,
        heads=heads if per_head else None,
        head_runs=1 if layout == "LBHNC" or not per_head else BLOCK,
    )


def disk_io(root: Path, g: Geometry, rank: int = 0) -> TierIO:
    config = load_config({"max_local_cpu_size": 0.1, "local_disk": str(root), "max_local_disk_size": 64}, environ={})
    (io,) = build_storage(config, g, rank).tiers.values()
    return io


def best_gbps(nbytes: int, run: Callable[[], None]) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return nbytes / min(times) / 1e9


def disk_figures(work: Path, layers: int, chunks: int, layout: str) -> None:
    keys = chunk_keys(list(range(chunks * CHUNK)), geometry(layers, layout, True).namespace)
    gbps: dict[str, dict[str, float]] = {}
    for per_head in (False, True):
        g = geometry(layers, layout, per_head)
        # 4 KiB-aligned like the host pool's slots, so that both sides use O_DIRECT as they do there
        payloads = [aligned_bytes(g.slot_bytes).random_(0, 256) for _ in range(4)]
        out = aligned_bytes(g.slot_bytes)
        name = "per_head" if per_head else "per_rank"
        store_s = []
        for round_ in range(REPEATS):  # each round into fresh directories, opened untimed
            io = disk_io(work / f"{layout}_{name}_{round_}", g)
            start = time.perf_counter()
            for i, key in enumerate(keys):
                io.submit_write(key, payloads[i % len(payloads)])
            io.flush()
            store_s.append(time.perf_counter() - start)
            if round_ < REPEATS - 1:
                io.close()
        assert isinstance(io, HeadShards) == per_head

        def load() -> None:
            for key in keys:
                assert io.read_into(key, out)

        nbytes = chunks * g.slot_bytes
        gbps[name] = {"store": nbytes / min(store_s) / 1e9, "load": best_gbps(nbytes, load)}
        assert torch.equal(out, payloads[(chunks - 1) % len(payloads)])
        io.close()
    for op in ("store", "load"):
        emit(
            {
                "figure": f"disk_{op}_gbps:{layout}",
                "chunk_mib": round(geometry(layers, layout, True).slot_bytes / 2**20, 1),
                "per_rank": round(gbps["per_rank"][op], 3),
                "per_head": round(gbps["per_head"][op], 3),
                "ratio": round(gbps["per_head"][op] / gbps["per_rank"][op], 3),
            }
        )


def split_figure(layers: int, layout: str) -> None:
    g = geometry(layers, layout, True)
    payload = torch.randint(0, 256, (g.slot_bytes,), dtype=torch.uint8)
    run = g.page_bytes // (HEADS * g.head_runs)
    records = [torch.empty(g.slot_bytes // HEADS, dtype=torch.uint8) for _ in range(HEADS)]
    copy = torch.empty_like(payload)

    def split() -> None:
        for record, head in zip(records, head_views(payload, HEADS, run)):
            record.view(head.shape).copy_(head)

    split_gbps = statistics.median(best_gbps(g.slot_bytes, split) for _ in range(3))
    copy_gbps = statistics.median(best_gbps(g.slot_bytes, lambda: copy.copy_(payload)) for _ in range(3))
    emit(
        {
            "figure": f"host_split_gbps:{layout}",
            "run_bytes": run,
            "split": round(split_gbps, 2),
            "plain_copy": round(copy_gbps, 2),
            "ratio": round(split_gbps / copy_gbps, 3),
        }
    )


def mla_figure(work: Path, layers: int) -> None:
    """Bytes and files on disk after both ranks of a TP=2 MLA engine store one chunk."""
    written = {}
    for name, replicas in (("rank_0_writes", 2), ("each_rank_writes", 1)):
        g = geometry(layers, "LBHNC", replicas == 2, tp=2, heads=1, replicas=replicas)
        root = work / f"mla_{name}"
        (key,) = chunk_keys(list(range(CHUNK)), g.namespace)
        payload = torch.randint(0, 256, (g.slot_bytes,), dtype=torch.uint8)
        for rank in range(2):
            io = disk_io(root, g, rank)
            assert io.submit_write(key, payload).result()
            io.flush()
            io.close()
        files = [p for p in root.rglob("*") if p.is_file() and len(p.name) == 32]
        written[name] = (len(files), sum(p.stat().st_size for p in files), g.slot_bytes)
    once, each = written["rank_0_writes"], written["each_rank_writes"]
    emit(
        {
            "figure": "mla_tp2_bytes_per_chunk",
            "chunk_bytes": once[2],
            "rank_0_writes": {"files": once[0], "bytes": once[1]},
            "each_rank_writes": {"files": each[0], "bytes": each[1]},
            "ratio": round(once[1] / each[1], 3),
        }
    )


def shared_slot_figure(layers: int, tp: int = 2) -> None:
    """DeepSeek-V3's latent (512 + 64 rope, bf16) per token and layer, 16-token blocks: a
    follower's scatter from the first replica's shared pool (`replica_pool`: a memfd,
    attached), against one from a pool of the rank's own."""
    page = BLOCK * (512 + 64) * 2
    blocks = CHUNK // BLOCK
    cache = [torch.zeros(4 * blocks, BLOCK, 576, dtype=torch.bfloat16) for _ in range(layers)]
    kv = ops.PagedLayers.from_tensors(cache)
    nbytes = layers * blocks * page
    own = HostSlotPool(nbytes, 1, pin="never")
    first = HostSlotPool(nbytes, 1, pin="never", shared=True)
    follower = HostSlotPool(nbytes, 1, pin="never", attach=f"/proc/{os.getpid()}/fd/{first.shared_fd}")
    own.view(0).copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    first.view(0).copy_(own.view(0))
    ids = list(range(blocks, 2 * blocks))
    rates = {
        name: statistics.median(
            best_gbps(nbytes, functools.partial(ops.scatter, kv, ids, pool.view(0))) for _ in range(3)
        )
        for name, pool in (("own_slot", own), ("shared_slot", follower))
    }
    emit(
        {
            "figure": f"mla_host_load_gbps:tp{tp}",
            "chunk_bytes": nbytes,
            "own_slot": round(rates["own_slot"], 2),
            "shared_slot": round(rates["shared_slot"], 2),
            "ratio": round(rates["shared_slot"] / rates["own_slot"], 3),
            "host_bytes_per_chunk": {
                "own_slots": tp * HostSlotPool.stride_for(nbytes),
                "one_shared_slot": HostSlotPool.stride_for(nbytes),
            },
        }
    )


def emit(figure: dict) -> None:
    print(json.dumps({"machine": f"{platform.machine()} {torch.get_num_threads()} threads", **figure}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--disk-dir", type=Path, help="where the disk tiers write (default: a temp directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.disk_dir, prefix="head_shards_") as tmp:
        for layout in ("LBHNC", "LBNHC"):
            split_figure(args.layers, layout)
            disk_figures(Path(tmp), args.layers, args.chunks, layout)
        mla_figure(Path(tmp), args.layers)
        shared_slot_figure(args.layers)


if __name__ == "__main__":
    main()
