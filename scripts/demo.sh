#!/usr/bin/env bash
# A local demo of mesh, as root, in network namespaces on this machine:
# three "hosts" (h1, h2, h3 at 198.18.0.1-3) on an underlay switch, a
# "container" on each (198.19.1.1-3/24), a daemon per host joined into one
# mesh; every container pings every other across hosts (addresses from the ring, a name looked up by DNS). Done twice: first
# without a password, then with one (encrypted). Everything it makes is named
# mdemo-<pid>-... and removed on every exit path.
#
# MESH_BIN=/path/to/mesh runs that binary instead of building one.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PFX="mdemo-$$"
MESH=${MESH_BIN:-"$PWD/target/release/mesh"}
TMP=""
NHOSTS=3
PASSWORD="demo-s3cret"
FAILURES=0

say() { printf '\n==> %s\n' "$*"; }

host_ns() { echo "$PFX-h$1"; }
cont_ns() { echo "$PFX-c$1"; }
switch_ns() { echo "$PFX-sw"; }

# Runs a command inside host N with that host's mesh directories.
in_host() {
    local n=$1
    shift
    ip netns exec "$(host_ns "$n")" env \
        MESH_RUN_DIR="$TMP/h$n/run" MESH_DATA_DIR="$TMP/h$n/data" MESH_DOCKER_PLUGIN_DIR="$TMP/h$n/run/plugins" "$@"
}

# Stops host N's daemon by the PID in its pid file: TERM, up to 5 s, KILL.
stop_daemon() {
    local n=$1 pidfile pid i
    pidfile="$TMP/h$n/run/mesh.pid"
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# Removes everything one round made: daemons, namespaces (and with them every
# link), directories.
teardown() {
    local n
    [ -n "$TMP" ] || return 0
    for ((n = 1; n <= NHOSTS; n++)); do stop_daemon "$n"; done
    for ((n = 1; n <= NHOSTS; n++)); do
        ip netns del "$(cont_ns "$n")" 2>/dev/null || true
        ip netns del "$(host_ns "$n")" 2>/dev/null || true
    done
    ip netns del "$(switch_ns)" 2>/dev/null || true
    rm -rf "$TMP"
    TMP=""
}

on_exit() {
    local rc=$?
    if [ -n "$TMP" ]; then
        say "cleaning up (namespaces $PFX-*, daemons, $TMP)"
        teardown
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# Builds the underlay: a switch (bridge in its own namespace), three hosts
# joined to it, and an empty container namespace per host.
setup() {
    local n sw
    TMP=$(mktemp -d /tmp/mdemo.XXXXXX)
    sw=$(switch_ns)
    say "making the underlay switch: namespace $sw with bridge br0"
    ip netns add "$sw"
    ip -n "$sw" link set lo up
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
    for ((n = 1; n <= NHOSTS; n++)); do
        say "making host h$n: namespace $(host_ns "$n"), eth0 198.18.0.$n/24 on the switch; container namespace $(cont_ns "$n")"
        mkdir -p "$TMP/h$n/run" "$TMP/h$n/data"
        ip netns add "$(host_ns "$n")"
        ip -n "$(host_ns "$n")" link set lo up
        ip -n "$sw" link add "h$n" type veth peer name eth0 netns "$(host_ns "$n")"
        ip -n "$sw" link set "h$n" master br0 up
        ip -n "$(host_ns "$n")" addr add "198.18.0.$n/24" dev eth0
        ip -n "$(host_ns "$n")" link set eth0 up
        ip netns add "$(cont_ns "$n")"
        ip -n "$(cont_ns "$n")" link set lo up
    done
}

# Launches host N's daemon with the given arguments and prints its peer name.
launch() {
    local n=$1 out
    shift
    out="$TMP/h$n/launch.out"
    echo "    h$n\$ mesh launch --nickname h$n $*"
    if ! in_host "$n" timeout 90 "$MESH" launch --nickname "h$n" "$@" >"$out" </dev/null; then
        echo "    mesh launch on h$n failed; its log:" >&2
        tail -n 40 "$TMP/h$n/run/mesh.log" >&2 || true
        return 1
    fi
    echo "    h$n is peer $(tail -n 1 "$out")"
}

# Whether container I gets a ping reply from IP within 20 s.
ping_within_20s() {
    local i=$1 ip=$2 deadline=$((SECONDS + 20))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if ip netns exec "$(cont_ns "$i")" ping -n -q -c1 -W1 "$ip" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# One whole round: set up, launch, attach, show status, ping all pairs, tear
# down. Arguments are extra `mesh launch` options (the password).
round() {
    local n i j
    setup
    say "launching the daemons: h1 first, then h2 naming h1, then h3 naming only h2 (it learns h1 by gossip)"
    launch 1 --ipalloc-range 198.19.0.0/16 "$@"
    launch 2 --ipalloc-range 198.19.0.0/16 "$@" 198.18.0.1
    launch 3 --ipalloc-range 198.19.0.0/16 "$@" 198.18.0.2
    local -a IPS
    for ((n = 1; n <= NHOSTS; n++)); do
        say "attaching container c$n to h$n; the ring allocates its address"
        echo "    h$n\$ mesh attach --name c$n /run/netns/$(cont_ns "$n")"
        IPS[n]=$(in_host "$n" timeout 60 "$MESH" attach --name "c$n" \
            "/run/netns/$(cont_ns "$n")" </dev/null | head -n1)
        echo "    ${IPS[n]}"
        IPS[n]=${IPS[n]%/*}
    done
    say "every container pings every other container across hosts (each up to 20 s)"
    for ((i = 1; i <= NHOSTS; i++)); do
        for ((j = 1; j <= NHOSTS; j++)); do
            [ "$i" -ne "$j" ] || continue
            if ping_within_20s "$i" "${IPS[j]}"; then
                echo "    c$i (on h$i) -> c$j ${IPS[j]} (on h$j): ok"
            else
                echo "    c$i (on h$i) -> c$j ${IPS[j]} (on h$j): FAILED"
                FAILURES=$((FAILURES + 1))
            fi
        done
    done
    say "names: c1 asks the mesh's DNS inside its namespace (127.0.0.11) for c3"
    echo "    c1\$ dig +short c3.mesh.local @127.0.0.11"
    local found=""
    for _ in $(seq 1 20); do
        found=$(ip netns exec "$(cont_ns 1)" dig +short +time=1 +tries=1 c3.mesh.local @127.0.0.11 2>/dev/null || true)
        [ "$found" = "${IPS[3]}" ] && break
        sleep 0.5
    done
    echo "    ${found:-no answer}"
    if [ "$found" != "${IPS[3]}" ]; then
        echo "    FAILED: expected ${IPS[3]}"
        FAILURES=$((FAILURES + 1))
    fi
    say "the address ring as h1 sees it: mesh status ipam"
    in_host 1 timeout 30 "$MESH" status ipam </dev/null | sed 's/^/    /' || true
    say "what h1 sees: mesh status"
    in_host 1 timeout 30 "$MESH" status </dev/null | sed 's/^/    /' || true
    say "the peers h1 knows, and how it reaches them: mesh status peers"
    in_host 1 timeout 30 "$MESH" status peers </dev/null | sed 's/^/    /' || true
    say "containers attached on h1: mesh ps"
    in_host 1 timeout 30 "$MESH" ps </dev/null | sed 's/^/    /' || true
    say "tearing this mesh down"
    teardown
}

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/demo.sh: run me as root: the demo makes network namespaces" >&2
    exit 1
fi

if [ -z "${MESH_BIN:-}" ]; then
    say "building mesh: cargo build --release"
    cargo build --release
fi

say "round 1: a mesh without a password (sleeve traffic in the clear)"
round

say "round 2: the same mesh with a password (control and sleeve encrypted)"
round --password "$PASSWORD"

if [ "$FAILURES" -ne 0 ]; then
    say "demo FAILED: $FAILURES pings got no reply"
    exit 1
fi
say "demo done: every container reached every other, with and without a password"
