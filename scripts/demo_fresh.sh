#!/usr/bin/env bash
# The README's first command as a new user runs it: in a new venv without system
# site-packages (made for this run and removed after it), from a copy of the tree (this
# checkout's own build is left alone), `bash scripts/demo.sh`. Only pip's download cache
# is shared with this machine, so it costs minutes, not a full download. `.ci/run` runs
# it: a package that imports what the demo's install does not bring cannot land.
# Arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/steps.sh
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
step "a fresh venv without system site-packages, and a copy of the tree: $WORK"
python -m venv "$WORK/venv"
copy_tree "$WORK/tree"
cd "$WORK/tree"
PATH="$WORK/venv/bin:$PATH" bash scripts/demo.sh "$@"
