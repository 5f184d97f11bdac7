// CUDA page-copy kernel and its launchers (zero-copy and staged).
//
// Launch shape: a 2-D grid of kThreads-thread CTAs. blockIdx.y is the segment
// of a page, blockIdx.x the page (a grid-stride loop covers more pages than
// gridDim.x allows); one CTA copies one segment of one page with all its
// threads. Segments are at least 16 KiB (when the page is that large), small
// enough that the grid has about kTargetCtas CTAs even for a few huge pages
// (cross-layer layouts), and large enough that a page needs at most 65535 of
// them. All address math is page_ref(), the same function the CPU twin runs.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda_api.h"
#include "page_copy.h"

namespace lmc::cuda {

Status check_cuda(cudaError_t err, const std::string& call);  // cuda_runtime.cu

namespace {

static_assert(sizeof(PageCopyArgs) <= 4096,
              "PageCopyArgs is passed by value as a kernel parameter (4 KiB limit)");

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread
constexpr int64_t kSegmentAlign = kThreads * 16;               // one CTA-wide pass of uint4
constexpr int64_t kMinSegmentBytes = kSegmentAlign * kUnroll;  // one unrolled round: 16 KiB
constexpr int64_t kTargetCtas = 2048;  // a few waves on any current GPU (H200: 132 SMs x 4 CTAs)
constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridY = 65535;

// Copies n bytes as words of type T (dst and src must be T-aligned); the last
// n % sizeof(T) bytes go byte by byte. Each thread issues kUnroll loads before
// its stores, including in a segment's last, partial round.
template <typename T>
__device__ __forceinline__ void copy_words(char* __restrict__ dst, const char* __restrict__ src,
                                           int64_t n) {
  __builtin_assume(__isGlobal(dst) && __isGlobal(src));  // LDG/STG instead of generic LD/ST
  T* __restrict__ d = reinterpret_cast<T*>(dst);
  const T* __restrict__ s = reinterpret_cast<const T*>(src);
  const int64_t count = n / static_cast<int64_t>(sizeof(T));
  const int64_t t = threadIdx.x;
  for (int64_t i = t; i < count; i += kUnroll * kThreads) {
    T v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * kThreads < count) v[u] = s[i + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * kThreads < count) d[i + u * kThreads] = v[u];
  }
  const int64_t done = count * static_cast<int64_t>(sizeof(T));
  if (t < n - done) dst[done + t] = src[done + t];
}

// The widest access both addresses allow. dst and src depend only on the
// block's page and segment, so the whole CTA takes the same branch.
__device__ __forceinline__ void copy_segment(char* dst, const char* src, int64_t n) {
  const uint64_t both = reinterpret_cast<uint64_t>(dst) | reinterpret_cast<uint64_t>(src);
  if (both % 16 == 0)
    copy_words<uint4>(dst, src, n);
  else if (both % 8 == 0)
    copy_words<uint2>(dst, src, n);
  else if (both % 4 == 0)
    copy_words<uint32_t>(dst, src, n);
  else
    copy_words<unsigned char>(dst, src, n);
}

// __grid_constant__ lets page_ref() read the ~2 KiB of arguments by reference
// straight from parameter space instead of a per-thread local copy.
template <CopyDirection kDir>
__global__ void __launch_bounds__(kThreads)
    page_copy_kernel(const __grid_constant__ PageCopyArgs a, int64_t segment_bytes) {
  const int64_t pages = num_pages(a);
  const int64_t offset = static_cast<int64_t>(blockIdx.y) * segment_bytes;
  const int64_t rest = a.page_bytes - offset;
  const int64_t len = rest < segment_bytes ? rest : segment_bytes;
  for (int64_t page = blockIdx.x; page < pages; page += gridDim.x) {
    const PageRef ref = page_ref(a, page);
    char* paged = reinterpret_cast<char*>(ref.paged) + offset;
    char* chunk = reinterpret_cast<char*>(ref.chunk) + offset;
    if constexpr (kDir == CopyDirection::kGather)
      copy_segment(chunk, paged, len);
    else
      copy_segment(paged, chunk, len);
  }
}

int64_t ceil_div(int64_t x, int64_t y) { return x / y + (x % y != 0); }
int64_t round_up(int64_t x, int64_t y) { return ceil_div(x, y) * y; }

struct LaunchShape {
  dim3 grid;
  int64_t segment_bytes;
};

// Segments are multiples of kSegmentAlign (so every segment starts as aligned
// as its page) except when one segment is the whole page.
LaunchShape launch_shape(int64_t page_bytes, int64_t pages) {
  const int64_t for_ctas = ceil_div(page_bytes, ceil_div(kTargetCtas, pages));
  const int64_t for_grid_y = ceil_div(page_bytes, kMaxGridY);
  const int64_t segment =
      std::min(page_bytes, round_up(std::max({for_ctas, for_grid_y, kMinSegmentBytes}), kSegmentAlign));
  const int64_t segments = ceil_div(page_bytes, segment);
  return {dim3(static_cast<unsigned>(std::min(pages, kMaxGridX)), static_cast<unsigned>(segments)),
          segment};
}

// One launch on `stream`, no host sync; pages == 0 launches nothing.
Status launch_page_copy(const PageCopyArgs& a, CopyDirection dir, cudaStream_t stream) {
  const int64_t pages = num_pages(a);
  if (pages == 0) return Status::Ok();
  const LaunchShape shape = launch_shape(a.page_bytes, pages);
  if (dir == CopyDirection::kGather)
    page_copy_kernel<CopyDirection::kGather>
        <<<shape.grid, kThreads, 0, stream>>>(a, shape.segment_bytes);
  else
    page_copy_kernel<CopyDirection::kScatter>
        <<<shape.grid, kThreads, 0, stream>>>(a, shape.segment_bytes);
  return check_cuda(cudaGetLastError(), "page_copy kernel launch (" + std::to_string(pages) +
                                            " pages of " + std::to_string(a.page_bytes) + " bytes)");
}

// Bytes of the staging buffer that the pages occupy: from its start to the end
// of the last block of the last layer (no chunk table, so block i sits at i).
__int128 staged_extent(const PageCopyArgs& a) {
  const __int128 last_layer = static_cast<__int128>(a.chunk_first_layer) + a.num_layers - 1;
  return last_layer * a.chunk_layer_stride + static_cast<__int128>(a.num_blocks) * a.page_bytes;
}

}  // namespace

Status page_copy(const PageCopyArgs& a, CopyDirection dir, int64_t stream) {
  Status st = validate(a);
  if (!st.ok()) return st;
  return launch_page_copy(a, dir, reinterpret_cast<cudaStream_t>(stream));
}

// Checks every argument before anything is queued. The memcpy and the kernel
// go to the same stream, so gather's copy-out waits for the kernel and
// scatter's kernel waits for the copy-in; host_ptr should be page-locked for
// the memcpy to be asynchronous.
Status page_copy_staged(const PageCopyArgs& a, CopyDirection dir, int64_t host_ptr, int64_t bytes,
                        int64_t stream) {
  Status st = validate(a);
  if (!st.ok()) return st;
  if (a.chunk_table != nullptr)
    return Status::InvalidArgument(
        "page_copy_staged takes one staging buffer (chunk_ptr), not a chunk table");
  if (num_pages(a) == 0) return Status::Ok();
  if (bytes <= 0)
    return Status::InvalidArgument("bytes = " + std::to_string(bytes) + " must be positive");
  if (host_ptr == 0) return Status::InvalidArgument("host_ptr is a null address");
  const __int128 extent = staged_extent(a);
  if (bytes < extent)
    return Status::InvalidArgument("bytes = " + std::to_string(bytes) +
                                   " is less than the staging bytes the pages occupy = " +
                                   std::to_string(static_cast<int64_t>(
                                       std::min<__int128>(extent, INT64_MAX))));
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  void* staging = reinterpret_cast<void*>(a.chunk_ptr);
  void* host = reinterpret_cast<void*>(host_ptr);
  const size_t n = static_cast<size_t>(bytes);
  const std::string what = "(" + std::to_string(bytes) + " bytes)";
  if (dir == CopyDirection::kGather) {
    st = launch_page_copy(a, dir, s);
    if (!st.ok()) return st;
    return check_cuda(cudaMemcpyAsync(host, staging, n, cudaMemcpyDeviceToHost, s),
                      "cudaMemcpyAsync staging -> host " + what);
  }
  st = check_cuda(cudaMemcpyAsync(staging, host, n, cudaMemcpyHostToDevice, s),
                  "cudaMemcpyAsync host -> staging " + what);
  if (!st.ok()) return st;
  return launch_page_copy(a, dir, s);
}

}  // namespace lmc::cuda
