"""A download-free random-weight Llama checkpoint with a locally trained tokenizer:
what the demo, the end-to-end tests and the benchmarks serve with vLLM, so none of
them needs a network, a model hub or a GPU."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
# vllm/v1/attention/backends/cpu_attn.py: CPUAttentionBackend.get_supported_head_sizes()
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass(frozen=True)
class TinyLlamaShape:
    """Model dimensions; head_dim must be one of CPU_HEAD_SIZES for vLLM's CPU attention."""

    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    vocab: int = 1024
    max_positions: int = 8192


SMALL = TinyLlamaShape()
BENCH = TinyLlamaShape(layers=8, hidden=512, heads=8, kv_heads=4, head_dim=64, vocab=2048)


def _corpus(seed: int, lines: int = 2000) -> list[str]:
    """Pseudo-English lines over a fixed syllable set, so BPE learns stable merges."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(3000)]
    words += [str(n) for n in range(100)]
    return [" ".join(rng.choices(words, k=rng.randint(5, 20))) + "." for _ in range(lines)]


def write_tokenizer(dest: Path, vocab: int, seed: int, max_positions: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=max_positions,
    )
    fast.save_pretrained(dest)


def build_tiny_llama(
    dest: Path,
    *,
    layers: int = SMALL.layers,
    hidden: int = SMALL.hidden,
    heads: int = SMALL.heads,
    kv_heads: int = SMALL.kv_heads,
    head_dim: int = SMALL.head_dim,
    vocab: int = SMALL.vocab,
    max_positions: int = SMALL.max_positions,
    seed: int = 0,
) -> Path:
    """Write a random-weight LlamaForCausalLM (safetensors) and a locally trained BPE
    tokenizer into `dest`; the same arguments give the same files. Returns `dest`."""
    if head_dim not in CPU_HEAD_SIZES:
        raise ValueError(f"head_dim = {head_dim} is not supported: vLLM's CPU attention takes one of {CPU_HEAD_SIZES}")
    if heads % kv_heads:
        raise ValueError(f"heads = {heads} is not a multiple of kv_heads = {kv_heads}")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    write_tokenizer(dest, vocab, seed, max_positions)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m lmcache_ext.tiny_llama DIR  (writes the demo's random-weight Llama into DIR)")
    print(build_tiny_llama(Path(sys.argv[1])))
