"""Integrations of lmcache_ext with serving engines."""
