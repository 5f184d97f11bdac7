"""The remote tier (Redis or Valkey, lmcache_ext.tiers.remote) as the registry sees it.
It is a module of its own because the tier's client, valkey-glide, is an optional
extra: this description imports it only when a config asks for the remote tier."""

from __future__ import annotations

from lmcache_ext.plans import Source
from lmcache_ext.remote_url import mask_password
from lmcache_ext.tiers import ReplicaIO, TierHoldings, TierIO, TierKind, TierSetup


def _open_io(setup: TierSetup) -> TierIO:
    from lmcache_ext.tiers.remote import RemoteStore, RemoteTier

    io = RemoteTier(RemoteStore(setup.config, setup.namespace), setup.rank, owns_store=True)
    return ReplicaIO(io) if setup.reads_only else io


def _open_holdings(setup: TierSetup) -> TierHoldings:
    from lmcache_ext.tiers.in_flight import PendingChunks
    from lmcache_ext.tiers.remote import RemotePresence, RemoteStore

    config = setup.config
    store = RemoteStore(config, setup.namespace, connections=1)
    ranks = setup.holders
    ttl_s = config.pd_marker_ttl_ms / 1000
    return RemotePresence(
        store,
        lambda key: [(key, rank) for rank in ranks],
        owns_store=True,
        mark_ttl_s=ttl_s if config.announces_stores else None,
        pending=PendingChunks(config.pd_wait_s, ttl_s) if config.pd_wait_s else None,
    )


TIER = TierKind(
    name=Source.REMOTE,
    hit_source="external_unspecified",
    configured=lambda config: bool(config.remote_url),
    open_io=_open_io,
    open_holdings=_open_holdings,
    describe=lambda config: f"remote {mask_password(config.remote_url or '')}",
    read_threads=lambda config: config.remote_connections,
)
