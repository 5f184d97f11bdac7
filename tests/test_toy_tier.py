"""A tier added from outside the package: an in-memory dict tier, registered from this
test, needs no edit anywhere else. The engine writes every stored chunk to it, and a
second engine with an empty host pool (and no disk) loads it back byte for byte,
counted under the tier's own name; the connector's halves do the same."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from lmcache_ext.config import CacheConfig
from lmcache_ext.engine import CacheEngine
from lmcache_ext.tiers import TierHoldings, TierKind, configured_tiers, register_tier
from lmcache_ext.tiers.host_buffer import byte_view
from test_engine import BLOCK, CHUNK, assert_same_blocks, new_cache, prompt

SHELF: dict[tuple[int, bytes], bytes] = {}  # (rank, key) -> payload: the "store" every process shares


class ShelfIO:
    """One rank's records on the shelf."""

    def __init__(self, rank: int) -> None:
        self._rank = rank

    def read_into(self, key: bytes, out: Any) -> bool:
        payload = SHELF.get((self._rank, key))
        view = byte_view(out, "out", writable=True)
        if payload is None or len(payload) != len(view):
            return False
        view[:] = payload
        return True

    def submit_write(self, key: bytes, payload: Any, on_done: Callable[[bool], None] | None = None) -> Future[bool]:
        SHELF[(self._rank, key)] = bytes(byte_view(payload, "payload", writable=False))
        if on_done is not None:
            on_done(True)
        future: Future[bool] = Future()
        future.set_result(True)
        return future

    def remove(self, key: bytes) -> bool:
        return SHELF.pop((self._rank, key), None) is not None

    def clear(self) -> int:
        return 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"records": sum(1 for rank, _ in SHELF if rank == self._rank)}


class ShelfHoldings(TierHoldings):
    def __init__(self, ranks: Any) -> None:
        self._ranks = list(ranks)

    def contains(self, key: bytes) -> bool:
        return all((rank, key) in SHELF for rank in self._ranks)


SHELF_TIER = TierKind(
    name="shelf",
    hit_source="external_unspecified",
    configured=lambda config: config.cache_namespace == "shelved",
    open_io=lambda setup: ShelfIO(setup.rank),
    open_holdings=lambda setup: ShelfHoldings(setup.holders),
    describe=lambda config: "shelf (in memory)",
)


@pytest.fixture
def shelf():
    unregister = register_tier(SHELF_TIER)
    SHELF.clear()
    yield SHELF
    unregister()
    SHELF.clear()


def config(**kw: object) -> CacheConfig:
    return CacheConfig(**{"chunk_size": CHUNK, "max_local_cpu_size": 0.01, "cache_namespace": "shelved", **kw})


def test_a_registered_tier_is_written_and_read_back_by_another_engine(shelf):
    assert [kind.name for kind in configured_tiers(config())] == ["shelf"]
    tokens = prompt(3 * CHUNK, seed=1)
    writer_cache = new_cache(1)
    with CacheEngine(config(), writer_cache, BLOCK) as writer:
        assert writer.store(tokens, list(range(12))) == 3 * CHUNK
        writer.flush()
        assert writer.stats()["shelf_records"] == 3 and writer.stats()["stored_tokens_shelf"] == 3 * CHUNK
    reader_cache = new_cache(2)
    with CacheEngine(config(), reader_cache, BLOCK) as reader:
        assert reader.lookup(tokens) == 3 * CHUNK
        assert reader.retrieve(tokens, list(range(20, 32))) == 3 * CHUNK
        assert_same_blocks(reader_cache, list(range(20, 32)), writer_cache, list(range(12)))
        assert reader.stats()["loaded_tokens_shelf"] == 3 * CHUNK


def test_without_its_config_the_tier_is_not_opened(shelf):
    with CacheEngine(config(cache_namespace=""), new_cache(3), BLOCK) as engine:
        assert engine.store(prompt(CHUNK, seed=3), list(range(4))) == CHUNK
        engine.flush()
    assert SHELF == {}


def test_a_second_tier_of_the_same_name_is_refused(shelf):
    with pytest.raises(ValueError, match="a tier named 'shelf' is registered already"):
        register_tier(SHELF_TIER)


def test_the_connector_halves_load_from_a_registered_tier(shelf):
    pytest.importorskip("vllm", reason="vLLM is not installed: the connector runs on vLLM's connector API")
    from connector_rig import Rig, request, same_pages
    from connector_rig import prompt as rig_prompt

    tokens = rig_prompt(2 * 64 + 1, seed=5)
    writer = Rig(cache_namespace="shelved")
    writer.step([(request("w", tokens), list(range(9)), 0)])
    reader = Rig(seed=9, cache_namespace="shelved")
    b = request("b", tokens)
    assert reader.matched(b) == 2 * 64 and reader.scheduler.hit_sources(b, 2 * 64) == {"shelf": 2 * 64}
    reader.step([(b, list(range(20, 29)), 0)])
    assert reader.workers[0].take_load_errors() == set()
    assert same_pages(reader.caches[0], list(range(20, 28)), writer.caches[0], list(range(8)))
    assert len(SHELF) == 2
