//! Model e: the slow path mapping new pages while `unbind` runs. The new
//! mappings are either made before unbind closes the gate (and then
//! unmapped by unbind) or never made; allocation after unbind fails with
//! `AllocError::Unbound`.
#![cfg(loom)]

use pagepool::AllocError;
use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static BATCH: Outcomes = Outcomes::new();

fn slow_path_racing_unbind(seen: Option<&'static Outcomes>) {
    let mut h = Harness::new();
    // Refill batch 2: one slow path maps two pages under one gate hold.
    let mut pool = h
        .device
        .pool_builder()
        .cache_size(2)
        .refill_batch(2)
        .ring_size(1)
        .build()
        .unwrap();
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
        // Both pages of the batch were mapped before unbind took the gate,
        // and were unmapped by it or (the dropped one) by the owner.
        assert_eq!(at_unbind.maps, 2);
    } else {
        assert_eq!(at_unbind.maps, 0, "a failed alloc maps nothing");
    }
    assert_eq!(at_unbind.unmaps, at_unbind.maps);
    if let Some(seen) = seen {
        seen.saw(
            match (mapped, report.pages_from_rings, report.pages_in_flight) {
                (false, 0, 0) => "never mapped: alloc failed with Unbound",
                (true, 1, 1) => "mapped; dropped page drained from the ring",
                (true, 0, 2) => "mapped; both unmapped through the tracker",
                (true, 0, 1) => "mapped; dropped page released by the owner",
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
        "mapped; dropped page drained from the ring",
        "mapped; both unmapped through the tracker",
        "mapped; dropped page released by the owner",
    ]);
}

/// The broken core's unbind does not wait for the slow path's gate hold:
/// loom finds a map or unmap after `on_unbind`, or a mapping made after
/// unbind drained the tracker.
#[cfg(pagepool_broken)]
#[test]
fn broken_unbind_no_wait_is_caught() {
    pagepool_loom_tests::expect_caught(
        "broken_unbind_no_wait_is_caught",
        "unbind-no-wait",
        "calls map after the device was released",
        || model(|| slow_path_racing_unbind(None)),
    );
}
