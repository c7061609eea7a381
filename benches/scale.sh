#!/usr/bin/env bash
# Scale: N real daemons on this machine, each in a namespace host, and what
# they cost at rest (issue 20).
#
#   benches/scale.sh [N...]          (as root; default: 30 60 100)
#
# For every N (and every mode, see MODES) it makes N hosts h1..hN on one
# underlay switch (198.18.0.0/16, hN at 198.18.<N/250>.<N%250+1>), launches
# h1, then h2..hN all at once, each naming only h1 (they learn the rest by
# gossip), and measures:
#
#   converged_s  from the first launch until every daemon knows all N peers
#                and has a route to each (`mesh report`);
#   conns        established connections per daemon (mean);
#   rss_mb       the largest VmRSS of any daemon, at rest;
#   rest_cpu     the CPU of all daemons together, in % of one core, over
#                REST seconds at rest (utime+stime from /proc, with what
#                their waited-for children used: an `nft` they ran counts);
#   rest_bps     bytes per second per peer on the underlay at rest: what
#                all hosts sent (their switch ports' rx counters, so each
#                byte is counted once) / N / REST.
#
# "At rest": after convergence one container per host is attached (`mesh
# attach --name cK`), a sample of cross-host pings and DNS lookups is made,
# no duplicate address is checked, then SETTLE seconds (default 30) pass
# before the REST window: a new container's own IPv6 chatter (router
# solicitations at 0, 4 and 8 s, MLD reports) is broadcast, over the mesh,
# to every host, and is not the mesh's cost at rest. Nothing is attached,
# sent or looked up during the window.
#
# MODES: "full" (the default --conn-limit, a full mesh) and "limit:L"
# (--conn-limit L, so most pairs talk through relays). Default: "full limit:6".
#
# Prints one line per N and mode:
#   scale n=N mode=M converged_s=.. conns=.. rss_mb=.. rest_cpu_pct=.. rest_bps_per_peer=.. pings=ok/all lookups=ok/all dup=0
# and writes them (as a table) and a PNG plot against N to OUT (default
# target/scale/: scale.dat, scale.png; the plot needs gnuplot, installed
# with apt-get if missing).
#
# Everything it makes is named mscale-<pid>-... (namespaces) or lives in one
# temp dir; it is removed on every exit path. Only 198.18.0.0/15.
# MESH_BIN=/path/to/mesh runs that binary instead of building one.
# PERF=FILE records every CPU with `perf record -g` during each REST window
# into FILE.n<N>.<mode> (where the idle CPU goes: `perf report -i ...
# --comm mesh`).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MESH=${MESH_BIN:-$ROOT/target/release/mesh}
SIZES=("$@")
[[ ${#SIZES[@]} -gt 0 ]] || SIZES=(30 60 100)
read -r -a MODES <<<"${MODES:-full limit:6}"
REST=${REST:-30}
SETTLE=${SETTLE:-30}
OUT=${OUT:-$ROOT/target/scale}
PINGS=${PINGS:-10}
RANGE=198.19.0.0/16
[[ $EUID -eq 0 ]] || { echo "benches/scale.sh: run as root" >&2; exit 1; }
for n in "${SIZES[@]}"; do
    [[ $n =~ ^[0-9]+$ && $n -ge 2 && $n -le 1000 ]] || { echo "usage: benches/scale.sh [N...]  (2 <= N <= 1000)" >&2; exit 2; }
done
for m in "${MODES[@]}"; do
    [[ $m == full || $m =~ ^limit:[0-9]+$ ]] || { echo "benches/scale.sh: MODES: full or limit:L, not $m" >&2; exit 2; }
done
if [[ -z ${MESH_BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release --quiet --bin mesh)
fi
need() { command -v "$1" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }
need jq jq
need dig dnsutils
need gnuplot gnuplot-nox

P=mscale-$$
DIR=""
HOSTS=0
HZ=$(getconf CLK_TCK)
mkdir -p "$OUT"

hns() { echo "$P-h$1"; }
cns() { echo "$P-c$1"; }
sw() { echo "$P-sw"; }
uaddr() { echo "198.18.$(($1 / 250)).$(($1 % 250 + 1))"; }
in_host() { # N CMD...: CMD in host N's namespace with its mesh dirs
    local n=$1
    shift
    ip netns exec "$(hns "$n")" env MESH_RUN_DIR="$DIR/h$n/run" MESH_DATA_DIR="$DIR/h$n/data" \
        MESH_DOCKER_PLUGIN_DIR="$DIR/h$n/run/plugins" "$@"
}
mesh() { local n=$1; shift; in_host "$n" timeout 60 "$MESH" "$@" </dev/null; }
pid_of() { cat "$DIR/h$1/run/mesh.pid" 2>/dev/null || true; }

# The kernel's neighbour (ARP) table is one for all namespaces: N hosts
# that each talk to N-1 others need N*(N-1) entries, past the default
# gc_thresh3 of 1024 at N=33 ("neighbour table overflow", and sends fail
# with ENOBUFS). Raised for the run, put back on exit. (A real host has
# one daemon and as many entries as peers.)
NEIGH=/proc/sys/net/ipv4/neigh/default
SAVED_NEIGH=$(cat $NEIGH/gc_thresh1 $NEIGH/gc_thresh2 $NEIGH/gc_thresh3)
raise_neigh() {
    echo 8192 >$NEIGH/gc_thresh1
    echo 16384 >$NEIGH/gc_thresh2
    echo 32768 >$NEIGH/gc_thresh3
}
restore_neigh() {
    local a
    read -r -a a <<<"$(echo $SAVED_NEIGH)"
    echo "${a[0]}" >$NEIGH/gc_thresh1
    echo "${a[1]}" >$NEIGH/gc_thresh2
    echo "${a[2]}" >$NEIGH/gc_thresh3
}

teardown() {
    set +e
    local n pid
    [[ -n $DIR ]] || return 0
    for ((n = 1; n <= HOSTS; n++)); do
        pid=$(pid_of "$n")
        [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null
    done
    for ((n = 1; n <= HOSTS; n++)); do
        pid=$(pid_of "$n")
        [[ -n $pid ]] || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
    done
    for ((n = 1; n <= HOSTS; n++)); do
        ip netns del "$(cns "$n")" 2>/dev/null
        ip netns del "$(hns "$n")" 2>/dev/null
    done
    ip netns del "$(sw)" 2>/dev/null
    rm -rf "$DIR"
    DIR=""
    HOSTS=0
    set -e
}
trap 'teardown; restore_neigh' EXIT
trap 'exit 130' INT TERM

setup() { # N
    local n
    DIR=$(mktemp -d "/tmp/$P.XXXX")
    ip netns add "$(sw)"
    ip -n "$(sw)" link set lo up
    ip -n "$(sw)" link add br0 type bridge
    ip -n "$(sw)" link set br0 up
    for ((n = 1; n <= $1; n++)); do
        HOSTS=$n
        mkdir -p "$DIR/h$n/run" "$DIR/h$n/data"
        ip netns add "$(hns "$n")"
        ip -n "$(hns "$n")" link set lo up
        # The underlay is IPv4: no IPv6 router solicitations or MLD
        # reports of the hosts themselves in the byte counts.
        ip netns exec "$(hns "$n")" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
        ip -n "$(sw)" link add "p$n" type veth peer name eth0 netns "$(hns "$n")"
        ip -n "$(sw)" link set "p$n" master br0 up
        ip -n "$(hns "$n")" addr add "$(uaddr "$n")/16" dev eth0
        ip -n "$(hns "$n")" link set eth0 up
        ip netns add "$(cns "$n")"
        ip -n "$(cns "$n")" link set lo up
    done
}

# Seconds (with fraction) since the epoch.
now() { date +%s.%N; }

# Whether host N knows all TOTAL peers and reaches each.
converged() { # N TOTAL
    local r
    r=$(mesh "$1" report 2>/dev/null) || return 1
    [[ $(jq '[.peers[] | select(.reachable)] | length' <<<"$r") -eq $2 ]]
}

# Sum of utime+stime+cutime+cstime (ticks) of every daemon.
cpu_ticks() {
    local n pid sum=0 f
    for ((n = 1; n <= HOSTS; n++)); do
        pid=$(pid_of "$n")
        read -r -a f <"/proc/$pid/stat"
        # Fields 14-17 (utime, stime, cutime, cstime); the comm field has
        # no spaces here.
        sum=$((sum + f[13] + f[14] + f[15] + f[16]))
    done
    echo "$sum"
}

# Bytes all hosts sent on the underlay (rx of the switch's ports).
underlay_bytes() {
    ip -n "$(sw)" -s -j link show master br0 | jq '[.[].stats64.rx.bytes] | add'
}

max_rss_mb() {
    local n pid kb max=0
    for ((n = 1; n <= HOSTS; n++)); do
        pid=$(pid_of "$n")
        kb=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
        ((kb > max)) && max=$kb
    done
    awk -v k="$max" 'BEGIN { printf "%.1f", k / 1024 }'
}

run_one() { # N MODE
    local total=$1 mode=$2 n t0 t1 pending left ok_p=0 ok_l=0 i j ip want got dup extra=()
    [[ $mode == limit:* ]] && extra=(--conn-limit "${mode#limit:}")
    setup "$total"
    t0=$(now)
    mesh 1 launch --nickname h1 --ipalloc-range "$RANGE" "${extra[@]}" >/dev/null
    # The others all at once (hosts booting together), each naming h1.
    local -a jobs=()
    for ((n = 2; n <= total; n++)); do
        mesh "$n" launch --nickname "h$n" --ipalloc-range "$RANGE" "${extra[@]}" "$(uaddr 1)" >/dev/null &
        jobs+=($!)
    done
    for j in "${jobs[@]}"; do
        wait "$j" || { echo "benches/scale.sh: n=$total $mode: a launch failed" >&2; return 1; }
    done
    # Converged: every daemon, polled until it is (each is checked until it
    # first is; a later loss would show in the pings).
    pending=$(seq 1 "$total")
    local deadline=$((SECONDS + 600))
    while [[ -n $pending ]]; do
        ((SECONDS < deadline)) || { echo "benches/scale.sh: n=$total $mode: not converged after 600 s: hosts $(echo $pending)" >&2; return 1; }
        left=""
        for n in $pending; do converged "$n" "$total" || left="$left $n"; done
        pending=$left
        [[ -z $pending ]] || sleep 0.5
    done
    t1=$(now)
    local conv
    conv=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    local conns
    conns=$(for ((n = 1; n <= total; n++)); do mesh "$n" report | jq '[.connections[] | select(.state == "established")] | length'; done |
        awk '{ s += $1 } END { printf "%.1f", s / NR }')
    # One container per host.
    local -a IPS
    for ((n = 1; n <= total; n++)); do
        ip=$(mesh "$n" attach --name "c$n" "/run/netns/$(cns "$n")" | head -n1)
        IPS[n]=${ip%/*}
    done
    dup=$(printf '%s\n' "${IPS[@]:1}" | sort | uniq -d | wc -l)
    # A sample of cross-host pings and lookups: container i to container j.
    for ((k = 0; k < PINGS; k++)); do
        i=$((RANDOM % total + 1))
        j=$(((i + 1 + RANDOM % (total - 1) - 1) % total + 1))
        if ip netns exec "$(cns "$i")" ping -n -q -c1 -W5 "${IPS[j]}" >/dev/null 2>&1 ||
            ip netns exec "$(cns "$i")" ping -n -q -c3 -W5 "${IPS[j]}" >/dev/null 2>&1; then
            ok_p=$((ok_p + 1))
        fi
        want=${IPS[j]}
        got=""
        for _ in $(seq 20); do
            got=$(ip netns exec "$(cns "$i")" dig +short +time=1 +tries=1 "c$j.mesh.local" @127.0.0.11 2>/dev/null || true)
            [[ $got == "$want" ]] && break
            sleep 0.5
        done
        [[ $got == "$want" ]] && ok_l=$((ok_l + 1))
    done
    # At rest.
    sleep "$SETTLE"
    local c0 b0 c1 b1 w0 w1
    w0=$(now); c0=$(cpu_ticks); b0=$(underlay_bytes)
    if [[ -n ${PERF:-} ]]; then
        perf record -a -g -F 199 -o "$PERF.n$total.${mode/:/}" -- sleep "$REST" >/dev/null 2>&1
    else
        sleep "$REST"
    fi
    w1=$(now); c1=$(cpu_ticks); b1=$(underlay_bytes)
    local cpu bps rss
    cpu=$(awk -v d=$((c1 - c0)) -v hz="$HZ" -v a="$w0" -v b="$w1" 'BEGIN { printf "%.1f", 100 * d / hz / (b - a) }')
    bps=$(awk -v d=$((b1 - b0)) -v n="$total" -v a="$w0" -v b="$w1" 'BEGIN { printf "%.0f", d / n / (b - a) }')
    rss=$(max_rss_mb)
    local line="n=$total mode=$mode converged_s=$conv conns=$conns rss_mb=$rss rest_cpu_pct=$cpu rest_bps_per_peer=$bps pings=$ok_p/$PINGS lookups=$ok_l/$PINGS dup=$dup"
    echo "scale $line"
    echo "$total $mode $conv $rss $cpu $bps $conns" >>"$OUT/scale.dat"
    teardown
}

raise_neigh
: >"$OUT/scale.dat"
for m in "${MODES[@]}"; do
    for n in "${SIZES[@]}"; do
        run_one "$n" "$m"
    done
done

# The plot: one panel per figure, one line per mode.
plot() {
    local cmds="" col title i=0 m
    {
        echo "set terminal png size 1200,900"
        echo "set output '$OUT/scale.png'"
        echo "set multiplot layout 2,2 title 'mesh: N real daemons on one 2-core machine (benches/scale.sh)'"
        echo "set xlabel 'daemons (N)'"
        echo "set key top left"
        for col in "3:converged (s)" "4:max RSS per daemon (MB)" "5:CPU at rest, all daemons (% of one core)" "6:underlay bytes/s per peer at rest"; do
            title=${col#*:}
            echo "set title '$title'"
            cmds=""
            for m in "${MODES[@]}"; do
                cmds+="${cmds:+, }'$OUT/scale.dat' using 1:(strcol(2) eq '$m' ? \$${col%%:*} : 1/0) with linespoints title '$m'"
            done
            echo "plot $cmds"
        done
        echo "unset multiplot"
    } | gnuplot
    i=$i
}
plot
echo "scale: wrote $OUT/scale.dat and $OUT/scale.png"
