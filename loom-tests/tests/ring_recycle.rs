//! A page recycled into the shared ring while `unbind` drains it.
#![cfg(loom)]

use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static REMOTE: Outcomes = Outcomes::new();
static DIRECT: Outcomes = Outcomes::new();

/// The ring already holds one page; another thread drops a second one into
/// it while `unbind` closes and drains it.
#[test]
fn remote_recycle_into_ring_while_draining() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h
            .device
            .pool_builder()
            .cache_size(2)
            .refill_batch(1)
            .ring_size(2)
            // Each drop straight into the ring (batched returns:
            // `remote_batch.rs`).
            .remote_batch(0)
            .build()
            .unwrap();
        let first = pool.alloc().unwrap();
        let second = pool.alloc().unwrap();
        drop(first); // into the ring
        let t = spawn(move || drop(second));
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        REMOTE.saw(
            match (report.pages_from_rings, report.pages_held_or_cached) {
                (2, 0) => "both drained from the ring",
                (1, 1) => "second held during unbind",
                (1, 0) => "second refused by the closed pool, released by its dropper",
                other => panic!("unexpected report {other:?}"),
            },
        );
        t.join().unwrap();
        drop(pool);
        h.finish();
    });
    REMOTE.assert_seen(&[
        "both drained from the ring",
        "second held during unbind",
        "second refused by the closed pool, released by its dropper",
    ]);
}

/// The owner recycles directly with a full cache, so the page goes to the
/// ring, on the owner's thread, while `unbind` drains the ring.
#[test]
fn direct_recycle_overflows_into_ring_while_draining() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h
            .device
            .pool_builder()
            .cache_size(1)
            .refill_batch(1)
            .ring_size(1)
            .build()
            .unwrap();
        let first = pool.alloc().unwrap();
        let second = pool.alloc().unwrap();
        pool.recycle_direct(first); // the cache is now full
        let t = spawn(move || {
            pool.recycle_direct(second); // cache full: into the ring
            pool
        });
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        DIRECT.saw(
            match (report.pages_from_rings, report.pages_held_or_cached) {
                (1, 1) => "pushed before the drain",
                // Also when the closed ring refused it: the gate is closed by
                // then, so the owner's release hands the page to unbind, which
                // unmaps it through the tracker and frees it at its end.
                (0, 2) => "still held (or cached) during unbind",
                // The owner saw the pool closed and released the page itself,
                // unmapping it through the still-open gate before unbind closed
                // it (the tracker's remove-once rule keeps that to one unmap).
                (0, 1) => "released by the owner before the gate closed",
                other => panic!("unexpected report {other:?}"),
            },
        );
        let mut pool = t.join().unwrap();
        assert_eq!(pool.alloc().unwrap_err(), pagepool::AllocError::Unbound);
        drop(pool);
        h.finish();
    });
    DIRECT.assert_seen(&[
        "pushed before the drain",
        "still held (or cached) during unbind",
        "released by the owner before the gate closed",
    ]);
}
