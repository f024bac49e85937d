#!/usr/bin/env bash
# The whole test suite, as CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=passive HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q -p no:cacheprovider --durations=25 "$@" tests
