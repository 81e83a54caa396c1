//! Shuttle finds planted schedule bugs (built only with `--cfg
//! pagepool_broken`; see README.md): each test runs a whole-pool scenario
//! against one deliberately broken variant of the core, in a child
//! process, and passes only if shuttle finds a failing schedule with the
//! expected message.
#![cfg(all(shuttle, pagepool_broken))]

use pagepool_shuttle_tests::{expect_found, RX_LOOPS, SLOW_SOURCE};

/// `ring-push-after-close`: a pool's ring is drained at its drop (and at
/// unbind) but left open, so a page returned after the drain stays in it
/// forever. The page was unmapped (by unbind, through the tracker), so the
/// checker is content; the page source's count is not.
#[test]
fn broken_ring_push_after_close_is_found() {
    expect_found(
        "broken_ring_push_after_close_is_found",
        "ring-push-after-close",
        &["page memory leaked"],
        "rx_loops_holders_and_unbind",
        RX_LOOPS,
    );
}

/// `release-keeps-record`: a page leaving its pool (ring full, pool gone)
/// is unmapped without its tracker record being removed, so a later unbind
/// unmaps it again. The slow source keeps the page's metadata alive until
/// `on_unbind`, so unbind's second unmap reads live memory and the checker
/// reports the double unmap.
#[test]
fn broken_release_keeps_record_is_found() {
    expect_found(
        "broken_release_keeps_record_is_found",
        "release-keeps-record",
        &["double unmap"],
        "slow_page_source_while_unbinding",
        SLOW_SOURCE,
    );
}

/// `unbind-no-wait`: `unbind` does not wait for the device calls in
/// progress (a sync on recycle, a holder's `sync_for_cpu`, a map on the
/// slow path, the unmap of a page leaving its pool), so one of them takes
/// effect after `on_unbind`, or after unbind unmapped its page (a sync of
/// memory no longer mapped), or a mapping made meanwhile is still live
/// then. A real race: the failing schedule needs a thread inside a device
/// call when unbind goes past its waits.
#[test]
fn broken_unbind_no_wait_is_found() {
    expect_found(
        "broken_unbind_no_wait_is_found",
        "unbind-no-wait",
        &[
            "after the device was released (on_unbind)",
            "pending DMA allocations while released",
            "on DMA memory that is not mapped",
        ],
        "rx_loops_holders_and_unbind",
        RX_LOOPS,
    );
}
