#!/usr/bin/env bash
# Runs a cargo-fuzz target of pagepool for a bounded time, on the installed
# nightly toolchain. Installs cargo-fuzz if it is missing.
#
#   scripts/fuzz.sh [SECONDS] [TARGET]      (defaults: 60, interleavings)
#
# Inputs: the committed seeds (fuzz/seeds/TARGET) and the committed fuzz
# regressions (fuzz/regressions/TARGET) are read; new corpus entries go to
# fuzz/corpus/TARGET (git-ignored), crashes to fuzz/artifacts/TARGET
# (git-ignored). A crash fails the script: reproduce it with
#   cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...
# and keep the input as a regression by copying it to
# fuzz/regressions/TARGET/ (tests/fuzz_replay.rs replays it on stable).
# FUZZ_JOBS=N runs N fuzzing processes in parallel (default 1).
set -euo pipefail

secs="${1:-60}"
target="${2:-interleavings}"
jobs="${FUZZ_JOBS:-1}"
cd "$(dirname "$0")/.."

toolchain="${FUZZ_TOOLCHAIN:-nightly}"
if ! cargo +"$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
inputs=("fuzz/corpus/$target" "fuzz/seeds/$target")
if [ -d "fuzz/regressions/$target" ]; then
    inputs+=("fuzz/regressions/$target")
fi

extra=()
if [ "$jobs" -gt 1 ]; then
    extra+=("-fork=$jobs")
fi

# -timeout: an input that runs 20 s is a hang (a deadlock in unbind, say):
# a crash. -print_final_stats: execs and coverage for the log.
exec cargo +"$toolchain" fuzz run "$target" "${inputs[@]}" -- \
    -max_total_time="$secs" -timeout=20 -print_final_stats=1 "${extra[@]}"
