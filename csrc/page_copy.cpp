#include "page_copy.h"

#include <string>

namespace lmc {

Status validate(const PageCopyArgs& a) {
  using std::to_string;
  if (a.num_layers < 1 || a.num_layers > kMaxLayers)
    return Status::InvalidArgument("num_layers = " + to_string(a.num_layers) + " must be in [1, " +
                                   to_string(kMaxLayers) + "]");
  if (a.page_bytes <= 0)
    return Status::InvalidArgument("page_bytes = " + to_string(a.page_bytes) + " must be positive");
  if (a.block_stride < a.page_bytes)
    return Status::InvalidArgument("block_stride = " + to_string(a.block_stride) +
                                   " must be at least page_bytes = " + to_string(a.page_bytes));
  if (a.num_blocks < 0) return Status::InvalidArgument("num_blocks = " + to_string(a.num_blocks) + " must be >= 0");
  if (a.blocks_per_chunk < 1)
    return Status::InvalidArgument("blocks_per_chunk = " + to_string(a.blocks_per_chunk) + " must be positive");
  if (a.chunk_first_layer < 0)
    return Status::InvalidArgument("chunk_first_layer = " + to_string(a.chunk_first_layer) + " must be >= 0");
  const int64_t blocks_in_chunk = a.num_blocks < a.blocks_per_chunk ? a.num_blocks : a.blocks_per_chunk;
  if ((a.num_layers > 1 || a.chunk_first_layer > 0) && a.chunk_layer_stride < blocks_in_chunk * a.page_bytes)
    return Status::InvalidArgument(
        "chunk_layer_stride = " + to_string(a.chunk_layer_stride) +
        " must be at least blocks_per_chunk * page_bytes = " + to_string(blocks_in_chunk * a.page_bytes));
  if (a.num_blocks == 0) return Status::Ok();
  if (a.block_ids == nullptr) return Status::InvalidArgument("block_ids is a null address");
  if (a.chunk_table == nullptr) {
    if (a.chunk_ptr == 0) return Status::InvalidArgument("chunk_ptr is a null address");
    if (a.num_blocks > a.blocks_per_chunk)
      return Status::InvalidArgument("num_blocks = " + to_string(a.num_blocks) +
                                     " spans several chunks but no chunk table was given");
  }
  for (int l = 0; l < a.num_layers; ++l)
    if (a.layer_ptrs[l] == 0) return Status::InvalidArgument("layer_ptrs[" + to_string(l) + "] is a null address");
  return Status::Ok();
}

}  // namespace lmc
