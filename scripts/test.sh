#!/usr/bin/env bash
# The README's test command: set up, type-check (mypy), start the real Slurm test clusters (the single-node
# one, and the 2-node one next to it that tests/test_slurm_multinode.py uses through its own SLURM_CONF),
# run every test.
# Fails loudly if Slurm cannot start: the Slurm tests are never skipped here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Lint and types first: a minute of pytest is not spent on a tree that ruff or mypy already rejects.
.venv/bin/ruff check progressive tests scripts benchmarks
.venv/bin/mypy
bash scripts/slurm-up.sh
bash scripts/slurm-multinode-up.sh
export PROGRESSIVE_REQUIRE_SLURM=1
# Three pytest runs side by side: the single-node cluster's Slurm tests (mostly waiting on Slurm: time limits,
# credential expiry, preemption), one at a time; the 2-node cluster's; and the CPU-bound rest. Each line says
# which run it comes from; each run lists its slowest tests (CI must stay under 30 minutes). Arguments go to
# every run. (pytest-xdist's loadgroup would do this in one process, but with pytest 9.2 its groups are
# silently ignored: both workers ran Slurm tests at once.)
run() {
  local name=$1
  shift
  set +e
  .venv/bin/python -m pytest -p no:cacheprovider "$@" 2>&1 | sed -u "s/^/[$name] /"
  local rc=${PIPESTATUS[0]}
  set -e
  echo "[$name] pytest exit code $rc"
  return "$rc"
}
# The Slurm run names each test as it ends (--verbosity after "$@" wins over CI's -q): 21 dots would
# only show up, as one line, when the last of them ends.
# The 2-node cluster's tests run as a third run beside them: another slurmctld, so they do not wait in
# the single-node run's queue (~3 min of it).
run slurm -m slurm --ignore=tests/test_slurm_multinode.py --durations=15 "$@" --verbosity=1 &
slurm_run=$!
run multinode -m slurm tests/test_slurm_multinode.py --durations=5 "$@" --verbosity=1 &
multinode_run=$!
run rest -m "not slurm" --durations=10 "$@" &
rest_run=$!
rc=0
wait "$slurm_run" || rc=$?
wait "$multinode_run" || rc=$((rc ? rc : $?))
wait "$rest_run" || rc=$((rc ? rc : $?))
exit "$rc"
