#!/usr/bin/env bash
# Data-path benchmark of the fast path: container-to-container iperf3 TCP,
# single stream, between two namespace hosts joined by one veth (the same
# underlay as shared/bench/anchors.sh), over
#   mesh-fastdp   a default launch (kernel VXLAN, UDP 6784)
#   mesh-sleeve   --no-fastdp (userspace sleeve, UDP 6783)
# and, in the same run, the reference "kernel-vxlan-bridge" path measured by
# shared/bench/anchors.sh (VXLAN enslaved to a bridge, container on a veth).
# Each is measured RUNS times, interleaved; the median is reported with the
# ratio fastdp / kernel-vxlan-bridge.
#
#   benches/fastdp.sh            (as root; T=5 seconds per run, RUNS=3)
#
# Uses namespaces prefixed mfb<pid>- (and anchors.sh's pb*), addresses in
# 198.18.0.0/15 only; cleans up on every exit.
set -euo pipefail
T=${T:-5}
RUNS=${RUNS:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MESH=${MESH_BIN:-$ROOT/target/release/mesh}
ANCHORS=${ANCHORS:-/work/shared/bench/anchors.sh}
[[ $EUID -eq 0 ]] || { echo "benches/fastdp.sh: run as root" >&2; exit 1; }
[[ -x $MESH ]] || { echo "no $MESH: cargo build --release first" >&2; exit 1; }
P=mfb$$
DIR=$(mktemp -d /tmp/$P.XXXX)
SRV=""
cleanup() {
    set +e
    [[ -n $SRV ]] && kill "$SRV" 2>/dev/null
    for h in a b; do
        if [[ -f $DIR/$h/run/mesh.pid ]]; then kill "$(cat "$DIR/$h/run/mesh.pid")" 2>/dev/null; fi
    done
    for ns in $P-a $P-b $P-ca $P-cb; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$DIR"
}
trap cleanup EXIT

for ns in $P-a $P-b $P-ca $P-cb; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add $P-u netns $P-a type veth peer name $P-v netns $P-b
ip -n $P-a addr add 198.18.0.1/24 dev $P-u
ip -n $P-b addr add 198.18.0.2/24 dev $P-v
ip -n $P-a link set $P-u up
ip -n $P-b link set $P-v up

mesh() { # host args...
    local h=$1; shift
    MESH_RUN_DIR=$DIR/$h/run MESH_DATA_DIR=$DIR/$h/data ip netns exec $P-$h "$MESH" "$@"
}

mesh_up() { # extra launch args...
    mesh a launch --nickname a "$@" >/dev/null
    mesh b launch --nickname b "$@" 198.18.0.1 >/dev/null
    mesh a attach ip:198.19.3.1/24 /run/netns/$P-ca >/dev/null
    mesh b attach ip:198.19.3.2/24 /run/netns/$P-cb >/dev/null
    local i
    for i in $(seq 1 100); do
        ip netns exec $P-ca ping -c1 -W1 -q 198.19.3.2 >/dev/null 2>&1 && break
        sleep 0.1
    done
}

overlay() { # the overlay of a's connection
    mesh a report | jq -r '[.connections[] | select(.state == "established") | .overlay] | join(",")'
}

mesh_down() {
    mesh a stop >/dev/null 2>&1 || true
    mesh b stop >/dev/null 2>&1 || true
    for h in a b; do
        for l in vxmesh meshtap mesh; do ip -n $P-$h link del $l 2>/dev/null || true; done
    done
    for c in ca cb; do ip -n $P-$c link del ethmesh 2>/dev/null || true; done
    rm -rf "$DIR/a" "$DIR/b"
}

iperf() { # prints Gbps, container a -> container b
    ip netns exec $P-cb iperf3 -s -1 -p 5201 >/dev/null 2>&1 &
    SRV=$!
    local i
    for i in $(seq 1 30); do
        ip netns exec $P-cb ss -ltnH "sport = :5201" | grep -q . && break
        sleep 0.1
    done
    ip netns exec $P-ca iperf3 -c 198.19.3.2 -p 5201 -t "$T" --connect-timeout 1000 -J 2>/dev/null \
        | jq -r '.end.sum_received.bits_per_second / 1e9 * 100 | round / 100'
    wait "$SRV" 2>/dev/null || true
    SRV=""
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -a FAST SLEEVE REF
for r in $(seq 1 "$RUNS"); do
    REF+=("$(T=$T PATHS=kernel-vxlan-bridge "$ANCHORS" 2>/dev/null | awk '$1 == "kernel-vxlan-bridge" {print $2; exit}')")
    mesh_up
    o=$(overlay)
    [[ $o == fastdp ]] || echo "# warning: default launch uses '$o', not fastdp" >&2
    FAST+=("$(iperf)")
    mesh_down
    mesh_up --no-fastdp
    SLEEVE+=("$(iperf)")
    mesh_down
    echo "# run $r: kernel-vxlan-bridge ${REF[-1]} Gbps, mesh-fastdp ${FAST[-1]} Gbps, mesh-sleeve ${SLEEVE[-1]} Gbps" >&2
done
# Median of the per-run ratios too: the machine's load drifts between runs,
# less within one.
pair=$(for i in "${!REF[@]}"; do awk -v a="${FAST[$i]}" -v b="${REF[$i]}" 'BEGIN{if (b > 0) printf "%.3f\n", a/b}'; done | median)
ref=$(printf '%s\n' "${REF[@]}" | median)
fast=$(printf '%s\n' "${FAST[@]}" | median)
sleeve=$(printf '%s\n' "${SLEEVE[@]}" | median)
printf '%-20s %9s %8s\n' path tcp1_Gbps ratio
printf '%-20s %9s %8s\n' kernel-vxlan-bridge "$ref" 1.00
printf '%-20s %9s %8s\n' mesh-fastdp "$fast" "$(awk -v a="$fast" -v b="$ref" 'BEGIN{printf "%.2f", a/b}')"
echo "# median of per-run ratios mesh-fastdp / kernel-vxlan-bridge: $pair" >&2
printf '%-20s %9s %8s\n' mesh-sleeve "$sleeve" "$(awk -v a="$sleeve" -v b="$ref" 'BEGIN{printf "%.2f", a/b}')"
