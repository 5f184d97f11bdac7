"""TransferExecutor: whole and partial chunk copies between the paged cache and slots."""

from __future__ import annotations

import torch
from kv_layouts import make_layers, page_view

from lmcache_ext import ops
from lmcache_ext.executor import TransferExecutor
from lmcache_ext.memory import PinnedSlotPool
from lmcache_ext.plans import Plan, SlotCopy


def test_partial_copies_address_the_chunk_from_its_first_block():
    for layout in ("LBNHC", "BLHNC"):
        layers = make_layers(layout, 3, 32, 2, 16, 8, torch.float16, seed=1)
        kv = ops.PagedLayers.from_tensors(layers)
        pool = PinnedSlotPool(kv.chunk_bytes(4), 2, pin="never")
        executor = TransferExecutor(kv, pool, {})
        result = executor.run(Plan(gathers=(SlotCopy(0, (4, 5, 6, 7)), SlotCopy(1, (8, 9, 10, 11)))))
        assert result.gathers == (True, True)
        before = [page_view(t).clone() for t in layers]
        # blocks 1..2 of chunk 0 and blocks 0..2 of chunk 1 into fresh places
        executor.run(Plan(scatters=(SlotCopy(0, (20, 21), chunk_blocks=4, first=1), SlotCopy(1, (24, 25, 26), chunk_blocks=4))))
        for layer, t in enumerate(layers):
            pages = page_view(t)
            assert torch.equal(pages[[20, 21]], before[layer][[5, 6]]), (layout, layer)
            assert torch.equal(pages[[24, 25, 26]], before[layer][[8, 9, 10]]), (layout, layer)
            untouched = [b for b in range(32) if b not in (20, 21, 24, 25, 26)]
            assert torch.equal(pages[untouched], before[layer][untouched])
        executor.close()
