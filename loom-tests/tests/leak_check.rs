//! Proves loom's leak detection works through this harness: a page that is
//! never given back (its handle forgotten) fails the model with loom's
//! "leaked" report, even though unbind unmapped it and the checker is
//! satisfied.
//!
//! loom reports a leak by panicking once the model closure has returned and
//! then aborts the process while dropping the leaked allocation's record,
//! so the model runs in a child process ([`expect_caught`]).
#![cfg(loom)]

use pagepool_loom_tests::{expect_caught, model, Harness};

#[test]
fn forgotten_page_is_reported_as_leaked() {
    expect_caught(
        "forgotten_page_is_reported_as_leaked",
        "none",
        &["leaked."],
        || {
            model(|| {
                let mut h = Harness::new();
                let mut pool = h.small_pool();
                let page = pool.alloc().unwrap();
                core::mem::forget(page);
                let report = h.device.unbind().unwrap();
                h.unbound(&report);
                drop(pool);
                h.finish(); // passes: the mapping itself was unmapped by unbind
            })
        },
    );
}
