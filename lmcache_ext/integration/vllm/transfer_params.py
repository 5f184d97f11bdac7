"""The `kv_transfer_params` of disaggregated prefill, as NixlConnector-style proxies pass
them: the proxy sends a request to the prefill instance with ``do_remote_decode``, takes
the parameters of its answer and sends them with the same request to a decode instance.
Ours name how many leading tokens the prefill instance stored and the key of their last
chunk; the decode instance waits for exactly those chunks (up to ``pd_wait_ms``), with or
without in-flight marks, and only if its own keys of those tokens end on that key.

The NIXL fields are kept (``do_remote_prefill`` true, the rest null) so that vLLM treats
the decode request as the second half of a disaggregated one, as with NixlConnector: it
reports the prefill instance's own hit as the request's ``cached_tokens``."""

from __future__ import annotations

import logging
from typing import Any

from lmcache_ext.keys import KEY_BYTES, ChunkKey

logger = logging.getLogger(__name__)

OURS = "lmcache_ext"


def wants_transfer_params(request: Any) -> bool:
    """Whether the proxy asked this (prefill) request for the parameters of a decode half."""
    params = getattr(request, "kv_transfer_params", None)
    return isinstance(params, dict) and bool(params.get("do_remote_decode"))


def transfer_params(tokens: int, last_key: ChunkKey | None) -> dict[str, Any]:
    """What a prefill instance hands its decode instance: it stored the first `tokens`."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
        OURS: {"tokens": tokens, "last_key": last_key.hex() if last_key is not None else None},
    }


def stored_by_producer(request: Any) -> tuple[int, str] | None:
    """(tokens, last chunk key in hex) that the request's prefill instance stored, from
    its kv_transfer_params; None where there are none of ours. Malformed ones are
    logged, naming the value, and ignored: they come over the network with a request,
    which must not fail for them."""
    params = getattr(request, "kv_transfer_params", None)
    ours = params.get(OURS) if isinstance(params, dict) else None
    if ours is None:
        return None
    tokens = ours.get("tokens") if isinstance(ours, dict) else None
    last_key = ours.get("last_key") if isinstance(ours, dict) else None
    if tokens == 0 and last_key is None:
        return None  # the prefill instance stored nothing
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0 or not isinstance(last_key, str):
        logger.warning(
            "request %s: kv_transfer_params[%r] = %r is not what a prefill instance sends (expected "
            "{'tokens': a count >= 0, 'last_key': a chunk key in hex}); not waited for",
            getattr(request, "request_id", "?"),
            OURS,
            ours,
        )
        return None
    if not _is_key_hex(last_key):
        logger.warning(
            "request %s: kv_transfer_params[%r] = %r names no chunk key (expected %d bytes in hex); not waited for",
            getattr(request, "request_id", "?"),
            OURS,
            ours,
            KEY_BYTES,
        )
        return None
    return tokens, last_key


def _is_key_hex(value: str) -> bool:
    try:
        return len(bytes.fromhex(value)) == KEY_BYTES
    except ValueError:
        return False
