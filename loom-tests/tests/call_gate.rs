//! The call gate: device calls entering a pool's gate while `unbind` closes
//! it and waits for it to go idle.
//!
//! One thread syncs a page for the CPU (one device call, one gate hold) and
//! another drops a page that leaves the pool (its ring is full), whose
//! release removes the page's record and unmaps it in one gate hold, or,
//! once the gate is closed, hands the page to `unbind`. Page memory comes
//! from a [`CheckedSource`](pagepool_loom_tests::CheckedSource), which fails
//! the model if a block is freed while the device still has it mapped.
#![cfg(loom)]

use pagepool::SyncError;
use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static SYNC: Outcomes = Outcomes::new();
static RELEASE: Outcomes = Outcomes::new();

fn gate_racing_unbind(seen: Option<(&'static Outcomes, &'static Outcomes)>) {
    let mut h = Harness::new();
    let (source, frees) = h.checked_source();
    let mut pool = h.one_page_ring_pool(source);
    let filler = pool.alloc().unwrap();
    let mut synced = pool.alloc().unwrap();
    let dropped = pool.alloc().unwrap();
    let dropped_block = dropped.as_slice().as_ptr().addr();
    drop(filler); // the ring (capacity 1) is now full
    let syncer = spawn(move || {
        let result = synced.sync_for_cpu(0..64);
        (synced, result)
    });
    // Ring full: the drop releases the page through the gate.
    let dropper = spawn(move || {
        drop(dropped);
        loom::thread::current().id()
    });
    let report = h.device.unbind().unwrap();
    let at_unbind = h.unbound(&report);
    let unbinder = loom::thread::current().id();
    let (synced, result) = syncer.join().unwrap();
    let dropper = dropper.join().unwrap();

    // The filler was drained from the ring; the synced page was held.
    assert_eq!(report.pages_from_rings, 1);
    let sync = match result {
        Ok(()) => {
            assert_eq!(at_unbind.syncs_for_cpu, 1);
            "sync made before the gate closed"
        }
        Err(SyncError::Unbound) => {
            assert_eq!(at_unbind.syncs_for_cpu, 0);
            "sync refused: Unbound"
        }
        Err(e) => panic!("unexpected {e:?}"),
    };
    let free = frees.of(dropped_block);
    assert_eq!(free.len(), 1, "the dropped page is freed exactly once");
    let recorded_at_drain = match report.pages_held_or_cached {
        1 => false, // the synced page only
        2 => true,
        n => panic!("{n} pages in flight"),
    };
    let release = match (free[0].thread == Some(unbinder), recorded_at_drain) {
        (false, false) => "released by its holder: unmapped through the open gate",
        (true, true) => "handed to unbind: unmapped by it, freed at its end",
        (false, true) => "held through unbind's unmaps, freed by its holder after",
        (true, false) => panic!("unbind freed a page it did not unmap"),
    };
    assert!(free[0].thread == Some(unbinder) || free[0].thread == Some(dropper));
    if let Some((sync_seen, release_seen)) = seen {
        sync_seen.saw(sync);
        release_seen.saw(release);
    }
    drop(synced);
    drop(pool);
    h.finish();
}

/// A sync and a release through the gate, racing `unbind`.
#[test]
fn sync_and_release_racing_gate_close() {
    model(|| gate_racing_unbind(Some((&SYNC, &RELEASE))));
    SYNC.assert_seen(&["sync made before the gate closed", "sync refused: Unbound"]);
    RELEASE.assert_seen(&[
        "released by its holder: unmapped through the open gate",
        "handed to unbind: unmapped by it, freed at its end",
        "held through unbind's unmaps, freed by its holder after",
    ]);
}

/// The broken core's `CallGate::wait_idle` returns without waiting for the
/// calls in progress, so unbind goes on while the sync or the release is
/// inside its gate hold.
#[cfg(pagepool_broken)]
#[test]
fn broken_unbind_no_wait_is_caught() {
    pagepool_loom_tests::expect_caught(
        "broken_unbind_no_wait_is_caught",
        "unbind-no-wait",
        pagepool_loom_tests::CALL_AFTER_UNBIND,
        || model(|| gate_racing_unbind(None)),
    );
}

/// The broken core frees a page handed to a running unbind at once instead
/// of after unbind's unmaps: the page source sees a mapped block freed.
#[cfg(pagepool_broken)]
#[test]
fn broken_free_before_unbind_is_caught() {
    pagepool_loom_tests::expect_caught(
        "broken_free_before_unbind_is_caught",
        "free-before-unbind",
        &[pagepool_loom_tests::FREED_WHILE_MAPPED],
        || model(|| gate_racing_unbind(None)),
    );
}
