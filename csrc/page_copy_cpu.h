// CPU twins of the page-copy kernels: the same page_ref() index math, pages
// spread over a small thread pool, one memcpy (or streaming copy) per page.
#pragma once

#include <cstdint>

#include "page_copy.h"
#include "staged_copy.h"
#include "status.h"

namespace lmc::cpu {

struct CopyOptions {
  int threads = 0;  // 0: min(hardware threads, 4)
  // Copies of at least this many bytes use non-temporal stores (when the CPU
  // has AVX2): a large destination then skips the read-for-ownership of every
  // line. Negative: never.
  int64_t streaming_min_bytes = int64_t{8} << 20;
};

Status set_options(const CopyOptions& options);
CopyOptions options();
bool has_streaming_stores();

Status page_copy(const PageCopyArgs& a, CopyDirection dir);
// The staged copy's twin: the page copy into (or from) the staging buffer, and one
// memcpy per row where the CUDA path runs one cudaMemcpy2DAsync.
Status page_copy_staged(const StagedCopy& s, CopyDirection dir);

}  // namespace lmc::cpu
