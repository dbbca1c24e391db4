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

say() { printf 'slurm-down: %s\n' "$*"; }
die() { printf 'slurm-down: ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"
if [[ ! -d $RUN ]]; then
    say "nothing to stop ($RUN does not exist)"
    exit 0
fi
exec 9>"$STATE/.lock"
flock -w 120 9 || die "another slurm-up/slurm-down/slurm-accounting holds $STATE/.lock"

# alive PID: the process exists and is not a zombie
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) != Z ]]
}

# pid_of PIDFILE COMM: print the pid when the pid file names a live process called COMM
pid_of() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    echo "$pid"
}

# stop NAME PIDFILE COMM: SIGTERM, wait up to 20 s, then SIGKILL
stop() {
    local name=$1 pidfile=$2 comm=$3 pid
    if ! pid=$(pid_of "$pidfile" "$comm"); then
        rm -f "$pidfile"
        return 0
    fi
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 80); do
        alive "$pid" || break
        sleep 0.25
    done
    if alive "$pid"; then
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
        for _ in $(seq 1 120); do
            alive "$pid" || break
            sleep 0.25
        done
        alive "$pid" && die "MariaDB (pid $pid) is still running after 30 s"
        stopped=$((stopped + 1))
    fi
    rm -f "$RUN/mariadb.started-by-us"
fi

if [[ -e $RUN/munge.started-by-us ]]; then
    if pid=$(pid_of /run/munge/munged.pid munged); then
        say "stopping munge (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do
            alive "$pid" || break
            sleep 0.25
        done
        stopped=$((stopped + 1))
    fi
    rm -f "$RUN/munge.started-by-us"
fi

if ((stopped)); then
    say "down ($stopped daemons stopped; state kept in $STATE)"
else
    say "already down"
fi
