#!/usr/bin/env bash
# Installs lmcache_ext and runs its main job on this machine: store and reuse of KV
# chunks through the cache engine (host and disk tiers, lookup latency), after the
# kernels it stands on, each against its baseline (one JSON line per figure).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q "torch==2.13.0" numpy
python -m pip install -q -e .
python benchmarks/kernels.py --case cuda_like --case mla_like
python benchmarks/engine.py
