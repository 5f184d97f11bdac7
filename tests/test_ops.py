"""Page-copy kernels against a plain-torch reference, byte for byte, on CPU and (marked gpu) CUDA."""

from __future__ import annotations

import random
import re
import threading

import pytest
import torch

from lmcache_ext import _C, ops
from lmcache_ext.testing.kv_layouts import (
    ELEMENT_DTYPES,
    make_layers,
    page_view,
    reference_chunk,
    reference_cross_layer_chunk,
)

CUDA = ops.cuda_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and a CUDA build")

# (heads, tokens, width): pages of 64 KiB-like, odd and tiny sizes (times the element size).
PAGE_SHAPES = [(2, 16, 64), (1, 5, 20), (3, 7, 1), (1, 2049, 2)]

# Where chunk buffers live for each device: cpu, and cpu through a staging buffer (the
# CPU twin of the staged path); cuda device memory, pinned host written zero-copy, and
# pinned host through a device staging buffer.
TARGETS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("cpu", "staged", id="cpu-staged"),
    pytest.param("cuda", "device", id="cuda-device", marks=[gpu, needs_cuda]),
    pytest.param("cuda", "pinned", id="cuda-pinned", marks=[gpu, needs_cuda]),
    pytest.param("cuda", "staged", id="cuda-staged", marks=[gpu, needs_cuda]),
]


@pytest.fixture(params=["memcpy", "streaming"], autouse=True)
def cpu_store_mode(request):
    """Run every case with plain and with non-temporal stores in the CPU twin."""
    ops.set_cpu_copy_options(threads=0, streaming_min_bytes=0 if request.param == "streaming" else -1)
    yield request.param
    ops.set_cpu_copy_options()


def chunk_buffer(nbytes: int, device: str, target: str, fill: int = 0) -> torch.Tensor:
    if device == "cpu" or target == "device":
        return torch.full((nbytes,), fill, dtype=torch.uint8, device=device)
    return torch.full((nbytes,), fill, dtype=torch.uint8).pin_memory()


def staging_for(nbytes: int, device: str, target: str) -> torch.Tensor | None:
    return torch.empty(nbytes, dtype=torch.uint8, device=device) if target == "staged" else None


def synced(t: torch.Tensor) -> torch.Tensor:
    if CUDA:
        torch.cuda.synchronize()
    return t.cpu()


def pick_blocks(num_blocks: int, count: int, seed: int) -> list[int]:
    """Distinct random block ids that always include the first and the last block."""
    rng = random.Random(seed)
    ids = rng.sample(range(1, num_blocks - 1), count - 2) + [0, num_blocks - 1]
    rng.shuffle(ids)
    return ids


@pytest.mark.parametrize("device,target", TARGETS)
@pytest.mark.parametrize("layout", ["separate", "LBNHC", "LBHNC"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32", "fp8"])
@pytest.mark.parametrize("shape", PAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gather_then_scatter_round_trip(device, target, layout, dtype, shape):
    heads, tokens, width = shape
    layers = make_layers(layout, 3, 40, heads, tokens, width, ELEMENT_DTYPES[dtype], device, seed=1)
    kv = ops.PagedLayers.from_tensors(layers)
    ids = pick_blocks(40, 12, seed=2)
    out = chunk_buffer(kv.chunk_bytes(len(ids)), device, target, fill=0xAB)
    ops.gather(kv, ids, out, staging=staging_for(out.numel(), device, target))
    assert torch.equal(synced(out), reference_chunk(layers, ids).cpu())

    fresh = make_layers(layout, 3, 40, heads, tokens, width, ELEMENT_DTYPES[dtype], device, seed=3)
    before = [page_view(kv_).clone() for kv_ in fresh]
    dest = pick_blocks(40, 12, seed=4)
    ops.scatter(ops.PagedLayers.from_tensors(fresh), dest, out, staging=staging_for(out.numel(), device, target))
    synced(out)
    untouched = [b for b in range(40) if b not in dest]
    for layer, kv_ in enumerate(fresh):
        pages = page_view(kv_)
        for i, b in enumerate(dest):
            assert torch.equal(pages[b], page_view(layers[layer])[ids[i]]), (layer, b)
        assert torch.equal(pages[untouched], before[layer][untouched])


@pytest.mark.parametrize("device,target", TARGETS)
@pytest.mark.parametrize("num_layers", [1, 2, 7, 32])
def test_layer_counts_and_padded_blocks(device, target, num_layers):
    layers = make_layers("LBNHC", num_layers, 24, 2, 4, 8, torch.bfloat16, device, pad_elems=24, seed=num_layers)
    kv = ops.PagedLayers.from_tensors(layers)
    assert kv.block_stride == (2 * 4 * 8 + 24) * 2 and kv.page_bytes == 2 * 4 * 8 * 2
    ids = pick_blocks(24, 9, seed=5)
    out = chunk_buffer(kv.chunk_bytes(len(ids)), device, target)
    ops.gather(kv, ids, out, staging=staging_for(out.numel(), device, target))
    assert torch.equal(synced(out), reference_chunk(layers, ids).cpu())


@pytest.mark.parametrize("device,target", TARGETS)
def test_duplicate_block_ids_across_and_within_gathers(device, target):
    layers = make_layers("LBHNC", 4, 16, 1, 8, 16, torch.float16, device, seed=6)
    kv = ops.PagedLayers.from_tensors(layers)
    for ids in ([3, 3, 0, 15], [15, 3, 3, 3], [0]):
        out = chunk_buffer(kv.chunk_bytes(len(ids)), device, target)
        ops.gather(kv, torch.tensor(ids, dtype=torch.int32), out, staging=staging_for(out.numel(), device, target))
        assert torch.equal(synced(out), reference_chunk(layers, ids).cpu())


@pytest.mark.parametrize("device,target", [p for p in TARGETS if not p.id.endswith("staged")])
def test_many_chunk_buffers_and_layerwise_copies(device, target):
    """Blocks spread over slot-like chunk buffers (the last one partial), all layers in
    one launch, then layer by layer into the same layout, then scattered back."""
    num_layers, bpc = 5, 4
    layers = make_layers("LBNHC", num_layers, 64, 2, 16, 8, torch.float16, device, seed=7)
    kv = ops.PagedLayers.from_tensors(layers)
    ids = pick_blocks(64, 10, seed=8)
    slot_bytes = kv.chunk_bytes(bpc)
    slots = [chunk_buffer(slot_bytes, device, target) for _ in range(3)]
    ops.gather(kv, ids, slots, blocks_per_chunk=bpc)
    for c, slot in enumerate(slots):
        part = ids[c * bpc : (c + 1) * bpc]
        got = synced(slot).view(num_layers, bpc * kv.page_bytes)[:, : len(part) * kv.page_bytes]
        assert torch.equal(got.flatten(), reference_chunk(layers, part).cpu())

    by_layer = [chunk_buffer(slot_bytes, device, target) for _ in range(3)]
    for layer in range(num_layers):
        ops.gather(kv, ids, by_layer, blocks_per_chunk=bpc, layer=layer)
    for a, b in zip(slots, by_layer):
        assert torch.equal(synced(a), synced(b))

    fresh = make_layers("LBNHC", num_layers, 64, 2, 16, 8, torch.float16, device, seed=9)
    fresh_kv = ops.PagedLayers.from_tensors(fresh)
    dest = pick_blocks(64, 10, seed=10)
    for layer in range(num_layers):
        ops.scatter(fresh_kv, dest, by_layer, blocks_per_chunk=bpc, layer=layer)
    synced(by_layer[0])
    for layer in range(num_layers):
        assert torch.equal(page_view(fresh[layer])[dest].cpu(), page_view(layers[layer])[ids].cpu())


@pytest.mark.parametrize("layout", ["BLHNC", "BLNHC"])
@pytest.mark.parametrize("device,target", TARGETS)
def test_cross_layer_cache_moves_whole_blocks(device, target, layout):
    """BL* caches: a whole-chunk copy moves one piece per block; layer copies (the
    layerwise path) give the same [block][layer][page] chunk and scatter it back."""
    layers = make_layers(layout, 6, 20, 2, 16, 8, torch.bfloat16, device, seed=11)
    kv = ops.PagedLayers.from_tensors(layers)
    assert kv.cross_layer and kv.chunk_geometry() == ((kv.layer_ptrs[0],), 6 * kv.page_bytes)
    ids = pick_blocks(20, 7, seed=12)
    out = chunk_buffer(kv.chunk_bytes(len(ids)), device, target)
    ops.gather(kv, ids, out, staging=staging_for(out.numel(), device, target))
    assert torch.equal(synced(out), reference_cross_layer_chunk(layers, ids).cpu())
    fresh = make_layers("BLHNC", 6, 20, 2, 16, 8, torch.bfloat16, device, seed=13)
    ops.scatter(ops.PagedLayers.from_tensors(fresh), ids, out, staging=staging_for(out.numel(), device, target))
    synced(out)
    for layer in range(6):
        assert torch.equal(page_view(fresh[layer])[ids], page_view(layers[layer])[ids])
    if target.endswith("staged"):
        with pytest.raises(ValueError, match="cross-layer"):
            ops.gather(kv, ids, out, layer=0, staging=staging_for(out.numel(), device, target))
        return
    by_layer = [chunk_buffer(kv.chunk_bytes(4), device, target), chunk_buffer(kv.chunk_bytes(4), device, target)]
    for layer in range(6):
        ops.gather(kv, ids, by_layer, blocks_per_chunk=4, layer=layer)
    got = torch.cat([synced(by_layer[0]), synced(by_layer[1])[: kv.chunk_bytes(3)]])
    assert torch.equal(got, synced(out))
    again = make_layers(layout, 6, 20, 2, 16, 8, torch.bfloat16, device, seed=14)
    for layer in reversed(range(6)):
        ops.scatter(ops.PagedLayers.from_tensors(again), ids, by_layer, blocks_per_chunk=4, layer=layer)
    synced(by_layer[0])
    for layer in range(6):
        assert torch.equal(page_view(again[layer])[ids], page_view(layers[layer])[ids])


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_large_copy_over_thread_pool(threads):
    """32 layers x 64 blocks x 16 KiB pages (32 MiB): past the default streaming threshold."""
    ops.set_cpu_copy_options(threads=threads)
    layers = make_layers("LBNHC", 32, 80, 8, 16, 64, torch.float16, seed=14)
    kv = ops.PagedLayers.from_tensors(layers)
    ids = pick_blocks(80, 64, seed=15)
    out = torch.empty(kv.chunk_bytes(64), dtype=torch.uint8)
    ops.gather(kv, ids, out)
    assert torch.equal(out, reference_chunk(layers, ids))


def test_concurrent_copies_from_python_threads():
    layers = make_layers("LBHNC", 4, 128, 2, 16, 32, torch.float16, seed=16)
    kv = ops.PagedLayers.from_tensors(layers)
    errors: list[str] = []

    def worker(seed: int) -> None:
        for round_ in range(20):
            ids = pick_blocks(128, 16, seed=seed * 100 + round_)
            out = torch.empty(kv.chunk_bytes(16), dtype=torch.uint8)
            ops.gather(kv, ids, out)
            if not torch.equal(out, reference_chunk(layers, ids)):
                errors.append(f"thread {seed} round {round_}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_dict_of_layers_keeps_insertion_order():
    layers = make_layers("separate", 3, 8, 1, 4, 4, torch.float32, seed=17)
    kv = ops.PagedLayers.from_tensors({f"model.layers.{i}.attn": t for i, t in enumerate(layers)})
    assert kv.layer_ptrs == tuple(t.data_ptr() for t in layers)
    assert kv.num_blocks == 8 and kv.page_bytes == 64 and not kv.cross_layer


def test_empty_block_list_copies_nothing():
    layers = make_layers("separate", 2, 8, 1, 4, 4, torch.float32, seed=18)
    out = torch.full((16,), 7, dtype=torch.uint8)
    ops.gather(ops.PagedLayers.from_tensors(layers), [], out)
    assert torch.equal(out, torch.full((16,), 7, dtype=torch.uint8))


# ---- bad input: a clear ValueError, and not a byte written ----


@pytest.fixture
def small():
    layers = make_layers("LBNHC", 2, 16, 1, 4, 8, torch.float16, seed=19)
    return layers, ops.PagedLayers.from_tensors(layers)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(block_ids=[0, 16]), r"block_ids\[1\] = 16 is out of range: the cache has 16 blocks"),
        (dict(block_ids=[-1]), r"block_ids\[0\] = -1 is out of range"),
        (dict(block_ids=torch.tensor([1.0])), r"block_ids is a torch.float32 tensor"),
        (dict(block_ids=torch.zeros(2, 2, dtype=torch.long)), r"expected a 1-D int32 or int64 tensor"),
        (dict(block_ids=["a"]), r"expected a sequence of ints"),
        (dict(out=torch.zeros(255, dtype=torch.uint8)), r"out has 255 bytes; expected at least 256"),
        (dict(out=torch.zeros(512, dtype=torch.uint8)[::2]), r"out is not contiguous"),
        (dict(out=[torch.zeros(256, dtype=torch.uint8)]), r"blocks_per_chunk is required"),
        (dict(blocks_per_chunk=0), r"blocks_per_chunk = 0: expected a positive int"),
        (dict(out=[torch.zeros(256, dtype=torch.uint8)], blocks_per_chunk=1), r"out has 1 chunk buffers; expected 2"),
        (
            dict(layer=2, out=[torch.zeros(256, dtype=torch.uint8)] * 2, blocks_per_chunk=1),
            r"layer = 2 is out of range: the cache has 2 layers",
        ),
        (dict(staging=torch.zeros(255, dtype=torch.uint8)), r"staging has 255 bytes; expected at least 256"),
        (dict(max_ctas=8), r"max_ctas was given but the cache is on cpu; it is for cuda caches"),
        (dict(out="buffer"), r"out is a str; expected a torch.Tensor or a list of them"),
    ],
)
def test_bad_arguments_raise_before_any_byte_moves(small, kwargs, message):
    layers, kv = small
    snapshot = [page_view(t).clone() for t in layers]
    args = dict(block_ids=[0, 15], out=torch.full((256,), 0x5A, dtype=torch.uint8))
    args.update(kwargs)
    out = args["out"]
    out_before = out.clone() if isinstance(out, torch.Tensor) else None
    with pytest.raises(ValueError, match=message):
        ops.gather(kv, args.pop("block_ids"), args.pop("out"), **args)
    if out_before is not None:
        assert torch.equal(out, out_before)
    with pytest.raises(ValueError, match=re.sub(r"^out\b", "src", message)):
        ops.scatter(
            kv,
            kwargs.get("block_ids", [0, 15]),
            kwargs.get("out", torch.zeros(256, dtype=torch.uint8)),
            **{k: v for k, v in kwargs.items() if k not in ("block_ids", "out")},
        )
    for t, before in zip(layers, snapshot):
        assert torch.equal(page_view(t), before)


@pytest.mark.parametrize(
    "layers,message",
    [
        ([], r"len\(layers\) = 0: expected 1 to 256 layers"),
        ([torch.zeros(4, 8)] * 257, r"len\(layers\) = 257"),
        (
            [torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.float16)],
            r"layers\[1\] has dtype torch.float16; expected torch.float32",
        ),
        ([torch.zeros(4, 8), torch.zeros(5, 8)], r"layers\[1\] has shape \(5, 8\); expected \(4, 8\)"),
        ([torch.zeros(4)], r"layers\[0\] has shape \(4,\); expected \[num_blocks, ...\]"),
        ([torch.zeros(64).as_strided((4, 8), (2, 1))], r"block stride is 8 bytes; expected at least the page size 32"),
        ([torch.zeros(4, 8, 3)[:, :, :2]], r"does not cover one dense region per block"),
        ([[1, 2]], r"layers\[0\] is a list; expected a torch.Tensor"),
    ],
)
def test_bad_cache_descriptions(layers, message):
    with pytest.raises(ValueError, match=message):
        ops.PagedLayers.from_tensors(layers)


def test_pageable_host_buffer_rejected_for_cuda_cache_message():
    """The CUDA-only check is reachable on CPU machines through a fake cuda description."""
    layers = make_layers("separate", 1, 4, 1, 4, 4, torch.float32, seed=20)
    kv = ops.PagedLayers.from_tensors(layers)
    fake = ops.PagedLayers(
        kv.layer_ptrs, kv.block_stride, kv.page_bytes, kv.num_blocks, torch.device("cuda", 0), kv.tensors
    )
    with pytest.raises(ValueError, match="out is pageable host memory"):
        ops.gather(fake, [0], torch.zeros(64, dtype=torch.uint8))


def test_cpu_copy_options_reject_bad_thread_counts():
    with pytest.raises(ValueError, match=r"threads = 300 must be in \[0, 256\]"):
        ops.set_cpu_copy_options(threads=300)


def test_build_info_reports_the_build():
    from lmcache_ext import _C

    info = _C.build_info()
    assert set(info) == {"version", "cuda", "cuda_archs", "cuda_runtime_version"}
    assert info["cuda"] == bool(info["cuda_archs"]) == bool(info["cuda_runtime_version"])
    assert ops.cuda_available() == (info["cuda"] and torch.cuda.is_available())


# ---- the staged path moves exactly the rows its pages occupy ----

STAGED = [pytest.param("cpu", id="cpu-staged"), pytest.param("cuda", id="cuda-staged", marks=[gpu, needs_cuda])]


@pytest.mark.parametrize("device", STAGED)
@pytest.mark.parametrize("layer", [None, 0, 2, 4])
def test_staged_gather_writes_only_the_rows_of_its_pages(device, layer):
    """3 of a 4-block chunk, all layers or one (the layerwise path): the pages land at their
    [layer][block] place and every other byte of the host chunk keeps its value, whatever
    the staging buffer held before."""
    num_layers, bpc, ids = 5, 4, [7, 3, 20]
    layers = make_layers("LBNHC", num_layers, 32, 2, 16, 8, torch.float16, device, seed=30)
    kv = ops.PagedLayers.from_tensors(layers)
    host = chunk_buffer(kv.chunk_bytes(bpc), device, "staged", fill=0xAB)
    staging = torch.full((kv.chunk_bytes(bpc),), 0xCD, dtype=torch.uint8, device=device)
    ops.gather(kv, ids, host, blocks_per_chunk=bpc, layer=layer, staging=staging)
    expected = torch.full((num_layers, bpc * kv.page_bytes), 0xAB, dtype=torch.uint8)
    for i in range(num_layers) if layer is None else [layer]:
        expected[i, : len(ids) * kv.page_bytes] = page_view(layers[i])[ids].cpu().flatten()
    assert torch.equal(synced(host).view(num_layers, -1), expected)


@pytest.mark.parametrize("device", STAGED)
@pytest.mark.parametrize("layer", [None, 3])
def test_staged_scatter_reads_only_the_rows_of_its_pages(device, layer):
    """The inverse: each page comes from its own [layer][block] row of the host chunk, so
    one layer's scatter leaves every other layer's pages as they were."""
    num_layers, bpc, dest = 5, 4, [9, 30]
    src_layers = make_layers("LBNHC", num_layers, 32, 2, 16, 8, torch.float16, device, seed=31)
    src_kv = ops.PagedLayers.from_tensors(src_layers)
    host = chunk_buffer(src_kv.chunk_bytes(bpc), device, "staged")
    ops.gather(src_kv, [1, 2, 3, 4], host)
    synced(host)
    fresh = make_layers("LBNHC", num_layers, 32, 2, 16, 8, torch.float16, device, seed=32)
    before = [page_view(t).cpu().clone() for t in fresh]
    staging = torch.full((src_kv.chunk_bytes(bpc),), 0xCD, dtype=torch.uint8, device=device)
    ops.scatter(ops.PagedLayers.from_tensors(fresh), dest, host, blocks_per_chunk=bpc, layer=layer, staging=staging)
    synced(host)
    for i in range(num_layers):
        pages = page_view(fresh[i]).cpu()
        if layer is None or i == layer:
            assert torch.equal(pages[dest], page_view(src_layers[i])[[1, 2]].cpu()), i
            untouched = [b for b in range(32) if b not in dest]
            assert torch.equal(pages[untouched], before[i][untouched]), i
        else:
            assert torch.equal(pages, before[i]), i


def staged_args(**over):
    """A valid staged gather of 2 blocks of 64-byte pages over 3 layers, with overrides."""
    layers = make_layers("separate", 3, 4, 1, 4, 4, torch.float32, seed=33)
    ids = torch.tensor([1, 3], dtype=torch.int64)
    host = torch.zeros(3 * 4 * 64, dtype=torch.uint8)
    staging = torch.zeros(3 * 2 * 64, dtype=torch.uint8)
    args = dict(
        direction="gather",
        device="cpu",
        layer_ptrs=[t.data_ptr() for t in layers],
        block_stride=64,
        page_bytes=64,
        block_ids_ptr=ids.data_ptr(),
        num_blocks=2,
        staging_ptr=staging.data_ptr(),
        staging_bytes=staging.numel(),
        host_ptr=host.data_ptr(),
        host_bytes=host.numel(),
        host_layer_stride=4 * 64,
    )
    args.update(over)
    return args, (layers, ids, host, staging)


@pytest.mark.parametrize(
    "over,message",
    [
        (dict(host_layer_stride=127), r"host_layer_stride = 127 must be at least num_blocks \* page_bytes = 128"),
        (
            dict(staging_bytes=383),
            r"staging_bytes = 383 is less than the 384 bytes the pages take in the staging buffer",
        ),
        (dict(host_bytes=639), r"host_bytes = 639 is less than the end of the last row the pages occupy = 640"),
        (
            dict(host_first_layer=1, host_bytes=767),
            r"host_bytes = 767 is less than the end of the last row the pages occupy = 896",
        ),
        (dict(host_first_layer=-1), r"host_first_layer = -1 must be >= 0"),
        (dict(host_ptr=0), r"host_ptr is a null address"),
        (dict(staging_ptr=0), r"staging_ptr is a null address"),
        (dict(device_index=-1), r"device_index = -1: expected a CUDA device index >= 0"),
    ],
)
def test_staged_copy_refuses_buffers_shorter_than_its_rows(over, message):
    args, (_, _, host, _) = staged_args(**over)
    with pytest.raises(ValueError, match=message):
        _C.page_copy_staged(**args)
    assert not host.any()


def test_staged_twin_rows_end_exactly_at_the_host_bytes_it_checks():
    """The smallest host buffer the plan accepts is the one its last row ends in."""
    args, (layers, ids, _, _) = staged_args(host_first_layer=1, host_bytes=896)
    host = torch.full((4, 256), 0xEE, dtype=torch.uint8)  # 4 layers of 4 pages; the rows end at 896
    _C.page_copy_staged(**{**args, "host_ptr": host.data_ptr()})
    assert torch.equal(host[1:, :128].flatten(), reference_chunk(layers, ids.tolist()))
    assert (host[:, 128:] == 0xEE).all() and (host[0] == 0xEE).all()


# ---- the grid: capped for host <-> device copies, every byte covered ----


@pytest.mark.parametrize(
    "page_bytes,pages", [(65536, 8192), (65536, 3), (2 << 20, 1), (100, 5), (1 << 30, 2), (16384, 33)]
)
@pytest.mark.parametrize("max_ctas", [0, 1, 8, 32, 4096])
def test_launch_shape_covers_every_page_within_the_cap(page_bytes, pages, max_ctas):
    s = _C.launch_shape(page_bytes=page_bytes, pages=pages, max_ctas=max_ctas)
    x, y, seg = s["grid_x"], s["grid_y"], s["segment_bytes"]
    assert (y - 1) * seg < page_bytes <= y * seg and y <= 65535
    assert seg == page_bytes or seg % 4096 == 0
    assert s["ctas"] == x * y
    if max_ctas:
        assert 1 <= s["ctas"] <= max_ctas and x <= pages
    else:
        assert x == pages
    covered = {(p, seg_) for bx in range(x) for p in range(bx, min(pages, 64), x) for seg_ in range(y)}
    assert covered == {(p, seg_) for p in range(min(pages, 64)) for seg_ in range(y)}


def test_launch_shape_refuses_bad_values():
    with pytest.raises(ValueError, match=r"max_ctas = -1: expected a positive cap, or 0 for none"):
        _C.launch_shape(page_bytes=4096, pages=1, max_ctas=-1)
    with pytest.raises(ValueError, match=r"page_bytes = 0, pages = 1: both must be positive"):
        _C.launch_shape(page_bytes=0, pages=1)


def fake_cuda(kv: ops.PagedLayers) -> ops.PagedLayers:
    return ops.PagedLayers(
        kv.layer_ptrs, kv.block_stride, kv.page_bytes, kv.num_blocks, torch.device("cuda", 0), kv.tensors
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_ctas=-1), r"max_ctas = -1: expected a positive int, or 0 for no cap"),
        (dict(max_ctas=True), r"max_ctas = True: expected a positive int"),
        (dict(stream="s"), r"stream = 's': expected a torch.cuda.Stream on cuda:0 like the cache"),
    ],
)
def test_cuda_launch_options_are_checked_before_any_byte_moves(kwargs, message):
    layers = make_layers("separate", 1, 4, 1, 4, 4, torch.float32, seed=34)
    with pytest.raises(ValueError, match=message):
        ops.gather(fake_cuda(ops.PagedLayers.from_tensors(layers)), [0], torch.zeros(64, dtype=torch.uint8), **kwargs)


def page_copy_args(device_index: int) -> dict:
    layers = make_layers("separate", 1, 4, 1, 4, 4, torch.float32, seed=35)
    ids = torch.tensor([2], dtype=torch.int64)
    out = torch.zeros(64, dtype=torch.uint8)
    return dict(
        direction="gather",
        device="cuda",
        layer_ptrs=[layers[0].data_ptr()],
        block_stride=64,
        page_bytes=64,
        block_ids_ptr=ids.data_ptr(),
        num_blocks=1,
        chunk_ptr=out.data_ptr(),
        blocks_per_chunk=1,
        chunk_layer_stride=64,
        device_index=device_index,
        _keep=(layers, ids, out),
    )


def test_cuda_copies_name_a_device_index_they_cannot_use():
    args = page_copy_args(-1)
    args.pop("_keep")
    with pytest.raises(ValueError, match=r"device_index = -1: expected a CUDA device index >= 0"):
        _C.page_copy(**args)


@pytest.mark.skipif(CUDA, reason="a CUDA device is visible")
def test_without_a_device_a_cuda_copy_says_so():
    args = page_copy_args(0)
    args.pop("_keep")
    with pytest.raises(RuntimeError, match=r"page_copy needs a CUDA device, and none is visible|built without CUDA"):
        _C.page_copy(**args)


@gpu
@needs_cuda
def test_a_cuda_copy_on_a_device_that_is_not_there_is_refused():
    count = _C.cuda_device_count()
    args = page_copy_args(count)
    args.pop("_keep")
    noun = "device is" if count == 1 else "devices are"
    with pytest.raises(ValueError, match=rf"device = {count} is out of range: {count} CUDA {noun} visible"):
        _C.page_copy(**args)


@gpu
@needs_cuda
@pytest.mark.parametrize("max_ctas", [1, 3, 32, 0])
@pytest.mark.parametrize("layout", ["LBNHC", "BLHNC"])
def test_capped_zero_copy_grid_moves_every_byte(max_ctas, layout):
    """A grid of a few CTAs strides over every page and segment (BLHNC: a few large pages)."""
    layers = make_layers(layout, 6, 64, 4, 16, 64, torch.bfloat16, "cuda", seed=36)
    kv = ops.PagedLayers.from_tensors(layers)
    ids = pick_blocks(64, 40, seed=37)
    out = chunk_buffer(kv.chunk_bytes(len(ids)), "cuda", "pinned", fill=0xAB)
    ops.gather(kv, ids, out, max_ctas=max_ctas)
    reference = reference_cross_layer_chunk if kv.cross_layer else reference_chunk
    assert torch.equal(synced(out), reference(layers, ids).cpu())
    fresh = make_layers(layout, 6, 64, 4, 16, 64, torch.bfloat16, "cuda", seed=38)
    ops.scatter(ops.PagedLayers.from_tensors(fresh), ids, out, max_ctas=max_ctas)
    synced(out)
    for layer in range(6):
        assert torch.equal(page_view(fresh[layer])[ids], page_view(layers[layer])[ids])


@gpu
@needs_cuda
def test_copies_queued_faster_than_the_gpu_runs_them_keep_their_own_block_ids():
    """Three times as many copies as the index ring has entries, queued behind a busy
    stream: each entry is reused only after the copy that read it."""
    from lmcache_ext.index_ring import RING_ENTRIES

    layers = make_layers("LBNHC", 4, 128, 2, 16, 32, torch.float16, "cuda", seed=39)
    kv = ops.PagedLayers.from_tensors(layers)
    stream = torch.cuda.Stream()
    id_lists = [pick_blocks(128, 8, seed=100 + i) for i in range(3 * RING_ENTRIES)]
    outs = [chunk_buffer(kv.chunk_bytes(8), "cuda", "pinned") for _ in id_lists]  # allocated before the GPU is busy
    ops.gather(kv, id_lists[0], outs[0], stream=stream)  # the ring exists before the GPU is busy
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)
    for ids, out in zip(id_lists, outs):
        ops.gather(kv, ids, out, stream=stream)
    torch.cuda.synchronize()
    for ids, out in zip(id_lists, outs):
        assert torch.equal(out, reference_chunk(layers, ids).cpu())
