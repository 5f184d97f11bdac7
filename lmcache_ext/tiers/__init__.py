"""Storage tiers below host memory: one class per tier, each moving chunk bytes
between a host slot and its store."""

from lmcache_ext.tiers.disk import DiskTier

__all__ = ["DiskTier"]
