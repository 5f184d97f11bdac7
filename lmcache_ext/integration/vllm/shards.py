"""The cache's geometry as both halves of the connector derive it from vLLM's configuration."""

from __future__ import annotations

from typing import Any

from lmcache_ext.config import CacheConfig
from lmcache_ext.geometry import Geometry


def geometry_from_vllm(vllm_config: Any, kv_cache_config: Any, config: CacheConfig) -> Geometry | None:
    """None when the model has no KV cache at all (an encoder-only or attention-free
    model): there is nothing to cache."""
    groups = kv_cache_config.kv_cache_groups
    if not groups:
        return None
    if len(groups) != 1:
        raise ValueError(
            f"the model has {len(groups)} KV cache groups (a hybrid or sliding-window model); "
            "lmcache_ext supports models with one group of full-attention layers"
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
        num_layers=len(groups[0].layer_names),
        chunk_size=config.chunk_size,
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
        device_type=vllm_config.device_config.device_type,
    )
