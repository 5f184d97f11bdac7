#!/usr/bin/env bash
# The suite in an environment without vLLM or transformers, like the lent GPU machine:
# a venv without system site-packages (kept in $LMCACHE_EXT_NOVLLM_VENV and reused), a
# copy of the tree (so the main environment's in-place build is left alone), then
#   1. benchmarks/gpu_check.sh --dry-run: its prerequisite check, its build (CUDA, one
#      arch), the collection of `pytest -m gpu` and the benchmark's plan;
#   2. the whole suite on that build: every vLLM/transformers module skips with its
#      reason, the rest passes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/steps.sh
VENV=${LMCACHE_EXT_NOVLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lmcache_ext/venv-novllm}
[ -x "$VENV/bin/python" ] || { step "a venv without vLLM: $VENV"; python -m venv "$VENV"; }
PY=$VENV/bin/python
# torch pinned to the CPU wheel: pip must never pick a CUDA build here. Then the build and
# test tools, and the package's runtime dependencies as pyproject.toml lists them (with
# the remote tier's client).
step "the venv without vLLM: torch 2.13.0+cpu, build and test tools, the package's dependencies"
mapfile -t DEPS < <($PY scripts/requirements.py remote)
pip_install "$PY" "torch==2.13.0+cpu" pytest pybind11 "cmake>=3.26" ninja setuptools "${DEPS[@]}"
$PY - <<'EOF'
import importlib.util, sys
present = [m for m in ("vllm", "transformers") if importlib.util.find_spec(m) is not None]
sys.exit(f"this venv must lack vLLM and transformers, but has {present}" if present else 0)
EOF

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
copy_tree "$WORK"
cd "$WORK"
export PATH="$VENV/bin:$PATH" PYTHON="$PY"
step "benchmarks/gpu_check.sh --dry-run (its checks, a CUDA build for one arch, the GPU tests' collection)"
OUT="$WORK/gpu_check" bash benchmarks/gpu_check.sh --dry-run
step "the suite without vLLM (its modules skip, naming why)"

$PY -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tee "$WORK/pytest.log"
grep -q "vLLM is not installed" "$WORK/pytest.log" || { echo "no vLLM module was skipped: is vLLM in the venv?"; exit 1; }
