//! The last `Device` handle dropped inside one of the device's own
//! callbacks, racing page drops and the device's other handle.
//!
//! The ops wrap the checker ([`HookedOps`](pagepool_loom_tests::HookedOps)):
//! the first `unmap_batch`, on whichever thread, drops a `Device` handle it
//! was given before it unmaps. The model gives it one of the device's two
//! handles, fills a one-page ring, and then:
//!
//! - two threads each drop a page: the ring is full, so each release
//!   unmaps through the gate, and the first such unmap drops the hook's
//!   handle;
//! - the main thread lets go of the other handle: it drops it, or it
//!   unbinds explicitly and then drops it.
//!
//! Whoever lets go of the last handle unbinds. If that is the callback,
//! the unbind is deferred until the call returns; it then runs on that
//! thread, racing the other thread's release. An explicit unbind cannot
//! overlap a deferred one (a thread that can call `unbind` holds a handle,
//! so a callback's drop is not the last while it runs): the second model
//! checks that the explicit unbind waits for the callback that drops the
//! other handle (or drops it from its own ring drain), and that the drop
//! after it does nothing more.
//!
//! Every execution must end with the device unbound, every mapping
//! unmapped exactly once, `on_unbind` once, no device call after any thread
//! saw the device unbound, and every block freed once, never while mapped.
#![cfg(loom)]

use pagepool::checking::{CheckingDevice, CheckingStats};
use pagepool_loom_tests::{loom, model, spawn, Harness, Outcomes, UnmapHook};

static DROPPED: Outcomes = Outcomes::new();
static UNBOUND: Outcomes = Outcomes::new();

/// The counters after a thread's last step, if it saw the device unbound
/// (then no device call may follow).
fn after(checker: &CheckingDevice) -> Option<CheckingStats> {
    checker.is_unbound().then(|| checker.stats())
}

fn last_handle_race(explicit: bool, seen: &'static Outcomes) {
    let (h, hooks) = Harness::hooked(UnmapHook::DropDeviceThenUnmap);
    let (source, frees) = h.checked_source();
    let mut pool = h.one_page_ring_pool(source);
    let ringed = pool.alloc().unwrap();
    let pages = [pool.alloc().unwrap(), pool.alloc().unwrap()];
    drop(ringed); // the ring is full
    let Harness {
        checker, device, ..
    } = h;
    hooks.give_device(loom::sync::Arc::clone(&device));
    hooks.arm(None);
    let droppers = pages.map(|page| {
        let checker = checker.clone();
        spawn(move || {
            drop(page);
            after(&checker)
        })
    });
    let mut snapshots = Vec::new();
    let outcome = if explicit {
        device.unbind().expect("the only unbind that can run");
        snapshots.extend(after(&checker));
        assert!(snapshots.len() == 1, "unbound when unbind returns");
        drop(device);
        if hooks.fired_on() == Some(loom::thread::current().id()) {
            "explicit unbind; its own ring drain dropped the other handle"
        } else {
            "explicit unbind; a release's callback dropped the other handle"
        }
    } else {
        drop(device);
        match after(&checker) {
            Some(stats) => {
                snapshots.push(stats);
                "the main thread's drop was the last: unbound at once"
            }
            None => "the callback's drop was the last: unbind deferred",
        }
    };
    snapshots.extend(droppers.into_iter().filter_map(|t| t.join().unwrap()));
    assert!(checker.is_unbound(), "dropping the last handle unbound it");
    seen.saw(outcome);
    drop(pool);
    let stats = checker.stats();
    let report = checker.report();
    for at in snapshots {
        assert_eq!(at, stats, "a device call after unbind\n{report}");
    }
    assert_eq!(stats.violations, 0, "{report}");
    assert_eq!(stats.calls_after_unbind, 0, "{report}");
    assert_eq!(checker.live_mappings(), 0, "{report}");
    assert_eq!(stats.maps, 3);
    assert_eq!(stats.maps, stats.unmaps, "unmapped exactly once\n{report}");
    let mut freed: Vec<usize> = frees.all().iter().map(|f| f.block).collect();
    freed.sort_unstable();
    freed.dedup();
    assert_eq!(frees.all().len(), 3, "three blocks freed");
    assert_eq!(freed.len(), 3, "each once");
}

/// The main thread's drop races the callback's: whichever is last unbinds,
/// the callback's deferred to the end of its call.
#[test]
fn last_handle_dropped_in_a_callback_races_a_drop_and_a_release() {
    model(|| last_handle_race(false, &DROPPED));
    DROPPED.assert_seen(&[
        "the callback's drop was the last: unbind deferred",
        "the main thread's drop was the last: unbound at once",
    ]);
}

/// An explicit unbind racing the callback that drops the other handle.
#[test]
fn a_handle_dropped_in_a_callback_races_an_explicit_unbind() {
    model(|| last_handle_race(true, &UNBOUND));
    UNBOUND.assert_seen(&[
        "explicit unbind; its own ring drain dropped the other handle",
        "explicit unbind; a release's callback dropped the other handle",
    ]);
}

/// The broken core discards the refusal of an unbind inside the device's
/// own callback: the last handle is gone and the device stays bound.
#[cfg(pagepool_broken)]
#[test]
fn broken_drop_inside_callback_forgets_is_caught() {
    pagepool_loom_tests::expect_caught(
        "broken_drop_inside_callback_forgets_is_caught",
        "drop-inside-callback-forgets",
        &["dropping the last handle unbound it"],
        || model(|| last_handle_race(false, &DROPPED)),
    );
}
