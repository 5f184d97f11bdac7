"""The local tiny Llama builds deterministically and a real vLLM CPU engine serves it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: these tests run a real vLLM engine")
pytest.importorskip("transformers", reason="transformers is not installed: the tiny Llama is built with it")
pytest.importorskip("safetensors", reason="safetensors is not installed: the tiny Llama's weights are read with it")
from safetensors.torch import load_file
from transformers import AutoTokenizer

from lmcache_ext.integration.vllm.offline import run_vllm_script
from lmcache_ext.tiny_llama import build_tiny_llama

PROMPT = "kaba lomi 12. " * 20
MAX_TOKENS = 8

GENERATE = """
from vllm import LLM, SamplingParams
llm = LLM(model={model!r}, max_model_len=1024, enable_prefix_caching=False)
out = llm.generate([{prompt!r}], SamplingParams(temperature=0, max_tokens={max_tokens}))[0]
return {{"tokens": list(out.outputs[0].token_ids), "num_cached_tokens": out.num_cached_tokens,
        "prompt_len": len(out.prompt_token_ids)}}
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def test_build_writes_requested_shape(tiny_model: Path) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (2, 128)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert (config["head_dim"], config["max_position_embeddings"]) == (32, 8192)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert len(tokenizer) == config["vocab_size"] == 1024
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert (config["bos_token_id"], config["eos_token_id"]) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    assert tokenizer.decode(tokenizer(PROMPT).input_ids) == PROMPT


def test_build_is_deterministic_per_seed(tiny_model: Path, tmp_path: Path) -> None:
    again = build_tiny_llama(tmp_path / "again")
    other_seed = build_tiny_llama(tmp_path / "seed1", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name
    weights = load_file(tiny_model / "model.safetensors")
    other = load_file(other_seed / "model.safetensors")
    assert weights.keys() == other.keys()
    assert not weights["lm_head.weight"].equal(other["lm_head.weight"])


def test_build_rejects_head_dim_below_cpu_minimum(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="head_dim = 48 is not supported"):
        build_tiny_llama(tmp_path, head_dim=48)
    assert not any(tmp_path.iterdir())


def test_build_rejects_heads_not_multiple_of_kv_heads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="heads = 4 is not a multiple of kv_heads = 3"):
        build_tiny_llama(tmp_path, kv_heads=3)


def test_run_vllm_script_reports_failure_with_stderr() -> None:
    with pytest.raises(RuntimeError, match=r"exited with 1 and 0 result lines[\s\S]*boom"):
        run_vllm_script("raise SystemExit('boom')")


@pytest.mark.vllm
def test_vllm_greedy_generation_is_deterministic_across_processes(tiny_model: Path) -> None:
    code = GENERATE.format(model=str(tiny_model), prompt=PROMPT, max_tokens=MAX_TOKENS)
    first = run_vllm_script(code)
    second = run_vllm_script(code)
    assert len(first["tokens"]) == MAX_TOKENS
    assert first["tokens"] == second["tokens"]
    assert first["prompt_len"] == second["prompt_len"] > 128
    assert first["num_cached_tokens"] == second["num_cached_tokens"] == 0
