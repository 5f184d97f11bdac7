"""Hybrid models' chunks: which blocks each KV cache group keeps (vLLM's own rule), the
pages a store gathers and a load scatters per group, byte for byte through the executor
on groups that share memory, and the planner's rules for hybrids (hits end where chunks
end, loads run in the background, a chunk whose window blocks vLLM freed is not stored),
and Mamba-type state: a record per state vLLM kept at a chunk's end, a hit ending only
where one is stored, its load into the block vLLM gave the hit's last block."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lmcache_ext import _C, ops
from lmcache_ext.config import CacheConfig
from lmcache_ext.engine import CacheEngine
from lmcache_ext.executor import TransferExecutor
from lmcache_ext.geometry import Geometry
from lmcache_ext.keys import state_key
from lmcache_ext.kv_groups import FULL, LOCAL, MAMBA, SLIDING, KVGroup, layout_of
from lmcache_ext.memory import HostSlotPool
from lmcache_ext.planner import ChunkPlanner
from lmcache_ext.plans import GroupPages, Plan, SlotCopy, StepPlan, WorkerReport

BS, PAGE, BLOCKS = 4, 64, 32  # tokens per block, bytes per page, blocks in the toy cache
CHUNK = 2 * BS
SLIDE = KVGroup(SLIDING, ("l0", "l2"), BS, PAGE, window=BS + 1)  # a hit reads one block back
FULLG = KVGroup(FULL, ("l1", "l3"), BS, PAGE)
# The copies on the CPU twin, and on the CUDA kernels (a `gpu` test: benchmarks/gpu_check.sh)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not ops.cuda_available(), reason="needs a CUDA device and build")],
    ),
]
STATE, PADDED = 48, 80  # a Mamba-type layer's state bytes, and its page in memory (vLLM pads it)
MAMBAG = KVGroup(MAMBA, ("m0", "m2"), BS, STATE)


def geometry(*groups: KVGroup) -> Geometry:
    return Geometry.of_cache(
        model="m",
        revision="",
        dtype="uint8",
        layout="toy",
        block_size=BS,
        page_bytes=PAGE,
        num_layers=sum(g.num_layers for g in groups),
        chunk_size=CHUNK,
        groups=groups,
    )


# -- what a group keeps --


@pytest.mark.parametrize("window", [5, 8, 9, 127, 128, 129, 300])
@pytest.mark.parametrize("kind", [SLIDING, LOCAL])
def test_a_chunk_keeps_the_blocks_that_vllm_keeps_real_after_a_hit_ending_there(kind, window):
    managers = pytest.importorskip("vllm.v1.core.single_type_kv_cache_manager")
    if kind == SLIDING:
        manager = SimpleNamespace(sliding_window=window, extra_retained_tokens=0)
        skipped = managers.SlidingWindowManager.get_num_skipped_tokens
    else:
        manager = SimpleNamespace(attention_chunk_size=window)
        skipped = managers.ChunkedLocalAttentionManager.get_num_skipped_tokens
    group = KVGroup(kind, ("a",), BS, PAGE, window)
    for end in range(1, 120):
        # vLLM pads the skipped blocks of a hit of `end` blocks with null blocks
        first_real = skipped(manager, end * BS) // BS
        for blocks in range(1, min(end, 9) + 1):
            real_inside = sum(1 for p in range(end - blocks, end) if p >= first_real)
            assert group.kept_blocks(end, blocks) == real_inside


def test_a_group_names_a_kind_and_a_window_that_fit():
    with pytest.raises(ValueError, match=r"kind = 'ssm': expected one of full, sliding, local, mamba"):
        KVGroup("ssm", ("a",), BS, PAGE)
    with pytest.raises(ValueError, match=r"window = 4 for a mamba group: expected 0 for full and mamba"):
        KVGroup(MAMBA, ("a",), BS, PAGE, 4)
    with pytest.raises(ValueError, match=r"window = 0 for a sliding group: expected 0 for full and mamba, > 0"):
        KVGroup(SLIDING, ("a",), BS, PAGE)
    with pytest.raises(ValueError, match=r"window = 8 for a full group"):
        KVGroup(FULL, ("a",), BS, PAGE, 8)


def test_the_group_layout_enters_the_namespace_only_for_hybrids():
    assert layout_of((FULLG,)) == ""
    assert layout_of((SLIDE, FULLG)) == "sliding5x2+fullx2"
    plain, hybrid = geometry(FULLG), geometry(SLIDE, FULLG)
    assert not plain.hybrid and plain.namespace.kv_groups == ""
    assert hybrid.hybrid and hybrid.namespace.kv_groups == "sliding5x2+fullx2"
    assert plain.namespace.fingerprint != hybrid.namespace.fingerprint


def test_a_sliding_windows_chunk_holds_fewer_bytes():
    g = geometry(SLIDE, FULLG)
    assert g.chunk_bytes(2, chunk=3) == 2 * 2 * PAGE + 2 * 1 * PAGE  # full: both blocks; sliding: the last
    assert g.chunk_bytes(2) == 2 * 2 * PAGE + 2 * 1 * PAGE  # the most any chunk of two blocks holds
    assert geometry(FULLG).chunk_bytes(2) == 2 * 2 * PAGE


# -- the pages of a copy --


def test_a_store_gathers_each_groups_kept_blocks_and_refuses_freed_ones():
    g = geometry(SLIDE, FULLG)
    tables = ([1, 2, 3, 4], [5, 6, 7, 8])
    parts = g.group_pages(tables, 1, 2, 0, 2, load=False, computed=0)
    assert parts is not None
    (slide, full) = parts
    assert (slide.group, slide.block_ids, slide.section, slide.section_blocks, slide.first) == (0, (4,), 0, 1, 0)
    assert (full.group, full.block_ids, full.section, full.section_blocks) == (1, (7, 8), 2 * PAGE, 2)
    # once 16 tokens are computed vLLM frees the sliding group's blocks 0..2: chunk 0's kept block is gone
    assert g.group_pages(tables, 0, 2, 0, 2, load=False, computed=16) is None
    assert g.group_pages(tables, 1, 2, 0, 2, load=False, computed=16) is not None
    assert g.group_pages(([1, 2, 0, 4], [5, 6, 7, 8]), 1, 2, 0, 2, load=False) is not None  # block 2 is not kept
    assert g.group_pages(([1, 2, 3, 0], [5, 6, 7, 8]), 1, 2, 0, 2, load=False) is None
    assert geometry(FULLG).group_pages(tables, 1, 2, 0, 2, load=False) == ()


def test_a_load_skips_null_blocks_and_refuses_a_real_block_the_chunk_does_not_keep():
    g = geometry(SLIDE, FULLG)
    hit = ([0, 0, 0, 11], [12, 13, 14, 15])  # what vLLM hands a hit of 16 tokens
    first = g.group_pages(hit, 0, 2, 0, 2, load=True)
    assert first is not None and [(p.group, p.block_ids) for p in first] == [(1, (12, 13))]
    last = g.group_pages(hit, 1, 2, 0, 2, load=True)
    assert last is not None and [(p.group, p.block_ids) for p in last] == [(0, (11,)), (1, (14, 15))]
    # a hit ending mid-chunk would leave block 2 of the sliding group unwritten
    assert g.group_pages(([0, 0, 10, 11], [12, 13, 14, 15]), 1, 2, 0, 2, load=True) is None


@pytest.mark.parametrize("device", DEVICES)
def test_pages_of_groups_sharing_memory_round_trip_through_the_executor(device):
    g = geometry(SLIDE, FULLG)
    memory = [torch.randint(0, 256, (BLOCKS, PAGE), dtype=torch.uint8, device=device) for _ in range(2)]
    kv = ops.PagedGroups(tuple(ops.PagedLayers.from_tensors(memory) for _ in g.groups))  # one memory, two tables
    before = [m.clone() for m in memory]
    pool = HostSlotPool(g.chunk_bytes(2), 4, pin="never" if device == "cpu" else "always")
    executor = TransferExecutor(kv, pool, {})
    tables = ([1, 2, 3, 4], [5, 6, 7, 8])
    stores = [
        SlotCopy(c, tuple(tables[0][2 * c : 2 * c + 2]), 0, 0, g.group_pages(tables, c, 2, 0, 2, load=False))
        for c in (0, 1)
    ]
    assert all(executor.run(Plan(gathers=tuple(stores))).gathers)
    hit = ([0, 0, 0, 20], [21, 22, 23, 24])
    loads = [
        SlotCopy(c, tuple(hit[0][2 * c : 2 * c + 2]), 2, 0, g.group_pages(hit, c, 2, 0, 2, load=True)) for c in (0, 1)
    ]
    assert all(executor.run(Plan(scatters=tuple(loads))).scatters)
    synchronize(device)
    for layer in range(2):
        assert torch.equal(memory[layer][20], before[layer][4])  # the sliding group's last block
        assert torch.equal(memory[layer][21:25], before[layer][5:9])  # the full group's four
        untouched = [b for b in range(BLOCKS) if b not in (20, 21, 22, 23, 24)]
        assert torch.equal(memory[layer][untouched], before[layer][untouched])  # the null block 0 too
    assert g.copy_bytes(loads[0]) == 2 * 2 * PAGE and g.copy_bytes(loads[1]) == 3 * 2 * PAGE
    assert [kv.layer(i) for i in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]  # layerwise copies: group order
    pool.view(1).zero_()
    executor.copy_layer("gather", stores[1:], 2)  # the full group's first layer only
    synchronize(device)
    slot = pool.view(1)
    assert torch.equal(slot[2 * PAGE : 4 * PAGE], before[0][7:9].reshape(-1).cpu())
    assert not slot[: 2 * PAGE].any() and not slot[4 * PAGE :].any()
    executor.close()


def synchronize(device: str) -> None:
    """Wait for the executor's copies (on a CUDA cache they run on its stream)."""
    if device == "cuda":
        torch.cuda.synchronize()


# -- the planner's rules for hybrids --


def planner(g: Geometry, chunk: int = CHUNK) -> ChunkPlanner:
    config = CacheConfig(chunk_size=chunk, max_local_cpu_size=0.001)
    return ChunkPlanner(config, g, _C.HostSlotPool(1, 8, pin="never"), {})


def stored(p: ChunkPlanner, plan: StepPlan) -> None:
    report = WorkerReport()
    for item in plan.stores:
        report.stored[item.id] += 1
    p.apply_report(report)


def test_a_hybrid_hit_ends_where_a_chunk_ends_and_loads_in_the_background():
    p = planner(geometry(SLIDE, FULLG))
    tokens = list(range(100, 100 + 3 * CHUNK))
    req = p.request("a", tokens, len(tokens))
    plan = StepPlan()
    p.plan_stores(req, ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]), len(tokens), plan)
    assert len(plan.stores) == 3 and plan.stores[0].nbytes == 3 * 2 * PAGE
    stored(p, plan)
    longer = tokens + [1, 2, 3]
    hit = p.find_hit(p.request("b", longer, len(longer)), 0, 3 * CHUNK)  # a plain model would hit to the limit
    assert hit is not None and hit.tokens == 3 * CHUNK and hit.load_async
    cut = p.find_hit(p.request("c", longer, len(longer)), 0, 3 * CHUNK - BS)
    assert cut is not None and cut.tokens == 2 * CHUNK
    plain = planner(geometry(FULLG))
    req = plain.request("a", tokens, len(tokens))
    plan = StepPlan()
    plain.plan_stores(req, ([1, 2, 3, 4, 5, 6],), len(tokens), plan)
    stored(plain, plan)
    hit = plain.find_hit(plain.request("c", longer, len(longer)), 0, 3 * CHUNK - BS)
    assert hit is not None and hit.tokens == 3 * CHUNK - BS and not hit.load_async


def test_a_hybrid_chunk_computed_before_its_window_blocks_were_freed_is_not_stored():
    p = planner(geometry(SLIDE, FULLG))
    tokens = list(range(100, 100 + 3 * CHUNK))
    req = p.request("a", tokens, len(tokens))
    plan = StepPlan()
    # chunks 0 and 1 were computed in earlier steps: vLLM freed chunk 0's sliding block
    p.plan_stores(req, ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]), len(tokens), plan, computed_before=2 * CHUNK)
    assert [item.copy.block_ids for item in plan.stores] == [(3, 4), (5, 6)]
    assert p.stored_extent(req) == (0, None)  # what a prefill instance names: no hit reaches past chunk 0


# -- CacheEngine --


def test_an_engine_takes_per_group_kv_and_a_fresh_one_loads_each_groups_pages_from_disk(tmp_path):
    config = CacheConfig(
        chunk_size=CHUNK, max_local_cpu_size=0.001, local_disk=str(tmp_path / "kv"), max_local_disk_size=0.01
    )
    memory = [torch.randint(0, 256, (BLOCKS, PAGE), dtype=torch.uint8) for _ in range(2)]
    views = {"l0": memory[0], "l1": memory[0], "l2": memory[1], "l3": memory[1]}  # groups share memory
    tokens = list(range(7, 7 + 3 * CHUNK))
    before = [m.clone() for m in memory]
    with CacheEngine(config, views, BS, groups=(SLIDE, FULLG)) as first:
        assert first.namespace.kv_groups == "sliding5x2+fullx2"
        assert first.store(tokens, ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12])) == 3 * CHUNK
        assert first.stats()["stored_bytes_host"] == 3 * (2 * 2 * PAGE + 2 * PAGE)
        with pytest.raises(ValueError, match=r"block_ids must be 2 lists, one per KV cache group"):
            first.store(tokens, [1, 2, 3, 4, 5, 6])
        with pytest.raises(ValueError, match=r"len\(block_ids\[1\]\) = 2 is too short: the tokens fill 6 blocks"):
            first.store(tokens, ([1, 2, 3, 4, 5, 6], [7, 8]))
    with CacheEngine(config, views, BS, groups=(SLIDE, FULLG)) as second:
        assert second.lookup(tokens + [1]) == 3 * CHUNK
        assert second.retrieve(tokens + [1], ([13, 14, 15, 16, 17, 18], [19, 20, 21, 22, 23, 24])) == 3 * CHUNK
    for m, b in zip(memory, before):
        assert torch.equal(m[19:25], b[7:13])  # the full group: every block
        assert torch.equal(m[18], b[6])  # the sliding group: the block its window reads at the hit's end
        assert torch.equal(m[13:18], b[13:18])  # and nothing before it
    with pytest.raises(
        ValueError, match=r"the groups have block sizes \[4\]; expected the largest to be block_size = 8"
    ):
        CacheEngine(config, views, 8, groups=(SLIDE, FULLG))


# -- Mamba-type state --


def test_a_mamba_group_keeps_no_page_in_a_chunk_and_skips_what_vllm_skips():
    managers = pytest.importorskip("vllm.v1.core.single_type_kv_cache_manager")
    for computed in (1, 5, 8, 100):
        assert MAMBAG.skipped_tokens(computed) == managers.MambaManager.get_num_skipped_tokens(None, computed)
    assert MAMBAG.kept_blocks(6, 2) == 0 and MAMBAG.describe() == "mamba48Bx2"
    g = geometry(MAMBAG, FULLG)
    assert g.keeps_state and g.state_bytes == 2 * STATE and g.chunk_bytes(2) == 2 * 2 * PAGE
    assert g.slot_bytes == 2 * 2 * PAGE and layout_of(g.groups) == "mamba48Bx2+fullx2"
    assert g.state_pages({0: 9}) == (GroupPages(0, (9,), 0, 1),) and g.state_pages({1: 9}) is None


def mamba_memory(device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Views of two Mamba-type layers as vLLM lays them out (a padded page per block,
    the state at its start) and of two full-attention layers; and the memory behind them."""
    memory = {
        name: torch.randint(0, 256, (BLOCKS, PADDED if name[0] == "m" else PAGE), dtype=torch.uint8, device=device)
        for name in ("m0", "l1", "m2", "l3")
    }
    views = {name: m[:, :STATE] if name[0] == "m" else m for name, m in memory.items()}
    return views, memory


def test_a_mamba_hybrid_stores_the_state_vllm_hands_over_and_a_hit_ends_only_where_one_is_stored():
    g = geometry(MAMBAG, FULLG)
    p = planner(g)
    tokens = list(range(100, 100 + 3 * CHUNK))
    req = p.request("a", tokens, len(tokens))
    plan = StepPlan()
    # one step computed all three chunks: vLLM kept only the state at their end, in block 30
    p.plan_stores(req, ([0, 0, 0, 0, 0, 30], [7, 8, 9, 10, 11, 12]), len(tokens), plan)
    p.store_states(req, {3 * CHUNK: {0: 30}, 5 * BS: {0: 29}}, plan)  # 20 tokens: not a chunk's end
    assert [item.nbytes for item in plan.stores] == [2 * 2 * PAGE] * 3 + [2 * STATE]
    assert plan.stores[3].key == state_key(plan.stores[2].key)
    assert plan.stores[3].copy.groups == (GroupPages(0, (30,), 0, 1),) and plan.stores[3].copy.block_ids == ()
    stored(p, plan)
    longer = tokens + [1, 2, 3]
    assert p.find_hit(p.request("b", longer, len(longer)), 0, 3 * CHUNK - BS).tokens == 0  # no state at 16
    hit = p.find_hit(p.request("c", longer, len(longer)), 0, 3 * CHUNK)
    assert hit is not None and hit.tokens == 3 * CHUNK and hit.state == plan.stores[3].key and hit.load_async
    p.plan_load(p.request("c", longer, len(longer)), hit, ([0, 0, 0, 0, 0, 40, 0], [41, 42, 43, 44, 45, 46, 47]), 24)
    (load,) = p.take_plan().async_loads
    assert load.failed_blocks == ()
    assert [i.copy.groups[-1].block_ids for i in load.items] == [(40,), (41, 42), (43, 44), (45, 46)]


def test_a_mamba_hit_without_a_block_for_its_state_is_recomputed_whole():
    p = planner(geometry(MAMBAG, FULLG))
    tokens = list(range(100, 100 + CHUNK))
    req = p.request("a", tokens, len(tokens))
    plan = StepPlan()
    p.plan_stores(req, ([0, 30], [7, 8]), len(tokens), plan)
    p.store_states(req, {CHUNK: {0: 30}}, plan)
    stored(p, plan)
    hit = p.find_hit(p.request("b", tokens + [5], CHUNK + 1), 0, CHUNK)
    assert hit is not None and hit.tokens == CHUNK
    p.plan_load(p.request("b", tokens + [5], CHUNK + 1), hit, ([0, 0, 50], [41, 42, 43]), CHUNK)
    (load,) = p.take_plan().async_loads
    assert load.failed_blocks == (0, 0)  # vLLM hears of a failed load of the request: it recomputes it


@pytest.mark.parametrize("device", DEVICES)
def test_a_mamba_hybrids_chunks_and_state_round_trip_byte_exact_through_the_executor(device):
    g = geometry(MAMBAG, FULLG)
    views, memory = mamba_memory(device)
    before = {name: m.clone() for name, m in memory.items()}
    kv = ops.PagedGroups.from_groups(views, g.groups)
    pool = HostSlotPool(g.slot_bytes, 8, pin="never" if device == "cpu" else "always")
    executor = TransferExecutor(kv, pool, {})
    p = planner(g)
    tokens = list(range(100, 100 + 2 * CHUNK))
    req = p.request("a", tokens, len(tokens))
    plan = StepPlan()
    p.plan_stores(req, ([0, 0, 0, 21], [1, 2, 3, 4]), len(tokens), plan)
    p.store_states(req, {2 * CHUNK: {0: 21}}, plan)
    assert all(executor.run(Plan(gathers=tuple(i.copy for i in plan.stores))).gathers)
    synchronize(device)
    stored(p, plan)
    b = p.request("b", tokens + [9], len(tokens) + 1)
    hit = p.find_hit(b, 0, 2 * CHUNK)
    p.plan_load(b, hit, ([0, 0, 0, 22], [5, 6, 7, 8]), hit.tokens)
    (load,) = p.take_plan().async_loads
    assert all(executor.run(Plan(scatters=tuple(i.copy for i in load.items))).scatters)
    synchronize(device)
    others = [b for b in range(BLOCKS) if b != 22]
    for name in ("m0", "m2"):
        assert torch.equal(memory[name][22, :STATE], before[name][21, :STATE])  # the state at the hit's end
        assert torch.equal(memory[name][22, STATE:], before[name][22, STATE:])  # not the padding
        assert torch.equal(memory[name][others], before[name][others])
    for name in ("l1", "l3"):
        assert torch.equal(memory[name][5:9], before[name][1:5])
    executor.close()


def test_an_engine_refuses_mamba_type_groups(tmp_path):
    config = CacheConfig(chunk_size=CHUNK, max_local_cpu_size=0.001)
    with pytest.raises(ValueError, match=r"groups has Mamba-type groups \(from m0\): a CacheEngine keeps attention"):
        CacheEngine(config, mamba_memory()[0], BS, groups=(MAMBAG, FULLG))


# -- groups of different block sizes --


def test_groups_of_different_block_sizes_store_and_load_each_groups_own_blocks_byte_exact():
    """vLLM unifies page sizes by growing a block: here the full group's blocks hold 8
    tokens and the sliding group's 4, in pages of the same size. Chunks and hits follow
    the larger block; each group moves its own blocks."""
    full = KVGroup(FULL, ("f0", "f1"), 2 * BS, PAGE)
    slide = KVGroup(SLIDING, ("s0", "s1"), BS, PAGE, window=BS + 1)
    g = Geometry.of_cache(
        model="m",
        revision="",
        dtype="uint8",
        layout="toy",
        block_size=2 * BS,
        page_bytes=PAGE,
        num_layers=4,
        chunk_size=4 * BS,
        groups=(full, slide),
    )
    assert (g.blocks_per_chunk, g.ratio(slide), g.namespace.kv_groups) == (2, 2, "fullx2+sliding5x2@4")
    assert g.chunk_bytes(2) == 2 * 2 * PAGE + 2 * 1 * PAGE  # the sliding group keeps its last 4-token block
    views = {name: torch.randint(0, 256, (BLOCKS, PAGE), dtype=torch.uint8) for name in ("f0", "f1", "s0", "s1")}
    before = {name: v.clone() for name, v in views.items()}
    executor = TransferExecutor(
        ops.PagedGroups.from_groups(views, g.groups), HostSlotPool(g.slot_bytes, 4, pin="never"), {}
    )
    p = planner(g, chunk=4 * BS)
    tokens = list(range(100, 100 + 8 * BS))
    req = p.request("a", tokens, len(tokens))
    plan = StepPlan()
    p.plan_stores(req, ([1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12]), len(tokens), plan)
    assert [item.copy.groups[1].block_ids for item in plan.stores] == [(8,), (12,)]
    assert all(executor.run(Plan(gathers=tuple(i.copy for i in plan.stores))).gathers)
    stored(p, plan)
    b = p.request("b", tokens + [1], len(tokens) + 1)
    hit = p.find_hit(b, 0, 8 * BS)
    assert hit is not None and hit.tokens == 8 * BS
    p.plan_load(b, hit, ([13, 14, 15, 16], [0] * 7 + [17]), hit.tokens)
    (load,) = p.take_plan().async_loads
    assert all(executor.run(Plan(scatters=tuple(i.copy for i in load.items))).scatters)
    for name in ("f0", "f1"):
        assert torch.equal(views[name][13:17], before[name][1:5])
    for name in ("s0", "s1"):
        assert torch.equal(views[name][17], before[name][12])
        untouched = [b for b in range(BLOCKS) if b != 17]
        assert torch.equal(views[name][untouched], before[name][untouched])
    executor.close()


def test_a_state_key_names_one_chunk_key_and_refuses_anything_else():
    assert state_key(b"k" * 16) != state_key(b"j" * 16) and len(state_key(b"k" * 16)) == 16
    with pytest.raises(ValueError, match=r"key = b'short': expected a 16-byte chunk key"):
        state_key(b"short")
