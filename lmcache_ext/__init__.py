"""lmcache_ext: a KV-cache layer for vLLM (paged-KV copy kernels, pinned host slots, tiers)."""

from lmcache_ext._C import build_info

__all__ = ["build_info"]
__version__ = build_info()["version"]
