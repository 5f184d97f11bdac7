"""The paged cache as the planner sees it — the same in a scheduler and in every worker,
in vLLM or in a `CacheEngine` — and the one place where a cache's `Namespace` is made
from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmcache_ext.keys import Namespace


@dataclass(frozen=True)
class Geometry:
    """Chunks of `blocks_per_chunk` blocks of `num_layers` pages of `page_bytes` bytes;
    `tp_size` ranks execute each plan, each on its own shard."""

    namespace: Namespace  # rank-independent: each rank keeps its shard in its own directory or record
    block_size: int
    blocks_per_chunk: int
    num_layers: int
    page_bytes: int
    tp_size: int
    device_type: str = "cuda"  # where the KV is computed: "cuda", "cpu", ...

    @classmethod
    def of_cache(
        cls,
        *,
        model: str,
        revision: str,
        dtype: str,
        layout: str,
        block_size: int,
        page_bytes: int,
        num_layers: int,
        chunk_size: int,
        tp_size: int = 1,
        tp_rank: int = 0,
        ranks: int | None = None,
        device_type: str = "cuda",
    ) -> Geometry:
        """The geometry of a cache of `num_layers` layers of `page_bytes`-byte pages for
        `model`; `ranks` execute its plans (default `tp_size`; a `CacheEngine` is one
        rank of its tensor-parallel group, and its keys name that rank)."""
        namespace = Namespace(
            model=model,
            revision=revision,
            dtype=dtype.removeprefix("torch."),
            layout=layout,
            block_size=block_size,
            page_bytes=page_bytes,
            num_layers=num_layers,
            tp_size=tp_size,
            tp_rank=tp_rank,
            chunk_size=chunk_size,
        )
        return cls(
            namespace,
            block_size,
            chunk_size // block_size,
            num_layers,
            page_bytes,
            tp_size if ranks is None else ranks,
            device_type,
        )

    def chunk_bytes(self, blocks: int) -> int:
        return self.num_layers * blocks * self.page_bytes


def rank_root(root: str | Path, rank: int) -> Path:
    """Each rank's own directory under a disk tier's `local_disk` (a disk tier owns its root)."""
    return Path(root) / f"rank{rank}"
