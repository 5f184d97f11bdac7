// The DMA path's plan of a page copy: its pages as runs of contiguous bytes.
//
// A copy engine moves one (dst, src, bytes) triple per descriptor whatever its size,
// so the fewer and longer the pieces the better: consecutive pages whose paged
// addresses and chunk addresses both continue the previous page's merge into one
// run (consecutive block ids of a per-layer cache, any block of a cross-layer cache
// copied whole). The runs are computed on the host from page_ref(), the index math
// the kernels and their CPU twins use, so block ids and the chunk table must be
// host-readable here.
#pragma once

#include <cstdint>
#include <vector>

#include "page_copy.h"
#include "status.h"

namespace lmc {

struct CopyRun {
  int64_t paged;  // first byte in the paged cache
  int64_t chunk;  // first byte in the chunk buffer
  int64_t bytes;
};

// The runs of `a` in page order (validate(a) first; `a.block_ids` and `a.chunk_table`
// are read on the host).
Status copy_runs(const PageCopyArgs& a, std::vector<CopyRun>* runs);

namespace cpu {

// The DMA path's CPU twin: one memcpy per run, so CPU tests cover the run plan.
Status page_copy_runs(const PageCopyArgs& a, CopyDirection dir);

}  // namespace cpu

}  // namespace lmc
