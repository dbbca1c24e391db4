#!/usr/bin/env bash
# Start a real single-node Slurm test cluster with accounting on this machine.
#
# Idempotent: when the cluster is already up (and its configuration is current) it
# says so and exits 0 at once.  Must run as root; no systemd needed.
#
#   scripts/slurm-up.sh                       # state in /var/lib/progressive-slurm
#   PROGRESSIVE_SLURM_DIR=/tmp/s scripts/slurm-up.sh
#
# Environment (all optional):
#   PROGRESSIVE_SLURM_DIR       state dir: configs, logs, pid files, ctld state
#   PROGRESSIVE_SLURM_CLUSTER   ClusterName (default: progressive)
#   PROGRESSIVE_SLURM_GPUS      number of fake GPUs advertised as gres (default: 2)
#   PROGRESSIVE_SLURM_TIMEOUT   seconds to wait for each daemon (default: 60)
#   PROGRESSIVE_SLURM_PREEMPT   1: preemption by partition priority (default: 0, none).
#                               PreemptType=preempt/partition_prio, PreemptMode=REQUEUE, the
#                               default partition debug (PriorityTier=1, PreemptMode=REQUEUE,
#                               GraceTime=PROGRESSIVE_SLURM_GRACE) and a partition high on the same
#                               node (PriorityTier=10, PreemptMode=OFF) whose jobs preempt debug's.
#                               Run again without it to switch back (slurmctld is restarted either
#                               way: `scontrol reconfigure` does not apply a PreemptType change).
#   PROGRESSIVE_SLURM_GRACE     GraceTime of debug under preemption, seconds (default: 30)
#
# Layout: the configs live in the state dir; /etc/slurm/slurm.conf and
# /etc/slurm/gres.conf (where Debian's Slurm 22.05 looks by default) are symlinks to
# them, so plain sbatch/squeue/sacct/scontrol work without SLURM_CONF.
# Undo with scripts/slurm-down.sh; toggle accounting with scripts/slurm-accounting.sh.
set -euo pipefail

STATE=${PROGRESSIVE_SLURM_DIR:-/var/lib/progressive-slurm}
CLUSTER=${PROGRESSIVE_SLURM_CLUSTER:-progressive}
GPUS=${PROGRESSIVE_SLURM_GPUS:-2}
TIMEOUT=${PROGRESSIVE_SLURM_TIMEOUT:-60}
ETC_SLURM=/etc/slurm
# Seconds a requeued job waits before it is eligible again (Slurm: cred_expire + 1).
# Slurm's default is 120; keep it short for tests.
CRED_EXPIRE=${PROGRESSIVE_SLURM_CRED_EXPIRE:-10}
PREEMPT=${PROGRESSIVE_SLURM_PREEMPT:-0}
GRACE=${PROGRESSIVE_SLURM_GRACE:-30}
[[ $PREEMPT == 0 || $PREEMPT == 1 ]] || { echo "slurm-up: ERROR: PROGRESSIVE_SLURM_PREEMPT must be 0 or 1, not '$PREEMPT'" >&2; exit 1; }
[[ $GRACE =~ ^[0-9]+$ ]] || { echo "slurm-up: ERROR: PROGRESSIVE_SLURM_GRACE must be a number of seconds, not '$GRACE'" >&2; exit 1; }

RUN=$STATE/run
LOG=$STATE/log
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)

T0=$(date +%s%N)
SLURM_PROG=slurm-up
# shellcheck source=SCRIPTDIR/slurm-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm-lib.sh"

require_root "starts munge, MariaDB and the Slurm daemons"

mkdir -p "$STATE" "$RUN" "$LOG" "$STATE/ctld" "$STATE/slurmd"
chmod 755 "$STATE"
trap 'rm -f "$STATE"/.slurm.conf.?????? "$STATE"/.gres.conf.?????? "$STATE"/.slurmdbd.conf.??????' EXIT
take_lock 300

# ---------------------------------------------------------------- packages
missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    say "installing ${missing[*]} (apt-get, log in $LOG/apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$LOG/apt.log" 2>&1 || die_log "apt-get update failed" "$LOG/apt.log"
    apt-get install -y -q -o DPkg::Lock::Timeout=120 "${PACKAGES[@]}" 9>&- >>"$LOG/apt.log" 2>&1 ||
        die_log "apt-get install ${PACKAGES[*]} failed" "$LOG/apt.log"
fi

# Daemons and our own commands read the state-dir config; plain client commands read
# /etc/slurm/slurm.conf (the symlink).  Both are the same file.
export SLURM_CONF=$STATE/slurm.conf

# ---------------------------------------------------------------- helpers
# (alive, pid_alive, wait_for, wait_daemon, stop_pid, ctld_ok, sacct_ok, node_state,
# node_usable, ... are in slurm-lib.sh)
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
mysql_ok() { mysqladmin --connect-timeout=2 ping >/dev/null 2>&1; }
sacctmgr_ok() { timeout 10 sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1; }

# install_file SRC DEST MODE: replace DEST by SRC when they differ; returns 0 when changed
install_file() {
    if [[ -f $2 ]] && cmp -s "$1" "$2"; then
        rm -f "$1"
        return 1
    fi
    chmod "$3" "$1"
    mv -f "$1" "$2"
    return 0
}

# ---------------------------------------------------------------- configs
HOST=$(hostname -s)
[[ -n $HOST ]] || die "hostname -s is empty"

# Hardware facts from slurmd -C; keep everything but NodeName/RealMemory/UpTime.
hw=$(slurmd -C 2>/dev/null | head -n1) || true
[[ $hw == NodeName=* ]] || die "slurmd -C failed: $hw"
real_mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
[[ -n $real_mem ]] || die "no RealMemory in: $hw"
margin=$((real_mem / 20))
((margin >= 256)) || margin=256
mem=$((real_mem - margin))
((mem > 0)) || mem=$real_mem
topology=$(tr ' ' '\n' <<<"$hw" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')

DB_PASS_FILE=$STATE/db-password
if [[ ! -s $DB_PASS_FILE ]]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_PASS_FILE")
fi
chmod 600 "$DB_PASS_FILE"
DB_PASS=$(cat "$DB_PASS_FILE")

# Fake GPUs.  Slurm 22.05's gpu plugin drops file-less GPUs ("Removing file-less GPU
# gpu:(null) from final GRES list" -> node INVAL, "gres/gpu count reported lower than
# configured"), so each GPU gets a device file: a character device with /dev/null's
# numbers (a plain file also works, but slurmd then logs "not a valid character or
# block device").  Jobs get CUDA_VISIBLE_DEVICES=0,1,... as on a real GPU node.
tmp_gres=$(mktemp "$STATE/.gres.conf.XXXXXX")
echo "# Generated by scripts/slurm-up.sh: $GPUS fake GPUs so --gpus-per-node=N schedules." >"$tmp_gres"
gres_node=
if ((GPUS > 0)); then
    mkdir -p "$STATE/fake-gpu"
    for ((i = 0; i < GPUS; i++)); do
        dev=$STATE/fake-gpu/gpu$i
        if [[ ! -c $dev ]]; then
            rm -f "$dev"
            mknod -m 666 "$dev" c 1 3 2>/dev/null || touch "$dev"
        fi
    done
    echo "NodeName=$HOST Name=gpu Count=$GPUS File=$STATE/fake-gpu/gpu[0-$((GPUS - 1))]" >>"$tmp_gres"
    gres_node=" Gres=gpu:$GPUS"
fi

# Preemption by partition priority (PROGRESSIVE_SLURM_PREEMPT=1): only jobs of the high tier preempt,
# so jobs that all run on debug never preempt each other.
if ((PREEMPT)); then
    preempt_lines="PreemptType=preempt/partition_prio
PreemptMode=REQUEUE"
    partitions="PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"
    partition_words="partitions debug (preemptible, GraceTime=${GRACE}s) and high"
else
    preempt_lines="PreemptType=preempt/none
PreemptMode=OFF"
    partitions="PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    partition_words="partition debug"
fi

tmp_slurm=$(mktemp "$STATE/.slurm.conf.XXXXXX")
cat >"$tmp_slurm" <<EOF
# Generated by scripts/slurm-up.sh (progressive test cluster); rewritten on every start.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
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
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

# scheduling: start jobs (and dependency-chained jobs) within seconds
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,sched_min_interval=0,batch_sched_delay=1,bf_interval=1,bf_resolution=1
SchedulerTimeSlice=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
$preempt_lines
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
OverTimeLimit=0
Waittime=0
SlurmctldTimeout=120
SlurmdTimeout=300

# accounting (sacct); scripts/slurm-accounting.sh off|on rewrites the next line and
# comments/uncomments AccountingStorageTRES (which needs slurmdbd)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none

GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 ${topology}RealMemory=$mem$gres_node State=UNKNOWN
$partitions
EOF

tmp_dbd=$(mktemp "$STATE/.slurmdbd.conf.XXXXXX")
cat >"$tmp_dbd" <<EOF
# Generated by scripts/slurm-up.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF

slurm_changed=0
dbd_changed=0
install_file "$tmp_slurm" "$STATE/slurm.conf" 644 && slurm_changed=1
install_file "$tmp_gres" "$STATE/gres.conf" 644 && slurm_changed=1
install_file "$tmp_dbd" "$STATE/slurmdbd.conf" 600 && dbd_changed=1
chown root:root "$STATE/slurmdbd.conf"
chmod 600 "$STATE/slurmdbd.conf"

# Default config location of Debian's Slurm 22.05: /etc/slurm/slurm.conf, with
# gres.conf looked up next to it.  A foreign file is moved aside once.
links_changed=0
mkdir -p "$ETC_SLURM"
for f in slurm.conf gres.conf; do
    target=$STATE/$f
    link=$ETC_SLURM/$f
    if [[ -L $link && $(readlink "$link") == "$target" ]]; then
        continue
    fi
    if [[ -e $link && ! -L $link ]]; then
        mv -f "$link" "$link.before-progressive"
        say "moved existing $link to $link.before-progressive"
    fi
    ln -sfn "$target" "$link"
    links_changed=1
done

# ---------------------------------------------------------------- already up?
if ((slurm_changed == 0 && dbd_changed == 0 && links_changed == 0)) &&
    munge_ok && mysql_ok &&
    pid_alive "$RUN/slurmdbd.pid" slurmdbd &&
    pid_alive "$RUN/slurmctld.pid" slurmctld &&
    pid_alive "$RUN/slurmd.pid" slurmd &&
    node_usable && sacct_ok; then
    say "already up: cluster $CLUSTER, node $HOST $(node_state), state dir $STATE"
    exit 0
fi

# ---------------------------------------------------------------- munge
if ! munge_ok; then
    say "starting munge"
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    install -d -o munge -g munge -m 0700 /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    # --force: a stale socket/pid file from an unclean stop must not block us
    runuser -u munge -- /usr/sbin/munged --force 9>&- </dev/null >>"$LOG/munged-start.log" 2>&1 ||
        die_log "munged failed to start" "$LOG/munged-start.log" /var/log/munge/munged.log
    touch "$RUN/munge.started-by-us"
    wait_for "$TIMEOUT" munge_ok || die_log "munge does not answer (munge -n | unmunge)" /var/log/munge/munged.log
fi

# ---------------------------------------------------------------- MariaDB
if ! mysql_ok; then
    say "starting MariaDB"
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOG/mariadb.log" 2>&1 ||
            die_log "mariadb-install-db failed" "$LOG/mariadb.log"
    fi
    touch "$LOG/mariadb.log"
    chown mysql:mysql "$LOG/mariadb.log"
    setsid nohup mysqld_safe --user=mysql --skip-syslog --log-error="$LOG/mariadb.log" \
        9>&- </dev/null >>"$LOG/mariadb-start.log" 2>&1 &
    touch "$RUN/mariadb.started-by-us"
    wait_for "$TIMEOUT" mysql_ok || die_log "MariaDB does not answer (mysqladmin ping)" "$LOG/mariadb.log" "$LOG/mariadb-start.log"
fi
mysql -u root <<EOF || die "could not create database slurm_acct_db / user slurm in MariaDB"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF

# ---------------------------------------------------------------- slurmdbd
if ((dbd_changed)) && pid_alive "$RUN/slurmdbd.pid" slurmdbd; then
    say "slurmdbd.conf changed: restarting slurmdbd"
    stop_pid "$RUN/slurmdbd.pid" slurmdbd 60
fi
if ! pid_alive "$RUN/slurmdbd.pid" slurmdbd; then
    say "starting slurmdbd"
    start_daemon slurmdbd
fi
wait_daemon "$TIMEOUT" "$RUN/slurmdbd.pid" slurmdbd sacctmgr_ok || die_log "slurmdbd does not answer (sacctmgr show cluster)" "$LOG/slurmdbd.log" "$LOG/mariadb.log"
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    say "adding cluster $CLUSTER to the accounting database"
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die_log "sacctmgr add cluster $CLUSTER failed" "$LOG/slurmdbd.log"
fi

# ---------------------------------------------------------------- slurmctld, slurmd
if ((slurm_changed)); then
    # also switches accounting back on after scripts/slurm-accounting.sh off
    if pid_alive "$RUN/slurmctld.pid" slurmctld || pid_alive "$RUN/slurmd.pid" slurmd; then
        say "slurm.conf/gres.conf changed: restarting slurmctld and slurmd"
    fi
    stop_pid "$RUN/slurmd.pid" slurmd 60
    stop_pid "$RUN/slurmctld.pid" slurmctld 60
fi
if ! pid_alive "$RUN/slurmctld.pid" slurmctld; then
    say "starting slurmctld"
    start_daemon slurmctld
fi
wait_ctld
if ! pid_alive "$RUN/slurmd.pid" slurmd; then
    say "starting slurmd"
    start_daemon slurmd
fi

# wait for the node; a node left DRAINED/DOWN by an earlier run is resumed once
end=$((SECONDS + TIMEOUT))
resumed=0
until node_usable; do
    if ((SECONDS >= end)); then
        die_log "node $HOST is not usable after ${TIMEOUT}s (sinfo state: '$(node_state)')" \
            "$LOG/slurmctld.log" "$LOG/slurmd.log"
    fi
    pid_alive "$RUN/slurmd.pid" slurmd || sleep 1
    pid_alive "$RUN/slurmd.pid" slurmd ||
        die_log "slurmd died (sinfo state: '$(node_state)')" "$LOG/slurmd.log" "$LOG/slurmd-start.log"
    st=$(node_state)
    if ((resumed == 0)) && [[ $st == *drain* || $st == down* ]] && pid_alive "$RUN/slurmd.pid" slurmd; then
        sleep 2
        st=$(node_state)
        if [[ $st == *drain* || $st == down* ]]; then
            say "node $HOST is $st: resuming it"
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
    fi
    sleep 0.5
done
wait_sacct

# the default config path must work for plain commands
env -u SLURM_CONF sinfo -h >/dev/null 2>&1 || die "plain 'sinfo' (via $ETC_SLURM/slurm.conf) fails"

ms=$((($(date +%s%N) - T0) / 1000000))
elapsed=$((ms / 1000)).$((ms % 1000 / 100))
say "up in ${elapsed}s: cluster $CLUSTER, node $HOST $(node_state) (CPUs $(sinfo -h -N -n "$HOST" -o %c | head -n1), gpu:$GPUS), $partition_words, accounting on, configs $STATE -> $ETC_SLURM"
