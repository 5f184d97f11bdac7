"""Cost of chunk keys for one prompt, per input kind, against the hashing floor, in one process.

One JSON line per input kind (numpy uint32 array, torch int64 tensor, Python list):
median microseconds of ``chunk_keys`` for an 8k- and a 128k-token prompt, and the
floor: one ``xxhash.xxh3_128_digest`` over the prompt's whole uint32 token buffer.
A last line times the list conversions that ``keys.py`` chose between
(``array.fromlist`` won) and a bare list slice, which ``keys.py`` therefore avoids.
Run: python benchmarks/keys.py [--chunk-size 256] [--reps 200]
"""

from __future__ import annotations

import argparse
import array
import json
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import xxhash

from kernels import timed  # benchmarks/ is on sys.path when this file runs as a script
from lmcache_ext.keys import Namespace, chunk_keys

LENGTHS = {"8k": 8192, "128k": 131072}
VOCAB = 151_936  # Qwen2-sized vocabulary: ids above 2**16, so uint16 would not do


def timed_us(fn: Callable[[], object], reps: int) -> float:
    """Median microseconds of `reps` runs after one warm-up."""
    return round(timed(fn, reps, sync=lambda: None) * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    ns = Namespace(
        model="bench",
        revision="main",
        dtype="bfloat16",
        layout="LBNHC",
        block_size=16,
        page_bytes=65536,
        num_layers=32,
        tp_size=1,
        tp_rank=0,
        chunk_size=args.chunk_size,
    )
    rng = np.random.default_rng(0)
    prompts = {name: rng.integers(0, VOCAB, size=n, dtype=np.uint32) for name, n in LENGTHS.items()}
    kinds = {
        "numpy_uint32": lambda p: p,
        "torch_int64": lambda p: torch.from_numpy(p.astype(np.int64)),
        "python_list": lambda p: p.tolist(),
    }
    floor = {name: timed_us(partial(xxhash.xxh3_128_digest, p.data), args.reps) for name, p in prompts.items()}
    for kind, convert in kinds.items():
        line = {"input": kind, "chunk_size": args.chunk_size}
        for name, prompt in prompts.items():
            tokens = convert(prompt)
            line[f"us_{name}"] = timed_us(partial(chunk_keys, tokens, ns), args.reps)
            line[f"floor_us_{name}"] = floor[name]
        print(json.dumps(line), flush=True)

    as_list = prompts["128k"].tolist()
    conversions = {
        "list_slice_only": lambda: as_list[1:],
        "array_fromlist": lambda: array.array("I").fromlist(as_list),
        "array_I": lambda: array.array("I", as_list),
        "np_array_uint32": lambda: np.array(as_list, dtype=np.uint32),
        "np_array_int64": lambda: np.array(as_list, dtype=np.int64),
        "np_fromiter_uint32": lambda: np.fromiter(as_list, dtype=np.uint32, count=len(as_list)),
    }
    line = {"list_conversion_us_128k": {name: timed_us(fn, args.reps // 4 or 1) for name, fn in conversions.items()}}
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
