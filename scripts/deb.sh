#!/usr/bin/env bash
# Builds the Debian package of mesh: target/debian/mesh_<version>-1_<arch>.deb
# (or in OUTDIR).
#
#   scripts/deb.sh [--profile dist|release] [--no-build] [--fast] [-o OUTDIR]
#
# By default the binary is built with the `dist` profile (fat LTO, one
# codegen unit, stripped: see Cargo.toml). `--profile release --no-build`
# packages the binary the tests already built (tests/package.rs does this;
# cargo-deb strips it). The man pages and completion scripts are printed by
# the binary itself (`mesh man --dir`, `mesh completion SHELL`) and staged
# under target/pkg/ with the README; a binary without those commands is
# packaged without them, with a warning. `--fast`: lighter compression
# (for tests). Needs cargo-deb
# (`cargo install cargo-deb --locked`).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=dist
build=1
out=
fast=()
while [ $# -gt 0 ]; do
    case "$1" in
    --profile) profile=${2:?--profile needs a name}; shift 2 ;;
    --no-build) build=0; shift ;;
    --fast) fast=(--fast); shift ;;
    -o|--output) out=${2:?-o needs a directory}; shift 2 ;;
    *) echo "scripts/deb.sh: unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
    esac
done

if ! cargo deb --version >/dev/null 2>&1; then
    echo "scripts/deb.sh: cargo-deb is missing: cargo install cargo-deb --locked" >&2
    exit 1
fi

target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="$target/$profile/mesh"
if [ "$build" = 1 ]; then
    cargo build --profile "$profile" --bin mesh
fi
[ -x "$bin" ] || { echo "scripts/deb.sh: no binary at $bin (build it, or drop --no-build)" >&2; exit 1; }

stage="$target/pkg"
rm -rf "$stage"
mkdir -p "$stage/usr/share/doc/mesh"
cp README.md "$stage/usr/share/doc/mesh/README.md"
man="$stage/usr/share/man/man1"
mkdir -p "$man"
if "$bin" man --dir "$man" >/dev/null 2>&1 && ls "$man"/*.1 >/dev/null 2>&1; then
    gzip -9n "$man"/*.1
else
    rmdir "$man"
    echo "scripts/deb.sh: warning: $bin has no \`mesh man\`: no man pages packaged" >&2
fi
completions=ok
for shell_dir in bash:usr/share/bash-completion/completions/mesh \
    zsh:usr/share/zsh/vendor-completions/_mesh \
    fish:usr/share/fish/vendor_completions.d/mesh.fish; do
    shell=${shell_dir%%:*}
    dest="$stage/${shell_dir#*:}"
    mkdir -p "$(dirname "$dest")"
    if ! "$bin" completion "$shell" >"$dest" 2>/dev/null || [ ! -s "$dest" ]; then
        rm -f "$dest"
        completions=missing
    fi
done
find "$stage" -type d -empty -delete
if [ "$completions" = missing ]; then
    echo "scripts/deb.sh: warning: $bin has no \`mesh completion\`: no completion scripts packaged" >&2
fi

# --strip: the release profile keeps debug info (for profiling); the
# package never does.
args=(--no-build --profile "$profile" --strip "${fast[@]}")
if [ -n "$out" ]; then
    mkdir -p "$out"
    args+=(--output "$out")
fi
cargo deb "${args[@]}"
