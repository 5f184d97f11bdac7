"""Page gather/scatter throughput against the copies it competes with, in one process.

One JSON line per (case, direction, device): our kernel's GB/s, the roofline (one
contiguous copy of the same bytes: memcpy on CPU, cudaMemcpyAsync device<->pinned
host on CUDA) and, on CPU, our kernel over the same bytes laid out contiguously and plain
torch (index_select / index_copy_ per layer into a preallocated buffer); then the ratios. Run: python benchmarks/kernels.py [--device cuda]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kv_layouts import make_layers, page_view  # noqa: E402

from lmcache_ext import _C, ops  # noqa: E402

# name: (heads, tokens per block, width = K+V head dims, dtype). Page bytes in the comment.
CASES = {
    "cuda_like": (8, 16, 256, torch.float16),   # 64 KiB: vLLM CUDA block 16, 8 KV heads x 128, K|V
    "cpu_like": (8, 128, 256, torch.float16),   # 512 KiB: vLLM CPU block 128
    "mla_like": (1, 64, 576, torch.float16),    # 72 KiB: MLA latent 512 + rope 64
}
LAYERS, BLOCKS = 32, 256
LIBC = ctypes.CDLL(None)
LIBC.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def timed(fn: Callable[[], None], reps: int, sync: Callable[[], None]) -> float:
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
    d2h, h2d = roofline_copies(host, contiguous)
    rows = []
    for direction, copy, roofline in (("gather", ops.gather, d2h), ("scatter", ops.scatter, h2d)):
        t_roof = timed(roofline, reps, sync)
        t_zero = timed(lambda: copy(kv, ids, host), reps, sync)
        t_staged = timed(lambda: copy(kv, ids, host, staging=staging), reps, sync)
        t_device = timed(lambda: copy(kv, ids, staging), reps, sync)
        rows.append(row(name, direction, "cuda-zero-copy", kv, nbytes, t_zero, t_roof, "cudaMemcpyAsync", {}))
        rows.append(row(name, direction, "cuda-staged", kv, nbytes, t_staged, t_roof, "cudaMemcpyAsync", {}))
        rows.append(row(name, direction, "cuda-device", kv, nbytes, t_device, t_roof, "cudaMemcpyAsync", {}))
    return rows


def roofline_copies(host: torch.Tensor, device_buf: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """One cudaMemcpyAsync of all bytes each way: through cupy (torch-independent) when present."""
    n = host.numel()
    try:
        import cupy

        stream = torch.cuda.current_stream().cuda_stream
        rt = cupy.cuda.runtime
        return (
            lambda: rt.memcpyAsync(host.data_ptr(), device_buf.data_ptr(), n, rt.memcpyDeviceToHost, stream),
            lambda: rt.memcpyAsync(device_buf.data_ptr(), host.data_ptr(), n, rt.memcpyHostToDevice, stream),
        )
    except ImportError:
        return (lambda: host.copy_(device_buf, non_blocking=True), lambda: device_buf.copy_(host, non_blocking=True))


def row(case: str, direction: str, device: str, kv: ops.PagedLayers, nbytes: int, t_ours: float,
        t_roof: float, roof_name: str, others: dict[str, float]) -> dict:
    gbps = lambda t: round(nbytes / t / 1e9, 2)  # noqa: E731
    out = {
        "case": case, "direction": direction, "device": device, "layers": kv.num_layers, "blocks": BLOCKS,
        "page_bytes": kv.page_bytes, "bytes": nbytes, "ours_gbps": gbps(t_ours),
        f"{roof_name}_gbps": gbps(t_roof), f"ratio_vs_{roof_name}": round(t_roof / t_ours, 3),
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
    args = parser.parse_args()
    ops.set_cpu_copy_options(threads=args.threads)
    if args.device == "cuda" and not ops.cuda_available():
        raise SystemExit(f"--device cuda: no CUDA device (build_info: {_C.build_info()})")
    run = cpu_case if args.device == "cpu" else cuda_case
    for name in args.case or list(CASES):
        for r in run(name, args.reps):
            line = json.dumps(r)
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
