#!/usr/bin/env bash
# Stop the single-node Slurm test cluster started by scripts/slurm-up.sh.
#
# Stops slurmd, slurmctld, slurmdbd (pid files in the state dir), then MariaDB and
# munge, but only those two if slurm-up started them.  Idempotent: stopping a
# stopped cluster is a no-op that exits 0.  Job state, the accounting database and
# the configs are kept, so the next slurm-up resumes with the same job ids.
# Jobs still running keep running as orphaned slurmstepd processes until slurmd is
# back; cancel them first (scancel -u root) if that matters.
#
# Environment: PROGRESSIVE_SLURM_DIR (default /var/lib/progressive-slurm).
set -euo pipefail

STATE=${PROGRESSIVE_SLURM_DIR:-/var/lib/progressive-slurm}
RUN=$STATE/run

SLURM_PROG=slurm-down
# shellcheck source=SCRIPTDIR/slurm-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm-lib.sh"

require_root
if [[ ! -d $RUN ]]; then
    say "nothing to stop ($RUN does not exist)"
    exit 0
fi
take_lock 120

# stop NAME PIDFILE COMM: SIGTERM, wait up to 20 s, then SIGKILL
stop() {
    local name=$1 pidfile=$2 comm=$3 pid
    if ! pid=$(pid_of "$pidfile" "$comm"); then
        rm -f "$pidfile"
        return 0
    fi
    say "stopping $name (pid $pid)"
    if ! term_wait "$pid" 80; then
        say "$name did not exit on SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
    stopped=$((stopped + 1))
}

stopped=0
stop slurmd "$RUN/slurmd.pid" slurmd
stop slurmctld "$RUN/slurmctld.pid" slurmctld
stop slurmdbd "$RUN/slurmdbd.pid" slurmdbd

if [[ -e $RUN/mariadb.started-by-us ]]; then
    if pid=$(pid_of /run/mysqld/mysqld.pid mariadbd) || pid=$(pid_of /run/mysqld/mysqld.pid mysqld); then
        say "stopping MariaDB (pid $pid)"
        # mysqladmin shutdown also ends mysqld_safe (it does not restart a clean exit)
        mysqladmin --connect-timeout=5 shutdown 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        wait_gone "$pid" 120 || die "MariaDB (pid $pid) is still running after 30 s"
        stopped=$((stopped + 1))
    fi
    rm -f "$RUN/mariadb.started-by-us"
fi

if [[ -e $RUN/munge.started-by-us ]]; then
    if pid=$(pid_of /run/munge/munged.pid munged); then
        say "stopping munge (pid $pid)"
        term_wait "$pid" 40 || true
        stopped=$((stopped + 1))
    fi
    rm -f "$RUN/munge.started-by-us"
fi

if ((stopped)); then
    say "down ($stopped daemons stopped; state kept in $STATE)"
else
    say "already down"
fi
