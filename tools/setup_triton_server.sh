#!/usr/bin/env bash
# Install a real Triton Inference Server for moec's tests and `moec verify --server`:
# nvidia-pytriton's wheel carries tritonserver with the python backend. It pins numpy<2, so it
# gets its own venv (.venv-triton). The backend directory holds the python backend and, since
# the wheel has no ONNX Runtime backend library, a python-based `onnxruntime` backend that runs
# models with `platform: "onnxruntime_onnx"` through the onnxruntime package. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-triton
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/tritonserver-ready" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "nvidia-pytriton==0.7.0" "onnxruntime>=1.23" "numpy<2"
fi
# onnxruntime-genai serves text-generation artifacts (the generate extension); added after the first
# release of this script, so installed outside the marker's guard (a no-op when present)
"$VENV/bin/python" -c "import onnxruntime_genai" 2>/dev/null || "$VENV/bin/python" -m pip install -q "onnxruntime-genai>=0.18"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
TS="$SITE/pytriton/tritonserver"
PYVER=$("$VENV/bin/python" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
for f in "$TS/bin/tritonserver" "$TS/backends/python/libtriton_python.so" "$TS/python_backend_stubs/$PYVER/triton_python_backend_stub"; do
  [ -e "$f" ] || { echo "setup_triton_server: missing $f (nvidia-pytriton layout changed?)" >&2; exit 1; }
done
B="$VENV/backends"
mkdir -p "$B/python" "$B/onnxruntime"
cp "$TS/backends/python/libtriton_python.so" "$TS/backends/python/triton_python_backend_utils.py" "$B/python/"
cp "$TS/python_backend_stubs/$PYVER/triton_python_backend_stub" "$B/python/"
cp moec/triton_backends/onnxruntime_model.py "$B/onnxruntime/model.py"
touch "$VENV/bin/tritonserver-ready"
echo "Triton server ready: $TS/bin/tritonserver (backends in $B)"
