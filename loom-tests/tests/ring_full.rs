//! A full ring sending a page out of the pool (unmap and free) while
//! `unbind` runs.
#![cfg(loom)]

use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static FULL: Outcomes = Outcomes::new();
static SLOW: Outcomes = Outcomes::new();
static BULK: Outcomes = Outcomes::new();

/// `slow_source`: the pool's page source takes memory back, on the
/// dropping thread, only once the device was released (see
/// `CheckedSource::slow_until_unbound`).
fn ring_full_racing_unbind(seen: Option<&'static Outcomes>, slow_source: bool) {
    let mut h = Harness::new();
    let mut pool = if slow_source {
        let (source, _) = h.checked_source();
        let source = source.slow_until_unbound(loom::thread::current().id());
        h.device
            .pool_builder()
            .cache_size(2)
            .refill_batch(1)
            .ring_size(1)
            .page_source(source)
            .build()
            .unwrap()
    } else {
        h.small_pool() // ring of 1
    };
    let first = pool.alloc().unwrap();
    let second = pool.alloc().unwrap();
    drop(first); // the ring is now full
    let t = spawn(move || drop(second)); // ring full: unmap + free
    let report = h.device.unbind().unwrap();
    h.unbound(&report);
    if let Some(seen) = seen {
        seen.saw(
            match (report.pages_from_rings, report.pages_held_or_cached) {
                (1, 0) => "second unmapped by its dropper (ring full or pool closing)",
                (1, 1) => "second held during unbind",
                other => panic!("unexpected report {other:?}"),
            },
        );
    }
    t.join().unwrap();
    drop(pool);
    h.finish();
}

/// The ring holds one page (its capacity); another thread drops a second
/// page, which the full ring refuses, so it leaves the pool.
#[test]
fn full_ring_releases_while_unbinding() {
    model(|| ring_full_racing_unbind(Some(&FULL), false));
    FULL.assert_seen(&[
        "second unmapped by its dropper (ring full or pool closing)",
        "second held during unbind",
    ]);
}

/// The same with a page source slow to take memory back: the page that
/// left the pool is freed only after unbind's tracker walk (and
/// `on_unbind`).
#[test]
fn full_ring_releases_to_a_slow_source_while_unbinding() {
    model(|| ring_full_racing_unbind(Some(&SLOW), true));
    SLOW.assert_seen(&[
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
        BULK.saw(
            match (report.pages_from_rings, report.pages_held_or_cached) {
                (1, 0) => "one into the ring, one out of the pool",
                (1, 1) => "one into the ring, the other unmapped by unbind",
                (0, 2) => "both held during unbind",
                (0, 0) => "both released by the bulk put",
                other => panic!("unexpected report {other:?}"),
            },
        );
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
/// unmap. With the slow source the page (and its metadata, which unbind
/// reads through the stale record) is still allocated when unbind gets to
/// it; with the fast one, loom may first reach an execution where the
/// dropper freed it already, and unbind's walk then reads freed memory,
/// which fails without a message to match.
#[cfg(pagepool_broken)]
#[test]
fn broken_release_keeps_record_is_caught() {
    pagepool_loom_tests::expect_caught(
        "broken_release_keeps_record_is_caught",
        "release-keeps-record",
        &["already unmapped (double unmap)"],
        || model(|| ring_full_racing_unbind(None, true)),
    );
}
