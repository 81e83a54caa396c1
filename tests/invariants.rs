//! One or more tests per invariant of the crate (see README.md, and
//! `pagepool::design` for how each is kept):
//!
//! 1. Every mapping is unmapped exactly once.
//! 2. After `unbind` returns, no `DmaOps` method runs or will ever run again.
//! 3. `unbind` finishes in bounded time however many pages are held outside.
//! 4. Page memory is never freed, reused or handed out while still mapped.
//! 5. Pages held outside stay valid memory after unbind; dropping them later
//!    is safe and calls nothing on the device.
//! 6. Allocation after unbind fails with a clear error; nothing is leaked.
//!
//! Invariant 7 (whatever a callback does) has its own file,
//! `tests/callbacks.rs`.
//!
//! Each test checks the invariant with the `CheckingDevice` (Record mode:
//! zero violations, zero live mappings after unbind) and a counting page
//! source (every page freed exactly once, after its unmap).

mod support;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::Duration;

use pagepool::checking::Violation;
use pagepool::{
    AllocError, BuildError, Device, DmaDirection, Page, SyncError, UnbindReport, PAGE_SIZE,
};
use support::checks::{
    assert_unbound_clean, checker, slow_checker, CountingOps, GuardedPages, SpyOps,
};
use support::counting::CountingPages;
use support::rig::Rig;

// ---------------------------------------------------------------------------
// Invariant 1: every mapping is unmapped exactly once.
// ---------------------------------------------------------------------------

/// Pages leave by every exit there is (ring full, pool drop, unbind from the
/// ring, unbind from a cache, unbind while held) and each mapping is
/// unmapped once.
#[test]
fn inv1_every_exit_unmaps_each_mapping_once() {
    let rig = Rig::new();

    // Pool A: small ring, so drops from another thread overflow it.
    let mut a = rig
        .builder()
        .ring_size(4)
        .cache_size(16)
        .refill_batch(16)
        .build()
        .unwrap();
    let held_a: Vec<Page> = (0..16).map(|_| a.alloc().unwrap()).collect();
    let (dropped, held_a) = {
        let mut it = held_a.into_iter();
        let dropped: Vec<Page> = it.by_ref().take(10).collect();
        (dropped, it.collect::<Vec<_>>())
    };
    thread::spawn(move || drop(dropped)).join().unwrap();
    let s = a.stats();
    assert_eq!((s.recycle.ring, s.recycle.ring_full), (4, 6));
    assert_eq!(
        rig.checker.stats().unmaps,
        6,
        "ring-full pages left the pool"
    );

    // Pool B: dropped while pages are in its cache and some are held.
    let mut b = rig.builder().refill_batch(8).build().unwrap();
    let held_b: Vec<Page> = (0..3).map(|_| b.alloc().unwrap()).collect();
    drop(b); // 5 cached pages unmapped and freed
    assert_eq!(rig.checker.stats().unmaps, 11);
    assert_eq!(rig.checker.live_mappings(), 16 - 6 + 3);

    // Pool C: pages in the cache at unbind.
    let mut c = rig.builder().refill_batch(8).build().unwrap();
    let held_c = c.alloc().unwrap();

    let report = rig.device.unbind().unwrap();
    // Unbind reached: A's ring (4), A's held (6), B's held (3), C's cache (7)
    // and C's held page (1).
    assert_eq!(report.pages_from_rings, 4);
    assert_eq!(report.pages_held_or_cached, 6 + 3 + 7 + 1);
    assert_eq!(report.bytes_unmapped, (21 * PAGE_SIZE) as u64);
    assert_eq!(report.mappings_left, 0);
    assert_unbound_clean(&rig.checker);

    drop((held_a, held_b, held_c, a, c));
    assert_eq!(rig.checker.stats().maps, 16 + 8 + 8);
    rig.finish(());
}

/// With a plain counting backend (no checker): maps == unmaps, whatever the
/// mix of recycling, for pages of several orders.
#[test]
fn inv1_maps_equal_unmaps_with_counting_ops() {
    for order in [0, 1, 3] {
        let ops = CountingOps::default();
        let pages = CountingPages::default();
        let device = Device::new(ops.clone());
        let mut pool = device
            .pool_builder()
            .order(order)
            .ring_size(8)
            .page_source(pages.clone())
            .build()
            .unwrap();
        let mut held = Vec::new();
        for i in 0..200 {
            let page = pool.alloc().unwrap();
            match i % 4 {
                0 => pool.recycle_direct(page),
                1 => held.push(page),
                2 => drop(page),
                _ => {
                    let t = thread::spawn(move || drop(page));
                    t.join().unwrap();
                }
            }
        }
        device.unbind().unwrap();
        drop(held);
        drop(pool);
        assert_eq!(
            ops.maps.load(Ordering::SeqCst),
            ops.unmaps.load(Ordering::SeqCst),
            "order {order}"
        );
        pages.assert_all_freed_once();
    }
}

/// A page leaving its pool (ring full, so unmapped by the dropper) at the
/// same time as unbind: exactly one of them unmaps it.
#[test]
fn inv1_page_leaving_while_unbind_runs_is_unmapped_once() {
    for round in 0..40 {
        let delay = Duration::from_micros(if round % 2 == 0 { 0 } else { 50 });
        let rig = Rig::on(slow_checker(delay));
        let mut pool = rig.builder().ring_size(1).refill_batch(8).build().unwrap();
        let held: Vec<Page> = (0..8).map(|_| pool.alloc().unwrap()).collect();
        let barrier = Arc::new(Barrier::new(2));
        let dropper = {
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                drop(held); // 1 into the ring, 7 ring-full: unmapped here
            })
        };
        barrier.wait();
        if round % 3 == 0 {
            thread::yield_now();
        }
        let report = rig.device.unbind().unwrap();
        dropper.join().unwrap();
        assert!(report.pages_from_rings + report.pages_held_or_cached <= 8);
        rig.finish(pool);
    }
}

// ---------------------------------------------------------------------------
// Invariant 2: after unbind returns, no DmaOps method runs or will run again.
// ---------------------------------------------------------------------------

/// Everything a user can still do after unbind makes no device call: the
/// checker's counters do not move, the spy sees no call start.
#[test]
fn inv2_nothing_reaches_the_device_after_unbind() {
    let checker = checker();
    let (spy, state) = SpyOps::new(&checker);
    let pages = GuardedPages::new(&checker);
    let device = spy.into_device();
    let mut pool = device
        .pool_builder()
        .direction(DmaDirection::Bidirectional)
        .sync_for_device(0, 2048)
        .page_source(pages.clone())
        .build()
        .unwrap();
    let mut page = pool.alloc().unwrap();
    let mut kept = pool.alloc().unwrap();
    let other = pool.alloc().unwrap();
    let bulk: Vec<Page> = (0..5).map(|_| pool.alloc().unwrap()).collect();
    let mut frag = pool.alloc_frag(100).unwrap();
    let frag2 = pool.alloc_frag(100).unwrap();

    device.unbind().unwrap();
    assert_eq!(state.active(), 0, "a device call outlived unbind");
    assert!(state.dropped(), "unbind drops the ops");
    let after = checker.stats();

    // Reads, writes, syncs, recycling, allocation, bulk put, pool drop.
    page.as_mut_slice()[0] = 1;
    assert_eq!(page.as_slice()[0], 1);
    assert_eq!(page.sync_for_cpu(0..10), Err(SyncError::Unbound));
    assert_eq!(page.sync_for_device(0..10), Err(SyncError::Unbound));
    assert_eq!(frag.sync_for_cpu(0..10), Err(SyncError::Unbound));
    frag.as_mut_slice().fill(7);
    kept.set_dirty_len(10);
    pool.recycle_direct(kept);
    assert_eq!(pool.alloc().unwrap_err(), AllocError::Unbound);
    assert_eq!(pool.alloc_frag(64).unwrap_err(), AllocError::Unbound);
    thread::spawn(move || drop(other)).join().unwrap();
    pagepool::put_bulk(bulk);
    drop((page, frag, frag2));
    drop(pool);
    assert!(matches!(
        device.pool_builder().build(),
        Err(BuildError::Unbound)
    ));
    assert_eq!(
        device.unbind().unwrap_err(),
        pagepool::UnbindError::AlreadyUnbound
    );
    drop(device);

    assert_eq!(checker.stats(), after, "the device was called after unbind");
    assert_eq!(state.calls_after_unbind(), 0);
    assert_unbound_clean(&checker);
    pages.assert_all_freed_once_unmapped();
}

/// Device calls already running on other threads when unbind starts finish
/// before it returns; none starts afterwards. The checker's call delay keeps
/// calls in progress (slow-path maps, syncs, unmaps) while unbind runs.
#[test]
fn inv2_unbind_waits_for_running_calls_and_no_call_starts_after() {
    for round in 0..20 {
        let (rig, state) = Rig::spied_on(slow_checker(Duration::from_micros(200)));
        let mut pool = rig
            .builder()
            .direction(DmaDirection::Bidirectional)
            .sync_for_device(0, 256)
            .refill_batch(4)
            .ring_size(2)
            .build()
            .unwrap();
        let initial: Vec<Page> = (0..8).map(|_| pool.alloc().unwrap()).collect();
        let go = Arc::new(Barrier::new(3));

        // The owner keeps allocating (slow-path maps) until Unbound.
        let owner = {
            let go = Arc::clone(&go);
            thread::spawn(move || {
                go.wait();
                let mut out = Vec::new();
                loop {
                    match pool.alloc() {
                        Ok(p) => out.push(p),
                        Err(AllocError::Unbound) => break,
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                (pool, out)
            })
        };
        // A holder syncs and drops pages (sync-on-recycle, ring-full unmaps).
        let holder = {
            let go = Arc::clone(&go);
            thread::spawn(move || {
                go.wait();
                for mut p in initial {
                    let _ = p.sync_for_cpu(0..64);
                    drop(p);
                }
            })
        };
        go.wait();
        thread::sleep(Duration::from_micros(300 * (round % 4)));
        rig.device.unbind().unwrap();
        assert_eq!(state.active(), 0, "round {round}: a call outlived unbind");
        assert!(state.dropped());
        let (pool, out) = owner.join().unwrap();
        holder.join().unwrap();
        rig.finish((out, pool));
        assert_eq!(state.calls_after_unbind(), 0, "round {round}");
    }
}

// ---------------------------------------------------------------------------
// Invariant 3: unbind finishes in bounded time however many pages are held.
// ---------------------------------------------------------------------------

/// 100 000 pages held outside the pool: unbind returns, unmapping them all,
/// and counts them in its report. (No timing assertion: returning at all,
/// without anyone giving a page back, is the point.)
#[test]
fn inv3_unbind_with_100k_pages_held_outside_returns() {
    const HELD: usize = 100_000;
    let checker = checker();
    let pages = CountingPages::default();
    let device = Device::new(checker.clone());
    let mut pool = device
        .pool_builder()
        .page_source(pages.clone())
        .build()
        .unwrap();
    let held: Vec<Page> = (0..HELD).map(|_| pool.alloc().unwrap()).collect();
    let cached = pool.cached();
    assert_eq!(checker.live_mappings(), HELD + cached);

    let report = device.unbind().unwrap();
    assert_eq!(report.pages_held_or_cached, HELD + cached);
    assert_eq!(report.pages_from_rings, 0);
    assert_eq!(report.bytes_unmapped, ((HELD + cached) * PAGE_SIZE) as u64);
    assert_eq!(report.mappings_left, 0);
    assert_unbound_clean(&checker);
    assert_eq!(pages.live(), HELD + cached, "held pages stay valid memory");

    drop(held);
    drop(pool);
    pages.assert_all_freed_once();
}

/// Holders that never give their pages back while unbind runs (they wait
/// for unbind to finish first): unbind must not wait for them. A watchdog
/// turns a hang into a failure.
#[test]
fn inv3_unbind_does_not_wait_for_page_holders() {
    let rig = Rig::new();
    let mut pool = rig.pool();
    let (unbound_tx, unbound_rx) = mpsc::channel::<UnbindReport>();
    let mut holders = Vec::new();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
    for _ in 0..4 {
        let held: Vec<Page> = (0..50).map(|_| pool.alloc().unwrap()).collect();
        let release_rx = Arc::clone(&release_rx);
        holders.push(thread::spawn(move || {
            // Hold until told: only after unbind has returned.
            release_rx.lock().unwrap().recv().unwrap();
            assert!(held.iter().all(|p| p.as_slice().len() == PAGE_SIZE));
            drop(held);
        }));
    }
    let unbinder = {
        let device = Arc::clone(&rig.device);
        thread::spawn(move || unbound_tx.send(device.unbind().unwrap()).unwrap())
    };
    let report = unbound_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("unbind blocked on pages held outside (invariant 3)");
    unbinder.join().unwrap();
    assert_eq!(report.pages_held_or_cached, 200 + pool.cached());
    for _ in 0..4 {
        release_tx.send(()).unwrap();
    }
    for h in holders {
        h.join().unwrap();
    }
    rig.finish(pool);
}

/// A device call in progress (slow, 20 ms) is the only thing unbind waits
/// for: not the rest of the slow path's batch of four. It returns once that
/// one map is done, with that page unmapped; the owner's allocation then
/// fails with `Unbound`.
#[test]
fn inv3_unbind_waits_only_for_a_call_in_progress() {
    let (rig, state) = Rig::spied_on(slow_checker(Duration::ZERO));
    let mut pool = rig.device.pool_builder().refill_batch(4).build().unwrap();
    rig.checker.set_call_delay(Duration::from_millis(20));
    let (started_tx, started_rx) = mpsc::channel();
    let owner = thread::spawn(move || {
        started_tx.send(()).unwrap();
        let page = pool.alloc(); // four slow maps
        (pool, page)
    });
    started_rx.recv().unwrap();
    // Let the owner enter the gate (it is then inside a 20 ms map).
    while state.active() == 0 {
        thread::yield_now();
    }
    let report = rig.device.unbind().unwrap();
    assert_eq!(state.active(), 0);
    assert_eq!(
        rig.checker.stats().maps,
        1,
        "unbind waited for the map in progress, not for the batch"
    );
    let (pool, page) = owner.join().unwrap();
    assert_eq!(page.unwrap_err(), AllocError::Unbound);
    assert_eq!(
        report.pages_held_or_cached, 1,
        "the one page mapped before unbind"
    );
    rig.finish(pool);
}

// ---------------------------------------------------------------------------
// Invariant 4: page memory is never freed, reused or handed out while mapped.
// ---------------------------------------------------------------------------

/// Every way a page's memory is freed happens after its unmap: checked at
/// each free by `GuardedPages` against the checker's live mappings.
#[test]
fn inv4_memory_is_freed_only_after_unmap() {
    let rig = Rig::new();
    let mut pool = rig.builder().ring_size(2).refill_batch(8).build().unwrap();
    // Ring-full releases.
    let batch: Vec<Page> = (0..8).map(|_| pool.alloc().unwrap()).collect();
    thread::spawn(move || drop(batch)).join().unwrap();
    assert_eq!(rig.pages.counting.freed(), 6);
    // A map failure mid-batch frees the block it could not map.
    rig.checker.fail_next_maps(1);
    let more: Vec<Page> = (0..2).map(|_| pool.alloc().unwrap()).collect(); // the ring's two
    let err = pool.alloc().unwrap_err();
    assert!(matches!(err, AllocError::Map(_)), "{err:?}");
    assert_eq!(
        rig.pages.counting.freed(),
        7,
        "the unmapped block was freed"
    );
    // A dropped pool frees its cache; unbind frees its ring; held pages are
    // freed after unbind by their holders.
    let mut pool2 = rig.builder().refill_batch(4).build().unwrap();
    let p2 = pool2.alloc().unwrap();
    drop(pool2);
    let held: Vec<Page> = (0..3).map(|_| pool.alloc().unwrap()).collect();
    let to_ring = pool.alloc().unwrap();
    thread::spawn(move || drop(to_ring)).join().unwrap();
    rig.finish((held, more, p2, pool));
}

/// No page is handed to two holders at once, and page memory is never
/// reused while mapped: every page held at once has its own memory and its
/// own device address, and the checker saw no overlapping map.
#[test]
fn inv4_no_page_is_handed_out_twice_or_reused_while_mapped() {
    let rig = Rig::new();
    let mut pool = rig
        .builder()
        .ring_size(16)
        .cache_size(32)
        .refill_batch(8)
        .build()
        .unwrap();
    let mut rng = support::rng::Rng::new(4);
    let mut held: Vec<Page> = Vec::new();
    for _ in 0..3000 {
        if held.len() < 100 && !rng.one_in(3) {
            held.push(pool.alloc().unwrap());
        } else if !held.is_empty() {
            let i = rng.below(held.len() as u64) as usize;
            let page = held.swap_remove(i);
            match rng.below(3) {
                0 => pool.recycle_direct(page),
                1 => drop(page),
                _ => thread::spawn(move || drop(page)).join().unwrap(),
            }
        }
        let addrs: HashSet<_> = held.iter().map(|p| p.dma_addr()).collect();
        let cpus: HashSet<_> = held.iter().map(|p| p.as_slice().as_ptr()).collect();
        assert_eq!(addrs.len(), held.len(), "a device address handed out twice");
        assert_eq!(cpus.len(), held.len(), "page memory handed out twice");
    }
    let violations = rig.checker.violations();
    assert!(!violations
        .iter()
        .any(|v| matches!(v, Violation::MapOverlap { .. })));
    rig.finish((held, pool));
}

// ---------------------------------------------------------------------------
// Invariant 5: held pages stay valid memory after unbind; dropping them
// later is safe and calls nothing on the device.
// ---------------------------------------------------------------------------

/// A page, a fragment and (feature `bytes`) a `Bytes` written before
/// unbind keep their contents after it, can be read and written, and their
/// drop, on another thread, makes no device call and frees the memory.
#[test]
fn inv5_held_buffers_stay_valid_and_drop_silently() {
    let rig = Rig::new();
    let mut pool = rig
        .builder()
        .direction(DmaDirection::Bidirectional)
        .build()
        .unwrap();
    let mut page = pool.alloc().unwrap();
    page.as_mut_slice().fill(0xA5);
    let mut frag = pool.alloc_frag(300).unwrap();
    frag.as_mut_slice().fill(0x5A);
    #[cfg(feature = "bytes")]
    let bytes = {
        let mut p = pool.alloc().unwrap();
        p.as_mut_slice()[..4].copy_from_slice(b"ping");
        p.into_bytes().slice(0..4)
    };
    drop(pool); // the pool goes too: held buffers outlive it

    rig.device.unbind().unwrap();
    assert_unbound_clean(&rig.checker);
    let frozen = rig.checker.stats();
    let live_before = rig.pages.live();
    assert!(live_before >= 2, "held buffers are still allocated");

    assert!(page.as_slice().iter().all(|&b| b == 0xA5));
    page.as_mut_slice()[..3].copy_from_slice(b"new");
    assert_eq!(&page.as_slice()[..3], b"new");
    assert!(frag.as_slice().iter().all(|&b| b == 0x5A));
    frag.as_mut_slice()[0] = 1;
    #[cfg(feature = "bytes")]
    {
        assert_eq!(&bytes[..], b"ping");
        let clone = bytes.clone();
        thread::spawn(move || drop(bytes)).join().unwrap();
        assert_eq!(&clone[..], b"ping");
        drop(clone);
    }
    thread::spawn(move || {
        assert_eq!(&page.as_slice()[..3], b"new");
        drop(page);
        drop(frag);
    })
    .join()
    .unwrap();

    assert_eq!(rig.checker.stats(), frozen, "a device call after unbind");
    rig.finish(());
}

/// Same through `Device` drop (dropping the device unbinds it).
#[test]
fn inv5_pages_survive_device_drop() {
    let checker = checker();
    let pages = GuardedPages::new(&checker);
    let device = Device::new(checker.clone());
    let mut pool = device
        .pool_builder()
        .page_source(pages.clone())
        .build()
        .unwrap();
    let mut held: Vec<Page> = (0..10).map(|_| pool.alloc().unwrap()).collect();
    for (i, p) in held.iter_mut().enumerate() {
        p.as_mut_slice().fill(i as u8);
    }
    drop(device);
    assert_unbound_clean(&checker);
    let frozen = checker.stats();
    assert_eq!(pool.alloc().unwrap_err(), AllocError::Unbound);
    for (i, p) in held.iter().enumerate() {
        assert!(p.as_slice().iter().all(|&b| b == i as u8));
    }
    drop(held);
    drop(pool);
    assert_eq!(checker.stats(), frozen);
    pages.assert_all_freed_once_unmapped();
}

// ---------------------------------------------------------------------------
// Invariant 6: allocation after unbind fails with a clear error; nothing is
// leaked.
// ---------------------------------------------------------------------------

#[test]
fn inv6_alloc_after_unbind_is_a_clear_error_and_nothing_leaks() {
    let rig = Rig::new();
    let mut pool = rig.pool();
    let mut higher = rig.builder().order(2).build().unwrap();
    let held = pool.alloc().unwrap();
    let _frag = pool.alloc_frag(64).unwrap();
    let h = higher.alloc().unwrap();
    let report = rig.device.unbind().unwrap();
    assert_eq!(report.pools, 2);
    let frozen = rig.checker.stats();

    // With a full cache (fast path) and an empty one (slow path) alike.
    assert!(pool.cached() > 0);
    for _ in 0..3 {
        assert_eq!(pool.alloc().unwrap_err(), AllocError::Unbound);
        assert_eq!(higher.alloc().unwrap_err(), AllocError::Unbound);
        assert_eq!(pool.alloc_frag(10).unwrap_err(), AllocError::Unbound);
    }
    let msg = AllocError::Unbound.to_string();
    assert!(msg.contains("unbound"), "{msg}");
    let build = rig.device.pool_builder().build().unwrap_err();
    assert_eq!(build, BuildError::Unbound);
    assert!(build.to_string().contains("unbound"));
    assert!(!rig.device.is_bound());
    assert!(rig.device.pools().is_empty());
    assert_eq!(rig.device.tracked_mappings(), 0);
    assert_eq!(
        rig.checker.stats(),
        frozen,
        "a failed alloc called the device"
    );

    rig.finish((held, _frag, h, pool, higher));
}

/// After unbind and the last page's return, the pool's own accounting is
/// back to zero too.
#[test]
fn inv6_pool_accounting_is_zero_after_everything_returns() {
    let rig = Rig::new();
    let mut pool = rig.device.pool_builder().build().unwrap();
    let held: Vec<Page> = (0..5).map(|_| pool.alloc().unwrap()).collect();
    assert_eq!(pool.stats().pages_held, 5);
    rig.device.unbind().unwrap();
    let s = pool.stats();
    assert_eq!(s.pages_mapped, 0, "unbind unmapped everything");
    assert_eq!(s.pages_held, 5, "still held");
    drop(held);
    let s = pool.stats();
    assert_eq!(s.pages_held, 0);
    assert_eq!(s.recycle.released_closed, 5);
    rig.finish(());
}
