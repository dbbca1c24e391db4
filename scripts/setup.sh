#!/usr/bin/env bash
# Create .venv and install progressive into it (idempotent; a second run is quick).
# torch: if the venv has none, install the CPU build this project's machines keep on disk
# (TORCH_SPEC overrides, e.g. TORCH_SPEC="torch" on a GPU cluster with internet access).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/pip install -q -e ".[test,report,sweep,wandb,mlflow,docs]"
.venv/bin/progressive --version
