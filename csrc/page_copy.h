// Index math of a page copy, shared by the CUDA kernels and their CPU twins.
//
// A page is the bytes of one block of one layer. Layer l's page for block id b
// starts at layer_ptrs[l] + b * block_stride and is page_bytes long. A chunk
// buffer holds pages laid out [layer][block][page_bytes]; one copy may spread
// its block list over several chunks of blocks_per_chunk blocks each.
#pragma once

#include <cstdint>

#include "status.h"

#if defined(__CUDACC__)
#define LMC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LMC_HOST_DEVICE inline
#endif

namespace lmc {

// Layer addresses travel by value (kernel parameter space), so no device table
// has to be kept in sync with the layer list.
constexpr int kMaxLayers = 256;

enum class CopyDirection : int {
  kGather = 0,   // paged cache -> chunk buffer
  kScatter = 1,  // chunk buffer -> paged cache
};

struct PageCopyArgs {
  int64_t layer_ptrs[kMaxLayers];  // base address of each layer's paged cache
  int32_t num_layers = 0;
  int64_t block_stride = 0;            // bytes from one block of a layer to the next
  int64_t page_bytes = 0;              // bytes of one (layer, block) page
  const int64_t* block_ids = nullptr;  // num_blocks ids, readable where the copy runs
  int64_t num_blocks = 0;
  // Chunk c starts at chunk_table[c]; with no table there is one chunk at chunk_ptr.
  const int64_t* chunk_table = nullptr;
  int64_t chunk_ptr = 0;
  int64_t blocks_per_chunk = 1;
  int64_t chunk_layer_stride = 0;  // bytes from one layer to the next inside a chunk
  int32_t chunk_first_layer = 0;   // layer index inside the chunk of layer_ptrs[0]
};

struct PageRef {
  int64_t paged;  // address of the page in the paged cache
  int64_t chunk;  // address of the page in its chunk buffer
};

LMC_HOST_DEVICE int64_t num_pages(const PageCopyArgs& a) { return static_cast<int64_t>(a.num_layers) * a.num_blocks; }

// Pages are numbered layer-major, so consecutive pages of one layer land next
// to each other in the chunk buffer.
LMC_HOST_DEVICE PageRef page_ref(const PageCopyArgs& a, int64_t page) {
  const int64_t layer = page / a.num_blocks;
  const int64_t i = page - layer * a.num_blocks;
  const int64_t chunk = i / a.blocks_per_chunk;
  const int64_t in_chunk = i - chunk * a.blocks_per_chunk;
  const int64_t chunk_base = a.chunk_table != nullptr ? a.chunk_table[chunk] : a.chunk_ptr;
  PageRef ref;
  ref.paged = a.layer_ptrs[layer] + a.block_ids[i] * a.block_stride;
  ref.chunk = chunk_base + (a.chunk_first_layer + layer) * a.chunk_layer_stride + in_chunk * a.page_bytes;
  return ref;
}

// Checks what the C++ side can see without reading device memory. Block ids
// are range-checked by the caller, which knows the cache size.
Status validate(const PageCopyArgs& a);

}  // namespace lmc
