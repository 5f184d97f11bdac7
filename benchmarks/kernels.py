"""Page gather/scatter throughput against the copies it competes with, in one process.

One JSON line per (case, direction, device): our kernel's GB/s, the roofline (one
contiguous copy of the same bytes: memcpy on CPU, cudaMemcpyAsync device<->pinned
host on CUDA) and, on CPU, our kernel over the same bytes laid out contiguously and plain
torch (index_select / index_copy_ per layer into a preallocated buffer); then the ratios.

On CUDA the zero-copy path is measured at several grid caps (CAPS; 0 = no cap), each
row with the CTAs it launches and so the SMs it can occupy; then one line per copy
kind with the slowdown of a stand-in compute kernel (bf16 matmuls) while that copy
runs beside it on another stream. The copy-engine path (path="dma",
cudaMemcpyBatchAsync) is measured beside the kernel: on the per-layer cache (one piece a
page) and on a cross-layer BLNHC cache (one piece a block), and in the slowdown rows.
First the layerwise figure: 32 layers loaded with the connector's LayerwiseLoad while a
stand-in layer forward (one bf16 matmul, LAYER_MATMUL) runs per layer after waiting for
its layer, against load-then-compute and compute alone. --plan prints what a CUDA run
would measure and the memory it needs, without a device.
Run: python benchmarks/kernels.py [--device cuda] [--plan]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmcache_ext import _C, ops
from lmcache_ext.plans import Plan
from lmcache_ext.testing.kv_layouts import make_layers, page_view

# name: (heads, tokens per block, width = K+V head dims, dtype). Page bytes in the comment.
CASES = {
    "cuda_like": (8, 16, 256, torch.float16),  # 64 KiB: vLLM CUDA block 16, 8 KV heads x 128, K|V
    "cpu_like": (8, 128, 256, torch.float16),  # 512 KiB: vLLM CPU block 128
    "mla_like": (1, 64, 576, torch.float16),  # 72 KiB: MLA latent 512 + rope 64
}
LAYERS, BLOCKS = 32, 256
CAPS = (8, 16, 32, 64, 0)  # zero-copy grid caps measured on CUDA; 0 = no cap
MATMUL = 8192  # the stand-in compute kernel: bf16 [MATMUL x MATMUL] @ [MATMUL x MATMUL]
# Matmuls per measurement: about this long alone. Copies beside them are queued ahead
# for 1.5x as long; the zero-copy kernel's queue depth is the index ring's 8 entries,
# which at ~50 GB/s over 512 MiB chunks covers ~80 ms. Each row says whether the copies
# did outlast the compute.
COMPUTE_SECONDS = 0.04
# A layer's forward in the layerwise figure: [tokens x hidden] @ [hidden x 6*hidden] in
# bf16, about a Llama-3-8B layer's weights (hidden 4096) over 1024 new tokens (~0.2 TFLOP).
LAYER_MATMUL = (1024, 4096, 6 * 4096)
LIBC = ctypes.CDLL(None)
LIBC.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def timed(fn: Callable[[], object], reps: int, sync: Callable[[], None]) -> float:
    """Median seconds of `reps` runs after one warm-up (first-touch faults excluded)."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_case(name: str, reps: int) -> list[dict]:
    heads, tokens, width, dtype = CASES[name]
    cache_blocks = BLOCKS + BLOCKS // 8
    layers = make_layers("LBNHC", LAYERS, cache_blocks, heads, tokens, width, dtype)
    kv = ops.PagedLayers.from_tensors(layers)
    ids = torch.randperm(cache_blocks, generator=torch.Generator().manual_seed(0))[:BLOCKS]
    nbytes = kv.chunk_bytes(BLOCKS)
    chunk = torch.empty(nbytes, dtype=torch.uint8)
    pages = [page_view(t) for t in layers]
    per_layer = chunk.view(LAYERS, BLOCKS, kv.page_bytes)
    storage = layers[0].untyped_storage()  # the whole cache: one contiguous buffer
    flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (1, nbytes), (nbytes, 1))
    pieces = nbytes // (1 << 20)  # the same bytes as 1 MiB pages in order: the best-case layout
    in_order = ops.PagedLayers.from_tensors([flat.view(pieces, 1 << 20)])

    def memcpy_in() -> None:
        LIBC.memcpy(chunk.data_ptr(), flat.data_ptr(), nbytes)

    def memcpy_out() -> None:
        LIBC.memcpy(flat.data_ptr(), chunk.data_ptr(), nbytes)

    def torch_gather() -> None:
        for layer, p in enumerate(pages):
            torch.index_select(p, 0, ids, out=per_layer[layer])

    def torch_scatter() -> None:
        for layer, p in enumerate(pages):
            p.index_copy_(0, ids, per_layer[layer])

    rows = []
    for direction, copy, roofline, baseline in (
        ("gather", ops.gather, memcpy_in, torch_gather),
        ("scatter", ops.scatter, memcpy_out, torch_scatter),
    ):
        t_ours = timed(lambda: copy(kv, ids, chunk), reps, lambda: None)
        t_roof = timed(roofline, reps, lambda: None)
        t_stream = timed(lambda: copy(in_order, range(pieces), chunk), reps, lambda: None)
        t_torch = timed(baseline, reps, lambda: None)
        others = {"contiguous_stream": t_stream, "torch": t_torch}
        rows.append(row(name, direction, "cpu", kv, nbytes, t_ours, t_roof, "memcpy", others))
    return rows


def cpu_cross_layer_rows(name: str, reps: int) -> list[dict]:
    """The same chunk from a per-layer (LBNHC: one piece per layer and block) and a
    cross-layer (BLNHC: one piece per block) cache, by the CPU twin of each copy path."""
    heads, tokens, width, dtype = CASES[name]
    cache_blocks = BLOCKS + BLOCKS // 8
    ids = torch.randperm(cache_blocks, generator=torch.Generator().manual_seed(0))[:BLOCKS]
    caches = {
        layout: ops.PagedLayers.from_tensors(make_layers(layout, LAYERS, cache_blocks, heads, tokens, width, dtype))
        for layout in ("LBNHC", "BLNHC")
    }
    chunk = torch.empty(caches["LBNHC"].chunk_bytes(BLOCKS), dtype=torch.uint8)
    rows = []
    for direction, copy in (("gather", ops.gather), ("scatter", ops.scatter)):
        for path in ops.COPY_PATHS:
            t = {
                layout: timed(lambda: copy(kv, ids, chunk, path=path), reps, lambda: None)
                for layout, kv in caches.items()
            }
            rows.append(
                {
                    "case": name,
                    "figure": "cross_layer_vs_per_layer",
                    "direction": direction,
                    "device": "cpu",
                    "path": path,
                    "bytes": chunk.numel(),
                    "per_layer_gbps": round(chunk.numel() / t["LBNHC"] / 1e9, 2),
                    "cross_layer_gbps": round(chunk.numel() / t["BLNHC"] / 1e9, 2),
                    "ratio_cross_vs_per_layer": round(t["LBNHC"] / t["BLNHC"], 3),
                }
            )
    return rows


def cuda_bytes(name: str) -> dict[str, int]:
    """Memory a CUDA case takes: the per-layer and cross-layer caches, staging and contiguous
    buffers; the pinned chunk."""
    heads, tokens, width, dtype = CASES[name]
    page = heads * tokens * width * torch.empty(0, dtype=dtype).element_size()
    chunk = LAYERS * BLOCKS * page
    cache = LAYERS * (BLOCKS + BLOCKS // 8) * page
    return {"gpu_bytes": 2 * cache + 3 * chunk, "pinned_bytes": chunk}  # per-layer and cross-layer caches


def cuda_case(name: str, reps: int) -> list[dict]:
    heads, tokens, width, dtype = CASES[name]
    cache_blocks = BLOCKS + BLOCKS // 8
    layers = make_layers("LBNHC", LAYERS, cache_blocks, heads, tokens, width, dtype, device="cuda")
    kv = ops.PagedLayers.from_tensors(layers)
    ids = torch.randperm(cache_blocks, generator=torch.Generator().manual_seed(0))[:BLOCKS]
    nbytes = kv.chunk_bytes(BLOCKS)
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    staging = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    contiguous = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    sync = torch.cuda.synchronize
    sms = torch.cuda.get_device_properties(kv.device).multi_processor_count
    d2h, h2d = roofline_copies(host, contiguous)
    rows = []
    for direction, copy, roofline in (("gather", ops.gather, d2h), ("scatter", ops.scatter, h2d)):
        t_roof = timed(roofline, reps, sync)
        for cap in CAPS:
            t_zero = timed(lambda: copy(kv, ids, host, max_ctas=cap), reps, sync)
            ctas = _C.launch_shape(page_bytes=kv.page_bytes, pages=LAYERS * BLOCKS, max_ctas=cap)["ctas"]
            grid = {
                "max_ctas": cap,
                "default_cap": cap == ops.ZERO_COPY_MAX_CTAS,
                "ctas": ctas,
                "sms": sms,
                "sms_used": min(ctas, sms),
            }
            rows.append(
                row(name, direction, "cuda-zero-copy", kv, nbytes, t_zero, t_roof, "cudaMemcpyAsync", {}) | grid
            )
        t_staged = timed(lambda: copy(kv, ids, host, staging=staging), reps, sync)
        t_device = timed(lambda: copy(kv, ids, staging), reps, sync)
        t_dma = timed(lambda: copy(kv, ids, host, path="dma"), reps, sync)
        rows.append(row(name, direction, "cuda-staged", kv, nbytes, t_staged, t_roof, "cudaMemcpyAsync", {}))
        rows.append(row(name, direction, "cuda-device", kv, nbytes, t_device, t_roof, "cudaMemcpyAsync", {}))
        rows.append(
            row(name, direction, "cuda-dma", kv, nbytes, t_dma, t_roof, "cudaMemcpyAsync", {})
            | {"pieces": LAYERS * BLOCKS, "batched": _C.has_batch_memcpy()}
        )
    rows += cross_layer_rows(name, ids, host, reps)
    return rows


def cross_layer_rows(name: str, ids: torch.Tensor, host: torch.Tensor, reps: int) -> list[dict]:
    """The same chunk from a cross-layer (BLNHC) cache: one piece per block, by the
    kernel (zero-copy, default cap) and by the copy engines."""
    heads, tokens, width, dtype = CASES[name]
    layers = make_layers("BLNHC", LAYERS, BLOCKS + BLOCKS // 8, heads, tokens, width, dtype, device="cuda")
    kv = ops.PagedLayers.from_tensors(layers)
    nbytes = kv.chunk_bytes(BLOCKS)
    contiguous = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    d2h, h2d = roofline_copies(host, contiguous)
    sync = torch.cuda.synchronize
    rows = []
    for direction, copy, roofline in (("gather", ops.gather, d2h), ("scatter", ops.scatter, h2d)):
        t_roof = timed(roofline, reps, sync)
        for path in ops.COPY_PATHS:
            t = timed(lambda: copy(kv, ids, host, path=path), reps, sync)
            rows.append(
                row(name, direction, f"cuda-cross-layer-{path}", kv, nbytes, t, t_roof, "cudaMemcpyAsync", {})
                | {"pieces": BLOCKS, "layout": "BLNHC"}
            )
    return rows


class PinnedSlots:
    """One page-locked buffer seen as the executor's slots."""

    is_page_locked = True

    def __init__(self, slot_bytes: int, count: int) -> None:
        self._buf = torch.empty(count * slot_bytes, dtype=torch.uint8).pin_memory()
        self._slot_bytes = slot_bytes

    def view(self, slot: int) -> torch.Tensor:
        return self._buf[slot * self._slot_bytes : (slot + 1) * self._slot_bytes]


def layerwise_rows(reps: int) -> list[dict]:
    """Wall time of a 32-layer forward stand-in (LAYER_MATMUL per layer) that needs a
    prefix of BLOCKS blocks loaded from pinned host slots: layerwise (the connector's
    LayerwiseLoad: layer i loads while layer i-1 computes), load-then-compute, and
    compute alone (the floor), per copy path."""
    from lmcache_ext.executor import TransferExecutor
    from lmcache_ext.layerwise import LayerwiseLoad
    from lmcache_ext.plans import SlotCopy

    heads, tokens, width, dtype = CASES["cuda_like"]
    layers = make_layers("LBNHC", LAYERS, BLOCKS + BLOCKS // 8, heads, tokens, width, dtype, device="cuda")
    kv = ops.PagedLayers.from_tensors(layers)
    bpc = 16
    slots = PinnedSlots(kv.chunk_bytes(bpc), BLOCKS // bpc)
    ids = torch.randperm(BLOCKS + BLOCKS // 8, generator=torch.Generator().manual_seed(0))[:BLOCKS].tolist()
    items = [SlotCopy(s, tuple(ids[s * bpc : (s + 1) * bpc])) for s in range(BLOCKS // bpc)]
    m, k, n = LAYER_MATMUL
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    sync = torch.cuda.synchronize

    def compute(wait: Callable[[int], None] = lambda layer: None) -> None:
        for layer in range(LAYERS):
            wait(layer)
            torch.matmul(x, w, out=y)

    rows = []
    t_compute = timed(compute, reps, sync)
    for path in ops.COPY_PATHS:
        executor = TransferExecutor(kv, slots, {}, cuda_copy_path=path)
        t_load = timed(lambda: executor.run(Plan(scatters=tuple(items))), reps, sync)

        def load_then_compute() -> None:
            executor.run(Plan(scatters=tuple(items)))  # the current stream waits for every layer
            compute()

        def layerwise() -> None:
            load = LayerwiseLoad(executor, items, LAYERS, submit=None)
            compute(load.wait)
            load.finish()

        t_whole = timed(load_then_compute, reps, sync)
        t_layers = timed(layerwise, reps, sync)
        executor.close()
        rows.append(
            {
                "figure": "layerwise_overlap",
                "path": path,
                "layers": LAYERS,
                "blocks": BLOCKS,
                "page_bytes": kv.page_bytes,
                "layer_matmul": list(LAYER_MATMUL),
                "compute_ms": round(t_compute * 1e3, 3),
                "load_ms": round(t_load * 1e3, 3),
                "load_then_compute_ms": round(t_whole * 1e3, 3),
                "layerwise_ms": round(t_layers * 1e3, 3),
                "layerwise_vs_load_then_compute": round(t_layers / t_whole, 3),
                "layerwise_vs_compute_alone": round(t_layers / t_compute, 3),
            }
        )
    return rows


def interference_rows(reps: int) -> list[dict]:
    """Slowdown of bf16 matmuls on the current stream while a copy runs on another stream:
    cudaMemcpyAsync (copy engines), and our zero-copy kernel at the default cap and with no cap."""
    heads, tokens, width, dtype = CASES["cuda_like"]
    layers = make_layers("LBNHC", LAYERS, BLOCKS + BLOCKS // 8, heads, tokens, width, dtype, device="cuda")
    kv = ops.PagedLayers.from_tensors(layers)
    ids = torch.randperm(BLOCKS + BLOCKS // 8, generator=torch.Generator().manual_seed(0))[:BLOCKS]
    host = torch.empty(kv.chunk_bytes(BLOCKS), dtype=torch.uint8).pin_memory()
    device_buf = torch.empty_like(host, device="cuda")
    a, b = (torch.randn(MATMUL, MATMUL, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    compute_stream, copy_stream = torch.cuda.current_stream(), torch.cuda.Stream()
    one = timed(lambda: torch.matmul(a, b, out=c), reps, torch.cuda.synchronize)
    count = max(1, round(COMPUTE_SECONDS / one))

    def compute_window() -> tuple[float, torch.cuda.Event]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(compute_stream)
        for _ in range(count):
            torch.matmul(a, b, out=c)
        end.record(compute_stream)
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, end

    alone = statistics.median(compute_window()[0] for _ in range(reps))
    d2h, h2d = roofline_copies(host, device_buf, copy_stream)
    copies = {
        ("gather", "cudaMemcpyAsync"): d2h,
        ("scatter", "cudaMemcpyAsync"): h2d,
        ("gather", "zero-copy default cap"): lambda: ops.gather(kv, ids, host, stream=copy_stream),
        ("scatter", "zero-copy default cap"): lambda: ops.scatter(kv, ids, host, stream=copy_stream),
        ("gather", "zero-copy no cap"): lambda: ops.gather(kv, ids, host, stream=copy_stream, max_ctas=0),
        ("scatter", "zero-copy no cap"): lambda: ops.scatter(kv, ids, host, stream=copy_stream, max_ctas=0),
        ("gather", "dma path"): lambda: ops.gather(kv, ids, host, stream=copy_stream, path="dma"),
        ("scatter", "dma path"): lambda: ops.scatter(kv, ids, host, stream=copy_stream, path="dma"),
    }
    rows = []
    for (direction, kind), copy in copies.items():
        once = timed(copy, reps, torch.cuda.synchronize)
        beside = math.ceil(1.5 * alone / once) + 1

        def with_copy() -> tuple[float, bool]:
            for _ in range(beside):
                copy()
            copies_done = torch.cuda.Event(enable_timing=True)
            copies_done.record(copy_stream)
            seconds, end = compute_window()
            return seconds, end.elapsed_time(copies_done) >= 0

        runs = [with_copy() for _ in range(reps)]
        shared = statistics.median(seconds for seconds, _ in runs)
        rows.append(
            {
                "figure": "compute_slowdown",
                "direction": direction,
                "copy": kind,
                "matmul": MATMUL,
                "matmuls": count,
                "compute_ms_alone": round(alone * 1e3, 2),
                "compute_ms_beside_copy": round(shared * 1e3, 2),
                "slowdown": round(shared / alone, 3),
                "copy_outlasted_compute": all(covered for _, covered in runs),
                "copy_gbps_alone": round(host.numel() / once / 1e9, 2),
            }
        )
    return rows


def plan_rows(cases: list[str]) -> list[dict]:
    """What a CUDA run measures and the memory each part needs; runs nothing."""
    rows = [
        {
            "plan": name,
            "directions": ["gather", "scatter"],
            "copies": [f"zero-copy max_ctas={cap}" for cap in CAPS]
            + ["staged", "device", "dma", "cudaMemcpyAsync"]
            + [f"cross-layer {path}" for path in ops.COPY_PATHS],
            **cuda_bytes(name),
        }
        for name in cases
    ]
    rows.append(
        {
            "plan": "compute_slowdown",
            "matmul": MATMUL,
            "compute_seconds": COMPUTE_SECONDS,
            "copies": ["cudaMemcpyAsync", "zero-copy default cap", "zero-copy no cap", "dma path"],
            **cuda_bytes("cuda_like"),
        }
    )
    rows.append(
        {
            "plan": "layerwise_overlap",
            "layers": LAYERS,
            "blocks": BLOCKS,
            "layer_matmul": list(LAYER_MATMUL),
            "paths": list(ops.COPY_PATHS),
            "runs": ["compute alone", "load then compute", "layerwise"],
            **cuda_bytes("cuda_like"),
        }
    )
    return rows


def roofline_copies(
    host: torch.Tensor, device_buf: torch.Tensor, stream: torch.cuda.Stream | None = None
) -> tuple[Callable[[], None], Callable[[], None]]:
    """One cudaMemcpyAsync of all bytes each way on `stream` (default: the current one):
    through cupy (torch-independent) when present."""
    n = host.numel()
    stream = stream or torch.cuda.current_stream()
    try:
        import cupy

        rt = cupy.cuda.runtime
        handle = stream.cuda_stream
        return (
            lambda: rt.memcpyAsync(host.data_ptr(), device_buf.data_ptr(), n, rt.memcpyDeviceToHost, handle),
            lambda: rt.memcpyAsync(device_buf.data_ptr(), host.data_ptr(), n, rt.memcpyHostToDevice, handle),
        )
    except ImportError:

        def d2h() -> None:
            with torch.cuda.stream(stream):
                host.copy_(device_buf, non_blocking=True)

        def h2d() -> None:
            with torch.cuda.stream(stream):
                device_buf.copy_(host, non_blocking=True)

        return d2h, h2d


def row(
    case: str,
    direction: str,
    device: str,
    kv: ops.PagedLayers,
    nbytes: int,
    t_ours: float,
    t_roof: float,
    roof_name: str,
    others: dict[str, float],
) -> dict:
    gbps = lambda t: round(nbytes / t / 1e9, 2)  # noqa: E731
    out = {
        "case": case,
        "direction": direction,
        "device": device,
        "layers": kv.num_layers,
        "blocks": BLOCKS,
        "page_bytes": kv.page_bytes,
        "bytes": nbytes,
        "ours_gbps": gbps(t_ours),
        f"{roof_name}_gbps": gbps(t_roof),
        f"ratio_vs_{roof_name}": round(t_roof / t_ours, 3),
    }
    for other, t in others.items():
        out[f"{other}_gbps"] = gbps(t)
        out[f"ratio_vs_{other}"] = round(t / t_ours, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="CPU twin threads (0 = default)")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument(
        "--plan", action="store_true", help="with --device cuda: print what would be measured, run nothing"
    )
    parser.add_argument("--no-interference", action="store_true", help="with --device cuda: skip the compute slowdown")
    parser.add_argument("--no-layerwise", action="store_true", help="with --device cuda: skip the layerwise overlap")
    parser.add_argument(
        "--cross-layer",
        action="store_true",
        help="on CPU: only the cross-layer vs per-layer copies, for each copy path's twin",
    )
    args = parser.parse_args()
    cases = args.case or list(CASES)
    if args.plan:
        if args.device != "cuda":
            raise SystemExit("--plan describes a CUDA run: add --device cuda")
        emit(plan_rows(cases), args.out)
        return
    ops.set_cpu_copy_options(threads=args.threads)
    if args.cross_layer:
        for name in cases:
            emit(cpu_cross_layer_rows(name, args.reps), args.out)
        return
    if args.device == "cuda" and not ops.cuda_available():
        raise SystemExit(f"--device cuda: no CUDA device (build_info: {_C.build_info()})")
    if args.device == "cuda" and not args.no_layerwise:
        emit(layerwise_rows(args.reps), args.out)
        torch.cuda.empty_cache()
    run = cpu_case if args.device == "cpu" else cuda_case
    for name in cases:
        emit(run(name, args.reps), args.out)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.device == "cuda" and not args.no_interference:
        emit(interference_rows(args.reps), args.out)


def emit(rows: list[dict], out: Path | None) -> None:
    """One JSON line per row, on stdout and appended to `out`."""
    for r in rows:
        line = json.dumps(r)
        print(line, flush=True)
        if out:
            with out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
