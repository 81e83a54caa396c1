//! IOMMUs whose smallest page is larger than 4 KiB (arm64 kernels with
//! 64 KiB pages): every block the pool maps must be aligned to the IOMMU
//! page and a whole number of them, or the IOMMU maps the pages around it
//! and the device reaches the neighbouring memory. The checking device,
//! told it sits behind 64 KiB IOMMU pages, refuses anything else and
//! records a violation; these tests make sure the pool never gives it one,
//! and refuses memory from a source that is not aligned, before any device
//! call.

mod support;

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pagepool::checking::{CheckMode, CheckingDevice, Violation};
use pagepool::{
    AllocError, BuildError, Device, DmaDirection, DmaError, DmaOps, OutOfMemory, PageSource,
    RegionBacking, RegionBlock, RegionSource, PAGE_SIZE,
};

const P64: usize = 64 << 10;

fn checker_64k() -> CheckingDevice {
    CheckingDevice::builder()
        .mode(CheckMode::Panic)
        .iommu_page(P64)
        .build()
}

/// The checking device reports the page and refuses unaligned memory, with
/// a violation and a typed error.
#[test]
fn the_checking_device_refuses_memory_not_aligned_to_its_iommu_page() {
    let checker = CheckingDevice::builder()
        .mode(CheckMode::Record)
        .iommu_page(P64)
        .build();
    assert_eq!(checker.min_page_size(), Some(P64));
    let layout = Layout::from_size_align(2 * P64, P64).unwrap();
    // SAFETY: non-zero size.
    let block = NonNull::new(unsafe { alloc_zeroed(layout) }).unwrap();
    // A 4 KiB-aligned page inside the 64 KiB one, and a short length.
    for (offset, len) in [(PAGE_SIZE, P64), (0, PAGE_SIZE)] {
        let at = NonNull::new(block.as_ptr().wrapping_add(offset)).unwrap();
        // SAFETY: inside the block, which outlives the call; nothing maps.
        let got = unsafe { checker.map(at, len, DmaDirection::FromDevice) };
        assert_eq!(got, Err(DmaError::Unaligned { iommu_page: P64 }));
    }
    assert!(matches!(
        checker.violations()[..],
        [
            Violation::MapUnaligned {
                len: P64,
                iommu_page: P64,
                ..
            },
            Violation::MapUnaligned { .. }
        ]
    ));
    assert_eq!(checker.live_mappings(), 0);
    // SAFETY: allocated above with this layout, not mapped.
    unsafe { dealloc(block.as_ptr(), layout) };
}

/// A pool of 64 KiB pages on a 64 KiB IOMMU maps every page aligned (the
/// checker would panic otherwise); 4 KiB pages are refused at build.
#[test]
fn a_pool_on_a_64k_iommu_maps_only_aligned_pages() {
    let checker = checker_64k();
    let device = Device::new(checker.clone());
    assert_eq!(
        device.pool_builder().build().unwrap_err(),
        BuildError::PageBelowIommuPage {
            page_len: PAGE_SIZE,
            iommu_page: P64
        }
    );
    let mut pool = device.pool_builder().order(4).build().unwrap();
    let pages: Vec<_> = (0..16).map(|_| pool.alloc().unwrap()).collect();
    for page in &pages {
        assert_eq!(page.len(), P64);
        assert_eq!(page.as_slice().as_ptr() as usize % P64, 0);
    }
    assert_eq!(checker.live_mappings(), 16);
    drop(pages);
    drop(pool);
    device.unbind().unwrap();
    checker.assert_clean();
    assert_eq!(checker.live_mappings(), 0);
}

/// A page source whose blocks are 4 KiB-aligned only: offset by 4 KiB
/// inside a larger, 64 KiB-aligned allocation.
#[derive(Clone, Default)]
struct SkewedPages {
    allocs: Arc<AtomicUsize>,
    frees: Arc<AtomicUsize>,
}

impl SkewedPages {
    fn layout(order: u32) -> Layout {
        Layout::from_size_align((PAGE_SIZE << order) + P64, P64).unwrap()
    }
}

// SAFETY: each block is a distinct live allocation of the asked size
// (plus slack), 4 KiB-aligned, until `free_pages` deallocates it.
unsafe impl PageSource for SkewedPages {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        // SAFETY: non-zero size.
        let base = NonNull::new(unsafe { alloc_zeroed(Self::layout(order)) }).ok_or(OutOfMemory)?;
        self.allocs.fetch_add(1, Ordering::SeqCst);
        // SAFETY: inside the allocation.
        Ok(unsafe { base.add(PAGE_SIZE) })
    }

    unsafe fn free_pages(&self, block: NonNull<u8>, order: u32) {
        self.frees.fetch_add(1, Ordering::SeqCst);
        let base = block.as_ptr().wrapping_sub(PAGE_SIZE);
        // SAFETY: `block` is `base + PAGE_SIZE` of an allocation with this
        // layout (caller contract: it came from `alloc_pages(order)`).
        unsafe { dealloc(base, Self::layout(order)) };
    }
}

/// Memory from a page source that is not aligned to the IOMMU page is
/// refused with a typed error and goes back to its source; the device is
/// never asked to map it.
#[test]
fn a_page_source_not_aligned_to_the_iommu_page_is_refused() {
    let checker = checker_64k();
    let device = Device::new(checker.clone());
    let source = SkewedPages::default();
    let mut pool = device
        .pool_builder()
        .order(4)
        .page_source(source.clone())
        .build()
        .unwrap();
    assert_eq!(
        pool.alloc().unwrap_err(),
        AllocError::Misaligned { align: P64 }
    );
    assert!(source.allocs.load(Ordering::SeqCst) > 0);
    assert_eq!(
        source.allocs.load(Ordering::SeqCst),
        source.frees.load(Ordering::SeqCst),
        "every refused block went back"
    );
    assert_eq!(checker.stats().maps, 0, "no device call for it");
    drop(pool);
    device.unbind().unwrap();
    checker.assert_clean();
}

/// The same for a region source: its block is refused and freed.
#[derive(Clone, Default)]
struct SkewedRegions {
    frees: Arc<AtomicUsize>,
}

// SAFETY: each block is a distinct live allocation of `len` bytes (plus
// slack), 4 KiB-aligned, until `free_region` deallocates it.
unsafe impl RegionSource for SkewedRegions {
    fn alloc_region(&self, len: usize) -> Result<RegionBlock, OutOfMemory> {
        let layout = Layout::from_size_align(len + P64, P64).unwrap();
        // SAFETY: non-zero size.
        let base = NonNull::new(unsafe { alloc_zeroed(layout) }).ok_or(OutOfMemory)?;
        Ok(RegionBlock {
            // SAFETY: inside the allocation.
            ptr: unsafe { base.add(PAGE_SIZE) },
            backing: RegionBacking::User,
        })
    }

    unsafe fn free_region(&self, block: RegionBlock, len: usize) {
        self.frees.fetch_add(1, Ordering::SeqCst);
        let layout = Layout::from_size_align(len + P64, P64).unwrap();
        let base = block.ptr.as_ptr().wrapping_sub(PAGE_SIZE);
        // SAFETY: `ptr` is `base + PAGE_SIZE` of an allocation with this
        // layout (caller contract).
        unsafe { dealloc(base, layout) };
    }
}

#[test]
fn a_region_source_not_aligned_to_the_iommu_page_is_refused() {
    let checker = checker_64k();
    let device = Device::new(checker.clone());
    let source = SkewedRegions::default();
    let mut pool = device
        .pool_builder()
        .region_size(4 * P64)
        .region_source(source.clone())
        .build()
        .unwrap();
    assert_eq!(
        pool.alloc().unwrap_err(),
        AllocError::Misaligned { align: P64 }
    );
    assert_eq!(source.frees.load(Ordering::SeqCst), 1);
    assert_eq!(checker.stats().maps, 0);
    // The system's regions are aligned to their size: they map.
    let mut system = device.pool_builder().region_size(4 * P64).build().unwrap();
    let page = system.alloc().unwrap();
    assert_eq!(checker.live_mappings(), 1);
    drop(page);
    drop(system);
    drop(pool);
    device.unbind().unwrap();
    checker.assert_clean();
}
