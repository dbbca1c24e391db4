# shellcheck shell=bash
# Helpers of scripts/slurm-multinode-up.sh and scripts/slurm-multinode-down.sh (sourced
# after slurm-lib.sh).  They read the caller's NET, NODES, BRIDGE, HOST and RUN.
#
# Node i (1-based) is network namespace pmn<i>, named pmn<i> in Slurm, with address
# $NET.(i+1) on interface eth0 of a veth pair whose root-namespace end, pmn<i>-h, is on
# the bridge $BRIDGE ($NET.1).  /etc/netns/pmn<i>/hosts is what `ip netns exec` shows as
# /etc/hosts inside that namespace.

node_name() { echo "pmn$1"; }
node_addr() { echo "$NET.$(($1 + 1))"; }

# the /etc/hosts every node sees: loopback, the controller host and every node
hosts_text() {
    local i
    printf '127.0.0.1 localhost\n::1 localhost\n%s.1 %s\n' "$NET" "$HOST"
    for ((i = 1; i <= NODES; i++)); do
        printf '%s %s\n' "$(node_addr "$i")" "$(node_name "$i")"
    done
}

# net_ok: the bridge, every namespace, its address and its hosts file are in place
net_ok() {
    ip -4 -o addr show dev "$BRIDGE" 2>/dev/null | grep -q " $NET.1/24 " || return 1
    local i name want
    want=$(hosts_text)
    for ((i = 1; i <= NODES; i++)); do
        name=$(node_name "$i")
        [[ -e /run/netns/$name ]] || return 1
        ip -n "$name" -4 -o addr show dev eth0 2>/dev/null | grep -q " $(node_addr "$i")/24 " || return 1
        ip -n "$name" -o link show dev lo 2>/dev/null | grep -q 'UP' || return 1
        [[ $(cat "/etc/netns/$name/hosts" 2>/dev/null) == "$want" ]] || return 1
    done
    # a namespace beyond NODES (from an earlier, larger --nodes) would be a node Slurm does not know
    [[ ! -e /run/netns/$(node_name $((NODES + 1))) ]]
}

# net_up: create the bridge and one namespace per node (after net_down)
net_up() {
    ip link add "$BRIDGE" type bridge &&
        ip addr add "$NET.1/24" dev "$BRIDGE" &&
        ip link set "$BRIDGE" up || return 1
    local i name
    for ((i = 1; i <= NODES; i++)); do
        name=$(node_name "$i")
        ip netns add "$name" &&
            ip link add "$name-h" type veth peer name eth0 netns "$name" &&
            ip link set "$name-h" master "$BRIDGE" &&
            ip link set "$name-h" up &&
            ip -n "$name" addr add "$(node_addr "$i")/24" dev eth0 &&
            ip -n "$name" link set eth0 up &&
            ip -n "$name" link set lo up || return 1
        mkdir -p "/etc/netns/$name"
        hosts_text >"/etc/netns/$name/hosts"
    done
}

# our namespaces that exist now (pmn1, pmn2, ...), whatever NODES says
our_namespaces() {
    local n
    for n in /run/netns/pmn*; do
        [[ -e $n && ${n##*/} =~ ^pmn[0-9]+$ ]] && echo "${n##*/}"
    done
    return 0
}

# kill_namespace_processes NS: end every process left in namespace NS (job steps,
# tasks): SIGTERM, then SIGKILL what is left after 5 s
kill_namespace_processes() {
    local pids pid
    pids=$(ip netns pids "$1" 2>/dev/null | tr '\n' ' ')
    [[ -n ${pids// /} ]] || return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for pid in $pids; do wait_gone "$pid" 20 || kill -KILL "$pid" 2>/dev/null || true; done
}

# net_down: remove our namespaces (ending what runs in them), their hosts files and the bridge
net_down() {
    local name
    for name in $(our_namespaces); do
        kill_namespace_processes "$name"
        ip netns del "$name" 2>/dev/null || true
        ip link del "$name-h" 2>/dev/null || true
        rm -rf "/etc/netns/$name"
    done
    rmdir /etc/netns 2>/dev/null || true
    ip link del "$BRIDGE" 2>/dev/null || true
}

# stop_slurmds: stop the slurmd of every namespace that exists (any NODES)
stop_slurmds() {
    local name
    for name in $(our_namespaces); do
        stop_pid "$RUN/slurmd-$name.pid" slurmd 60
    done
}

nodes_summary() { timeout 10 sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ' | sed 's/ $//'; }

# nodes_usable: sinfo lists NODES nodes, each idle/mixed/allocated/completing
nodes_usable() {
    local states n=0 s
    states=$(timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u) || return 1
    while read -r _ s; do
        case $s in
            idle | mixed | allocated | completing) n=$((n + 1)) ;;
            *) return 1 ;;
        esac
    done <<<"$states"
    ((n == NODES))
}
