//! Per-thread batches of remote returns: pages a thread keeps back for its
//! pool race `unbind` and the pool's drop, and go home when the batch fills
//! or when the thread exits.
#![cfg(loom)]

use pagepool::PagePool;
use pagepool_loom_tests::{model, spawn, CheckedSource, Harness, Outcomes};

static EXIT: Outcomes = Outcomes::new();
static FULL: Outcomes = Outcomes::new();

/// A pool whose returns from other threads are batched two at a time:
/// cache 1, refill 1, ring 2 (the batch is at most the ring).
fn batching_pool(h: &Harness, source: CheckedSource) -> PagePool {
    h.device
        .pool_builder()
        .cache_size(1)
        .refill_batch(1)
        .ring_size(2)
        .remote_batch(2)
        .page_source(source)
        .build()
        .unwrap()
}

/// A thread drops a page (kept back: its batch of two is not full) and
/// exits, so its batch goes home from the thread-local's destructor, while
/// the main thread unbinds. Whether the page reached the ring before the
/// drain or was still kept back, it is unmapped once, freed once, after its
/// unmap, and nothing reaches the device after `unbind`.
#[test]
fn thread_exit_with_kept_back_pages_races_unbind() {
    model(|| thread_exit_racing_unbind(Some(&EXIT)));
    EXIT.assert_seen(&[
        "handed back at thread exit before the drain",
        "kept back during unbind, released at thread exit",
        "refused by the closed ring at thread exit, during unbind",
    ]);
}

/// The broken core forgets a thread's batch when the thread exits: the
/// page is never freed, and loom's leak check reports it.
#[cfg(pagepool_broken)]
#[test]
fn broken_remote_exit_forgets_is_caught() {
    pagepool_loom_tests::expect_caught(
        "broken_remote_exit_forgets_is_caught",
        "remote-exit-forgets",
        &["leaked."],
        || model(|| thread_exit_racing_unbind(None)),
    );
}

fn thread_exit_racing_unbind(seen: Option<&'static Outcomes>) {
    let mut h = Harness::new();
    let (source, _frees) = h.checked_source();
    // The free may run in the exiting thread's thread-local destructor.
    let mut pool = batching_pool(&h, source.without_threads());
    let page = pool.alloc().unwrap();
    let t = spawn(move || drop(page));
    let report = h.device.unbind().unwrap();
    h.unbound(&report);
    let outcome = match (report.pages_from_rings, report.pages_held_or_cached) {
        (1, 0) => "handed back at thread exit before the drain",
        (0, 1) => "kept back during unbind, released at thread exit",
        // The batch went home after unbind closed the ring and before
        // its walk: the exiting thread released the page, handing it to
        // unbind (which frees it after its unmaps).
        (0, 0) => "refused by the closed ring at thread exit, during unbind",
        other => panic!("unexpected report {other:?}"),
    };
    if let Some(seen) = seen {
        seen.saw(outcome);
    }
    t.join().unwrap();
    drop(pool);
    h.finish();
}

/// A thread's second drop fills its batch, which goes to the ring under one
/// lock, while the owner drops the pool: the batch lands in the open ring
/// (and leaves with it) or finds it closed (and is released by the thread).
/// Then the device unbinds with nothing of the pool left.
#[test]
fn a_full_batch_goes_home_while_the_pool_is_dropped() {
    model(|| {
        let mut h = Harness::new();
        let (source, frees) = h.checked_source();
        let mut pool = batching_pool(&h, source);
        let first = pool.alloc().unwrap();
        let second = pool.alloc().unwrap();
        let main = loom::thread::current().id();
        let t = spawn(move || {
            drop(first);
            drop(second); // the batch is full: both go to the ring
                          // If the pool closed between the two drops, `first` is still
                          // kept back: it goes home now, not from a thread-local's
                          // destructor (the first model covers that).
            pagepool::flush_thread_returns();
        });
        drop(pool);
        t.join().unwrap();
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        assert_eq!(report.pools, 0);
        assert_eq!(report.pages_held_or_cached, 0, "both pages left the pool");
        let all = frees.all();
        assert_eq!(all.len(), 2, "both pages freed, once");
        FULL.saw(if all.iter().all(|f| f.thread == Some(main)) {
            "pushed into the open ring, released by the pool's drop"
        } else {
            "refused by the closed ring, released by the returning thread"
        });
        h.finish();
    });
    FULL.assert_seen(&[
        "pushed into the open ring, released by the pool's drop",
        "refused by the closed ring, released by the returning thread",
    ]);
}
