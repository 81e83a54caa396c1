//! Region-mapped pools: one mapping per region, many pages per region.
//!
//! [`map_region`] takes a block from the pool's region source (outside
//! every gate), maps it with one `DmaOps::map` and records it in the
//! device's region tracker in the same device call, then carves it into the
//! pool's pages. A page of a region is never unmapped on its own: while its
//! pool is open, a page that finds the ring full waits, mapped, in the
//! pool's spare list ([`return_pages`]); a page that leaves for good (pool
//! dropped, device unbound) is retired ([`retire_pages`]). Whoever retires
//! a region's last page owns the region and releases it: the record is
//! removed and the region unmapped in one device call, then its memory and
//! page metadata are freed outside it; once `unbind` has closed the gates
//! the region is handed to `unbind` instead, which unmaps it (if it has not
//! already) before the region is freed.
//!
//! # Invariants
//!
//! - No region mapping without a record, and none unmapped twice: the same
//!   rule as for pages, with the region tracker.
//! - `live_pages` counts the region's pages that have not left the pool for
//!   good. It reaches 0 exactly once, and only then is the region released;
//!   its memory is freed only after its mapping is gone (invariant 4).
//! - The device can reach every byte of a mapped region, also the pages
//!   sitting free in the pool: the price of one mapping per region.

use core::ptr::NonNull;

use super::unmapper::Unmapper;
use crate::dma::{DmaAddr, DmaError};
use crate::error::AllocError;
use crate::memory::RegionBlock;
use crate::mode::TrackingMode;
use crate::shared::{meta_ref, DeviceShared, MetaHome, PageMeta, PageView, PoolShared, Region};
use crate::sync::{Arc, AtomicUsize, Ordering, UnsafeCell};
use crate::tracker::{InsertError, RecordId};
use crate::unwind::Panics;

/// A region taken from the source and not (yet) shared: its memory goes
/// back to the source, and its metadata is freed, when dropped (also on
/// unwind).
struct FreshRegion<'a, M: TrackingMode> {
    pool: &'a PoolShared<M>,
    region: NonNull<Region<M>>,
}

impl<M: TrackingMode> FreshRegion<'_, M> {
    fn into_shared(self) -> NonNull<Region<M>> {
        let region = self.region;
        core::mem::forget(self);
        region
    }
}

impl<M: TrackingMode> Drop for FreshRegion<'_, M> {
    fn drop(&mut self) {
        let Some(regions) = &self.pool.regions else {
            return;
        };
        // SAFETY: the region was built by `map_region` and never shared; it
        // is not mapped (its map failed, panicked or was undone), so its
        // memory may go back to the source.
        let (region, pages) = unsafe { take_region(self.region) };
        let block = RegionBlock {
            ptr: region.cpu,
            backing: region.backing,
        };
        drop(pages);
        drop(region);
        // SAFETY: from this source with this length, no longer mapped.
        unsafe { regions.source.free_region(block, regions.len) };
    }
}

/// Takes back ownership of a region's allocation and of its pages' metas.
///
/// # Safety
/// `region` came from `map_region`, is not used afterwards, and no meta of
/// its pages is.
unsafe fn take_region<M: TrackingMode>(
    region: NonNull<Region<M>>,
) -> (Box<Region<M>>, Box<[PageMeta<M>]>) {
    // SAFETY: both were leaked by `map_region` with `Box::into_raw` and are
    // reclaimed once (caller contract).
    let region = unsafe { Box::from_raw(region.as_ptr()) };
    // SAFETY: as above.
    let pages = unsafe { Box::from_raw(region.pages.as_ptr()) };
    (region, pages)
}

/// The slow path of a region-mapped pool: allocates a region, maps it in
/// one device call, and carves it into pages: up to `room` into `cache`,
/// the rest into the spare list. The source is called outside every gate.
pub(crate) fn map_region<M: TrackingMode>(
    pool: &Arc<PoolShared<M>>,
    cache: &mut Vec<NonNull<PageMeta<M>>>,
    room: usize,
) -> Result<(), AllocError> {
    let Some(regions) = &pool.regions else {
        return Err(AllocError::Unbound);
    };
    if pool.gate.is_closed() {
        return Err(AllocError::Unbound);
    }
    let config = pool.config;
    let block = regions
        .source
        .alloc_region(regions.len)
        .map_err(|_| AllocError::OutOfMemory { bytes: regions.len })?;
    let count = regions.pages_per_region;
    let region = NonNull::from(Box::leak(Box::new(Region {
        cpu: block.ptr,
        backing: block.backing,
        dma: DmaAddr(0),
        record: UnsafeCell::new(RecordId::NONE),
        pool: Arc::clone(pool),
        live_pages: AtomicUsize::new(count),
        pages: NonNull::from(Box::leak(Box::<[PageMeta<M>]>::default())),
    })));
    let metas: Box<[PageMeta<M>]> = (0..count)
        .map(|i| PageMeta {
            // SAFETY: `i * page_len < len`: inside the block.
            cpu: unsafe { block.ptr.add(i * config.page_len) },
            view: PageView::of(pool),
            dma: DmaAddr(0),
            record: UnsafeCell::new(RecordId::NONE),
            pool: Arc::clone(pool),
            frag_refs: AtomicUsize::new(0),
            dirty_len: UnsafeCell::new(u32::MAX),
            home: MetaHome::region(region),
        })
        .collect();
    // SAFETY: the region is ours alone (not shared yet); the empty
    // placeholder slice is replaced and freed.
    let placeholder = unsafe {
        core::mem::replace(
            &mut (*region.as_ptr()).pages,
            NonNull::from(Box::leak(metas)),
        )
    };
    // SAFETY: leaked just above, reclaimed once.
    drop(unsafe { Box::from_raw(placeholder.as_ptr()) });
    // Declared before the call: on every exit (and unwind) the call ends
    // first and the region goes back to its source outside the gate.
    let fresh = FreshRegion { pool, region };
    if let Some(align) = pool.device.min_page_size {
        if block.ptr.as_ptr().addr() % align != 0 {
            // Mapping it would widen the mapping over its neighbours.
            return Err(AllocError::Misaligned { align });
        }
    }
    let Some(call) = pool.device_call() else {
        return Err(AllocError::Unbound);
    };
    // SAFETY: the block is `len` bytes of fresh memory that stays allocated
    // until the region's unmap has returned (regions are freed only after
    // that); no CPU reference to it exists.
    let dma =
        unsafe { call.map(block.ptr, regions.len, config.direction) }.map_err(AllocError::Map)?;
    if dma == DmaAddr::ERROR {
        // As for a page: a failed map, nothing mapped.
        return Err(AllocError::Map(DmaError::ErrorAddress));
    }
    // SAFETY: not shared yet: written before the record makes it reachable.
    unsafe { write_addresses(region, dma, config.page_len) };
    pool.pages_allocated.fetch_add(count, Ordering::Relaxed);
    pool.pages_mapped.fetch_add(count, Ordering::Relaxed);
    regions.mapped.fetch_add(1, Ordering::Relaxed);
    regions.live.fetch_add(1, Ordering::Relaxed);
    regions.total.fetch_add(1, Ordering::Relaxed);
    *regions.backing.lock() = Some(block.backing);
    if M::TRACKED {
        // The gate is open (we are inside a call): the shard is not closed.
        match pool
            .device
            .region_tracker
            .insert(pool.tracker_shard, region)
        {
            Ok(id) => {
                // SAFETY: live: we made it just above.
                let made = unsafe { region.as_ref() };
                // SAFETY: as for pages (`map_page`): the tracker keeps the region
                // as an opaque key and only `unbind` reads through it, after this
                // call has ended.
                unsafe { made.set_record(id) }
            }
            Err(why) => {
                // Never recorded, never shared: unmapped here, once.
                let mut unmapper = Unmapper::new();
                // SAFETY: the region is live and ours.
                unmapper.push_region(unsafe { region.as_ref() });
                // SAFETY: mapped above, never recorded.
                unsafe { unmapper.flush(&*call, &pool.device.kept) };
                drop(call);
                if pool.device.kept.is_kept(region.as_ptr()) {
                    // The unmap failed: keep the memory for good.
                    core::mem::forget(fresh);
                } else {
                    pool.pages_allocated.fetch_sub(count, Ordering::Relaxed);
                    regions.live.fetch_sub(1, Ordering::Relaxed);
                    drop(fresh);
                }
                return Err(match why {
                    InsertError::Closed => AllocError::Unbound,
                    InsertError::Full => {
                        AllocError::Map(crate::DmaError::MappingLimit { limit: None })
                    }
                });
            }
        }
    }
    drop(call);
    let region = fresh.into_shared();
    // SAFETY: the metas were written above and are immutable from now on.
    let pages = unsafe { region.as_ref() }.pages;
    let base = pages.as_ptr().cast::<PageMeta<M>>();
    let page = |i: usize| {
        // `i < count`: inside the metas slice, so never null.
        NonNull::new(base.wrapping_add(i)).expect("a page of the region")
    };
    let room = room.min(count);
    cache.extend((0..room).map(page));
    if room < count {
        let mut spare = regions.spare.lock();
        if !spare.is_closed() {
            for i in room..count {
                // An unbounded ring refuses only when closed.
                let _ = spare.push(page(i));
            }
            return Ok(());
        }
        drop(spare);
        let refused: Vec<_> = (room..count).map(page).collect();
        // SAFETY: ours, never handed out: the pool is closing.
        unsafe { retire_pages(&refused) };
    }
    Ok(())
}

/// Writes the device address of the region and of each of its pages.
///
/// # Safety
/// The region is not shared yet.
unsafe fn write_addresses<M: TrackingMode>(
    region: NonNull<Region<M>>,
    dma: DmaAddr,
    page_len: usize,
) {
    // SAFETY: not shared (caller): these are the only references.
    let region = unsafe { &mut *region.as_ptr() };
    region.dma = dma;
    // SAFETY: the metas belong to the region and are not shared either.
    let pages = unsafe { &mut *region.pages.as_ptr() };
    for (i, meta) in pages.iter_mut().enumerate() {
        meta.dma = dma.offset((i * page_len) as u64);
    }
}

/// Takes pages of a region-mapped pool back from a release: into the spare
/// list while the pool is open, else retired.
///
/// # Safety
/// Every page belongs to `pool`, the caller owns it and does not use it
/// afterwards.
pub(crate) unsafe fn return_pages<M: TrackingMode>(
    pool: &PoolShared<M>,
    pages: &[NonNull<PageMeta<M>>],
) {
    if let Some(regions) = &pool.regions {
        let mut spare = regions.spare.lock();
        if !spare.is_closed() {
            for &page in pages {
                // An unbounded ring refuses only when closed.
                let _ = spare.push(page);
            }
            return;
        }
    }
    // SAFETY: forwarded caller contract; the pool is closing.
    unsafe { retire_pages(pages) };
}

/// Region pages leaving their pool for good. The region of each page whose
/// last page this is gets released: unmapped (unless `unbind` does it) and
/// freed.
///
/// # Safety
/// Every page is a region page, owned by the caller and not used
/// afterwards.
pub(crate) unsafe fn retire_pages<M: TrackingMode>(pages: &[NonNull<PageMeta<M>>]) {
    let mut panics = Panics::new();
    for &page in pages {
        // SAFETY: owned by the caller, live (its region is: this page has
        // not been retired yet).
        let meta = unsafe { meta_ref(page) };
        let Some(region) = meta.region() else {
            continue;
        };
        // SAFETY: a region lives until its last page is retired, below.
        let live = unsafe { region.as_ref() }
            .live_pages
            .fetch_sub(1, Ordering::AcqRel);
        if live == 1 {
            // The last page: the region is ours. AcqRel: every holder's use
            // of its pages happened-before this.
            // SAFETY: no page of the region is held by anyone now.
            panics.run(|| unsafe { release_region(region) });
        }
    }
    panics.resume();
}

/// Releases a region with no page left: removes its record and unmaps it in
/// one device call, then frees it; once `unbind` has closed the gates, hands
/// it to `unbind`.
///
/// # Safety
/// The caller owns the region (it retired its last page).
unsafe fn release_region<M: TrackingMode>(region: NonNull<Region<M>>) {
    // SAFETY: owned, live.
    let pool = Arc::clone(&unsafe { region.as_ref() }.pool);
    let Some(call) = pool.device_call() else {
        // SAFETY: forwarded caller contract.
        return unsafe { pool.device.free_regions_after_unbind(&[region]) };
    };
    // SAFETY: owned, live.
    let shared = unsafe { region.as_ref() };
    // Tracked: the gate is open, so `unbind` has not taken this record.
    let owned = !M::TRACKED || pool.device.region_tracker.remove(shared.record(), region);
    if owned {
        let mut unmapper = Unmapper::new();
        unmapper.push_region(shared);
        /// Frees the region when the unmap returns, or panics (which
        /// counts as made).
        struct FreeAfter<M: TrackingMode>(NonNull<Region<M>>);
        impl<M: TrackingMode> Drop for FreeAfter<M> {
            fn drop(&mut self) {
                // SAFETY: unmapped (or the unmap panicked, which counts as
                // made); owned.
                unsafe { free_regions(&[self.0]) };
            }
        }
        let free_after = FreeAfter(region);
        // SAFETY: mapped by `map_region` on this device, record removed just
        // above: unmapped once, here.
        unsafe { unmapper.flush(&*call, &pool.device.kept) };
        drop(call);
        drop(free_after);
    }
}

/// Frees regions whose mapping is gone: their page metadata, their memory
/// (back to the source, every one even if a free panics) and the pool
/// reference they hold.
///
/// # Safety
/// Every region is owned by the caller (its last page retired), no longer
/// mapped, and not used afterwards.
pub(crate) unsafe fn free_regions<M: TrackingMode>(regions: &[NonNull<Region<M>>]) {
    let mut panics = Panics::new();
    for &region in regions {
        // SAFETY: owned by the caller, live until taken below.
        if unsafe { region.as_ref() }
            .pool
            .device
            .kept
            .is_kept(region.as_ptr())
        {
            // Its unmap failed: the device may still reach the memory, so
            // the region is kept, with its pages' metas, for good
            // (invariant 4).
            continue;
        }
        // SAFETY: forwarded caller contract, each once.
        let (region, pages) = unsafe { take_region(region) };
        let count = pages.len();
        drop(pages);
        let pool = Arc::clone(&region.pool);
        let block = RegionBlock {
            ptr: region.cpu,
            backing: region.backing,
        };
        drop(region);
        if let Some(regions) = &pool.regions {
            regions.live.fetch_sub(1, Ordering::Relaxed);
            // SAFETY: from this source with this length; unmapped, so no
            // device can reach it (invariant 4).
            panics.run(|| unsafe { regions.source.free_region(block, regions.len) });
        }
        // Release: as for pages, the region's last device call
        // happened-before a reader that sees the count drop.
        pool.pages_allocated.fetch_sub(count, Ordering::Release);
    }
    panics.resume();
}

impl<M: TrackingMode> DeviceShared<M> {
    /// Regions whose last page came back after `unbind` closed the gates:
    /// tracked, freed once `unbind` has unmapped them (at once if it has
    /// finished); untracked, they stay mapped forever, so their memory is
    /// leaked on purpose.
    ///
    /// # Safety
    /// The caller owns every region and does not use it afterwards.
    pub(crate) unsafe fn free_regions_after_unbind(&self, regions: &[NonNull<Region<M>>]) {
        if !M::TRACKED {
            for region in regions {
                // SAFETY: owned, live.
                let pages = unsafe { region.as_ref() }.pages.len();
                self.leaked_pages.fetch_add(pages, Ordering::Relaxed);
            }
            return;
        }
        // BROKEN VARIANT (test-only, `--cfg pagepool_broken`,
        // PAGEPOOL_BROKEN=region-free-before-unbind): free the regions at
        // once instead of handing them to the running unbind, so a region's
        // memory is freed while still mapped. Caught by the region-retire
        // loom model (a mapped region freed).
        #[cfg(pagepool_broken)]
        if crate::sync::broken("region-free-before-unbind") {
            // SAFETY: none, deliberately: this is the planted bug.
            unsafe { free_regions(regions) };
            return;
        }
        if self.defer_regions_until_unbound(regions) {
            return;
        }
        // SAFETY: `unbind` finished: it unmapped every recorded region.
        unsafe { free_regions(regions) };
    }
}
