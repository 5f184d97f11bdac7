"""What this installation is and what a cache is set up to hold, in words: the start-up
line in vLLM's log and ``python -m lmcache_ext info`` say it the same way."""

from __future__ import annotations

from lmcache_ext import _C
from lmcache_ext.config import CacheConfig


def format_bytes(n: int) -> str:
    """`n` bytes in the largest binary unit that keeps it >= 1 (``1.5 GiB``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def build_line() -> str:
    """``lmcache_ext 0.1.0, CUDA build (archs 80;90, CUDA runtime 13.0)`` or ``..., CPU build``."""
    info = _C.build_info()
    if not info["cuda"]:
        return f"lmcache_ext {info['version']}, CPU build"
    runtime = info["cuda_runtime_version"]
    return (
        f"lmcache_ext {info['version']}, CUDA build (archs {info['cuda_archs']}, "
        f"CUDA runtime {runtime // 1000}.{runtime % 1000 // 10})"
    )


def devices() -> list[str]:
    """The CUDA devices visible now, by index and name (names from torch when it has CUDA)."""
    count = _C.cuda_device_count()
    names: list[str] = []
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(count)]
    except (ImportError, RuntimeError):
        pass
    return [f"cuda:{i} {names[i]}" if i < len(names) else f"cuda:{i}" for i in range(count)]


def tiers_line(config: CacheConfig, num_slots: int, slot_bytes: int, ranks: int = 1) -> str:
    """The tiers a cache holds and their sizes: host slots (each `slot_bytes`, per rank
    of `ranks`), then each lower tier as it describes itself (the disk directory and its
    cap, the remote store with its password masked)."""
    host = (
        f"host {format_bytes(num_slots * slot_bytes * ranks)} ({num_slots} slots of {format_bytes(slot_bytes)}"
        f"{f' x {ranks} ranks' if ranks > 1 else ''})"
    )
    if not config.local_cpu:
        host = f"host off ({num_slots} staging slots)"
    from lmcache_ext.tiers import configured_tiers  # the tiers' modules format their own parts

    parts = [host, *(kind.describe(config) for kind in configured_tiers(config))]
    return ", ".join(parts) + f"; chunks of {config.chunk_size} tokens"
