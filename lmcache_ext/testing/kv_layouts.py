"""Paged KV caches shaped like vLLM's, filled with random bytes, and a plain-torch
reference of page copies to check the kernels against."""

from __future__ import annotations

import torch

ELEMENT_DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp8": torch.float8_e4m3fn,
    "u8": torch.uint8,
}


def make_layers(
    layout: str,
    num_layers: int,
    num_blocks: int,
    heads: int,
    tokens: int,
    width: int,
    dtype: torch.dtype,
    device: str = "cpu",
    pad_elems: int = 0,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Per-layer views [num_blocks, heads, tokens, width] over one random byte buffer.

    layout: "separate" (one contiguous tensor per layer), "LBNHC" (vLLM FlashAttention:
    physical block [N, H, C]), "LBHNC" (vLLM CPU), "BLHNC" and "BLNHC" (cross-layer: a
    block holds all layers). pad_elems adds padding after every block (a block stride > page).
    """
    esize = torch.empty(0, dtype=dtype).element_size()
    page = heads * tokens * width
    gen = torch.Generator().manual_seed(seed)

    def random_buffer(elems: int) -> torch.Tensor:
        raw = torch.randint(0, 256, (elems * esize,), dtype=torch.uint8, generator=gen)
        return raw.to(device).view(dtype)

    if layout == "separate":
        return [random_buffer(num_blocks * page).view(num_blocks, heads, tokens, width) for _ in range(num_layers)]
    if layout in ("LBNHC", "LBHNC"):
        block = page + pad_elems
        buf = random_buffer(num_layers * num_blocks * block)
        inner = (tokens * width, width, 1) if layout == "LBHNC" else (width, heads * width, 1)
        return [
            buf.as_strided((num_blocks, heads, tokens, width), (block, *inner), layer * num_blocks * block)
            for layer in range(num_layers)
        ]
    if layout in ("BLHNC", "BLNHC"):
        buf = random_buffer(num_blocks * num_layers * page)
        inner = (tokens * width, width, 1) if layout == "BLHNC" else (width, heads * width, 1)
        return [
            buf.as_strided((num_blocks, heads, tokens, width), (num_layers * page, *inner), layer * page)
            for layer in range(num_layers)
        ]
    raise ValueError(f"layout = {layout!r}: expected separate, LBNHC, LBHNC, BLHNC or BLNHC")


def page_view(kv: torch.Tensor) -> torch.Tensor:
    """The layer's blocks as raw bytes [num_blocks, page_bytes], in physical order (vLLM's way)."""
    esize = kv.element_size()
    page = kv[0].numel() * esize
    return torch.empty(0, dtype=torch.uint8, device=kv.device).set_(
        kv.untyped_storage(), kv.storage_offset() * esize, (kv.shape[0], page), (kv.stride(0) * esize, 1)
    )


def reference_chunk(layers: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    """Plain-torch gather: [layer][block][page] bytes."""
    ids = torch.tensor(block_ids, dtype=torch.long, device=layers[0].device)
    return torch.stack([page_view(kv)[ids] for kv in layers]).flatten()


def reference_cross_layer_chunk(layers: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    """Plain-torch gather of a cross-layer cache: [block][layer][page] bytes."""
    ids = torch.tensor(block_ids, dtype=torch.long, device=layers[0].device)
    return torch.stack([page_view(kv)[ids] for kv in layers], dim=1).flatten()
