//! A page dropped from inside a device callback while another thread drops
//! a page too.
//!
//! The ops wrap the checker ([`HookedOps`](pagepool_loom_tests::HookedOps)):
//! the first `unmap_batch`, on whichever thread, drops a page it was given
//! BEFORE it unmaps. If that is `unbind`'s ring drain, the dropped page is
//! still recorded and mapped, the gate is closed, so it must be handed to
//! `unbind` (unmapped in step 4, freed in step 6), not freed at once. If it
//! is the other thread's release (its page left the full ring), the drop
//! nests a second gate hold inside the first, racing `unbind`'s close.
#![cfg(loom)]

use pagepool_loom_tests::{model, spawn, Harness, Outcomes, UnmapHook};

static REENTRANT: Outcomes = Outcomes::new();

fn reentrant_drop_racing_unbind(seen: Option<&'static Outcomes>) {
    let (mut h, hooks) = Harness::hooked(UnmapHook::DropPageThenUnmap);
    let (source, frees) = h.checked_source();
    let mut pool = h.one_page_ring_pool(source);
    let ringed = pool.alloc().unwrap();
    let given = pool.alloc().unwrap();
    let held = pool.alloc().unwrap();
    let given_block = given.as_slice().as_ptr().addr();
    drop(ringed); // the ring is full
    hooks.give_page(given);
    hooks.arm(None);
    let dropper = spawn(move || {
        drop(held); // ring full: released through the gate
        loom::thread::current().id()
    });
    let report = h.device.unbind().unwrap();
    h.unbound(&report);
    let unbinder = loom::thread::current().id();
    let dropper = dropper.join().unwrap();
    // unbind's ring drain always makes an `unmap_batch`, so the hook fired.
    let fired_on = hooks.fired_on().expect("the hook fired");
    let free = frees.of(given_block);
    assert_eq!(
        free.len(),
        1,
        "the page dropped in the callback is freed once"
    );
    let outcome = if fired_on == unbinder {
        assert_eq!(free[0].thread, Some(unbinder), "handed to unbind");
        "dropped inside unbind's unmap_batch: handed to unbind"
    } else {
        assert_eq!(fired_on, dropper);
        if free[0].thread == Some(dropper) {
            "dropped inside the release's unmap_batch: released by the nested hold"
        } else {
            "dropped inside the release's unmap_batch after the gate closed: handed to unbind"
        }
    };
    if let Some(seen) = seen {
        seen.saw(outcome);
    }
    drop(pool);
    h.finish();
}

/// Dropping a page from inside `unmap_batch` (re-entering the pool from a
/// device callback) while another thread's page leaves the pool.
#[test]
fn page_dropped_inside_unmap_batch_while_another_drops() {
    model(|| reentrant_drop_racing_unbind(Some(&REENTRANT)));
    REENTRANT.assert_seen(&[
        "dropped inside unbind's unmap_batch: handed to unbind",
        "dropped inside the release's unmap_batch: released by the nested hold",
        "dropped inside the release's unmap_batch after the gate closed: handed to unbind",
    ]);
}

/// The broken core frees a page handed to a running unbind at once: here,
/// the page dropped inside unbind's own ring drain, which is still mapped.
#[cfg(pagepool_broken)]
#[test]
fn broken_free_before_unbind_is_caught() {
    pagepool_loom_tests::expect_caught(
        "broken_free_before_unbind_is_caught",
        "free-before-unbind",
        &[pagepool_loom_tests::FREED_WHILE_MAPPED],
        || model(|| reentrant_drop_racing_unbind(None)),
    );
}
