// Everything that needs the CUDA runtime. Built from the .cu files when CUDA is
// on, and from cuda_api_nocuda.cpp (which reports kUnavailable) when it is off,
// so callers never need an #ifdef.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "page_copy.h"
#include "status.h"

namespace lmc::cuda {

bool built_with_cuda();
std::string built_archs();        // e.g. "80;86;89;90;100;120", empty without CUDA
int runtime_version();            // cudart version linked in, 0 without CUDA
int device_count();               // 0 with no driver or no device; never fails

// Copies every page of `a` on `stream` (a cudaStream_t as an integer, 0 for the
// legacy default stream). Chunk addresses may be device memory or page-locked
// host memory seen through its device address (zero-copy). No host sync.
Status page_copy(const PageCopyArgs& a, CopyDirection dir, int64_t stream);

// Staged variant: `a.chunk_ptr` is a device staging buffer (no chunk table).
// Gather runs the kernel into staging, then cudaMemcpyAsync staging -> host;
// scatter copies host -> staging first, then runs the kernel. No host sync.
Status page_copy_staged(const PageCopyArgs& a, CopyDirection dir, int64_t host_ptr,
                        int64_t bytes, int64_t stream);

// Page-locks [ptr, ptr + bytes) for fast and zero-copy DMA (cudaHostRegister,
// portable + mapped). Fails with kUnavailable when there is no device.
Status host_register(void* ptr, std::size_t bytes);
Status host_unregister(void* ptr);

}  // namespace lmc::cuda
