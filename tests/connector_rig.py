"""The connector's halves driven directly, without an engine: a scheduler half, TP
worker halves on random caches, and the requests and steps vLLM would give them."""

from __future__ import annotations

import random
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmcache_ext.testing.kv_layouts import make_layers, page_view

# Every module that imports the rig is skipped, with this reason, where vLLM is absent.
pytest.importorskip("vllm", reason="vLLM is not installed: the connector runs on vLLM's connector API")
from lmcache_ext.config import CacheConfig
from lmcache_ext.geometry import Geometry
from lmcache_ext.integration.vllm.metadata import LoadItem, StepPlan, WorkerReport
from lmcache_ext.integration.vllm.scheduler import SchedulerSide
from lmcache_ext.integration.vllm.worker import WorkerSide
from lmcache_ext.keys import Namespace
from lmcache_ext.plans import TierTransfer

LAYERS, BLOCKS, BLOCK, CHUNK = 2, 64, 16, 64  # 4 blocks a chunk
HEADS, WIDTH = 2, 32  # 2 KiB pages (bf16)
PAGE = HEADS * BLOCK * WIDTH * 2
LAYER_NAMES = [f"layer.{i}" for i in range(LAYERS)]


def geometry(tp_size: int = 1, replicas: int = 1) -> Geometry:
    """`replicas`: consecutive ranks holding the same KV (MLA: all), so the namespace counts shards."""
    ns = Namespace(
        model="m",
        revision="",
        dtype="bfloat16",
        layout="LBHNC",
        block_size=BLOCK,
        page_bytes=PAGE,
        num_layers=LAYERS,
        tp_size=tp_size // replicas,
        tp_rank=0,
        chunk_size=CHUNK,
    )
    return Geometry(ns, BLOCK, CHUNK // BLOCK, LAYERS, PAGE, tp_size, replicas=replicas)


def config(tmp_path: Path | None = None, **kw: object) -> CacheConfig:
    disk = dict(local_disk=str(tmp_path / "kv"), max_local_disk_size=0.01) if tmp_path else {}
    return CacheConfig(**{"chunk_size": CHUNK, "max_local_cpu_size": 0.001, **disk, **kw})


class Rig:
    """A scheduler half and `tp` worker halves, each worker with its own random cache
    (the same on each group of `replicas` ranks, as an MLA cache is on all). Replicas
    share a host pool, as in vLLM's multiprocessing executor, under `engine` (default:
    a name of this rig's own; "" keeps a pool per rank). `concurrent`: each step runs on
    every worker at once, as in vLLM's worker processes, the last rank first and each
    earlier one 0.1 s later (a rank that follows another waits for it)."""

    def __init__(
        self,
        tmp_path: Path | None = None,
        tp: int = 1,
        seed: int = 0,
        replicas: int = 1,
        engine: str | None = None,
        concurrent: bool = False,
        **kw: object,
    ) -> None:
        self.concurrent = concurrent
        g = geometry(tp, replicas)
        self.scheduler = SchedulerSide(config(tmp_path, **kw), g)
        self.caches = [
            make_layers("LBHNC", LAYERS, BLOCKS, HEADS, BLOCK, WIDTH, torch.bfloat16, seed=seed + r // replicas)
            for r in range(tp)
        ]
        engine = uuid.uuid4().hex if engine is None else engine
        self.workers = [WorkerSide(config(tmp_path, **kw), g, r, engine) for r in range(tp)]
        for w, cache in zip(self.workers, self.caches):
            w.register(dict(zip(LAYER_NAMES, cache)))

    def step(self, new: list[tuple[SimpleNamespace, list[int], int]], loads: bool = True) -> StepPlan:
        """Schedule `new` requests (request, block ids, local hit) for their whole prompt,
        run the plan on every worker, wait for its background transfers (as if the
        request waited for its loads and the step's stores ended), deliver the
        aggregated report and what get_finished says (in `self.recved`)."""
        for request, blocks, local in new:
            external = self.matched(request, local)
            self.scheduler.plan_load(request, (blocks,), external if loads else 0)
            request.external = external
        output = step_output(
            new=[
                SimpleNamespace(req_id=r.request_id, block_ids=(b,), num_computed_tokens=local + r.external)
                for r, b, local in new
            ],
            scheduled={r.request_id: r.num_tokens - local - r.external for r, _, local in new},
        )
        return self.run(self.scheduler.build_plan(output))

    def run(self, plan: StepPlan, finished: set[str] = frozenset()) -> StepPlan:
        """Run `plan` on every worker as vLLM's model runner does, wait for the background
        transfers, and deliver the report; `finished` are the requests that finished in
        the step before. Sets `self.sent` and `self.recved` to what every rank's
        get_finished reported (vLLM acts on a request once all ranks have)."""
        parts: list[tuple[WorkerReport | None, set[str], set[str]] | BaseException | None] = [None] * len(self.workers)

        def run_worker(rank: int) -> None:
            w = self.workers[rank]
            try:
                w.handle_preemptions(plan)
                w.load(plan)
                for name in LAYER_NAMES:  # the forward's per-layer hooks (they act with use_layerwise)
                    w.wait_layer(name)
                    w.save_layer(plan, name)
                w.save(plan)
                w.flush()
                report = w.take_report()
                s, r = w.get_finished(set(finished))
                parts[rank] = (report, s or set(), r or set())
            except BaseException as e:
                parts[rank] = e

        if self.concurrent:
            threads = [threading.Thread(target=run_worker, args=(r,)) for r in reversed(range(len(self.workers)))]
            for t in threads:
                t.start()
                time.sleep(0.1)
            for t in threads:
                t.join()
        else:
            for rank in range(len(self.workers)):
                run_worker(rank)
        done = []
        for part in parts:
            if isinstance(part, BaseException):
                raise part
            assert part is not None
            done.append(part)
        report = None
        for part_report, _, _ in done:
            report = part_report if report is None else report.aggregate(part_report) if part_report else report
        self.scheduler.apply_report(report)
        self.sent = set.intersection(*(sent for _, sent, _ in done))
        self.recved = set.intersection(*(recved for _, _, recved in done))
        return plan

    def matched(self, req: SimpleNamespace, local: int = 0, timeout: float = 5.0) -> int:
        """The scheduler's hit for `req`, asking again while it answers None, after a step
        with nothing scheduled (as vLLM does: its plan carries the fetches the lookup
        asked for); whether it loads in the background goes to `req.load_async`."""
        deadline = time.monotonic() + timeout
        while (hit := self.scheduler.num_new_matched_tokens(req, local))[0] is None:
            assert time.monotonic() < deadline, "the hit query never answered"
            self.run(self.scheduler.build_plan(step_output()))
            time.sleep(0.01)
        req.load_async = hit[1]
        return hit[0]

    def flush(self) -> None:
        for w in self.workers:
            w.flush()


def request(rid: str, tokens: list[int]) -> SimpleNamespace:
    """A plain text request: what the scheduler half reads of vLLM's Request."""
    return SimpleNamespace(
        request_id=rid,
        all_token_ids=tokens,
        num_tokens=len(tokens),
        num_prompt_tokens=len(tokens),
        cache_salt=None,
        lora_request=None,
        mm_features=None,
        prompt_embeds=None,
    )


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def same_pages(cache, dst: list[int], src_cache, src: list[int]) -> bool:
    return all(torch.equal(page_view(a)[dst], page_view(b)[src]) for a, b in zip(cache, src_cache))


def no_cached_reqs() -> SimpleNamespace:
    return SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[])


def step_output(
    new: list[SimpleNamespace] = (),
    cached: SimpleNamespace | None = None,
    scheduled: dict[str, int] | None = None,
    preempted: set[str] = frozenset(),
) -> SimpleNamespace:
    """What the connector reads of vLLM's SchedulerOutput for one step."""
    scheduled = dict(scheduled or {})
    return SimpleNamespace(
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=cached or no_cached_reqs(),
        num_scheduled_tokens=scheduled,
        total_num_scheduled_tokens=sum(scheduled.values()),
        preempted_req_ids=set(preempted),
    )


def cached_step(
    req_id: str, computed: int, new_blocks: list[int] | None, scheduled: int, resumed: bool = False
) -> SimpleNamespace:
    """A step of a request vLLM already runs (or resumes), `scheduled` more tokens."""
    cached = SimpleNamespace(
        req_ids=[req_id],
        new_block_ids=[(new_blocks,) if new_blocks else None],
        resumed_req_ids={req_id} if resumed else set(),
        num_computed_tokens=[computed],
    )
    return step_output(cached=cached, scheduled={req_id: scheduled})


def first_step(scheduler: SchedulerSide, req: SimpleNamespace, blocks: list[int], scheduled: int) -> StepPlan:
    """Look `req` up (no local hit, nothing loaded) and plan the step that computes its
    first `scheduled` tokens in `blocks`."""
    scheduler.num_new_matched_tokens(req, 0)
    return scheduler.build_plan(
        step_output(
            new=[SimpleNamespace(req_id=req.request_id, block_ids=(blocks,), num_computed_tokens=0)],
            scheduled={req.request_id: scheduled},
        )
    )


def finish(scheduler: SchedulerSide, rid: str) -> bool:
    """vLLM's request_finished for request `rid`: whether the connector keeps its blocks."""
    kept, params = scheduler.finished(SimpleNamespace(request_id=rid, kv_transfer_params=None))
    assert params is None  # no proxy asked for transfer params
    return kept


def hit(scheduler: SchedulerSide, req: SimpleNamespace, local: int = 0) -> int | None:
    """The tokens a hit query promises (None: ask again later)."""
    return scheduler.num_new_matched_tokens(req, local)[0]


def loads_of(plan: StepPlan) -> list[LoadItem]:
    """Every load item of the plan, before the forward or in the background."""
    return plan.loads + [item for job in plan.async_loads for item in job.items]


def reads_of(plan: StepPlan) -> list[TierTransfer]:
    return [item.read for item in loads_of(plan) if item.read is not None]


class FullAttentionSpec(SimpleNamespace):
    """Stands for vLLM's spec of that name in a fake KV cache config (geometry_from_vllm
    knows a group's kind by its spec's class name)."""


def fake_vllm(
    specs: list[object], layers: int = 2, tp: int = 1, extra: dict[str, object] | None = None
) -> tuple[SimpleNamespace, SimpleNamespace]:
    """A VllmConfig and a KVCacheConfig as far as the connector reads them: one KV cache
    group of `layers` layers per spec (layers l0, l1, ... in the first; l1.0, ... next)."""
    groups = [
        SimpleNamespace(kv_cache_spec=spec, layer_names=[f"l{j}" if not i else f"l{i}.{j}" for j in range(layers)])
        for i, spec in enumerate(specs)
    ]
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(model="m", revision=None, use_mla=False),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp),
        scheduler_config=SimpleNamespace(enable_chunked_prefill=True),
        cache_config=SimpleNamespace(),
        device_config=SimpleNamespace(device_type="cpu"),
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra or {}, kv_role="kv_both"),
    )
    return vllm_config, SimpleNamespace(kv_cache_groups=groups, kv_cache_layout="LBHNC")
