//! A device unbound or dropped from inside a callback.
//!
//! Dropping a `Device` must never leave it bound. Inside one of the
//! device's own callbacks the unbind cannot run at once (it would wait for
//! its own caller), so it is deferred until the thread's outermost call of
//! the device returns; these tests check it has run, completely, by the time
//! the pool operation that made the call returns. And an `unbind` of
//! *another* device from inside a callback must work whatever path the
//! thread's gate bookkeeping took: announced in its slots, counted because
//! the calls nest deeper than the slots, or counted because the thread is
//! exiting (a batch of remote returns going home from a thread-local's
//! destructor).
//!
//! Every scenario runs under a watchdog (a deadlock fails it) and ends with
//! the invariants checked on every device: each mapping unmapped once,
//! `on_unbind` once, nothing after it, every block freed once and never
//! while mapped.

mod support;

use std::sync::{Arc, Mutex};
use std::thread;

use pagepool::checking::CheckingDevice;
use pagepool::{Device, Page, PagePool, UnbindError, UnbindReport};
use support::checks::{assert_unbound_clean, checker, GuardedPages};
use support::faulty::{watchdog, Call, Faults, FaultyOps, FaultyPages, When};

/// A device over a fault program whose handle the test can give away (the
/// support rig keeps one of its own, so a callback's drop would never be
/// the last).
struct Bench {
    checker: CheckingDevice,
    faults: Arc<Faults>,
    pages: GuardedPages,
    /// The only handle, until a callback takes it.
    device: Arc<Mutex<Option<Device>>>,
}

impl Bench {
    fn new() -> Self {
        let checker = checker();
        let faults = Faults::new();
        let ops = FaultyOps::new(&checker, &faults);
        let check = ops.check();
        let device = Device::with_cpu_access_check(ops, check);
        Self {
            pages: GuardedPages::new(&checker),
            checker,
            faults,
            device: Arc::new(Mutex::new(Some(device))),
        }
    }

    /// A pool on the device, pages from the program's page source.
    fn pool(&self, ring: usize, remote_batch: usize) -> PagePool {
        let device = self.device.lock().unwrap();
        device
            .as_ref()
            .expect("still held by the test")
            .pool_builder()
            .page_source(FaultyPages::new(&self.pages, &self.faults))
            .cache_size(4)
            .refill_batch(1)
            .ring_size(ring)
            .remote_batch(remote_batch)
            .build()
            .unwrap()
    }

    /// The last handle, for a callback to take.
    fn handle(&self) -> Arc<Mutex<Option<Device>>> {
        Arc::clone(&self.device)
    }

    /// `on_unbind` made once and every mapping gone.
    #[track_caller]
    fn assert_unbound_now(&self) {
        assert!(self.checker.is_unbound(), "on_unbind has run");
        assert_eq!(self.faults.calls(Call::OnUnbind), 1, "on_unbind once");
        assert_eq!(self.checker.live_mappings(), 0, "no mapping left");
    }

    /// Everything dropped: the checker and the page memory are clean.
    #[track_caller]
    fn assert_clean(&self) {
        assert_unbound_clean(&self.checker);
        assert!(
            self.checker.verdict().is_clean(),
            "{}",
            self.checker.report()
        );
        self.pages.assert_all_freed_once_unmapped();
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        // A rule that never ran may own a device or pages.
        self.faults.clear();
    }
}

/// What a callback does to another device.
#[derive(Clone, Copy, Debug)]
enum Remove {
    /// `Device::unbind`, then the handle is dropped after the test.
    Unbind,
    /// Drops the last handle.
    Drop,
}

/// What a callback observed: the result of its explicit unbind, if any,
/// and whether the other device was unbound when the callback returned.
type Seen = Arc<Mutex<Option<(Option<Result<UnbindReport, UnbindError>>, bool)>>>;

/// Removes the device behind `handle` from inside a callback, as `how`
/// says, and notes what happened in the returned slot. The explicit
/// variant keeps the handle alive in `kept` so that the unbind's effect is
/// what the test observes, not the drop's.
fn remove(
    handle: Arc<Mutex<Option<Device>>>,
    checker: CheckingDevice,
    how: Remove,
    kept: Arc<Mutex<Option<Device>>>,
    seen: Seen,
) -> impl FnOnce() + Send + 'static {
    move || {
        let device = handle.lock().unwrap().take().expect("the last handle");
        let result = match how {
            Remove::Unbind => {
                let result = device.unbind();
                *kept.lock().unwrap() = Some(device);
                Some(result)
            }
            Remove::Drop => {
                drop(device);
                None
            }
        };
        *seen.lock().unwrap() = Some((result, checker.is_unbound()));
    }
}

/// The other device's callback-made removal went through at once.
#[track_caller]
fn assert_removed_at_once(seen: &Seen, held_pages: usize) {
    let (result, unbound) = seen.lock().unwrap().take().expect("the callback ran");
    if let Some(result) = result {
        let report = result.expect("another device's unbind is not refused");
        assert_eq!(report.pages_held_or_cached, held_pages);
    }
    assert!(unbound, "unbound before the callback returned");
}

// ---------------------------------------------------------------------------
// 1. The last handle dropped inside one of the device's own callbacks.
// ---------------------------------------------------------------------------

/// A ring of 2, no remote batching: four pages dropped on another thread
/// overflow the ring, so pages are unmapped; the first such unmap drops the
/// last `Device`. When the thread's drop returns, the device is unbound.
#[test]
fn the_last_handle_dropped_in_its_own_unmap_unbinds_before_the_drop_returns() {
    watchdog("last handle dropped in its own unmap", || {
        let bench = Bench::new();
        let mut pool = bench.pool(2, 0);
        let dropped: Vec<Page> = (0..4).map(|_| pool.alloc().unwrap()).collect();
        let mut held = pool.alloc().unwrap();
        let (handle, faults) = (bench.handle(), Arc::clone(&bench.faults));
        let checker = bench.checker.clone();
        let during = Arc::new(Mutex::new(None));
        let seen = Arc::clone(&during);
        bench.faults.run_on(
            Call::UnmapBatch,
            bench.faults.next(Call::UnmapBatch),
            When::After,
            move || {
                drop(handle.lock().unwrap().take().expect("the last handle"));
                // Still inside the call: deferred, not skipped.
                *seen.lock().unwrap() = Some((
                    checker.is_unbound(),
                    faults.calls(Call::OnUnbind),
                    checker.live_mappings(),
                ));
            },
        );
        thread::spawn(move || drop(dropped)).join().unwrap();
        let (unbound, on_unbinds, live) = during.lock().unwrap().take().expect("the rule ran");
        assert!(!unbound, "not unbound inside its own call");
        assert_eq!(on_unbinds, 0);
        assert!(live > 0, "mappings live during the call");
        // The page drop that made the call has returned: the deferred
        // unbind has run, completely.
        bench.assert_unbound_now();
        // A held page stays valid memory and its drop calls nothing.
        held.as_mut_slice()[0] = 0x5a;
        assert_eq!(held.as_slice()[0], 0x5a);
        let calls = bench.faults.device_calls();
        assert_eq!(pool.alloc().unwrap_err(), pagepool::AllocError::Unbound);
        drop(held);
        drop(pool);
        assert_eq!(bench.faults.device_calls(), calls, "no call after unbind");
        bench.assert_clean();
    });
}

/// The drop happens in a call nested inside another call of the same
/// device: the unbind waits for the outer one, then runs before the
/// operation returns. Here a `map` (the slow path) drops a pool whose
/// cached page is unmapped (nested), and that unmap drops the last handle.
#[test]
fn the_last_handle_dropped_in_a_nested_call_unbinds_after_the_outermost_one() {
    watchdog("last handle dropped in a nested call", || {
        let bench = Bench::new();
        let mut pool = bench.pool(4, 0);
        let mut other = bench.pool(4, 0);
        let page = other.alloc().unwrap();
        other.recycle_direct(page);
        let held = pool.alloc().unwrap();
        let (handle, checker) = (bench.handle(), bench.checker.clone());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (after_unmap, after_map) = (Arc::clone(&seen), Arc::clone(&seen));
        let checker_in_map = bench.checker.clone();
        bench.faults.run_on(
            Call::UnmapBatch,
            bench.faults.next(Call::UnmapBatch),
            When::After,
            move || {
                drop(handle.lock().unwrap().take().expect("the last handle"));
                after_unmap.lock().unwrap().push(checker.is_unbound());
            },
        );
        bench.faults.run_on(
            Call::Map,
            bench.faults.next(Call::Map),
            When::After,
            move || {
                drop(other); // unmaps its cached page: the rule above
                after_map.lock().unwrap().push(checker_in_map.is_unbound());
            },
        );
        // The slow path maps a page; the map returns, the page is recorded,
        // then the deferred unbind runs and this allocation's page is
        // unmapped with the rest.
        let fresh = pool.alloc();
        assert_eq!(*seen.lock().unwrap(), [false, false], "bound in both calls");
        bench.assert_unbound_now();
        drop(fresh);
        drop(held);
        drop(pool);
        bench.assert_clean();
    });
}

/// The same device refused from inside its own callback, explicitly.
#[test]
fn an_explicit_unbind_inside_its_own_callback_is_still_refused() {
    watchdog("explicit unbind inside its own callback", || {
        let bench = Bench::new();
        let mut pool = bench.pool(2, 0);
        let dropped: Vec<Page> = (0..4).map(|_| pool.alloc().unwrap()).collect();
        let handle = bench.handle();
        let got = Arc::new(Mutex::new(None));
        let out = Arc::clone(&got);
        bench.faults.run_on(
            Call::UnmapBatch,
            bench.faults.next(Call::UnmapBatch),
            When::After,
            move || {
                let device = handle.lock().unwrap();
                *out.lock().unwrap() = Some(device.as_ref().unwrap().unbind());
            },
        );
        thread::spawn(move || drop(dropped)).join().unwrap();
        assert_eq!(
            got.lock().unwrap().take(),
            Some(Err(UnbindError::InsideCallback))
        );
        let device = bench.device.lock().unwrap().take().unwrap();
        assert!(device.is_bound());
        device.unbind().expect("from outside");
        drop(device);
        drop(pool);
        bench.assert_clean();
    });
}

// ---------------------------------------------------------------------------
// 2. Another device, from calls the gate counted instead of announcing.
// ---------------------------------------------------------------------------

/// Device B removed from inside A's unmap, made while a thread exits: its
/// batch of remote returns goes home from a thread-local destructor (the
/// counted path), the full ring refuses a page, and the page's unmap runs
/// the removal. B is unbound when the callback returns; A, whose own
/// `unbind` is still refused there, stays bound.
fn another_device_removed_during_thread_exit(how: Remove) {
    let a = Bench::new();
    let b = Bench::new();
    // Ring of 2 and batches of 2: two pages fill the ring through a full
    // batch; a third, alone in a batch, goes home at thread exit.
    let mut pool_a = a.pool(2, 2);
    let mut pool_b = b.pool(4, 0);
    let held_b = pool_b.alloc().unwrap();
    let [p1, p2, p3] = [(); 3].map(|_| pool_a.alloc().unwrap());
    thread::spawn(move || drop((p1, p2))).join().unwrap();
    assert_eq!(pool_a.stats().recycle.ring, 2, "the ring is full");
    let seen = Seen::default();
    let kept = Arc::new(Mutex::new(None));
    let own = Arc::new(Mutex::new(None));
    let (a_handle, own_out) = (a.handle(), Arc::clone(&own));
    let removal = remove(
        b.handle(),
        b.checker.clone(),
        how,
        Arc::clone(&kept),
        Arc::clone(&seen),
    );
    a.faults.run_on(
        Call::UnmapBatch,
        a.faults.next(Call::UnmapBatch),
        When::After,
        move || {
            removal();
            let a = a_handle.lock().unwrap();
            *own_out.lock().unwrap() = Some(a.as_ref().unwrap().unbind());
        },
    );
    thread::spawn(move || drop(p3)).join().unwrap();
    assert_removed_at_once(&seen, 1);
    assert_eq!(
        own.lock().unwrap().take(),
        Some(Err(UnbindError::InsideCallback)),
        "A's own unbind is refused on the counted path too"
    );
    b.assert_unbound_now();
    drop(held_b);
    drop(pool_b);
    drop(kept);
    b.assert_clean();
    let device_a = a.device.lock().unwrap().take().unwrap();
    assert!(device_a.is_bound());
    device_a.unbind().unwrap();
    drop(device_a);
    drop(pool_a);
    a.assert_clean();
}

#[test]
fn another_device_unbound_during_thread_exit_is_not_refused() {
    watchdog("unbind another device at thread exit", || {
        another_device_removed_during_thread_exit(Remove::Unbind)
    });
}

#[test]
fn another_device_dropped_during_thread_exit_unbinds_at_once() {
    watchdog("drop another device at thread exit", || {
        another_device_removed_during_thread_exit(Remove::Drop)
    });
}

/// Calls of A nested five deep (one more than a thread's announcement
/// slots, so the innermost is counted): each unmap drops the next pool,
/// whose cached page is unmapped inside it. The innermost removes B.
/// Device calls of `bench`'s device nested `depth` deep: `depth` pools,
/// each with one cached page; the unmap of pool `i`'s page (when pool `i`
/// is dropped) drops pool `i + 1` inside it. Returns the first pool, whose
/// drop starts the chain, and the number of the innermost `unmap_batch`.
fn nested_unmaps(bench: &Bench, depth: usize) -> (PagePool, usize) {
    let mut pools: Vec<PagePool> = (0..depth)
        .map(|_| {
            let mut pool = bench.pool(4, 0);
            let page = pool.alloc().unwrap();
            pool.recycle_direct(page);
            pool
        })
        .collect();
    let first = bench.faults.next(Call::UnmapBatch);
    // Unmap number `first + i` (nesting depth i + 1) drops pool i + 1.
    for (i, pool) in pools.drain(1..).enumerate() {
        bench
            .faults
            .run_on(Call::UnmapBatch, first + i, When::Before, move || {
                drop(pool)
            });
    }
    (pools.pop().expect("depth >= 1"), first + depth - 1)
}

fn another_device_removed_nested_deeper_than_the_slots(how: Remove) {
    const NESTED: usize = 5;
    let a = Bench::new();
    let b = Bench::new();
    let mut pool_b = b.pool(4, 0);
    let held_b = pool_b.alloc().unwrap();
    let (chain, innermost) = nested_unmaps(&a, NESTED);
    let seen = Seen::default();
    let kept = Arc::new(Mutex::new(None));
    let removal = remove(
        b.handle(),
        b.checker.clone(),
        how,
        Arc::clone(&kept),
        Arc::clone(&seen),
    );
    a.faults
        .run_on(Call::UnmapBatch, innermost, When::Before, removal);
    drop(chain); // the first pool: its unmap starts the chain
    assert_eq!(a.faults.calls(Call::UnmapBatch), innermost);
    assert_removed_at_once(&seen, 1);
    b.assert_unbound_now();
    drop(held_b);
    drop(pool_b);
    drop(kept);
    b.assert_clean();
    let device_a = a.device.lock().unwrap().take().unwrap();
    device_a.unbind().unwrap();
    drop(device_a);
    a.assert_clean();
}

#[test]
fn another_device_unbound_nested_deeper_than_the_slots_is_not_refused() {
    watchdog("unbind another device nested deep", || {
        another_device_removed_nested_deeper_than_the_slots(Remove::Unbind)
    });
}

#[test]
fn another_device_dropped_nested_deeper_than_the_slots_unbinds_at_once() {
    watchdog("drop another device nested deep", || {
        another_device_removed_nested_deeper_than_the_slots(Remove::Drop)
    });
}

/// The last handle of A dropped inside A's own call nested deeper than the
/// slots (counted): deferred to the outermost call, as on the fast path.
#[test]
fn the_last_handle_dropped_in_a_counted_call_unbinds_after_the_outermost_one() {
    watchdog("last handle dropped in a counted call", || {
        const NESTED: usize = 6;
        let a = Bench::new();
        let mut keep = a.pool(4, 0);
        let mut held = keep.alloc().unwrap();
        let (chain, innermost) = nested_unmaps(&a, NESTED);
        let (handle, checker) = (a.handle(), a.checker.clone());
        let bound_inside = Arc::new(Mutex::new(None));
        let out = Arc::clone(&bound_inside);
        a.faults
            .run_on(Call::UnmapBatch, innermost, When::Before, move || {
                drop(handle.lock().unwrap().take().expect("the last handle"));
                *out.lock().unwrap() = Some(!checker.is_unbound());
            });
        drop(chain); // starts the chain
        assert_eq!(*bound_inside.lock().unwrap(), Some(true), "deferred");
        a.assert_unbound_now();
        held.as_mut_slice()[0] = 1;
        drop(held);
        drop(keep);
        a.assert_clean();
    });
}

// ---------------------------------------------------------------------------
// 3. Unbinds nested across two devices.
// ---------------------------------------------------------------------------

/// A device on its own checker and fault program, shared so that callbacks
/// can reach it.
fn shared_device() -> (CheckingDevice, Arc<Faults>, Arc<Device>) {
    let checker = checker();
    let faults = Faults::new();
    let ops = FaultyOps::new(&checker, &faults);
    let check = ops.check();
    let device = Arc::new(Device::with_cpu_access_check(ops, check));
    (checker, faults, device)
}

/// B's unbind unmaps through a callback that unbinds A; A's unbind unmaps
/// through a callback that unbinds B again. The inner unbind of B is a
/// callback of this thread's own unbind of B: refused, not deadlocked on
/// B's unbind lock; A's, from B's callback, goes through.
#[test]
fn nested_unbinds_across_two_devices_refuse_the_outer_device_only() {
    watchdog("nested unbinds across two devices", || {
        let (checker_a, faults_a, a) = shared_device();
        let (checker_b, faults_b, b) = shared_device();
        let mut pool_a = a.pool_builder().build().unwrap();
        let mut pool_b = b.pool_builder().build().unwrap();
        let held_a = pool_a.alloc().unwrap();
        let held_b = pool_b.alloc().unwrap();
        let inner_b = Arc::new(Mutex::new(None));
        let middle_a = Arc::new(Mutex::new(None));
        let (b_again, out) = (Arc::clone(&b), Arc::clone(&inner_b));
        faults_a.run_on(
            Call::UnmapBatch,
            faults_a.next(Call::UnmapBatch),
            When::Before,
            move || *out.lock().unwrap() = Some(b_again.unbind().map(|_| ())),
        );
        let (a_inside, out) = (Arc::clone(&a), Arc::clone(&middle_a));
        faults_b.run_on(
            Call::UnmapBatch,
            faults_b.next(Call::UnmapBatch),
            When::Before,
            move || {
                *out.lock().unwrap() = Some(a_inside.unbind().map(|r| r.pages_held_or_cached > 0))
            },
        );
        let report = b.unbind().expect("the outer unbind");
        assert!(report.pages_held_or_cached > 0);
        assert_eq!(
            *middle_a.lock().unwrap(),
            Some(Ok(true)),
            "A unbound inside"
        );
        assert_eq!(
            *inner_b.lock().unwrap(),
            Some(Err(UnbindError::InsideCallback)),
            "B refused inside its own unbind"
        );
        assert!(checker_a.is_unbound() && checker_b.is_unbound());
        drop((held_a, held_b, pool_a, pool_b));
        for (checker, faults) in [(&checker_a, &faults_a), (&checker_b, &faults_b)] {
            faults.clear();
            assert_unbound_clean(checker);
            assert!(checker.verdict().is_clean(), "{}", checker.report());
        }
    });
}

/// A callback that panics inside the deferred unbind (here `on_unbind`):
/// the unbind still completes every step, the panic is caught (no caller
/// is left to receive it), and the page drop that made the call returns
/// normally.
#[test]
fn a_panic_inside_the_deferred_unbind_is_contained_and_the_unbind_completes() {
    watchdog("panic inside the deferred unbind", || {
        let bench = Bench::new();
        let mut pool = bench.pool(2, 0);
        let dropped: Vec<Page> = (0..4).map(|_| pool.alloc().unwrap()).collect();
        let held = pool.alloc().unwrap();
        bench
            .faults
            .panic_on(Call::OnUnbind, bench.faults.next(Call::OnUnbind));
        let handle = bench.handle();
        bench.faults.run_on(
            Call::UnmapBatch,
            bench.faults.next(Call::UnmapBatch),
            When::After,
            move || drop(handle.lock().unwrap().take().expect("the last handle")),
        );
        let returned = thread::spawn(move || drop(dropped)).join();
        assert!(returned.is_ok(), "the drop returned normally");
        bench.assert_unbound_now();
        let calls = bench.faults.device_calls();
        drop(held);
        drop(pool);
        assert_eq!(bench.faults.device_calls(), calls, "no call after unbind");
        bench.assert_clean();
    });
}
