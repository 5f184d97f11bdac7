"""CacheEngine: the directory (scheduler side) and the executor (worker side) in one
process, for callers outside vLLM, tests and benchmarks.

Tokens are cut into chunks of ``chunk_size`` tokens; block ``i`` of a request's
block list holds its tokens ``[i*block_size, (i+1)*block_size)``. A chunk is
stored as its blocks' pages, ``[layer][block][page]``, in one host slot, and
written through to the disk and remote tiers in the background when they are
configured; its host slot stays pinned until every tier's write has ended.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias, cast

import torch

from lmcache_ext import ops
from lmcache_ext.config import CacheConfig
from lmcache_ext.directory import CacheDirectory, PlannedLoad, Reserve, Source
from lmcache_ext.epoch import next_epoch, read_epoch
from lmcache_ext.executor import TransferExecutor
from lmcache_ext.keys import ChunkKey, Namespace, chunk_keys, partial_keys
from lmcache_ext.metrics import EngineStats
from lmcache_ext.plans import Plan, SlotCopy, TierTransfer
from lmcache_ext.tiers import build_storage

if TYPE_CHECKING:
    from lmcache_ext.tiers.remote import RemotePresence

KVCaches: TypeAlias = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
Tokens: TypeAlias = Sequence[int] | torch.Tensor


class _Chunk(NamedTuple):
    key: ChunkKey
    index: int  # type: ignore[assignment]  # (shadows tuple.index) position in the request: its blocks start at index * blocks_per_chunk
    blocks: int  # full blocks it holds (fewer than a chunk only for a partial chunk)


class CacheEngine:
    """Store, look up and retrieve the KV cache of token prefixes in one process."""

    def __init__(
        self,
        config: CacheConfig,
        kv_caches: KVCaches,
        block_size: int,
        *,
        model: str = "unnamed",
        revision: str = "",
        tp_size: int = 1,
        tp_rank: int = 0,
    ) -> None:
        config.check_block_size(block_size)
        self._config = config
        self._kv = ops.PagedLayers.from_tensors(kv_caches)
        self._block_size = block_size
        self._blocks_per_chunk = config.chunk_size // block_size
        first = self._kv.tensors[0]
        self._namespace = Namespace(
            model=model,
            revision=revision,
            dtype=str(first.dtype).removeprefix("torch."),
            layout=self._kv.layout,
            block_size=block_size,
            page_bytes=self._kv.page_bytes,
            num_layers=self._kv.num_layers,
            tp_size=tp_size,
            tp_rank=tp_rank,
            chunk_size=config.chunk_size,
            cache_namespace=config.cache_namespace,
            epoch=read_epoch(config.local_disk),
        )
        slot_bytes = self._kv.chunk_bytes(self._blocks_per_chunk)
        self._storage = build_storage(
            config,
            slot_bytes,
            namespace=dataclasses.replace(self._namespace, epoch="").fingerprint,
            rank=tp_rank,
            disk_root=config.local_disk,
            disk_bytes=config.disk_bytes,
        )
        self._pool = self._storage.pool
        self._stats = EngineStats()
        self._directory = CacheDirectory(
            self._pool, list(self._storage.presence.items()), on_evict=lambda key: self._stats.evicted("host")
        )
        self._executor = TransferExecutor(
            self._kv,
            self._pool,
            self._storage.tiers,
            read_threads=max(config.disk_io_threads, config.remote_connections),
            cuda_copy_path=config.cuda_copy_path,
        )
        self._writes_left: dict[ChunkKey, int] = {}  # tier writes still running per stored chunk
        self._writes_lock = threading.Lock()
        self._transfers = ThreadPoolExecutor(1, thread_name_prefix="lmcache-engine")
        if config.cpu_copy_threads:
            ops.set_cpu_copy_options(threads=config.cpu_copy_threads)
        self._closed = False
        self._close_lock = threading.Lock()

    # -- public API --

    def lookup(self, tokens: Tokens) -> int:
        """Length of the longest cached prefix of `tokens`, in tokens: whole chunks, then
        with save_unfull_chunk the longest stored partial chunk that `tokens` extend
        (whole blocks)."""
        self._check_open()
        chunks, found = self._hit(tokens)
        by_tier: dict[str, int] = {}
        for chunk, source in zip(chunks, found):
            by_tier[source.value] = by_tier.get(source.value, 0) + chunk.blocks * self._block_size
        self._stats.lookup(len(tokens), by_tier)
        return self._tokens_of(chunks)

    def store(self, tokens: Tokens, block_ids: Sequence[int] | torch.Tensor) -> int:
        """Store the chunks of `tokens` held in `block_ids`; returns how many leading
        tokens are now cached (stored by this call or before). Full chunks only,
        unless save_unfull_chunk. Lower tiers are written in the background."""
        self._check_open()
        with self._stats.timer("store"):
            chunks = self._chunks(tokens)
            blocks = self._block_list(block_ids, chunks, "store")
            cached, fills = [], []
            for chunk in chunks:
                slot = self._directory.reserve_store(chunk.key)
                if slot is Reserve.NO_SLOT:
                    self._stats.failed("no_free_slot")
                    break
                cached.append(chunk)
                if slot is not Reserve.PRESENT:
                    fills.append((chunk, slot))
            try:
                result = self._executor.run(
                    Plan(gathers=tuple(SlotCopy(s, self._blocks_of(c, blocks)) for c, s in fills))
                )
            except BaseException:
                for chunk, _ in fills:
                    self._directory.release(chunk.key)  # never committed: dropped with its pin
                raise
            writes = []
            for (chunk, slot), ok in zip(fills, result.gathers):
                self._directory.commit(chunk.key, ok)
                if not ok:
                    self._directory.release(chunk.key)
                    continue
                self._directory.discard(self._replaced(tokens, chunk, chunks))
                self._stats.stored("host", chunk.blocks * self._block_size, self._payload_bytes(chunk))
                if not self._storage.tiers:
                    self._directory.release(chunk.key)
                    continue
                with self._writes_lock:
                    self._writes_left[chunk.key] = len(self._storage.tiers)
                writes += [
                    TierTransfer(tier, chunk.key, slot, self._payload_bytes(chunk)) for tier in self._storage.tiers
                ]
            self._executor.run(Plan(writes=tuple(writes)), on_write_done=self._write_done)
            self._stats.usage(
                "host",
                (self._pool.num_slots - self._pool.num_free) * self._pool.slot_bytes,
                self._pool.num_slots * self._pool.slot_bytes,
            )
            self._storage.record(self._stats)  # here, not in a write's callback: a tier may hold its lock there
            return self._tokens_of(cached)

    def store_async(self, tokens: Tokens, block_ids: Sequence[int] | torch.Tensor) -> Future[int]:
        """`store` on the engine's transfer thread: returns at once, with a future of what
        `store` returns. The caller keeps the KV in `block_ids` unchanged until the future
        is done. A chunk becomes visible to lookups only once its copy is complete (invariant 1)."""
        self._check_open()
        return self._transfers.submit(self.store, tokens, block_ids)

    def retrieve_async(self, tokens: Tokens, block_ids: Sequence[int] | torch.Tensor) -> Future[int]:
        """`retrieve` on the engine's transfer thread: returns at once; `block_ids` hold
        the loaded prefix once the future is done."""
        self._check_open()
        return self._transfers.submit(self.retrieve, tokens, block_ids)

    def retrieve(self, tokens: Tokens, block_ids: Sequence[int] | torch.Tensor) -> int:
        """Load the longest cached prefix of `tokens` into `block_ids`; returns its
        length in tokens. Stops at the first miss or at a chunk that fails its checks."""
        self._check_open()
        with self._stats.timer("load"):
            chunks, _ = self._hit(tokens)  # asks the remote tier, whose answer reserve_loads uses
            blocks = self._block_list(block_ids, chunks, "retrieve")
            planned = self._directory.reserve_loads([c.key for c in chunks])
            try:
                loaded = self._load(chunks, planned, blocks)
            finally:
                for plan in planned:
                    self._directory.release(plan.key)
            for chunk, plan in loaded:
                self._stats.loaded(plan.source.value, chunk.blocks * self._block_size, self._payload_bytes(chunk))
            return self._tokens_of([c for c, _ in loaded])

    def _load(
        self, chunks: list[_Chunk], planned: list[PlannedLoad], blocks: list[int]
    ) -> list[tuple[_Chunk, PlannedLoad]]:
        """Fill the planned slots that come from a lower tier, then scatter the leading
        chunks whose bytes are good into their blocks; returns those chunks."""
        reads = [
            TierTransfer(p.source, p.key, p.slot, self._payload_bytes(c))
            for c, p in zip(chunks, planned)
            if p.source is not Source.HOST
        ]
        read_ok = dict(zip((r.key for r in reads), self._executor.run(Plan(reads=tuple(reads))).reads))
        for read in reads:
            ok = read_ok[read.key]
            self._directory.commit(read.key, ok)
            if not ok:
                self._stats.failed(f"{read.tier.value}_read")
                self._forget_remote(read)
        loaded = list(itertools.takewhile(lambda cp: read_ok.get(cp[1].key, True), zip(chunks, planned)))
        self._executor.run(Plan(scatters=tuple(SlotCopy(p.slot, self._blocks_of(c, blocks)) for c, p in loaded)))
        return loaded

    def reset(self) -> bool:
        """Drop everything cached before this call, e.g. after the model's weights changed
        in place: no later lookup hits a chunk stored before it, in host memory or on
        disk, after a restart too (a new epoch enters every key; see lmcache_ext.epoch).
        Host slots not in use are freed at once, the disk files are deleted in the
        background. False, with nothing changed, when the new epoch cannot be written
        to the disk tier's directory."""
        self._check_open()
        epoch = next_epoch(self._config.local_disk)
        if epoch is None:
            return False
        self._namespace = self._namespace.with_epoch(epoch)
        self._directory.clear()
        for tier in self._storage.tiers.values():
            tier.clear()
        return True

    def stats(self) -> dict[str, Any]:
        """Counters of this engine plus the current state of its tiers."""
        self._storage.record(self._stats)
        out: dict[str, Any] = self._stats.snapshot()
        out.update(
            host_slots=self._pool.num_slots,
            host_slots_free=self._pool.num_free,
            host_chunks=self._directory.host_chunks(),
            pinned_slots=self._directory.pinned_slots(),
        )
        for source, tier in self._storage.tiers.items():
            out.update({f"{source.value}_{k}": v for k, v in tier.stats().items()})
        return out

    def flush(self) -> None:
        """Wait until every background tier write has finished."""
        self._storage.flush()

    def close(self) -> None:
        """Finish pending tier writes, then release the slot pool. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._transfers.shutdown(wait=True)  # queued stores and retrieves end first
            self._closed = True
        self._storage.close()
        self._executor.close()

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def namespace(self) -> Namespace:
        return self._namespace

    # -- helpers --

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the cache engine is closed")

    def _keys(self, tokens: Tokens) -> tuple[list[ChunkKey], int]:
        """The keys of the chunks of `tokens` this engine stores — full chunks, then with
        save_unfull_chunk the block-aligned remainder — and the blocks of that
        remainder (0 when there is none)."""
        if not self._config.save_unfull_chunk:
            return chunk_keys(tokens, self._namespace), 0
        usable = len(tokens) - len(tokens) % self._block_size
        tail_blocks = usable % self._config.chunk_size // self._block_size
        return chunk_keys(tokens[:usable], self._namespace, include_partial=True), tail_blocks

    def _chunks(self, tokens: Tokens) -> list[_Chunk]:
        keys, tail_blocks = self._keys(tokens)
        chunks = [_Chunk(key, i, self._blocks_per_chunk) for i, key in enumerate(keys)]
        if tail_blocks:
            chunks[-1] = chunks[-1]._replace(blocks=tail_blocks)
        return chunks

    def _block_list(self, block_ids: Sequence[int] | torch.Tensor, chunks: list[_Chunk], what: str) -> list[int]:
        """The blocks that hold `chunks`, checked: enough of them, in range, and no
        repeats (a repeat would make two chunks write the same block)."""
        ids = block_ids.tolist() if isinstance(block_ids, torch.Tensor) else list(block_ids)
        need = sum(c.blocks for c in chunks)
        if len(ids) < need:
            raise ValueError(
                f"{what}: len(block_ids) = {len(ids)} is too short: the tokens fill {need} blocks "
                f"of {self._block_size} tokens"
            )
        ids = ops.check_block_ids(self._kv, ids[:need]).tolist()
        seen: dict[int, int] = {}
        for i, b in enumerate(ids):
            if b in seen:
                raise ValueError(f"{what}: block_ids[{i}] = {b} repeats block_ids[{seen[b]}]")
            seen[b] = i
        return ids

    def _blocks_of(self, chunk: _Chunk, blocks: list[int]) -> tuple[int, ...]:
        start = chunk.index * self._blocks_per_chunk
        return tuple(blocks[start : start + chunk.blocks])

    def _tokens_of(self, chunks: Sequence[_Chunk]) -> int:
        return sum(c.blocks for c in chunks) * self._block_size

    def _payload_bytes(self, chunk: _Chunk) -> int:
        return self._kv.chunk_bytes(chunk.blocks)

    def _lookup(self, keys: list[ChunkKey]) -> list[Source]:
        """The directory's lookup; with a remote tier, the keys past what host and disk
        hold are first probed there (one round trip: a CacheEngine may wait on it)."""
        found = self._directory.lookup(keys)
        remote = cast("RemotePresence | None", self._storage.presence.get(Source.REMOTE))
        if remote is None or len(found) == len(keys):
            return found
        remote.probe(keys[len(found) :])
        return self._directory.lookup(keys)

    def _hit(self, tokens: Tokens) -> tuple[list[_Chunk], list[Source]]:
        """The cached chunks a load of `tokens` takes, and their tiers: the leading full
        chunks, then with save_unfull_chunk the longest partial chunk that follows them."""
        keys = chunk_keys(tokens, self._namespace)
        found = self._lookup(keys)
        chunks = [_Chunk(key, i, self._blocks_per_chunk) for i, key in enumerate(keys[: len(found)])]
        if not self._config.save_unfull_chunk:
            return chunks, found
        f = len(found)
        partials = partial_keys(
            tokens, self._namespace, start=f * self._config.chunk_size, prev_key=keys[f - 1] if f else None
        )
        remote = cast("RemotePresence | None", self._storage.presence.get(Source.REMOTE))
        if remote is not None and partials:
            remote.probe(partials)
        partial = self._directory.lookup_partial(keys[:f], partials)
        if partial is not None:
            chunks.append(_Chunk(partials[partial[0]], f, partial[0] + 1))
            found = [*found, partial[1]]
        return chunks, found

    def _replaced(self, tokens: Tokens, chunk: _Chunk, chunks: list[_Chunk]) -> list[ChunkKey]:
        """The shorter partial chunks that a stored `chunk` (full or partial) extends."""
        if not self._config.save_unfull_chunk or chunk.blocks == 1:
            return []
        start = chunk.index * self._config.chunk_size
        return partial_keys(
            tokens,
            self._namespace,
            start=start,
            end=start + (chunk.blocks - 1) * self._block_size,
            prev_key=chunks[chunk.index - 1].key if chunk.index else None,
        )

    def _forget_remote(self, read: TierTransfer) -> None:
        remote = cast("RemotePresence | None", self._storage.presence.get(Source.REMOTE))
        if read.tier is Source.REMOTE and remote is not None:
            remote.forget(read.key)

    def _write_done(self, write: TierTransfer, ok: bool) -> None:
        if ok:
            self._stats.stored(
                write.tier.value, write.nbytes // self._kv.chunk_bytes(1) * self._block_size, write.nbytes
            )
        else:
            self._stats.failed(f"{write.tier.value}_write")
        with self._writes_lock:
            self._writes_left[write.key] -= 1
            last = self._writes_left[write.key] == 0
            if last:
                del self._writes_left[write.key]
        if last:
            self._directory.release(write.key)
