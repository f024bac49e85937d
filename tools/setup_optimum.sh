#!/usr/bin/env bash
# A venv of its own for Optimum's ONNX export, a peer in tools/bench_generate.py: optimum-onnx pins
# transformers 4.x, moec's venv has transformers 5. Benchmarks only; the tests never need it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-optimum
if [ ! -x "$VENV/bin/optimum-cli" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "optimum-onnx[onnxruntime]" "transformers>=4.57,<5" torch numpy
fi
echo "Optimum ready: $VENV/bin/optimum-cli"
