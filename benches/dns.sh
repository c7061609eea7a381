#!/usr/bin/env bash
# DNS benchmark: mesh-dns (dns/examples/dnsbench.rs) against dnsmasq, both
# serving the same 1,000 names c0..c999.mesh.local. on 127.0.0.1, the server
# pinned to CPU 0 and dnsperf to CPU 1. Prints the median q/s of RUNS runs
# of SECS seconds each, the ratio, and latency at a fixed 20k q/s.
#
#   benches/dns.sh            (env: RUNS=3 SECS=10 RATE=20000)
#
# Installs dnsperf and dnsmasq (Debian packages) when missing. Traffic goes
# to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SECS=${SECS:-10}
RATE=${RATE:-20000}
MESH_PORT=${MESH_PORT:-5353}
DNSMASQ_PORT=${DNSMASQ_PORT:-5354}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}

need=()
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
if ((${#need[@]})); then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi

cargo build -q --release -p mesh-dns --example dnsbench
BIN="$CARGO_TARGET_DIR/release/examples/dnsbench"

WORK=$(mktemp -d /tmp/mesh-dns-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" --hosts "$WORK/hosts"
# Queries: 1,000 A, 100 PTR for our addresses, 100 NXDOMAIN in the domain.
{
    for i in $(seq 0 999); do echo "c$i.mesh.local A"; done
    awk 'NR % 10 == 1 { split($1, o, "."); print o[4] "." o[3] "." o[2] "." o[1] ".in-addr.arpa PTR" }' "$WORK/hosts"
    for i in $(seq 0 99); do echo "nope$i.mesh.local A"; done
} >"$WORK/queries"

wait_port() { # port: until a query is answered, at most 10 s
    for _ in $(seq 1 100); do
        if dig +short +time=1 +tries=1 @127.0.0.1 -p "$1" c1.mesh.local >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "server on port $1 did not answer" >&2
    exit 1
}

check() { # port: the answers are right
    local a p n
    a=$(dig +short @127.0.0.1 -p "$1" c7.mesh.local)
    p=$(dig +short @127.0.0.1 -p "$1" -x "$a")
    n=$(dig @127.0.0.1 -p "$1" nope.mesh.local | grep -o 'status: [A-Z]*')
    echo "  check: c7 -> $a, PTR -> $p, nope -> $n"
}

TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

run_perf() { # port pid extra-args...: prints q/s, average latency (ms),
    #          queries lost, and the server's CPU time per answered query (us)
    local port=$1 pid=$2
    shift 2
    local t0 t1
    t0=$(cpu_ticks "$pid")
    taskset -c 1 dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries" -l "$SECS" -c 4 -q 200 "$@" >"$WORK/perf.out" 2>&1 || true
    t1=$(cpu_ticks "$pid")
    local qps lat lost done
    qps=$(awk '/Queries per second/ { printf "%.0f", $4 }' "$WORK/perf.out")
    lat=$(awk '/Average Latency/ { printf "%.3f", $4 * 1000 }' "$WORK/perf.out")
    lost=$(awk '/Queries lost/ { print $3 }' "$WORK/perf.out")
    done=$(awk '/Queries completed/ { print $3 }' "$WORK/perf.out")
    cpu=$(awk -v t=$((t1 - t0)) -v hz="$TICK" -v n="${done:-0}" 'BEGIN { if (n > 0) printf "%.2f", t / hz * 1e6 / n; else print "nan" }')
    echo "${qps:-0} ${lat:-nan} ${lost:-?} ${cpu}"
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo "mesh-dns: dnsbench (current-thread tokio) on 127.0.0.1:$MESH_PORT, CPU 0"
taskset -c 0 "$BIN" --port "$MESH_PORT" --names 1000 &
PIDS+=($!)
MESH_PID=$!
echo "dnsmasq $(dnsmasq --version | head -1 | awk '{ print $3 }') on 127.0.0.1:$DNSMASQ_PORT, CPU 0"
taskset -c 0 dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts \
    --addn-hosts="$WORK/hosts" --local=/mesh.local/ --local-ttl=1 --listen-address=127.0.0.1 \
    --bind-interfaces --port="$DNSMASQ_PORT" --pid-file= --user=root --cache-size=10000 &
PIDS+=($!)
DNSMASQ_PID=$!
for p in "$MESH_PORT" "$DNSMASQ_PORT"; do
    wait_port "$p"
    check "$p"
done

# Runs alternate between the two servers, so that load from elsewhere on a
# shared machine falls on both alike.
mesh_runs=()
dnsmasq_runs=()
mesh_cpu=()
dnsmasq_cpu=()
for i in $(seq 1 "$RUNS"); do
    r=$(run_perf "$MESH_PORT" "$MESH_PID")
    echo "  run $i mesh-dns: $r (q/s, avg latency ms, lost, server CPU us/query)"
    mesh_runs+=("${r%% *}")
    mesh_cpu+=("${r##* }")
    r=$(run_perf "$DNSMASQ_PORT" "$DNSMASQ_PID")
    echo "  run $i dnsmasq:  $r"
    dnsmasq_runs+=("${r%% *}")
    dnsmasq_cpu+=("${r##* }")
done
MESH_QPS=$(printf '%s\n' "${mesh_runs[@]}" | median)
DNSMASQ_QPS=$(printf '%s\n' "${dnsmasq_runs[@]}" | median)
r=$(run_perf "$MESH_PORT" "$MESH_PID" -Q "$RATE")
echo "  mesh-dns at $RATE q/s: $r"
MESH_LAT=$(echo "$r" | awk '{ print $2 }')
r=$(run_perf "$DNSMASQ_PORT" "$DNSMASQ_PID" -Q "$RATE")
echo "  dnsmasq at $RATE q/s:  $r"
DNSMASQ_LAT=$(echo "$r" | awk '{ print $2 }')

echo
printf 'median q/s over %s x %ss: mesh-dns %.0f, dnsmasq %.0f, ratio mesh-dns/dnsmasq %s\n' \
    "$RUNS" "$SECS" "$MESH_QPS" "$DNSMASQ_QPS" \
    "$(awk -v a="$MESH_QPS" -v b="$DNSMASQ_QPS" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
printf 'server CPU per query (median): mesh-dns %s us, dnsmasq %s us (dnsperf, not the server, is usually the limit on q/s here)\n' \
    "$(printf '%s\n' "${mesh_cpu[@]}" | median)" "$(printf '%s\n' "${dnsmasq_cpu[@]}" | median)"
printf 'average latency at %s q/s: mesh-dns %s ms, dnsmasq %s ms\n' "$RATE" "$MESH_LAT" "$DNSMASQ_LAT"
echo "(load average: $(cut -d' ' -f1-3 /proc/loadavg))"
