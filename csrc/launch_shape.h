// The grid of a CUDA page copy, as plain host math: the CUDA launcher uses it, and
// the CPU build binds it too, so tests and benchmarks can see how many CTAs (and so
// at most how many SMs) a copy takes without a GPU.
#pragma once

#include <cstdint>

#include "status.h"

namespace lmc {

constexpr int kCopyThreads = 256;                                  // threads per CTA
constexpr int kCopyUnroll = 4;                                     // 16-byte loads in flight per thread
constexpr int64_t kSegmentAlign = kCopyThreads * 16;               // one CTA-wide pass of 16-byte words
constexpr int64_t kMinSegmentBytes = kSegmentAlign * kCopyUnroll;  // one unrolled round: 16 KiB
// Without a cap: enough CTAs for a few waves on any current GPU when pages are few
// (each page is then cut into segments); one CTA per page when they are many.
constexpr int64_t kTargetCtas = 2048;
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridY = 65535;

// blockIdx.y picks the segment of a page (segment_bytes long, the last one shorter),
// blockIdx.x the first page; a CTA then strides over pages by grid_x.
struct LaunchShape {
  int64_t grid_x = 0;
  int64_t grid_y = 0;
  int64_t segment_bytes = 0;
};

// max_ctas > 0 caps grid_x * grid_y (a grid-stride loop covers the rest): a copy
// to or from host memory is bound by PCIe, which a few hundred KiB in flight fill,
// so it should not hold every SM. max_ctas == 0: no cap. pages >= 1, page_bytes >= 1.
Status launch_shape(int64_t page_bytes, int64_t pages, int64_t max_ctas, LaunchShape* out);

}  // namespace lmc
