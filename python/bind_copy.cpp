// Bindings of the page-copy kernels: raw addresses in, GIL released while bytes move.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings.h"
#include "cuda_api.h"
#include "launch_shape.h"
#include "page_copy_cpu.h"
#include "page_copy_runs.h"
#include "staged_copy.h"

namespace py = pybind11;

namespace lmc::py_bind {

namespace {

CopyDirection parse_direction(const std::string& direction) {
  if (direction == "gather") return CopyDirection::kGather;
  if (direction == "scatter") return CopyDirection::kScatter;
  throw py::value_error("direction = '" + direction + "': expected 'gather' or 'scatter'");
}

bool parse_dma(const std::string& path) {
  if (path != "kernel" && path != "dma") throw py::value_error("path = '" + path + "': expected 'kernel' or 'dma'");
  return path == "dma";
}

Status run_page_copy(const PageCopyArgs& a, CopyDirection dir, bool on_cuda, bool dma, const cuda::Launch& launch) {
  if (on_cuda) return dma ? cuda::page_copy_dma(a, dir, launch) : cuda::page_copy(a, dir, launch);
  return dma ? cpu::page_copy_runs(a, dir) : cpu::page_copy(a, dir);
}

bool parse_on_cuda(const std::string& device) {
  if (device != "cpu" && device != "cuda") throw py::value_error("device = '" + device + "': expected 'cpu' or 'cuda'");
  return device == "cuda";
}

cuda::Launch make_launch(int device_index, int64_t stream, int64_t max_ctas) {
  if (device_index < 0)
    throw py::value_error("device_index = " + std::to_string(device_index) + ": expected a CUDA device index >= 0");
  if (max_ctas < 0)
    throw py::value_error("max_ctas = " + std::to_string(max_ctas) + ": expected a positive cap, or 0 for none");
  return {device_index, stream, max_ctas};
}

PageCopyArgs make_args(const std::vector<int64_t>& layer_ptrs, int64_t block_stride, int64_t page_bytes,
                       int64_t block_ids_ptr, int64_t num_blocks, int64_t chunk_ptr, int64_t chunk_table_ptr,
                       int64_t blocks_per_chunk, int64_t chunk_layer_stride, int chunk_first_layer) {
  if (layer_ptrs.empty() || layer_ptrs.size() > static_cast<size_t>(kMaxLayers))
    throw py::value_error("len(layer_ptrs) = " + std::to_string(layer_ptrs.size()) + ": expected 1 to " +
                          std::to_string(kMaxLayers) + " layers");
  PageCopyArgs a;
  for (size_t l = 0; l < layer_ptrs.size(); ++l) a.layer_ptrs[l] = layer_ptrs[l];
  a.num_layers = static_cast<int32_t>(layer_ptrs.size());
  a.block_stride = block_stride;
  a.page_bytes = page_bytes;
  a.block_ids = reinterpret_cast<const int64_t*>(block_ids_ptr);
  a.num_blocks = num_blocks;
  a.chunk_ptr = chunk_ptr;
  a.chunk_table = reinterpret_cast<const int64_t*>(chunk_table_ptr);
  a.blocks_per_chunk = blocks_per_chunk;
  a.chunk_layer_stride = chunk_layer_stride;
  a.chunk_first_layer = chunk_first_layer;
  return a;
}

}  // namespace

void bind_page_copy(py::module_& m) {
  m.def(
      "page_copy",
      [](const std::string& direction, const std::string& device, const std::vector<int64_t>& layer_ptrs,
         int64_t block_stride, int64_t page_bytes, int64_t block_ids_ptr, int64_t num_blocks, int64_t chunk_ptr,
         int64_t chunk_table_ptr, int64_t blocks_per_chunk, int64_t chunk_layer_stride, int chunk_first_layer,
         int device_index, int64_t stream, int64_t max_ctas, const std::string& path) {
        const CopyDirection dir = parse_direction(direction);
        const bool on_cuda = parse_on_cuda(device);
        const bool dma = parse_dma(path);
        const cuda::Launch launch = make_launch(device_index, stream, max_ctas);
        const PageCopyArgs a = make_args(layer_ptrs, block_stride, page_bytes, block_ids_ptr, num_blocks, chunk_ptr,
                                         chunk_table_ptr, blocks_per_chunk, chunk_layer_stride, chunk_first_layer);
        Status st;
        {
          py::gil_scoped_release release;
          st = run_page_copy(a, dir, on_cuda, dma, launch);
        }
        throw_if_error(st);
      },
      py::kw_only(), py::arg("direction"), py::arg("device"), py::arg("layer_ptrs"), py::arg("block_stride"),
      py::arg("page_bytes"), py::arg("block_ids_ptr"), py::arg("num_blocks"), py::arg("chunk_ptr") = 0,
      py::arg("chunk_table_ptr") = 0, py::arg("blocks_per_chunk"), py::arg("chunk_layer_stride"),
      py::arg("chunk_first_layer") = 0, py::arg("device_index") = 0, py::arg("stream") = 0, py::arg("max_ctas") = 0,
      py::arg("path") = "kernel",
      "Copy pages between a paged cache and chunk buffers (gather: paged -> chunk). "
      "All addresses must be readable/writable where the copy runs. CUDA: on device "
      "device_index (made current for the call) and stream, with at most max_ctas CTAs "
      "(0: no cap); the CPU twin ignores those three. path 'dma': the copy engines, one "
      "piece per run of contiguous bytes (block ids and chunk table in host memory, host "
      "chunks by their host address); on CPU its twin, one memcpy per run.");
  m.def("has_batch_memcpy", &cuda::has_batch_memcpy,
        "True when the DMA path batches its runs (built against CUDA >= 12.8).");
  m.def(
      "page_copy_staged",
      [](const std::string& direction, const std::string& device, const std::vector<int64_t>& layer_ptrs,
         int64_t block_stride, int64_t page_bytes, int64_t block_ids_ptr, int64_t num_blocks, int64_t staging_ptr,
         int64_t staging_bytes, int64_t host_ptr, int64_t host_bytes, int64_t host_layer_stride, int host_first_layer,
         int device_index, int64_t stream, int64_t max_ctas) {
        const CopyDirection dir = parse_direction(direction);
        const bool on_cuda = parse_on_cuda(device);
        const cuda::Launch launch = make_launch(device_index, stream, max_ctas);
        StagedCopy s;
        s.pages = make_args(layer_ptrs, block_stride, page_bytes, block_ids_ptr, num_blocks, 0, 0, 1, 0, 0);
        s.staging_ptr = staging_ptr;
        s.staging_bytes = staging_bytes;
        s.host_ptr = host_ptr;
        s.host_bytes = host_bytes;
        s.host_layer_stride = host_layer_stride;
        s.host_first_layer = host_first_layer;
        Status st;
        {
          py::gil_scoped_release release;
          st = on_cuda ? cuda::page_copy_staged(s, dir, launch) : cpu::page_copy_staged(s, dir);
        }
        throw_if_error(st);
      },
      py::kw_only(), py::arg("direction"), py::arg("device"), py::arg("layer_ptrs"), py::arg("block_stride"),
      py::arg("page_bytes"), py::arg("block_ids_ptr"), py::arg("num_blocks"), py::arg("staging_ptr"),
      py::arg("staging_bytes"), py::arg("host_ptr"), py::arg("host_bytes"), py::arg("host_layer_stride"),
      py::arg("host_first_layer") = 0, py::arg("device_index") = 0, py::arg("stream") = 0, py::arg("max_ctas") = 0,
      "Pages <-> a compact staging buffer on the cache's device, and the staging rows <-> "
      "exactly the rows they occupy in the host chunk ([layer][block][page], "
      "host_layer_stride apart, from layer host_first_layer): on CUDA one kernel and one "
      "cudaMemcpy2DAsync, on CPU the twin with one memcpy per row.");
  m.def(
      "launch_shape",
      [](int64_t page_bytes, int64_t pages, int64_t max_ctas) {
        LaunchShape shape;
        throw_if_error(launch_shape(page_bytes, pages, max_ctas, &shape));
        py::dict d;
        d["grid_x"] = shape.grid_x;
        d["grid_y"] = shape.grid_y;
        d["segment_bytes"] = shape.segment_bytes;
        d["ctas"] = shape.grid_x * shape.grid_y;
        return d;
      },
      py::kw_only(), py::arg("page_bytes"), py::arg("pages"), py::arg("max_ctas") = 0,
      "The grid a CUDA page copy of `pages` pages launches (max_ctas: its cap, 0 = none).");
  m.def(
      "set_cpu_copy_options",
      [](int threads, int64_t streaming_min_bytes) {
        throw_if_error(cpu::set_options({threads, streaming_min_bytes}));
      },
      py::kw_only(), py::arg("threads"), py::arg("streaming_min_bytes"),
      "CPU twin settings: worker threads (0 = default) and the copy size from which "
      "non-temporal stores are used (negative = never).");
  m.def(
      "cpu_copy_options",
      [] {
        const cpu::CopyOptions o = cpu::options();
        py::dict d;
        d["threads"] = o.threads;
        d["streaming_min_bytes"] = o.streaming_min_bytes;
        d["streaming_supported"] = cpu::has_streaming_stores();
        return d;
      },
      "Current CPU twin settings and whether this CPU has streaming stores.");
}

}  // namespace lmc::py_bind
