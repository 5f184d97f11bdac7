"""Torch-facing wrappers of the page-copy kernels.

They turn tensors into the raw addresses ``lmcache_ext._C`` takes, and check
every argument before a byte moves (invariant 7): the kernels trust what they are
given.

A *page* is the bytes of one block of one layer. A chunk buffer holds pages
laid out ``[layer][block][page_bytes]``. A cross-layer cache (each block holds
all layers back to back, vLLM's BL* layouts) is copied as one layer whose page
is the whole block, so its chunks read ``[block][layer][page_bytes]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch

from lmcache_ext import _C, index_ring
from lmcache_ext.kv_groups import KVGroup

BlockIds: TypeAlias = Sequence[int] | torch.Tensor
Chunks: TypeAlias = torch.Tensor | Sequence[torch.Tensor]

MAX_LAYERS = 256
COPY_PATHS = ("kernel", "dma")
"""kernel: SM copy kernels (CPU: the threaded twin); dma: the copy engines, one piece per
run of contiguous bytes (cudaMemcpyBatchAsync; CPU: one memcpy per run)."""
# Grid cap of a CUDA copy with a chunk in host memory (zero-copy over PCIe). Each CTA
# keeps 16 KiB of loads in flight, so 32 CTAs keep 512 KiB: over twice the ~0.2 MB that
# fill a PCIe 5 x16 link, on at most 32 SMs, leaving the rest to the model.
# `benchmarks/kernels.py --device cuda` measures it against other caps, no cap and
# cudaMemcpyAsync.
ZERO_COPY_MAX_CTAS = 32


def _dense_bytes(kv: torch.Tensor, name: str) -> int:
    """Bytes of one block of `kv`, which must tile memory densely inside a block.

    vLLM hands each layer as a strided view [blocks, H, N, C] whose inner dims
    are a permutation of a dense block; any such order is accepted.
    """
    dims = sorted((kv.stride(d), kv.shape[d]) for d in range(1, kv.dim()) if kv.shape[d] != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            raise ValueError(
                f"{name} with shape {tuple(kv.shape)} and strides {kv.stride()} does not cover "
                "one dense region per block: expected the inner dims to be a permutation of a "
                "contiguous block"
            )
        expected *= size
    return expected * kv.element_size()


@dataclass(frozen=True)
class PagedLayers:
    """The layers of a paged KV cache as pages: layer l, block b at layer_ptrs[l] + b*block_stride."""

    layer_ptrs: tuple[int, ...]
    block_stride: int
    page_bytes: int
    num_blocks: int
    device: torch.device
    tensors: tuple[torch.Tensor, ...]  # held so the addresses stay valid

    @classmethod
    def from_tensors(cls, layers: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> PagedLayers:
        """Describe per-layer cache tensors ([num_blocks, ...], a layer's block view each)."""
        tensors = tuple(layers.values()) if isinstance(layers, Mapping) else tuple(layers)
        if not 1 <= len(tensors) <= MAX_LAYERS:
            raise ValueError(f"len(layers) = {len(tensors)}: expected 1 to {MAX_LAYERS} layers")
        first = tensors[0]
        for i, kv in enumerate(tensors):
            if not isinstance(kv, torch.Tensor):
                raise ValueError(f"layers[{i}] is a {type(kv).__name__}; expected a torch.Tensor")
            if kv.dim() < 2:
                raise ValueError(f"layers[{i}] has shape {tuple(kv.shape)}; expected [num_blocks, ...]")
            for what, got, want in (
                ("device", kv.device, first.device),
                ("dtype", kv.dtype, first.dtype),
                ("shape", tuple(kv.shape), tuple(first.shape)),
                ("block stride", kv.stride(0), first.stride(0)),
            ):
                if got != want:
                    raise ValueError(f"layers[{i}] has {what} {got}; expected {want} like layers[0]")
        if first.device.type not in ("cpu", "cuda"):
            raise ValueError(f"layers are on {first.device}; expected cpu or cuda tensors")
        page_bytes = _dense_bytes(first, "layers[0]")
        block_stride = first.stride(0) * first.element_size()
        if first.shape[0] > 1 and block_stride < page_bytes:
            raise ValueError(
                f"layers[0] block stride is {block_stride} bytes; expected at least the page size {page_bytes}"
            )
        return cls(
            layer_ptrs=tuple(kv.data_ptr() for kv in tensors),
            block_stride=max(block_stride, page_bytes),
            page_bytes=page_bytes,
            num_blocks=first.shape[0],
            device=first.device,
            tensors=tensors,
        )

    @property
    def num_layers(self) -> int:
        return len(self.layer_ptrs)

    @property
    def cross_layer(self) -> bool:
        """True when each block holds all layers' pages back to back (BL* layouts)."""
        n = self.num_layers
        return (
            n > 1
            and self.block_stride == n * self.page_bytes
            and all(p == self.layer_ptrs[0] + i * self.page_bytes for i, p in enumerate(self.layer_ptrs))
        )

    @property
    def layout(self) -> str:
        """Names the byte order of a page and of a chunk: caches with equal names and
        page sizes produce interchangeable chunks."""
        kv = self.tensors[0]
        order = "BL" if self.cross_layer else "LB"
        return f"{order}:{tuple(kv.shape[1:])}:{kv.stride()[1:]}"

    def chunk_geometry(self) -> tuple[tuple[int, ...], int]:
        """(layer addresses, page bytes) that a whole-chunk copy uses: one big page per block
        on a cross-layer cache, so each block moves as a single copy."""
        if self.cross_layer:
            return (self.layer_ptrs[0],), self.num_layers * self.page_bytes
        return self.layer_ptrs, self.page_bytes

    def chunk_bytes(self, blocks: int) -> int:
        """Bytes of a chunk of `blocks` blocks over all layers."""
        return self.num_layers * blocks * self.page_bytes


@dataclass(frozen=True)
class PagedGroups:
    """A hybrid model's paged cache: one `PagedLayers` per KV cache group, in group order.
    Layers of different groups may share memory: vLLM hands each group its own block
    ids of it."""

    groups: tuple[PagedLayers, ...]

    @classmethod
    def from_groups(cls, layers: Mapping[str, torch.Tensor], groups: Sequence[KVGroup]) -> PagedGroups:
        """Each group's layers of `layers` (layer name -> its cache view), checked
        against the group's page size."""
        out = []
        for group in groups:
            missing = [name for name in group.layer_names if name not in layers]
            if missing:
                raise ValueError(f"layers has no view of {missing}: the {group.kind} group lists them")
            kv = PagedLayers.from_tensors([layers[name] for name in group.layer_names])
            if kv.page_bytes != group.page_bytes:
                raise ValueError(
                    f"the {group.kind} group of {group.layer_names[0]} has {kv.page_bytes}-byte pages; "
                    f"expected {group.page_bytes}"
                )
            out.append(kv)
        return cls(tuple(out))

    @property
    def device(self) -> torch.device:
        return self.groups[0].device

    @property
    def num_layers(self) -> int:
        return sum(g.num_layers for g in self.groups)

    def layer(self, index: int) -> tuple[int, int]:
        """(group, layer in the group) of a chunk's layer `index` (groups in order)."""
        for group, kv in enumerate(self.groups):
            if index < kv.num_layers:
                return group, index
            index -= kv.num_layers
        raise ValueError(f"layer = {index} is out of range: the cache has {self.num_layers} layers")


def head_order(kv: PagedLayers) -> tuple[int, int]:
    """(KV heads, runs of one head's bytes per page) of a cache viewed [blocks, H, N, C]:
    one run where its pages are head-major, N where they are token-major."""
    view = kv.tensors[0]
    if view.dim() != 4:
        return 1, 1
    heads, tokens = view.shape[1], view.shape[2]
    return heads, 1 if heads == 1 or view.stride(1) > view.stride(2) else tokens


def check_block_ids(kv: PagedLayers, block_ids: BlockIds) -> torch.Tensor:
    """block_ids as a CPU int64 tensor, each checked against the cache size."""
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dim() != 1 or block_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"block_ids is a {block_ids.dtype} tensor of shape {tuple(block_ids.shape)}; "
                "expected a 1-D int32 or int64 tensor"
            )
        ids = block_ids.to(device="cpu", dtype=torch.int64)
    else:
        try:
            ids = torch.tensor(list(block_ids), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise ValueError(f"block_ids = {block_ids!r}: expected a sequence of ints ({e})") from None
        if ids.dim() != 1:
            raise ValueError(f"block_ids = {block_ids!r}: expected a flat sequence of ints")
    bad = torch.nonzero((ids < 0) | (ids >= kv.num_blocks))
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"block_ids[{i}] = {int(ids[i])} is out of range: the cache has {kv.num_blocks} blocks")
    return ids


def _check_chunk_tensor(kv: PagedLayers, t: object, name: str, need: int, allow_pageable: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} is a {type(t).__name__}; expected a torch.Tensor")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous; expected a contiguous buffer")
    nbytes = t.numel() * t.element_size()
    if nbytes < need:
        raise ValueError(f"{name} has {nbytes} bytes; expected at least {need}")
    if kv.device.type == "cpu":
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; expected a cpu tensor like the cache")
    elif t.device.type == "cpu":
        if not allow_pageable and not t.is_pinned():
            raise ValueError(
                f"{name} is pageable host memory; the CUDA kernel reaches host memory only when it "
                "is pinned (lmcache_ext.memory slots or tensor.pin_memory())"
            )
    elif t.device != kv.device:
        raise ValueError(f"{name} is on {t.device}; expected {kv.device} like the cache or pinned host")


def _copy(
    direction: str,
    kv: PagedLayers,
    block_ids: BlockIds,
    chunks: Chunks,
    blocks_per_chunk: int | None,
    layer: int | None,
    staging: torch.Tensor | None,
    stream: torch.cuda.Stream | None,
    max_ctas: int | None,
    path: str = "kernel",
) -> None:
    ids = check_block_ids(kv, block_ids)
    n = ids.numel()
    name = "out" if direction == "gather" else "src"
    single = isinstance(chunks, torch.Tensor)
    if not single and (isinstance(chunks, (str, bytes)) or not isinstance(chunks, Sequence)):
        raise ValueError(f"{name} is a {type(chunks).__name__}; expected a torch.Tensor or a list of them")
    chunk_list: list[torch.Tensor] = [chunks] if single else list(chunks)
    _check_launch(kv, stream, max_ctas)
    _check_path(path, staging, max_ctas)
    if n == 0:
        return
    if blocks_per_chunk is None:
        if not single:
            raise ValueError(f"{name} is a list of {len(chunk_list)} chunks; blocks_per_chunk is required")
        blocks_per_chunk = max(n, 1)
    if isinstance(blocks_per_chunk, bool) or not isinstance(blocks_per_chunk, int) or blocks_per_chunk < 1:
        raise ValueError(f"blocks_per_chunk = {blocks_per_chunk!r}: expected a positive int")
    want_chunks = math.ceil(n / blocks_per_chunk)
    if len(chunk_list) != want_chunks:
        raise ValueError(
            f"{name} has {len(chunk_list)} chunk buffers; expected {want_chunks} for {n} blocks "
            f"at {blocks_per_chunk} blocks per chunk"
        )
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < kv.num_layers):
        raise ValueError(f"layer = {layer!r} is out of range: the cache has {kv.num_layers} layers")
    if layer is None or kv.cross_layer:
        layer_ptrs, page_bytes = kv.chunk_geometry()
        first_layer = 0
    else:
        layer_ptrs, page_bytes = (kv.layer_ptrs[layer],), kv.page_bytes
        first_layer = layer
    layer_stride = blocks_per_chunk * kv.page_bytes
    last_layer = first_layer + len(layer_ptrs) - 1
    needs = [
        last_layer * layer_stride + min(blocks_per_chunk, n - c * blocks_per_chunk) * page_bytes
        for c in range(want_chunks)
    ]
    for c, (t, need) in enumerate(zip(chunk_list, needs)):
        _check_chunk_tensor(kv, t, name if single else f"{name}[{c}]", need, staging is not None)
    if layer is not None and kv.cross_layer:
        _copy_cross_layer_layer(
            direction, kv, ids, chunk_list, blocks_per_chunk, layer, staging, stream, max_ctas, path
        )
        return
    geometry = _Geometry(layer_ptrs, page_bytes, layer_stride, first_layer)
    if staging is not None:
        _copy_staged(direction, kv, ids, chunk_list, geometry, staging, stream, max_ctas)
        return
    args = dict(
        direction=direction,
        device=kv.device.type,
        layer_ptrs=list(layer_ptrs),
        block_stride=kv.block_stride,
        page_bytes=page_bytes,
        num_blocks=n,
        blocks_per_chunk=blocks_per_chunk,
        chunk_layer_stride=layer_stride,
        chunk_first_layer=first_layer,
        path=path,
    )
    if kv.device.type == "cpu" or path == "dma":  # block ids and chunk table read on the host
        table = torch.tensor([t.data_ptr() for t in chunk_list], dtype=torch.int64) if not single else None
        on_cuda = (
            {}
            if kv.device.type == "cpu"
            else dict(
                device_index=kv.device.index,
                stream=(stream if stream is not None else torch.cuda.current_stream(kv.device)).cuda_stream,
            )
        )
        _C.page_copy(
            block_ids_ptr=ids.data_ptr(),
            chunk_ptr=chunk_list[0].data_ptr() if single else 0,
            chunk_table_ptr=table.data_ptr() if table is not None else 0,
            **args,
            **on_cuda,
        )
        return
    on_host = any(t.device.type == "cpu" for t in chunk_list)
    ptrs = [t.data_ptr() for t in chunk_list]
    if on_host:
        ptrs = _C.device_addresses(ptrs)
    stream = stream if stream is not None else torch.cuda.current_stream(kv.device)
    with index_ring.ring_for(kv.device).upload(ids, [] if single else ptrs, stream) as (ids_ptr, table_ptr):
        _C.page_copy(
            block_ids_ptr=ids_ptr,
            chunk_ptr=ptrs[0] if single else 0,
            chunk_table_ptr=table_ptr,
            device_index=kv.device.index,
            stream=stream.cuda_stream,
            max_ctas=_grid_cap(max_ctas, on_host),
            **args,
        )


def _copy_cross_layer_layer(
    direction: str,
    kv: PagedLayers,
    ids: torch.Tensor,
    chunk_list: list[torch.Tensor],
    blocks_per_chunk: int,
    layer: int,
    staging: torch.Tensor | None,
    stream: torch.cuda.Stream | None,
    max_ctas: int | None,
    path: str,
) -> None:
    """One layer of a cross-layer cache, whose chunks read [block][layer][page]: each
    block's page of `layer` is its own one-page chunk, so one launch moves them all and
    the chunk's bytes are the same as a whole-chunk copy's."""
    if staging is not None:
        raise ValueError("a staged layer copy needs a per-layer layout; this cache is cross-layer (BL*)")
    block_bytes = kv.num_layers * kv.page_bytes
    offset = layer * kv.page_bytes
    pages = []
    for c in range(len(chunk_list)):
        flat = chunk_list[c].reshape(-1).view(torch.uint8)
        for j in range(min(blocks_per_chunk, ids.numel() - c * blocks_per_chunk)):
            start = j * block_bytes + offset
            pages.append(flat[start : start + kv.page_bytes])
    one_layer = PagedLayers(
        layer_ptrs=(kv.layer_ptrs[layer],),
        block_stride=kv.block_stride,
        page_bytes=kv.page_bytes,
        num_blocks=kv.num_blocks,
        device=kv.device,
        tensors=kv.tensors,
    )
    _copy(direction, one_layer, ids, pages, 1, None, None, stream, max_ctas, path)


@dataclass(frozen=True)
class _Geometry:
    """The pages one copy moves and where they sit in a chunk."""

    layer_ptrs: tuple[int, ...]
    page_bytes: int
    layer_stride: int  # bytes between layers in a chunk
    first_layer: int  # the chunk layer of layer_ptrs[0]


def _check_launch(kv: PagedLayers, stream: torch.cuda.Stream | None, max_ctas: int | None) -> None:
    if kv.device.type == "cpu":
        for what, value in (("stream", stream), ("max_ctas", max_ctas)):
            if value is not None:
                raise ValueError(f"{what} was given but the cache is on cpu; it is for cuda caches")
        return
    if stream is not None and (not isinstance(stream, torch.cuda.Stream) or stream.device != kv.device):
        raise ValueError(f"stream = {stream!r}: expected a torch.cuda.Stream on {kv.device} like the cache")
    if max_ctas is not None and (isinstance(max_ctas, bool) or not isinstance(max_ctas, int) or max_ctas < 0):
        raise ValueError(f"max_ctas = {max_ctas!r}: expected a positive int, or 0 for no cap")


def _check_path(path: str, staging: torch.Tensor | None, max_ctas: int | None) -> None:
    if path not in COPY_PATHS:
        raise ValueError(f"path = {path!r}: expected one of {', '.join(COPY_PATHS)}")
    if path == "dma" and staging is not None:
        raise ValueError("path = 'dma' copies pages directly; a staged copy runs a kernel into its staging buffer")
    if path == "dma" and max_ctas is not None:
        raise ValueError("max_ctas caps a copy kernel's grid; path = 'dma' runs no kernel")


def _grid_cap(max_ctas: int | None, on_host: bool) -> int:
    """The caller's cap, else ZERO_COPY_MAX_CTAS when a chunk is in host memory, else none."""
    if max_ctas is not None:
        return max_ctas
    return ZERO_COPY_MAX_CTAS if on_host else 0


def _copy_staged(
    direction: str,
    kv: PagedLayers,
    ids: torch.Tensor,
    chunk_list: list[torch.Tensor],
    geometry: _Geometry,
    staging: torch.Tensor,
    stream: torch.cuda.Stream | None,
    max_ctas: int | None,
) -> None:
    """Pages <-> a compact `staging` buffer on the cache's device, and the staging rows <->
    exactly the host rows those pages occupy (one cudaMemcpy2DAsync; memcpy per row on CPU)."""
    if len(chunk_list) != 1 or chunk_list[0].device.type != "cpu":
        raise ValueError("a staged copy takes one host tensor as its chunk buffer")
    host = chunk_list[0]
    if staging.device != kv.device or not staging.is_contiguous():
        raise ValueError(f"staging is on {staging.device}; expected a contiguous tensor on {kv.device}")
    n = ids.numel()
    staging_bytes = staging.numel() * staging.element_size()
    need = len(geometry.layer_ptrs) * n * geometry.page_bytes
    if staging_bytes < need:
        raise ValueError(f"staging has {staging_bytes} bytes; expected at least {need}")
    args = dict(
        direction=direction,
        device=kv.device.type,
        layer_ptrs=list(geometry.layer_ptrs),
        block_stride=kv.block_stride,
        page_bytes=geometry.page_bytes,
        num_blocks=n,
        staging_ptr=staging.data_ptr(),
        staging_bytes=staging_bytes,
        host_ptr=host.data_ptr(),
        host_bytes=host.numel() * host.element_size(),
        host_layer_stride=geometry.layer_stride,
        host_first_layer=geometry.first_layer,
    )
    if kv.device.type == "cpu":
        _C.page_copy_staged(block_ids_ptr=ids.data_ptr(), **args)
        return
    stream = stream if stream is not None else torch.cuda.current_stream(kv.device)
    with index_ring.ring_for(kv.device).upload(ids, [], stream) as (ids_ptr, _):
        _C.page_copy_staged(
            block_ids_ptr=ids_ptr,
            device_index=kv.device.index,
            stream=stream.cuda_stream,
            max_ctas=max_ctas or 0,
            **args,
        )


def gather(
    kv: PagedLayers,
    block_ids: BlockIds,
    out: Chunks,
    *,
    blocks_per_chunk: int | None = None,
    layer: int | None = None,
    staging: torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
    max_ctas: int | None = None,
    path: str = "kernel",
) -> None:
    """Copy the pages of `block_ids` from the paged cache into chunk buffers, in one launch.

    `out` is one buffer (all blocks, laid out [layer][block][page]) or a list of
    buffers of `blocks_per_chunk` blocks each. With `layer`, only that layer is
    copied, into its [layer] slice of each chunk (the layerwise path). On a CUDA
    cache, `out` may be device memory or pinned host memory (written zero-copy),
    or one host buffer reached through a device `staging` buffer (which needs
    len(layers) * len(block_ids) * page_bytes bytes; on a CPU cache the staged path
    runs its CPU twin). CUDA only: the copy is queued on `stream` (default: the
    current stream) without a host sync, with at most `max_ctas` CTAs (default:
    ZERO_COPY_MAX_CTAS when a chunk is in host memory, no cap otherwise). `path`
    "dma" moves the pages with the copy engines instead of a kernel, one piece per run
    of contiguous bytes (COPY_PATHS).
    """
    _copy("gather", kv, block_ids, out, blocks_per_chunk, layer, staging, stream, max_ctas, path)


def scatter(
    kv: PagedLayers,
    block_ids: BlockIds,
    src: Chunks,
    *,
    blocks_per_chunk: int | None = None,
    layer: int | None = None,
    staging: torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
    max_ctas: int | None = None,
    path: str = "kernel",
) -> None:
    """The inverse of `gather`: copy chunk buffers back into the pages of `block_ids`."""
    _copy("scatter", kv, block_ids, src, blocks_per_chunk, layer, staging, stream, max_ctas, path)


def set_cpu_copy_options(*, threads: int = 0, streaming_min_bytes: int = 8 << 20) -> None:
    """Threads of the CPU twin (0 = default) and the copy size from which it uses
    non-temporal stores (negative = never)."""
    _C.set_cpu_copy_options(threads=threads, streaming_min_bytes=streaming_min_bytes)


def cuda_available() -> bool:
    """True when the module was built with CUDA and a device is visible."""
    return bool(_C.build_info()["cuda"]) and _C.cuda_device_count() > 0
