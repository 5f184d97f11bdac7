"""A promised disk hit never fails on a real vLLM engine under its default
`kv_load_failure_policy` ("fail"): the disk holds two chunks, X the older; one batch asks
for X (loaded in the background) and computes a new prompt Z whose store needs room;
Z's write lands before X is read (the test holds X's read back until then). The
connector evicts the other chunk, not the promised one, so no request fails and the
answers equal plain vLLM's. When the disk tier evicted on its own, X's file went with
Z's write and X's request failed."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")

from lmcache_ext.integration.vllm.offline import run_vllm_script
from lmcache_ext.tiny_llama import build_tiny_llama
from test_vllm_connector import CHUNK, connector, tokens

pytestmark = pytest.mark.vllm

SCRIPT = """
from lmcache_ext.testing.disk_races import hold_reads_until_a_write

if {hold_reads!r}:
    hold_reads_until_a_write()

from vllm import LLM, SamplingParams
llm = LLM(model={model!r}, max_model_len=2048, seed=0, dtype="float32", enable_prefix_caching=True, **{kwargs!r})
params = SamplingParams(temperature=0, max_tokens=8)
out = []
for batch in {batches!r}:
    for o in llm.generate([{{"prompt_token_ids": p}} for p in batch], params, use_tqdm=False):
        out.append({{"tokens": list(o.outputs[0].token_ids), "finish": o.outputs[0].finish_reason,
                     "cached": o.num_cached_tokens}})
del llm
return out
"""


X, Y, Z = (tokens(CHUNK + 1, seed=s) for s in (1, 2, 3))  # one full chunk each (the last token is computed)


def run(model: Path, batches: list[list[list[int]]], kwargs: dict, hold_reads: bool = False) -> list[dict]:
    code = SCRIPT.format(model=str(model), kwargs=kwargs, batches=batches, hold_reads=hold_reads)
    return run_vllm_script(code)


def test_a_promised_disk_hit_survives_a_write_that_needs_room_before_its_read(tmp_path):
    model = build_tiny_llama(tmp_path / "model")
    disk = tmp_path / "kv"
    plain = run(model, [[X, Z]], {})
    run(model, [[X], [Y]], connector(disk, async_load=True))  # X, then Y, on disk
    files = sorted(p for p in disk.rglob("*") if p.is_file() and len(p.name) == 32)
    assert len(files) == 2 * 2  # a file per chunk and KV head
    room_for_two = sum(p.stat().st_size for p in files) / 2**30
    head_0 = [p for p in files if p.is_relative_to(disk / "shard0")]
    x_file, y_file = (p.name for p in sorted(head_0, key=lambda p: p.stat().st_mtime_ns))  # X was stored first
    served = run(model, [[X, Z]], connector(disk, max_local_disk_size=room_for_two, async_load=True), hold_reads=True)
    assert [o["finish"] for o in served] == ["length", "length"]  # no request failed
    assert [o["tokens"] for o in served] == [o["tokens"] for o in plain]
    assert served[0]["cached"] == CHUNK  # X came from the disk
    for head in ("shard0", "shard1"):
        names = {p.name for p in (disk / head).rglob("*") if p.is_file() and len(p.name) == 32}
        assert x_file in names and y_file not in names and len(names) == 2  # Y made room for Z
