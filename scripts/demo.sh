#!/usr/bin/env bash
# Installs lmcache_ext and runs its main job on this machine: the kernel benchmark
# (our gather/scatter against memcpy and plain torch, one JSON line per case).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q "torch==2.13.0" numpy
python -m pip install -q -e .
python benchmarks/kernels.py "$@"
