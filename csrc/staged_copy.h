// A staged copy, shared by the CUDA path and its CPU twin: the page-copy kernel
// moves pages between the paged cache and a compact staging buffer on the cache's
// device ([layer][block][page], nothing between), and one strided copy moves the
// staging rows to or from exactly the places in the host chunk that the pages
// occupy. The host chunk is laid out like every chunk, [layer][block][page] with
// host_layer_stride between layers; its bytes outside those rows (other blocks of
// the chunk, other layers) are never read nor written.
#pragma once

#include <cstdint>

#include "page_copy.h"
#include "status.h"

namespace lmc {

struct StagedCopy {
  // The pages: layer_ptrs, num_layers, block_stride, page_bytes, block_ids, num_blocks.
  // Its chunk fields are ignored (plan_staged_copy sets them for the staging buffer).
  PageCopyArgs pages;
  int64_t staging_ptr = 0;
  int64_t staging_bytes = 0;
  int64_t host_ptr = 0;
  int64_t host_bytes = 0;
  int64_t host_layer_stride = 0;  // bytes from one layer to the next in the host chunk
  int32_t host_first_layer = 0;   // the chunk layer that pages.layer_ptrs[0] belongs to
};

// One row per copied layer: width bytes at host_ptr + host_offset + r * host_pitch and
// at staging_ptr + r * staging_pitch.
struct StagedRows {
  int64_t host_offset = 0;
  int64_t host_pitch = 0;
  int64_t staging_pitch = 0;
  int64_t width = 0;
  int64_t rows = 0;  // 0: nothing to copy
};

// Checks every argument (the buffers must hold what the rows touch) and fills the
// kernel's arguments (paged <-> staging) and the rows (staging <-> host).
Status plan_staged_copy(const StagedCopy& s, PageCopyArgs* kernel, StagedRows* rows);

}  // namespace lmc
