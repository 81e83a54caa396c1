//! The slow path mapping new pages while `unbind` runs.
//!
//! The slow path maps a refill batch one page per device call (one gate
//! hold each), so `unbind` waits for one `map`, never for the batch. Each
//! mapping is either made before unbind closes the gate (and then unmapped
//! by unbind, or by the owner returning its page) or never made. If the gate
//! closes mid-batch the allocation fails with `AllocError::Unbound`, and the
//! pages mapped before that stay recorded in the owner's cache for unbind to
//! unmap; allocation after unbind fails with `Unbound` too.
#![cfg(loom)]

use pagepool::AllocError;
use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static BATCH: Outcomes = Outcomes::new();

fn slow_path_racing_unbind(seen: Option<&'static Outcomes>) {
    let mut h = Harness::new();
    // Refill batch 2: one slow path maps two pages, one gate hold each.
    let mut pool = h.refill_two_pool();
    let owner = spawn(move || {
        let got = pool.alloc();
        let mapped = got.is_ok();
        match got {
            Ok(page) => drop(page),
            Err(e) => assert_eq!(
                e,
                AllocError::Unbound,
                "the slow path reached the device after unbind"
            ),
        }
        (pool, mapped)
    });
    let report = h.device.unbind().unwrap();
    let at_unbind = h.unbound(&report);
    let (mut pool, mapped) = owner.join().unwrap();
    if mapped {
        // Both pages of the batch were mapped before unbind closed the gate
        // (a batch cut short by unbind fails the allocation), and were
        // unmapped by unbind or (the dropped one) by the owner.
        assert_eq!(at_unbind.maps, 2, "{}", h.checker.report());
    } else {
        // The gate closed before the first map or between the two: at most
        // the first page was mapped, and it stays in the owner's cache,
        // recorded, for unbind to unmap.
        assert!(at_unbind.maps <= 1, "{}", h.checker.report());
        assert_eq!(report.pages_from_rings, 0);
        assert_eq!(
            report.pages_held_or_cached as u64,
            at_unbind.maps,
            "{}",
            h.checker.report()
        );
    }
    assert_eq!(
        at_unbind.unmaps,
        at_unbind.maps,
        "every mapping unmapped by the time unbind returned\n{}",
        h.checker.report()
    );
    assert_eq!(
        at_unbind.map_failures,
        0,
        "no map reached a closed device\n{}",
        h.checker.report()
    );
    if let Some(seen) = seen {
        seen.saw(
            match (
                mapped,
                at_unbind.maps,
                report.pages_from_rings,
                report.pages_held_or_cached,
            ) {
                (false, 0, 0, 0) => "never mapped: alloc failed with Unbound",
                (false, 1, 0, 1) => {
                    "one page mapped, then Unbound; unmapped from the cache by unbind"
                }
                (true, 2, 1, 1) => "mapped; dropped page drained from the ring",
                (true, 2, 0, 2) => "mapped; both unmapped through the tracker",
                (true, 2, 0, 1) => "mapped; dropped page released by the owner",
                other => panic!("unexpected {other:?}"),
            },
        );
    }
    assert_eq!(pool.alloc().unwrap_err(), AllocError::Unbound);
    assert_eq!(pool.alloc_frag(64).unwrap_err(), AllocError::Unbound);
    drop(pool);
    h.finish();
}

/// The owner's first allocation maps a batch of two pages while the main
/// thread unbinds.
#[test]
fn slow_path_mapping_while_unbinding() {
    model(|| slow_path_racing_unbind(Some(&BATCH)));
    BATCH.assert_seen(&[
        "never mapped: alloc failed with Unbound",
        "one page mapped, then Unbound; unmapped from the cache by unbind",
        "mapped; dropped page drained from the ring",
        "mapped; both unmapped through the tracker",
        "mapped; dropped page released by the owner",
    ]);
}

/// The broken core's unbind does not wait for the slow path's map call:
/// loom finds the execution where the second page is mapped while unbind
/// runs, so its mapping is still live at `on_unbind` (a leak) and its
/// unmap reaches the device afterwards.
#[cfg(pagepool_broken)]
#[test]
fn broken_unbind_no_wait_is_caught() {
    pagepool_loom_tests::expect_caught(
        "broken_unbind_no_wait_is_caught",
        "unbind-no-wait",
        pagepool_loom_tests::CALL_AFTER_UNBIND,
        || model(|| slow_path_racing_unbind(None)),
    );
}
