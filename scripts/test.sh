#!/usr/bin/env bash
# The README's test command: set up, type-check (mypy), start the real Slurm test clusters (the single-node
# one, and the 2-node one next to it that tests/test_slurm_multinode.py uses through its own SLURM_CONF),
# run every test.
# Fails loudly if Slurm cannot start: the Slurm tests are never skipped here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Types first: a minute of pytest is not spent on a tree that mypy already rejects.
.venv/bin/mypy
bash scripts/slurm-up.sh
bash scripts/slurm-multinode-up.sh
export PROGRESSIVE_REQUIRE_SLURM=1
# Two workers: the single-node cluster's tests (mostly waiting on Slurm) beside the CPU-bound rest; each
# cluster's tests still run one at a time (tests/conftest.py). The slowest tests are listed at the end: CI
# must stay under 30 minutes, and this says where the time goes.
.venv/bin/python -m pytest -n 2 --dist loadgroup --durations=15 "$@"
