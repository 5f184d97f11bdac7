"""TransferExecutor: whole and partial chunk copies between the paged cache and slots, and on
CUDA their stream, events and the host's waits."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from lmcache_ext import executor as executor_module
from lmcache_ext import ops
from lmcache_ext.executor import TransferExecutor
from lmcache_ext.memory import HostSlotPool
from lmcache_ext.plans import Plan, PlanResult, SlotCopy, Source, TierTransfer
from lmcache_ext.testing.kv_layouts import make_layers, page_view, reference_chunk
from lmcache_ext.tiers.disk import DiskTier


def test_partial_copies_address_the_chunk_from_its_first_block():
    for layout in ("LBNHC", "BLHNC"):
        layers = make_layers(layout, 3, 32, 2, 16, 8, torch.float16, seed=1)
        kv = ops.PagedLayers.from_tensors(layers)
        pool = HostSlotPool(kv.chunk_bytes(4), 2, pin="never")
        executor = TransferExecutor(kv, pool, {})
        result = executor.run(Plan(gathers=(SlotCopy(0, (4, 5, 6, 7)), SlotCopy(1, (8, 9, 10, 11)))))
        assert result.gathers == (True, True)
        before = [page_view(t).clone() for t in layers]
        # blocks 1..2 of chunk 0 and blocks 0..2 of chunk 1 into fresh places
        executor.run(
            Plan(scatters=(SlotCopy(0, (20, 21), chunk_blocks=4, first=1), SlotCopy(1, (24, 25, 26), chunk_blocks=4)))
        )
        for layer, t in enumerate(layers):
            pages = page_view(t)
            assert torch.equal(pages[[20, 21]], before[layer][[5, 6]]), (layout, layer)
            assert torch.equal(pages[[24, 25, 26]], before[layer][[8, 9, 10]]), (layout, layer)
            untouched = [b for b in range(32) if b not in (20, 21, 24, 25, 26)]
            assert torch.equal(pages[untouched], before[layer][untouched])
        executor.close()


# ---- CUDA caches: page-locked slots, copies on the executor's stream, host waits per slot ----

CUDA = ops.cuda_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and a CUDA build")
KEY_A, KEY_B = b"a" * 16, b"b" * 16


def fake_cuda(kv: ops.PagedLayers) -> ops.PagedLayers:
    return ops.PagedLayers(
        kv.layer_ptrs, kv.block_stride, kv.page_bytes, kv.num_blocks, torch.device("cuda", 0), kv.tensors
    )


def test_a_cuda_cache_with_pageable_slots_is_refused_at_start_up():
    kv = ops.PagedLayers.from_tensors(make_layers("LBNHC", 2, 8, 1, 4, 8, torch.float16, seed=2))
    pool = HostSlotPool(kv.chunk_bytes(2), 2, pin="never")
    message = r"the KV cache is on cuda:0 but the host slot pool is not page-locked"
    with pytest.raises(ValueError, match=message):
        TransferExecutor(fake_cuda(kv), pool, {})
    executor = TransferExecutor(kv, pool, {})
    with pytest.raises(ValueError, match=message):
        executor.bind(fake_cuda(kv))


class StandIns:
    """CPU stand-ins for the CUDA pieces the executor drives, logging what it asks of them."""

    def __init__(self, pool: HostSlotPool) -> None:
        self.log: list[tuple] = []
        self.pool = pool
        self.is_page_locked = True

    def view(self, slot: int) -> torch.Tensor:
        return self.pool.view(slot)

    def copy_stream(self, device: torch.device) -> StandIns:
        self.device = device
        return self

    @contextmanager
    def copies(self, slots):
        self.log.append(("copies", tuple(slots)))
        yield "copy-stream"
        self.log.append(("event", tuple(slots)))

    def wait_slot(self, slot: int) -> None:
        self.log.append(("wait", slot))

    def wait_all(self) -> None:
        self.log.append(("wait_all",))

    def read_into(self, key: bytes, out: torch.Tensor) -> bool:
        self.log.append(("read", key))
        return True

    def submit_write(self, key: bytes, payload: torch.Tensor, on_done) -> None:
        self.log.append(("write", key))
        on_done(True)

    def copy(self, name: str):
        return lambda kv, ids, chunks, **kw: self.log.append((name, kw.get("stream")))


def test_cuda_copies_run_on_the_copy_stream_and_the_host_waits_only_for_slots_it_touches(monkeypatch):
    kv = ops.PagedLayers.from_tensors(make_layers("LBNHC", 2, 8, 1, 4, 8, torch.float16, seed=3))
    fake = StandIns(HostSlotPool(kv.chunk_bytes(2), 2, pin="never"))
    monkeypatch.setattr(executor_module, "CopyStream", fake.copy_stream)
    monkeypatch.setattr(ops, "gather", fake.copy("gather"))
    monkeypatch.setattr(ops, "scatter", fake.copy("scatter"))
    executor = TransferExecutor(fake_cuda(kv), fake, {Source.DISK: fake})
    plan = Plan(
        reads=(TierTransfer(Source.DISK, KEY_A, 0, 64),),
        scatters=(SlotCopy(0, (1, 2)),),
        gathers=(SlotCopy(1, (3, 4)), SlotCopy(0, (6,), chunk_blocks=2, first=1)),
        writes=(TierTransfer(Source.DISK, KEY_B, 1, 64),),
    )
    assert executor.run(plan) == PlanResult((True,), (True,), (True, True))
    assert fake.log == [
        ("wait", 0),
        ("read", KEY_A),  # a read overwrites slot 0: its last copy first
        ("copies", (0,)),
        ("scatter", "copy-stream"),
        ("event", (0,)),
        ("copies", (1, 0)),
        ("gather", "copy-stream"),
        ("gather", "copy-stream"),
        ("event", (1, 0)),
        ("wait", 1),
        ("write", KEY_B),  # a write reads slot 1: its gather first, nothing else
    ]
    fake.log.clear()
    executor.bind(None)
    executor.close()
    assert fake.log == [("wait_all",), ("wait_all",)]


def cuda_rig(pool_slots: int = 4, disk: DiskTier | None = None):
    layers = make_layers("LBNHC", 4, 64, 2, 16, 64, torch.float16, "cuda", seed=4)
    kv = ops.PagedLayers.from_tensors(layers)
    pool = HostSlotPool(kv.chunk_bytes(4), pool_slots, pin="always")
    return layers, kv, pool, TransferExecutor(kv, pool, {Source.DISK: disk} if disk else {})


BUSY_CYCLES = 300_000_000  # ~0.2 s of GPU time: far longer than queueing a plan takes


@gpu
@needs_cuda
def test_a_store_does_not_wait_for_the_forward_yet_reads_what_it_wrote():
    layers, kv, pool, executor = cuda_rig()
    written = make_layers("LBNHC", 4, 64, 2, 16, 64, torch.float16, "cuda", seed=5)
    executor.run(Plan(gathers=(SlotCopy(1, (9, 10, 11, 12)),)))  # first use: the ring and events exist
    torch.cuda.synchronize()
    torch.cuda._sleep(BUSY_CYCLES)  # the forward pass, on the current stream
    for t, w in zip(layers, written):
        page_view(t).copy_(page_view(w))  # ... which writes the KV cache last
    result = executor.run(Plan(gathers=(SlotCopy(0, (1, 2, 3, 4)),)))
    forward_still_running = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert result.gathers == (True,) and forward_still_running
    assert torch.equal(pool.view(0), reference_chunk(written, [1, 2, 3, 4]).cpu())


@gpu
@needs_cuda
def test_the_next_forward_sees_a_load_that_is_still_running():
    layers, kv, pool, executor = cuda_rig()
    executor.run(Plan(gathers=(SlotCopy(0, (1, 2, 3, 4)),)))
    torch.cuda.synchronize()
    with torch.cuda.stream(executor._copies._stream):
        torch.cuda._sleep(BUSY_CYCLES)  # a slow load
    executor.run(Plan(scatters=(SlotCopy(0, (20, 21, 22, 23)),)))
    seen = [page_view(t)[20:24].clone() for t in layers]  # the forward, on the current stream
    torch.cuda.synchronize()
    for t, got in zip(layers, seen):
        assert torch.equal(got, page_view(t)[1:5])


@gpu
@needs_cuda
def test_a_disk_write_waits_for_its_gather_and_a_disk_read_for_the_slots_last_copy(tmp_path):
    disk = DiskTier(tmp_path, 1 << 30)
    layers, kv, pool, executor = cuda_rig(disk=disk)
    nbytes = kv.chunk_bytes(4)
    torch.cuda._sleep(BUSY_CYCLES)
    executor.run(Plan(gathers=(SlotCopy(0, (1, 2, 3, 4)),)))
    executor.run(Plan(writes=(TierTransfer(Source.DISK, KEY_A, 0, nbytes),)))
    disk.flush()
    on_disk = torch.empty(nbytes, dtype=torch.uint8)
    assert disk.read_into(KEY_A, on_disk)
    assert torch.equal(on_disk, reference_chunk(layers, [1, 2, 3, 4]).cpu())

    executor.run(Plan(gathers=(SlotCopy(1, (5, 6, 7, 8)),), writes=(TierTransfer(Source.DISK, KEY_B, 1, nbytes),)))
    disk.flush()
    with torch.cuda.stream(executor._copies._stream):
        torch.cuda._sleep(BUSY_CYCLES)
    executor.run(Plan(scatters=(SlotCopy(0, (30, 31, 32, 33)),)))  # slot 0 -> blocks, slowly
    executor.run(Plan(reads=(TierTransfer(Source.DISK, KEY_B, 0, nbytes),)))  # then slot 0 is refilled
    torch.cuda.synchronize()
    for t in layers:
        assert torch.equal(page_view(t)[30:34], page_view(t)[1:5])
    assert torch.equal(pool.view(0), reference_chunk(layers, [5, 6, 7, 8]).cpu())
    executor.close()
    disk.close()


@gpu
@needs_cuda
def test_unbinding_waits_for_copies_still_on_the_gpu():
    layers, kv, pool, executor = cuda_rig()
    with torch.cuda.stream(executor._copies._stream):
        torch.cuda._sleep(BUSY_CYCLES)
    executor.run(Plan(gathers=(SlotCopy(0, (1, 2, 3, 4)),)))
    executor.bind(None)
    assert executor._copies._stream.query()
    assert torch.equal(pool.view(0), reference_chunk(layers, [1, 2, 3, 4]).cpu())


@gpu
@needs_cuda
def test_a_cuda_cache_with_pageable_slots_is_refused_on_a_real_device():
    layers = make_layers("LBNHC", 2, 8, 1, 4, 8, torch.float16, "cuda", seed=6)
    kv = ops.PagedLayers.from_tensors(layers)
    with pytest.raises(ValueError, match="not page-locked"):
        TransferExecutor(kv, HostSlotPool(kv.chunk_bytes(2), 2, pin="never"), {})
