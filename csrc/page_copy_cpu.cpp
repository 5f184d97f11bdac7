#include "page_copy_cpu.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "thread_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lmc::cpu {

namespace {

std::mutex g_options_mutex;
CopyOptions g_options;
std::shared_ptr<ThreadPool> g_pool;

int default_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return static_cast<int>(std::clamp(hw, 1u, 4u));
}

std::shared_ptr<ThreadPool> pool() {
  std::lock_guard<std::mutex> lk(g_options_mutex);
  if (!g_pool) g_pool = std::make_shared<ThreadPool>(g_options.threads > 0 ? g_options.threads : default_threads());
  return g_pool;
}

#if defined(__x86_64__)
// 32-byte non-temporal stores from unaligned loads; head and tail by memcpy.
__attribute__((target("avx2"))) void stream_copy(char* dst, const char* src, size_t n) {
  size_t head = (32 - reinterpret_cast<uintptr_t>(dst) % 32) % 32;
  head = std::min(head, n);
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  for (; n >= 128; n -= 128, dst += 128, src += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64));
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 96), d);
  }
  for (; n >= 32; n -= 32, dst += 32, src += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  std::memcpy(dst, src, n);
}

void store_fence() { _mm_sfence(); }

bool cpu_has_avx2() { return __builtin_cpu_supports("avx2"); }
#else
void stream_copy(char* dst, const char* src, size_t n) { std::memcpy(dst, src, n); }
void store_fence() {}
bool cpu_has_avx2() { return false; }
#endif

}  // namespace

bool has_streaming_stores() {
  static const bool has = cpu_has_avx2();
  return has;
}

Status set_options(const CopyOptions& o) {
  if (o.threads < 0 || o.threads > 256)
    return Status::InvalidArgument("threads = " + std::to_string(o.threads) +
                                   " must be in [0, 256] (0 picks a default)");
  std::lock_guard<std::mutex> lk(g_options_mutex);
  if (o.threads != g_options.threads) g_pool.reset();  // running copies keep their own reference
  g_options = o;
  return Status::Ok();
}

CopyOptions options() {
  std::lock_guard<std::mutex> lk(g_options_mutex);
  return g_options;
}

Status page_copy(const PageCopyArgs& a, CopyDirection dir) {
  Status st = validate(a);
  if (!st.ok()) return st;
  const int64_t pages = num_pages(a);
  if (pages == 0) return Status::Ok();
  const int64_t threshold = options().streaming_min_bytes;
  const bool streaming = threshold >= 0 && pages * a.page_bytes >= threshold && has_streaming_stores();
  const bool gather = dir == CopyDirection::kGather;
  const size_t bytes = static_cast<size_t>(a.page_bytes);
  pool()->parallel_for(pages, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const PageRef ref = page_ref(a, p);
      char* paged = reinterpret_cast<char*>(ref.paged);
      char* chunk = reinterpret_cast<char*>(ref.chunk);
      char* dst = gather ? chunk : paged;
      const char* src = gather ? paged : chunk;
      if (streaming)
        stream_copy(dst, src, bytes);
      else
        std::memcpy(dst, src, bytes);
    }
    if (streaming) store_fence();
  });
  return Status::Ok();
}

Status page_copy_staged(const StagedCopy& s, CopyDirection dir) {
  PageCopyArgs kernel;
  StagedRows rows;
  Status st = plan_staged_copy(s, &kernel, &rows);
  if (!st.ok()) return st;
  const bool gather = dir == CopyDirection::kGather;
  if (gather) {
    st = page_copy(kernel, dir);
    if (!st.ok()) return st;
  }
  char* host = reinterpret_cast<char*>(s.host_ptr) + rows.host_offset;
  char* staging = reinterpret_cast<char*>(s.staging_ptr);
  const size_t width = static_cast<size_t>(rows.width);
  for (int64_t r = 0; r < rows.rows; ++r) {
    char* h = host + r * rows.host_pitch;
    char* g = staging + r * rows.staging_pitch;
    if (gather)
      std::memcpy(h, g, width);
    else
      std::memcpy(g, h, width);
  }
  return gather ? Status::Ok() : page_copy(kernel, dir);
}

}  // namespace lmc::cpu
