// Bindings of the page-copy kernels: raw addresses in, GIL released while bytes move.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings.h"
#include "cuda_api.h"
#include "page_copy_cpu.h"

namespace py = pybind11;

namespace lmc::py_bind {

namespace {

CopyDirection parse_direction(const std::string& direction) {
  if (direction == "gather") return CopyDirection::kGather;
  if (direction == "scatter") return CopyDirection::kScatter;
  throw py::value_error("direction = '" + direction + "': expected 'gather' or 'scatter'");
}

PageCopyArgs make_args(const std::vector<int64_t>& layer_ptrs, int64_t block_stride,
                       int64_t page_bytes, int64_t block_ids_ptr, int64_t num_blocks,
                       int64_t chunk_ptr, int64_t chunk_table_ptr, int64_t blocks_per_chunk,
                       int64_t chunk_layer_stride, int chunk_first_layer) {
  if (layer_ptrs.empty() || layer_ptrs.size() > static_cast<size_t>(kMaxLayers))
    throw py::value_error("len(layer_ptrs) = " + std::to_string(layer_ptrs.size()) +
                          ": expected 1 to " + std::to_string(kMaxLayers) + " layers");
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
      [](const std::string& direction, const std::string& device,
         const std::vector<int64_t>& layer_ptrs, int64_t block_stride, int64_t page_bytes,
         int64_t block_ids_ptr, int64_t num_blocks, int64_t chunk_ptr, int64_t chunk_table_ptr,
         int64_t blocks_per_chunk, int64_t chunk_layer_stride, int chunk_first_layer,
         int64_t stream) {
        const CopyDirection dir = parse_direction(direction);
        if (device != "cpu" && device != "cuda")
          throw py::value_error("device = '" + device + "': expected 'cpu' or 'cuda'");
        const PageCopyArgs a =
            make_args(layer_ptrs, block_stride, page_bytes, block_ids_ptr, num_blocks, chunk_ptr,
                      chunk_table_ptr, blocks_per_chunk, chunk_layer_stride, chunk_first_layer);
        Status st;
        {
          py::gil_scoped_release release;
          st = device == "cpu" ? cpu::page_copy(a, dir) : cuda::page_copy(a, dir, stream);
        }
        throw_if_error(st);
      },
      py::kw_only(), py::arg("direction"), py::arg("device"), py::arg("layer_ptrs"),
      py::arg("block_stride"), py::arg("page_bytes"), py::arg("block_ids_ptr"),
      py::arg("num_blocks"), py::arg("chunk_ptr") = 0, py::arg("chunk_table_ptr") = 0,
      py::arg("blocks_per_chunk"), py::arg("chunk_layer_stride"), py::arg("chunk_first_layer") = 0,
      py::arg("stream") = 0,
      "Copy pages between a paged cache and chunk buffers (gather: paged -> chunk). "
      "All addresses must be readable/writable where the copy runs.");
  m.def(
      "page_copy_staged",
      [](const std::string& direction, const std::vector<int64_t>& layer_ptrs,
         int64_t block_stride, int64_t page_bytes, int64_t block_ids_ptr, int64_t num_blocks,
         int64_t staging_ptr, int64_t chunk_layer_stride, int64_t host_ptr, int64_t bytes,
         int64_t stream) {
        const CopyDirection dir = parse_direction(direction);
        const PageCopyArgs a = make_args(layer_ptrs, block_stride, page_bytes, block_ids_ptr,
                                         num_blocks, staging_ptr, 0, num_blocks > 0 ? num_blocks : 1,
                                         chunk_layer_stride, 0);
        Status st;
        {
          py::gil_scoped_release release;
          st = cuda::page_copy_staged(a, dir, host_ptr, bytes, stream);
        }
        throw_if_error(st);
      },
      py::kw_only(), py::arg("direction"), py::arg("layer_ptrs"), py::arg("block_stride"),
      py::arg("page_bytes"), py::arg("block_ids_ptr"), py::arg("num_blocks"),
      py::arg("staging_ptr"), py::arg("chunk_layer_stride"), py::arg("host_ptr"),
      py::arg("bytes"), py::arg("stream") = 0,
      "CUDA only: gather into a device staging buffer then cudaMemcpyAsync to host, "
      "or the reverse for scatter.");
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
