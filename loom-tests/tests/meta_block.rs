//! Pages whose metadata share one block, freed on two threads.
//!
//! A refill of two pages places both metas in one block; the block is freed
//! by whichever thread frees the last of them. Here the pool is dropped, so
//! each page is released when it is dropped: one on another thread, one on
//! the main thread after `unbind`, which races the first.
#![cfg(loom)]

use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static SEEN: Outcomes = Outcomes::new();

#[test]
fn pages_of_one_block_freed_on_two_threads_racing_unbind() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h.refill_two_pool();
        let first = pool.alloc().unwrap();
        let second = pool.alloc().unwrap();
        assert_eq!(pool.stats().alloc.slow, 1, "one refill mapped both pages");
        drop(pool);
        let t = spawn(move || drop(first));
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        SEEN.saw(match report.pages_held_or_cached {
            2 => "both held during unbind",
            1 => "one released before unbind",
            other => panic!("unexpected report {other:?}"),
        });
        drop(second);
        t.join().unwrap();
        h.finish();
    });
    SEEN.assert_seen(&["both held during unbind", "one released before unbind"]);
}
