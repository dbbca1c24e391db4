#!/usr/bin/env bash
# Start a second, multi-node Slurm test cluster on this machine: one slurmd per network
# namespace, each namespace a "node" with its own address, hostname and /etc/hosts.
#
# It is a separate cluster next to the single-node one of scripts/slurm-up.sh (which it
# leaves alone): its own ClusterName, ports, state dir, daemons and slurm.conf.  Use it by
# pointing Slurm's commands at its config:
#
#   scripts/slurm-multinode-up.sh             # 2 nodes, state in /var/lib/progressive-slurm-mn
#   scripts/slurm-multinode-up.sh --nodes 3
#   export SLURM_CONF=/var/lib/progressive-slurm-mn/slurm.conf; sinfo
#
# Needs scripts/slurm-up.sh's munge and slurmdbd running (it shares them: munge's socket is
# on the shared filesystem, and accounting goes to the same slurmdbd under its own cluster
# name).  Idempotent: when the cluster is already up with this configuration it says so
# and exits 0.  Must run as root.  Undo with scripts/slurm-multinode-down.sh.
#
# Network: a bridge in the root namespace holding $NET.1 (slurmctld), and per node i a
# namespace pmn<i> holding $NET.(i+1) on one end of a veth pair whose other end is on the
# bridge.  No routes lead anywhere else: all traffic stays on these addresses (and on
# loopback, for slurmdbd).  Each node's slurmd runs inside its namespace under its own
# hostname (UTS namespace) and with /etc/netns/<ns>/hosts bind-mounted over
# /etc/hosts, so node names resolve to the nodes' addresses inside the jobs
# (MASTER_ADDR=<first node's name> works from every node).
#
# Environment (all optional):
#   PROGRESSIVE_SLURM_MN_DIR       state dir (default /var/lib/progressive-slurm-mn)
#   PROGRESSIVE_SLURM_MN_CLUSTER   ClusterName (default progressive-mn)
#   PROGRESSIVE_SLURM_MN_NET       first three octets of the /24 it creates (default 198.18.14,
#                                  from the benchmarking range RFC 2544 reserves: never routed)
#   PROGRESSIVE_SLURM_MN_PORT      SlurmctldPort; SlurmdPort is this + 1 (default 6827)
#   PROGRESSIVE_SLURM_TIMEOUT      seconds to wait for each daemon (default 60)
set -euo pipefail

NODES=2
while (($#)); do
    case $1 in
        --nodes) NODES=${2:-}; shift 2 || { echo "slurm-multinode-up: --nodes needs a number" >&2; exit 2; } ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "slurm-multinode-up: unknown argument '$1' (usage: $0 [--nodes N])" >&2; exit 2 ;;
    esac
done
[[ $NODES =~ ^[0-9]+$ ]] && ((NODES >= 2 && NODES <= 8)) ||
    { echo "slurm-multinode-up: --nodes must be a number from 2 to 8, got '$NODES'" >&2; exit 2; }

STATE=${PROGRESSIVE_SLURM_MN_DIR:-/var/lib/progressive-slurm-mn}
CLUSTER=${PROGRESSIVE_SLURM_MN_CLUSTER:-progressive-mn}
NET=${PROGRESSIVE_SLURM_MN_NET:-198.18.14}
CTLD_PORT=${PROGRESSIVE_SLURM_MN_PORT:-6827}
SLURMD_PORT=$((CTLD_PORT + 1))
TIMEOUT=${PROGRESSIVE_SLURM_TIMEOUT:-60}
CRED_EXPIRE=${PROGRESSIVE_SLURM_CRED_EXPIRE:-10}
RUN=$STATE/run
LOG=$STATE/log
BRIDGE=pmnbr0

T0=$(date +%s%N)
SLURM_PROG=slurm-multinode-up
# shellcheck source=SCRIPTDIR/slurm-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm-lib.sh"
# shellcheck source=SCRIPTDIR/slurm-multinode-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm-multinode-lib.sh"

require_root "creates network namespaces and starts slurmctld and slurmd"
mkdir -p "$STATE" "$RUN" "$LOG" "$STATE/ctld"
if ! command -v ip >/dev/null; then
    say "installing iproute2 (apt-get, log in $LOG/apt.log)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=120 iproute2; } 9>&- >"$LOG/apt.log" 2>&1 ||
        die_log "apt-get install iproute2 failed" "$LOG/apt.log"
fi
for cmd in ip unshare nsenter slurmctld slurmd sinfo; do
    command -v "$cmd" >/dev/null || die "$cmd not found (Slurm comes with scripts/slurm-up.sh; unshare and nsenter with util-linux)"
done
chmod 755 "$STATE"
trap 'rm -f "$STATE"/.slurm.conf.??????' EXIT
take_lock 300
export SLURM_CONF=$STATE/slurm.conf

# ---------------------------------------------------------------- shared daemons
munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 ||
    die "munge does not answer: start the main test cluster first (bash scripts/slurm-up.sh)"

# ---------------------------------------------------------------- config
HOST=$(hostname -s)
[[ -n $HOST ]] || die "hostname -s is empty"
hw=$(slurmd -C 2>/dev/null | head -n1) || true
[[ $hw == NodeName=* ]] || die "slurmd -C failed: $hw"
topology=$(tr ' ' '\n' <<<"$hw" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
# Every node claims the machine's cores (slurmd drains a node that reports fewer than
# configured) and a modest share of its memory: the nodes are views of one machine.
NODE_MEM=${PROGRESSIVE_SLURM_MN_MEM:-4096}

node_lines=
for ((i = 1; i <= NODES; i++)); do
    node_lines+="NodeName=$(node_name "$i") NodeHostname=$(node_name "$i") NodeAddr=$(node_addr "$i") ${topology}RealMemory=$NODE_MEM State=UNKNOWN"$'\n'
done

tmp_slurm=$(mktemp "$STATE/.slurm.conf.XXXXXX")
cat >"$tmp_slurm" <<EOF
# Generated by scripts/slurm-multinode-up.sh (progressive $NODES-node test cluster); rewritten on every start.
ClusterName=$CLUSTER
SlurmctldHost=$HOST($NET.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
MailProg=/bin/true

StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,sched_min_interval=0,batch_sched_delay=1,bf_interval=1,bf_resolution=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
PreemptType=preempt/none
PreemptMode=OFF
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
OverTimeLimit=0
Waittime=0
SlurmctldTimeout=120
SlurmdTimeout=300

# accounting: the main test cluster's slurmdbd (loopback), under this cluster's name
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none

${node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
slurm_changed=0
if [[ -f $STATE/slurm.conf ]] && cmp -s "$tmp_slurm" "$STATE/slurm.conf"; then
    rm -f "$tmp_slurm"
else
    chmod 644 "$tmp_slurm"
    mv -f "$tmp_slurm" "$STATE/slurm.conf"
    slurm_changed=1
fi

# sacctmgr reads the slurmdbd address from the config just written
dbd_ok() { timeout 10 sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1; }
dbd_ok || die "slurmdbd does not answer (sacctmgr show cluster): start the main test cluster first (bash scripts/slurm-up.sh)"

# ---------------------------------------------------------------- already up?
all_up() {
    ((slurm_changed == 0)) && net_ok && pid_alive "$RUN/slurmctld.pid" slurmctld || return 1
    local i
    for ((i = 1; i <= NODES; i++)); do
        pid_alive "$RUN/slurmd-$(node_name "$i").pid" slurmd || return 1
    done
    nodes_usable && sacct_ok
}
if all_up; then
    say "already up: cluster $CLUSTER, nodes $(nodes_summary), SLURM_CONF=$STATE/slurm.conf"
    exit 0
fi

# ---------------------------------------------------------------- network
# A namespace left from a larger --nodes (or an unclean stop) goes; ours are recreated
# only when something about them is missing.
if ! net_ok; then
    say "creating bridge $BRIDGE ($NET.1) and namespaces $(node_name 1)..$(node_name "$NODES")"
    net_down
    net_up || die "could not create the network (see the ip error above)"
fi
net_ok || die "the network is not as expected after creating it: $(ip -br addr show dev "$BRIDGE" 2>&1)"

# ---------------------------------------------------------------- accounting
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    say "adding cluster $CLUSTER to the accounting database"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
fi

# ---------------------------------------------------------------- daemons
if ((slurm_changed)); then
    if pid_alive "$RUN/slurmctld.pid" slurmctld; then
        say "slurm.conf changed: restarting slurmctld and the slurmds"
    fi
    stop_slurmds
    stop_pid "$RUN/slurmctld.pid" slurmctld 60
fi
if ! pid_alive "$RUN/slurmctld.pid" slurmctld; then
    say "starting slurmctld"
    start_daemon slurmctld
fi
wait_ctld
for ((i = 1; i <= NODES; i++)); do
    name=$(node_name "$i")
    if ! pid_alive "$RUN/slurmd-$name.pid" slurmd; then
        say "starting slurmd $name in namespace $name ($(node_addr "$i"))"
        mkdir -p "$STATE/slurmd-$name"
        # In its network namespace, with its own hostname (UTS namespace) and its own
        # /etc/hosts (a bind mount in a private mount namespace).  Not `ip netns exec`: that
        # also remounts /sys, without the cgroup mount slurmd needs.
        nsenter --net="/run/netns/$name" unshare --uts --mount --propagation private \
            sh -c 'mount --bind "/etc/netns/$1/hosts" /etc/hosts && hostname "$1" && exec slurmd -N "$1"' sh "$name" \
            9>&- </dev/null >>"$LOG/slurmd-$name-start.log" 2>&1 ||
            die_log "slurmd $name failed to start" "$LOG/slurmd-$name.log" "$LOG/slurmd-$name-start.log"
    fi
done

# wait for every node; nodes left DOWN/DRAINED by an earlier run are resumed once
start=$SECONDS
resumed=0
until nodes_usable; do
    for ((i = 1; i <= NODES; i++)); do
        name=$(node_name "$i")
        pid_alive "$RUN/slurmd-$name.pid" slurmd || sleep 1
        pid_alive "$RUN/slurmd-$name.pid" slurmd ||
            die_log "slurmd $name died (sinfo: $(nodes_summary))" "$LOG/slurmd-$name.log" "$LOG/slurmd-$name-start.log"
    done
    if ((SECONDS - start >= TIMEOUT)); then
        logs=("$LOG/slurmctld.log")
        for ((i = 1; i <= NODES; i++)); do logs+=("$LOG/slurmd-$(node_name "$i").log"); done
        die_log "nodes not usable after ${TIMEOUT}s (sinfo: $(nodes_summary))" "${logs[@]}"
    fi
    if ((resumed == 0 && SECONDS - start >= 3)) && timeout 10 sinfo -h -N -o '%T' | grep -qE 'drain|down'; then
        say "resuming nodes left down/drained: $(nodes_summary)"
        for ((i = 1; i <= NODES; i++)); do
            scontrol update NodeName="$(node_name "$i")" State=RESUME >/dev/null 2>&1 || true
        done
        resumed=1
    fi
    sleep 0.5
done
wait_sacct

ms=$((($(date +%s%N) - T0) / 1000000))
say "up in $((ms / 1000)).$((ms % 1000 / 100))s: cluster $CLUSTER, nodes $(nodes_summary), partition debug, SLURM_CONF=$STATE/slurm.conf"
