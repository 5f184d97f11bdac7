"""What both halves of the connector derive from vLLM's configuration: the cache's
geometry, and how a chunk key and a disk root are made per TP rank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from lmcache_ext.config import CacheConfig
from lmcache_ext.keys import ChunkKey, Namespace


@dataclass(frozen=True)
class Geometry:
    """The paged cache as the connector sees it, the same in the scheduler and every worker."""

    namespace: Namespace  # rank-independent: per-rank keys are derived by rank_key()
    block_size: int
    blocks_per_chunk: int
    num_layers: int
    page_bytes: int
    tp_size: int
    device_type: str = "cuda"  # where vLLM computes: "cuda", "cpu", ...

    def chunk_bytes(self, blocks: int) -> int:
        return self.num_layers * blocks * self.page_bytes

    @classmethod
    def from_vllm(cls, vllm_config: Any, kv_cache_config: Any, config: CacheConfig) -> Geometry | None:
        """None when the model has no KV cache at all (an encoder-only or attention-free
        model): there is nothing to cache."""
        groups = kv_cache_config.kv_cache_groups
        if not groups:
            return None
        if len(groups) != 1:
            raise ValueError(
                f"the model has {len(groups)} KV cache groups (a hybrid or sliding-window model); "
                "lmcache_ext supports models with one group of full-attention layers"
            )
        spec = groups[0].kv_cache_spec
        config.check_block_size(spec.block_size)
        model = vllm_config.model_config
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        layout = getattr(kv_cache_config, "kv_cache_layout", None) or getattr(
            vllm_config.cache_config, "kv_cache_layout", None
        )
        namespace = Namespace(
            model=str(model.model),
            revision=str(model.revision or ""),
            dtype=str(spec.dtype).removeprefix("torch."),
            layout=str(layout or "default"),
            block_size=spec.block_size,
            page_bytes=spec.page_size_bytes,
            num_layers=len(groups[0].layer_names),
            tp_size=tp_size,
            tp_rank=0,
            chunk_size=config.chunk_size,
        )
        return cls(
            namespace=namespace,
            block_size=spec.block_size,
            blocks_per_chunk=config.chunk_size // spec.block_size,
            num_layers=len(groups[0].layer_names),
            page_bytes=spec.page_size_bytes,
            tp_size=tp_size,
            device_type=vllm_config.device_config.device_type,
        )


def rank_key(key: ChunkKey, rank: int, geometry: Geometry) -> ChunkKey:
    """The key of a chunk's shard on `rank`: under TP each rank holds its own heads'
    bytes (an MLA cache is the same on every rank, and each rank keeps its own copy,
    since host slots live in each worker's process)."""
    if geometry.tp_size == 1:
        return key
    return xxhash.xxh3_128_digest(key + rank.to_bytes(4, "little"))


def rank_root(root: Path, rank: int) -> Path:
    """Each rank's own disk directory (a disk tier owns its root)."""
    return root / f"rank{rank}"
