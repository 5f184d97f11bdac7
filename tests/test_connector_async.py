"""Transfers off the critical path, on the connector's halves with copies slowed down on
purpose: stores gather in the background and never keep their request's blocks; the
step after a finish or a preemption waits for the gathers that read the released blocks; lower-tier hits load in
the background and their request is reported once; nothing leaks when requests are
aborted in flight."""

from __future__ import annotations

import dataclasses
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: the connector runs on vLLM's connector API")

from connector_rig import CHUNK, Rig, config, finish, first_step, hit, prompt, request, same_pages, step_output
from lmcache_ext import ops
from lmcache_ext.integration.vllm.scheduler import SchedulerSide
from lmcache_ext.testing.kv_layouts import page_view


def slow(monkeypatch: pytest.MonkeyPatch, name: str, delay: float) -> threading.Event:
    """Every `ops.<name>` waits `delay` seconds first; the event is set when one starts."""
    started, real = threading.Event(), getattr(ops, name)

    def slowed(*args, **kwargs):
        started.set()
        time.sleep(delay)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, name, slowed)
    return started


def test_a_store_returns_at_once_and_the_next_step_waits_for_it_before_reusing_the_blocks(monkeypatch):
    rig = Rig()
    w = rig.workers[0]
    tokens = prompt(2 * CHUNK + 1, seed=1)
    original = [page_view(t)[list(range(8))].clone() for t in rig.caches[0]]
    started = slow(monkeypatch, "gather", 0.4)
    plan = first_step(rig.scheduler, request("a", tokens), list(range(9)), len(tokens))
    begun = time.monotonic()
    w.load(plan)
    w.save(plan)
    assert time.monotonic() - begun < 0.2 and started.wait(5)  # wait_for_save did not wait for the gather
    assert finish(rig.scheduler, "a") is False  # vLLM frees a's blocks at once, its gathers still running
    assert rig.scheduler.has_pending_work()
    assert w.get_finished({"a"}) == (None, None)  # nothing for vLLM to wait for
    assert hit(rig.scheduler, request("b", tokens)) is None  # being stored: not loadable yet
    following = rig.scheduler.build_plan(step_output())
    assert following.released == ["a"]
    begun = time.monotonic()
    w.handle_preemptions(following)  # vLLM's first hook of the step that may reuse a's blocks
    assert time.monotonic() - begun > 0.2
    for t in rig.caches[0]:
        page_view(t)[list(range(9))] = 0  # the reuse
    w.flush()
    rig.scheduler.apply_report(w.take_report())
    assert w.get_finished(set()) == (None, None)
    c = request("c", tokens)
    assert hit(rig.scheduler, c) == 2 * CHUNK and not rig.scheduler.has_pending_work()
    assert rig.scheduler.build_plan(step_output()).released == []  # released once
    rig.step([(c, list(range(20, 29)), 0)])
    assert all(page_view(t)[list(range(20, 28))].equal(o) for t, o in zip(rig.caches[0], original))


def test_a_request_whose_stores_were_reported_is_not_released_again():
    rig = Rig()
    tokens = prompt(2 * CHUNK + 1, seed=6)
    rig.step([(request("a", tokens), list(range(9)), 0)])  # gathered and reported within the step
    assert finish(rig.scheduler, "a") is False
    assert rig.scheduler.build_plan(step_output()).released == []


def test_a_request_without_stores_is_not_held():
    rig = Rig()
    tokens = prompt(CHUNK // 2, seed=2)  # no full chunk
    first_step(rig.scheduler, request("a", tokens), [0], len(tokens))
    assert finish(rig.scheduler, "a") is False
    assert rig.workers[0].get_finished({"a"}) == (None, None)
    assert rig.scheduler.build_plan(step_output()).released == []


def test_a_preemption_waits_for_the_gather_that_reads_the_reused_blocks(monkeypatch):
    rig = Rig()
    w = rig.workers[0]
    tokens = prompt(2 * CHUNK + 1, seed=3)
    original = [page_view(t)[list(range(8))].clone() for t in rig.caches[0]]
    slow(monkeypatch, "gather", 0.4)
    plan = first_step(rig.scheduler, request("a", tokens), list(range(9)), len(tokens))
    w.load(plan)
    w.save(plan)
    preempting = rig.scheduler.build_plan(step_output(preempted={"a"}))
    assert preempting.released == ["a"]
    begun = time.monotonic()
    w.handle_preemptions(preempting)  # vLLM's next forward overwrites a's blocks after this
    assert time.monotonic() - begun > 0.2
    for t in rig.caches[0]:
        page_view(t)[list(range(9))] = 0  # the reuse
    w.flush()
    rig.scheduler.apply_report(w.take_report())
    b = request("b", tokens)
    plan = rig.step([(b, list(range(20, 29)), 0)])
    assert len(plan.loads) == 2
    assert all(page_view(t)[list(range(20, 28))].equal(o) for t, o in zip(rig.caches[0], original))


def test_lower_tier_hits_load_in_the_background_and_errors_come_with_the_report(tmp_path, monkeypatch):
    rig = Rig(tmp_path)
    tokens = prompt(2 * CHUNK + 1, seed=4)
    rig.step([(request("a", tokens), list(range(9)), 0)])
    for w in rig.workers:
        w.close()
    fresh = Rig(tmp_path, seed=40)
    w = fresh.workers[0]
    b = request("b", tokens)
    assert fresh.scheduler.num_new_matched_tokens(b, 0) == (2 * CHUNK, True)
    fresh.scheduler.plan_load(b, (list(range(10, 19)),), 2 * CHUNK)
    started = slow(monkeypatch, "scatter", 0.4)
    plan = fresh.scheduler.build_plan(step_output())
    begun = time.monotonic()
    w.load(plan)
    assert time.monotonic() - begun < 0.2 and started.wait(5)  # start_load_kv did not wait
    assert w.get_finished(set()) == (None, None)  # still loading
    w.drain()
    assert w.get_finished(set()) == (None, {"b"}) and w.get_finished(set()) == (None, None)
    assert w.take_load_errors() == set()
    assert same_pages(fresh.caches[0], list(range(10, 18)), rig.caches[0], list(range(8)))


def test_a_failed_background_load_reports_its_blocks_before_its_request(tmp_path, monkeypatch):
    rig = Rig(tmp_path)
    tokens = prompt(CHUNK + 1, seed=5)
    rig.step([(request("a", tokens), list(range(5)), 0)])
    for w in rig.workers:
        w.close()
    fresh = Rig(tmp_path, seed=50)
    b = request("b", tokens)
    assert fresh.scheduler.num_new_matched_tokens(b, 0) == (CHUNK, True)
    fresh.scheduler.plan_load(b, (list(range(10, 15)),), CHUNK)
    for path in (tmp_path / "kv").rglob("*"):
        if path.is_file() and len(path.name) == 32:
            path.write_bytes(b"not a chunk")  # damaged after the lookup
    w = fresh.workers[0]
    w.load(fresh.scheduler.build_plan(step_output()))
    w.drain()
    assert w.get_finished(set()) == (None, {"b"})
    assert w.take_load_errors() == {10, 11, 12, 13}  # in the same step's output as the report
    fresh.scheduler.apply_report(w.take_report())
    assert fresh.scheduler.stats() == {"host_chunks": 0, "pinned_slots": 0}


def test_a_storm_of_aborted_requests_leaks_no_slot_pin_or_report(tmp_path, monkeypatch):
    rig = Rig(tmp_path, tp=2)
    slow(monkeypatch, "gather", 0.05)
    ids = [f"r{i}" for i in range(6)]
    outputs = []
    for i, rid in enumerate(ids):
        tokens = prompt(CHUNK + 1, seed=100 + i)
        rig.scheduler.num_new_matched_tokens(request(rid, tokens), 0)
        outputs.append(SimpleNamespace(req_id=rid, block_ids=(list(range(5 * i, 5 * i + 5)),), num_computed_tokens=0))
    plan = rig.scheduler.build_plan(step_output(new=outputs, scheduled={rid: CHUNK + 1 for rid in ids}))
    for w in rig.workers:
        w.load(plan)
        w.save(plan)
    assert not any(finish(rig.scheduler, rid) for rid in ids)  # every one aborted right away, none held
    following = rig.scheduler.build_plan(step_output())
    assert sorted(following.released) == sorted(ids)
    for step in range(50):  # idle steps until every rank has reported every store
        for w in rig.workers:
            w.handle_preemptions(following if step == 0 else rig.scheduler.build_plan(step_output()))
            assert w.get_finished(set(ids) if step == 0 else set()) == (None, None)
        report = None
        for w in rig.workers:
            part = w.take_report()
            report = part if report is None else report.aggregate(part) if part else report
        rig.scheduler.apply_report(report)
        if not rig.scheduler.has_pending_work():
            break
        time.sleep(0.05)
    rig.flush()
    for w in rig.workers:
        rig.scheduler.apply_report(w.take_report())
    stats = rig.scheduler.stats()
    slots = rig.scheduler._slots  # the scheduler's accounting twin of the workers' pools
    assert stats["pinned_slots"] == 0 and stats["host_chunks"] == 6
    assert slots.num_free + stats["host_chunks"] == slots.num_slots  # every other slot is free again
    for w in rig.workers:
        w.close()


def test_shutdown_with_transfers_pending_lets_them_end_and_leaves_whole_files(tmp_path, monkeypatch):
    rig = Rig(tmp_path)
    w = rig.workers[0]
    tokens = prompt(2 * CHUNK + 1, seed=6)
    started = slow(monkeypatch, "gather", 0.3)
    plan = first_step(rig.scheduler, request("a", tokens), list(range(9)), len(tokens))
    w.load(plan)
    w.save(plan)
    assert started.wait(5)
    w.close()  # returns once the gathers and their disk writes have ended
    report = w.take_report()
    assert sorted(report.stored.values()) == [1, 1] and sum(report.written.values()) == 2
    files = [p for p in (tmp_path / "kv").rglob("*") if p.is_file() and len(p.name) == 32]
    assert len(files) == 2 and not list((tmp_path / "kv").rglob("*.tmp"))


@pytest.mark.parametrize(
    ("device", "setting", "in_background"),
    [("cuda", None, True), ("cpu", None, False), ("cpu", True, True), ("cuda", False, False)],
)
def test_where_lower_tier_hits_load_follows_the_device_unless_set(tmp_path, device, setting, in_background):
    """On a CPU engine a step lasts seconds: a request parked for a background load would
    wait behind a whole one, so by default its disk hits load before the forward."""
    rig = Rig(tmp_path)
    tokens = prompt(CHUNK + 1, seed=7)
    rig.step([(request("a", tokens), list(range(5)), 0)])
    for w in rig.workers:
        w.close()
    geometry = dataclasses.replace(rig.scheduler._geometry, device_type=device)
    restarted = SchedulerSide(config(tmp_path, async_load=setting), geometry)
    assert restarted.num_new_matched_tokens(request("b", tokens), 0) == (CHUNK, in_background)
