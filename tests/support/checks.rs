//! Checks shared by the integration tests: the checking device as the tests
//! configure it, a page source that proves invariant 4, a `DmaOps` spy that
//! proves invariant 2, a `DmaOps` that only counts its calls, and the
//! "everything is clean after unbind" assertion.

use std::collections::{BTreeMap, HashMap};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagepool::checking::{
    CheckMode, CheckingDevice, CheckingStats, CpuAccess, CpuAccessCheck, Violation,
};
use pagepool::{
    Device, DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, OutOfMemory, PageSource,
    UnmapBatchError, UnmapError, PAGE_SIZE,
};

use super::counting::CountingPages;

/// A checking device in `Record` mode that accepts a for-device sync of a
/// `FromDevice` mapping as an ownership transfer (what Linux's page_pool
/// does on recycle with `PP_FLAG_DMA_SYNC_DEV`).
pub fn checker() -> CheckingDevice {
    CheckingDevice::builder()
        .mode(CheckMode::Record)
        .strict_sync_directions(false)
        .build()
}

/// As [`checker`], with every `DmaOps` call delayed to widen race windows.
pub fn slow_checker(delay: Duration) -> CheckingDevice {
    CheckingDevice::builder()
        .mode(CheckMode::Record)
        .strict_sync_directions(false)
        .call_delay(delay)
        .build()
}

/// Where [`GuardedPages`] learns which memory is mapped.
#[derive(Clone)]
enum MappedSource {
    /// The checking device's own records (exact, but slow with many
    /// device-written mappings: fine for small tests).
    Checker(CheckingDevice),
    /// A [`SpyOps`]'s record of what `map` returned and `unmap` has
    /// finished with (cheap; for the stress tests).
    Spy(Arc<SpyState>),
}

impl MappedSource {
    fn overlaps(&self, start: usize, end: usize) -> bool {
        match self {
            Self::Checker(checker) => checker
                .live_mapping_list()
                .iter()
                .any(|m| m.cpu_addr < end && start < m.cpu_addr + m.mapping.len),
            Self::Spy(state) => state.live.lock().unwrap().overlaps(start, end),
        }
    }
}

/// Page memory from [`CountingPages`] (each block freed exactly once) that
/// also checks, at every free, that the block is not inside any mapping the
/// device still has live: invariant 4, "page memory is never freed while
/// still mapped".
#[derive(Clone)]
pub struct GuardedPages {
    pub counting: CountingPages,
    mapped: MappedSource,
    freed_while_mapped: Arc<AtomicUsize>,
}

impl GuardedPages {
    /// Checks frees against the checker's live mappings.
    pub fn new(checker: &CheckingDevice) -> Self {
        Self {
            counting: CountingPages::default(),
            mapped: MappedSource::Checker(checker.clone()),
            freed_while_mapped: Arc::default(),
        }
    }

    /// Checks frees against the mappings a [`SpyOps`] saw made and not yet
    /// (completely) unmapped.
    pub fn with_spy(state: &Arc<SpyState>) -> Self {
        Self {
            counting: CountingPages::default(),
            mapped: MappedSource::Spy(Arc::clone(state)),
            freed_while_mapped: Arc::default(),
        }
    }

    /// Blocks freed while the checker still had them mapped.
    pub fn freed_while_mapped(&self) -> usize {
        self.freed_while_mapped.load(Ordering::SeqCst)
    }

    /// Blocks allocated and not yet freed.
    pub fn live(&self) -> usize {
        self.counting.live()
    }

    /// Every block was freed exactly once, none while mapped.
    #[track_caller]
    pub fn assert_all_freed_once_unmapped(&self) {
        assert_eq!(
            self.freed_while_mapped(),
            0,
            "page memory freed while still mapped (invariant 4)"
        );
        self.counting.assert_all_freed_once();
    }
}

// SAFETY: delegates to CountingPages (which delegates to GlobalPages); the
// extra check only reads the checker's records, never the block.
unsafe impl PageSource for GuardedPages {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        self.counting.alloc_pages(order)
    }

    unsafe fn free_pages(&self, block: NonNull<u8>, order: u32) {
        let start = block.as_ptr() as usize;
        let end = start + (PAGE_SIZE << order);
        if self.mapped.overlaps(start, end) {
            self.freed_while_mapped.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: forwarded contract.
        unsafe { self.counting.free_pages(block, order) }
    }
}

/// A page source that runs out of memory after `budget` blocks.
#[derive(Clone)]
pub struct LimitedPages {
    pub inner: CountingPages,
    budget: Arc<AtomicUsize>,
}

impl LimitedPages {
    pub fn new(budget: usize) -> Self {
        Self {
            inner: CountingPages::default(),
            budget: Arc::new(AtomicUsize::new(budget)),
        }
    }
}

// SAFETY: delegates to CountingPages or fails.
unsafe impl PageSource for LimitedPages {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        self.budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .map_err(|_| OutOfMemory)?;
        self.inner.alloc_pages(order)
    }

    unsafe fn free_pages(&self, block: NonNull<u8>, order: u32) {
        // SAFETY: forwarded contract.
        unsafe { self.inner.free_pages(block, order) }
    }
}

/// One `sync_for_device` / `sync_for_cpu` the pool made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncCall {
    pub to_device: bool,
    pub addr: DmaAddr,
    pub offset: usize,
    pub len: usize,
}

/// Live mappings as a [`SpyOps`] saw them: added when `map` returned, gone
/// when `unmap` returned.
#[derive(Default)]
pub struct LiveMaps {
    by_addr: HashMap<u64, usize>,
    by_cpu: BTreeMap<usize, usize>,
}

impl LiveMaps {
    fn insert(&mut self, addr: DmaAddr, cpu: usize, len: usize) {
        self.by_addr.insert(addr.0, cpu);
        self.by_cpu.insert(cpu, len);
    }
    fn remove(&mut self, addr: DmaAddr) {
        if let Some(cpu) = self.by_addr.remove(&addr.0) {
            self.by_cpu.remove(&cpu);
        }
    }
    fn overlaps(&self, start: usize, end: usize) -> bool {
        self.by_cpu
            .range(..end)
            .next_back()
            .is_some_and(|(&s, &len)| s + len > start)
    }
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }
}

/// What a [`SpyOps`] saw; shared with the test, outlives the ops.
#[derive(Default)]
pub struct SpyState {
    pub live: Mutex<LiveMaps>,
    /// `DmaOps` calls running right now.
    pub active: AtomicUsize,
    /// Set when `on_unbind` returned.
    pub unbound: AtomicBool,
    /// Calls that started after `on_unbind` returned.
    pub calls_after_unbind: AtomicUsize,
    /// Set when the pool dropped the ops.
    pub dropped: AtomicBool,
    pub syncs: Mutex<Vec<SyncCall>>,
}

impl SpyState {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }
    pub fn dropped(&self) -> bool {
        self.dropped.load(Ordering::SeqCst)
    }
    pub fn calls_after_unbind(&self) -> usize {
        self.calls_after_unbind.load(Ordering::SeqCst)
    }
    pub fn take_syncs(&self) -> Vec<SyncCall> {
        std::mem::take(&mut *self.syncs.lock().unwrap())
    }

    /// One call begins (counted as after unbind if it is); it ends when
    /// the guard drops.
    fn enter(&self) -> ActiveGuard<'_> {
        if self.unbound.load(Ordering::SeqCst) {
            self.calls_after_unbind.fetch_add(1, Ordering::SeqCst);
        }
        self.active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(self)
    }
}

/// Wraps a [`CheckingDevice`]: counts calls in progress, calls made after
/// `on_unbind`, logs every sync, and notes when the ops are dropped. Bind
/// it with [`SpyOps::into_device`], so that its CPU-access check
/// ([`SpyOps::check`]) is counted too.
pub struct SpyOps {
    inner: CheckingDevice,
    state: Arc<SpyState>,
}

/// The CPU-access check of a [`SpyOps`]: the checking device's, counted
/// as a call in the spy's record like every `DmaOps` call.
pub struct SpyCheck {
    inner: CheckingDevice,
    state: Arc<SpyState>,
}

impl CpuAccessCheck for SpyCheck {
    fn cpu_access(&self, mapping: DmaMapping, offset: usize, len: usize, access: CpuAccess) {
        let _g = self.state.enter();
        self.inner.cpu_access(mapping, offset, len, access)
    }
}

impl SpyOps {
    pub fn new(inner: &CheckingDevice) -> (Self, Arc<SpyState>) {
        let state = Arc::new(SpyState::default());
        (
            Self {
                inner: inner.clone(),
                state: Arc::clone(&state),
            },
            state,
        )
    }

    /// The spy's CPU-access check (see [`SpyCheck`]).
    pub fn check(&self) -> SpyCheck {
        SpyCheck {
            inner: self.inner.clone(),
            state: Arc::clone(&self.state),
        }
    }

    /// A device on the spy, with the spy's CPU-access check.
    pub fn into_device(self) -> Device {
        let check = self.check();
        Device::with_cpu_access_check(self, check)
    }

    fn enter(&self) -> ActiveGuard<'_> {
        self.state.enter()
    }
}

struct ActiveGuard<'a>(&'a SpyState);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for SpyOps {
    fn drop(&mut self) {
        self.state.dropped.store(true, Ordering::SeqCst);
    }
}

impl DmaOps for SpyOps {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        let _g = self.enter();
        // SAFETY: forwarded contract.
        let result = unsafe { self.inner.map(cpu, len, direction) };
        if let Ok(addr) = result {
            let cpu = cpu.as_ptr() as usize;
            self.state.live.lock().unwrap().insert(addr, cpu, len);
        }
        result
    }

    unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
        let _g = self.enter();
        // SAFETY: forwarded contract.
        let result = unsafe { self.inner.unmap(mapping) };
        if result.is_ok() {
            self.state.live.lock().unwrap().remove(mapping.addr);
        }
        result
    }

    unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) -> Result<(), UnmapBatchError> {
        let _g = self.enter();
        // SAFETY: forwarded contract.
        let result = unsafe { self.inner.unmap_batch(mappings) };
        let failed: Vec<usize> = match &result {
            Ok(()) => Vec::new(),
            Err(e) => e.failed().iter().map(|&(i, _)| i).collect(),
        };
        let mut live = self.state.live.lock().unwrap();
        for (i, m) in mappings.iter().enumerate() {
            // A mapping whose unmap failed stays mapped.
            if !failed.contains(&i) {
                live.remove(m.addr);
            }
        }
        result
    }

    unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
        let _g = self.enter();
        self.state.syncs.lock().unwrap().push(SyncCall {
            to_device: true,
            addr: mapping.addr,
            offset,
            len,
        });
        // SAFETY: forwarded contract.
        unsafe { self.inner.sync_for_device(mapping, offset, len) }
    }

    unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
        let _g = self.enter();
        self.state.syncs.lock().unwrap().push(SyncCall {
            to_device: false,
            addr: mapping.addr,
            offset,
            len,
        });
        // SAFETY: forwarded contract.
        unsafe { self.inner.sync_for_cpu(mapping, offset, len) }
    }

    fn on_unbind(&self) {
        {
            let _g = self.enter();
            self.inner.on_unbind();
        }
        self.state.unbound.store(true, Ordering::SeqCst);
    }
}

/// A device that maps nothing real: counts calls, hands out fake addresses.
#[derive(Clone, Default)]
pub struct CountingOps {
    pub maps: Arc<AtomicU64>,
    pub unmaps: Arc<AtomicU64>,
    pub syncs: Arc<AtomicU64>,
    next: Arc<AtomicU64>,
}

impl DmaOps for CountingOps {
    unsafe fn map(&self, _: NonNull<u8>, len: usize, _: DmaDirection) -> Result<DmaAddr, DmaError> {
        self.maps.fetch_add(1, Ordering::SeqCst);
        Ok(DmaAddr(
            0x1000_0000 + self.next.fetch_add(len as u64, Ordering::SeqCst),
        ))
    }
    unsafe fn unmap(&self, _: DmaMapping) -> Result<(), UnmapError> {
        self.unmaps.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    unsafe fn sync_for_device(&self, _: DmaMapping, _: usize, _: usize) {
        self.syncs.fetch_add(1, Ordering::SeqCst);
    }
    unsafe fn sync_for_cpu(&self, _: DmaMapping, _: usize, _: usize) {
        self.syncs.fetch_add(1, Ordering::SeqCst);
    }
}

/// Asserts what must hold once a tracked device is unbound: no violation,
/// no live mapping, every map matched by exactly one unmap, no call after
/// unbind (invariants 1 and 2 as the checker sees them).
#[track_caller]
pub fn assert_unbound_clean(checker: &CheckingDevice) {
    let verdict = checker.verdict();
    let stats = checker.stats();
    assert!(
        verdict.unbound,
        "on_unbind was never called:\n{}",
        checker.report()
    );
    assert_eq!(verdict.violations, 0, "violations:\n{}", checker.report());
    assert_eq!(
        verdict.live_mappings,
        0,
        "mappings outlived unbind:\n{}",
        checker.report()
    );
    assert_eq!(stats.calls_after_unbind, 0, "{}", checker.report());
    assert_eq!(
        stats.maps,
        stats.unmaps,
        "every mapping unmapped exactly once:\n{}",
        checker.report()
    );
}

/// The checker's counters, for "nothing happened since" comparisons.
pub fn calls(checker: &CheckingDevice) -> CheckingStats {
    checker.stats()
}

/// Whether a violation of the kind `pred` matches was recorded.
pub fn has_violation(checker: &CheckingDevice, pred: impl Fn(&Violation) -> bool) -> bool {
    checker.violations().iter().any(pred)
}
