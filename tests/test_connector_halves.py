"""The connector's scheduler and worker halves driven directly, without an engine:
stores, hits, partial and shared loads, TP ranks, failures. Fast and exact."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: the connector runs on vLLM's connector API")
import torch

from connector_rig import (
    BLOCK,
    BLOCKS,
    CHUNK,
    HEADS,
    LAYERS,
    PAGE,
    WIDTH,
    FullAttentionSpec,
    Rig,
    cached_step,
    config,
    fake_vllm,
    first_step,
    geometry,
    hit,
    loads_of,
    prompt,
    reads_of,
    request,
    same_pages,
    step_output,
)
from lmcache_ext.config import CacheConfig
from lmcache_ext.geometry import Geometry, shard_root
from lmcache_ext.integration.vllm.metadata import AsyncLoad, LoadItem, StepPlan, WorkerReport
from lmcache_ext.integration.vllm.scheduler import SchedulerSide
from lmcache_ext.integration.vllm.shards import fit_to_groups, geometry_from_vllm
from lmcache_ext.integration.vllm.worker import WorkerSide
from lmcache_ext.keys import chunk_keys
from lmcache_ext.kv_groups import FULL, LOCAL, MAMBA, SLIDING, KVGroup
from lmcache_ext.plans import SlotCopy, Source, TierTransfer
from lmcache_ext.testing.kv_layouts import make_layers, page_view


def test_store_then_hit_loads_exact_bytes_leaving_the_last_token():
    rig = Rig()
    tokens = prompt(3 * CHUNK, seed=1)  # exactly 3 chunks: a hit must leave one token to compute
    plan = rig.step([(request("a", tokens), list(range(12)), 0)])
    assert [len(s.copy.block_ids) for s in plan.stores] == [4, 4, 4] and not plan.loads
    b = request("b", tokens)
    assert hit(rig.scheduler, b, 0) == 3 * CHUNK - BLOCK
    plan = rig.step([(b, list(range(20, 32)), 0)])
    assert [(k.copy.first, len(k.copy.block_ids)) for k in plan.loads] == [(0, 4), (0, 4), (0, 3)]
    assert not plan.stores  # all three chunks are present
    assert same_pages(rig.caches[0], list(range(20, 31)), rig.caches[0], list(range(11)))
    assert rig.scheduler.stats() == {"host_chunks": 3, "pinned_slots": 0}


def test_a_local_prefix_hit_is_not_loaded_again():
    rig = Rig()
    tokens = prompt(2 * CHUNK + 10, seed=2)
    rig.step([(request("a", tokens), list(range(9)), 0)])
    b = request("b", tokens)
    assert hit(rig.scheduler, b, 3 * BLOCK) == 2 * CHUNK - 3 * BLOCK
    before = page_view(rig.caches[0][0])[[30, 31, 32]].clone()
    plan = rig.step([(b, list(range(30, 39)), 3 * BLOCK)])
    assert [(k.copy.first, k.copy.block_ids) for k in plan.loads] == [(3, (33,)), (0, (34, 35, 36, 37))]
    assert torch.equal(page_view(rig.caches[0][0])[[30, 31, 32]], before)
    assert same_pages(rig.caches[0], list(range(33, 38)), rig.caches[0], list(range(3, 8)))


def test_disk_hits_load_in_the_background_and_a_second_request_waits_for_the_promotion(tmp_path):
    rig = Rig(tmp_path)
    tokens = prompt(2 * CHUNK + 1, seed=3)
    rig.step([(request("a", tokens), list(range(9)), 0)])
    source = [t.clone() for t in rig.caches[0]]
    for w in rig.workers:
        w.close()
    fresh = Rig(tmp_path, seed=10)  # a new engine: empty host tier, same disk
    b, c = request("b", tokens), request("c", tokens)
    assert fresh.scheduler.num_new_matched_tokens(b, 0) == (2 * CHUNK, True)  # from disk: in the background
    fresh.scheduler.plan_load(b, (list(range(10, 19)),), 2 * CHUNK)
    assert hit(fresh.scheduler, c) is None  # its chunks are being read for b: ask again, do not read twice
    plan = fresh.run(fresh.scheduler.build_plan(step_output()))
    assert [len(job.items) for job in plan.async_loads] == [2] and len(reads_of(plan)) == 2 and not plan.loads
    assert fresh.recved == {"b"}
    assert same_pages(fresh.caches[0], list(range(10, 18)), source, list(range(8)))
    assert fresh.scheduler.num_new_matched_tokens(c, 0) == (2 * CHUNK, False)  # host hits now: before the forward
    plan = fresh.step([(c, list(range(20, 29)), 0)])
    assert len(plan.loads) == 2 and not plan.async_loads
    assert same_pages(fresh.caches[0], list(range(20, 28)), source, list(range(8)))
    assert fresh.scheduler.stats() == {"host_chunks": 2, "pinned_slots": 0}


def test_a_bad_disk_file_becomes_load_errors_then_is_stored_again(tmp_path):
    rig = Rig(tmp_path)
    tokens = prompt(2 * CHUNK + 1, seed=4)
    rig.step([(request("a", tokens), list(range(9)), 0)])
    for w in rig.workers:
        w.close()
    key = chunk_keys(tokens, geometry().namespace)[1]
    path = shard_root(tmp_path / "kv", 0) / key.hex()[:2] / key.hex()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    fresh = Rig(tmp_path, seed=20)
    b = request("b", tokens)
    plan = fresh.step([(b, list(range(10, 19)), 0)])
    assert len(loads_of(plan)) == 2 and fresh.recved == {"b"}
    assert fresh.workers[0].take_load_errors() == {14, 15, 16, 17}
    assert not path.exists()
    # vLLM recomputes those blocks; the next step stores the chunk again
    plan = fresh.scheduler.build_plan(cached_step("b", 2 * CHUNK, None, 1))
    assert [k.key for k in plan.stores] == [key]


def test_tp_ranks_store_their_own_shards_and_a_chunk_waits_for_every_rank(tmp_path):
    rig = Rig(tmp_path, tp=2)
    tokens = prompt(CHUNK + 1, seed=5)
    plan = first_step(rig.scheduler, request("a", tokens), list(range(5)), CHUNK + 1)
    rig.workers[0].save(plan)
    rig.flush()
    rig.scheduler.apply_report(rig.workers[0].take_report())
    assert hit(rig.scheduler, request("b", tokens), 0) is None  # rank 1 has not stored it: ask again soon
    rig.workers[1].save(plan)
    rig.flush()
    rig.scheduler.apply_report(rig.workers[1].take_report())
    assert hit(rig.scheduler, request("c", tokens), 0) == CHUNK
    key = chunk_keys(tokens, geometry(2).namespace)[0]
    for w in rig.workers:
        w.close()
    restarted = SchedulerSide(config(tmp_path), geometry(2))  # sees the disk only
    assert hit(restarted, request("d", tokens), 0) == CHUNK
    (shard_root(tmp_path / "kv", 1) / key.hex()[:2] / key.hex()).unlink()
    assert hit(restarted, request("e", tokens), 0) == 0  # one rank's shard is gone
    assert (
        shard_root(tmp_path / "kv", 0) / key.hex()[:2] / key.hex()
    ).exists()  # each rank's shard in its own directory


def chunk_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and len(p.name) == 32] if root.exists() else []


def test_a_replicated_cache_writes_one_file_per_chunk_that_every_rank_at_any_tp_size_reads(tmp_path):
    """MLA: every rank holds the same latent, so rank 0 alone writes and the TP size
    leaves the namespace."""
    assert geometry(2, replicas=2).namespace == geometry(1).namespace == geometry(4, replicas=4).namespace
    assert geometry(2, replicas=2).namespace != geometry(2).namespace == geometry(4, replicas=2).namespace
    rig = Rig(tmp_path, tp=2, replicas=2)
    tokens = prompt(2 * CHUNK + 1, seed=6)
    rig.step([(request("a", tokens), list(range(9)), 0)])
    rig.flush()
    assert hit(rig.scheduler, request("b", tokens), 0) == 2 * CHUNK  # every rank reported: a host hit
    for w in rig.workers:
        w.close()
    assert len(chunk_files(shard_root(tmp_path / "kv", 0))) == 2 and not chunk_files(shard_root(tmp_path / "kv", 1))
    for tp in (1, 2):  # a fresh engine at either TP size: every rank reads rank 0's files
        fresh = Rig(tmp_path, tp=tp, replicas=tp, seed=30 + tp)
        c = request("c", tokens)
        plan = fresh.step([(c, list(range(10, 19)), 0)])
        assert c.external == 2 * CHUNK and len(reads_of(plan)) == 2 and fresh.recved == {"c"}
        for cache in fresh.caches:
            assert same_pages(cache, list(range(10, 18)), rig.caches[0], list(range(8)))
        assert not chunk_files(shard_root(tmp_path / "kv", 1))  # rank 1 neither rewrote nor deleted anything
        for w in fresh.workers:
            w.close()


def test_replicated_kv_heads_are_written_once_per_shard_and_read_at_another_tp_size(tmp_path):
    """2 KV heads at TP=4: vLLM gives ranks 0 and 1 one head, ranks 2 and 3 the other.
    The first of each pair writes its shard, and an engine at TP=2 (a head per rank)
    reads the same two shards."""
    rig = Rig(tmp_path, tp=4, replicas=2)
    tokens = prompt(CHUNK + 1, seed=7)
    rig.step([(request("a", tokens), list(range(5)), 0)])
    rig.flush()
    for w in rig.workers:
        w.close()
    assert [len(chunk_files(shard_root(tmp_path / "kv", r))) for r in range(4)] == [1, 1, 0, 0]
    fresh = Rig(tmp_path, tp=2, seed=40)
    b = request("b", tokens)
    fresh.step([(b, list(range(10, 15)), 0)])
    assert b.external == CHUNK
    for rank in (0, 1):  # shard r: rank r here, ranks 2r and 2r + 1 there
        assert same_pages(fresh.caches[rank], list(range(10, 14)), rig.caches[2 * rank], list(range(4)))
    for w in fresh.workers:
        w.close()


def test_report_aggregation_sums_ranks():
    a = WorkerReport()
    a.stored[b"k" * 16] += 1
    b = WorkerReport()
    b.stored[b"k" * 16] += 1
    b.written[b"k" * 16] += 1
    both = a.aggregate(b)
    assert both.stored[b"k" * 16] == 2 and both.written[b"k" * 16] == 1 and not both.is_empty()
    assert WorkerReport().is_empty()


def test_a_worker_refuses_caches_that_do_not_match_the_config():
    w = WorkerSide(config(), geometry(), 0)
    wrong = make_layers("LBHNC", LAYERS + 1, BLOCKS, HEADS, BLOCK, WIDTH, torch.bfloat16)
    with pytest.raises(ValueError, match=r"got 3 layers of 2048-byte pages; the KV cache config says 2 layers"):
        w.register({f"l{i}": t for i, t in enumerate(wrong)})


def test_a_hybrids_failed_background_load_is_reported_per_request_not_by_block(tmp_path):
    """With several KV cache groups vLLM raises on block-level load errors: the worker
    reports the request (failed_recving) and no block ids."""
    groups = (
        KVGroup(SLIDING, ("l0", "l2"), BLOCK, PAGE, window=BLOCK + 1),
        KVGroup(FULL, ("l1", "l3"), BLOCK, PAGE),
    )
    g = Geometry.of_cache(
        model="m", revision="", dtype="bfloat16", layout="LBHNC", block_size=BLOCK,
        page_bytes=PAGE, num_layers=4, chunk_size=CHUNK, groups=groups,
    )  # fmt: skip
    w = WorkerSide(config(tmp_path), g, 0)
    layers = make_layers("LBHNC", 2, BLOCKS, HEADS, BLOCK, WIDTH, torch.bfloat16)
    w.register({"l0": layers[0], "l1": layers[0], "l2": layers[1], "l3": layers[1]})
    tables = ([0, 0, 0, 5], [6, 7, 8, 9])
    parts = g.group_pages(tables, 0, 4, 0, 4, load=True)
    copy = SlotCopy(0, tuple(tables[0]), 4, 0, parts)
    missing = LoadItem(1, b"k" * 16, copy, TierTransfer(Source.DISK, b"k" * 16, 0, g.chunk_bytes(4, 0)), Source.DISK)
    w.load(StepPlan(async_loads=[AsyncLoad("a", (missing,))]))
    w.drain()
    assert w.take_failed_loads() == {"a"} and w.take_load_errors() == set()
    assert w.get_finished(set()) == (None, {"a"})
    w.close()


def decode_step(
    rig: Rig, req: SimpleNamespace, computed: int, new_blocks: list[int] | None, resumed: bool = False
) -> StepPlan:
    """A step that computes one more token of a running (or resumed) request."""
    return rig.scheduler.build_plan(cached_step(req.request_id, computed, new_blocks, 1, resumed))


@pytest.mark.parametrize("save_decode", [False, True])
def test_decode_tokens_are_stored_only_with_save_decode_cache(save_decode):
    rig = Rig(save_decode_cache=save_decode)
    tokens = prompt(CHUNK + 10, seed=6)
    a = request("a", tokens)
    rig.step([(a, list(range(5)), 0)])
    tokens.extend(prompt(2 * CHUNK, seed=7)[: CHUNK + 10])  # decoding grows the request's token list
    plan = decode_step(rig, a, 2 * CHUNK - 1, [5, 6, 7, 8])
    assert [k.copy.block_ids for k in plan.stores] == ([(4, 5, 6, 7)] if save_decode else [])


def test_a_resumed_request_replaces_its_block_list():
    rig = Rig()
    tokens = prompt(2 * CHUNK + 5, seed=8)
    a = request("a", tokens)
    a.num_prompt_tokens = len(tokens)
    plan = first_step(rig.scheduler, a, list(range(9)), CHUNK)  # chunked prefill: the first chunk only
    assert [k.copy.block_ids for k in plan.stores] == [(0, 1, 2, 3)]
    # preempted, then resumed with all new blocks: the second chunk comes from those
    plan = decode_step(rig, a, 2 * CHUNK - 1, list(range(40, 49)), resumed=True)
    assert [k.copy.block_ids for k in plan.stores] == [(44, 45, 46, 47)]


def test_an_untested_vllm_version_fails_at_start_up_saying_what_is_supported():
    from lmcache_ext.integration.vllm.connector import check_vllm_version

    check_vllm_version("0.32.0")
    check_vllm_version("0.33.1")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0.32 and 0.33 .*this is vLLM 0.34.0"):
        check_vllm_version("0.34.0")
    with pytest.raises(RuntimeError, match=r"this is vLLM 0.3"):
        check_vllm_version("0.3")


def spec(block_size: int) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=block_size, dtype=torch.bfloat16, page_size_bytes=PAGE)


def test_geometry_from_vllm_and_what_it_refuses():
    g = geometry_from_vllm(*fake_vllm([spec(BLOCK)], tp=2), config())
    assert (g.block_size, g.blocks_per_chunk, g.num_layers, g.page_bytes, g.tp_size) == (BLOCK, 4, 2, PAGE, 2)
    assert (g.namespace.layout, g.namespace.dtype, g.namespace.tp_rank) == ("LBHNC", "bfloat16", 0)
    with pytest.raises(ValueError, match=r"chunk_size = 64 is not a multiple of block_size = 48"):
        geometry_from_vllm(*fake_vllm([spec(48)], tp=2), config())


@pytest.mark.parametrize(
    ("kv_heads", "tp", "mla", "replicas"), [(2, 4, False, 2), (1, 2, False, 2), (4, 2, False, 1), (8, 4, True, 4)]
)
def test_ranks_that_vllm_gives_the_same_kv_are_replicas(kv_heads, tp, mla, replicas):
    vllm_config, kv_cache_config = fake_vllm([spec(BLOCK)], tp=tp)
    vllm_config.model_config.get_total_num_kv_heads = lambda: kv_heads
    vllm_config.model_config.use_mla = mla
    g = geometry_from_vllm(vllm_config, kv_cache_config, config())
    shards = 1 if mla else max(kv_heads, tp // replicas)
    assert (g.replicas, g.writers, g.namespace.tp_size, g.namespace.kv_heads) == (replicas, shards, 1, shards)
    assert [list(g.shards_of(r)) for r in range(tp)] == [
        list(range(r // replicas * g.heads, (r // replicas + 1) * g.heads)) for r in range(tp)
    ]
    with pytest.raises(ValueError, match=r"replicas = 3: expected a divisor of tp_size = 4"):
        Geometry.of_cache(
            model="m",
            revision="",
            dtype="bfloat16",
            layout="x",
            block_size=16,
            page_bytes=64,
            num_layers=2,
            chunk_size=64,
            tp_size=4,
            replicas=3,
        )


def test_a_mamba_hybrid_fits_its_chunks_to_the_block_that_vllm_keeps_state_per():
    from vllm.v1 import kv_cache_interface as spec

    shapes = dict(shapes=((3, 768), (2, 128, 128)), dtypes=(torch.bfloat16, torch.float32), page_size_padded=196608)
    mamba = spec.MambaSpec(block_size=384, mamba_cache_mode="align", **shapes)
    full = spec.FullAttentionSpec(block_size=384, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    config = CacheConfig(chunk_size=256, max_local_cpu_size=0.001)
    fitted, line = fit_to_groups(config, fake_vllm([mamba, full])[1])
    assert (fitted.chunk_size, fitted.save_unfull_chunk) == (384, False)
    assert line == (
        "the model keeps Mamba-type state per 384-token block: chunk_size 256 -> 384, save_unfull_chunk off "
        "(a hit ends where vLLM kept a state: at a chunk's end)"
    )
    g = geometry_from_vllm(*fake_vllm([mamba, full]), fitted)
    assert g.keeps_state and g.groups[0] == KVGroup(MAMBA, ("l0", "l1"), 384, 135680)  # the state, not its padding
    assert g.state_bytes == 2 * 135680 and g.blocks_per_chunk == 1 and g.namespace.kv_groups == "mamba135680Bx2+fullx2"
    assert fit_to_groups(fitted, fake_vllm([mamba, full])[1]) == (fitted, None)
    assert fit_to_groups(config, fake_vllm([full])[1]) == (config, None)
    larger, _ = fit_to_groups(dataclasses.replace(config, chunk_size=1536), fake_vllm([mamba, full])[1])
    assert larger.chunk_size == 384  # a hit may end at every block that vLLM keeps a state in
    checkpointed = dataclasses.replace(mamba, num_prefill_checkpoint_blocks=1, prefill_checkpoint_alignment=1)
    assert geometry_from_vllm(*fake_vllm([checkpointed, full]), fitted).keeps_state  # as vLLM 0.32's Mamba2 mixer


def test_vllms_groups_become_ours_and_what_cannot_be_kept_exactly_is_refused():
    from vllm.v1 import kv_cache_interface as spec

    attn = dict(num_kv_heads=2, head_size=64, dtype=torch.float32)
    sliding = spec.SlidingWindowSpec(block_size=128, sliding_window=128, **attn)
    full = spec.FullAttentionSpec(block_size=128, **attn)
    config = CacheConfig(chunk_size=256, max_local_cpu_size=0.001)
    g = geometry_from_vllm(*fake_vllm([sliding, full]), config)
    assert g is not None and [(x.kind, x.window, x.layer_names) for x in g.groups] == [
        (SLIDING, 128, ("l0", "l1")),
        (FULL, 0, ("l1.0", "l1.1")),
    ]
    assert g.namespace.kv_groups == "sliding128x2+fullx2" and g.num_layers == 4
    assert g.chunk_bytes(2, chunk=1) == 2 * 2 * full.page_size_bytes + 2 * 1 * sliding.page_size_bytes
    one = geometry_from_vllm(*fake_vllm([full]), config)
    assert one is not None and not one.hybrid and one.namespace.kv_groups == ""  # as without HMA
    local = spec.ChunkedLocalAttentionSpec(block_size=128, attention_chunk_size=512, **attn)
    g = geometry_from_vllm(*fake_vllm([local, full]), config)
    assert g is not None and g.groups[0].kind == LOCAL and g.groups[0].window == 512
    mamba = spec.MambaSpec(block_size=128, shapes=((4, 8), (2, 8, 8)), dtypes=(torch.float32, torch.float32))
    with pytest.raises(
        ValueError,
        match=r"KV cache group 0 \(2 layers from l0\) has a MambaSpec: MambaSpec\(.*keeps full.*mamba_cache_mode "
        r"is 'none': keep vLLM's prefix cache on",
    ):
        geometry_from_vllm(*fake_vllm([mamba, full]), config)
    speculative = dataclasses.replace(mamba, mamba_cache_mode="align", num_speculative_blocks=1)
    with pytest.raises(ValueError, match=r"has a MambaSpec: .* in vLLM's 'align' cache mode without speculative"):
        geometry_from_vllm(*fake_vllm([speculative, full]), config)
    smaller = spec.SlidingWindowSpec(block_size=64, sliding_window=128, **attn)
    g = geometry_from_vllm(*fake_vllm([full, smaller]), config)  # vLLM grew the full group's block 2x
    assert (g.block_size, g.blocks_per_chunk, g.base_group, g.ratio(g.groups[1])) == (128, 2, 0, 2)
    assert g.namespace.kv_groups == "fullx2+sliding128x2@64"
    odd = spec.FullAttentionSpec(block_size=96, **attn)
    with pytest.raises(ValueError, match=r"block sizes \[128, 96\]; lmcache_ext needs each to divide the largest"):
        geometry_from_vllm(*fake_vllm([full, odd]), config)
    with pytest.raises(ValueError, match=r"block sizes \[128, 64\]; .* one block size beside Mamba-type groups"):
        geometry_from_vllm(*fake_vllm([dataclasses.replace(mamba, mamba_cache_mode="align"), smaller]), config)
