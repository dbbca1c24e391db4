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

SLURM_PROG=slurm-accounting
# shellcheck source=SCRIPTDIR/slurm-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm-lib.sh"

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

require_root
take_lock 120

HOST=$(hostname -s)
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
start_daemon slurmctld
wait_ctld
start_daemon slurmd
wait_daemon "$TIMEOUT" "$RUN/slurmd.pid" slurmd node_usable || die_log "node $HOST not usable after ${TIMEOUT}s" "$LOG/slurmctld.log" "$LOG/slurmd.log"

[[ $(live_type) == "$want" ]] || die "slurmctld reports AccountingStorageType=$(live_type), expected $want"
if [[ $mode == on ]]; then
    wait_sacct
    say "accounting on: sacct answers"
else
    sacct_ok && die "sacct still answers with accounting off"
    say "accounting off: slurmctld uses accounting_storage/none, sacct fails"
fi
