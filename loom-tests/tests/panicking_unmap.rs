//! A backend whose `unmap_batch` panics during `unbind`, while another
//! thread drops a page.
//!
//! The ops wrap the checker ([`HookedOps`](pagepool_loom_tests::HookedOps)):
//! the first `unmap_batch` that `unbind` makes (ring drain, step 3) unmaps
//! and then panics. `unbind` must still finish every step (unmap what is
//! left through the tracker, `on_unbind`, retire the ops, free what it owns
//! and what was handed to it) and only then let the panic out.
#![cfg(loom)]

use pagepool_loom_tests::{
    model, quiet_hook_panics, spawn, Harness, HookPanic, Outcomes, UnmapHook,
};

static DROP: Outcomes = Outcomes::new();

/// Ring full (one page), one page cached, one held by a second thread that
/// drops it (ring full: released through the gate, or handed to unbind)
/// while the main thread unbinds and the backend panics in unbind's first
/// `unmap_batch`.
#[test]
fn unmap_panics_during_unbind_while_a_page_is_dropped() {
    quiet_hook_panics();
    model(|| {
        let (h, hooks) = Harness::hooked(UnmapHook::PanicAfterUnmap);
        let (source, frees) = h.checked_source();
        let mut pool = h.one_page_ring_pool(source);
        let ringed = pool.alloc().unwrap();
        let cached = pool.alloc().unwrap();
        let held = pool.alloc().unwrap();
        let held_block = held.as_slice().as_ptr().addr();
        drop(ringed); // the ring is full
        pool.recycle_direct(cached);
        let dropper = spawn(move || drop(held));

        hooks.arm(Some(loom::thread::current().id()));
        let device = &h.device;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| device.unbind()));
        let payload = result.expect_err("the backend's panic comes out of unbind");
        assert!(payload.is::<HookPanic>(), "the first panic, unchanged");
        let at_unbind = h.checker.stats();
        // Every step ran before the panic came out.
        assert_eq!(hooks.fired_on(), Some(loom::thread::current().id()));
        assert!(!h.device.is_bound());
        assert!(h.checker.is_unbound(), "on_unbind was called");
        assert!(hooks.retired(), "the ops were retired");
        assert_eq!(h.device.tracked_mappings(), 0);
        assert_eq!(h.checker.live_mappings(), 0, "{}", h.checker.report());
        assert_eq!(at_unbind.violations, 0, "{}", h.checker.report());
        assert_eq!(at_unbind.maps, 3);
        assert_eq!(
            at_unbind.unmaps, 3,
            "each page unmapped once, the panicking batch too"
        );

        dropper.join().unwrap();
        let free = frees.of(held_block);
        assert_eq!(free.len(), 1, "the dropped page is freed exactly once");
        DROP.saw(if free[0].thread == Some(loom::thread::current().id()) {
            "dropped page handed to the panicking unbind, freed by it"
        } else {
            "dropped page freed by its holder"
        });
        drop(pool);
        h.finish_with(at_unbind);
    });
    DROP.assert_seen(&[
        "dropped page handed to the panicking unbind, freed by it",
        "dropped page freed by its holder",
    ]);
}
