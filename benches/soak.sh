#!/usr/bin/env bash
# Soak: MINUTES of attach/detach/DNS churn on two namespace hosts, then
# checks that nothing grew and nothing leaked (issue 17, part 4).
#
#   benches/soak.sh [MINUTES]       (as root; default 10)
#
# Two hosts h1, h2 (198.18.0.1-2 on an underlay switch) run daemons in one
# mesh (--ipalloc-range 198.19.96.0/22). Each host has SLOTS container
# namespaces. Every round, on each host, one slot changes: an attached
# container is detached (`mesh detach`), or — one time in five — its
# namespace is deleted under the daemon (a container that dies without a
# detach; the namespace is made again afterwards); a free slot is
# attached with a name (`mesh attach net:... --name`). Every round looks
# up a container of the other host by name (`mesh dns-lookup`) and from
# inside one of its own containers (dig @127.0.0.11).
#
# It samples each daemon's RSS (VmRSS) and open fds (/proc/PID/fd) at the
# start and every minute, and at the end prints start/end/max of both.
# Then it checks for leaks, with the containers still attached and again
# after detaching all of them: vmesh* interfaces, elements of the nft sets
# port_mac and port_ip, addresses the IPAM holds (owned - free of
# `mesh status ipam`) and names (`mesh status dns`) must match what is
# attached. Exits 1 if a check fails.
#
# Everything it makes is named msoak-<pid>-... (namespaces) or lives in
# one temp dir; it is removed on every exit path. Only 198.18.0.0/15.
# MESH_BIN=/path/to/mesh runs that binary instead of building one.
set -euo pipefail

MINUTES=${1:-10}
SLOTS=${SLOTS:-6}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MESH=${MESH_BIN:-$ROOT/target/release/mesh}
RANGE=198.19.96.0/22
[[ $EUID -eq 0 ]] || { echo "benches/soak.sh: run as root" >&2; exit 1; }
[[ $MINUTES =~ ^[0-9]+$ ]] || { echo "usage: benches/soak.sh [MINUTES]" >&2; exit 2; }
if [[ -z ${MESH_BIN:-} ]]; then
    (cd "$ROOT" && cargo build --release --quiet --bin mesh)
fi
command -v jq >/dev/null || { echo "benches/soak.sh: needs jq" >&2; exit 1; }

P=msoak-$$
DIR=$(mktemp -d /tmp/$P.XXXX)
FAIL=0

hns() { echo "$P-h$1"; }
cns() { echo "$P-h$1-c$2"; }
in_host() { # N CMD...: CMD in host N's namespace with its mesh dirs
    local n=$1
    shift
    ip netns exec "$(hns "$n")" env MESH_RUN_DIR="$DIR/h$n/run" MESH_DATA_DIR="$DIR/h$n/data" MESH_DOCKER_PLUGIN_DIR="$DIR/h$n/run/plugins" "$@"
}
mesh() { local n=$1; shift; in_host "$n" timeout 60 "$MESH" "$@"; }
pid_of() { cat "$DIR/h$1/run/mesh.pid" 2>/dev/null || true; }

cleanup() {
    set +e
    local n pid i
    for n in 1 2; do
        pid=$(pid_of "$n")
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null
        fi
    done
    for ns in $(ip netns list | awk '{print $1}' | grep "^$P-"); do ip netns del "$ns"; done
    rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The underlay, the hosts, their container namespaces.
ip netns add "$P-sw"
ip -n "$P-sw" link add br0 type bridge
ip -n "$P-sw" link set br0 up
for n in 1 2; do
    mkdir -p "$DIR/h$n/run" "$DIR/h$n/data"
    ip netns add "$(hns "$n")"
    ip -n "$(hns "$n")" link set lo up
    ip -n "$P-sw" link add "h$n" type veth peer name eth0 netns "$(hns "$n")"
    ip -n "$P-sw" link set "h$n" master br0 up
    ip -n "$(hns "$n")" addr add "198.18.0.$n/24" dev eth0
    ip -n "$(hns "$n")" link set eth0 up
    for ((i = 0; i < SLOTS; i++)); do
        ip netns add "$(cns "$n" "$i")"
        ip -n "$(cns "$n" "$i")" link set lo up
    done
done
mesh 1 launch --ipalloc-range "$RANGE" >/dev/null
mesh 2 launch --ipalloc-range "$RANGE" 198.18.0.1 >/dev/null
for ((i = 0; i < 100; i++)); do
    mesh 1 status connections | grep -q established && break
    sleep 0.2
done
mesh 1 status connections | grep -q established || { echo "h1 and h2 did not connect" >&2; exit 1; }

# State: ATT[n,i] is 1 when slot i of host n is attached, 2 while its
# namespace was deleted under the daemon and `mesh ps` still lists it.
declare -A ATT
for n in 1 2; do for ((i = 0; i < SLOTS; i++)); do ATT[$n,$i]=0; done; done
attached() { # N: how many of host N's slots are attached
    local n=$1 i c=0
    for ((i = 0; i < SLOTS; i++)); do ((ATT[$n,$i] == 1)) && c=$((c + 1)); done
    echo "$c"
}
error() { # what: counted; the first few are shown
    ERRORS=$((ERRORS + 1))
    ((ERRORS <= 5)) && echo "error: $1" >&2
    return 0
}

rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
fds() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }
declare -A RSS0 RSSMAX RSSEND FD0 FDMAX FDEND
sample() { # label
    local n pid r f
    for n in 1 2; do
        pid=$(pid_of "$n")
        r=$(rss "$pid")
        f=$(fds "$pid")
        [[ -n ${RSS0[$n]:-} ]] || { RSS0[$n]=$r; FD0[$n]=$f; RSSMAX[$n]=$r; FDMAX[$n]=$f; }
        ((r > RSSMAX[$n])) && RSSMAX[$n]=$r
        ((f > FDMAX[$n])) && FDMAX[$n]=$f
        RSSEND[$n]=$r
        FDEND[$n]=$f
        printf '%s h%d: rss %d KiB, fds %d, attached %d\n' "$1" "$n" "$r" "$f" "$(attached "$n")"
    done
}

ROUNDS=0 ATTACHES=0 DETACHES=0 KILLS=0 RELEASED=0 LOOKUPS=0 LOOKUPS_OK=0 DIGS=0 DIGS_OK=0 ERRORS=0
one_round() {
    local n other i name ip j
    for n in 1 2; do
        other=$((3 - n))
        i=$((RANDOM % SLOTS))
        name="s$i-h$n"
        if ((ATT[$n,$i] == 2)); then
            # Deleted under the daemon: free once it has released it.
            if awk '{print $1}' <<<"$(mesh "$n" ps)" | grep -qx "$name"; then
                continue
            fi
            ATT[$n,$i]=0
            RELEASED=$((RELEASED + 1))
        fi
        if ((ATT[$n,$i] == 1)); then
            if ((RANDOM % 5 == 0)); then
                # Dies without a detach: the daemon notices and releases.
                ip netns del "$(cns "$n" "$i")"
                ip netns add "$(cns "$n" "$i")"
                ip -n "$(cns "$n" "$i")" link set lo up
                KILLS=$((KILLS + 1))
                ATT[$n,$i]=2
            else
                if mesh "$n" detach "/run/netns/$(cns "$n" "$i")" >/dev/null 2>"$DIR/err"; then
                    DETACHES=$((DETACHES + 1))
                else
                    error "detach $name: $(cat "$DIR/err")"
                fi
                ATT[$n,$i]=0
            fi
        else
            if mesh "$n" attach "net:$RANGE" --name "$name" "/run/netns/$(cns "$n" "$i")" >/dev/null 2>"$DIR/err"; then
                ATT[$n,$i]=1
                ATTACHES=$((ATTACHES + 1))
            else
                error "attach $name: $(cat "$DIR/err")"
            fi
        fi
        # A name of the other host, from this one, by the CLI and by DNS
        # from inside an attached container.
        for ((j = 0; j < SLOTS; j++)); do
            ((ATT[$other,$j] == 1)) || continue
            LOOKUPS=$((LOOKUPS + 1))
            mesh "$n" dns-lookup "s$j-h$other" >/dev/null 2>&1 && LOOKUPS_OK=$((LOOKUPS_OK + 1))
            for ((i = 0; i < SLOTS; i++)); do
                ((ATT[$n,$i] == 1)) || continue
                DIGS=$((DIGS + 1))
                ip=$(ip netns exec "$(cns "$n" "$i")" dig @127.0.0.11 +short +time=2 +tries=1 "s$j-h$other.mesh.local" A 2>/dev/null || true)
                [[ -n $ip ]] && DIGS_OK=$((DIGS_OK + 1))
                break
            done
            break
        done
    done
    ROUNDS=$((ROUNDS + 1))
}

# Leak checks: what the kernel, nft, the IPAM and the name table hold on
# host N against what is attached there. Polls (the release of a dead
# container's addresses waits for the daemon's check every 5 s).
check_host() { # N LABEL
    local n=$1 label=$2 want veth macs ips held names line owned free t
    want=$(attached "$n")
    for ((t = 0; t < 60; t++)); do
        veth=$(ip -n "$(hns "$n")" -o link show | grep -c ': vmesh' || true)
        macs=$(in_host "$n" nft -j list set bridge mesh port_mac | jq '[.nftables[] | select(.set) | (.set.elem // []) | length] | add')
        ips=$(in_host "$n" nft -j list set bridge mesh port_ip | jq '[.nftables[] | select(.set) | (.set.elem // []) | length] | add')
        line=$(mesh "$n" status ipam | grep '(this peer)' || true)
        owned=$(awk '{print $2}' <<<"$line")
        free=$(sed -E 's/.*, ([0-9]+) free.*/\1/' <<<"$line")
        held=$((${owned:-0} - ${free:-0}))
        names=$(mesh "$n" status dns | grep -c "s[0-9]*-h$n" || true)
        [[ $veth == "$want" && $macs == "$want" && $ips == "$want" && $held == "$want" && $names == "$want" ]] && break
        sleep 1
    done
    printf '%s h%d: attached %d; vmesh interfaces %d, port_mac %d, port_ip %d, IPAM held %d, own names %d\n' \
        "$label" "$n" "$want" "$veth" "$macs" "$ips" "$held" "$names"
    if [[ $veth != "$want" || $macs != "$want" || $ips != "$want" || $held != "$want" || $names != "$want" ]]; then
        echo "LEAK on h$n ($label)" >&2
        FAIL=1
    fi
}

echo "soak: $MINUTES minutes, $SLOTS container slots per host, binary $MESH"
sample "minute 0:"
START=$SECONDS
END=$((START + MINUTES * 60))
NEXT=$((START + 60))
M=1
while ((SECONDS < END)); do
    one_round
    if ((SECONDS >= NEXT)); then
        sample "minute $M:"
        M=$((M + 1))
        NEXT=$((NEXT + 60))
    fi
done
sample "end:"
for n in 1 2; do
    pid=$(pid_of "$n")
    kill -0 "$pid" 2>/dev/null || { echo "h$n's daemon died" >&2; FAIL=1; }
done

echo "rounds $ROUNDS: attaches $ATTACHES, detaches $DETACHES, containers deleted without detach $KILLS (seen released by the daemon: $RELEASED), errors $ERRORS"
echo "lookups by mesh dns-lookup: $LOOKUPS_OK of $LOOKUPS answered; by dig in a container: $DIGS_OK of $DIGS"
for n in 1 2; do
    printf 'h%d: RSS start %d KiB, end %d KiB, max %d KiB; open fds start %d, end %d, max %d\n' \
        "$n" "${RSS0[$n]}" "${RSSEND[$n]}" "${RSSMAX[$n]}" "${FD0[$n]}" "${FDEND[$n]}" "${FDMAX[$n]}"
done
for n in 1 2; do check_host "$n" "with containers attached:"; done
for n in 1 2; do
    for ((i = 0; i < SLOTS; i++)); do
        if ((ATT[$n,$i] == 1)); then
            mesh "$n" detach "/run/netns/$(cns "$n" "$i")" >/dev/null || FAIL=1
            ATT[$n,$i]=0
        fi
    done
done
for n in 1 2; do check_host "$n" "after detaching all:"; done
sample "after detaching all:"
if ((FAIL)); then
    echo "soak: FAILED"
    exit 1
fi
echo "soak: no daemon died, nothing leaked"
