//! Unmaps that fail: a backend reports that a mapping may still exist
//! (`DmaOps::unmap` / `unmap_batch` returning an error), and the pool keeps
//! that memory for good: never freed, never handed out again, counted in
//! the pool's stats, the device's totals and the unbind report. Invariant 4
//! must hold on a backend whose unmaps fail, not only on one whose unmaps
//! cannot.
//!
//! Two backends fail here: the checking device itself
//! (`CheckingDevice::fail_next_unmaps`, whose failed mappings stay live, so
//! the guarded page source sees any free of memory it still maps), and
//! [`FaultyUnmaps`], a backend that fails the unmaps of chosen addresses or
//! answers with an index outside the batch.

mod support;

use std::collections::HashSet;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pagepool::checking::{CheckingDevice, Violation};
use pagepool::{
    Device, DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, OutOfMemory, RegionBlock,
    RegionSource, SystemRegions, UnmapBatchError, UnmapError, PAGE_SIZE,
};

use support::checks::{checker, has_violation, GuardedPages};

/// The checker's live mappings, by CPU address.
fn live_cpu(checker: &CheckingDevice) -> HashSet<usize> {
    checker
        .live_mapping_list()
        .iter()
        .map(|m| m.cpu_addr)
        .collect()
}

/// Pages released while the pool is open (its owner drops it) whose unmaps
/// fail stay allocated and mapped; the others are freed; nothing is freed
/// while mapped; the memory is never handed out again.
#[test]
fn a_failed_release_unmap_keeps_the_page_for_good() {
    let checker = checker();
    let pages = GuardedPages::new(&checker);
    let device = Device::new(checker.clone());
    let mut pool = device
        .pool_builder()
        .cache_size(8)
        .refill_batch(8)
        .page_source(pages.clone())
        .build()
        .unwrap();
    let page = pool.alloc().unwrap();
    drop(page);
    assert_eq!(pages.counting.allocated(), 8);
    checker.fail_next_unmaps(2);
    drop(pool); // releases its 8 cached pages: one batch, 2 unmaps fail
    assert_eq!(checker.stats().injected_unmap_failures, 2);
    assert_eq!(pages.freed_while_mapped(), 0, "invariant 4");
    assert_eq!(pages.live(), 2, "the two pages whose unmap failed are kept");
    let kept = live_cpu(&checker);
    assert_eq!(kept.len(), 2, "the device still maps them");
    assert_eq!(device.unmap_failures(), (2, 2 * PAGE_SIZE as u64));
    assert_eq!(device.last_unmap_error(), Some(UnmapError::Injected));

    // The device can still write there: this is why the memory is kept.
    let still_mapped = checker.live_mapping_list()[0].mapping.addr;
    checker.device_write(still_mapped, b"late DMA").unwrap();

    // New pages never reuse the kept memory.
    let mut pool = device
        .pool_builder()
        .cache_size(8)
        .refill_batch(8)
        .page_source(pages.clone())
        .build()
        .unwrap();
    let fresh: Vec<_> = (0..16).map(|_| pool.alloc().unwrap()).collect();
    for page in &fresh {
        assert!(!kept.contains(&(page.as_slice().as_ptr() as usize)));
    }
    drop(fresh);
    drop(pool);
    let report = device.unbind().unwrap();
    assert_eq!(report.unmap_failures, 0, "unbind makes no new failure");
    assert_eq!(pages.live(), 2, "still kept after unbind");
    assert_eq!(pages.freed_while_mapped(), 0);
    assert!(
        has_violation(&checker, |v| matches!(v, Violation::Leak { count: 2, .. })),
        "the checker sees the two mappings the backend could not remove:\n{}",
        checker.report()
    );
}

/// Unmaps that fail inside `unbind`, for pages cached in the pool and
/// pages held outside it: the report counts them, the pool's stats count
/// them, and when the holders drop their pages and the pool, nothing kept
/// is freed (the rest is).
#[test]
fn failed_unmaps_at_unbind_are_reported_and_their_pages_kept() {
    let checker = checker();
    let pages = GuardedPages::new(&checker);
    let device = Device::new(checker.clone());
    let mut pool = device
        .pool_builder()
        .cache_size(4)
        .refill_batch(4)
        .page_source(pages.clone())
        .build()
        .unwrap();
    let held: Vec<_> = (0..6).map(|_| pool.alloc().unwrap()).collect();
    let mapped = checker.live_mappings();
    assert_eq!(mapped, 8, "6 held, 2 cached");
    checker.fail_next_unmaps(3);
    let report = device.unbind().unwrap();
    assert_eq!(report.pages_held_or_cached, 8);
    assert_eq!(report.unmap_failures, 3);
    assert!(report.to_string().contains("3 unmaps failed"), "{report}");
    let stats = pool.stats();
    assert_eq!(stats.unmap_failures, 3);
    assert_eq!(stats.bytes_kept, 3 * PAGE_SIZE as u64);
    assert_eq!(stats.pages_mapped, 0, "the pool counts no page as mapped");
    let kept = live_cpu(&checker);
    assert_eq!(kept.len(), 3);
    // Held pages stay valid memory for their holders, kept ones too.
    let mut held = held;
    for page in &mut held {
        page.as_mut_slice()[0] = 0x5a;
    }
    drop(held);
    drop(pool);
    assert_eq!(pages.freed_while_mapped(), 0, "invariant 4");
    assert_eq!(pages.live(), 3, "exactly the kept pages stay allocated");
    assert_eq!(pages.counting.double_frees(), 0);
    assert_eq!(device.unmap_failures(), (3, 3 * PAGE_SIZE as u64));
}

/// Region memory from the system, with every free recorded.
#[derive(Clone, Default)]
struct RecordedRegions {
    freed: Arc<Mutex<Vec<usize>>>,
}

// SAFETY: forwards to `SystemRegions`; the record does not touch memory.
unsafe impl RegionSource for RecordedRegions {
    fn alloc_region(&self, len: usize) -> Result<RegionBlock, OutOfMemory> {
        SystemRegions::without_huge_tlb().alloc_region(len)
    }

    unsafe fn free_region(&self, block: RegionBlock, len: usize) {
        self.freed.lock().unwrap().push(block.ptr.as_ptr() as usize);
        // SAFETY: forwarded contract.
        unsafe { SystemRegions::without_huge_tlb().free_region(block, len) }
    }
}

/// A region whose unmap fails at unbind is kept with all its pages, even
/// after the last of them comes back; a region whose unmap succeeded is
/// freed then.
#[test]
fn a_region_whose_unmap_failed_is_never_freed() {
    const REGION: usize = 64 << 10;
    let checker = checker();
    let source = RecordedRegions::default();
    let device = Device::new(checker.clone());
    let mut pool = device
        .pool_builder()
        .region_size(REGION)
        .region_source(source.clone())
        .cache_size(16)
        .refill_batch(16)
        .build()
        .unwrap();
    // Two regions: 16 pages each.
    let held: Vec<_> = (0..17).map(|_| pool.alloc().unwrap()).collect();
    assert_eq!(checker.live_mappings(), 2);
    checker.fail_next_unmaps(1);
    let report = device.unbind().unwrap();
    assert_eq!(report.regions_unmapped, 2);
    assert_eq!(report.unmap_failures, 1);
    let kept = live_cpu(&checker);
    assert_eq!(kept.len(), 1);
    assert_eq!(pool.stats().unmap_failures, 1);
    assert_eq!(pool.stats().bytes_kept, REGION as u64);
    drop(held);
    drop(pool);
    let freed = source.freed.lock().unwrap().clone();
    assert_eq!(freed.len(), 1, "only the unmapped region is freed");
    assert!(!kept.contains(&freed[0]), "never the kept one");
    assert_eq!(device.unmap_failures(), (1, REGION as u64));
}

/// A backend that fails the unmaps of chosen device addresses (the mapping
/// stays on the checking device behind it), or, when `bogus_index` is set,
/// answers a batch with an index outside it.
struct FaultyUnmaps {
    inner: CheckingDevice,
    fail: Mutex<HashSet<u64>>,
    bogus_index: AtomicBool,
    batches: AtomicUsize,
}

impl DmaOps for FaultyUnmaps {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        // SAFETY: forwarded contract.
        unsafe { self.inner.map(cpu, len, direction) }
    }

    unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
        if self.fail.lock().unwrap().contains(&mapping.addr.0) {
            return Err(UnmapError::Os {
                op: "test unmap",
                errno: 5,
            });
        }
        // SAFETY: forwarded contract.
        unsafe { self.inner.unmap(mapping) }
    }

    unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) -> Result<(), UnmapBatchError> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        if self.bogus_index.load(Ordering::SeqCst) {
            // Unmaps nothing, and names a mapping that is not in the batch.
            let mut error = UnmapBatchError::new();
            error.push(mappings.len(), UnmapError::Injected);
            return Err(error);
        }
        let mut error = UnmapBatchError::new();
        for (index, mapping) in mappings.iter().enumerate() {
            // SAFETY: forwarded contract, each element once.
            if let Err(e) = unsafe { self.unmap(*mapping) } {
                error.push(index, e);
            }
        }
        error.into_result()
    }

    unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.inner.sync_for_device(mapping, offset, len) }
    }

    unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.inner.sync_for_cpu(mapping, offset, len) }
    }

    fn on_unbind(&self) {
        self.inner.on_unbind()
    }
}

/// Failures reported by index in a batch keep exactly those pages; an
/// answer naming an index outside the batch cannot be trusted, so the
/// whole batch is kept.
#[test]
fn a_faulty_backend_keeps_exactly_what_it_reports() {
    let checker = checker();
    let pages = GuardedPages::new(&checker);
    let ops = FaultyUnmaps {
        inner: checker.clone(),
        fail: Mutex::default(),
        bogus_index: AtomicBool::new(false),
        batches: AtomicUsize::new(0),
    };
    let ops = Arc::new(ops);
    struct Shared(Arc<FaultyUnmaps>);
    impl DmaOps for Shared {
        unsafe fn map(
            &self,
            cpu: NonNull<u8>,
            len: usize,
            direction: DmaDirection,
        ) -> Result<DmaAddr, DmaError> {
            // SAFETY: forwarded contract.
            unsafe { self.0.map(cpu, len, direction) }
        }
        unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
            // SAFETY: forwarded contract.
            unsafe { self.0.unmap(mapping) }
        }
        unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) -> Result<(), UnmapBatchError> {
            // SAFETY: forwarded contract.
            unsafe { self.0.unmap_batch(mappings) }
        }
        unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
            // SAFETY: forwarded contract.
            unsafe { self.0.sync_for_device(mapping, offset, len) }
        }
        unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
            // SAFETY: forwarded contract.
            unsafe { self.0.sync_for_cpu(mapping, offset, len) }
        }
        fn on_unbind(&self) {
            self.0.on_unbind()
        }
    }
    let device = Device::with_cpu_access_check(Shared(Arc::clone(&ops)), checker.clone());
    let build = || {
        device
            .pool_builder()
            .cache_size(4)
            .refill_batch(4)
            .page_source(pages.clone())
            .build()
            .unwrap()
    };

    // By index: the page at one address fails, three are freed.
    let mut pool = build();
    let page = pool.alloc().unwrap();
    let bad = page.dma_addr();
    drop(page);
    ops.fail.lock().unwrap().insert(bad.0);
    drop(pool);
    assert_eq!(pages.live(), 1);
    assert_eq!(
        checker
            .live_mapping_list()
            .iter()
            .map(|m| m.mapping.addr)
            .collect::<Vec<_>>(),
        [bad]
    );
    assert_eq!(device.unmap_failures().0, 1);

    // An index outside the batch: all four pages of the batch are kept.
    ops.bogus_index.store(true, Ordering::SeqCst);
    let mut pool = build();
    drop(pool.alloc().unwrap());
    let batches = ops.batches.load(Ordering::SeqCst);
    drop(pool);
    assert_eq!(ops.batches.load(Ordering::SeqCst), batches + 1);
    assert_eq!(pages.live(), 1 + 4);
    assert_eq!(device.unmap_failures().0, 1 + 4);
    assert_eq!(pages.freed_while_mapped(), 0, "invariant 4");

    ops.bogus_index.store(false, Ordering::SeqCst);
    ops.fail.lock().unwrap().clear();
    let report = device.unbind().unwrap();
    assert_eq!(report.unmap_failures, 0);
    assert_eq!(pages.freed_while_mapped(), 0);
    assert_eq!(pages.live(), 5, "kept memory is never freed");
}

/// The region-mapped pool's source frees nothing whose unmap failed even
/// when the pool is dropped while open (the last page retires the region
/// and releases it through the device).
#[test]
fn a_region_released_by_its_pool_is_kept_when_its_unmap_fails() {
    const REGION: usize = 64 << 10;
    let checker = checker();
    let source = RecordedRegions::default();
    let device = Device::new(checker.clone());
    let mut pool = device
        .pool_builder()
        .region_size(REGION)
        .region_source(source.clone())
        .cache_size(16)
        .refill_batch(16)
        .build()
        .unwrap();
    drop(pool.alloc().unwrap());
    checker.fail_next_unmaps(1);
    drop(pool);
    assert!(source.freed.lock().unwrap().is_empty(), "kept, not freed");
    assert_eq!(checker.live_mappings(), 1);
    assert_eq!(device.unmap_failures(), (1, REGION as u64));
    let report = device.unbind().unwrap();
    assert_eq!(report.unmap_failures, 0);
    assert!(source.freed.lock().unwrap().is_empty());
}
