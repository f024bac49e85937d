#!/usr/bin/env bash
# One-command set-up: a venv in .venv with moec (editable) and its test dependencies,
# plus the separate Triton Inference Server venv used by the server tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# the two venvs take about 3 GB (torch and onnxruntime, then the Triton server's): pip fails half-way with
# ENOSPC otherwise; ask for room for what is still to install, with a margin for the tests' temporary files
NEED_GB=0
[ -x .venv/bin/python ] || NEED_GB=$((NEED_GB + 4))
[ -x .venv-triton/bin/tritonserver-ready ] || NEED_GB=$((NEED_GB + 2))
FREE_KB=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "${FREE_KB:-0}" -lt $((NEED_GB * 1024 * 1024)) ]; then
  echo "setup: $((FREE_KB / 1024)) MiB free on the disk holding $(pwd); the venvs still to install need about" \
       "$NEED_GB GiB. Free some space and rerun." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_NO_CACHE_DIR=1  # the wheels are not kept a second time in pip's cache
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to 2.13.0 (CPU build); an open range can pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
if [ -f tools/setup_triton_server.sh ]; then
  bash tools/setup_triton_server.sh
fi
echo "moec set up: activate with 'source .venv/bin/activate' (or call .venv/bin/moec)"
