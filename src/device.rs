//! A bound device: owner of its [`DmaOps`], its pools' registry and the
//! in-flight tracker; and [`Device::unbind`], the driver's remove path.
//!
//! # How unbind works
//!
//! ```text
//!  unbind()                                   other threads
//!  1. registry: bound = false, take pools     build() -> Err(Unbound)
//!     every pool: closed = true               alloc() -> Err(Unbound)
//!  2. every pool's call gate: close, then     a device call already running
//!     wait until idle (one call per thread    finishes; none starts: syncs
//!     at most, never a batch or a source)     -> Err(Unbound), pages coming
//!                                             back are handed to unbind
//!  3. drain every ring: unmap + free
//!  4. take every tracker record: unmap the    pages held outside stay valid
//!     mappings left (cached, held, ...)       memory; dropping them later
//!  5. ops.on_unbind(); retire the ops         frees them, no device call
//!  6. free the pages handed over in 2-5
//! ```
//!
//! # Invariants
//!
//! - After `unbind` returns no [`DmaOps`] method runs again: every gate is
//!   closed and idle and the ops are dropped (invariant 2).
//! - `unbind` waits only for device calls in progress, never for a page to
//!   come back, a page source, or a batch (invariant 3).
//! - Tracked mode: every mapping is recorded, so step 4 reaches every
//!   mapping that step 3 and earlier releases did not, and the tracker's
//!   remove-once rule unmaps each exactly once (invariant 1).
//! - Whatever a callback does in steps 3-6 (panic, drop pages or pools, call
//!   back in), every step still runs: the remaining mappings are unmapped
//!   once, the ops retired, the pages freed; then the first panic is resumed
//!   to the caller of `unbind`.

use core::fmt;
use std::time::{Duration, Instant};

use crate::checking::{self, CpuAccessCheck};
use crate::dma::DmaOps;
use crate::error::UnbindError;
use crate::held;
use crate::mapping::{free_pages, free_regions, Unmapper};
use crate::mode::{Tracked, TrackingMode, Untracked};
use crate::pool::PagePoolBuilder;
use crate::shared::{meta_ref, DeviceShared, PageMeta, PoolShared};
use crate::stats::{PoolInfo, PoolStats};
use crate::sync::{Arc, AtomicUsize, Ordering};
use crate::trace;
use crate::unwind::Panics;

#[cfg(doc)]
use crate::checking::CheckingDevice;

/// What `unbind` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnbindReport {
    /// Pools that were still open.
    pub pools: usize,
    /// Pages drained from the pools' shared rings (and region-mapped pools'
    /// spare lists): unmapped and freed, or, region pages, retired (their
    /// regions are counted in `regions_unmapped`).
    pub pages_from_rings: usize,
    /// Pages unmapped through the in-flight tracker: held outside the pool
    /// (by the stack, by sockets, in a thread's batch of remote returns) or
    /// in a live owner's local cache. Their memory stays valid for their
    /// holders and is freed, with no device call, when they come back.
    /// With `pages_from_rings`, what Linux's `inflight` counted when the
    /// device went away.
    pub pages_held_or_cached: usize,
    /// Regions of region-mapped pools unmapped (one mapping each, whatever
    /// their pages were doing: cached, in a ring, held outside).
    pub regions_unmapped: usize,
    /// Bytes unmapped in all.
    pub bytes_unmapped: u64,
    /// Mappings `unbind` could not reach: always 0 on a tracked device; on
    /// an [`Untracked`] one, the pages held outside.
    pub mappings_left: usize,
    /// Mappings `unbind` handed to the backend whose unmap the backend
    /// reported as failed (see [`DmaOps::unmap`]). Their memory is kept,
    /// never freed or reused, since the device may still reach it; they
    /// are counted in `pages_*`/`regions_unmapped` too.
    pub unmap_failures: usize,
    /// Wall time `unbind` took.
    pub duration: Duration,
}

impl fmt::Display for UnbindReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unbind: {} pools, {} pages from rings + {} held or cached + {} regions unmapped ({} bytes), {} mappings left, {} unmaps failed, in {:?}",
            self.pools,
            self.pages_from_rings,
            self.pages_held_or_cached,
            self.regions_unmapped,
            self.bytes_unmapped,
            self.mappings_left,
            self.unmap_failures,
            self.duration
        )
    }
}

/// One bound device: owns its [`DmaOps`]; pools are built from it.
///
/// Dropping a `Device` unbinds it. `Device` is `Sync`: `unbind` may be called
/// from the driver's remove path on any thread while pools are in use.
///
/// # Dropped inside one of its own callbacks
///
/// The last handle may be dropped inside a [`DmaOps`] method (or a
/// CPU-access check) that the pool is running for this device, for example
/// by a remove path that a callback triggers. Unbinding right there would
/// wait for that very call, so the unbind is deferred, never skipped: it
/// runs on the same thread as soon as the thread's outermost call of this
/// device returns, right after the pool leaves that call and before the
/// pool operation that made it (an allocation, a page drop, a sync, an
/// unbind of another device) returns to its caller. Until then the device
/// stays bound: the call in progress, and calls nested inside it, go on;
/// other threads may still use its pools. The deferred unbind is a full
/// [`unbind`](Self::unbind), with every guarantee of one: each mapping
/// unmapped once, `on_unbind` called once, no device call after it
/// finished, held pages valid. If another thread unbinds the device first,
/// the deferred one finds it unbound and does nothing. A callback's panic
/// during a deferred unbind is caught and discarded (the unbind completes
/// first), since no caller is left to receive it.
///
/// Dropped anywhere else, including inside a callback of another device or
/// a [`PageSource`](crate::PageSource) method, the unbind runs at once.
pub struct Device<M: TrackingMode = Tracked> {
    pub(crate) shared: Arc<DeviceShared<M>>,
}

impl Device<Tracked> {
    /// Binds a device whose DMA goes through `ops`, with in-flight tracking.
    ///
    /// If `ops` is a [`CheckingDevice`], it also checks every CPU access to
    /// the device's pages (see [`CpuAccessCheck`]); other ops get no such
    /// check. A test backend that wraps a checking device binds with
    /// [`with_cpu_access_check`](Self::with_cpu_access_check) instead.
    pub fn new(ops: impl DmaOps) -> Self {
        let check = checking::detect(&ops);
        Self::bind(Box::new(ops), check)
    }

    /// Binds a device whose DMA goes through `ops`, with in-flight
    /// tracking, and tells `check` before the CPU reads or writes one of its
    /// pages or fragments. For test backends that put a
    /// [`CheckingDevice`] behind a `DmaOps` of their own, which
    /// [`new`](Self::new) cannot see through.
    ///
    /// `check` is called under the same rules as a device call: inside the
    /// pool's call gate, so [`unbind`](Self::unbind) waits for a check in
    /// progress and none runs after it returned.
    ///
    /// ```
    /// use core::ptr::NonNull;
    /// use pagepool::checking::{CheckMode, CheckingDevice, Violation};
    /// use pagepool::{Device, DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, UnmapError};
    ///
    /// /// A test backend: the checking device with syncs counted.
    /// struct CountingSyncs {
    ///     inner: CheckingDevice,
    ///     syncs: std::sync::atomic::AtomicUsize,
    /// }
    ///
    /// impl DmaOps for CountingSyncs {
    ///     unsafe fn map(
    ///         &self,
    ///         cpu: NonNull<u8>,
    ///         len: usize,
    ///         direction: DmaDirection,
    ///     ) -> Result<DmaAddr, DmaError> {
    ///         // SAFETY: the caller's contract, forwarded.
    ///         unsafe { self.inner.map(cpu, len, direction) }
    ///     }
    ///     unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
    ///         // SAFETY: the caller's contract, forwarded.
    ///         unsafe { self.inner.unmap(mapping) }
    ///     }
    ///     unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
    ///         self.syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ///         // SAFETY: the caller's contract, forwarded.
    ///         unsafe { self.inner.sync_for_device(mapping, offset, len) }
    ///     }
    ///     unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
    ///         self.syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ///         // SAFETY: the caller's contract, forwarded.
    ///         unsafe { self.inner.sync_for_cpu(mapping, offset, len) }
    ///     }
    ///     fn on_unbind(&self) {
    ///         self.inner.on_unbind()
    ///     }
    /// }
    ///
    /// let checker = CheckingDevice::new(CheckMode::Record);
    /// let ops = CountingSyncs { inner: checker.clone(), syncs: Default::default() };
    /// // The wrapper hides the checking device: hand it over as the check.
    /// let device = Device::with_cpu_access_check(ops, checker.clone());
    /// let mut rx = device.pool_builder().direction(DmaDirection::FromDevice).build()?;
    /// let page = rx.alloc()?;
    /// checker.device_write(page.dma_addr(), b"frame")?;
    /// let _ = page.as_slice(); // no sync_for_cpu first
    /// assert!(matches!(
    ///     checker.violations()[..],
    ///     [Violation::CpuReadBeforeSync { offset: 0, first_unsynced: 0, .. }]
    /// ));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_cpu_access_check(ops: impl DmaOps, check: impl CpuAccessCheck) -> Self {
        Self::bind(Box::new(ops), Some(Box::new(check)))
    }
}

impl Device<Untracked> {
    /// Binds a device without in-flight tracking. For measuring the cost of
    /// tracking only: see [`Untracked`] for what it gives up. A
    /// [`CheckingDevice`] as `ops` checks CPU accesses, as with
    /// [`Device::new`].
    pub fn new_untracked(ops: impl DmaOps) -> Self {
        let check = checking::detect(&ops);
        Self::bind(Box::new(ops), check)
    }
}

impl<M: TrackingMode> Device<M> {
    fn bind(ops: Box<dyn DmaOps>, cpu_access_check: Option<Box<dyn CpuAccessCheck>>) -> Self {
        Self {
            shared: Arc::new(DeviceShared::new(ops, cpu_access_check)),
        }
    }

    /// Starts configuring a pool on this device.
    pub fn pool_builder(&self) -> PagePoolBuilder<'_, M> {
        PagePoolBuilder::new(&self.shared)
    }

    /// Whether the device is still bound.
    pub fn is_bound(&self) -> bool {
        self.shared.registry.lock().bound
    }

    /// Mappings recorded in the in-flight tracker: pages mapped one by one
    /// plus regions (0 when untracked).
    pub fn tracked_mappings(&self) -> usize {
        self.shared.tracker.len() + self.shared.region_tracker.len()
    }

    /// Heap bytes the in-flight tracker uses now (page and region records).
    pub fn tracker_heap_bytes(&self) -> usize {
        self.shared.tracker.heap_bytes() + self.shared.region_tracker.heap_bytes()
    }

    /// Untracked devices only: pages whose memory was leaked because they
    /// came back still mapped after unbind.
    pub fn leaked_pages(&self) -> usize {
        self.shared.leaked_pages.load(Ordering::Relaxed)
    }

    /// Mappings of this device whose unmap the backend reported as failed
    /// (see [`DmaOps::unmap`]), and their bytes: memory the pool keeps for
    /// good, since the device may still reach it.
    pub fn unmap_failures(&self) -> (u64, u64) {
        let kept = self.shared.kept.total();
        (kept.mappings, kept.bytes)
    }

    /// The last unmap failure the backend reported, if any.
    pub fn last_unmap_error(&self) -> Option<crate::UnmapError> {
        self.shared.kept.last_error()
    }

    /// A `page-pool-get` snapshot of every pool still open on the device,
    /// each with its label, queue and counters; callable from any thread
    /// (a monitor), while the pools run.
    pub fn pools(&self) -> Vec<PoolInfo> {
        let pools: Vec<_> = self.shared.registry.lock().pools.clone();
        pools.iter().map(|p| p.info()).collect()
    }

    /// The sum of the counters of every pool of the device still listed:
    /// the open ones ([`pools`](Self::pools)) and those dropped with pages
    /// still out ([`detached_pools`](Self::detached_pools)). Readable from
    /// any thread, like each pool's.
    ///
    /// ```
    /// use pagepool::{Device, IdentityDma};
    ///
    /// let device = Device::new(IdentityDma::new());
    /// let mut rx0 = device.pool_builder().label("eth0-rx").queue(0).build()?;
    /// let mut rx1 = device.pool_builder().label("eth0-rx").queue(1).build()?;
    /// let (a, b) = (rx0.alloc()?, rx1.alloc()?);
    /// // A monitor thread reads every queue's counters through the device.
    /// std::thread::scope(|s| {
    ///     s.spawn(|| {
    ///         for pool in device.pools() {
    ///             println!("{pool}\n{}", pool.stats);
    ///         }
    ///         assert_eq!(device.stats().pages_held, 2);
    ///     });
    /// });
    /// drop((a, b));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stats(&self) -> PoolStats {
        let registry = self.shared.registry.lock();
        let listed: Vec<_> = registry
            .pools
            .iter()
            .chain(&registry.detached)
            .cloned()
            .collect();
        drop(registry);
        listed.iter().map(|pool| pool.stats()).sum()
    }

    /// `page-pool-get` snapshots of the pools their owners dropped while
    /// pages were still in flight, each with its `detach_time`; a pool is
    /// listed until its last page comes back or the device unbinds.
    pub fn detached_pools(&self) -> Vec<PoolInfo> {
        let pools: Vec<_> = {
            let mut registry = self.shared.registry.lock();
            registry.prune_detached();
            registry.detached.clone()
        };
        pools.iter().map(|p| p.info()).collect()
    }

    /// The driver's remove path: synchronously unmaps every mapping of the
    /// device, including pages held outside any pool, then drops the ops.
    ///
    /// Waits only for device calls already running on other threads (one
    /// call per thread at most), never for page holders, page sources or
    /// batches. A second call from another thread waits for the first to
    /// finish and returns [`UnbindError::AlreadyUnbound`]; a call from inside
    /// a callback of this device returns [`UnbindError::InsideCallback`] at
    /// once (see [`DmaOps`] for what callbacks may do).
    ///
    /// If a callback panics while `unbind` runs (`unmap_batch`, `on_unbind`,
    /// the ops' `Drop`, `PageSource::free_pages`), `unbind` still completes
    /// every step: every remaining mapping is unmapped exactly once, the ops
    /// are retired, every page it owns is freed. Then the first panic is
    /// resumed to the caller; the device is unbound either way.
    pub fn unbind(&self) -> Result<UnbindReport, UnbindError> {
        unbind(&self.shared)
    }
}

/// [`Device::unbind`], on the device's shared state (also run, deferred,
/// after the last handle is gone: see [`Device`]'s `Drop`).
fn unbind<M: TrackingMode>(shared: &DeviceShared<M>) -> Result<UnbindReport, UnbindError> {
    let key = shared.key();
    let me = held::thread_token();
    // Inside a call of this device (waiting for it would wait for our own
    // caller), or inside a callback of this thread's unbind of it (which
    // holds `unbinding`).
    if held::contains(key) || shared.unbinder.load(Ordering::Relaxed) == me {
        return Err(UnbindError::InsideCallback);
    }
    let started = Instant::now();
    trace::event!(info, device = key, "unbind started");
    let one_at_a_time = shared.unbinding.lock();
    // From here on a callback that calls `unbind` is refused, not
    // deadlocked on `unbinding`.
    let unbinding = Unbinder::mark(&shared.unbinder, me);

    // 1. Stop new pools, allocations and recycling.
    let pools = {
        let mut registry = shared.registry.lock();
        if !registry.bound {
            return Err(UnbindError::AlreadyUnbound);
        }
        registry.bound = false;
        let mut pools = core::mem::take(&mut registry.pools);
        let open = pools.len();
        pools.append(&mut registry.detached);
        (pools, open)
    };
    let (pools, open_pools) = pools;
    for pool in &pools {
        pool.closed.store(true, Ordering::Release);
        pool.gate.close();
    }
    for _zombie in &pools[open_pools..] {
        trace::event!(
            warn,
            pool = _zombie.id,
            pages = _zombie.pages_allocated.load(Ordering::Relaxed),
            "a detached pool still holds pages at unbind: unmapping them"
        );
    }
    // 2. Wait for the device calls already running; none starts now.
    held::wait_for_threads(key);
    for pool in &pools {
        pool.gate.wait_idle();
    }

    // SAFETY: this is the device's unbind, before the ops are retired.
    let ops = unsafe { shared.ops.get() };
    let mut panics = Panics::new();
    let mut report = UnbindReport {
        pools: open_pools,
        ..UnbindReport::default()
    };
    if let Some(ops) = ops {
        // 3. and 4.
        let failed_before = shared.kept.total().mappings;
        unmap_everything(shared, ops, &pools, &mut report, &mut panics);
        // Only `unbind` makes device calls now: every new failure is its.
        report.unmap_failures = (shared.kept.total().mappings - failed_before) as usize;
        // 5. The last call the device gets.
        panics.run(|| ops.on_unbind());
    }
    // SAFETY: every gate is closed and idle; `ops` is not used again.
    let retired = unsafe { shared.ops.take() };
    // 6. The device is gone: free what came back meanwhile.
    let handed_over = shared.finish_unbind();
    panics.run(|| drop(retired));
    // SAFETY: every page and region handed over was unmapped in step 3 or
    // 4 (its record was still in a tracker when it was handed over).
    panics.run(|| unsafe { free_pages(&handed_over.pages) });
    // SAFETY: as above; each region's last page was retired by the
    // thread that handed it over.
    panics.run(|| unsafe { free_regions(&handed_over.regions) });
    panics.run(|| drop(pools));
    report.duration = started.elapsed();
    trace::event!(info, device = key, %report, "unbind finished");
    // Unlocked before a callback's panic is resumed: a guard dropped
    // while unwinding would poison a lock that poisons (loom's).
    drop(unbinding);
    drop(one_at_a_time);
    panics.resume();
    Ok(report)
}

/// Marks a thread as the one running a device's `unbind` (see
/// `DeviceShared::unbinder`) until dropped.
struct Unbinder<'a>(&'a AtomicUsize);

impl<'a> Unbinder<'a> {
    /// Called with the device's `unbinding` lock held.
    fn mark(unbinder: &'a AtomicUsize, thread: usize) -> Self {
        // Relaxed: a thread compares what it reads with its own token only,
        // which no other live thread writes; every writer clears its token
        // before the lock is released, and a thread that later gets the same
        // token starts after that one exited.
        unbinder.store(thread, Ordering::Relaxed);
        Self(unbinder)
    }
}

impl Drop for Unbinder<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// Steps 3 and 4 of [`Device::unbind`], with `ops` still valid and no other
/// device call possible: drains every ring (unmapping and freeing its
/// pages), then unmaps every mapping still recorded, wherever its page is
/// (or, untracked, counts the mappings it cannot reach).
fn unmap_everything<M: TrackingMode>(
    shared: &DeviceShared<M>,
    ops: &dyn DmaOps,
    pools: &[Arc<PoolShared<M>>],
    report: &mut UnbindReport,
    panics: &mut Panics,
) {
    let mut unmapper = Unmapper::new();
    let unmap = |meta: &PageMeta<M>,
                 unmapper: &mut Unmapper,
                 report: &mut UnbindReport,
                 panics: &mut Panics| {
        report.bytes_unmapped += meta.pool.config.page_len as u64;
        if unmapper.push(meta) {
            // SAFETY: every mapping pushed had its record removed by this
            // unbind (or, untracked, sat in a closed ring): unmapped once.
            panics.run(|| unsafe { unmapper.flush(ops, &shared.kept) });
        }
    };

    // 3. Drain the rings (and spare lists): these pages are the pool's, so
    // free them too. A region's pages are retired instead: their region is
    // unmapped whole in step 4 and freed (in step 6) once all its pages are.
    for pool in pools {
        let mut pages = pool.ring.close();
        if let Some(regions) = &pool.regions {
            pages.extend(regions.spare.close());
        }
        for &page in &pages {
            // SAFETY: the closed ring handed these pages to us.
            let meta = unsafe { meta_ref(page) };
            if meta.region().is_none()
                && (!M::TRACKED || shared.tracker.remove(meta.record(), page))
            {
                unmap(meta, &mut unmapper, report, panics);
            }
        }
        // SAFETY: as in `unmap`.
        panics.run(|| unsafe { unmapper.flush(ops, &shared.kept) });
        report.pages_from_rings += pages.len();
        // SAFETY: unmapped above (their records were ours), owned.
        panics.run(|| unsafe { free_pages(&pages) });
    }

    // 4. Unmap every mapping still recorded, wherever its page is.
    if M::TRACKED {
        report.pages_held_or_cached = shared.tracker.close_and_drain(|page| {
            // SAFETY: a recorded page is live until its record is removed
            // and it is unmapped: its holder cannot free it now (the gates
            // are closed, so it hands the page to this unbind instead).
            let meta = unsafe { meta_ref(page) };
            unmap(meta, &mut unmapper, report, panics);
        });
        report.regions_unmapped = shared.region_tracker.close_and_drain(|region| {
            // SAFETY: a recorded region is live until its record is removed
            // and it is unmapped: whoever retires its last page now hands it
            // to this unbind instead of freeing it.
            let region = unsafe { region.as_ref() };
            report.bytes_unmapped += region.mapping().len as u64;
            if unmapper.push_region(region) {
                // SAFETY: as in `unmap`: each region's record was removed by
                // this unbind.
                panics.run(|| unsafe { unmapper.flush(ops, &shared.kept) });
            }
        });
        // SAFETY: as in `unmap`.
        panics.run(|| unsafe { unmapper.flush(ops, &shared.kept) });
    } else {
        report.mappings_left = pools
            .iter()
            .map(|p| p.pages_mapped.load(Ordering::Relaxed))
            .sum();
    }
}

impl<M: TrackingMode> Drop for Device<M> {
    /// Unbinds the device (see [`Device`] for when, if dropped inside one
    /// of its own callbacks).
    fn drop(&mut self) {
        // Unbinding an unbound device is a no-op; nothing to report here. A
        // callback's panic is resumed (or dropped if already unwinding).
        if let Err(UnbindError::InsideCallback) = unbind(&self.shared) {
            let key = self.shared.key();
            // Inside a call of this device on this thread: the unbind runs
            // when the outermost such call returns. (The other refusal, a
            // callback of this thread's own unbind of the device, cannot
            // drop the handle that unbind borrows, and that unbind finishes
            // the job anyway.)
            // BROKEN VARIANT (test-only, `--cfg pagepool_broken`,
            // PAGEPOOL_BROKEN=drop-inside-callback-forgets): discard the
            // refusal, as the drop once did, so the device stays bound with
            // its mappings live. Caught by the deferred-unbind loom model.
            #[cfg(pagepool_broken)]
            if crate::sync::broken("drop-inside-callback-forgets") {
                return;
            }
            if held::contains(key) {
                let shared = Arc::clone(&self.shared);
                held::defer_unbind(
                    key,
                    Box::new(move || {
                        let _ = unbind(&shared);
                    }),
                );
            }
        }
    }
}

impl<M: TrackingMode> fmt::Debug for Device<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("bound", &self.is_bound())
            .field("tracked", &M::TRACKED)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checking::{CheckMode, CheckingDevice};
    use crate::error::AllocError;
    use crate::error::BuildError;

    #[test]
    fn unbind_unmaps_held_and_cached_pages_and_stops_calls() {
        let checker = CheckingDevice::new(CheckMode::Panic);
        let device = Device::new(checker.clone());
        let mut pool = device
            .pool_builder()
            .cache_size(4)
            .refill_batch(4)
            .ring_size(4)
            .build()
            .unwrap();
        let held = pool.alloc().unwrap();
        let returned = pool.alloc().unwrap();
        drop(returned); // kept back in this thread's batch,
        crate::flush_thread_returns(); // then into the ring
        let report = device.unbind().unwrap();
        assert_eq!(report.pools, 1);
        assert_eq!(report.pages_from_rings, 1);
        assert_eq!(
            report.pages_held_or_cached, 3,
            "the held page and the two cached ones"
        );
        assert_eq!(report.bytes_unmapped, 4 * 4096);
        assert_eq!(checker.live_mappings(), 0);
        let calls = checker.stats();
        assert_eq!(pool.alloc().unwrap_err(), AllocError::Unbound);
        let mut held = held;
        held.as_mut_slice()[0] = 7; // still valid memory
        assert_eq!(held.as_slice()[0], 7);
        drop(held);
        drop(pool);
        assert_eq!(
            checker.stats(),
            calls,
            "nothing reached the device after unbind"
        );
        assert!(checker.verdict().is_clean());
    }

    #[test]
    fn the_report_displays_every_count() {
        let report = UnbindReport {
            pools: 2,
            pages_from_rings: 3,
            pages_held_or_cached: 4,
            regions_unmapped: 5,
            bytes_unmapped: 6,
            mappings_left: 7,
            unmap_failures: 9,
            duration: Duration::from_millis(8),
        };
        assert_eq!(
            report.to_string(),
            "unbind: 2 pools, 3 pages from rings + 4 held or cached + 5 regions unmapped \
             (6 bytes), 7 mappings left, 9 unmaps failed, in 8ms"
        );
    }

    #[test]
    fn debug_shows_bound_and_tracked() {
        let device = Device::new(CheckingDevice::new(CheckMode::Panic));
        assert_eq!(
            format!("{device:?}"),
            "Device { bound: true, tracked: true, .. }"
        );
        device.unbind().unwrap();
        let untracked = Device::new_untracked(CheckingDevice::new(CheckMode::Panic));
        untracked.unbind().unwrap();
        assert_eq!(
            format!("{untracked:?}"),
            "Device { bound: false, tracked: false, .. }"
        );
    }

    /// The tracker's heap as `Device` reports it: both trackers' shards,
    /// then one word per recorded page.
    #[test]
    fn tracker_heap_bytes_counts_each_record() {
        let device = Device::new(CheckingDevice::new(CheckMode::Panic));
        let base = device.tracker_heap_bytes();
        assert!(base >= 2 * crate::tracker::SHARDS * 128, "padded shards");
        let mut pool = device.pool_builder().build().unwrap();
        let page = pool.alloc().unwrap();
        let records = device.tracked_mappings();
        assert!(records > 0);
        assert!(device.tracker_heap_bytes() >= base + records * core::mem::size_of::<usize>());
        drop(page);
    }

    /// `unbind` hands the device its unmaps in full batches of
    /// `UNMAP_BATCH`, not one call per page.
    #[test]
    fn unbind_unmaps_in_full_batches() {
        use crate::mapping::unmapper::UNMAP_BATCH;
        let checker = CheckingDevice::new(CheckMode::Panic);
        let device = Device::new(checker.clone());
        let mut pool = device.pool_builder().build().unwrap();
        let held: Vec<_> = (0..2 * UNMAP_BATCH + 1)
            .map(|_| pool.alloc().unwrap())
            .collect();
        let before = checker.stats();
        let report = device.unbind().unwrap();
        let after = checker.stats();
        let unmaps = (after.unmaps - before.unmaps) as usize;
        assert_eq!(unmaps, report.pages_held_or_cached);
        assert!(unmaps > 2 * UNMAP_BATCH);
        assert_eq!(
            (after.batch_unmaps - before.batch_unmaps) as usize,
            unmaps.div_ceil(UNMAP_BATCH),
            "one call per {UNMAP_BATCH} mappings"
        );
        drop(held);
        drop(pool);
        assert!(checker.verdict().is_clean());
    }

    #[test]
    fn unbind_twice_and_drop_are_safe() {
        let checker = CheckingDevice::new(CheckMode::Panic);
        let device = Device::new(checker.clone());
        assert!(device.unbind().is_ok());
        assert_eq!(device.unbind(), Err(UnbindError::AlreadyUnbound));
        assert!(!device.is_bound());
        assert!(matches!(
            device.pool_builder().build(),
            Err(BuildError::Unbound)
        ));
        drop(device);
        assert!(checker.is_unbound());
    }

    #[test]
    fn dropping_the_device_unbinds_it() {
        let checker = CheckingDevice::new(CheckMode::Panic);
        let device = Device::new(checker.clone());
        let mut pool = device.pool_builder().build().unwrap();
        let page = pool.alloc().unwrap();
        drop(device);
        assert!(checker.is_unbound());
        assert_eq!(checker.live_mappings(), 0);
        drop(page);
        drop(pool);
    }

    #[test]
    // Untracked pages that come back still mapped are leaked on purpose,
    // which Miri's leak check reports.
    #[cfg_attr(miri, ignore)]
    fn untracked_unbind_reports_what_it_could_not_reach() {
        let checker = CheckingDevice::new(CheckMode::Record);
        let device = Device::new_untracked(checker.clone());
        let mut pool = device
            .pool_builder()
            .cache_size(2)
            .refill_batch(2)
            .build()
            .unwrap();
        let held = pool.alloc().unwrap();
        let report = device.unbind().unwrap();
        assert_eq!(report.mappings_left, 2);
        drop(held);
        drop(pool);
        assert_eq!(
            device.leaked_pages(),
            2,
            "still-mapped pages are leaked, not freed"
        );
        assert!(
            !checker.verdict().is_clean(),
            "the checker reports the leaked mappings"
        );
    }
}
