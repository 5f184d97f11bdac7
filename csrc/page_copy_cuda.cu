// CUDA page-copy kernel and its launchers (zero-copy and staged).
//
// Launch shape (launch_shape.h): a 2-D grid of kCopyThreads-thread CTAs. blockIdx.y
// is the segment of a page, blockIdx.x the first page of a grid-stride loop over
// pages; one CTA copies one segment of one page at a time with all its threads.
// A capped grid (host <-> device copies) keeps the same shape with fewer CTAs in x.
// All address math is page_ref(), the same function the CPU twin runs.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>

#include "cuda_api.h"
#include "cuda_device.h"
#include "launch_shape.h"
#include "page_copy.h"

namespace lmc::cuda {

namespace {

static_assert(sizeof(PageCopyArgs) <= 4096, "PageCopyArgs is passed by value as a kernel parameter (4 KiB limit)");

constexpr int kThreads = kCopyThreads;
constexpr int kUnroll = kCopyUnroll;

// Copies n bytes as words of type T (dst and src must be T-aligned); the last
// n % sizeof(T) bytes go byte by byte. Each thread issues kUnroll loads before
// its stores, including in a segment's last, partial round.
template <typename T>
__device__ __forceinline__ void copy_words(char* __restrict__ dst, const char* __restrict__ src, int64_t n) {
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

// One launch on `stream`, no host sync; pages == 0 launches nothing.
Status launch_page_copy(const PageCopyArgs& a, CopyDirection dir, cudaStream_t stream, int64_t max_ctas) {
  const int64_t pages = num_pages(a);
  if (pages == 0) return Status::Ok();
  LaunchShape shape;
  Status st = launch_shape(a.page_bytes, pages, max_ctas, &shape);
  if (!st.ok()) return st;
  const dim3 grid(static_cast<unsigned>(shape.grid_x), static_cast<unsigned>(shape.grid_y));
  if (dir == CopyDirection::kGather)
    page_copy_kernel<CopyDirection::kGather><<<grid, kThreads, 0, stream>>>(a, shape.segment_bytes);
  else
    page_copy_kernel<CopyDirection::kScatter><<<grid, kThreads, 0, stream>>>(a, shape.segment_bytes);
  return check_cuda(cudaGetLastError(), "page_copy kernel launch (" + std::to_string(pages) + " pages of " +
                                            std::to_string(a.page_bytes) + " bytes)");
}

// The rows between staging and host: one cudaMemcpy2DAsync, or one copy per row where
// a pitch is beyond what cudaMemcpy2D takes.
Status copy_rows(const StagedCopy& s, const StagedRows& rows, CopyDirection dir, cudaStream_t stream) {
  char* host = reinterpret_cast<char*>(s.host_ptr) + rows.host_offset;
  char* staging = reinterpret_cast<char*>(s.staging_ptr);
  const bool to_host = dir == CopyDirection::kGather;
  char* dst = to_host ? host : staging;
  const char* src = to_host ? staging : host;
  const int64_t dst_pitch = to_host ? rows.host_pitch : rows.staging_pitch;
  const int64_t src_pitch = to_host ? rows.staging_pitch : rows.host_pitch;
  const cudaMemcpyKind kind = to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
  const std::string what = std::string("cudaMemcpy2DAsync ") + (to_host ? "staging -> host" : "host -> staging") +
                           " (" + std::to_string(rows.rows) + " rows of " + std::to_string(rows.width) + " bytes)";
  if (rows.host_pitch <= INT_MAX)
    return check_cuda(cudaMemcpy2DAsync(dst, static_cast<size_t>(dst_pitch), src, static_cast<size_t>(src_pitch),
                                        static_cast<size_t>(rows.width), static_cast<size_t>(rows.rows), kind, stream),
                      what);
  for (int64_t r = 0; r < rows.rows; ++r) {
    Status st = check_cuda(
        cudaMemcpyAsync(dst + r * dst_pitch, src + r * src_pitch, static_cast<size_t>(rows.width), kind, stream),
        "cudaMemcpyAsync of row " + std::to_string(r) + " of " + what);
    if (!st.ok()) return st;
  }
  return Status::Ok();
}

}  // namespace

Status page_copy(const PageCopyArgs& a, CopyDirection dir, const Launch& launch) {
  Status st = validate(a);
  if (!st.ok()) return st;
  DeviceScope scope;
  st = scope.enter(launch.device, "page_copy");
  if (!st.ok()) return st;
  return launch_page_copy(a, dir, reinterpret_cast<cudaStream_t>(launch.stream), launch.max_ctas);
}

// Everything is checked before anything is queued. The rows and the kernel go to
// the same stream, so gather's copy-out waits for the kernel and scatter's kernel
// waits for the copy-in; the host chunk should be page-locked for the copy to be
// asynchronous.
Status page_copy_staged(const StagedCopy& s, CopyDirection dir, const Launch& launch) {
  PageCopyArgs kernel;
  StagedRows rows;
  Status st = plan_staged_copy(s, &kernel, &rows);
  if (!st.ok() || rows.rows == 0) return st;
  DeviceScope scope;
  st = scope.enter(launch.device, "page_copy_staged");
  if (!st.ok()) return st;
  const auto stream = reinterpret_cast<cudaStream_t>(launch.stream);
  if (dir == CopyDirection::kGather) {
    st = launch_page_copy(kernel, dir, stream, launch.max_ctas);
    return st.ok() ? copy_rows(s, rows, dir, stream) : st;
  }
  st = copy_rows(s, rows, dir, stream);
  return st.ok() ? launch_page_copy(kernel, dir, stream, launch.max_ctas) : st;
}

}  // namespace lmc::cuda
