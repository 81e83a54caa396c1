//! Model f: a full ring sending a page out of the pool (unmap and free)
//! while `unbind` runs.
#![cfg(loom)]

use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static FULL: Outcomes = Outcomes::new();
static BULK: Outcomes = Outcomes::new();

fn ring_full_racing_unbind(seen: Option<&'static Outcomes>) {
    let mut h = Harness::new();
    let mut pool = h.small_pool(); // ring of 1
    let first = pool.alloc().unwrap();
    let second = pool.alloc().unwrap();
    drop(first); // the ring is now full
    let t = spawn(move || drop(second)); // ring full: unmap + free
    let report = h.device.unbind().unwrap();
    h.unbound(&report);
    if let Some(seen) = seen {
        seen.saw(match (report.pages_from_rings, report.pages_in_flight) {
            (1, 0) => "second unmapped by its dropper (ring full or pool closing)",
            (1, 1) => "second held during unbind",
            other => panic!("unexpected report {other:?}"),
        });
    }
    t.join().unwrap();
    drop(pool);
    h.finish();
}

/// The ring holds one page (its capacity); another thread drops a second
/// page, which the full ring refuses, so it leaves the pool.
#[test]
fn full_ring_releases_while_unbinding() {
    model(|| ring_full_racing_unbind(Some(&FULL)));
    FULL.assert_seen(&[
        "second unmapped by its dropper (ring full or pool closing)",
        "second held during unbind",
    ]);
}

/// `put_bulk` of two pages into a ring of one: one goes in, the other
/// leaves the pool, under one ring lock, while `unbind` runs.
#[test]
fn bulk_put_overflows_while_unbinding() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h.small_pool();
        let pages = vec![pool.alloc().unwrap(), pool.alloc().unwrap()];
        let t = spawn(move || pagepool::put_bulk(pages));
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        BULK.saw(match (report.pages_from_rings, report.pages_in_flight) {
            (1, 0) => "one into the ring, one out of the pool",
            (1, 1) => "one into the ring, the other unmapped by unbind",
            (0, 2) => "both held during unbind",
            (0, 0) => "both released by the bulk put",
            other => panic!("unexpected report {other:?}"),
        });
        t.join().unwrap();
        drop(pool);
        h.finish();
    });
    BULK.assert_seen(&[
        "one into the ring, one out of the pool",
        "both held during unbind",
        "both released by the bulk put",
    ]);
}

/// The broken core unmaps a page leaving the pool without removing its
/// tracker record, so unbind unmaps it again: the checker records a double
/// unmap.
#[cfg(pagepool_broken)]
#[test]
fn broken_release_keeps_record_is_caught() {
    pagepool_loom_tests::expect_caught(
        "broken_release_keeps_record_is_caught",
        "release-keeps-record",
        "already unmapped (double unmap)",
        || model(|| ring_full_racing_unbind(None)),
    );
}
