"""LayerwiseLoad and LayerwiseSave on an executor, without vLLM, on CPU and (marked gpu)
CUDA with both copy paths: each layer's bytes are in place when its wait returns, even
behind a busy stream; per-layer gathers give the whole-chunk bytes; BL* caches too."""

from __future__ import annotations

import pytest
import torch

from lmcache_ext import ops
from lmcache_ext.executor import TransferExecutor
from lmcache_ext.layerwise import LayerwiseLoad, LayerwiseSave
from lmcache_ext.plans import Plan, SlotCopy
from lmcache_ext.testing.kv_layouts import make_layers, page_view

CUDA = ops.cuda_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and a CUDA build")
DEVICES = [
    pytest.param("cpu", "kernel", id="cpu"),
    pytest.param("cpu", "dma", id="cpu-dma-twin"),
    pytest.param("cuda", "kernel", id="cuda-kernel", marks=[gpu, needs_cuda]),
    pytest.param("cuda", "dma", id="cuda-dma", marks=[gpu, needs_cuda]),
]
LAYERS, BLOCKS, BPC = 4, 24, 4


class Slots:
    """Host slots of one buffer (page-locked where CUDA is there)."""

    def __init__(self, slot_bytes: int, count: int, pinned: bool) -> None:
        buf = torch.zeros(count * slot_bytes, dtype=torch.uint8)
        self._buf = buf.pin_memory() if pinned else buf
        self._slot_bytes = slot_bytes
        self.is_page_locked = pinned

    def view(self, slot: int) -> torch.Tensor:
        return self._buf[slot * self._slot_bytes : (slot + 1) * self._slot_bytes]


def inline(fn, *args):
    """A submit that runs the job on a thread of its own, as the worker's copier does."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


def setup(device: str, path: str, layout: str, seed: int):
    layers = make_layers(layout, LAYERS, BLOCKS, 2, 16, 8, torch.float16, device, seed=seed)
    kv = ops.PagedLayers.from_tensors(layers)
    slots = Slots(kv.chunk_bytes(BPC), 3, pinned=device == "cuda")
    return layers, kv, slots, TransferExecutor(kv, slots, {}, cuda_copy_path=path)


@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC"])
@pytest.mark.parametrize("device,path", DEVICES)
def test_per_layer_loads_are_in_place_at_each_wait_and_saves_match_whole_gathers(device, path, layout):
    src_layers, src_kv, slots, src = setup(device, path, layout, seed=1)
    items = [SlotCopy(0, (3, 4, 5, 6)), SlotCopy(1, (20, 2, 9, 11)), SlotCopy(2, (7, 8, 1), chunk_blocks=4, first=1)]
    src.run(Plan(gathers=tuple(items)))
    src.wait_slots([0, 1, 2])
    whole = [slots.view(s).clone() for s in range(3)]

    save = LayerwiseSave(src, items, LAYERS, inline)
    for s in range(3):
        slots.view(s).zero_()
    for layer in (2, 0):  # announced out of order, 1 and 3 never: finish gathers them
        save.layer(layer)
    assert save.finish() == (True, True, True)
    src.wait_slots([0, 1, 2])
    assert all(torch.equal(slots.view(s), whole[s]) for s in range(3))

    dst_layers = make_layers(layout, LAYERS, BLOCKS, 2, 16, 8, torch.float16, device, seed=2)
    dst = TransferExecutor(ops.PagedLayers.from_tensors(dst_layers), slots, {}, cuda_copy_path=path)
    targets = [SlotCopy(0, (10, 11, 12, 13)), SlotCopy(1, (0, 1, 2, 3)), SlotCopy(2, (21, 22, 23), 4, 1)]
    if device == "cuda":
        torch.cuda._sleep(100_000_000)  # the current stream is busy: the loads queue behind it
    load = LayerwiseLoad(dst, targets, LAYERS, inline)
    for layer in range(LAYERS):
        load.wait(layer)
        got = page_view(dst_layers[layer]).clone()  # read on the current stream, after the wait
        for want, have in zip(items, targets):
            assert torch.equal(
                got[list(have.block_ids)].cpu(), page_view(src_layers[layer])[list(want.block_ids)].cpu()
            ), (layer, have)
    assert load.finish()
