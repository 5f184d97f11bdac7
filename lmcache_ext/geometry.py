"""The paged cache as the planner sees it — the same in a scheduler and in every worker,
in vLLM or in a `CacheEngine` — and the one place where a cache's `Namespace` is made
from it."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmcache_ext.keys import Namespace
from lmcache_ext.kv_groups import MAMBA, KVGroup, layout_of
from lmcache_ext.plans import GroupPages, SlotCopy

NULL_BLOCK = 0  # vLLM's null block: what a group's block table holds where nothing is read
BlockTables = Sequence[Sequence[int]]
"""A request's block ids, one list per KV cache group (one list for a model without HMA)."""


@dataclass(frozen=True)
class Geometry:
    """Chunks of `blocks_per_chunk` blocks of `num_layers` pages of `page_bytes` bytes;
    `tp_size` ranks execute each plan, each on its own shard. The lower tiers keep a
    chunk as one record per shard (`writers`): per KV head where the namespace is
    per-head (`heads` set in `of_cache`: any TP size reads them), else per group of
    `replicas` ranks. A hybrid model (`groups`:
    vLLM's KV cache groups, with HMA) keeps in each chunk, per group, a section of the
    pages a hit ending at the chunk's end reads (`KVGroup.kept_blocks`), in group order;
    its Mamba-type groups' state at a chunk's end is a record of its own, a section per
    such group of one page per layer (`state_pages`)."""

    namespace: Namespace  # rank-independent: each rank keeps its shard in its own directory or record
    block_size: int
    blocks_per_chunk: int
    num_layers: int
    page_bytes: int
    tp_size: int
    device_type: str = "cuda"  # where the KV is computed: "cuda", "cpu", ...
    groups: tuple[KVGroup, ...] = ()  # a hybrid model's groups; () for one full-attention group
    replicas: int = 1  # ranks holding the same KV: the first one's records serve them all (`shards_of`)
    heads: int = 1  # KV heads in a rank's page, each a shard of its own (1: the page is one shard)
    head_runs: int = 1  # runs of one head's bytes in a page: 1 where a page is head-major (HND), else its tokens

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
        groups: tuple[KVGroup, ...] = (),
        replicas: int = 1,
        heads: int | None = None,
        head_runs: int = 1,
    ) -> Geometry:
        """The geometry of a cache of `num_layers` layers of `page_bytes`-byte pages for
        `model`; `ranks` execute its plans (default `tp_size`; a `CacheEngine` is one
        rank of its tensor-parallel group, and its keys name that rank). `groups`: a
        hybrid model's KV cache groups; their layout enters the namespace. `replicas`:
        how many consecutive ranks hold the same KV (every rank of an MLA model, whose
        latent is not split across ranks; `tp_size` / KV heads where vLLM replicates KV
        heads). The namespace counts shards, not ranks, so engines whose ranks hold the
        same shards (MLA at any TP size; 2 KV heads at TP 2 and 4) read the same chunks.
        `heads`: the KV heads in each rank's page, in `head_runs` runs each; then every
        head is a shard, and the namespace names the heads and one head's page instead
        of the TP size, so an engine at any TP size reads every head it owns."""
        if replicas < 1 or tp_size % replicas:
            raise ValueError(f"replicas = {replicas}: expected a divisor of tp_size = {tp_size}")
        per_head = heads is not None
        heads = 1 if heads is None else heads
        if heads < 1 or head_runs < 1 or page_bytes % (heads * head_runs) or (heads > 1 and replicas > 1):
            raise ValueError(
                f"heads = {heads} in {head_runs} runs each, replicas = {replicas}: expected a page of "
                f"{page_bytes} bytes to split into heads * head_runs equal runs, and replicated ranks to hold one head"
            )
        hybrid = groups if layout_of(groups) else ()
        shards = tp_size // replicas * heads
        namespace = Namespace(
            model=model,
            revision=revision,
            dtype=dtype.removeprefix("torch."),
            layout=layout,
            block_size=block_size,
            page_bytes=page_bytes // heads,
            num_layers=num_layers,
            tp_size=1 if per_head else shards,
            tp_rank=0 if per_head else tp_rank,
            chunk_size=chunk_size,
            kv_groups=layout_of(groups),
            kv_heads=shards if per_head else 0,
        )
        return cls(
            namespace,
            block_size,
            chunk_size // block_size,
            num_layers,
            page_bytes,
            tp_size if ranks is None else ranks,
            device_type,
            hybrid,
            replicas,
            heads,
            head_runs,
        )

    @property
    def writers(self) -> int:
        """Shards whose records the lower tiers keep: each head of each group of replicas."""
        return self.tp_size // self.replicas * self.heads

    def shards_of(self, rank: int) -> range:
        """The shards whose records rank `rank` reads; the first of its replicas writes them."""
        first = rank // self.replicas * self.heads
        return range(first, first + self.heads)

    def shard_bytes(self, nbytes: int) -> int:
        """Bytes of one shard's record of a rank's `nbytes`-byte payload."""
        return nbytes // self.heads

    @property
    def hybrid(self) -> bool:
        """True for a model whose chunks hold a section per KV cache group."""
        return bool(self.groups)

    @property
    def keeps_state(self) -> bool:
        """True for a model with Mamba-type groups: a hit needs their state where it ends."""
        return any(g.kind == MAMBA for g in self.groups)

    @property
    def state_bytes(self) -> int:
        """Bytes of a state record: each Mamba-type layer's state."""
        return sum(g.num_layers * g.page_bytes for g in self.groups if g.kind == MAMBA)

    @property
    def slot_bytes(self) -> int:
        """Bytes of a host slot: the largest chunk, or a state record."""
        return max(self.chunk_bytes(self.blocks_per_chunk), self.state_bytes)

    def state_pages(self, block_ids: dict[int, int]) -> tuple[GroupPages, ...] | None:
        """A state record's pages: each Mamba-type group's state in block
        `block_ids[group]`; None unless every such group has one."""
        parts, section = [], 0
        for index, group in enumerate(self.groups):
            if group.kind != MAMBA:
                continue
            if block_ids.get(index, NULL_BLOCK) == NULL_BLOCK:
                return None
            parts.append(GroupPages(index, (block_ids[index],), section, 1))
            section += group.num_layers * group.page_bytes
        return tuple(parts)

    def chunk_bytes(self, blocks: int, chunk: int | None = None) -> int:
        """Bytes of chunk `chunk` when it holds `blocks` blocks (a partial chunk fewer than
        `blocks_per_chunk`); chunk None: the most any chunk of `blocks` blocks holds."""
        if not self.groups:
            return self.num_layers * blocks * self.page_bytes
        return sum(g.num_layers * self._kept(g, blocks, chunk) * g.page_bytes for g in self.groups)

    def read_at(self, tables: BlockTables, end: int) -> list[list[int]]:
        """`tables` with the null block wherever a request of `end` computed tokens reads
        nothing (the blocks before each group's window), as vLLM hands tables to a load."""
        if not self.groups:
            return [list(t) for t in tables]
        out = []
        for group, table in zip(self.groups, tables):
            skipped = group.skipped_tokens(end) // group.block_size
            out.append([NULL_BLOCK if i < skipped else b for i, b in enumerate(table)])
        return out

    def copy_bytes(self, copy: SlotCopy) -> int:
        """The bytes `copy` moves between a slot and the paged cache."""
        if not self.groups:
            return self.num_layers * len(copy.block_ids) * self.page_bytes
        return sum(
            len(p.block_ids) * self.groups[p.group].num_layers * self.groups[p.group].page_bytes for p in copy.groups
        )

    @property
    def base_group(self) -> int:
        """The group whose block is the geometry's (the largest): its table counts a
        copy's tokens. vLLM grows a group's block to unify page sizes, so the blocks of
        the others divide it."""
        return next((i for i, g in enumerate(self.groups) if g.block_size == self.block_size), 0)

    def ratio(self, group: KVGroup) -> int:
        """The group's blocks per block of the geometry."""
        return self.block_size // group.block_size

    def _kept(self, group: KVGroup, blocks: int, chunk: int | None) -> int:
        r = self.ratio(group)
        if chunk is not None:
            return group.kept_blocks((chunk * self.blocks_per_chunk + blocks) * r, blocks * r)
        reach = -(-max(group.window, 1) // group.block_size) + r  # past it the kept count repeats
        return max(group.kept_blocks(end, blocks * r) for end in range(blocks * r, blocks * r + reach + 1))

    def group_pages(
        self, tables: BlockTables, chunk: int, blocks: int, lo: int, hi: int, *, load: bool, computed: int = 0
    ) -> tuple[GroupPages, ...] | None:
        """A hybrid model's pages of blocks [lo, hi) of chunk `chunk` of `blocks` blocks,
        per group, at the request's block ids `tables` (indexed from its first block);
        () for a model without groups. A load skips null blocks (vLLM reads nothing
        there). None when a load meets a real block that the chunk does not keep (it
        would stay unwritten), or when a store's kept block is gone: null, not listed, or
        freed by vLLM once `computed` tokens were computed (it frees a group's blocks
        that no later token reads, at the start of the step). Blocks are the geometry's;
        a group with smaller blocks has `ratio` of its own in each."""
        parts, section = [], 0
        for index, group in enumerate(self.groups):
            if group.kind == MAMBA:
                continue  # its state is a record of its own
            r = self.ratio(group)
            base, size, g_lo, g_hi = chunk * self.blocks_per_chunk * r, blocks * r, lo * r, hi * r
            table, kept = tables[index], group.kept_blocks(base + size, size)
            first_kept = size - kept  # the chunk's kept blocks are its last `kept`
            if not load and kept and base + first_kept < group.skipped_tokens(computed) // group.block_size:
                return None
            ids = [table[base + p] if base + p < len(table) else NULL_BLOCK for p in range(g_lo, g_hi)]
            unkept_real = any(b != NULL_BLOCK for p, b in enumerate(ids, start=g_lo) if p < first_kept)
            kept_gone = any(b == NULL_BLOCK for p, b in enumerate(ids, start=g_lo) if p >= first_kept)
            if unkept_real if load else kept_gone:
                return None
            start = max(g_lo, first_kept)  # the kept real blocks: runs between null ones
            for is_real, run in itertools.groupby(
                enumerate(ids[start - g_lo :], start=start), lambda pb: pb[1] != NULL_BLOCK
            ):
                pages = list(run)
                if is_real:
                    first = pages[0][0] - first_kept
                    parts.append(GroupPages(index, tuple(b for _, b in pages), section, kept, first))
            section += group.num_layers * kept * group.page_bytes
        return tuple(parts)


def shard_root(root: str | Path, shard: int) -> Path:
    """Each shard's own directory under a disk tier's `local_disk` (a disk tier owns its root)."""
    return Path(root) / f"shard{shard}"
