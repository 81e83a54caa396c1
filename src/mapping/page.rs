//! Pools that map page by page: [`map_page`] maps and records one page,
//! [`release_pages`] takes pages out of their pool (remove the record,
//! unmap, free), [`free_pages`] frees pages whose mapping is gone.
//!
//! # Invariants
//!
//! See the [parent module](super): no mapping without a record; a record
//! removed before its unmap; memory freed only after the unmap, outside
//! every device call; every free of a batch made even if one panics.

use core::ptr::NonNull;

use super::meta_block::{take, MetaFiller};
use super::region::{retire_pages, return_pages};
use super::unmapper::{Unmapper, UNMAP_BATCH};
use crate::dma::{DmaAddr, DmaError};
use crate::error::AllocError;
use crate::mode::TrackingMode;
use crate::shared::{meta_ref, DeviceShared, MetaHome, PageMeta, PageView, PoolShared};
use crate::sync::{Arc, AtomicUsize, Ordering, UnsafeCell};
use crate::tracker::{InsertError, RecordId};
use crate::unwind::Panics;

/// Page memory taken from a source and not (yet) part of a page: goes back
/// to the source when dropped, also on unwind.
struct FreshBlock<'a, M: TrackingMode> {
    pool: &'a PoolShared<M>,
    cpu: NonNull<u8>,
}

impl<M: TrackingMode> FreshBlock<'_, M> {
    fn into_page(self) -> NonNull<u8> {
        let cpu = self.cpu;
        core::mem::forget(self);
        cpu
    }
}

impl<M: TrackingMode> Drop for FreshBlock<'_, M> {
    fn drop(&mut self) {
        // SAFETY: the block came from this source with this order and was
        // never mapped (or its map failed or panicked, which counts as
        // mapping nothing, see `DmaOps::map`); nobody else has it.
        unsafe {
            self.pool
                .source
                .free_pages(self.cpu, self.pool.config.order)
        };
    }
}

/// Allocates one page from the pool's source, maps it and records it: the
/// slow path for one page. The source is called outside every gate; the map
/// and the record are one device call. The page's meta goes into `metas`'
/// block.
pub(crate) fn map_page<M: TrackingMode>(
    pool: &Arc<PoolShared<M>>,
    metas: &mut MetaFiller<M>,
) -> Result<NonNull<PageMeta<M>>, AllocError> {
    let config = pool.config;
    if pool.gate.is_closed() {
        return Err(AllocError::Unbound);
    }
    let cpu = pool
        .source
        .alloc_pages(config.order)
        .map_err(|_| AllocError::OutOfMemory {
            bytes: config.page_len,
        })?;
    // Declared before the call, so on every exit (and unwind) the call ends
    // first and the block goes back to its source outside the gate.
    let block = FreshBlock { pool, cpu };
    if let Some(align) = pool.device.min_page_size {
        if cpu.as_ptr().addr() % align != 0 {
            // Mapping it would widen the mapping over its neighbours.
            return Err(AllocError::Misaligned { align });
        }
    }
    let Some(call) = pool.device_call() else {
        return Err(AllocError::Unbound);
    };
    // SAFETY: `cpu` is a fresh block of page_len bytes that stays allocated
    // until this page's unmap has returned (pages are freed only after
    // that); no CPU reference to it exists.
    let dma =
        unsafe { call.map(cpu, config.page_len, config.direction) }.map_err(AllocError::Map)?;
    if dma == DmaAddr::ERROR {
        // Linux's failed-mapping value: nothing is mapped; the block goes
        // back to its source.
        return Err(AllocError::Map(DmaError::ErrorAddress));
    }
    let meta = metas.place(PageMeta {
        cpu: block.into_page(),
        view: PageView::of(pool),
        dma,
        record: UnsafeCell::new(RecordId::NONE),
        pool: Arc::clone(pool),
        frag_refs: AtomicUsize::new(0),
        dirty_len: UnsafeCell::new(u32::MAX),
        home: MetaHome::boxed(),
    });
    pool.pages_allocated.fetch_add(1, Ordering::Relaxed);
    pool.pages_mapped.fetch_add(1, Ordering::Relaxed);
    if M::TRACKED {
        // The gate is open (we are inside a call), so `unbind` has not yet
        // walked the tracker: the shard cannot be closed.
        match pool.device.tracker.insert(pool.tracker_shard, meta) {
            Ok(id) => {
                // SAFETY: live: we made it just above.
                let made = unsafe { meta.as_ref() };
                // SAFETY: the meta is not shared yet: the tracker keeps it as an
                // opaque key and only `unbind` reads through it, after this call
                // has ended.
                unsafe { made.set_record(id) }
            }
            Err(why) => {
                // Never recorded, never shared: unmapped here, once.
                let mut unmapper = Unmapper::new();
                // SAFETY: the meta is live and ours.
                unmapper.push(unsafe { meta_ref(meta) });
                // SAFETY: mapped above, never recorded.
                unsafe { unmapper.flush(&*call, &pool.device.kept) };
                drop(call);
                // SAFETY: unmapped, ours alone.
                unsafe { free_pages(&[meta]) };
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
    Ok(meta)
}

/// Frees the memory and metadata of every page, making every
/// `PageSource::free_pages` call even if one panics: the panic goes on once
/// the other pages are freed (a free that panicked is not repeated).
///
/// # Safety
/// No page is mapped any more (its unmap has returned, or `unbind` unmapped
/// it), the caller owns every page, and none is used afterwards.
pub(crate) unsafe fn free_pages<M: TrackingMode>(pages: &[NonNull<PageMeta<M>>]) {
    /// Frees what is left if a `free_pages` panics (nothing on the normal
    /// path: no `catch_unwind` there).
    struct Rest<'a, M: TrackingMode> {
        pages: &'a [NonNull<PageMeta<M>>],
        next: usize,
    }
    impl<M: TrackingMode> Drop for Rest<'_, M> {
        fn drop(&mut self) {
            let mut panics = Panics::new();
            for &page in &self.pages[self.next..] {
                // SAFETY: `free_pages`' contract, for each page left, once.
                panics.run(|| unsafe { free_page(page) });
            }
            // Only reached while unwinding: the first panic is on its way.
            panics.resume();
        }
    }
    let mut rest = Rest { pages, next: 0 };
    while let Some(&page) = pages.get(rest.next) {
        rest.next += 1;
        // SAFETY: forwarded caller contract, for each page once.
        unsafe { free_page(page) };
    }
}

/// Frees one page's memory and metadata; a region page is retired instead
/// (its region is freed with its last page).
///
/// # Safety
/// As for [`free_pages`].
unsafe fn free_page<M: TrackingMode>(meta: NonNull<PageMeta<M>>) {
    // SAFETY: live until freed here (caller contract).
    let live = unsafe { meta_ref(meta) };
    if live.region().is_some() {
        // SAFETY: owned by the caller, leaving the pool for good.
        return unsafe { retire_pages(&[meta]) };
    }
    if live.pool.device.kept.is_kept(meta.as_ptr()) {
        // Its unmap failed: the device may still reach the memory, so it
        // is kept, with its meta, for good (invariant 4).
        return;
    }
    // SAFETY: metas of pages mapped one by one are placed by `map_page`
    // and freed only here, once (caller contract). The slot is given up
    // after the page memory (also on unwind: declared after `meta`, it
    // drops first of the two, after the call below).
    let (meta, slot) = unsafe { take(meta) };
    let pool = &meta.pool;
    // Release: the page's last device call happened-before a reader that
    // sees the count drop (the registry prunes detached pools by it).
    pool.pages_allocated.fetch_sub(1, Ordering::Release);
    // SAFETY: the block came from this source with this order and is no
    // longer mapped, so no device can reach it (invariant 4).
    unsafe { pool.source.free_pages(meta.cpu, pool.config.order) };
    drop(slot);
}

/// Releases pages leaving `pool` (ring full, pool dropped, late return):
/// each is unmapped by whoever removes its record, then freed; pages that
/// come back while `unbind` runs are handed to it.
///
/// Each batch of up to [`UNMAP_BATCH`] pages is one device call, so an
/// `unbind` waits for one batch of this release, never for all of it.
///
/// # Safety
/// Every page in `pages` belongs to `pool`, the caller owns it and does not
/// use it afterwards.
pub(crate) unsafe fn release_pages<M: TrackingMode>(
    pool: &PoolShared<M>,
    pages: &[NonNull<PageMeta<M>>],
) {
    if pool.regions.is_some() {
        // A region's pages are not mapped one by one.
        // SAFETY: forwarded caller contract.
        return unsafe { return_pages(pool, pages) };
    }
    /// Finishes the release if a callback panics: frees the pages whose
    /// unmap was made (or panicked, which counts as made) and releases the
    /// rest; the panic then goes on. Nothing runs on the normal path (no
    /// `catch_unwind` there).
    struct Rest<'a, M: TrackingMode> {
        pool: &'a PoolShared<M>,
        pages: &'a [NonNull<PageMeta<M>>],
        /// `pages[..freed]` are freed (or being freed by `free_pages`,
        /// which finishes on its own).
        freed: usize,
        /// `pages[freed..unmapped]` are unmapped, not yet freed.
        unmapped: usize,
    }
    impl<M: TrackingMode> Drop for Rest<'_, M> {
        fn drop(&mut self) {
            if self.freed == self.pages.len() {
                return;
            }
            let mut panics = Panics::new();
            let unmapped = &self.pages[self.freed..self.unmapped];
            // SAFETY: their unmap was made; owned by the caller.
            panics.run(|| unsafe { free_pages(unmapped) });
            let left = &self.pages[self.unmapped..];
            // SAFETY: still owned by the caller, untouched.
            panics.run(|| unsafe { release_pages(self.pool, left) });
            panics.resume();
        }
    }
    let mut rest = Rest {
        pool,
        pages,
        freed: 0,
        unmapped: 0,
    };
    while rest.freed < pages.len() {
        let start = rest.freed;
        let chunk = &pages[start..pages.len().min(start + UNMAP_BATCH)];
        let Some(call) = pool.device_call() else {
            // `unbind` has begun: it unmaps these pages (tracked), and they
            // must not be freed before it has; the same for the rest.
            rest.freed = pages.len();
            rest.unmapped = pages.len();
            // SAFETY: forwarded caller contract.
            unsafe { pool.device.free_after_unbind(&pages[start..]) };
            return;
        };
        let mut unmapper = Unmapper::new();
        for &page in chunk {
            // SAFETY: owned by the caller, not yet freed.
            let meta = unsafe { meta_ref(page) };
            // Tracked: the gate is open, so `unbind` has not taken this
            // record; only this page's owner, the caller, can remove it.
            #[cfg(not(pagepool_broken))]
            let owned = !M::TRACKED || pool.device.tracker.remove(meta.record(), page);
            // BROKEN VARIANT (test-only, `--cfg pagepool_broken`,
            // PAGEPOOL_BROKEN=release-keeps-record): unmap without removing
            // the record, so unbind unmaps the page again. Caught by the
            // ring-full loom model with its slow page source (double unmap).
            #[cfg(pagepool_broken)]
            let owned = !M::TRACKED
                || crate::sync::broken("release-keeps-record")
                || pool.device.tracker.remove(meta.record(), page);
            if owned {
                unmapper.push(meta);
            }
        }
        rest.unmapped = start + chunk.len();
        // SAFETY: each mapping came from `map` on this device and its record
        // was removed just above; unmapped once, here.
        unsafe { unmapper.flush(&*call, &pool.device.kept) };
        drop(call);
        rest.freed = rest.unmapped;
        // SAFETY: unmapped; owned.
        unsafe { free_pages(chunk) };
    }
}

impl<M: TrackingMode> DeviceShared<M> {
    /// Pages that came back after `unbind` closed the gates: tracked, they
    /// are freed once `unbind` has unmapped them (at once if it has
    /// finished); untracked, they stay mapped forever, so their memory is
    /// leaked on purpose rather than freed under a live mapping.
    ///
    /// # Safety
    /// The caller owns every page and does not use it afterwards.
    pub(crate) unsafe fn free_after_unbind(&self, pages: &[NonNull<PageMeta<M>>]) {
        if !M::TRACKED {
            self.leaked_pages.fetch_add(pages.len(), Ordering::Relaxed);
            return;
        }
        // BROKEN VARIANT (test-only, `--cfg pagepool_broken`,
        // PAGEPOOL_BROKEN=free-before-unbind): free the pages at once instead
        // of handing them to the running unbind, so their memory is freed
        // while still mapped and their metadata while unbind may still read
        // it. Caught by the call-gate and re-entrant-drop loom models (a
        // mapped block freed).
        #[cfg(pagepool_broken)]
        if crate::sync::broken("free-before-unbind") {
            // SAFETY: none, deliberately: this is the planted bug (the pages
            // may still be recorded and mapped).
            unsafe { free_pages(pages) };
            return;
        }
        if self.defer_until_unbound(pages) {
            return;
        }
        // SAFETY: `unbind` finished: it unmapped every recorded page.
        unsafe { free_pages(pages) };
    }
}
