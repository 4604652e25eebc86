#!/usr/bin/env bash
# GPU check: on a CUDA machine run benchmarks/gpu_check.py; elsewhere say so and exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here — nothing to check."
  exit 0
fi
exec "$PY" benchmarks/gpu_check.py "$@"
