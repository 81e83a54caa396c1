//! Region-mapped pools: one mapping per region, pages carved from it, and
//! the same unbind guarantees as pools mapped page by page: every region
//! unmapped exactly once whatever its pages are doing, held pages valid
//! memory afterwards, region memory freed only once unmapped and only when
//! its last page is gone.

use std::collections::HashSet;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::thread;

use pagepool::checking::{CheckMode, CheckingDevice, Violation};
use pagepool::{
    AllocError, BuildError, ConfigError, Device, DmaAddr, DmaDirection, DmaError, DmaMapping,
    DmaOps, OutOfMemory, PagePool, RegionBacking, RegionBlock, RegionSource, SystemRegions,
    UnmapError, DEFAULT_REGION_SIZE,
};

const REGION: usize = DEFAULT_REGION_SIZE;
const PAGES_PER_REGION: usize = REGION / 4096;

/// Region memory from the system, counted, and checked at every free: the
/// block must no longer be mapped on the checking device.
#[derive(Clone)]
struct CountingRegions {
    inner: SystemRegions,
    checker: CheckingDevice,
    state: Arc<Mutex<RegionCounts>>,
}

#[derive(Default)]
struct RegionCounts {
    allocs: usize,
    frees: usize,
    live: HashSet<usize>,
    freed_while_mapped: usize,
}

impl CountingRegions {
    fn new(checker: &CheckingDevice) -> Self {
        Self {
            inner: SystemRegions::new(),
            checker: checker.clone(),
            state: Arc::default(),
        }
    }

    fn allocs(&self) -> usize {
        self.state.lock().unwrap().allocs
    }

    fn frees(&self) -> usize {
        self.state.lock().unwrap().frees
    }

    /// Every block freed once, none while mapped, none left.
    fn assert_all_freed_once(&self) {
        let state = self.state.lock().unwrap();
        assert_eq!(state.allocs, state.frees, "every region freed");
        assert!(state.live.is_empty());
        assert_eq!(state.freed_while_mapped, 0, "a region freed while mapped");
    }
}

// SAFETY: forwards to `SystemRegions`, which upholds the contract; the
// bookkeeping does not touch the memory.
unsafe impl RegionSource for CountingRegions {
    fn alloc_region(&self, len: usize) -> Result<RegionBlock, OutOfMemory> {
        let block = self.inner.alloc_region(len)?;
        let mut state = self.state.lock().unwrap();
        state.allocs += 1;
        assert!(state.live.insert(block.ptr.as_ptr() as usize));
        Ok(RegionBlock {
            backing: RegionBacking::User,
            ..block
        })
    }

    unsafe fn free_region(&self, block: RegionBlock, len: usize) {
        let addr = block.ptr.as_ptr() as usize;
        let mapped = self
            .checker
            .live_mapping_list()
            .iter()
            .any(|m| m.cpu_addr < addr + len && addr < m.cpu_addr + m.mapping.len);
        {
            let mut state = self.state.lock().unwrap();
            assert!(state.live.remove(&addr), "a region freed twice");
            state.frees += 1;
            state.freed_while_mapped += usize::from(mapped && !self.checker.is_unbound());
        }
        // The counting wrapper reported `User`; the system source frees
        // by address and length only.
        let block = RegionBlock {
            backing: RegionBacking::TransparentHuge,
            ..block
        };
        // SAFETY: forwarded caller contract.
        unsafe { self.inner.free_region(block, len) };
    }
}

fn region_pool(device: &Device, regions: &CountingRegions) -> PagePool {
    device
        .pool_builder()
        .region_source(regions.clone())
        .cache_size(64)
        .refill_batch(64)
        .ring_size(64)
        .build()
        .unwrap()
}

fn setup() -> (CheckingDevice, Device, CountingRegions) {
    let checker = CheckingDevice::new(CheckMode::Panic);
    let device = Device::new(checker.clone());
    let regions = CountingRegions::new(&checker);
    (checker, device, regions)
}

#[test]
fn one_map_carves_a_whole_region_of_contiguous_pages() {
    let (checker, device, regions) = setup();
    let mut pool = region_pool(&device, &regions);
    let pages: Vec<_> = (0..PAGES_PER_REGION)
        .map(|_| pool.alloc().unwrap())
        .collect();
    assert_eq!(checker.stats().maps, 1, "one map for the whole region");
    assert_eq!(
        device.tracked_mappings(),
        1,
        "one record for the whole region"
    );
    let mut addrs: Vec<u64> = pages.iter().map(|p| p.dma_addr().0).collect();
    addrs.sort_unstable();
    let live = checker.live_mapping_list();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].mapping.len, REGION);
    let base = live[0].mapping.addr.0;
    assert_eq!(base % REGION as u64, 0, "the IOVA is aligned to the region");
    for (i, addr) in addrs.iter().enumerate() {
        assert_eq!(*addr, base + (i * 4096) as u64, "page {i} at its offset");
    }
    let info = pool.info().regions.expect("a region-mapped pool");
    assert_eq!(info.region_len, REGION);
    assert_eq!(
        (info.regions_mapped, info.regions_live, info.regions_total),
        (1, 1, 1)
    );
    assert_eq!(info.pages_carved, PAGES_PER_REGION as u64);
    assert_eq!(info.bytes_pinned, REGION as u64);
    assert_eq!(info.backing, Some(RegionBacking::User));
    assert_eq!(pool.stats().pages_mapped, PAGES_PER_REGION as u64);

    // One more page needs a second region.
    let extra = pool.alloc().unwrap();
    assert_eq!(checker.stats().maps, 2);
    assert_eq!(regions.allocs(), 2);
    drop(extra);
    drop(pages);
    drop(pool);
    assert_eq!(
        checker.live_mappings(),
        0,
        "dropping the pool unmapped both regions"
    );
    assert_eq!(checker.stats().unmaps, 2);
    regions.assert_all_freed_once();
    device.unbind().unwrap();
    checker.assert_clean();
}

#[test]
fn device_reads_and_writes_reach_pages_through_the_region_and_syncs_are_sub_ranges() {
    let (checker, device, regions) = setup();
    let mut pool = device
        .pool_builder()
        .direction(DmaDirection::Bidirectional)
        .region_source(regions.clone())
        .build()
        .unwrap();
    let _first = pool.alloc().unwrap();
    let mut page = pool.alloc().unwrap();
    checker.device_write(page.dma_addr(), b"frame").unwrap();
    page.sync_for_cpu(0..5).unwrap();
    assert_eq!(&page.as_slice()[..5], b"frame");
    page.as_mut_slice()[..3].copy_from_slice(b"ack");
    page.sync_for_device(0..3).unwrap();
    assert_eq!(checker.device_read(page.dma_addr(), 3).unwrap(), b"ack");
    let stats = checker.stats();
    assert_eq!((stats.syncs_for_cpu, stats.syncs_for_device), (1, 1));
    assert_eq!(stats.maps, 1);
    pool.recycle_direct(page);
    drop(_first);
    drop(pool);
    device.unbind().unwrap();
    regions.assert_all_freed_once();
    checker.assert_clean();
}

#[test]
fn the_device_can_reach_free_pages_of_a_live_region_but_nothing_outside() {
    let checker = CheckingDevice::new(CheckMode::Record);
    let device = Device::new(checker.clone());
    let regions = CountingRegions::new(&checker);
    let mut pool = region_pool(&device, &regions);
    let page = pool.alloc().unwrap();
    let base = checker.live_mapping_list()[0].mapping.addr;
    // The last page of the region sits free in the spare list: reachable.
    let last = base.offset((REGION - 4096) as u64);
    checker.device_write(last, b"x").unwrap();
    // One byte past the region: no mapping there.
    let outside = base.offset(REGION as u64);
    assert!(checker.device_write(outside, b"x").is_err());
    drop(page);
    device.unbind().unwrap();
    assert!(
        checker.device_write(base, b"x").is_err(),
        "nothing of a region is reachable after unbind"
    );
    let faults = checker
        .violations()
        .iter()
        .filter(|v| matches!(v, Violation::IommuFault { .. }))
        .count();
    assert_eq!(faults, 1, "the access past the region faulted");
    drop(pool);
    regions.assert_all_freed_once();
}

#[test]
fn unbind_unmaps_every_region_once_whatever_its_pages_are_doing() {
    let (checker, device, regions) = setup();
    let mut pool = device
        .pool_builder()
        .region_source(regions.clone())
        .cache_size(64)
        .refill_batch(64)
        .ring_size(8)
        .build()
        .unwrap();
    // Two regions: pages held, in the cache, in the ring and in the spare
    // list.
    let mut held: Vec<_> = (0..PAGES_PER_REGION + 100)
        .map(|_| pool.alloc().unwrap())
        .collect();
    let back = held.split_off(PAGES_PER_REGION); // 100 pages of region 2
    drop(back); // 8 into the ring, 92 into the spare list
    let cached = pool.alloc().unwrap();
    pool.recycle_direct(cached);
    assert_eq!(checker.live_mappings(), 2);
    let before = checker.stats();
    let report = device.unbind().unwrap();
    assert_eq!(report.regions_unmapped, 2);
    assert_eq!(report.bytes_unmapped, 2 * REGION as u64);
    assert_eq!(checker.live_mappings(), 0);
    assert_eq!(
        checker.stats().unmaps - before.unmaps,
        2,
        "each region once"
    );
    assert!(checker.is_unbound());
    // The second region has no page held: freed by unbind. The first one
    // is held whole: its memory stays valid.
    assert_eq!(regions.frees(), 0, "region 2 still has pages in the cache");
    for page in &mut held {
        page.as_mut_slice()[0] = 0xab;
    }
    assert!(held.iter().all(|p| p.as_slice()[0] == 0xab));
    assert_eq!(pool.alloc().unwrap_err(), AllocError::Unbound);
    let calls = checker.stats();
    drop(held);
    assert_eq!(regions.frees(), 1, "region 1 freed with its last page");
    drop(pool);
    assert_eq!(
        checker.stats(),
        calls,
        "nothing reached the device after unbind"
    );
    regions.assert_all_freed_once();
    checker.assert_clean();
}

#[test]
fn ring_full_pages_wait_in_the_spare_list_and_come_back_without_a_map() {
    let (checker, device, regions) = setup();
    let mut pool = device
        .pool_builder()
        .region_source(regions.clone())
        .cache_size(16)
        .refill_batch(16)
        .ring_size(4)
        .build()
        .unwrap();
    let pages: Vec<_> = (0..PAGES_PER_REGION)
        .map(|_| pool.alloc().unwrap())
        .collect();
    drop(pages);
    let stats = pool.stats();
    assert_eq!(stats.recycle.ring, 4);
    assert_eq!(stats.recycle.ring_full, PAGES_PER_REGION as u64 - 4);
    assert_eq!(checker.live_mappings(), 1, "the region stays mapped");
    assert_eq!(checker.stats().unmaps, 0);
    let again: Vec<_> = (0..PAGES_PER_REGION)
        .map(|_| pool.alloc().unwrap())
        .collect();
    assert_eq!(
        checker.stats().maps,
        1,
        "every page came back from the pool"
    );
    assert_eq!(pool.stats().pages_held, PAGES_PER_REGION as u64);
    drop(again);
    drop(pool);
    regions.assert_all_freed_once();
    device.unbind().unwrap();
    checker.assert_clean();
}

#[test]
fn a_dropped_pool_keeps_a_held_region_mapped_until_its_last_page_comes_back() {
    let (checker, device, regions) = setup();
    let mut pool = region_pool(&device, &regions);
    let held = pool.alloc().unwrap();
    drop(pool);
    assert_eq!(checker.live_mappings(), 1, "one page still held");
    assert_eq!(device.detached_pools().len(), 1);
    assert_eq!(regions.frees(), 0);
    drop(held);
    assert_eq!(checker.live_mappings(), 0);
    assert_eq!(device.detached_pools().len(), 0);
    regions.assert_all_freed_once();
    device.unbind().unwrap();
    checker.assert_clean();
}

#[test]
fn unbind_with_the_pool_alive_then_drop_calls_nothing_on_the_device() {
    let (checker, device, regions) = setup();
    let mut pool = region_pool(&device, &regions);
    let page = pool.alloc().unwrap();
    pool.recycle_direct(page);
    let report = device.unbind().unwrap();
    assert_eq!(report.regions_unmapped, 1);
    let calls = checker.stats();
    assert_eq!(regions.frees(), 0, "the owner's cache still has pages");
    drop(pool);
    assert_eq!(checker.stats(), calls);
    regions.assert_all_freed_once();
    checker.assert_clean();
}

#[test]
fn fragments_and_sync_on_recycle_work_on_region_pages() {
    let (checker, device, regions) = setup();
    let mut pool = device
        .pool_builder()
        .region_source(regions.clone())
        .sync_for_device(0, 2048)
        .build()
        .unwrap();
    let a = pool.alloc_frag(1500).unwrap();
    let b = pool.alloc_frag(1500).unwrap();
    assert_eq!(
        a.dma_addr().0 + 1536,
        b.dma_addr().0,
        "carved from one page"
    );
    let mut page = pool.alloc().unwrap();
    page.set_dirty_len(100);
    pool.recycle_direct(page);
    assert_eq!(checker.stats().syncs_for_device, 1);
    drop((a, b));
    drop(pool);
    device.unbind().unwrap();
    regions.assert_all_freed_once();
    checker.assert_clean();
}

#[test]
fn a_failed_region_map_leaks_nothing_and_is_typed() {
    let (checker, device, regions) = setup();
    let mut pool = region_pool(&device, &regions);
    checker.fail_next_maps(1);
    assert_eq!(
        pool.alloc().unwrap_err(),
        AllocError::Map(DmaError::Injected)
    );
    assert_eq!(regions.allocs(), 1);
    assert_eq!(regions.frees(), 1, "the region went back to its source");
    assert_eq!(device.tracked_mappings(), 0);
    let page = pool.alloc().unwrap();
    assert_eq!(checker.live_mappings(), 1);
    drop(page);
    drop(pool);
    device.unbind().unwrap();
    regions.assert_all_freed_once();
    checker.assert_clean();
}

#[test]
fn a_mapping_limit_counts_regions_not_pages() {
    let checker = CheckingDevice::builder()
        .mode(CheckMode::Panic)
        .mapping_limit(2)
        .build();
    let device = Device::new(checker.clone());
    let regions = CountingRegions::new(&checker);
    let mut pool = region_pool(&device, &regions);
    let pages: Vec<_> = (0..2 * PAGES_PER_REGION)
        .map(|_| pool.alloc().unwrap())
        .collect();
    assert_eq!(checker.live_mappings(), 2);
    assert!(matches!(
        pool.alloc().unwrap_err(),
        AllocError::Map(DmaError::MappingLimit { .. })
    ));
    drop(pages);
    drop(pool);
    device.unbind().unwrap();
    regions.assert_all_freed_once();
}

/// The checking device with a 16 KiB smallest IOMMU page.
struct LargeIommuPage(CheckingDevice);

impl DmaOps for LargeIommuPage {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        // SAFETY: forwarded caller contract.
        unsafe { self.0.map(cpu, len, direction) }
    }
    unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
        // SAFETY: forwarded caller contract.
        unsafe { self.0.unmap(mapping) }
    }
    unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded caller contract.
        unsafe { self.0.sync_for_device(mapping, offset, len) }
    }
    unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded caller contract.
        unsafe { self.0.sync_for_cpu(mapping, offset, len) }
    }
    fn on_unbind(&self) {
        self.0.on_unbind()
    }
    fn min_page_size(&self) -> Option<usize> {
        Some(16384)
    }
}

#[test]
fn pages_smaller_than_the_iommu_page_are_refused_unless_regions_map_them() {
    let checker = CheckingDevice::new(CheckMode::Panic);
    let device = Device::with_cpu_access_check(LargeIommuPage(checker.clone()), checker.clone());
    assert_eq!(
        device.pool_builder().build().unwrap_err(),
        BuildError::PageBelowIommuPage {
            page_len: 4096,
            iommu_page: 16384
        }
    );
    assert!(device.pool_builder().order(2).build().is_ok());
    let mut pool = device.pool_builder().regions().build().unwrap();
    let page = pool.alloc().unwrap();
    assert_eq!(page.len(), 4096);
    let err = device.pool_builder().region_size(8192).build().unwrap_err();
    assert!(matches!(err, BuildError::Config(ref e) if e.field() == "region_size"));
    drop(page);
    drop(pool);
    device.unbind().unwrap();
    checker.assert_clean();
}

#[test]
fn bad_region_configurations_are_named() {
    let device = Device::new(CheckingDevice::new(CheckMode::Panic));
    let field = |result: Result<PagePool, BuildError>| match result {
        Err(BuildError::Config(e)) => e.field(),
        other => panic!("expected a config error, got {other:?}"),
    };
    assert_eq!(
        field(device.pool_builder().region_size(3 << 20).build()),
        "region_size"
    );
    assert_eq!(
        field(device.pool_builder().order(3).region_size(16384).build()),
        "order",
        "pages larger than the region: the order is named"
    );
    assert_eq!(
        field(device.pool_builder().region_size(2 << 30).build()),
        "region_size"
    );
    assert_eq!(
        field(
            device
                .pool_builder()
                .page_source(pagepool::GlobalPages)
                .regions()
                .build()
        ),
        "page_source"
    );
}

/// Errors name what the user set: a page order too large for the default
/// region size blames the order (and says the region size is the
/// default), and conflicting settings name both, with no made-up value.
#[test]
fn region_errors_name_what_the_user_set() {
    let device = Device::new(CheckingDevice::new(CheckMode::Panic));
    let err = |result: Result<PagePool, BuildError>| match result {
        Err(BuildError::Config(e)) => e,
        other => panic!("expected a config error, got {other:?}"),
    };
    let e = err(device.pool_builder().order(10).regions().build());
    assert_eq!(
        e,
        ConfigError::PageLargerThanRegion {
            order: 10,
            page_len: 4 << 20,
            region_len: 2 << 20,
            region_len_is_default: true,
        }
    );
    let text = e.to_string();
    assert!(text.contains("order 10"), "{text}");
    assert!(text.contains("default region size"), "{text}");
    let e = err(device.pool_builder().order(10).region_size(2 << 20).build());
    assert!(matches!(
        e,
        ConfigError::PageLargerThanRegion {
            region_len_is_default: false,
            ..
        }
    ));
    assert!(!e.to_string().contains("default"), "{e}");
    assert!(device.pool_builder().order(9).regions().build().is_ok());
    let conflicts = [
        (
            err(device
                .pool_builder()
                .page_source(pagepool::GlobalPages)
                .regions()
                .build()),
            "regions",
        ),
        (
            err(device
                .pool_builder()
                .page_source(pagepool::GlobalPages)
                .region_size(4 << 20)
                .build()),
            "region_size",
        ),
        (
            err(device
                .pool_builder()
                .page_source(pagepool::GlobalPages)
                .region_source(pagepool::SystemRegions::new())
                .build()),
            "region_source",
        ),
    ];
    for (e, with) in conflicts {
        let ConfigError::Conflict {
            field, with: named, ..
        } = &e
        else {
            panic!("expected a conflict, got {e:?}");
        };
        assert_eq!((*field, *named), ("page_source", with));
        let text = e.to_string();
        assert!(
            text.contains("page_source") && text.contains(with) && !text.contains(" 0"),
            "{text}"
        );
    }
    device.unbind().unwrap();
}

#[test]
fn higher_order_pages_and_larger_regions_compose() {
    let (checker, device, regions) = setup();
    let mut pool = device
        .pool_builder()
        .order(2)
        .region_size(4 << 20)
        .region_source(regions.clone())
        .build()
        .unwrap();
    let pages: Vec<_> = (0..256).map(|_| pool.alloc().unwrap()).collect();
    assert!(pages.iter().all(|p| p.len() == 16384));
    assert_eq!(
        checker.stats().maps,
        1,
        "256 16 KiB pages in one 4 MiB region"
    );
    drop(pages);
    drop(pool);
    device.unbind().unwrap();
    regions.assert_all_freed_once();
    checker.assert_clean();
}

#[test]
fn the_system_source_reports_what_backs_its_regions() {
    let checker = CheckingDevice::new(CheckMode::Panic);
    let device = Device::new(checker.clone());
    for source in [SystemRegions::new(), SystemRegions::without_huge_tlb()] {
        let mut pool = device.pool_builder().region_source(source).build().unwrap();
        let page = pool.alloc().unwrap();
        let backing = pool.info().regions.unwrap().backing.unwrap();
        assert_ne!(backing, RegionBacking::User);
        if source == SystemRegions::without_huge_tlb() {
            assert_ne!(backing, RegionBacking::HugeTlb);
        }
        drop(page);
    }
    device.unbind().unwrap();
    checker.assert_clean();
}

#[test]
fn tracker_bytes_per_page_fall_far_below_one_word() {
    let (checker, device, regions) = setup();
    let mut pool = region_pool(&device, &regions);
    let empty = device.tracker_heap_bytes();
    let pages: Vec<_> = (0..8 * PAGES_PER_REGION)
        .map(|_| pool.alloc().unwrap())
        .collect();
    // What the records cost, above the tracker's fixed shard array.
    let per_page = (device.tracker_heap_bytes() - empty) as f64 / pages.len() as f64;
    assert!(
        per_page <= 16.0 / 512.0,
        "{per_page} tracker bytes per page"
    );
    drop(pages);
    drop(pool);
    device.unbind().unwrap();
    regions.assert_all_freed_once();
    checker.assert_clean();
}

#[test]
fn threads_dropping_region_pages_race_unbind_without_a_violation() {
    for round in 0..20 {
        let (checker, device, regions) = setup();
        let mut pool = device
            .pool_builder()
            .region_source(regions.clone())
            .ring_size(64)
            .build()
            .unwrap();
        let pages: Vec<_> = (0..3 * PAGES_PER_REGION / 2)
            .map(|_| pool.alloc().unwrap())
            .collect();
        let device = Arc::new(device);
        let mut chunks: Vec<Vec<_>> = Vec::new();
        let mut pages = pages;
        while !pages.is_empty() {
            let at = pages.len().saturating_sub(200);
            chunks.push(pages.split_off(at));
        }
        let holders: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                thread::spawn(move || {
                    for mut page in chunk {
                        page.as_mut_slice()[0] = 1;
                        drop(page);
                    }
                })
            })
            .collect();
        let unbinder = {
            let device = Arc::clone(&device);
            thread::spawn(move || device.unbind().unwrap())
        };
        if round % 2 == 0 {
            drop(pool);
        } else {
            while pool.alloc().is_ok() {}
            drop(pool);
        }
        for holder in holders {
            holder.join().unwrap();
        }
        let report = unbinder.join().unwrap();
        assert!(report.regions_unmapped <= 2);
        assert_eq!(checker.live_mappings(), 0, "round {round}");
        regions.assert_all_freed_once();
        checker.assert_clean();
        let stats = checker.stats();
        assert_eq!(
            stats.maps, stats.unmaps,
            "round {round}: each region unmapped once"
        );
    }
}

#[cfg(feature = "bytes")]
#[test]
fn bytes_of_region_pages_outlive_unbind_and_free_the_region_last() {
    let (checker, device, regions) = setup();
    let mut pool = region_pool(&device, &regions);
    let mut page = pool.alloc().unwrap();
    page.as_mut_slice()[..4].copy_from_slice(b"data");
    let bytes = page.into_bytes().slice(0..4);
    let clone = bytes.clone();
    let frag = pool.alloc_frag(100).unwrap().into_bytes();
    drop(pool);
    let report = device.unbind().unwrap();
    assert_eq!(report.regions_unmapped, 1);
    assert_eq!(regions.frees(), 0, "the region's pages are still held");
    let calls = checker.stats();
    drop(bytes);
    assert_eq!(&clone[..], b"data", "valid memory after unbind");
    drop(frag);
    drop(clone);
    assert_eq!(checker.stats(), calls, "no device call after unbind");
    regions.assert_all_freed_once();
    checker.assert_clean();
}

/// A region source whose next `alloc_region` or `free_region` panics once.
#[derive(Clone)]
struct PanickyRegions {
    inner: CountingRegions,
    panic_alloc: Arc<Mutex<bool>>,
    panic_free: Arc<Mutex<bool>>,
}

// SAFETY: forwards to `CountingRegions`; a panic happens before the call is
// forwarded, so a panicking alloc allocated nothing and a panicking free
// freed nothing (the block is leaked, never reused).
unsafe impl RegionSource for PanickyRegions {
    fn alloc_region(&self, len: usize) -> Result<RegionBlock, OutOfMemory> {
        if std::mem::take(&mut *self.panic_alloc.lock().unwrap()) {
            panic!("alloc_region panics");
        }
        self.inner.alloc_region(len)
    }

    unsafe fn free_region(&self, block: RegionBlock, len: usize) {
        if std::mem::take(&mut *self.panic_free.lock().unwrap()) {
            panic!("free_region panics");
        }
        // SAFETY: forwarded caller contract.
        unsafe { self.inner.free_region(block, len) }
    }
}

#[test]
fn a_panicking_region_source_leaves_the_pool_consistent() {
    let (checker, device, regions) = setup();
    let source = PanickyRegions {
        inner: regions.clone(),
        panic_alloc: Arc::new(Mutex::new(true)),
        panic_free: Arc::new(Mutex::new(false)),
    };
    let mut pool = device
        .pool_builder()
        .region_source(source.clone())
        .build()
        .unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.alloc()));
    assert!(panicked.is_err(), "the source's panic reaches the caller");
    assert_eq!(checker.live_mappings(), 0, "nothing was mapped");
    assert_eq!(device.tracked_mappings(), 0);
    // The pool is still usable: two regions, then a panicking free at the
    // pool's drop. The other region is still unmapped and freed.
    let pages: Vec<_> = (0..PAGES_PER_REGION + 1)
        .map(|_| pool.alloc().unwrap())
        .collect();
    assert_eq!(checker.live_mappings(), 2);
    drop(pages);
    *source.panic_free.lock().unwrap() = true;
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(pool)));
    assert!(
        dropped.is_err(),
        "the free's panic reaches the pool's owner"
    );
    assert_eq!(
        checker.live_mappings(),
        0,
        "both regions unmapped, once each"
    );
    assert_eq!(checker.stats().unmaps, 2);
    assert_eq!(
        regions.frees(),
        1,
        "the other region was freed all the same"
    );
    assert_eq!(device.detached_pools().len(), 0, "no page left counted");
    device.unbind().unwrap();
    checker.assert_clean();
}

#[test]
fn pages_dropped_inside_a_region_map_are_taken_back_and_nothing_leaks() {
    /// Drops a held page of the pool from inside `map`.
    struct DroppingMap {
        inner: CheckingDevice,
        page: Arc<Mutex<Option<pagepool::Page>>>,
    }
    impl DmaOps for DroppingMap {
        unsafe fn map(
            &self,
            cpu: NonNull<u8>,
            len: usize,
            direction: DmaDirection,
        ) -> Result<DmaAddr, DmaError> {
            drop(self.page.lock().unwrap().take());
            // SAFETY: forwarded caller contract.
            unsafe { self.inner.map(cpu, len, direction) }
        }
        unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
            // SAFETY: forwarded caller contract.
            unsafe { self.inner.unmap(mapping) }
        }
        unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
            // SAFETY: forwarded caller contract.
            unsafe { self.inner.sync_for_device(mapping, offset, len) }
        }
        unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
            // SAFETY: forwarded caller contract.
            unsafe { self.inner.sync_for_cpu(mapping, offset, len) }
        }
        fn on_unbind(&self) {
            self.inner.on_unbind()
        }
    }
    let checker = CheckingDevice::new(CheckMode::Panic);
    let slot = Arc::new(Mutex::new(None));
    let device = Device::new(DroppingMap {
        inner: checker.clone(),
        page: Arc::clone(&slot),
    });
    let regions = CountingRegions::new(&checker);
    let mut pool = device
        .pool_builder()
        .region_source(regions.clone())
        .ring_size(1)
        .cache_size(1)
        .refill_batch(1)
        .build()
        .unwrap();
    let mut pages: Vec<_> = (0..PAGES_PER_REGION)
        .map(|_| pool.alloc().unwrap())
        .collect();
    // The next allocation maps a second region; its `map` drops a page of
    // the first into the (empty) ring, re-entrantly.
    *slot.lock().unwrap() = pages.pop();
    let extra = pool.alloc().unwrap();
    assert!(slot.lock().unwrap().is_none(), "dropped inside map");
    assert_eq!(checker.live_mappings(), 2);
    drop((pages, extra));
    drop(pool);
    assert_eq!(checker.live_mappings(), 0);
    device.unbind().unwrap();
    regions.assert_all_freed_once();
    checker.assert_clean();
}
