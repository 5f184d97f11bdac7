"""vLLM's kv_role in the connector's halves: a prefill instance stores and never hits, and
names what it stored when a proxy asks; a decode instance hits, stores nothing of its
own, and refuses to wait for chunks keyed apart from its own. vLLM's kv_role enters the
config at start-up, and a contradiction is an error naming both."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: the connector runs on vLLM's connector API")

from connector_rig import BLOCK, CHUNK, Rig, config, hit, prompt, request
from lmcache_ext.config import ConfigError
from lmcache_ext.integration.vllm.connector import with_role

PROMPT = prompt(2 * CHUNK + 2 * BLOCK + 5, seed=3)  # two full chunks, a partial of two blocks, 5 tokens


def finished(rig: Rig, rid: str, params: dict | None) -> tuple[bool, dict | None]:
    return rig.scheduler.finished(SimpleNamespace(request_id=rid, kv_transfer_params=params))


def blocks(n_tokens: int, base: int) -> list[int]:
    return list(range(base, base + -(-n_tokens // BLOCK)))


def test_a_prefill_instance_stores_every_block_never_hits_and_names_what_it_stored():
    rig = Rig(kv_role="kv_producer")
    plan = rig.step([(request("a", PROMPT), blocks(len(PROMPT), 0), 0)])
    assert sorted(len(s.copy.block_ids) for s in plan.stores) == [2, 4, 4]  # the partial chunk's blocks too
    assert hit(rig.scheduler, request("b", PROMPT)) == 0  # it holds them, and still computes
    kept, params = finished(rig, "a", {"do_remote_decode": True})
    assert kept is False
    assert params is not None and params["do_remote_prefill"] is True
    ours = params["lmcache_ext"]
    assert ours["tokens"] == 2 * CHUNK + 2 * BLOCK and len(bytes.fromhex(ours["last_key"])) == 16
    assert finished(rig, "b", None) == (False, None)  # not asked: nothing named


def test_a_decode_instance_hits_stores_nothing_and_checks_the_named_chunks_are_its_own():
    producer, consumer = Rig(kv_role="kv_producer"), Rig(kv_role="kv_consumer")
    producer.step([(request("a", PROMPT), blocks(len(PROMPT), 0), 0)])
    _, params = finished(producer, "a", {"do_remote_decode": True})
    ours = params["lmcache_ext"]
    plan = consumer.step([(request("d", PROMPT), blocks(len(PROMPT), 0), 0)])
    assert plan.stores == []  # no save_decode_cache: a decode instance keeps nothing of its own
    planner = consumer.scheduler._planner
    same = planner.request("d2", PROMPT, len(PROMPT))
    assert planner.expect(same, ours["tokens"], ours["last_key"]) is True
    other = planner.request("x", prompt(len(PROMPT), seed=4), len(PROMPT))
    assert planner.expect(other, ours["tokens"], ours["last_key"]) is False  # another prompt's chunks
    assert planner.expect(same, ours["tokens"] + 1, ours["last_key"]) is False  # not on a block
    keeps = Rig(kv_role="kv_consumer", save_decode_cache=True)
    assert len(keeps.step([(request("k", PROMPT), blocks(len(PROMPT), 0), 0)]).stores) == 3  # what it computed


def test_vllms_kv_role_enters_the_config_and_a_contradiction_is_an_error():
    assert with_role(config(), "kv_consumer").kv_role == "kv_consumer"
    assert with_role(config(), None).kv_role == "kv_both"
    with pytest.raises(ConfigError, match="kv_role = 'kv_producer' in lmcache_ext's config, but vLLM's kv_role"):
        with_role(config(kv_role="kv_producer"), "kv_consumer")
    with pytest.raises(ConfigError, match="save_unfull_chunk = False with vLLM's kv_role = 'kv_producer'"):
        with_role(config(save_unfull_chunk=False), "kv_producer")
    with pytest.raises(ConfigError, match="kv_role"):
        config(kv_role="decode")
