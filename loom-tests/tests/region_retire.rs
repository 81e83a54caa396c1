//! Region-mapped pools: the last page of a region coming back while the
//! pool is dropped or the device unbinds. Whoever retires the last page
//! releases the region; it must be unmapped exactly once (by its releaser
//! or by `unbind`) and its memory freed exactly once, never while mapped.
#![cfg(loom)]

use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static UNBINDING: Outcomes = Outcomes::new();
static UNBINDING_CACHED: Outcomes = Outcomes::new();
static DROPPING: Outcomes = Outcomes::new();

/// A region of two pages; a thread drops one while the main thread unbinds,
/// then drops the pool. The other page sits in the spare list (drained by
/// `unbind`) or, with `cached`, in the owner's cache (which `unbind` leaves
/// to the pool's drop). The region is unmapped by `unbind` whatever
/// happens, and freed once by whoever retires its last page, or by `unbind`
/// when it was handed over; never while mapped (the source checks).
fn last_region_page_dropped_while_unbinding(cached: bool, seen: &'static Outcomes) {
    model(move || {
        let mut h = Harness::new();
        let (source, frees) = h.checked_regions();
        let mut pool = h.region_pool(source);
        let page = pool.alloc().unwrap();
        if cached {
            let other = pool.alloc().unwrap();
            pool.recycle_direct(other);
        }
        let holder = spawn(move || drop(page));
        let report = h.device.unbind().unwrap();
        let unbinder = loom::thread::current().id();
        h.unbound(&report);
        assert_eq!(report.regions_unmapped, 1, "{report}");
        let freed_by_unbind = frees.all().iter().any(|f| f.thread == Some(unbinder));
        holder.join().unwrap();
        drop(pool);
        let all = frees.all();
        assert_eq!(all.len(), 1, "the region freed exactly once: {all:?}");
        seen.saw(match (freed_by_unbind, all[0].thread == Some(unbinder)) {
            (true, _) => "both pages back before unbind finished: freed by it",
            (false, true) => "last page retired by the pool's drop",
            // Only once unbind had unmapped it (the free checks that).
            (false, false) => "last page retired by the holder",
        });
        h.finish();
    });
}

#[test]
fn last_region_page_dropped_while_unbinding_other_page_spare() {
    last_region_page_dropped_while_unbinding(false, &UNBINDING);
    UNBINDING.assert_seen(&[
        "both pages back before unbind finished: freed by it",
        "last page retired by the holder",
    ]);
}

#[test]
fn last_region_page_dropped_while_unbinding_other_page_cached() {
    last_region_page_dropped_while_unbinding(true, &UNBINDING_CACHED);
    // The holder is joined before the pool is dropped, so the cached page
    // is always the last one back.
    UNBINDING_CACHED.assert_seen(&["last page retired by the pool's drop"]);
}

/// The planted bug: a region whose last page comes back while `unbind`
/// runs is freed at once instead of being handed to `unbind`, so its
/// memory is freed while still mapped.
#[cfg(pagepool_broken)]
#[test]
fn broken_region_free_before_unbind_is_caught() {
    pagepool_loom_tests::expect_caught(
        "broken_region_free_before_unbind_is_caught",
        "region-free-before-unbind",
        &[pagepool_loom_tests::FREED_WHILE_MAPPED],
        || last_region_page_dropped_while_unbinding(false, &UNBINDING),
    );
}

/// No unbind meanwhile: the pool is dropped while a thread drops the
/// region's other page. Exactly one of them retires the last page and
/// releases the region: unmapped once, then freed once.
#[test]
fn last_region_page_dropped_while_the_pool_is_dropped() {
    model(|| {
        let mut h = Harness::new();
        let (source, frees) = h.checked_regions();
        let mut pool = h.region_pool(source);
        let page = pool.alloc().unwrap();
        let holder = spawn(move || drop(page));
        let owner = loom::thread::current().id();
        drop(pool);
        holder.join().unwrap();
        assert_eq!(h.checker.live_mappings(), 0, "the region was released");
        let all = frees.all();
        assert_eq!(all.len(), 1, "the region freed exactly once: {all:?}");
        DROPPING.saw(if all[0].thread == Some(owner) {
            "released by the pool's drop"
        } else {
            "released by the holder"
        });
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        assert_eq!(report.regions_unmapped, 0);
        h.finish();
    });
    DROPPING.assert_seen(&["released by the pool's drop", "released by the holder"]);
}
