#!/usr/bin/env bash
# One-command set-up: a venv in .venv with moec (editable) and its test dependencies,
# plus the separate Triton Inference Server venv used by the server tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to 2.13.0 (CPU build); an open range can pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
if [ -f tools/setup_triton_server.sh ]; then
  bash tools/setup_triton_server.sh
fi
echo "moec set up: activate with 'source .venv/bin/activate' (or call .venv/bin/moec)"
