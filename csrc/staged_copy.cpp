#include "staged_copy.h"

#include <string>

namespace lmc {

namespace {

std::string str(__int128 v) { return v > INT64_MAX ? "more than 2^63" : std::to_string(static_cast<int64_t>(v)); }

}  // namespace

Status plan_staged_copy(const StagedCopy& s, PageCopyArgs* kernel, StagedRows* rows) {
  using std::to_string;
  const int64_t n = s.pages.num_blocks;
  if (n > 0 && s.staging_ptr == 0) return Status::InvalidArgument("staging_ptr is a null address");
  *kernel = s.pages;
  kernel->chunk_ptr = s.staging_ptr;
  kernel->chunk_table = nullptr;
  kernel->blocks_per_chunk = n > 0 ? n : 1;
  kernel->chunk_layer_stride = n * s.pages.page_bytes;
  kernel->chunk_first_layer = 0;
  Status st = validate(*kernel);
  if (!st.ok()) return st;
  *rows = StagedRows{};
  if (n == 0) return Status::Ok();
  if (s.host_ptr == 0) return Status::InvalidArgument("host_ptr is a null address");
  if (s.host_first_layer < 0)
    return Status::InvalidArgument("host_first_layer = " + to_string(s.host_first_layer) + " must be >= 0");
  const int64_t layers = s.pages.num_layers;
  const __int128 width = static_cast<__int128>(n) * s.pages.page_bytes;
  const bool strided = layers > 1 || s.host_first_layer > 0;
  if (strided && s.host_layer_stride < width)
    return Status::InvalidArgument("host_layer_stride = " + to_string(s.host_layer_stride) +
                                   " must be at least num_blocks * page_bytes = " + str(width));
  const __int128 staging_need = width * layers;
  if (s.staging_bytes < staging_need)
    return Status::InvalidArgument("staging_bytes = " + to_string(s.staging_bytes) + " is less than the " +
                                   str(staging_need) + " bytes the pages take in the staging buffer");
  const __int128 host_offset = static_cast<__int128>(s.host_first_layer) * s.host_layer_stride;
  const __int128 host_end = host_offset + static_cast<__int128>(layers - 1) * s.host_layer_stride + width;
  if (s.host_bytes < host_end)
    return Status::InvalidArgument("host_bytes = " + to_string(s.host_bytes) +
                                   " is less than the end of the last row the pages occupy = " + str(host_end));
  // host_end <= host_bytes, so every value below fits in 64 bits.
  const int64_t w = static_cast<int64_t>(width);
  *rows = {static_cast<int64_t>(host_offset), layers > 1 ? s.host_layer_stride : w, w, w, layers};
  return Status::Ok();
}

}  // namespace lmc
