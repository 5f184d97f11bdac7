"""The host tier's memory seen from Python: slots of one arena as tensors.

The arena, its allocator and its reference counts live in C++ (``HostSlotPool`` in
``csrc/host_slot_pool.h``, bound as ``_C.HostSlotPool``; one name from C++ to
Python), so C++ transfer threads and Python share one source of truth. It is
page-locked when a CUDA device is there (``pin``), plain memory otherwise. This module adds what only Python needs: zero-copy ``torch`` views of a
slot, and sizing a pool from a byte budget such as ``max_local_cpu_size``.
"""

from __future__ import annotations

import torch

from lmcache_ext import _C
from lmcache_ext.config import STAGING_SLOTS, CacheConfig


class HostSlotPool(_C.HostSlotPool):
    """A pool of equal host slots, one full KV chunk each.

    ``HostSlotPool(slot_bytes, num_slots, pin="auto", lock=False, device=-1, *,
    shared=False, attach="")``. Inherits ``alloc() -> int | None``, ``free``, ``pin``,
    ``unpin``, ``refcount``, ``address``, the slot stamps and the size properties from
    ``_C.HostSlotPool``; each slot starts on a 4096-byte boundary (``slot_stride``
    apart). ``shared`` makes an arena that other processes ``attach`` to
    (``replica_pool``).

    Page-locking registers the arena with CUDA device ``device`` (-1: the creating
    thread's current one, which is the worker's own device in vLLM); that device is
    made current again to unregister it, whatever thread drops the pool. It fails
    creation, with CUDA's error text, rather than leave a pool that every CUDA copy
    would refuse later. A forked child never inherits the arena (MADV_DONTFORK).
    """

    @classmethod
    def slots_for(cls, total_bytes: int, slot_bytes: int) -> int:
        """How many slots of `slot_bytes` fit in `total_bytes`, counting each slot's padded
        stride (also what the scheduler's accounting twin of a worker's pool uses)."""
        if isinstance(total_bytes, bool) or not isinstance(total_bytes, int):
            raise TypeError(f"total_bytes = {total_bytes!r}: expected an int number of bytes")
        stride = cls.stride_for(slot_bytes)
        if total_bytes < stride:
            raise ValueError(
                f"total_bytes = {total_bytes} holds no slot: slot_bytes = {slot_bytes} "
                f"takes {stride} bytes (a 4096-aligned stride)"
            )
        return total_bytes // stride

    @classmethod
    def for_budget(
        cls, total_bytes: int, slot_bytes: int, *, pin: str = "auto", lock: bool = False, device: int = -1
    ) -> HostSlotPool:
        """As many slots as fit in ``total_bytes`` (`slots_for`)."""
        return cls(slot_bytes, cls.slots_for(total_bytes, slot_bytes), pin=pin, lock=lock, device=device)

    @classmethod
    def slots_for_config(cls, config: CacheConfig, slot_bytes: int) -> int:
        """Slots of `slot_bytes` in the host pool that `config` asks for: as many as fit in
        max_local_cpu_size, or with local_cpu off STAGING_SLOTS to stage lower-tier
        transfers through. The engine, the connector's workers and the scheduler's
        accounting twin of their pools are all sized here."""
        return cls.slots_for(config.host_bytes, slot_bytes) if config.local_cpu else STAGING_SLOTS

    @classmethod
    def for_config(
        cls, config: CacheConfig, slot_bytes: int, *, device: int = -1, shared: bool = False, attach: str = ""
    ) -> HostSlotPool:
        """The host pool that `config` asks for (`slots_for_config`)."""
        num_slots = cls.slots_for_config(config, slot_bytes)
        return cls(slot_bytes, num_slots, pin=config.pin_host_memory, device=device, shared=shared, attach=attach)

    def view(self, slot: int) -> torch.Tensor:
        """The slot's ``slot_bytes`` as a writable uint8 tensor, zero-copy.

        The tensor holds a reference to the pool, so the arena outlives every view;
        it does not hold the slot: allocate or pin it for as long as the view is used.
        """
        offset = self.address(slot) - self.base_address
        return torch.frombuffer(self, dtype=torch.uint8, count=self.slot_bytes, offset=offset)
