//! Callbacks that misbehave, and what the pool owes them.
//!
//! Every `DmaOps` and `PageSource` method is user code. These tests make
//! them panic (before or after doing their work), drop pages, fragments,
//! `Bytes` and whole pools from inside, call `Device::unbind` from inside,
//! and block, alone and while another thread unbinds the device. Each
//! scenario must finish (a watchdog turns a deadlock into a failure) and
//! leave everything clean: the `CheckingDevice` saw every mapping unmapped
//! exactly once and nothing after `on_unbind`, and the page source saw
//! every block freed exactly once and never while still mapped.
//!
//! The faults come from `support/faulty.rs`: `FaultyOps` around the
//! checking device and `FaultyPages` around the support tree's `GuardedPages`,
//! both driven by one `Faults` program per test.

mod support;

use std::ops::Deref;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::thread;
use std::time::Duration;

use pagepool::checking::{CheckMode, CheckingDevice, Violation};
use pagepool::{
    put_bulk, AllocError, Device, DmaDirection, Page, PagePool, PagePoolBuilder, SyncError,
    UnbindError, UnbindReport,
};
use support::checks::{assert_unbound_clean, checker, has_violation};
use support::counting::CountingPages;
use support::faulty::{injected, wait_until, watchdog, Call, Faults, FaultyOps, FaultyPages, When};
use support::rig::Rig;

// ---------------------------------------------------------------------------
// The rig: the support tree's, with its device over FaultyOps, pools over
// FaultyPages, one program.
// ---------------------------------------------------------------------------

struct FaultRig {
    rig: Rig,
    faults: Arc<Faults>,
}

/// `checker`, `pages` and `device` are the support rig's. (Its pools take
/// their pages through the program: build them with [`FaultRig::builder`],
/// not the support rig's `pool`.)
impl Deref for FaultRig {
    type Target = Rig;

    fn deref(&self) -> &Rig {
        &self.rig
    }
}

impl FaultRig {
    /// A `Record`-mode checker that accepts for-device syncs of
    /// `FromDevice` pages (sync on recycle).
    fn new() -> Self {
        let checker = checker();
        let faults = Faults::new();
        let ops = FaultyOps::new(&checker, &faults);
        let check = ops.check();
        Self {
            rig: Rig::over(checker, ops, check),
            faults,
        }
    }

    fn source(&self) -> FaultyPages {
        FaultyPages::new(&self.pages, &self.faults)
    }

    /// Pools whose page source is under the program too.
    fn builder(&self) -> PagePoolBuilder<'_> {
        self.device.pool_builder().page_source(self.source())
    }

    fn weak(&self) -> Weak<Device> {
        Arc::downgrade(&self.device)
    }

    /// After unbind, with every page and pool dropped: no violation, no
    /// live mapping, maps == unmaps, `on_unbind` made and nothing after it;
    /// every block freed exactly once and never while mapped.
    #[track_caller]
    fn assert_clean(&self) {
        assert!(!self.device.is_bound(), "the device is unbound");
        assert_unbound_clean(&self.checker);
        assert!(
            self.checker.verdict().is_clean(),
            "{}",
            self.checker.report()
        );
        assert_eq!(
            self.faults.lost_blocks(),
            0,
            "a free_pages panicked: account for it with free_lost"
        );
        self.pages.assert_all_freed_once_unmapped();
    }
}

impl Drop for FaultRig {
    fn drop(&mut self) {
        // Rules that never ran may own pages (whose pools own the program):
        // drop them so nothing outlives the test.
        self.faults.clear();
    }
}

fn is_bound(device: &Weak<Device>) -> bool {
    device.upgrade().is_some_and(|d| d.is_bound())
}

/// Pages a pool holds in a test: fewer under Miri, which is slow.
const HELD: usize = if cfg!(miri) { 70 } else { 300 };

// ---------------------------------------------------------------------------
// 1. A page source that panics in the middle of a slow-path batch.
// ---------------------------------------------------------------------------

fn batch_pool(rig: &FaultRig) -> PagePool {
    rig.builder()
        .cache_size(4)
        .refill_batch(4)
        .ring_size(4)
        .build()
        .unwrap()
}

#[test]
fn alloc_pages_panic_mid_batch_leaks_nothing_and_the_pool_stays_usable() {
    let rig = FaultRig::new();
    let mut pool = batch_pool(&rig);
    rig.faults.panic_on(Call::AllocPages, 2);
    let payload = catch_unwind(AssertUnwindSafe(|| pool.alloc()))
        .expect_err("the page source's panic reaches the caller of alloc");
    assert_eq!(injected(&*payload), Some(Call::AllocPages));
    // The batch stopped at its second page: one page allocated, mapped and
    // cached; nothing half-made.
    assert_eq!(rig.checker.stats().maps, 1);
    assert_eq!(rig.pages.counting.allocated(), 1);
    assert_eq!(pool.cached(), 1);
    assert_eq!(pool.stats().pages_mapped, 1);

    // The pool works on: the cached page, then a full slow-path batch.
    let pages: Vec<Page> = (0..3).map(|_| pool.alloc().unwrap()).collect();
    assert_eq!(rig.checker.stats().maps, 5);
    let report = rig.device.unbind().unwrap();
    assert_eq!(report.pages_held_or_cached, 5, "3 held + 2 cached");
    assert_eq!(rig.checker.live_mappings(), 0);
    drop(pages);
    drop(pool);
    rig.assert_clean();
}

#[test]
fn alloc_pages_panic_unwinding_through_the_pool_and_its_pages_aborts_nothing() {
    let rig = FaultRig::new();
    // The first batch maps 4 pages; the second batch panics at its second
    // page, with pages of the first held by the closure's locals.
    rig.faults.panic_on(Call::AllocPages, 6);
    let payload = catch_unwind(AssertUnwindSafe(|| {
        let mut pool = batch_pool(&rig);
        let held: Vec<Page> = (0..4).map(|_| pool.alloc().unwrap()).collect();
        let more = pool.alloc();
        unreachable!("the allocation panicked: {held:?} {more:?}");
    }))
    .expect_err("the page source's panic reaches the caller");
    assert_eq!(injected(&*payload), Some(Call::AllocPages));
    // Unwinding dropped the held pages (into the ring, no sync while
    // panicking) and then the pool, which released everything.
    assert_eq!(rig.checker.stats().maps, 5);
    assert_eq!(rig.checker.live_mappings(), 0);
    assert_eq!(rig.pages.live(), 0, "everything went back to the source");
    rig.device.unbind().unwrap();
    rig.assert_clean();
}

/// `alloc_bulk` across slow-path batches whose page source drops a page
/// (a re-entrant return) and then panics: the pages already appended stay
/// the caller's, mapped and tracked; the batch keeps what it mapped; the
/// page dropped from inside the callback comes home; the pool works on.
#[test]
fn alloc_bulk_keeps_what_it_appended_when_the_page_source_returns_pages_or_panics() {
    let rig = FaultRig::new();
    let mut pool = batch_pool(&rig);
    let early = pool.alloc().unwrap(); // page source calls 1-4
    rig.faults
        .run_on(Call::AllocPages, 5, When::Before, move || drop(early));
    rig.faults.panic_on(Call::AllocPages, 7);
    let mut pages = Vec::new();
    let payload = catch_unwind(AssertUnwindSafe(|| pool.alloc_bulk(&mut pages, 10)))
        .expect_err("the page source's panic reaches the caller of alloc_bulk");
    assert_eq!(injected(&*payload), Some(Call::AllocPages));
    // 3 from the cache were appended; the second batch mapped 2 pages
    // (calls 5 and 6) before its third call panicked: they stay cached.
    assert_eq!(pages.len(), 3, "what was appended stays appended");
    assert_eq!(pool.cached(), 2);
    assert_eq!(rig.checker.live_mappings(), 6);
    assert_eq!(rig.device.tracked_mappings(), 6);

    // The pool works on: the 2 cached, the page dropped in the callback
    // (back through the ring), then a fresh batch.
    assert_eq!(pool.alloc_bulk(&mut pages, 4), Ok(4));
    assert_eq!(rig.checker.stats().maps, 6 + 4);
    let mut addrs: Vec<_> = pages.iter().map(|p| p.dma_addr()).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 7, "no page handed out twice");
    let report = rig.device.unbind().unwrap();
    assert_eq!(report.pages_held_or_cached, 10, "7 held + 3 cached");
    drop(pages);
    drop(pool);
    rig.assert_clean();
}

// ---------------------------------------------------------------------------
// 2. A `map` that panics in the middle of a slow-path batch.
// ---------------------------------------------------------------------------

#[test]
fn map_panic_mid_batch_returns_the_block_and_leaks_nothing() {
    let rig = FaultRig::new();
    let mut pool = batch_pool(&rig);
    rig.faults.panic_on(Call::Map, 2);
    let payload = catch_unwind(AssertUnwindSafe(|| pool.alloc()))
        .expect_err("map's panic reaches the caller of alloc");
    assert_eq!(injected(&*payload), Some(Call::Map));
    // The panicking map counts as mapping nothing: its block went straight
    // back to the source; the first page stays cached and mapped.
    assert_eq!(rig.checker.stats().maps, 1);
    assert_eq!(rig.pages.counting.allocated(), 2);
    assert_eq!(rig.pages.counting.freed(), 1, "the block of the failed map");
    assert_eq!(rig.pages.live(), 1);
    assert_eq!(rig.checker.live_mappings(), 1);
    assert_eq!(rig.device.tracked_mappings(), 1);
    assert_eq!(pool.cached(), 1);

    let pages: Vec<Page> = (0..3).map(|_| pool.alloc().unwrap()).collect();
    let report = rig.device.unbind().unwrap();
    assert_eq!(report.pages_held_or_cached, 5);
    drop(pages);
    drop(pool);
    rig.assert_clean();
}

#[test]
fn map_panic_unwinding_through_the_pool_aborts_nothing() {
    let rig = FaultRig::new();
    rig.faults.panic_on(Call::Map, 6);
    let payload = catch_unwind(AssertUnwindSafe(|| {
        let mut pool = batch_pool(&rig);
        let held: Vec<Page> = (0..4).map(|_| pool.alloc().unwrap()).collect();
        let more = pool.alloc();
        unreachable!("the allocation panicked: {held:?} {more:?}");
    }))
    .expect_err("map's panic reaches the caller");
    assert_eq!(injected(&*payload), Some(Call::Map));
    assert_eq!(rig.checker.stats().maps, 5);
    assert_eq!(rig.checker.live_mappings(), 0);
    assert_eq!(rig.pages.live(), 0);
    rig.device.unbind().unwrap();
    rig.assert_clean();
}

// ---------------------------------------------------------------------------
// 3. Callbacks that panic during unbind, with many pages held outside.
// ---------------------------------------------------------------------------

/// A pool with `HELD` pages mapped: `in_ring` of them dropped into the
/// ring, the rest returned held; some more sit in the cache.
fn hold_pages(rig: &FaultRig, in_ring: usize) -> (PagePool, Vec<Page>) {
    let mut pool = rig
        .builder()
        .cache_size(64)
        .refill_batch(64)
        .ring_size(64)
        .build()
        .unwrap();
    let mut held: Vec<Page> = (0..HELD).map(|_| pool.alloc().unwrap()).collect();
    drop(held.drain(..in_ring));
    pagepool::flush_thread_returns();
    assert_eq!(pool.stats().recycle.ring, in_ring as u64);
    (pool, held)
}

/// Runs `unbind` expecting the injected panic of `call` to come out of it.
fn unbind_expecting_panic(rig: &FaultRig, call: Call) {
    let payload = catch_unwind(AssertUnwindSafe(|| rig.device.unbind()))
        .expect_err("the callback's panic comes out of unbind");
    assert_eq!(
        injected(&*payload),
        Some(call),
        "unbind resumes the original payload"
    );
}

/// What must hold after an unbind that panicked: it still did everything,
/// and the device is gone for good.
fn assert_unbind_completed(rig: &FaultRig, pool: &PagePool, mut held: Vec<Page>) {
    assert!(!rig.device.is_bound());
    assert!(rig.checker.is_unbound(), "on_unbind was made");
    assert_eq!(rig.device.unbind(), Err(UnbindError::AlreadyUnbound));
    assert!(
        !has_violation(&rig.checker, |v| matches!(v, Violation::DoubleUnmap { .. })),
        "{}",
        rig.checker.report()
    );
    assert!(
        rig.checker.violations().is_empty(),
        "{}",
        rig.checker.report()
    );
    assert_eq!(rig.checker.live_mappings(), 0, "every mapping unmapped");
    let stats = rig.checker.stats();
    assert_eq!(stats.maps, stats.unmaps, "each exactly once");
    assert_eq!(rig.device.tracked_mappings(), 0);

    let calls = rig.checker.stats();
    let device_calls = rig.faults.device_calls();
    for page in &mut held {
        assert_eq!(page.sync_for_cpu(0..64), Err(SyncError::Unbound));
    }
    assert_eq!(rig.checker.stats(), calls, "the syncs reached no device");
    let pool_stats = pool.stats();
    assert_eq!(pool_stats.pages_mapped, 0);
    // Held pages are still valid memory for their holders.
    held[0].as_mut_slice()[0] = 0xA5;
    assert_eq!(held[0].as_slice()[0], 0xA5);

    drop(held);
    assert_eq!(rig.checker.stats(), calls, "dropping pages called nothing");
    assert_eq!(rig.faults.device_calls(), device_calls);
}

#[test]
fn unbind_survives_a_panicking_first_unmap_batch() {
    let rig = FaultRig::new();
    let (pool, held) = hold_pages(&rig, 0);
    rig.faults
        .panic_on(Call::UnmapBatch, rig.faults.next(Call::UnmapBatch));
    unbind_expecting_panic(&rig, Call::UnmapBatch);
    assert!(
        rig.faults.calls(Call::UnmapBatch) > 1,
        "the unmaps went on after the panicking batch"
    );
    assert_unbind_completed(&rig, &pool, held);
    drop(pool);
    rig.assert_clean();
}

#[test]
fn unbind_survives_every_unmap_batch_panicking() {
    let rig = FaultRig::new();
    let (pool, held) = hold_pages(&rig, 10);
    rig.faults.every(Call::UnmapBatch, When::After, || {
        std::panic::panic_any(support::faulty::Injected(Call::UnmapBatch))
    });
    unbind_expecting_panic(&rig, Call::UnmapBatch);
    assert_unbind_completed(&rig, &pool, held);
    drop(pool);
    rig.assert_clean();
}

#[test]
fn unbind_survives_a_panicking_on_unbind() {
    let rig = FaultRig::new();
    let (pool, held) = hold_pages(&rig, 10);
    rig.faults.panic_on(Call::OnUnbind, 1);
    unbind_expecting_panic(&rig, Call::OnUnbind);
    assert_eq!(rig.faults.calls(Call::OnUnbind), 1);
    assert_unbind_completed(&rig, &pool, held);
    drop(pool);
    rig.assert_clean();
}

#[test]
fn unbind_survives_a_panicking_free_pages() {
    let rig = FaultRig::new();
    let (pool, held) = hold_pages(&rig, 10);
    let source = rig.source();
    let frees = rig.faults.calls(Call::FreePages);
    rig.faults
        .panic_on(Call::FreePages, rig.faults.next(Call::FreePages));
    unbind_expecting_panic(&rig, Call::FreePages);
    assert_eq!(
        rig.faults.calls(Call::FreePages) - frees,
        10,
        "every ring page's free was attempted, the panicking one once"
    );
    assert_eq!(rig.faults.lost_blocks(), 1);
    assert_unbind_completed(&rig, &pool, held);
    drop(pool);
    let counting = &rig.pages.counting;
    assert_eq!(counting.double_frees(), 0);
    assert_eq!(
        counting.allocated() - counting.freed(),
        1,
        "exactly the block whose free_pages panicked is unfreed"
    );
    assert_eq!(source.free_lost(), 1);
    rig.assert_clean();
}

/// Untracked, pages held outside stay mapped at unbind: a `Panic`-mode
/// checker panics from `on_unbind` (the leak `Untracked` documents), and
/// unbind still retires the ops.
#[test]
// The leak is on purpose; Miri's leak check would report it.
#[cfg_attr(miri, ignore)]
fn untracked_unbind_panics_from_on_unbind_yet_retires_the_ops() {
    let checker = CheckingDevice::new(CheckMode::Panic);
    let device = Device::new_untracked(checker.clone());
    let pages = CountingPages::default();
    let mut pool = device
        .pool_builder()
        .cache_size(1)
        .refill_batch(1)
        .page_source(pages.clone())
        .build()
        .unwrap();
    let mut held = pool.alloc().unwrap();
    let payload = catch_unwind(AssertUnwindSafe(|| device.unbind()))
        .expect_err("the checker panics from on_unbind");
    let message = payload
        .downcast_ref::<String>()
        .expect("the checker panics with its report");
    assert!(
        message.contains("pending DMA allocations"),
        "unexpected panic: {message}"
    );
    assert!(checker.is_unbound());
    assert!(!device.is_bound());
    assert_eq!(device.unbind(), Err(UnbindError::AlreadyUnbound));
    assert!(matches!(
        checker.violations()[..],
        [Violation::Leak { count: 1, .. }]
    ));

    let calls = checker.stats();
    assert_eq!(held.sync_for_cpu(0..64), Err(SyncError::Unbound));
    drop(held);
    drop(pool);
    assert_eq!(checker.stats(), calls, "the ops are retired: no call");
    assert_eq!(checker.stats().calls_after_unbind, 0);
    assert_eq!(device.leaked_pages(), 1);
    assert_eq!(
        pages.live(),
        1,
        "the still-mapped page is leaked, not freed"
    );
    assert_eq!(pages.double_frees(), 0);
}

// ---------------------------------------------------------------------------
// 4. Dropping pages, fragments, `Bytes` and pools from inside callbacks.
// ---------------------------------------------------------------------------

/// The callback a handle is dropped from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Map,
    /// Of a pool being dropped.
    UnmapBatch,
    /// The first one `unbind` makes (draining a ring).
    UnmapBatchInUnbind,
    SyncForCpu,
    SyncForDevice,
    OnUnbind,
    AllocPages,
    /// Of a pool being dropped.
    FreePages,
    /// The first one `unbind` makes (a page drained from a ring).
    FreePagesInUnbind,
}

impl Hook {
    fn call(self) -> Call {
        match self {
            Hook::Map => Call::Map,
            Hook::UnmapBatch | Hook::UnmapBatchInUnbind => Call::UnmapBatch,
            Hook::SyncForCpu => Call::SyncForCpu,
            Hook::SyncForDevice => Call::SyncForDevice,
            Hook::OnUnbind => Call::OnUnbind,
            Hook::AllocPages => Call::AllocPages,
            Hook::FreePages | Hook::FreePagesInUnbind => Call::FreePages,
        }
    }

    /// `map`, `alloc_pages` and `free_pages` act before delegating, the
    /// rest after.
    fn when(self) -> When {
        match self {
            Hook::Map | Hook::AllocPages | Hook::FreePages | Hook::FreePagesInUnbind => {
                When::Before
            }
            _ => When::After,
        }
    }

    /// Whether `unbind` itself makes the call (the trigger is `unbind`).
    fn in_unbind(self) -> bool {
        matches!(
            self,
            Hook::OnUnbind | Hook::UnmapBatchInUnbind | Hook::FreePagesInUnbind
        )
    }

    /// Whether the trigger is `alloc` on pool A (so A cannot be the victim).
    fn allocates(self) -> bool {
        matches!(self, Hook::Map | Hook::AllocPages)
    }

    /// Whether the callback is a device call made outside `unbind`, which
    /// a concurrent `unbind` must wait for.
    fn inside_device_call(self) -> bool {
        matches!(
            self,
            Hook::Map | Hook::UnmapBatch | Hook::SyncForCpu | Hook::SyncForDevice
        )
    }
}

/// What the callback drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Page,
    Frag,
    Pool,
    /// A page turned into `bytes::Bytes`.
    #[cfg(feature = "bytes")]
    Bytes,
}

fn victims() -> Vec<Victim> {
    #[allow(unused_mut)]
    let mut v = vec![Victim::Page, Victim::Frag, Victim::Pool];
    #[cfg(feature = "bytes")]
    v.push(Victim::Bytes);
    v
}

/// One case: `hook` drops a `victim`; with `concurrent`, the callback first
/// waits until another thread has begun to unbind the device.
fn reentrant_drop(hook: Hook, victim: Victim, concurrent: bool) {
    let rig = FaultRig::new();
    // Pool A syncs pages on recycle, so a page dropped inside a callback
    // makes a nested device call of its own.
    let mut a = rig
        .builder()
        .cache_size(4)
        .refill_batch(1)
        .ring_size(4)
        .sync_for_device(0, 64)
        .build()
        .unwrap();
    // Held to the end: unbind reaches it through the tracker.
    let kept = a.alloc().unwrap();
    // The page whose sync triggers the sync hooks.
    let mut trigger_page = a.alloc().unwrap();
    // Pool T: 3 pages cached and 1 in the ring. Dropping it unmaps the 4
    // in one `unmap_batch`, then frees them one `free_pages` each; unbind
    // drains its ring (one `unmap_batch`, one `free_pages`).
    let mut t = rig.builder().cache_size(4).refill_batch(4).build().unwrap();
    let page = t.alloc().unwrap();
    t.recycle_direct(page);
    drop(t.alloc().unwrap());
    // Out of this thread's batch of kept-back returns, into the ring.
    pagepool::flush_thread_returns();
    assert_eq!((t.cached(), t.stats().recycle.ring), (3, 1));
    let mut t = Some(t);

    let mut a = Some(a);
    let mut keep: Vec<Box<dyn Send>> = Vec::new();
    let doomed: Box<dyn Send> = match victim {
        Victim::Page => Box::new(a.as_mut().unwrap().alloc().unwrap()),
        Victim::Frag => {
            let pool = a.as_mut().unwrap();
            let first = pool.alloc_frag(3000).unwrap();
            // Does not fit: the pool lets go of the first page, so the
            // first fragment is its page's last reference.
            keep.push(Box::new(pool.alloc_frag(3000).unwrap()));
            Box::new(first)
        }
        Victim::Pool => {
            let mut pool = if hook.allocates() {
                rig.builder()
                    .cache_size(4)
                    .refill_batch(4)
                    .ring_size(4)
                    .build()
                    .unwrap()
            } else {
                a.take().unwrap()
            };
            // A page held outside (the pool is detached when dropped), one
            // in the ring, one or more in the cache.
            keep.push(Box::new(pool.alloc().unwrap()));
            drop(pool.alloc().unwrap());
            pagepool::flush_thread_returns();
            let page = pool.alloc().unwrap();
            pool.recycle_direct(page);
            assert!(pool.cached() > 0);
            Box::new(pool)
        }
        #[cfg(feature = "bytes")]
        Victim::Bytes => Box::new(a.as_mut().unwrap().alloc().unwrap().into_bytes()),
    };

    let dropped = Arc::new(AtomicBool::new(false));
    // Device calls the drop made from inside the callback.
    let nested = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(AtomicBool::new(false));
    let unbinding = Arc::new(AtomicBool::new(false));
    {
        let (dropped, entered, unbinding) = (dropped.clone(), entered.clone(), unbinding.clone());
        let (device, checker) = (rig.weak(), rig.checker.clone());
        let (faults, nested) = (Arc::downgrade(&rig.faults), nested.clone());
        rig.faults.run_on(
            hook.call(),
            rig.faults.next(hook.call()),
            hook.when(),
            move || {
                let faults = faults.upgrade().expect("the rig holds the program");
                entered.store(true, SeqCst);
                if concurrent {
                    wait_until("the unbinding thread started", || unbinding.load(SeqCst));
                    wait_until("unbind began", || !is_bound(&device));
                    // Let it reach its wait (for this call, or for the
                    // `unbind` already running).
                    thread::sleep(Duration::from_millis(2));
                }
                // A concurrent unbind is still waiting for this call.
                let waiting = !checker.is_unbound();
                let calls = faults.device_calls();
                drop(doomed);
                nested.store(faults.device_calls() - calls, SeqCst);
                dropped.store(true, SeqCst);
                if concurrent && hook.inside_device_call() {
                    assert!(waiting, "{hook:?}: unbind finished during the device call");
                    assert!(
                        !checker.is_unbound(),
                        "{hook:?}: unbind finished during the device call"
                    );
                }
            },
        );
    }
    let unbinder = concurrent.then(|| {
        let device = Arc::clone(&rig.device);
        let (entered, unbinding) = (entered.clone(), unbinding.clone());
        thread::spawn(move || {
            wait_until("the callback was entered", || entered.load(SeqCst));
            unbinding.store(true, SeqCst);
            device.unbind()
        })
    });

    let mut allocated = None;
    match hook {
        Hook::Map | Hook::AllocPages => {
            let result = a.as_mut().unwrap().alloc();
            let expected_ok = !(concurrent && hook == Hook::AllocPages);
            assert_eq!(
                result.is_ok(),
                expected_ok,
                "{hook:?}: alloc returned {result:?}"
            );
            if !expected_ok {
                assert_eq!(result.as_ref().unwrap_err(), &AllocError::Unbound);
            }
            allocated = result.ok();
        }
        Hook::UnmapBatch | Hook::FreePages => drop(t.take()),
        Hook::SyncForCpu => assert_eq!(trigger_page.sync_for_cpu(0..64), Ok(())),
        Hook::SyncForDevice => assert_eq!(trigger_page.sync_for_device(0..64), Ok(())),
        Hook::OnUnbind | Hook::UnmapBatchInUnbind | Hook::FreePagesInUnbind => {
            rig.device.unbind().expect("the unbind that makes the call");
        }
    }
    match unbinder {
        Some(unbinder) => {
            let result = unbinder.join().expect("the unbinding thread");
            if hook.in_unbind() {
                // It waited for the unbind running the callback.
                assert_eq!(result, Err(UnbindError::AlreadyUnbound));
            } else {
                result.expect("the concurrent unbind succeeds");
            }
        }
        None if !hook.in_unbind() => {
            rig.device.unbind().expect("unbind after the callback");
        }
        None => {}
    }
    assert!(
        dropped.load(SeqCst),
        "{hook:?}: the callback ran and dropped the {victim:?}"
    );
    let nested = nested.load(SeqCst);
    if hook.in_unbind() {
        assert_eq!(
            nested, 0,
            "{hook:?}: unbind began, so the drop reached no device"
        );
    } else if !concurrent {
        assert!(
            nested > 0,
            "{hook:?}: the {victim:?} went back through a device call of its own (a sync or an \
             unmap), nested in the callback"
        );
    }
    assert_eq!(rig.checker.live_mappings(), 0);

    drop(allocated);
    drop(kept);
    drop(trigger_page);
    drop(keep);
    drop(a);
    drop(t);
    rig.assert_clean();
}

fn reentrant_drops(hook: Hook, concurrent: bool) {
    for victim in victims() {
        let name = format!("drop a {victim:?} inside {hook:?} (concurrent unbind: {concurrent})");
        watchdog(&name, move || reentrant_drop(hook, victim, concurrent));
    }
}

#[test]
fn handles_dropped_inside_map_are_released_cleanly() {
    reentrant_drops(Hook::Map, false);
}

#[test]
fn handles_dropped_inside_map_while_unbinding_are_released_cleanly() {
    reentrant_drops(Hook::Map, true);
}

#[test]
fn handles_dropped_inside_unmap_batch_are_released_cleanly() {
    reentrant_drops(Hook::UnmapBatch, false);
}

#[test]
fn handles_dropped_inside_unmap_batch_while_unbinding_are_released_cleanly() {
    reentrant_drops(Hook::UnmapBatch, true);
}

#[test]
fn handles_dropped_inside_unbinds_unmap_batch_are_released_cleanly() {
    reentrant_drops(Hook::UnmapBatchInUnbind, false);
}

#[test]
fn handles_dropped_inside_unbinds_unmap_batch_with_a_second_unbind_waiting() {
    reentrant_drops(Hook::UnmapBatchInUnbind, true);
}

#[test]
fn handles_dropped_inside_sync_for_cpu_are_released_cleanly() {
    reentrant_drops(Hook::SyncForCpu, false);
}

#[test]
fn handles_dropped_inside_sync_for_cpu_while_unbinding_are_released_cleanly() {
    reentrant_drops(Hook::SyncForCpu, true);
}

#[test]
fn handles_dropped_inside_sync_for_device_are_released_cleanly() {
    reentrant_drops(Hook::SyncForDevice, false);
}

#[test]
fn handles_dropped_inside_sync_for_device_while_unbinding_are_released_cleanly() {
    reentrant_drops(Hook::SyncForDevice, true);
}

#[test]
fn handles_dropped_inside_on_unbind_are_released_cleanly() {
    reentrant_drops(Hook::OnUnbind, false);
}

#[test]
fn handles_dropped_inside_on_unbind_with_a_second_unbind_waiting() {
    reentrant_drops(Hook::OnUnbind, true);
}

#[test]
fn handles_dropped_inside_alloc_pages_are_released_cleanly() {
    reentrant_drops(Hook::AllocPages, false);
}

#[test]
fn handles_dropped_inside_alloc_pages_while_unbinding_are_released_cleanly() {
    reentrant_drops(Hook::AllocPages, true);
}

#[test]
fn handles_dropped_inside_free_pages_are_released_cleanly() {
    reentrant_drops(Hook::FreePages, false);
}

#[test]
fn handles_dropped_inside_free_pages_while_unbinding_are_released_cleanly() {
    reentrant_drops(Hook::FreePages, true);
}

#[test]
fn handles_dropped_inside_unbinds_free_pages_are_released_cleanly() {
    reentrant_drops(Hook::FreePagesInUnbind, false);
}

#[test]
fn handles_dropped_inside_unbinds_free_pages_with_a_second_unbind_waiting() {
    reentrant_drops(Hook::FreePagesInUnbind, true);
}

// ---------------------------------------------------------------------------
// 5. `Device::unbind` from inside a callback.
// ---------------------------------------------------------------------------

type UnbindSlot = Arc<Mutex<Option<(Result<UnbindReport, UnbindError>, bool)>>>;

/// Makes the next call of `call` run `unbind` (and note whether the device
/// was still bound right after it).
fn unbind_inside(rig: &FaultRig, call: Call, when: When) -> UnbindSlot {
    let slot = UnbindSlot::default();
    let (device, out) = (rig.weak(), Arc::clone(&slot));
    rig.faults
        .run_on(call, rig.faults.next(call), when, move || {
            let device = device.upgrade().expect("the test holds the device");
            let result = device.unbind();
            *out.lock().unwrap() = Some((result, device.is_bound()));
        });
    slot
}

#[track_caller]
fn refused(slot: &UnbindSlot) {
    let got = slot.lock().unwrap().take();
    assert_eq!(
        got,
        Some((Err(UnbindError::InsideCallback), true)),
        "refused at once, and the device stayed bound"
    );
}

fn small_pool(rig: &FaultRig) -> PagePool {
    rig.builder()
        .cache_size(4)
        .refill_batch(1)
        .ring_size(4)
        .build()
        .unwrap()
}

#[test]
fn unbind_inside_map_is_refused_and_a_later_unbind_succeeds() {
    watchdog("unbind inside map", || {
        let rig = FaultRig::new();
        let mut pool = small_pool(&rig);
        let slot = unbind_inside(&rig, Call::Map, When::After);
        let page = pool.alloc().expect("the allocation goes on");
        refused(&slot);
        let report = rig.device.unbind().expect("unbind from outside");
        assert_eq!(report.pages_held_or_cached, 1);
        drop(page);
        drop(pool);
        rig.assert_clean();
    });
}

#[test]
fn unbind_inside_unmap_batch_is_refused_and_a_later_unbind_succeeds() {
    watchdog("unbind inside unmap_batch", || {
        let rig = FaultRig::new();
        let mut pool = small_pool(&rig);
        let held = pool.alloc().unwrap();
        let mut other = small_pool(&rig);
        let page = other.alloc().unwrap();
        other.recycle_direct(page);
        let slot = unbind_inside(&rig, Call::UnmapBatch, When::After);
        drop(other); // unmaps its cached page
        refused(&slot);
        assert_eq!(rig.faults.calls(Call::UnmapBatch), 1);
        let report = rig.device.unbind().expect("unbind from outside");
        assert_eq!(report.pages_held_or_cached, 1);
        drop(held);
        drop(pool);
        rig.assert_clean();
    });
}

#[test]
fn unbind_inside_sync_for_cpu_is_refused_and_a_later_unbind_succeeds() {
    watchdog("unbind inside sync_for_cpu", || {
        let rig = FaultRig::new();
        let mut pool = small_pool(&rig);
        let mut page = pool.alloc().unwrap();
        let slot = unbind_inside(&rig, Call::SyncForCpu, When::After);
        assert_eq!(page.sync_for_cpu(0..128), Ok(()));
        refused(&slot);
        assert_eq!(rig.checker.stats().syncs_for_cpu, 1);
        rig.device.unbind().expect("unbind from outside");
        assert_eq!(page.sync_for_cpu(0..128), Err(SyncError::Unbound));
        drop(page);
        drop(pool);
        rig.assert_clean();
    });
}

#[test]
fn unbind_inside_on_unbind_is_refused_and_the_outer_unbind_completes() {
    watchdog("unbind inside on_unbind", || {
        let rig = FaultRig::new();
        let mut pool = small_pool(&rig);
        let held = pool.alloc().unwrap();
        let slot = unbind_inside(&rig, Call::OnUnbind, When::After);
        let report = rig.device.unbind().expect("the outer unbind");
        assert_eq!(report.pages_held_or_cached, 1);
        let got = slot.lock().unwrap().take();
        assert_eq!(got, Some((Err(UnbindError::InsideCallback), false)));
        assert_eq!(rig.faults.calls(Call::OnUnbind), 1);
        drop(held);
        drop(pool);
        rig.assert_clean();
    });
}

#[test]
fn unbind_inside_free_pages_during_unbind_is_refused_and_the_outer_unbind_completes() {
    watchdog("unbind inside free_pages", || {
        let rig = FaultRig::new();
        let mut pool = small_pool(&rig);
        let held = pool.alloc().unwrap();
        drop(pool.alloc().unwrap());
        pagepool::flush_thread_returns(); // into the ring: unbind frees it
        assert_eq!(pool.stats().recycle.ring, 1);
        let slot = unbind_inside(&rig, Call::FreePages, When::Before);
        let report = rig.device.unbind().expect("the outer unbind");
        assert_eq!(report.pages_from_rings, 1);
        assert_eq!(report.pages_held_or_cached, 1);
        let got = slot.lock().unwrap().take();
        assert_eq!(got, Some((Err(UnbindError::InsideCallback), false)));
        drop(held);
        drop(pool);
        rig.assert_clean();
    });
}

#[test]
fn unbind_inside_alloc_pages_proceeds_and_the_interrupted_alloc_fails_unbound() {
    watchdog("unbind inside alloc_pages", || {
        let rig = FaultRig::new();
        let mut pool = small_pool(&rig);
        let held = pool.alloc().unwrap();
        let slot = unbind_inside(&rig, Call::AllocPages, When::Before);
        assert_eq!(pool.alloc().unwrap_err(), AllocError::Unbound);
        let (result, bound) = slot.lock().unwrap().take().expect("the rule ran");
        let report = result.expect("no device call was in progress: unbind proceeds");
        assert!(!bound);
        assert_eq!(report.pages_held_or_cached, 1);
        assert_eq!(
            rig.checker.stats().maps,
            1,
            "the interrupted page was never mapped"
        );
        assert_eq!(
            rig.pages.live(),
            1,
            "its block went back; only `held` is live"
        );
        drop(held);
        drop(pool);
        rig.assert_clean();
    });
}

// ---------------------------------------------------------------------------
// 6. Unbind waits for device calls in progress, and for nothing else.
// ---------------------------------------------------------------------------

#[test]
fn unbind_does_not_wait_for_a_page_source_blocked_in_alloc_pages() {
    watchdog("unbind vs a blocked page source", || {
        let rig = FaultRig::new();
        let mut pool = rig.builder().cache_size(4).refill_batch(4).build().unwrap();
        let held: Vec<Page> = (0..4).map(|_| pool.alloc().unwrap()).collect();
        assert_eq!(pool.cached(), 0, "the next alloc goes to the source");
        let (release, released) = mpsc::channel::<()>();
        let blocked = Arc::new(AtomicBool::new(false));
        {
            let blocked = blocked.clone();
            rig.faults.run_on(
                Call::AllocPages,
                rig.faults.next(Call::AllocPages),
                When::Before,
                move || {
                    blocked.store(true, SeqCst);
                    released
                        .recv_timeout(support::faulty::TIMEOUT)
                        .expect("the test releases the page source");
                },
            );
        }
        let owner = thread::spawn(move || {
            let result = pool.alloc().map(drop);
            (result, pool)
        });
        wait_until("the owner blocked in alloc_pages", || blocked.load(SeqCst));

        let (done, unbound) = mpsc::channel();
        let device = Arc::clone(&rig.device);
        let unbinder = thread::spawn(move || {
            let _ = done.send(device.unbind());
        });
        let report = match unbound.recv_timeout(support::faulty::TIMEOUT) {
            Ok(result) => result.expect("unbind succeeds"),
            Err(_) => {
                let _ = release.send(());
                panic!("unbind waited for a page source blocked in alloc_pages");
            }
        };
        // Ordering: unbind has returned, and only now is the source let go.
        assert!(
            !owner.is_finished(),
            "alloc_pages is still blocked when unbind returns"
        );
        assert_eq!(report.pages_held_or_cached, 4);
        assert!(rig.checker.is_unbound());
        assert_eq!(rig.checker.live_mappings(), 0);
        release.send(()).unwrap();
        let (result, pool) = owner.join().unwrap();
        assert_eq!(result, Err(AllocError::Unbound));
        unbinder.join().unwrap();
        assert_eq!(
            rig.checker.stats().maps,
            4,
            "the late block was never mapped"
        );
        drop(held);
        drop(pool);
        rig.assert_clean();
    });
}

#[test]
// Timing-bound: under Miri the unbinding thread may lag more than a map.
#[cfg_attr(miri, ignore)]
fn unbind_waits_for_the_map_in_progress_not_for_the_refill_batch() {
    watchdog("unbind vs a slow refill batch", || {
        let rig = FaultRig::new();
        let mut pool = rig
            .builder()
            .cache_size(256)
            .refill_batch(256)
            .build()
            .unwrap();
        let began = Arc::new(AtomicBool::new(false));
        {
            let (began, device) = (began.clone(), rig.weak());
            // The first map of the batch holds on until unbind has begun,
            // so unbind starts while a map is in progress.
            rig.faults.run_on(
                Call::Map,
                rig.faults.next(Call::Map),
                When::Before,
                move || {
                    began.store(true, SeqCst);
                    wait_until("unbind began", || !is_bound(&device));
                },
            );
        }
        rig.faults.sleep_every(Call::Map, Duration::from_millis(5));
        let owner = thread::spawn(move || {
            let result = pool.alloc().map(drop);
            (result, pool)
        });
        wait_until("the first map began", || began.load(SeqCst));
        let report = rig.device.unbind().expect("unbind succeeds");
        let maps = rig.checker.stats().maps;
        assert!(
            (1..=2).contains(&maps),
            "unbind returned after {maps} maps of a 256-page refill: it must wait for the map \
             in progress only"
        );
        assert_eq!(report.pages_held_or_cached, maps as usize);
        assert_eq!(rig.checker.live_mappings(), 0);
        let (result, pool) = owner.join().unwrap();
        assert_eq!(result, Err(AllocError::Unbound));
        assert_eq!(rig.checker.stats().maps, maps, "no map after unbind");
        drop(pool);
        rig.assert_clean();
    });
}

// ---------------------------------------------------------------------------
// 7. A panicking sync for the device on recycle.
// ---------------------------------------------------------------------------

fn syncing_pool(rig: &FaultRig, direction: DmaDirection) -> PagePool {
    rig.builder()
        .cache_size(8)
        .refill_batch(8)
        .ring_size(8)
        .direction(direction)
        .sync_for_device(0, 64)
        .build()
        .unwrap()
}

/// The counters a released page moves: freed blocks, live mappings.
fn released_since(rig: &FaultRig, freed: usize, live: usize) -> (usize, usize) {
    (
        rig.pages.counting.freed() - freed,
        live - rig.checker.live_mappings(),
    )
}

#[test]
fn sync_panic_in_page_drop_on_another_thread_releases_the_page() {
    let rig = FaultRig::new();
    let mut pool = syncing_pool(&rig, DmaDirection::Bidirectional);
    let page = pool.alloc().unwrap();
    let others: Vec<Page> = (0..2).map(|_| pool.alloc().unwrap()).collect();
    let (freed, live) = (rig.pages.counting.freed(), rig.checker.live_mappings());
    rig.faults
        .panic_on(Call::SyncForDevice, rig.faults.next(Call::SyncForDevice));
    let payload = thread::spawn(move || drop(page))
        .join()
        .expect_err("the sync's panic propagates out of Page::drop");
    assert_eq!(injected(&*payload), Some(Call::SyncForDevice));
    assert_eq!(rig.faults.calls(Call::SyncForDevice), 1, "synced once");
    assert_eq!(
        released_since(&rig, freed, live),
        (1, 1),
        "the page was unmapped and freed, not leaked or recycled"
    );
    assert_eq!(pool.stats().recycle.ring, 0);
    drop(others);
    drop(pool);
    rig.device.unbind().unwrap();
    rig.assert_clean();
}

#[test]
fn sync_panic_in_recycle_direct_releases_the_page() {
    let rig = FaultRig::new();
    let mut pool = syncing_pool(&rig, DmaDirection::FromDevice);
    let page = pool.alloc().unwrap();
    let cached = pool.cached();
    let (freed, live) = (rig.pages.counting.freed(), rig.checker.live_mappings());
    rig.faults
        .panic_on(Call::SyncForDevice, rig.faults.next(Call::SyncForDevice));
    let payload = catch_unwind(AssertUnwindSafe(|| pool.recycle_direct(page)))
        .expect_err("the sync's panic propagates out of recycle_direct");
    assert_eq!(injected(&*payload), Some(Call::SyncForDevice));
    assert_eq!(released_since(&rig, freed, live), (1, 1));
    assert_eq!(pool.cached(), cached, "not put into the cache");
    // The pool goes on: recycling syncs again.
    let page = pool.alloc().unwrap();
    pool.recycle_direct(page);
    assert_eq!(rig.checker.stats().syncs_for_device, 2);
    drop(pool);
    rig.device.unbind().unwrap();
    rig.assert_clean();
}

#[test]
fn sync_panic_in_put_bulk_releases_every_page() {
    let rig = FaultRig::new();
    let mut pool = syncing_pool(&rig, DmaDirection::Bidirectional);
    let pages: Vec<Page> = (0..5).map(|_| pool.alloc().unwrap()).collect();
    let kept = pool.alloc().unwrap();
    let (freed, live) = (rig.pages.counting.freed(), rig.checker.live_mappings());
    let syncs = rig.faults.calls(Call::SyncForDevice);
    // The third page's sync panics.
    rig.faults.panic_on(Call::SyncForDevice, syncs + 3);
    let payload = catch_unwind(AssertUnwindSafe(|| put_bulk(pages)))
        .expect_err("the sync's panic propagates out of put_bulk");
    assert_eq!(injected(&*payload), Some(Call::SyncForDevice));
    assert_eq!(
        rig.faults.calls(Call::SyncForDevice) - syncs,
        3,
        "the pages after the panic were not synced (the thread was unwinding)"
    );
    assert_eq!(
        released_since(&rig, freed, live),
        (5, 5),
        "all five pages were unmapped and freed, none leaked"
    );
    assert_eq!(pool.stats().recycle.ring, 0);
    drop(kept);
    drop(pool);
    rig.device.unbind().unwrap();
    rig.assert_clean();
}
