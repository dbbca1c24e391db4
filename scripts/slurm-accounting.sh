#!/usr/bin/env bash
# Switch job accounting of the test cluster (scripts/slurm-up.sh) off or on.
#
#   scripts/slurm-accounting.sh off      # slurmctld without accounting: sacct fails
#   scripts/slurm-accounting.sh on       # back to accounting_storage/slurmdbd
#   scripts/slurm-accounting.sh status   # prints "on" or "off"
#
# "off" rewrites AccountingStorageType=accounting_storage/none in the cluster's
# slurm.conf (also what plain client commands read through /etc/slurm/slurm.conf) and
# restarts slurmctld and slurmd; queued and running jobs survive the restart.
# sacct then exits non-zero ("Slurm accounting storage is disabled"), as on a cluster
# without slurmdbd.  slurmdbd and MariaDB keep running, so "on" is quick; jobs that
# ran while accounting was off are not in the database.  scripts/slurm-up.sh also
# switches accounting back on (it rewrites the configuration it owns).
#
# Environment: PROGRESSIVE_SLURM_DIR (default /var/lib/progressive-slurm),
# PROGRESSIVE_SLURM_TIMEOUT (default 60 s).
set -euo pipefail

STATE=${PROGRESSIVE_SLURM_DIR:-/var/lib/progressive-slurm}
TIMEOUT=${PROGRESSIVE_SLURM_TIMEOUT:-60}
RUN=$STATE/run
LOG=$STATE/log
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF

say() { printf 'slurm-accounting: %s\n' "$*"; }
die() { printf 'slurm-accounting: ERROR: %s\n' "$*" >&2; exit 1; }
die_log() {
    local msg=$1; shift
    printf 'slurm-accounting: ERROR: %s\n' "$msg" >&2
    local f
    for f in "$@"; do
        if [[ -s $f ]]; then
            printf -- '----- last lines of %s -----\n' "$f" >&2
            tail -n 25 "$f" >&2
        fi
    done
    exit 1
}

mode=${1:-}
case $mode in
    on) want=accounting_storage/slurmdbd ;;
    off) want=accounting_storage/none ;;
    status) ;;
    *) die "usage: $0 on|off|status" ;;
esac

[[ -f $CONF ]] || die "$CONF not found: start the cluster with scripts/slurm-up.sh"
current=$(sed -n 's/^AccountingStorageType=//p' "$CONF")
if [[ $mode == status ]]; then
    [[ $current == accounting_storage/none ]] && echo off || echo on
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "must run as root"
exec 9>"$STATE/.lock"
flock -w 120 9 || die "another slurm-up/slurm-down/slurm-accounting holds $STATE/.lock"

alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) != Z ]]
}
pid_alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]]
}
stop_pid() {
    local pid
    pid_alive "$1" "$2" || return 0
    pid=$(cat "$1")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 80); do
        alive "$pid" || return 0
        sleep 0.25
    done
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
}
wait_for() {
    local secs=$1; shift
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || return 1
        sleep 0.5
    done
}

# wait_daemon SECONDS PIDFILE COMM CMD...: like wait_for, but give up early when the
# daemon has died (its pid file names no live process for 3 s)
wait_daemon() {
    local secs=$1 pidfile=$2 comm=$3; shift 3
    local end=$((SECONDS + secs)) dead=0
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || return 1
        if pid_alive "$pidfile" "$comm"; then dead=0; else dead=$((dead + 1)); fi
        ((dead < 6)) || return 1
        sleep 0.5
    done
}
ctld_ok() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
sacct_ok() { timeout 10 sacct -n -X -S now-1hours -o JobID >/dev/null 2>&1; }
HOST=$(hostname -s)
node_usable() {
    case $(timeout 10 sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1) in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}
live_type() { timeout 10 scontrol show config 2>/dev/null | sed -n 's/^AccountingStorageType *= *//p'; }

pid_alive "$RUN/slurmctld.pid" slurmctld && pid_alive "$RUN/slurmd.pid" slurmd ||
    die "the cluster is not up: run scripts/slurm-up.sh first"

if [[ $current == "$want" && $(live_type) == "$want" ]]; then
    say "accounting already $mode"
    exit 0
fi
if [[ $mode == on ]]; then
    pid_alive "$RUN/slurmdbd.pid" slurmdbd || die "slurmdbd is not running: run scripts/slurm-up.sh (it also turns accounting on)"
fi

tmp=$(mktemp "$STATE/.slurm.conf.XXXXXX")
trap 'rm -f "$tmp"' EXIT
# AccountingStorageTRES=gres/gpu needs slurmdbd ("fatal: slurmdbd is required to run
# with TRES gres/gpu"), so it is commented out while accounting is off.
if [[ $mode == off ]]; then
    sed -e "s|^AccountingStorageType=.*|AccountingStorageType=$want|" \
        -e 's|^AccountingStorageTRES=|#AccountingStorageTRES=|' "$CONF" >"$tmp"
else
    sed -e "s|^AccountingStorageType=.*|AccountingStorageType=$want|" \
        -e 's|^#AccountingStorageTRES=|AccountingStorageTRES=|' "$CONF" >"$tmp"
fi
grep -qx "AccountingStorageType=$want" "$tmp" || die "no AccountingStorageType line in $CONF"
chmod 644 "$tmp"
mv -f "$tmp" "$CONF"

say "restarting slurmctld and slurmd with AccountingStorageType=$want"
stop_pid "$RUN/slurmd.pid" slurmd
stop_pid "$RUN/slurmctld.pid" slurmctld
slurmctld 9>&- </dev/null >>"$LOG/slurmctld-start.log" 2>&1 ||
    die_log "slurmctld failed to start" "$LOG/slurmctld.log" "$LOG/slurmctld-start.log"
wait_daemon "$TIMEOUT" "$RUN/slurmctld.pid" slurmctld ctld_ok || die_log "slurmctld does not answer (scontrol ping)" "$LOG/slurmctld.log"
slurmd 9>&- </dev/null >>"$LOG/slurmd-start.log" 2>&1 ||
    die_log "slurmd failed to start" "$LOG/slurmd.log" "$LOG/slurmd-start.log"
wait_daemon "$TIMEOUT" "$RUN/slurmd.pid" slurmd node_usable || die_log "node $HOST not usable after ${TIMEOUT}s" "$LOG/slurmctld.log" "$LOG/slurmd.log"

[[ $(live_type) == "$want" ]] || die "slurmctld reports AccountingStorageType=$(live_type), expected $want"
if [[ $mode == on ]]; then
    wait_for "$TIMEOUT" sacct_ok || die_log "sacct does not answer" "$LOG/slurmdbd.log" "$LOG/slurmctld.log"
    say "accounting on: sacct answers"
else
    sacct_ok && die "sacct still answers with accounting off"
    say "accounting off: slurmctld uses accounting_storage/none, sacct fails"
fi
