#!/usr/bin/env bash
# One run on a lent GPU machine (no network there): build with CUDA for the local
# GPU, run the GPU tests, run the kernel benchmark on CUDA. Everything it reports
# lands in $OUT: build log, pytest log, benchmark JSON lines, nvidia-smi.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")

echo "== build (sm_$ARCH)"
LMCACHE_EXT_CUDA=1 LMCACHE_EXT_CUDA_ARCHS="$ARCH" \
  $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
$PY -c "import lmcache_ext._C as C; print(C.build_info(), 'devices:', C.cuda_device_count())" | tee "$OUT/build_info.txt"

echo "== GPU tests"
$PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
tests_rc=${PIPESTATUS[0]}

echo "== kernel benchmark (cuda)"
$PY benchmarks/kernels.py --device cuda --reps 20 --out "$OUT/kernels_cuda.jsonl"
bench_rc=$?
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
