#!/usr/bin/env bash
# Data-path benchmark: container-to-container throughput and latency across
# two namespace hosts joined by one veth (198.18.0.1/24 -- 198.18.0.2/24, the
# underlay of shared/bench/anchors.sh), over
#   mesh-fastdp             a default launch (kernel VXLAN, UDP 6784)
#   mesh-sleeve             --no-fastdp (userspace sleeve, UDP 6783)
#   mesh-sleeve-encrypted   --no-fastdp --password (sealed sleeve)
# and, in the same run, the references of shared/bench/anchors.sh:
#   kernel-vxlan-bridge     kernel VXLAN through bridges (what fastdp mimics)
#   wireguard-go            userspace WireGuard (what the encrypted sleeve is)
#
# Per path: iperf3 TCP, T seconds, one stream and -P 4 (Gbps received);
# ping -c 50 -i 0.01 (avg RTT, µs); and a TCP request/response test
# (examples/rr.rs, what netperf TCP_RR measures: 1-byte request, 1-byte
# answer, one connection, Nagle off; p50 of 2,000 exchanges, µs). For the
# references, throughput and ping come from anchors.sh; the
# request/response figure from the same paths built here the way
# anchors.sh builds them (kernel VXLAN through bridges, and userspace
# WireGuard between the two hosts: wireguard-go, and boringtun, installed
# with `cargo install boringtun-cli` when missing). For the mesh paths also the daemons' peak
# RSS (the larger VmHWM of the two, MB) and their CPU seconds per Gbit moved
# (utime+stime of both daemons around the two iperf3 runs, divided by
# Gbps x seconds); for wireguard-go the same figure from anchors.sh's
# daemon-cores column. Each path is measured RUNS times, references and mesh
# paths interleaved (order alternates between runs); the table shows medians,
# ratios are medians of the per-run ratios (the machine's load drifts between
# runs more than within one).
#
#   benches/datapath.sh          (as root; T=5, RUNS=1)
#   MESH_BIN=/path/to/mesh RUNS=3 T=10 benches/datapath.sh
#   RULES=0 benches/datapath.sh  (the mesh paths with the isolation rules'
#                                chains emptied: what the rules cost)
#
# Installs missing Debian packages (iperf3, jq, wireguard-go, wireguard-tools,
# ...) itself. Namespaces are prefixed mdp<pid>- (anchors.sh uses its own,
# pb*); only 198.18.0.0/15 is used; everything is removed on every exit.
set -euo pipefail
export LC_ALL=C
T=${T:-5}
RUNS=${RUNS:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MESH=${MESH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/mesh}
RR=${RR_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/rr}
export BORINGTUN=${BORINGTUN:-$(command -v boringtun-cli || echo "$HOME/.cargo/bin/boringtun-cli")}
ANCHORS=${ANCHORS:-/work/shared/bench/anchors.sh}
PASSWORD=${PASSWORD:-datapath-bench}

[[ $EUID -eq 0 ]] || { echo "benches/datapath.sh: run as root" >&2; exit 1; }
[[ -x $MESH ]] || { echo "no $MESH: cargo build --release first (or set MESH_BIN)" >&2; exit 1; }
[[ -x $ANCHORS ]] || { echo "no $ANCHORS (set ANCHORS)" >&2; exit 1; }
if [[ ! -x $RR ]]; then
    (cd "$ROOT" && cargo build --release --quiet --example rr) || { echo "cannot build examples/rr" >&2; exit 1; }
fi

log() { echo "# $*" >&2; }

packages=(iproute2 iputils-ping iperf3 jq procps wireguard-tools wireguard-go)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing missing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y -o DPkg::Lock::Timeout=120 --no-install-recommends "${missing[@]}" >&2
fi

P=mdp$$
DIR=$(mktemp -d /tmp/$P.XXXX)
NSS="$P-a $P-b $P-ca $P-cb"
if [[ ! -x $BORINGTUN ]]; then
    log "installing boringtun-cli (cargo install), the userspace WireGuard reference"
    cargo install --quiet boringtun-cli >&2 || log "warning: no boringtun-cli: its rows are skipped"
    BORINGTUN=$(command -v boringtun-cli || echo "$HOME/.cargo/bin/boringtun-cli")
fi
SRV=""
RRSRV=""
WGPIDS=""
HZ=$(getconf CLK_TCK)

kill_if() { # pid pattern: kill pid only if its command line matches
    local pid=$1 pat=$2
    [[ -r /proc/$pid/cmdline ]] || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$pat" || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do [[ -d /proc/$pid ]] || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

cleanup() {
    set +e
    [[ -n $SRV ]] && kill_if "$SRV" "iperf3 -s"
    [[ -n $RRSRV ]] && kill_if "$RRSRV" "rr server"
    for p in $WGPIDS; do kill_if "$p" "wgr"; done
    for h in a b; do
        [[ -f $DIR/$h/run/mesh.pid ]] && kill_if "$(cat "$DIR/$h/run/mesh.pid")" "$MESH"
    done
    for ns in $NSS; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for ns in $NSS; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add $P-u netns $P-a type veth peer name $P-v netns $P-b
ip -n $P-a addr add 198.18.0.1/24 dev $P-u
ip -n $P-b addr add 198.18.0.2/24 dev $P-v
ip -n $P-a link set $P-u up
ip -n $P-b link set $P-v up

mesh() { # host args...
    local h=$1
    shift
    MESH_RUN_DIR=$DIR/$h/run MESH_DATA_DIR=$DIR/$h/data MESH_DOCKER_PLUGIN_DIR=$DIR/$h/run/plugins ip netns exec "$P-$h" "$MESH" "$@"
}

daemon_pids() { cat "$DIR/a/run/mesh.pid" "$DIR/b/run/mesh.pid" 2>/dev/null; }

ticks() { # utime+stime of the daemons (all threads)
    local s=0 p v
    for p in $(daemon_pids); do
        v=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
        s=$((s + v))
    done
    echo "$s"
}

hwm_mb() { # the larger VmHWM of the two daemons, MB
    local p m=0 v
    for p in $(daemon_pids); do
        v=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        ((v > m)) && m=$v
    done
    awk -v k="$m" 'BEGIN {printf "%.1f", k / 1024}'
}

wait_ping() { # ns ip: bounded 20 s
    for _ in $(seq 1 40); do
        ip netns exec "$1" ping -c1 -W1 -q "$2" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

mesh_up() { # extra launch args...
    mkdir -p "$DIR"/{a,b}/{run,data}
    mesh a launch --nickname a "$@" >/dev/null
    mesh b launch --nickname b "$@" 198.18.0.1 >/dev/null
    mesh a attach ip:198.19.3.1/24 /run/netns/$P-ca >/dev/null
    mesh b attach ip:198.19.3.2/24 /run/netns/$P-cb >/dev/null
    wait_ping $P-ca 198.19.3.2 || log "warning: containers do not ping after launch $*"
}

overlay() { # the overlay of a's established connection(s)
    mesh a report | jq -r '[.connections[] | select(.state == "established") | .overlay] | join(",")'
}

wait_programmed() { # fastdp: a's vxmesh knows cb's MAC (bounded 15 s)
    local mac
    mac=$(ip -n $P-cb -o link show dev ethmesh | awk '{for (i = 1; i < NF; i++) if ($i == "link/ether") print $(i + 1)}')
    for _ in $(seq 1 75); do
        bridge -n $P-a fdb show dev vxmesh 2>/dev/null | grep -q "^$mac .*dst" && return 0
        sleep 0.2
    done
    log "warning: fastdp did not program $mac within 15 s"
}

mesh_down() {
    mesh a stop >/dev/null 2>&1 || true
    mesh b stop >/dev/null 2>&1 || true
    local h l c p
    for p in $(daemon_pids); do kill_if "$p" "$MESH"; done
    for h in a b; do
        for l in vxmesh meshtap mesh; do ip -n $P-$h link del $l 2>/dev/null || true; done
    done
    for c in ca cb; do ip -n $P-$c link del ethmesh 2>/dev/null || true; done
    rm -rf "$DIR/a" "$DIR/b"
}

iperf_gbps() { # extra iperf3 args: Gbps received, container a -> container b
    ip netns exec $P-ca timeout $((T + 10)) iperf3 -c 198.19.3.2 -p 5201 -t "$T" \
        --connect-timeout 1000 -J "$@" 2>/dev/null |
        jq -r '(.end.sum_received.bits_per_second // 0) / 1e9
               | if . == 0 then "FAIL" else (. * 100 | round / 100 | tostring) end' 2>/dev/null ||
        echo FAIL
}

rr_p50() { # server-ns client-ns ip: p50 of 2,000 TCP request/response exchanges, µs
    local out
    ip netns exec "$1" "$RR" server "$3:7001" >/dev/null 2>&1 &
    RRSRV=$!
    for _ in $(seq 1 30); do
        ip netns exec "$1" ss -ltnH "sport = :7001" | grep -q . && break
        sleep 0.1
    done
    out=$(ip netns exec "$2" timeout 30 "$RR" client "$3:7001" 2000 2>/dev/null || true)
    kill_if "$RRSRV" "rr server"
    RRSRV=""
    sed -n 's/.*p50=\([0-9]*\).*/\1/p' <<<"$out" | grep . || echo FAIL
}

# The references' request/response paths, built as anchors.sh builds them,
# in this script's namespaces (no mesh running): prints "name p50" lines.
rr_refs() {
    local h c lip rip vxmac mymac peermac ip peerip
    for h in a b; do
        if [[ $h == a ]]; then lip=198.18.0.1 rip=198.18.0.2 vxmac=02:00:c6:13:00:11
            mymac=02:00:c6:13:01:01 peermac=02:00:c6:13:01:02 ip=198.19.4.1 peerip=198.19.4.2
        else lip=198.18.0.2 rip=198.18.0.1 vxmac=02:00:c6:13:00:12
            mymac=02:00:c6:13:01:02 peermac=02:00:c6:13:01:01 ip=198.19.4.2 peerip=198.19.4.1; fi
        c=$P-c$h
        ip -n $P-$h link add rvx address $vxmac type vxlan id 42 dstport 4789 local $lip dev $P-$([[ $h == a ]] && echo u || echo v) nolearning
        ip -n $P-$h link set rvx mtu 1450
        bridge -n $P-$h fdb append 00:00:00:00:00:00 dev rvx dst $rip self permanent
        ip -n $P-$h link add rbr type bridge
        ip -n $P-$h link add rch type veth peer name rcc netns $c
        ip -n $P-$h link set rch mtu 1450
        ip -n $P-$h link set rvx master rbr
        ip -n $P-$h link set rch master rbr
        for l in rvx rch rbr; do ip -n $P-$h link set $l up; done
        bridge -n $P-$h fdb add $peermac dev rvx dst $rip self permanent
        bridge -n $P-$h fdb add $peermac dev rvx master static
        ip -n $c link set rcc address $mymac mtu 1450 up
        ip -n $c addr add $ip/24 dev rcc
        ip -n $c neigh replace $peerip lladdr $peermac dev rcc nud permanent
    done
    echo "kernel-vxlan-bridge $(rr_p50 $P-cb $P-ca 198.19.4.2)"
    for h in a b; do ip -n $P-$h link del rvx; ip -n $P-$h link del rbr; ip -n $P-$h link del rch 2>/dev/null || true; done
    local impl dev k
    for impl in wireguard-go boringtun; do
        if [[ $impl == boringtun && ! -x $BORINGTUN ]]; then echo "boringtun SKIP"; continue; fi
        umask 077
        for k in a b; do
            wg genkey >"$DIR/$k.key"
            wg pubkey <"$DIR/$k.key" >"$DIR/$k.pub"
            dev=wgr$k
            if [[ $impl == wireguard-go ]]; then
                ip netns exec $P-$k env WG_PROCESS_FOREGROUND=1 wireguard-go -f $dev >"$DIR/$dev.log" 2>&1 &
            else
                ip netns exec $P-$k env WG_SUDO=1 "$BORINGTUN" -f --disable-drop-privileges -l "$DIR/$dev.log" $dev >/dev/null 2>&1 &
            fi
            WGPIDS="$WGPIDS $!"
        done
        for _ in $(seq 1 50); do
            [[ -S /var/run/wireguard/wgra.sock && -S /var/run/wireguard/wgrb.sock ]] && break
            sleep 0.1
        done
        ip netns exec $P-a wg set wgra private-key "$DIR/a.key" listen-port 51820 \
            peer "$(cat "$DIR/b.pub")" endpoint 198.18.0.2:51820 allowed-ips 198.19.5.2/32
        ip netns exec $P-b wg set wgrb private-key "$DIR/b.key" listen-port 51820 \
            peer "$(cat "$DIR/a.pub")" endpoint 198.18.0.1:51820 allowed-ips 198.19.5.1/32
        ip -n $P-a addr add 198.19.5.1/24 dev wgra
        ip -n $P-b addr add 198.19.5.2/24 dev wgrb
        ip -n $P-a link set wgra mtu 1420 up
        ip -n $P-b link set wgrb mtu 1420 up
        ip netns exec $P-a ping -c 3 -i 0.2 -W 1 -w 4 -q 198.19.5.2 >/dev/null 2>&1 || log "$impl: warm-up ping failed"
        echo "$impl $(rr_p50 $P-b $P-a 198.19.5.2)"
        for p in $WGPIDS; do kill_if "$p" "wgr"; done
        WGPIDS=""
        ip -n $P-a link del wgra 2>/dev/null || true
        ip -n $P-b link del wgrb 2>/dev/null || true
        rm -f /var/run/wireguard/wgra.sock /var/run/wireguard/wgrb.sock
    done
}

# measure_mesh NAME want_overlay launch-args...: appends a row to $ROWS
measure_mesh() {
    local name=$1 want=$2 got rtt rr t0 t1 tcp1 tcp4 rss cpu
    shift 2
    mesh_up "$@"
    got=$(overlay)
    [[ $got == "$want" ]] || log "warning: $name uses overlay '$got', not $want"
    if [[ ${RULES:-1} == 0 ]]; then
        # What the isolation rules cost: their chains emptied (the table
        # stays, so the daemons do not make it again).
        for h in a b; do ip netns exec $P-$h nft flush table bridge mesh; done
    fi
    [[ $want == fastdp ]] && wait_programmed
    ip netns exec $P-cb iperf3 -s -p 5201 >/dev/null 2>&1 &
    SRV=$!
    for _ in $(seq 1 30); do
        ip netns exec $P-cb ss -ltnH "sport = :5201" | grep -q . && break
        sleep 0.1
    done
    ip netns exec $P-ca ping -c 3 -i 0.2 -W 1 -w 4 -q 198.19.3.2 >/dev/null 2>&1 || log "$name: warm-up ping failed"
    rtt=$(ip netns exec $P-ca ping -c 50 -i 0.01 -W 1 -w 5 -q 198.19.3.2 2>/dev/null |
        awk -F'/' '/^rtt|^round-trip/ {printf "%.0f", $5 * 1000}')
    rr=$(rr_p50 $P-cb $P-ca 198.19.3.2)
    t0=$(ticks)
    tcp1=$(iperf_gbps)
    tcp4=$(iperf_gbps -P 4)
    t1=$(ticks)
    rss=$(hwm_mb)
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$HZ" -v a="$tcp1" -v b="$tcp4" -v t="$T" \
        'BEGIN {g = (a + 0 + b) * t; if (g > 0) printf "%.2f", d / hz / g; else print "-"}')
    kill_if "$SRV" "iperf3 -s"
    SRV=""
    mesh_down
    echo "$r $name ${tcp1:-FAIL} ${tcp4:-FAIL} ${rtt:-FAIL} $rss $cpu ${rr:-FAIL}" >>"$ROWS"
    log "run $r: $name tcp1 ${tcp1:-FAIL} tcp4 ${tcp4:-FAIL} Gbps, rtt ${rtt:-FAIL} us, rr ${rr:-FAIL} us, rss $rss MB, cpu $cpu s/Gbit"
}

measure_refs() { # appends kernel-vxlan-bridge, wireguard-go and boringtun rows to $ROWS
    local out p rrs
    out=$(T=$T BORINGTUN=$BORINGTUN PATHS="kernel-vxlan-bridge wireguard-go boringtun" "$ANCHORS" 2>"$DIR/anchors.err") ||
        log "anchors.sh exited $?"
    rr_refs >"$DIR/rr_refs"
    rrs=$(cat "$DIR/rr_refs")
    # Its log lines (already "# ..."), and anything else it said.
    sed 's/^\([^#]\)/# anchors.sh: \1/' "$DIR/anchors.err" >&2
    for p in kernel-vxlan-bridge wireguard-go boringtun; do
        # First line for p: the main table (path tcp1 tcp4 rtt); second: the
        # detail table (path mtu ipf% sys dmn | ipf% sys dmn | udp).
        awk -v p="$p" -v r="$r" -v rr="$(awk -v p="$p" '$1 == p {print $2}' <<<"$rrs")" '
            $1 == p && n == 1 {d1 = $5; d4 = $9; n = 2}
            $1 == p && n == 0 {tcp1 = $2; tcp4 = $3; rtt = $4; n = 1}
            END {
                if (rr == "") rr = "FAIL"
                if (!n) {print r, p, "FAIL FAIL FAIL - -", rr; exit}
                cpu = "-"
                if (p != "kernel-vxlan-bridge" && tcp1 + 0 > 0 && d1 != "-")
                    cpu = sprintf("%.2f", (d1 + d4) / (tcp1 + tcp4))
                print r, p, tcp1, tcp4, rtt, "-", cpu, rr
            }' <<<"$out" >>"$ROWS"
        log "run $r: $(tail -n 1 "$ROWS" | cut -d" " -f2-)"
    done
}

ROWS=$DIR/rows
: >"$ROWS"
log "mesh $("$MESH" --version 2>/dev/null || echo "$MESH"), kernel $(uname -r), $(nproc) CPUs, T=${T}s, RUNS=$RUNS"
for r in $(seq 1 "$RUNS"); do
    if ((r % 2)); then measure_refs; fi
    measure_mesh mesh-fastdp fastdp
    measure_mesh mesh-sleeve sleeve --no-fastdp
    measure_mesh mesh-sleeve-encrypted sleeve --no-fastdp --password "$PASSWORD"
    if ! ((r % 2)); then measure_refs; fi
done

# The table: medians over runs; ratios are medians of per-run ratios.
awk -v runs="$RUNS" '
function median(s,    a, n, i, j, t) {
    n = split(s, a, " ")
    if (n == 0) return "-"
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function num(x) { return x ~ /^[0-9.]+$/ }
function add(k, v) { if (num(v)) vals[k] = vals[k] " " v; else if (v == "FAIL") failed[k] = 1 }
function cell(p, c, f,    m) {
    m = median(vals[p, c])
    if (m == "-") return ((p, c) in failed) ? "FAIL" : "-"
    return sprintf(f, m)
}
{
    run = $1; p = $2
    if (!(p in seen)) { seen[p] = 1; order[++np] = p }
    tcp1[run, p] = $3; rtt[run, p] = $5
    add(p SUBSEP "tcp1", $3); add(p SUBSEP "tcp4", $4); add(p SUBSEP "rtt", $5)
    add(p SUBSEP "rss", $6); add(p SUBSEP "cpu", $7); add(p SUBSEP "rrt", $8); rrt[run, p] = $8
}
END {
    for (r = 1; r <= runs; r++)
        for (i = 1; i <= np; i++) {
            p = order[i]; k = tcp1[r, "kernel-vxlan-bridge"]; w = tcp1[r, "wireguard-go"]
            if (num(tcp1[r, p]) && num(k) && k > 0) add(p SUBSEP "rk", tcp1[r, p] / k)
            if (num(rtt[r, p]) && num(rtt[r, "kernel-vxlan-bridge"]) && rtt[r, "kernel-vxlan-bridge"] > 0)
                add(p SUBSEP "rr", rtt[r, p] / rtt[r, "kernel-vxlan-bridge"])
            if (p ~ /encrypted|wireguard/ && num(tcp1[r, p]) && num(w) && w > 0) add(p SUBSEP "rw", tcp1[r, p] / w)
            k = rrt[r, "kernel-vxlan-bridge"]; b = rtt[r, "boringtun"]; bb = rrt[r, "boringtun"]
            if (num(rrt[r, p]) && num(k) && k > 0) add(p SUBSEP "qk", rrt[r, p] / k)
            if (num(rtt[r, p]) && num(b) && b > 0) add(p SUBSEP "rb", rtt[r, p] / b)
            if (num(rrt[r, p]) && num(bb) && bb > 0) add(p SUBSEP "qb", rrt[r, p] / bb)
        }
    printf "%-22s %9s %9s %7s %6s %9s %8s %7s %8s %7s %8s %7s %10s\n", "path", "tcp1_Gbps", "tcp4_Gbps", "rtt_us", "rr_us",
        "tcp1/kvx", "rtt/kvx", "rr/kvx", "rtt/bt", "rr/bt", "tcp1/wg", "rss_MB", "cpu_s/Gbit"
    for (i = 1; i <= np; i++) {
        p = order[i]
        printf "%-22s %9s %9s %7s %6s %9s %8s %7s %8s %7s %8s %7s %10s\n", p,
            cell(p, "tcp1", "%.2f"), cell(p, "tcp4", "%.2f"), cell(p, "rtt", "%.0f"), cell(p, "rrt", "%.0f"),
            cell(p, "rk", "%.3f"), cell(p, "rr", "%.2f"), cell(p, "qk", "%.2f"), cell(p, "rb", "%.2f"),
            cell(p, "qb", "%.2f"), cell(p, "rw", "%.2f"), cell(p, "rss", "%.1f"), cell(p, "cpu", "%.2f")
    }
}' "$ROWS"
