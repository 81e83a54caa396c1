//! A pool dropped while another thread returns a page, then the device
//! unbinds (CVE-2025-38129's shape: a recycle into the ring of a pool being
//! torn down).
#![cfg(loom)]

use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static MAIN: Outcomes = Outcomes::new();
static THREADS: Outcomes = Outcomes::new();

fn pool_drop_racing_return(seen: Option<&'static Outcomes>) {
    let mut h = Harness::new();
    let mut pool = h.small_pool();
    let out = pool.alloc().unwrap();
    let cached = pool.alloc().unwrap();
    pool.recycle_direct(cached); // one page in the owner's cache
    let t = spawn(move || drop(out));
    drop(pool); // releases the cache and closes the ring
    let report = h.device.unbind().unwrap(); // may still race the return
    h.unbound(&report);
    assert_eq!(report.pools, 0, "the dropped pool left the registry");
    if let Some(seen) = seen {
        seen.saw(match report.pages_held_or_cached {
            0 => "returned page released before unbind",
            1 => "returned page unmapped by unbind",
            n => panic!("{n} pages in flight"),
        });
    }
    t.join().unwrap();
    h.finish();
}

/// The main thread drops the pool and then unbinds while another thread
/// drops a page of that pool.
#[test]
fn pool_dropped_while_page_returns_then_unbind() {
    model(|| pool_drop_racing_return(Some(&MAIN)));
    MAIN.assert_seen(&[
        "returned page released before unbind",
        "returned page unmapped by unbind",
    ]);
}

/// The pool is dropped on one thread, a page returned on another, and the
/// main thread unbinds once the pool's thread is done.
#[test]
fn pool_dropped_on_one_thread_page_returned_on_another() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h.small_pool();
        let out = pool.alloc().unwrap();
        let returner = spawn(move || drop(out));
        let dropper = spawn(move || drop(pool));
        dropper.join().unwrap();
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        THREADS.saw(match report.pages_held_or_cached {
            0 => "returned page released before unbind",
            1 => "returned page unmapped by unbind",
            n => panic!("{n} pages in flight"),
        });
        returner.join().unwrap();
        h.finish();
    });
    THREADS.assert_seen(&[
        "returned page released before unbind",
        "returned page unmapped by unbind",
    ]);
}

/// The broken core's ring accepts a page after the pool's drop closed it:
/// nobody ever takes it out again, and loom's leak check reports the page
/// memory (and the pool's `Arc`, which the page keeps alive) as leaked.
#[cfg(pagepool_broken)]
#[test]
fn broken_ring_push_after_close_is_caught() {
    pagepool_loom_tests::expect_caught(
        "broken_ring_push_after_close_is_caught",
        "ring-push-after-close",
        &["leaked."],
        || model(|| pool_drop_racing_return(None)),
    );
}

static RACING: Outcomes = Outcomes::new();

/// The owner drops its pool (one page cached, one in the ring) on its own
/// thread while a third page is returned on another thread and the main
/// thread unbinds: pool teardown, page return and unbind all at once.
#[test]
fn pool_dropped_and_page_returned_while_unbinding() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h.small_pool();
        let out = pool.alloc().unwrap();
        let ringed = pool.alloc().unwrap();
        let cached = pool.alloc().unwrap();
        drop(ringed); // into the ring (capacity 1)
        pool.recycle_direct(cached); // into the cache
        let owner = spawn(move || drop(pool));
        let returner = spawn(move || drop(out));
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        RACING.saw(match (report.pools, report.pages_from_rings) {
            (0, 0) => "pool dropped before unbind",
            (1, 1) => "unbind drained the live pool's ring",
            (1, 0) => "pool's drop and unbind overlapped",
            other => panic!("unexpected report {other:?}"),
        });
        owner.join().unwrap();
        returner.join().unwrap();
        h.finish();
    });
    RACING.assert_seen(&[
        "pool dropped before unbind",
        "unbind drained the live pool's ring",
        "pool's drop and unbind overlapped",
    ]);
}
