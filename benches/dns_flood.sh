#!/usr/bin/env bash
# Does a flood of DNS queries slow the frame path? Two namespace hosts, one
# container each; iperf3 (one TCP stream, 10 s) container to container over
# the sleeve, first alone, then while dnsperf floods the DNS server inside
# the receiving container (as fast as it answers) from that container.
# Prints both throughputs, their ratio, and the queries answered.
#
#   benches/dns_flood.sh        (as root)
#
# Namespaces are prefixed mflood-; addresses in 198.18.0.0/15 only; cleaned
# up on every exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MESH=${MESH_BIN:-$ROOT/target/release/mesh}
[[ $EUID -eq 0 ]] || { echo "benches/dns_flood.sh: run as root" >&2; exit 1; }
for t in iperf3 dnsperf; do command -v $t >/dev/null || { apt-get update -q >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -q $t >/dev/null; }; done
[[ -n ${MESH_BIN:-} ]] || (cd "$ROOT" && cargo build --release --quiet)
P=mflood-$$
DIR=$(mktemp -d /tmp/$P.XXXX)
cleanup() {
    set +e
    for h in h1 h2; do
        [[ -f $DIR/$h/mesh.pid ]] && kill "$(cat "$DIR/$h/mesh.pid")" 2>/dev/null
    done
    pkill -f "iperf3 -s -1 -B 198.19.9.2" 2>/dev/null
    sleep 0.5
    for ns in $(ip netns list | awk '{print $1}' | grep "^$P-"); do ip netns del "$ns"; done
    rm -rf "$DIR"
}
trap cleanup EXIT
ip netns add $P-sw; ip -n $P-sw link add br0 type bridge; ip -n $P-sw link set br0 up
for i in 1 2; do
    ip netns add $P-h$i
    ip -n $P-sw link add h$i type veth peer name eth0 netns $P-h$i
    ip -n $P-sw link set h$i master br0 up
    ip -n $P-h$i addr add 198.18.0.$i/24 dev eth0
    ip -n $P-h$i link set eth0 up; ip -n $P-h$i link set lo up
    mkdir -p "$DIR/h$i"; ip netns add $P-c$i
done
m() { local i=$1; shift; MESH_RUN_DIR=$DIR/h$i MESH_DATA_DIR=$DIR/h$i MESH_DOCKER_PLUGIN_DIR=$DIR/h$i/plugins ip netns exec $P-h$i "$MESH" "$@"; }
m 1 launch --no-fastdp >/dev/null 2>&1 || m 1 launch >/dev/null
m 2 launch --no-fastdp 198.18.0.1 >/dev/null 2>&1 || m 2 launch 198.18.0.1 >/dev/null
m 1 attach ip:198.19.9.1/24 --name c1 /run/netns/$P-c1 >/dev/null
m 2 attach ip:198.19.9.2/24 --name c2 /run/netns/$P-c2 >/dev/null
for _ in $(seq 1 100); do ip netns exec $P-c1 ping -c1 -W1 -q 198.19.9.2 >/dev/null 2>&1 && break; done
for i in $(seq 1 2000); do echo "c$((i % 2 + 1)).mesh.local A"; done > "$DIR/q"
gbps() { ip netns exec $P-c2 iperf3 -s -1 -B 198.19.9.2 >/dev/null 2>&1 & sleep 0.5
    ip netns exec $P-c1 iperf3 -c 198.19.9.2 -t 10 -J | awk -F'[:,]' '/"sum_received"/{f=1} f&&/"bits_per_second"/{printf "%.2f", $2/1e9; exit}'; }
alone=$(gbps)
ip netns exec $P-c2 dnsperf -s 127.0.0.11 -d "$DIR/q" -l 12 -c 4 -q 200 > "$DIR/perf" 2>&1 &
sleep 1
flooded=$(gbps)
wait
qps=$(awk '/Queries per second/{print $4}' "$DIR/perf")
echo "sleeve iperf3 alone ${alone} Gbps; during a DNS flood in the receiving container ${flooded} Gbps (ratio $(awk -v a="$flooded" -v b="$alone" 'BEGIN{printf "%.2f", a/b}')); the flood got ${qps} q/s answered"
