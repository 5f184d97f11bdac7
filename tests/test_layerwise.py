"""Layerwise transfers (use_layerwise) on the connector's halves, with copies slowed or
broken on purpose: a layer is never ready before its copy ended, loading layer i+1
overlaps layer i's wait, a chunk saved layer by layer is byte-identical to one saved
whole, failures become load errors or invisible chunks, and nothing hangs."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: the connector runs on vLLM's connector API")

from connector_rig import CHUNK, LAYER_NAMES, Rig, first_step, hit, prompt, request, same_pages, step_output
from lmcache_ext import ops

DELAY = 0.25


def layer_copies(
    monkeypatch: pytest.MonkeyPatch, name: str, delay: float = 0.0, fail_layer: int | None = None
) -> dict[int, float]:
    """Every per-layer `ops.<name>` sleeps `delay` first and raises on `fail_layer`;
    the returned dict gets each layer's end time once its copy has returned."""
    ended: dict[int, float] = {}
    real = getattr(ops, name)

    def copy(*args, layer=None, **kwargs):
        if layer is not None:
            time.sleep(delay)
            if layer == fail_layer:
                raise RuntimeError(f"injected failure of layer {layer}")
        real(*args, layer=layer, **kwargs)
        if layer is not None:
            ended[layer] = time.monotonic()

    monkeypatch.setattr(ops, name, copy)
    return ended


def stored_rig(tokens: list[int], **kw: object) -> Rig:
    rig = Rig(use_layerwise=True, **kw)
    rig.step([(request("a", tokens), list(range(9)), 0)])
    assert hit(rig.scheduler, request("probe", tokens)) == 2 * CHUNK
    return rig


def load_plan(rig: Rig, tokens: list[int], blocks: list[int]):
    req = request("b", tokens)
    external = rig.matched(req)
    rig.scheduler.plan_load(req, (blocks,), external)
    return rig.scheduler.build_plan(
        step_output(
            new=[SimpleNamespace(req_id="b", block_ids=(blocks,), num_computed_tokens=external)],
            scheduled={"b": len(tokens) - external},
        )
    )


def test_each_layer_is_ready_only_after_its_scatter_and_the_next_one_overlaps(monkeypatch):
    tokens = prompt(2 * CHUNK + 1, seed=1)
    rig = stored_rig(tokens)
    w = rig.workers[0]
    ended = layer_copies(monkeypatch, "scatter", DELAY)
    plan = load_plan(rig, tokens, list(range(20, 29)))
    begun = time.monotonic()
    w.load(plan)
    assert time.monotonic() - begun < DELAY  # start_load_kv only starts the loads
    ready = {}
    for layer, name in enumerate(LAYER_NAMES):
        w.wait_layer(name)
        ready[layer] = time.monotonic()
    assert all(ready[layer] >= ended[layer] for layer in ready)  # never ready before its copy ended
    assert ready[0] < ended[1]  # layer 0 was handed over while layer 1 still loaded
    w.save(plan)
    assert w.take_load_errors() == set()
    rig.scheduler.apply_report(w.take_report())
    assert same_pages(rig.caches[0], list(range(20, 28)), rig.caches[0], list(range(8)))


def test_a_chunk_saved_layer_by_layer_is_byte_identical_to_one_saved_whole(tmp_path):
    tokens = prompt(2 * CHUNK + 1, seed=2)
    files = {}
    for mode, layerwise in (("whole", False), ("layers", True)):
        rig = Rig(tmp_path / mode, use_layerwise=layerwise, seed=5)
        plan = first_step(rig.scheduler, request("a", tokens), list(range(9)), len(tokens))
        w = rig.workers[0]
        w.load(plan)
        if layerwise:
            w.save_layer(plan, LAYER_NAMES[1])  # vLLM announces layer 1 only: layer 0 is gathered at the end
        w.save(plan)
        w.flush()
        rig.scheduler.apply_report(w.take_report())
        files[mode] = {
            p.relative_to(tmp_path / mode): p.read_bytes() for p in (tmp_path / mode).rglob("*") if p.is_file()
        }
    assert len(files["whole"]) >= 2 and files["whole"] == files["layers"]


def test_a_failed_layer_load_reports_the_requests_blocks_and_never_hangs(monkeypatch):
    tokens = prompt(2 * CHUNK + 1, seed=3)
    rig = stored_rig(tokens)
    w = rig.workers[0]
    layer_copies(monkeypatch, "scatter", fail_layer=0)
    blocks = list(range(20, 29))
    plan = load_plan(rig, tokens, blocks)
    w.load(plan)
    done = threading.Event()
    threading.Thread(target=lambda: ([w.wait_layer(n) for n in LAYER_NAMES], done.set()), daemon=True).start()
    assert done.wait(5), "a layer's wait hung after a failed load"
    w.save(plan)
    assert w.take_load_errors() == set(blocks[:8])
    report = w.take_report()
    assert sum(report.load_failed.values()) == 2 and not report.loaded


def test_a_failed_layer_gather_never_makes_the_chunk_visible(monkeypatch):
    tokens = prompt(2 * CHUNK + 1, seed=4)
    rig = Rig(use_layerwise=True)
    layer_copies(monkeypatch, "gather", fail_layer=1)
    rig.step([(request("a", tokens), list(range(9)), 0)])
    assert hit(rig.scheduler, request("b", tokens)) == 0


def test_at_tp2_a_chunk_is_visible_only_once_every_rank_has_every_layer(monkeypatch):
    tokens = prompt(2 * CHUNK + 1, seed=6)
    rig = Rig(tp=2, use_layerwise=True, async_save=True)
    layer_copies(monkeypatch, "gather", DELAY)
    plan = first_step(rig.scheduler, request("a", tokens), list(range(9)), len(tokens))
    fast, slow = rig.workers
    for w in rig.workers:
        w.load(plan)
        for name in LAYER_NAMES:
            w.save_layer(plan, name)
        w.save(plan)
    fast.drain()
    rig.scheduler.apply_report(fast.take_report())
    assert hit(rig.scheduler, request("b", tokens)) in (0, None)  # rank 1's layers may still be gathering
    slow.drain()
    rig.scheduler.apply_report(slow.take_report())
    assert hit(rig.scheduler, request("c", tokens)) == 2 * CHUNK


def test_the_connector_asks_for_cross_layer_blocks_and_piecewise_graphs_by_setting():
    from lmcache_ext.integration.vllm.connector import LMCacheConnectorV1Dynamic as Connector

    def vllm_config(mla=False, **extra):
        return SimpleNamespace(
            model_config=SimpleNamespace(use_mla=mla),
            kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra, kv_role="kv_both"),
        )

    assert Connector.get_required_kvcache_layout(vllm_config()) == "BLNHC"
    assert Connector.get_required_kvcache_layout(vllm_config(mla=True)) is None  # on a GPU too
    assert Connector.get_required_kvcache_layout(vllm_config(use_layerwise=True)) is None
    assert Connector.get_required_kvcache_layout(vllm_config(cross_layer_blocks=False)) is None
    assert Connector.requires_piecewise_for_cudagraph({"use_layerwise": True}) is True
    assert Connector.requires_piecewise_for_cudagraph({}) is False


def test_a_cross_layer_cache_stores_and_loads_layer_by_layer():
    import torch

    from connector_rig import BLOCK, BLOCKS, HEADS, LAYERS, WIDTH, config, geometry
    from lmcache_ext.integration.vllm.worker import WorkerSide
    from lmcache_ext.testing.kv_layouts import make_layers

    w = WorkerSide(config(use_layerwise=True), geometry(), 0)
    cache = make_layers("BLHNC", LAYERS, BLOCKS, HEADS, BLOCK, WIDTH, torch.bfloat16)
    w.register(dict(zip(LAYER_NAMES, cache)))
    tokens = prompt(CHUNK + 1, seed=7)
    rig = Rig()
    rig.workers[0].close()
    rig.workers, rig.caches = [w], [cache]
    rig.step([(request("a", tokens), [0, 1, 2, 3, 4], 0)])
    rig.step([(request("b", tokens), [10, 11, 12, 13, 14], 0)])
    assert same_pages(rig.caches[0], [10, 11, 12, 13], rig.caches[0], [0, 1, 2, 3])
    w.close()
