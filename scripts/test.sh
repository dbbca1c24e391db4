#!/usr/bin/env bash
# The README's test command: set up, start the real single-node Slurm test cluster, run every test.
# Fails loudly if Slurm cannot start: the Slurm tests are never skipped here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/slurm-up.sh
export PROGRESSIVE_REQUIRE_SLURM=1
.venv/bin/python -m pytest "$@"
