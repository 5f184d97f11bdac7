#include "page_copy_runs.h"

#include <cstring>

namespace lmc {

Status copy_runs(const PageCopyArgs& a, std::vector<CopyRun>* runs) {
  Status st = validate(a);
  if (!st.ok()) return st;
  runs->clear();
  const int64_t pages = num_pages(a);
  for (int64_t p = 0; p < pages; ++p) {
    const PageRef ref = page_ref(a, p);
    if (!runs->empty()) {
      CopyRun& last = runs->back();
      if (last.paged + last.bytes == ref.paged && last.chunk + last.bytes == ref.chunk) {
        last.bytes += a.page_bytes;
        continue;
      }
    }
    runs->push_back({ref.paged, ref.chunk, a.page_bytes});
  }
  return Status::Ok();
}

namespace cpu {

Status page_copy_runs(const PageCopyArgs& a, CopyDirection dir) {
  std::vector<CopyRun> runs;
  Status st = copy_runs(a, &runs);
  if (!st.ok()) return st;
  for (const CopyRun& r : runs) {
    char* paged = reinterpret_cast<char*>(r.paged);
    char* chunk = reinterpret_cast<char*>(r.chunk);
    if (dir == CopyDirection::kGather)
      std::memcpy(chunk, paged, static_cast<size_t>(r.bytes));
    else
      std::memcpy(paged, chunk, static_cast<size_t>(r.bytes));
  }
  return Status::Ok();
}

}  // namespace cpu

}  // namespace lmc
