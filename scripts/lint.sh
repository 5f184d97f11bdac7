#!/usr/bin/env bash
# The house checks, with the versions pyproject.toml's [lint] extra pins: ruff's lint
# rules, ruff's formatting (checked, not applied: `ruff format .` applies it) and mypy
# over lmcache_ext and benchmarks (both configured in pyproject.toml), and clang-format
# over the C++ (.clang-format; `clang-format -i` applies it). Runs all four,
# then fails if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/steps.sh
mapfile -t LINT < <(python scripts/requirements.py lint)
pip_install python "${LINT[@]}" || exit 1
failed=()
step "ruff check ."
python -m ruff check . || failed+=("ruff check")
step "ruff format --check ."
python -m ruff format --check . || failed+=("ruff format")
step "mypy"
python -m mypy || failed+=("mypy")
step "clang-format --dry-run (C++ and CUDA, as .clang-format says)"
clang-format --dry-run --Werror csrc/*.h csrc/*.cpp csrc/*.cu python/*.h python/*.cpp || failed+=("clang-format")
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "lint: all passed"
