#!/usr/bin/env bash
# Runs pagepool's randomized schedule tests (shuttle-tests/, see its
# README.md): every whole-pool scenario for ITERATIONS schedules (half under
# shuttle's PCT scheduler, half under its random scheduler) against the real
# core, then a `--cfg pagepool_broken` build in which shuttle must find each
# planted bug.
#
#   scripts/shuttle.sh [ITERATIONS]      (schedules per scenario; default 50000)
#
# CI passes 2000 (the crate's default). Environment:
#   PAGEPOOL_SHUTTLE_SEED          the schedulers' seed (default: a fixed
#                                  one, so a run is reproducible); pass
#                                  another to explore other schedules
#   PAGEPOOL_SHUTTLE_BROKEN_ITERS  the most schedules a broken variant gets
#                                  before its test fails (default 40000)
#   SHUTTLE_TARGET_DIR             build directories (default
#                                  $CARGO_TARGET_DIR/shuttle or
#                                  target/shuttle), one per build
#
# A failing schedule is printed by shuttle as a hex string; replay it with
# `shuttle::replay(|| whole_pool(SHAPE), "...")` in a test of
# shuttle-tests/, with the same build flags.
set -euo pipefail
cd "$(dirname "$0")/.."

iterations="${1:-50000}"
dirs="${SHUTTLE_TARGET_DIR:-${CARGO_TARGET_DIR:-target}/shuttle}"
case "$dirs" in /*) ;; *) dirs="$PWD/$dirs" ;; esac
log=$(mktemp)
trap 'rm -f "$log"' EXIT
SECONDS=0

echo "== shuttle: whole-pool scenarios, $iterations schedules each"
(
    cd shuttle-tests
    CARGO_TARGET_DIR="$dirs/normal" RUSTFLAGS="--cfg shuttle" cargo build --release --tests
    started=$SECONDS
    PAGEPOOL_SHUTTLE_ITERS="$iterations" CARGO_TARGET_DIR="$dirs/normal" RUSTFLAGS="--cfg shuttle" \
        cargo test --release -- --nocapture
    echo "shuttle: scenarios took $((SECONDS - started)) s (build excluded)"
) 2>&1 | tee -a "$log"

echo "== shuttle: the planted bugs (--cfg pagepool_broken)"
(
    cd shuttle-tests
    CARGO_TARGET_DIR="$dirs/broken" RUSTFLAGS="--cfg shuttle --cfg pagepool_broken" \
        cargo build --release --tests
    started=$SECONDS
    CARGO_TARGET_DIR="$dirs/broken" RUSTFLAGS="--cfg shuttle --cfg pagepool_broken" \
        cargo test --release --test broken -- --nocapture
    echo "shuttle: broken variants took $((SECONDS - started)) s (build excluded)"
) 2>&1 | tee -a "$log"

echo
echo "== shuttle summary (${SECONDS} s in all, builds included)"
# (The test harness may print a test's name in front of these lines.)
grep -oE "shuttle scenario .*|outcomes: .*|shuttle found broken variant .*|shuttle: .* took .*" "$log"
