"""The copy-engine (DMA) path of a page copy against the plain-torch reference, byte for
byte: on CPU its twin (one memcpy per run of contiguous bytes) checks the run plan;
marked gpu, cudaMemcpyBatchAsync (or cudaMemcpyAsync per run) between the cache and
device memory or pinned host slots, all layers, one layer, per-layer and cross-layer
(BL*) layouts, consecutive block ids (long runs) and scattered ones (one run a page)."""

from __future__ import annotations

import pytest
import torch

from lmcache_ext import _C, ops
from lmcache_ext.testing.kv_layouts import make_layers, page_view, reference_chunk, reference_cross_layer_chunk

CUDA = ops.cuda_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and a CUDA build")

TARGETS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("cuda", "device", id="cuda-device", marks=[gpu, needs_cuda]),
    pytest.param("cuda", "pinned", id="cuda-pinned", marks=[gpu, needs_cuda]),
]
BLOCK_IDS = {"consecutive": [5, 6, 7, 8, 9, 10, 2, 3], "scattered": [11, 0, 7, 3, 19, 14, 8, 1]}


def buffer(nbytes: int, device: str, target: str) -> torch.Tensor:
    if target == "pinned":
        return torch.zeros(nbytes, dtype=torch.uint8).pin_memory()
    return torch.zeros(nbytes, dtype=torch.uint8, device=device)


def synced(t: torch.Tensor) -> torch.Tensor:
    if CUDA:
        torch.cuda.synchronize()
    return t.cpu()


@pytest.mark.parametrize("device,target", TARGETS)
@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "BLHNC", "BLNHC"])
@pytest.mark.parametrize("ids", BLOCK_IDS, ids=str)
def test_dma_gather_and_scatter_match_the_reference_and_the_kernel(device, target, layout, ids):
    layers = make_layers(layout, 4, 20, 2, 16, 8, torch.float16, device, seed=21)
    kv = ops.PagedLayers.from_tensors(layers)
    block_ids = BLOCK_IDS[ids]
    reference = reference_cross_layer_chunk if kv.cross_layer else reference_chunk
    slots = [buffer(kv.chunk_bytes(4), device, target) for _ in range(2)]
    ops.gather(kv, block_ids, slots, blocks_per_chunk=4, path="dma")
    for c, slot in enumerate(slots):
        assert torch.equal(synced(slot), reference(layers, block_ids[4 * c : 4 * c + 4]).cpu())
    by_kernel = [buffer(kv.chunk_bytes(4), device, target) for _ in range(2)]
    ops.gather(kv, block_ids, by_kernel, blocks_per_chunk=4)
    by_layer = [buffer(kv.chunk_bytes(4), device, target) for _ in range(2)]
    for layer in range(4):
        ops.gather(kv, block_ids, by_layer, blocks_per_chunk=4, layer=layer, path="dma")
    for a, b, c in zip(slots, by_kernel, by_layer):
        assert torch.equal(synced(a), synced(b)) and torch.equal(synced(a), synced(c))

    fresh = make_layers(layout, 4, 20, 2, 16, 8, torch.float16, device, seed=22)
    dest = [19, 18, 17, 16, 0, 1, 2, 4]
    ops.scatter(ops.PagedLayers.from_tensors(fresh), dest, slots, blocks_per_chunk=4, path="dma")
    synced(slots[0])
    for layer in range(4):
        assert torch.equal(page_view(fresh[layer])[dest].cpu(), page_view(layers[layer])[block_ids].cpu())


def test_dma_path_options_are_checked_before_a_byte_moves():
    layers = make_layers("LBHNC", 2, 8, 1, 16, 8, torch.float16)
    kv = ops.PagedLayers.from_tensors(layers)
    out = torch.zeros(kv.chunk_bytes(2), dtype=torch.uint8)
    with pytest.raises(ValueError, match="path = 'sm': expected one of kernel, dma"):
        ops.gather(kv, [0, 1], out, path="sm")
    with pytest.raises(ValueError, match="staging"):
        ops.gather(kv, [0, 1], out, path="dma", staging=torch.zeros_like(out))
    with pytest.raises(ValueError, match="path = 'x': expected 'kernel' or 'dma'"):
        _C.page_copy(
            direction="gather",
            device="cpu",
            layer_ptrs=list(kv.layer_ptrs),
            block_stride=kv.block_stride,
            page_bytes=kv.page_bytes,
            block_ids_ptr=0,
            num_blocks=0,
            chunk_ptr=out.data_ptr(),
            blocks_per_chunk=1,
            chunk_layer_stride=kv.page_bytes,
            path="x",
        )
    assert torch.count_nonzero(out) == 0


@gpu
@needs_cuda
def test_dma_path_runs_on_the_executors_stream_after_the_current_one():
    """A gather queued on a side stream after the current stream wrote the pages reads
    the written bytes (srcAccessOrder = stream)."""
    layers = make_layers("LBNHC", 2, 16, 2, 16, 8, torch.float16, "cuda", seed=23)
    kv = ops.PagedLayers.from_tensors(layers)
    side = torch.cuda.Stream()
    out = buffer(kv.chunk_bytes(8), "cuda", "pinned")
    torch.cuda._sleep(50_000_000)  # the current stream is busy, then writes the pages
    for t in layers:
        t.fill_(3)
    side.wait_stream(torch.cuda.current_stream())
    ops.gather(kv, list(range(8)), out, stream=side, path="dma")
    side.synchronize()
    assert torch.equal(out, reference_chunk(layers, list(range(8))).cpu())
