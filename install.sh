#!/usr/bin/env bash
# Installs coserve into the current Python. Torch is installed only when absent, so a GPU
# machine keeps its CUDA build; on a fresh CPU machine torch==2.13.0 is the CPU wheel on disk.
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-python3}
if ! "$py" -c 'import torch' 2>/dev/null; then
  "$py" -m pip install -q torch==2.13.0
fi
if [ "${1:-}" = "--dev" ]; then
  "$py" -m pip install -q -e ".[dev]"
else
  "$py" -m pip install -q -e .
fi
