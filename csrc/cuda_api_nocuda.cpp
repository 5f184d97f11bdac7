// The CUDA entry points of a CPU-only build: every one reports kUnavailable.
#include "cuda_api.h"

namespace lmc::cuda {

namespace {
Status not_built() { return Status::Unavailable("lmcache_ext was built without CUDA"); }
}  // namespace

bool built_with_cuda() { return false; }
std::string built_archs() { return ""; }
int runtime_version() { return 0; }
int device_count() { return 0; }

Status page_copy(const PageCopyArgs&, CopyDirection, const Launch&) { return not_built(); }
Status page_copy_dma(const PageCopyArgs&, CopyDirection, const Launch&) { return not_built(); }
bool has_batch_memcpy() { return false; }
Status page_copy_staged(const StagedCopy&, CopyDirection, const Launch&) { return not_built(); }
Status current_device(int*) { return not_built(); }
Status host_register(void*, std::size_t, int, int64_t*) { return not_built(); }
Status host_unregister(void*, int) { return not_built(); }

}  // namespace lmc::cuda
