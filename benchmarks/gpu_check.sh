#!/usr/bin/env bash
# One run on a lent GPU machine, within one 10-minute command and without network:
#   prereqs  names every missing tool or module before anything runs
#   build    compiles the extension in place for the local GPU (setup.py build_ext:
#            no pip, no build isolation, nothing fetched)
#   tests    pytest -m gpu (vLLM and transformers tests skip: that machine has neither), the
#            hybrid models' per-group pages and Mamba-type state among them (test_kv_groups.py),
#            and per-head records gathered at TP=2 and scattered at TP=1 (test_head_shards.py)
#   bench    benchmarks/kernels.py --device cuda: 32 layers loaded layerwise beside a
#            per-layer matmul vs load-then-compute vs compute alone (kernel and DMA paths);
#            zero-copy GB/s vs cudaMemcpyAsync per grid cap, the DMA path
#            (cudaMemcpyBatchAsync) on per-layer and cross-layer caches, SMs used, compute
#            slowdown beside each copy kind (largest case ~21 GiB)
# Each stage prints one line `gpu_check: STAGE: PASS|FAIL|SKIP (...)`; everything lands
# in $OUT (default /tmp/gpu_check): summary.txt, prereqs.txt, nvidia-smi.txt, build.log,
# build_info.json, pytest_gpu.log, pytest_gpu.xml, bench.log, kernels_cuda.jsonl.
#
# --dry-run runs every stage that needs no device, as CI does: the same prerequisite
# check minus the GPU ones, the build for LMCACHE_EXT_CUDA_ARCHS (default 90, the
# H200's), the collection of the gpu tests, and kernels.py --plan.
# Stage time limits (seconds, env): BUILD_TIMEOUT 180, TESTS_TIMEOUT 210, BENCH_TIMEOUT 180.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
FAILED=0

report() {  # stage, PASS|FAIL|SKIP, detail
  local line="gpu_check: $1: $2 ($3)"
  echo "$line" | tee -a "$OUT/summary.txt"
  [ "$2" = FAIL ] && FAILED=1
  return 0
}

run_stage() {  # stage, timeout seconds, log file, command...
  local stage=$1 limit=$2 log=$3 start rc
  shift 3
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - start ))
  if [ $rc -eq 0 ]; then
    report "$stage" PASS "${took}s, log $(basename "$log")"
  else
    [ $rc -eq 124 ] && rc="timeout after ${limit}s"
    tail -25 "$log"
    report "$stage" FAIL "rc $rc after ${took}s, log $(basename "$log")"
  fi
}

# ---- prereqs ------------------------------------------------------------------------
PREREQS=$(DRY_RUN=$DRY_RUN $PY - <<'EOF' 2>&1
import importlib, os, re, shutil, subprocess, sys
dry = os.environ["DRY_RUN"] == "1"
missing, notes = [], []
if sys.version_info < (3, 10):
    missing.append(f"python >= 3.10 (this is {sys.version.split()[0]})")
for module in ("torch", "numpy", "pybind11", "setuptools", "pytest", "xxhash", "prometheus_client", "yaml"):
    try:
        importlib.import_module(module)
    except Exception as e:
        missing.append(f"python module {module} ({type(e).__name__}: {e})")
try:  # the package's own runtime dependencies, by distribution name
    import tomllib
    from importlib.metadata import PackageNotFoundError, version
    with open("pyproject.toml", "rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
    for requirement in requirements:
        name = re.split(r"[ <>=!~;\[]", requirement, maxsplit=1)[0]
        try:
            version(name)
        except PackageNotFoundError:
            missing.append(f"{name} (a dependency of lmcache_ext in pyproject.toml: {requirement})")
except ModuleNotFoundError:
    notes.append("python < 3.11 has no tomllib: pyproject.toml's dependencies were not checked")
for tool in ("nvcc", "cmake", "ninja"):
    if shutil.which(tool) is None:
        missing.append(f"{tool} on PATH")
if shutil.which("cmake"):
    out = subprocess.run(["cmake", "--version"], capture_output=True, text=True).stdout
    found = re.search(r"(\d+)\.(\d+)", out)
    if not found or (int(found[1]), int(found[2])) < (3, 26):
        missing.append(f"cmake >= 3.26 (found: {out.splitlines()[0] if out else 'unknown'})")
try:
    import cupy  # noqa: F401
except Exception:
    notes.append("cupy missing (optional): the cudaMemcpyAsync baseline goes through torch copies instead")
if not dry:
    if shutil.which("nvidia-smi") is None:
        missing.append("nvidia-smi on PATH")
    try:
        import torch
        if torch.version.cuda is None:
            missing.append(f"a CUDA build of torch (found {torch.__version__})")
        elif not torch.cuda.is_available():
            missing.append("a visible CUDA device (torch.cuda.is_available() is False)")
    except Exception:
        pass
for n in notes:
    print("note:", n)
for m in missing:
    print("missing:", m)
sys.exit(1 if missing else 0)
EOF
)
PREREQ_RC=$?
echo "$PREREQS" > "$OUT/prereqs.txt"
[ -n "$PREREQS" ] && echo "$PREREQS"
if [ $PREREQ_RC -ne 0 ]; then
  report prereqs FAIL "$(grep -c '^missing:' "$OUT/prereqs.txt") missing, see prereqs.txt"
  exit 1
fi
report prereqs PASS "$( [ $DRY_RUN = 1 ] && echo "dry run: GPU checks skipped" || echo "all present" )"

# ---- build --------------------------------------------------------------------------
if [ $DRY_RUN = 1 ]; then
  ARCH=${LMCACHE_EXT_CUDA_ARCHS:-90}
else
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
fi
run_stage "build (sm_$ARCH)" "${BUILD_TIMEOUT:-180}" "$OUT/build.log" \
  env LMCACHE_EXT_CUDA=1 LMCACHE_EXT_CUDA_ARCHS="$ARCH" $PY setup.py build_ext --inplace
if [ $FAILED = 0 ]; then
  $PY - > "$OUT/build_info.json" <<'EOF'
import json
import lmcache_ext._C as C
info = C.build_info()
info.update(module=C.__file__, devices=C.cuda_device_count())
print(json.dumps(info))
EOF
  cat "$OUT/build_info.json"
fi

# ---- tests --------------------------------------------------------------------------
PYTEST=($PY -m pytest -q -m gpu -p no:cacheprovider -rs tests)
if [ $FAILED = 1 ]; then
  report tests SKIP "the build failed"
elif [ $DRY_RUN = 1 ]; then
  run_stage "tests (collect only)" "${TESTS_TIMEOUT:-210}" "$OUT/pytest_gpu.log" "${PYTEST[@]}" --collect-only
  grep -E "tests? collected|selected" "$OUT/pytest_gpu.log" | tail -1
else
  run_stage tests "${TESTS_TIMEOUT:-210}" "$OUT/pytest_gpu.log" "${PYTEST[@]}" --junitxml="$OUT/pytest_gpu.xml"
  tail -3 "$OUT/pytest_gpu.log"
fi

# ---- bench --------------------------------------------------------------------------
if [ $FAILED = 1 ] && [ ! -s "$OUT/build_info.json" ]; then
  report bench SKIP "the build failed"
elif [ $DRY_RUN = 1 ]; then
  run_stage "bench (plan only)" 60 "$OUT/kernels_cuda_plan.jsonl" $PY benchmarks/kernels.py --device cuda --plan
else
  rm -f "$OUT/kernels_cuda.jsonl"
  run_stage bench "${BENCH_TIMEOUT:-180}" "$OUT/bench.log" \
    $PY benchmarks/kernels.py --device cuda --reps 20 --out "$OUT/kernels_cuda.jsonl"
fi

echo "gpu_check: $( [ $FAILED = 0 ] && echo PASS || echo FAIL ), everything is in $OUT"
exit $FAILED
