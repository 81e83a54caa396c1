//! Sync-for-device on recycle racing `unbind`.
//!
//! The pool syncs 64 bytes for the device whenever a page is recycled
//! (`.sync_for_device(0, 64)`, bidirectional pages so the strict checker
//! allows it). The sync is a device call: it must happen before unbind
//! returns, on a live mapping, or not at all.
#![cfg(loom)]

use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static REMOTE: Outcomes = Outcomes::new();
static BOTH: Outcomes = Outcomes::new();

fn remote_sync_racing_unbind(seen: Option<&'static Outcomes>) {
    let mut h = Harness::new();
    let mut pool = h.sync_pool();
    let page = pool.alloc().unwrap();
    let t = spawn(move || drop(page)); // sync, then into the ring
    let report = h.device.unbind().unwrap();
    let at_unbind = h.unbound(&report);
    if let Some(seen) = seen {
        seen.saw(
            match (at_unbind.syncs_for_device, report.pages_from_rings) {
                (1, 1) => "synced, then drained from the ring",
                (1, 0) => "synced, then refused by the closing pool",
                (0, _) => "not synced: the pool was closing",
                other => panic!("unexpected {other:?}"),
            },
        );
    }
    t.join().unwrap();
    drop(pool);
    h.finish();
}

/// A page dropped on another thread is synced for the device, then pushed
/// into the ring, while the main thread unbinds.
#[test]
fn remote_recycle_sync_racing_unbind() {
    model(|| remote_sync_racing_unbind(Some(&REMOTE)));
    REMOTE.assert_seen(&[
        "synced, then drained from the ring",
        "synced, then refused by the closing pool",
        "not synced: the pool was closing",
    ]);
}

/// Both recycle paths sync at once: the owner recycles one page directly
/// (sync, into its cache) while another thread drops a second page (sync,
/// into the ring), and the main thread unbinds.
#[test]
fn direct_and_remote_sync_racing_unbind() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h.sync_pool();
        let mine = pool.alloc().unwrap();
        let theirs = pool.alloc().unwrap();
        let owner = spawn(move || {
            pool.recycle_direct(mine);
            pool
        });
        let other = spawn(move || drop(theirs));
        let report = h.device.unbind().unwrap();
        let at_unbind = h.unbound(&report);
        BOTH.saw(match at_unbind.syncs_for_device {
            0 => "no sync",
            1 => "one sync",
            2 => "both synced",
            n => panic!("{n} syncs for 2 recycles"),
        });
        let pool = owner.join().unwrap();
        other.join().unwrap();
        drop(pool);
        h.finish();
    });
    BOTH.assert_seen(&["no sync", "one sync", "both synced"]);
}

static DIRTY: Outcomes = Outcomes::new();

/// The dirty length is the page's owner's alone and lives in the page's
/// metadata (a checked `sync::UnsafeCell`): a holder on another thread
/// sets it and drops the page (the sync reads it and resets it) while the
/// owner allocates, and may take that very page back from the ring and
/// recycle it (its sync reads the field again). loom checks that every
/// access is ordered after the last by the hand-offs.
#[test]
fn dirty_length_travels_with_the_page_across_threads() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h.sync_pool();
        let mut page = pool.alloc().unwrap();
        let first = page.dma_addr();
        let holder = spawn(move || {
            page.set_dirty_len(8);
            drop(page); // sync of 8 bytes, then into the ring
        });
        let again = pool.alloc().unwrap();
        DIRTY.saw(if again.dma_addr() == first {
            "the owner took the page back from the ring"
        } else {
            "the owner mapped a fresh page"
        });
        pool.recycle_direct(again); // sync of the whole 64 bytes
        holder.join().unwrap();
        let report = h.device.unbind().unwrap();
        assert_eq!(h.unbound(&report).syncs_for_device, 2);
        drop(pool);
        h.finish();
    });
    DIRTY.assert_seen(&[
        "the owner took the page back from the ring",
        "the owner mapped a fresh page",
    ]);
}

/// The broken core's unbind does not wait for device calls in flight: loom
/// finds the execution where unbind retires the ops (`OpsCell::take`, a
/// write of the loom `UnsafeCell` holding them) while the recycling thread
/// is still inside its sync call through them (a read): a use of the ops
/// after they were dropped.
#[cfg(pagepool_broken)]
#[test]
fn broken_unbind_no_wait_is_caught() {
    pagepool_loom_tests::expect_caught(
        "broken_unbind_no_wait_is_caught",
        "unbind-no-wait",
        pagepool_loom_tests::CALL_AFTER_UNBIND,
        || model(|| remote_sync_racing_unbind(None)),
    );
}
