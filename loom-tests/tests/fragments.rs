//! Two fragments of one page dropped on two threads while `unbind` runs.
//! Whoever drops the last reference recycles the page.
#![cfg(loom)]

use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static LIVE: Outcomes = Outcomes::new();
static DROPPED: Outcomes = Outcomes::new();

/// The pool lives on: a third fragment forces it off the first page (so the
/// fragments hold its last references), mapping a second page.
#[test]
fn fragments_dropped_while_unbinding() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h.small_pool();
        let a = pool.alloc_frag(2048).unwrap();
        let b = pool.alloc_frag(2048).unwrap();
        let c = pool.alloc_frag(64).unwrap(); // finishes page 1, maps page 2
        assert_eq!(a.dma_addr().0 + 2048, b.dma_addr().0);
        assert_ne!(a.dma_addr().0 & !4095, c.dma_addr().0 & !4095);
        let ta = spawn(move || drop(a));
        let tb = spawn(move || drop(b));
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        LIVE.saw(
            match (report.pages_from_rings, report.pages_held_or_cached) {
                (1, 1) => "last fragment recycled page 1 into the ring first",
                (0, 2) => "fragments still held during unbind",
                (0, 1) => "last fragment released page 1 after the pool closed",
                other => panic!("unexpected report {other:?}"),
            },
        );
        ta.join().unwrap();
        tb.join().unwrap();
        assert_eq!(
            pool.alloc_frag(64).unwrap_err(),
            pagepool::AllocError::Unbound
        );
        drop(c);
        drop(pool);
        h.finish();
    });
    LIVE.assert_seen(&[
        "last fragment recycled page 1 into the ring first",
        "fragments still held during unbind",
        "last fragment released page 1 after the pool closed",
    ]);
}

/// The pool is dropped first (its bias is removed), so the fragments are
/// the page's only references; the last one releases it (the pool is
/// closed) while `unbind` runs.
#[test]
fn fragments_of_dropped_pool_while_unbinding() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h.small_pool();
        let a = pool.alloc_frag(2048).unwrap();
        let b = pool.alloc_frag(2048).unwrap();
        drop(pool);
        let ta = spawn(move || drop(a));
        let tb = spawn(move || drop(b));
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        assert_eq!(report.pools, 0);
        DROPPED.saw(match report.pages_held_or_cached {
            1 => "unmapped by unbind through the tracker",
            0 => "unmapped by the last fragment's thread",
            n => panic!("{n} pages in flight"),
        });
        ta.join().unwrap();
        tb.join().unwrap();
        h.finish();
    });
    DROPPED.assert_seen(&[
        "unmapped by unbind through the tracker",
        "unmapped by the last fragment's thread",
    ]);
}

static FINISH: Outcomes = Outcomes::new();

/// Four threads: the owner moves on from the fragment page (removing its
/// bias, mapping a new page) while the two fragments are dropped on two
/// other threads and the main thread unbinds. Whichever of the three brings
/// the count to zero recycles the page.
#[test]
fn owner_finishes_fragment_page_while_fragments_drop_and_unbind() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h.small_pool();
        let a = pool.alloc_frag(2048).unwrap();
        let b = pool.alloc_frag(2048).unwrap();
        let owner = spawn(move || {
            let c = pool.alloc_frag(64); // finishes page 1
            (pool, c)
        });
        let ta = spawn(move || drop(a));
        let tb = spawn(move || drop(b));
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        let (pool, c) = owner.join().unwrap();
        FINISH.saw(match &c {
            Ok(_) => "owner mapped a second page before unbind",
            Err(pagepool::AllocError::Unbound) => "owner's new page refused: unbound",
            Err(e) => panic!("unexpected {e:?}"),
        });
        ta.join().unwrap();
        tb.join().unwrap();
        drop(c);
        drop(pool);
        h.finish();
    });
    FINISH.assert_seen(&[
        "owner mapped a second page before unbind",
        "owner's new page refused: unbound",
    ]);
}
