#!/usr/bin/env bash
# The full install check of the Debian package, on demand (not in CI: it
# downloads a Debian base system): debootstrap a fresh minimal Debian into a
# temporary root, `apt-get install ./mesh_*.deb` there (which pulls nftables
# and iproute2 from the archive), check the files dpkg installed, then run
# the installed mesh chrooted in a network namespace: launch, status, stop.
#
#   scripts/deb-chroot.sh [DEB] [SUITE]    # as root; default: the newest
#                                          # target/debian/*.deb, bookworm
#
# Environment: MESH_DEB_MIRROR (default http://deb.debian.org/debian).
# Uses only the namespace `mdeb-<pid>` and addresses in 198.18.0.0/15, and
# removes both and the root on every exit.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/deb-chroot.sh: run me as root (debootstrap, chroot, namespaces)" >&2
    exit 1
fi
deb=${1:-$(ls -t target/debian/mesh_*.deb 2>/dev/null | head -n 1)}
suite=${2:-bookworm}
mirror=${MESH_DEB_MIRROR:-http://deb.debian.org/debian}
if [ -z "$deb" ] || [ ! -f "$deb" ]; then
    echo "scripts/deb-chroot.sh: no package: build one with scripts/deb.sh, or name it" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap
fi

root=$(mktemp -d /tmp/mdeb-root.XXXXXX)
ns=mdeb-$$
pid=
cleanup() {
    set +e
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
    fi
    for m in dev/pts dev sys proc; do
        mountpoint -q "$root/$m" && umount -l "$root/$m"
    done
    ip netns del "$ns" 2>/dev/null
    rm -rf --one-file-system "$root"
}
trap cleanup EXIT

start=$(date +%s)
say "debootstrap --variant=minbase $suite into $root"
debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.debootstrap.log" 2>&1 ||
    { tail -n 20 "$root.debootstrap.log"; exit 1; }
rm -f "$root.debootstrap.log"
echo "base system in $(($(date +%s) - start)) s"

for m in proc sys dev dev/pts; do
    mkdir -p "$root/$m"
done
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$deb" "$root/tmp/"
name=$(basename "$deb")

say "apt-get install ./$name (in the chroot)"
chroot "$root" apt-get update -qq
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "/tmp/$name"
chroot "$root" dpkg -s mesh | sed -n 's/^\(Status\|Version\|Depends\): /  \1: /p'
for f in /usr/bin/mesh /usr/lib/systemd/system/mesh.service /etc/default/mesh; do
    [ -e "$root$f" ] || { echo "missing after install: $f" >&2; exit 1; }
done
for cmd in nft ip; do
    chroot "$root" sh -c "command -v $cmd" >/dev/null || { echo "dependency not installed: $cmd" >&2; exit 1; }
done
chroot "$root" mesh version

say "mesh launch in namespace $ns, chrooted"
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add eth0 type veth peer name eth1
ip -n "$ns" link set eth1 up
ip -n "$ns" addr add 198.18.0.1/24 dev eth0
ip -n "$ns" link set eth0 up
ip netns exec "$ns" chroot "$root" mesh launch --nickname deb-chroot
pid=$(cat "$root/run/mesh/mesh.pid")
ip netns exec "$ns" chroot "$root" mesh status
ip netns exec "$ns" chroot "$root" mesh stop
for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$pid" 2>/dev/null; then
    echo "the daemon did not stop" >&2
    exit 1
fi
pid=
say "the package installs and runs on a fresh $suite ($(($(date +%s) - start)) s)"
