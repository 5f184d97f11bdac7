// Everything that needs the CUDA runtime. Built from the .cu files when CUDA is
// on, and from cuda_api_nocuda.cpp (which reports kUnavailable) when it is off,
// so callers never need an #ifdef.
//
// Every entry point that touches a device takes its index and makes it current for
// the call only, putting back whatever context the calling thread had before (none
// included): a pool dropped on a thread that never used CUDA must not create device
// 0's context (~0.5 GiB) in every tensor-parallel process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "page_copy.h"
#include "staged_copy.h"
#include "status.h"

namespace lmc::cuda {

bool built_with_cuda();
std::string built_archs();  // e.g. "80;86;89;90;100;120", empty without CUDA
int runtime_version();      // cudart version linked in, 0 without CUDA
int device_count();         // 0 with no driver or no device; never fails

// Where and how a copy runs.
struct Launch {
  int device = 0;        // CUDA device index
  int64_t stream = 0;    // a cudaStream_t of that device as an integer, 0 = legacy default
  int64_t max_ctas = 0;  // cap on the grid (see launch_shape.h), 0 = none
};

// Copies every page of `a` on launch.stream. Chunk addresses may be device memory or
// page-locked host memory seen through its device address (zero-copy). No host sync.
Status page_copy(const PageCopyArgs& a, CopyDirection dir, const Launch& launch);

// The copy-engine path: the runs of contiguous bytes of `a` (page_copy_runs.h) as one
// cudaMemcpyBatchAsync (CUDA >= 12.8 on a non-legacy stream), else one cudaMemcpyAsync
// per run; no SM copies. Block ids and the chunk table are read on the host; chunk
// addresses are host addresses of page-locked memory or device addresses. No host sync.
Status page_copy_dma(const PageCopyArgs& a, CopyDirection dir, const Launch& launch);
bool has_batch_memcpy();  // built against CUDA >= 12.8 (cudaMemcpyBatchAsync)

// The staged copy (staged_copy.h): gather runs the kernel into the staging buffer, then
// one cudaMemcpy2DAsync of the rows to host; scatter the reverse. No host sync.
Status page_copy_staged(const StagedCopy& s, CopyDirection dir, const Launch& launch);

// The calling thread's current device, without creating a context.
Status current_device(int* device);

// Page-locks [ptr, ptr + bytes) for fast and zero-copy DMA (cudaHostRegister,
// portable + mapped), with `device` current. *device_ptr is the address kernels use:
// ptr itself where the device has cudaDevAttrCanUseHostPointerForRegisteredMem,
// cudaHostGetDevicePointer's answer otherwise. kUnavailable when there is no device.
Status host_register(void* ptr, std::size_t bytes, int device, int64_t* device_ptr);
Status host_unregister(void* ptr, int device);

}  // namespace lmc::cuda
