#!/usr/bin/env bash
# Runs pagepool's concurrency, invariant and callback tests under
# ThreadSanitizer and AddressSanitizer (with its leak check), then the
# planted canaries of tests/sanitizer_canary.rs, each of which its sanitizer
# must report: a clean run is one that could have failed.
#
#   scripts/sanitizers.sh [thread|address|canaries|all]...   (default: all)
#
# Needs the nightly toolchain with rust-src (std is rebuilt with the
# sanitizer, -Zbuild-std; rust-src is added here if missing), on a target
# with sanitizer support (x86_64 or aarch64 Linux). Each sanitizer builds
# into a directory of its own, $SANITIZER_TARGET_DIR/thread and .../address
# (default target/sanitizers), so that neither rebuilds the other's std.
# SANITIZER_TOOLCHAIN picks the toolchain (default nightly).
#
# A sanitizer report fails the run: TSan exits with 66 after the tests,
# ASan aborts at the first error, LeakSanitizer fails the test binary at
# exit. To rerun one target by hand, as this script does:
#
#   RUSTFLAGS="-Zsanitizer=thread" CARGO_TARGET_DIR=target/sanitizers/thread \
#     cargo +nightly test -Zbuild-std --target x86_64-unknown-linux-gnu \
#     --features bytes --test concurrency
#
# What TSan cannot see: it models atomics, locks and thread start/join, but
# not standalone fences (`atomic::fence`) nor membarrier(2). Synchronisation
# that rests on a fence alone looks like a race to it. The call gates'
# asymmetric fences (src/sync.rs) are not such a case: what a device call
# touches is ordered by the release and acquire on the thread's slot, which
# TSan sees. `Frag::drop` (src/frag.rs) takes an acquire load of the
# fragment count, not a standalone fence, for the same reason.
set -euo pipefail
cd "$(dirname "$0")/.."

toolchain="${SANITIZER_TOOLCHAIN:-nightly}"
dirs="${SANITIZER_TARGET_DIR:-${CARGO_TARGET_DIR:-target}/sanitizers}"
case "$dirs" in /*) ;; *) dirs="$PWD/$dirs" ;; esac
host=$(rustc +"$toolchain" -vV | sed -n 's/^host: //p')

# The test targets, with the features the Miri runs use.
features=(--features bytes)
tsan_tests=(--test concurrency --test invariants --test callbacks --test deferred_unbind --test regions)
asan_tests=(--lib --test concurrency --test invariants --test callbacks --test deferred_unbind --test regions)
tsan_skip=()

export ASAN_OPTIONS="detect_leaks=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export LSAN_OPTIONS="suppressions=$PWD/scripts/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"

usage() {
    echo "usage: $0 [thread|address|canaries|all]..." >&2
    exit 2
}
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(all)
for part in "${parts[@]}"; do
    case "$part" in thread | address | canaries | all) ;; *) usage ;; esac
done
wanted() {
    local part
    for part in "${parts[@]}"; do
        if [ "$part" = all ] || [ "$part" = "$1" ]; then
            return 0
        fi
    done
    return 1
}

if ! rustup component list --toolchain "$toolchain" --installed | grep -q '^rust-src'; then
    rustup component add --toolchain "$toolchain" rust-src
fi

# cargo SUBCOMMAND ARGS... with sanitizer $1 (thread, address), std rebuilt
# with it, in that sanitizer's own target directory.
san_cargo() {
    local sanitizer=$1 subcommand=$2
    shift 2
    env RUSTFLAGS="-Zsanitizer=$sanitizer" RUSTDOCFLAGS="-Zsanitizer=$sanitizer" \
        CARGO_TARGET_DIR="$dirs/$sanitizer" \
        cargo +"$toolchain" "$subcommand" -Zbuild-std --target "$host" "${features[@]}" "$@"
}

# Builds the canaries with sanitizer $1 (`--cfg pagepool_canary` for that
# test target alone, so nothing else is rebuilt) and prints the executable.
canary_build() {
    san_cargo "$1" rustc --profile test --test sanitizer_canary \
        --message-format=json-render-diagnostics -- --cfg pagepool_canary |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1
}

# Runs canary $2 of executable $1: it must fail, with report $3 naming the
# canary. Its output stays out of the log (its test result is no test's).
canary_log=$(mktemp)
trap 'rm -f "$canary_log"' EXIT
expect_caught() {
    local exe=$1 name=$2 report=$3
    if "$exe" --exact "$name" >"$canary_log" 2>&1; then
        cat "$canary_log" >&2
        echo "FAIL: canary $name passed: the sanitizer did not catch it" >&2
        exit 1
    fi
    if ! grep -q "$report" "$canary_log" || ! grep -q 'sanitizer_canary' "$canary_log"; then
        cat "$canary_log" >&2
        echo "FAIL: canary $name failed, but without the report \"$report\"" >&2
        exit 1
    fi
    echo "canary $name: caught: $(grep -m 1 '^SUMMARY' "$canary_log")"
}

if wanted thread; then
    SECONDS=0
    echo "== ThreadSanitizer: ${tsan_tests[*]} (${tsan_skip[*]})"
    san_cargo thread test "${tsan_tests[@]}" -- "${tsan_skip[@]}"
    echo "== ThreadSanitizer done in ${SECONDS}s"
fi

if wanted address; then
    SECONDS=0
    echo "== AddressSanitizer: ${asan_tests[*]}"
    san_cargo address test "${asan_tests[@]}"
    echo "== AddressSanitizer done in ${SECONDS}s"
fi

if wanted canaries; then
    SECONDS=0
    echo "== canaries: each must fail with its sanitizer's report"
    exe=$(canary_build thread)
    expect_caught "$exe" planted_data_race "ThreadSanitizer: data race"
    exe=$(canary_build address)
    expect_caught "$exe" planted_use_after_free "AddressSanitizer: heap-use-after-free"
    expect_caught "$exe" planted_leak "LeakSanitizer: detected memory leaks"
    echo "== canaries done in ${SECONDS}s"
fi
