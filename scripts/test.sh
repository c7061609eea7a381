#!/usr/bin/env bash
# The one command that checks mesh on a fresh Debian machine, as root:
# installs the Debian packages the integration tests use (only those missing),
# then runs the formatter check, clippy with warnings as errors, and every
# test of the workspace in release mode (the data path is faster there).
#
# Environment: MESH_TEST_THREADS caps parallel tests (default 4).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: run me as root: the integration tests make network namespaces" >&2
    exit 1
fi

# podman and friends: the CNI plugin's test runs real containers
# (shared/containers.md); docker.io (a private dockerd per test) and
# docker-compose for the Docker proxy, plugin and compose tests; systemd
# (systemd-analyze verify) for the unit's test; prometheus (with promtool),
# chromium and chromium-driver for the metrics and status page test.
packages=(iproute2 iputils-ping tcpdump iperf3 dnsutils dnsmasq-base nftables util-linux procps ethtool
    podman runc busybox-static uidmap fuse-overlayfs containernetworking-plugins iptables tar
    docker.io docker-compose systemd prometheus chromium chromium-driver)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg -s "$p" >/dev/null 2>&1; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing missing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y -o DPkg::Lock::Timeout=120 --no-install-recommends "${missing[@]}"
else
    say "Debian packages present: ${packages[*]}"
fi

for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        say "installing the $component component"
        rustup component add "$component"
    fi
done

# cargo-deb: tests/package.rs builds the Debian package.
if ! cargo deb --version >/dev/null 2>&1; then
    say "installing cargo-deb (cargo install cargo-deb --locked)"
    cargo install cargo-deb --locked
fi

say "checking formatting: cargo fmt --all -- --check"
cargo fmt --all -- --check

say "linting: cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

threads=${MESH_TEST_THREADS:-4}
say "testing: cargo test --workspace --release -- --test-threads=$threads"
cargo test --workspace --release -- --test-threads="$threads"

say "all checks passed"
