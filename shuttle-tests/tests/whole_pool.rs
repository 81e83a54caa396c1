//! Whole-pool scenarios with 10-16 threads, each over a fixed number of
//! schedules (see README.md). Each also checks that its races happened:
//! some execution unmapped held pages, drained a ring, saw the racing pool
//! registered and refused, and stopped an owner with `Unbound`.
#![cfg(shuttle)]

use pagepool_shuttle_tests::{
    explore, schedules, whole_pool, EXPECTED, POOLS_DROPPED, POOL_DROPPED_BEFORE_UNBIND, RX_LOOPS,
    SLOW_SOURCE,
};

/// `RX_LOOPS`: two RX loops, eleven holders, unbind, a racing pool.
#[test]
fn rx_loops_holders_and_unbind() {
    explore("rx_loops_holders_and_unbind", schedules(), || {
        whole_pool(RX_LOOPS)
    })
    .assert_seen(EXPECTED);
}

/// `POOLS_DROPPED`: pools dropped while their pages are held and the
/// device may be unbinding.
#[test]
fn pools_dropped_while_held_and_unbinding() {
    explore(
        "pools_dropped_while_held_and_unbinding",
        schedules(),
        || whole_pool(POOLS_DROPPED),
    )
    .assert_seen(&[EXPECTED, &[POOL_DROPPED_BEFORE_UNBIND]].concat());
}

/// `SLOW_SOURCE`: page memory taken back only after `on_unbind`.
#[test]
fn slow_page_source_while_unbinding() {
    explore("slow_page_source_while_unbinding", schedules(), || {
        whole_pool(SLOW_SOURCE)
    })
    .assert_seen(EXPECTED);
}
