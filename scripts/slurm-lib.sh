# shellcheck shell=bash
# Shared helpers of scripts/slurm-up.sh, scripts/slurm-down.sh and
# scripts/slurm-accounting.sh; sourced, not run:
#
#   SLURM_PROG=slurm-up   # prefix of every message ("slurm-up: ...")
#   source "$(dirname "${BASH_SOURCE[0]}")/slurm-lib.sh"
#
# The functions read the caller's variables when they are called: STATE (take_lock),
# RUN, LOG and TIMEOUT (start_daemon, wait_ctld, wait_sacct) and HOST (node_state,
# node_usable).

: "${SLURM_PROG:?set SLURM_PROG before sourcing slurm-lib.sh}"

# ---------------------------------------------------------------- messages
say() { printf '%s: %s\n' "$SLURM_PROG" "$*"; }
die() { printf '%s: ERROR: %s\n' "$SLURM_PROG" "$*" >&2; exit 1; }

# die with the tail of a log file (or several)
die_log() {
    local msg=$1; shift
    printf '%s: ERROR: %s\n' "$SLURM_PROG" "$msg" >&2
    local f
    for f in "$@"; do
        if [[ -s $f ]]; then
            printf -- '----- last lines of %s -----\n' "$f" >&2
            tail -n 25 "$f" >&2
        fi
    done
    exit 1
}

# require_root [WHY]: die unless running as root ("must run as root (WHY)")
# shellcheck disable=SC2120  # WHY is optional
require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root${1:+ ($1)}"
}

# take_lock SECONDS: one slurm-up/slurm-down/slurm-accounting at a time.  The lock is
# fd 9 of this shell; daemons are started with "9>&-" so that they do not inherit
# (and hold) it.
take_lock() {
    exec 9>"$STATE/.lock"
    flock -w "$1" 9 || die "another slurm-up/slurm-down/slurm-accounting holds $STATE/.lock"
}

# ---------------------------------------------------------------- processes
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

# pid_alive PIDFILE COMM: the pid file names a live process whose comm is COMM
pid_alive() { pid_of "$1" "$2" >/dev/null; }

# wait_gone PID TICKS: wait up to TICKS x 0.25 s for PID to exit; 0 once it is gone,
# 1 when it is still alive
wait_gone() {
    local pid=$1 ticks=$2
    for _ in $(seq 1 "$ticks"); do
        alive "$pid" || return 0
        sleep 0.25
    done
    ! alive "$pid"
}

# term_wait PID TICKS: SIGTERM, then wait_gone PID TICKS
term_wait() {
    kill -TERM "$1" 2>/dev/null || true
    wait_gone "$1" "$2"
}

# stop_pid PIDFILE COMM [TICKS]: TERM, wait up to TICKS x 0.25 s (default 80: 20 s),
# KILL; silent, and a no-op when the pid file names no live COMM
stop_pid() {
    local pid
    pid=$(pid_of "$1" "$2") || return 0
    if ! term_wait "$pid" "${3:-80}"; then
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
}

# start_daemon NAME: start the Slurm daemon NAME (slurmdbd, slurmctld, slurmd; it
# forks into the background itself), output appended to $LOG/NAME-start.log; die with
# its logs when it fails to start
start_daemon() {
    "$1" 9>&- </dev/null >>"$LOG/$1-start.log" 2>&1 ||
        die_log "$1 failed to start" "$LOG/$1.log" "$LOG/$1-start.log"
}

# ---------------------------------------------------------------- waiting
# wait_for SECONDS CMD...: retry CMD until it succeeds, every 0.5 s
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

# ---------------------------------------------------------------- probes
ctld_ok() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
sacct_ok() { timeout 10 sacct -n -X -S now-1hours -o JobID >/dev/null 2>&1; }

node_state() { timeout 10 sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1; }
node_usable() {
    local s
    s=$(node_state)
    case $s in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

# wait_ctld: wait until slurmctld answers (scontrol ping), or die with its log
wait_ctld() {
    wait_daemon "$TIMEOUT" "$RUN/slurmctld.pid" slurmctld ctld_ok ||
        die_log "slurmctld does not answer (scontrol ping)" "$LOG/slurmctld.log"
}

# wait_sacct: wait until sacct answers, or die with the slurmdbd and slurmctld logs
wait_sacct() {
    wait_for "$TIMEOUT" sacct_ok ||
        die_log "sacct does not answer" "$LOG/slurmdbd.log" "$LOG/slurmctld.log"
}
