"""vLLM integration: ``kv_connector_module_path = "lmcache_ext.integration.vllm"`` with
``kv_connector = "LMCacheConnectorV1Dynamic"`` (or ``"LMCacheConnectorV1"``)."""

from lmcache_ext.integration.vllm.connector import LMCacheConnectorV1, LMCacheConnectorV1Dynamic

__all__ = ["LMCacheConnectorV1", "LMCacheConnectorV1Dynamic"]
