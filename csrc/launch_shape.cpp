#include "launch_shape.h"

#include <algorithm>
#include <string>

namespace lmc {

namespace {
int64_t ceil_div(int64_t x, int64_t y) { return x / y + (x % y != 0); }
int64_t round_up(int64_t x, int64_t y) { return ceil_div(x, y) * y; }
}  // namespace

// Segments are multiples of kSegmentAlign (so every segment starts as aligned as
// its page) except when one segment is the whole page.
Status launch_shape(int64_t page_bytes, int64_t pages, int64_t max_ctas, LaunchShape* out) {
  if (page_bytes < 1 || pages < 1)
    return Status::InvalidArgument("launch_shape: page_bytes = " + std::to_string(page_bytes) +
                                   ", pages = " + std::to_string(pages) + ": both must be positive");
  if (max_ctas < 0)
    return Status::InvalidArgument("max_ctas = " + std::to_string(max_ctas) +
                                   ": expected a positive cap, or 0 for none");
  const int64_t target = max_ctas > 0 ? max_ctas : kTargetCtas;
  const int64_t for_ctas = ceil_div(page_bytes, ceil_div(target, pages));
  const int64_t for_grid_y = ceil_div(page_bytes, kMaxGridY);
  const int64_t segment =
      std::min(page_bytes, round_up(std::max({for_ctas, for_grid_y, kMinSegmentBytes}), kSegmentAlign));
  const int64_t segments = ceil_div(page_bytes, segment);
  // segments <= ceil(target / pages), so a capped grid keeps at least one CTA per segment.
  const int64_t pages_at_once = max_ctas > 0 ? std::max<int64_t>(1, max_ctas / segments) : pages;
  *out = {std::min({pages, pages_at_once, kMaxGridX}), segments, segment};
  return Status::Ok();
}

}  // namespace lmc
