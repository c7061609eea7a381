#!/usr/bin/env bash
# End-to-end allocation benchmark: `mesh attach` with no address (the ring
# allocates one) into fresh network namespaces, one at a time, timed from
# the CLI. The reference, measured in the same run, is the raw kernel work
# an attach does, done with `ip`: a veth pair created into the namespace,
# an address, links up, the host end on a bridge.
#
#   benches/attach.sh [N]        (as root; default N=100)
#
# Prints p50/p99 of both in milliseconds and the ratio, then the time from
# `mesh run` to its CMD starting, then N attaches started at once (all
# must succeed, each with its own address; the script fails otherwise). Uses only
# namespaces prefixed mbench- and 198.19.0.0/16; cleans up on every exit.
set -euo pipefail
N=${1:-100}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MESH=${MESH_BIN:-$ROOT/target/release/mesh}
[[ $EUID -eq 0 ]] || { echo "benches/attach.sh: run as root" >&2; exit 1; }
if [[ -z ${MESH_BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release --quiet)
fi
P=mbench-$$
DIR=$(mktemp -d /tmp/$P.XXXX)
cleanup() {
    set +e
    if [[ -f $DIR/run/mesh.pid ]]; then kill "$(cat "$DIR/run/mesh.pid")" 2>/dev/null; fi
    for ns in $(ip netns list | awk '{print $1}' | grep "^$P-"); do ip netns del "$ns"; done
    rm -rf "$DIR"
}
trap cleanup EXIT
ip netns add $P-h
ip -n $P-h link set lo up
export MESH_RUN_DIR=$DIR/run MESH_DATA_DIR=$DIR/data MESH_DOCKER_PLUGIN_DIR=$DIR/run/plugins
ip netns exec $P-h "$MESH" launch --ipalloc-range 198.19.0.0/16 >/dev/null
ip netns exec $P-h "$MESH" prime

now_ns() { date +%s%N; }
percentiles() { # stdin: one number per line
    sort -n | awk '{a[NR]=$1} END {p50=a[int((NR+1)/2)]; i=int(NR*0.99+0.999); if(i<1)i=1; if(i>NR)i=NR; printf "%.2f %.2f\n", p50/1e6, a[i]/1e6}'
}

: > "$DIR/mesh.t"
for i in $(seq 1 "$N"); do
    ip netns add $P-c$i
    t0=$(now_ns)
    ip netns exec $P-h "$MESH" attach /run/netns/$P-c$i >/dev/null
    t1=$(now_ns)
    echo $((t1 - t0)) >> "$DIR/mesh.t"
done

ip -n $P-h link add refbr type bridge
ip -n $P-h link set refbr up
: > "$DIR/ref.t"
for i in $(seq 1 "$N"); do
    ip netns add $P-r$i
    t0=$(now_ns)
    ip -n $P-h link add vref$i type veth peer name eth0 netns $P-r$i
    ip -n $P-r$i addr add 198.19.200.$((i % 250 + 1))/16 dev eth0
    ip -n $P-r$i link set eth0 up
    ip -n $P-h link set vref$i master refbr up
    t1=$(now_ns)
    echo $((t1 - t0)) >> "$DIR/ref.t"
done

# mesh run: from the command to CMD starting (CMD prints the time it
# starts), then the whole run (CMD `true`, released on exit).
: > "$DIR/run.t"; : > "$DIR/runall.t"
for i in $(seq 1 "$N"); do
    t0=$(now_ns)
    t1=$(ip netns exec $P-h "$MESH" run -- date +%s%N)
    t2=$(now_ns)
    echo $((t1 - t0)) >> "$DIR/run.t"
    echo $((t2 - t0)) >> "$DIR/runall.t"
done

# N attaches at once (each its own CLI process): all must succeed, each
# with its own address.
for i in $(seq 1 "$N"); do ip netns add $P-p$i; done
t0=$(now_ns)
for i in $(seq 1 "$N"); do
    (ip netns exec $P-h "$MESH" attach /run/netns/$P-p$i >"$DIR/par.$i" 2>&1 || echo "FAILED" >>"$DIR/par.$i") &
done
wait
t1=$(now_ns)
par_failed=$(cat "$DIR"/par.* | grep -c FAILED || true)
par_distinct=$(cat "$DIR"/par.* | grep -v FAILED | sort -u | wc -l)

read -r m50 m99 < <(percentiles < "$DIR/mesh.t")
read -r s50 s99 < <(percentiles < "$DIR/run.t")
read -r a50 a99 < <(percentiles < "$DIR/runall.t")
read -r r50 r99 < <(percentiles < "$DIR/ref.t")
echo "mesh run N=$N: to CMD start p50=${s50}ms p99=${s99}ms; whole run of \`true\` (attach, run, release) p50=${a50}ms p99=${a99}ms"
distinct=$(ip netns exec $P-h "$MESH" ps | awk '{print $3}' | sort -u | wc -l)
echo "attach N=$N: mesh attach p50=${m50}ms p99=${m99}ms; raw ip reference p50=${r50}ms p99=${r99}ms; ratio p50=$(awk -v a="$m50" -v b="$r50" 'BEGIN{printf "%.2f", a/b}') ($distinct distinct addresses)"
echo "attach N=$N at once: $((N - par_failed))/$N attached, $par_distinct distinct addresses, all done in $(( (t1 - t0) / 1000000 ))ms"
[[ $par_failed -eq 0 && $par_distinct -eq $N ]] || { echo "attach.sh: concurrent attaches failed" >&2; cat "$DIR"/par.* | grep -B2 FAILED | head -20 >&2; exit 1; }
