#!/usr/bin/env bash
# Stop the multi-node Slurm test cluster of scripts/slurm-multinode-up.sh and remove its
# network: ends what still runs in its namespaces (job steps included), stops every slurmd
# and its slurmctld, deletes the namespaces, their /etc/netns/<ns> files and the bridge.
# The main cluster (scripts/slurm-up.sh) and the shared munge/slurmdbd are left alone.
# Job state and the config are kept in the state dir.  Idempotent.
#
# Environment: PROGRESSIVE_SLURM_MN_DIR (default /var/lib/progressive-slurm-mn).
set -euo pipefail

STATE=${PROGRESSIVE_SLURM_MN_DIR:-/var/lib/progressive-slurm-mn}
RUN=$STATE/run
BRIDGE=pmnbr0

SLURM_PROG=slurm-multinode-down
# shellcheck source=SCRIPTDIR/slurm-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm-lib.sh"
# shellcheck source=SCRIPTDIR/slurm-multinode-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm-multinode-lib.sh"

require_root
if [[ ! -d $RUN ]]; then
    say "nothing to stop ($RUN does not exist)"
    exit 0
fi
take_lock 120

stopped=0
for name in $(our_namespaces); do
    if pid=$(pid_of "$RUN/slurmd-$name.pid" slurmd); then
        say "stopping slurmd $name (pid $pid)"
        stopped=$((stopped + 1))
    fi
done
stop_slurmds
if pid=$(pid_of "$RUN/slurmctld.pid" slurmctld); then
    say "stopping slurmctld (pid $pid)"
    stop_pid "$RUN/slurmctld.pid" slurmctld
    stopped=$((stopped + 1))
fi
rm -f "$RUN"/slurmd-*.pid "$RUN/slurmctld.pid"
removed=0
if [[ -n $(our_namespaces) ]] || ip link show "$BRIDGE" >/dev/null 2>&1; then
    say "removing namespaces $(our_namespaces | tr '\n' ' ')and bridge $BRIDGE"
    net_down
    removed=1
fi
if ((stopped || removed)); then
    say "down ($stopped daemons stopped; state kept in $STATE)"
else
    say "already down"
fi
