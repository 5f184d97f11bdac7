#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, builds the extension
# (CUDA kernels too when nvcc is found, or when LMCACHE_EXT_CUDA=1), runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q "torch==2.13.0" numpy pytest
python -m pip install -q -e ".[test]"
python -c "import lmcache_ext._C as C; print('lmcache_ext build:', C.build_info())"
python -m pytest -q "$@"
