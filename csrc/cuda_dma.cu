// The copy-engine (DMA) path of a page copy: the runs of contiguous bytes
// (page_copy_runs.h) as one cudaMemcpyBatchAsync on CUDA >= 12.8, else (or on the
// legacy default stream, which the batch API refuses) one cudaMemcpyAsync per run.
// No SM runs a copy, so the forward pass keeps every SM; each run costs a descriptor,
// so the path pays off where pages are contiguous (cross-layer blocks, consecutive
// block ids) and large.
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "cuda_api.h"
#include "cuda_device.h"
#include "page_copy_runs.h"

namespace lmc::cuda {

namespace {

Status copy_one_by_one(const std::vector<void*>& dsts, const std::vector<void*>& srcs, const std::vector<size_t>& sizes,
                       cudaStream_t stream) {
  for (size_t i = 0; i < dsts.size(); ++i) {
    Status st = check_cuda(cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, stream),
                           "cudaMemcpyAsync of run " + std::to_string(i) + " of " + std::to_string(dsts.size()));
    if (!st.ok()) return st;
  }
  return Status::Ok();
}

Status copy_batch(std::vector<void*>& dsts, std::vector<void*>& srcs, std::vector<size_t>& sizes, cudaStream_t stream) {
#if CUDART_VERSION >= 12080
  if (stream != nullptr && dsts.size() > 1) {
    cudaMemcpyAttributes attr = {};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;  // after what the stream queued before
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t attr_index = 0;
    const std::string what = "cudaMemcpyBatchAsync of " + std::to_string(dsts.size()) + " runs";
#if CUDART_VERSION >= 13000
    return check_cuda(
        cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(), &attr, &attr_index, 1, stream), what);
#else
    size_t fail_index = 0;
    Status st = check_cuda(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(), &attr, &attr_index,
                                                1, &fail_index, stream),
                           what);
    if (!st.ok()) return Status::CudaError(st.message() + " (at run " + std::to_string(fail_index) + ")");
    return st;
#endif
  }
#endif
  return copy_one_by_one(dsts, srcs, sizes, stream);
}

}  // namespace

bool has_batch_memcpy() { return CUDART_VERSION >= 12080; }

Status page_copy_dma(const PageCopyArgs& a, CopyDirection dir, const Launch& launch) {
  std::vector<CopyRun> runs;
  Status st = copy_runs(a, &runs);
  if (!st.ok() || runs.empty()) return st;
  std::vector<void*> dsts, srcs;
  std::vector<size_t> sizes;
  dsts.reserve(runs.size());
  srcs.reserve(runs.size());
  sizes.reserve(runs.size());
  for (const CopyRun& r : runs) {
    void* paged = reinterpret_cast<void*>(r.paged);
    void* chunk = reinterpret_cast<void*>(r.chunk);
    dsts.push_back(dir == CopyDirection::kGather ? chunk : paged);
    srcs.push_back(dir == CopyDirection::kGather ? paged : chunk);
    sizes.push_back(static_cast<size_t>(r.bytes));
  }
  DeviceScope scope;
  st = scope.enter(launch.device, "page_copy_dma");
  if (!st.ok()) return st;
  return copy_batch(dsts, srcs, sizes, reinterpret_cast<cudaStream_t>(launch.stream));
}

}  // namespace lmc::cuda
