"""The connector's scheduler half: vLLM's requests and scheduler output, translated onto
the planner (lmcache_ext.planner), which decides everything — hits, which host slot
holds each chunk, what to evict, what each worker copies — so TP ranks cannot
disagree. Slot ids come from an accounting twin of the workers' pools (same slot
count, no bytes). Keys chain vLLM's own block-hash extras (request_keys).

vLLM asks for a hit (`num_new_matched_tokens`), then for its sources and, once it has
allocated blocks, for the load: the one `Hit` the planner answered is kept for those
two calls. None answers ("ask again next step") while a tier's answer is out, while a
chunk is being filled, or while remote chunks are fetched into host slots.

Transfers outlive steps. With `async_load` (by default on CUDA engines, not on CPU
ones) a hit that needs the disk is loaded in the background: vLLM parks the request
(`load_kv_async`) until the workers report it through `get_finished`. A store is
gathered in the background after the step's forward. A finished request never keeps
its blocks (`request_finished` is False): vLLM frees them at once, so its prefix cache
resets cleanly right after `generate`, and the next plan lists the request among the
`released` ones whose gathers were still out; each worker ends those gathers (and
gathers a finished request's last partial chunk) in `handle_preemptions`, which vLLM
calls before anything in that step can write a block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmcache_ext import _C
from lmcache_ext.config import CacheConfig
from lmcache_ext.geometry import Geometry
from lmcache_ext.integration.vllm.metadata import StepPlan, WorkerReport
from lmcache_ext.integration.vllm.request_keys import extra_of
from lmcache_ext.integration.vllm.transfer_params import stored_by_producer, transfer_params, wants_transfer_params
from lmcache_ext.memory import HostSlotPool
from lmcache_ext.metrics import Payload
from lmcache_ext.planner import CachedRequest, ChunkPlanner, Hit
from lmcache_ext.plans import TierName
from lmcache_ext.tiers import open_holdings

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.002
"""How long a step with nothing scheduled pauses while a request waits for our answer (a
remote probe or fetch, a prefill instance's chunks in flight) or our transfers are still
to be reported (`has_pending_push_work` keeps vLLM stepping): vLLM would otherwise run
empty steps back to back, and take the CPU and the GIL from the very transfers it waits
for (our threads; a prefill instance on the same cores)."""


@dataclass
class _Request:
    """What the scheduler half remembers of one request besides the planner's state."""

    cached: CachedRequest
    tables: list[list[int]] = field(default_factory=list)  # its block ids, one list per KV cache group
    computed: int = 0  # tokens whose KV is computed by the end of the last scheduled step
    hit: Hit | None = None  # the planner's answer to the last hit query
    asked_since: float | None = None  # when its hit query first answered "ask again"


class SchedulerSide:
    def __init__(self, config: CacheConfig, geometry: Geometry) -> None:
        self._config = config
        self._geometry = geometry
        slot_bytes = geometry.slot_bytes
        num_slots = HostSlotPool.slots_for_config(config, slot_bytes)
        self._slots = _C.HostSlotPool(1, num_slots, pin="never")  # the same slot ids, no bytes
        self._planner = ChunkPlanner(config, geometry, self._slots, open_holdings(config, geometry), new_plan=StepPlan)
        self._host_used = -1  # the host usage last reported
        self._requests: dict[str, _Request] = {}

    # -- hits --

    def on_new_request(self, request: Any) -> None:
        """Start asking the tiers that answer in the background about the request's
        chunks; on a decode instance, wait for those its prefill instance named
        (`transfer_params`)."""
        state = self._state(request)
        named = stored_by_producer(request) if self._config.pd_wait_s else None
        if named is not None:
            self._planner.expect(state.cached, *named)
        self._planner.prefetch(state.cached, self._hit_limit(request))

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Cached tokens beyond vLLM's own hit that can be loaded now, leaving at least
        one token to compute, and whether they load in the background (some come from a
        lower tier, and background loads are on: see `CacheConfig`). None: ask again
        next step (see the module's docstring). Chunks inside vLLM's hit need not be
        cached: the chained key of a later chunk names its whole prefix."""
        state = self._state(request)
        state.hit = self._planner.find_hit(state.cached, num_computed_tokens, self._hit_limit(request))
        if state.hit is None:
            if state.asked_since is None:
                state.asked_since = time.monotonic()
            return None, False
        if state.asked_since is not None:
            self._planner.metrics.observe("lookup_wait_seconds", time.monotonic() - state.asked_since)
            state.asked_since = None
        return state.hit.tokens, state.hit.load_async

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[TierName, int]:
        """Tokens of the last hit by the tier that held their chunk (vLLM asks right after it)."""
        hit = self._state(request).hit
        return hit.by_source(num_external_tokens) if hit is not None else {}

    def plan_load(self, request: Any, tables: Sequence[Sequence[int]], num_external_tokens: int) -> None:
        """Plan the copy of the last hit's first `num_external_tokens` into `tables` (all
        of the request's blocks, one list per KV cache group: vLLM's hit first, then ours)."""
        state = self._state(request)
        if state.hit is not None:
            self._planner.plan_load(state.cached, state.hit, tables, num_external_tokens)

    # -- stores --

    def build_plan(self, scheduler_output: Any) -> StepPlan:
        """This step's plan: the loads and fetches planned since the last one, and stores
        of every chunk whose tokens are all computed by the end of this step."""
        plan = self._planner.take_plan()
        assert isinstance(plan, StepPlan)
        preempted = sorted(scheduler_output.preempted_req_ids or ())
        plan.released += preempted
        for req_id in preempted:  # vLLM reuses their blocks: nothing is stored from them until resumed
            if (state := self._requests.get(req_id)) is not None:
                state.tables, state.computed = [], 0
        plan.idle = not scheduler_output.total_num_scheduled_tokens
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.tables = [list(ids) for ids in new.block_ids]
            self._plan_stores(state, new.num_computed_tokens, scheduled.get(new.req_id, 0), plan)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids and new_blocks is not None:
                state.tables = [list(ids) for ids in new_blocks]
            elif new_blocks is not None:
                for table, ids in zip(state.tables, new_blocks):
                    table.extend(ids)
            self._plan_stores(state, cached.num_computed_tokens[i], scheduled.get(req_id, 0), plan)
        if self._geometry.keeps_state:
            self._store_states(scheduler_output, plan)
        self._planner.add_evictions(plan)
        if plan.idle and (
            self._planner.has_pending_work() or any(s.asked_since is not None for s in self._requests.values())
        ):
            time.sleep(IDLE_WAIT_S)
        return plan

    def _store_states(self, scheduler_output: Any, plan: StepPlan) -> None:
        """Stores of the Mamba-type states vLLM kept this step ("align" mode): it names
        each one's block only in the step that fills it (its block table alone cannot
        say which block holds which state), and the block may be reused after it."""
        block_state = getattr(scheduler_output, "kv_connector_block_state", None)
        for req_id, handed in (block_state.boundary_state_offloads if block_state else {}).items():
            state = self._requests.get(req_id)
            if state is None:
                continue
            states: dict[int, dict[int, int]] = {}
            for group, block_id, end in handed:
                states.setdefault(end, {})[group] = block_id
            self._planner.store_states(state.cached, states, plan)

    def _plan_stores(self, state: _Request, computed_before: int, scheduled: int, plan: StepPlan) -> None:
        state.computed = computed_before + scheduled
        if state.tables:
            self._planner.plan_stores(state.cached, state.tables, state.computed, plan, computed_before)

    # -- results --

    def apply_report(self, report: WorkerReport | None) -> None:
        """Act on items that every rank has reported."""
        self._planner.apply_report(report)

    def has_pending_work(self) -> bool:
        """Items not yet reported by every rank: the engine must keep stepping to hear of them."""
        return self._planner.has_pending_work()

    def reset(self) -> bool:
        """Drop everything cached before this call (vLLM's `reset_prefix_cache(
        reset_connector=True)`, e.g. after a weight update; see `ChunkPlanner.reset`).
        Requests known so far are forgotten (their KV may predate the update: they
        store nothing more, and a preempted one is keyed afresh when it comes back)."""
        if not self._planner.reset():
            return False
        self._requests.clear()
        return True

    def finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        """The request is done (or aborted): forget it. With save_decode_cache and
        save_unfull_chunk, the full blocks of its last partial chunk go into the next
        step's plan first. Never keeps the blocks (False): vLLM frees them now, and when
        a store still reads them the next plan lists the request as `released`, so every
        worker ends that store in `handle_preemptions`, before the blocks can be written
        again. A prefill instance waits until its chunks are marked in flight (before
        its answer can reach a decode instance) and, where the request asked for it
        (`do_remote_decode`), returns the `transfer_params` that name what it stored."""
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False, None
        params = None
        if self._config.announces_stores:
            self._planner.wait_announced()
        if wants_transfer_params(request):
            params = transfer_params(*self._planner.stored_extent(state.cached))
        self._finish(request.request_id, state)
        return False, params

    def _finish(self, request_id: str, state: _Request) -> None:
        req, plan = state.cached, self._planner.next_plan
        # (`state.computed`: a hybrid's partial chunk is skipped if its window blocks are gone)
        if self._config.save_unfull_chunk and self._config.save_decode_cache and state.tables:
            upto = min(state.computed, len(req.tokens))
            self._planner.store_partial(plan, req, state.tables, upto, state.computed)
        self._planner.finished(req)
        if self._planner.stores_pending(request_id):
            plan.released.append(request_id)

    def close(self) -> None:
        """Stop the tiers' background probes and their connections."""
        self._planner.close()

    def take_metrics(self) -> Payload:
        """Evictions since the last call, and the host pool's usage (all ranks) when it changed."""
        self._planner.count_evictions()
        used = self._slots.num_slots - self._slots.num_free
        if used != self._host_used:
            self._host_used = used
            rank_bytes = self._geometry.slot_bytes * self._geometry.tp_size
            self._planner.metrics.usage("host", used * rank_bytes, self._slots.num_slots * rank_bytes)
        return self._planner.metrics.take()

    def stats(self) -> dict[str, int]:
        return {"host_chunks": self._planner.host_chunks(), "pinned_slots": self._planner.pinned_slots()}

    # -- helpers --

    def _state(self, request: Any) -> _Request:
        state = self._requests.get(request.request_id)
        if state is None:
            cached = self._planner.request(
                request.request_id, request.all_token_ids, request.num_prompt_tokens, extra_of(request)
            )
            state = _Request(cached)
            self._requests[request.request_id] = state
        return state

    def _hit_limit(self, request: Any) -> int:
        """The most tokens a hit may cover: whole blocks, leaving at least one token to compute."""
        bs = self._geometry.block_size
        return (request.num_tokens - 1) // bs * bs
