#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 600), one after another.
#
#   fuzz/run.sh [SECONDS]          all targets
#   TARGETS="dns_query sleeve" fuzz/run.sh 60
#
# Builds with `cargo +nightly fuzz build` (installing cargo-fuzz if it is
# missing). Corpora live in fuzz/corpus/<target>/ (not tracked); libFuzzer's
# artifacts (crash-*, timeout-*, slow-unit-*, leak-*, oom-*) in
# fuzz/artifacts/<target>/, and every one is copied into
# fuzz/regressions/<target>/ (tracked), where `cargo test` (stable) runs it
# through the same driver (tests/fuzz_regressions.rs). An input that takes
# longer than TIMEOUT seconds (default 2) is a finding, and so is one slower
# than SLOW seconds (default 1, `-report_slow_units`).
# Prints, per target: runs, seconds, findings. Exits 1 if anything was found.
set -euo pipefail

secs=${1:-600}
timeout=${TIMEOUT:-2}
slow=${SLOW:-1}
rss=${RSS_MB:-2048}
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz
fi

all=$(cd fuzz_targets && ls *.rs | sed 's/\.rs$//')
targets=${TARGETS:-$all}

# Default: cargo-fuzz's release build with debug assertions and overflow
# checks; BUILD_FLAGS=-O for one without them (faster, finds less).
read -r -a flags <<<"${BUILD_FLAGS:-}"
cargo +nightly fuzz build "${flags[@]}" >&2

summary=()
found_any=0
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t" "regressions/$t"
    # The regressions are good seeds too (read only: -merge is not used).
    log=$(mktemp)
    start=$(date +%s)
    set +e
    cargo +nightly fuzz run "${flags[@]}" "$t" "corpus/$t" "regressions/$t" -- \
        -max_total_time="$secs" -timeout="$timeout" -rss_limit_mb="$rss" \
        -report_slow_units="$slow" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    took=$(( $(date +%s) - start ))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    # Slow units are reported in the log, and written as slow-unit-* files.
    new=0
    while IFS= read -r f; do
        [ -n "$f" ] || continue
        cp "$f" "regressions/$t/$(basename "$f")"
        new=$((new + 1))
    done < <(find "artifacts/$t" -type f -newer "$log" 2>/dev/null)
    if [ "$rc" -ne 0 ] && [ "$new" -eq 0 ]; then
        # A crash whose artifact could not be found: keep the log.
        cp "$log" "artifacts/$t/failure-$(date +%s).log"
        echo "$t: libFuzzer exited $rc without an artifact; log in artifacts/$t/" >&2
        new=1
    fi
    if [ "$new" -gt 0 ]; then
        found_any=1
        grep -E "^==[0-9]+== ERROR|^SUMMARY|panicked at|Slow unit|timeout after" "$log" | head -5 >&2 || true
    fi
    summary+=("$(printf '%-16s runs %10s  seconds %5s  findings %s' "$t" "${runs:-?}" "$took" "$new")")
    rm -f "$log"
done

printf '%s\n' "${summary[@]}"
exit "$found_any"
