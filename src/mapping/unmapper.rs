//! The one batcher of unmaps: [`Unmapper`] collects the mappings whose
//! records its caller removed and hands them to `DmaOps::unmap_batch`, at
//! most [`UNMAP_BATCH`] per call, so an `unbind` waits for one batch, never
//! for a whole release.
//!
//! # Invariants
//!
//! - Every mapping pushed is handed to exactly one `unmap_batch` call; a
//!   call that panics counts as made and is not repeated.
//! - `pages_mapped` (and a region pool's mapped-region count) drops when a
//!   mapping is pushed, the only place it drops.

use core::mem::MaybeUninit;

use crate::dma::{DmaMapping, DmaOps};
use crate::mode::TrackingMode;
use crate::shared::{PageMeta, Region};
use crate::sync::Ordering;

/// Mappings handed to one `unmap_batch` call.
pub(crate) const UNMAP_BATCH: usize = 64;

/// Mappings waiting for one `unmap_batch` call, on the stack. The array is
/// left uninitialised until pushed to, so a one-page release does not write
/// the whole batch.
pub(crate) struct Unmapper {
    /// `batch[..len]` are initialised.
    batch: [MaybeUninit<DmaMapping>; UNMAP_BATCH],
    len: usize,
}

impl Unmapper {
    pub(crate) const fn new() -> Self {
        Self {
            batch: [const { MaybeUninit::uninit() }; UNMAP_BATCH],
            len: 0,
        }
    }

    /// Adds the mapping of `meta`, whose record the caller removed (or, in
    /// an untracked build, whose page the caller owns). Returns whether the
    /// batch is now full and must be flushed.
    pub(crate) fn push<M: TrackingMode>(&mut self, meta: &PageMeta<M>) -> bool {
        meta.pool.pages_mapped.fetch_sub(1, Ordering::Relaxed);
        self.push_mapping(meta.mapping())
    }

    /// Adds the one mapping of `region`, whose record the caller removed (or,
    /// untracked, whose last page the caller retired). Returns whether the
    /// batch is now full and must be flushed.
    pub(crate) fn push_region<M: TrackingMode>(&mut self, region: &Region<M>) -> bool {
        let pool = &region.pool;
        pool.pages_mapped
            .fetch_sub(region.pages.len(), Ordering::Relaxed);
        if let Some(regions) = &pool.regions {
            regions.mapped.fetch_sub(1, Ordering::Relaxed);
        }
        self.push_mapping(region.mapping())
    }

    fn push_mapping(&mut self, mapping: DmaMapping) -> bool {
        self.batch[self.len].write(mapping);
        self.len += 1;
        self.len == UNMAP_BATCH
    }

    /// Unmaps the batch in one call and empties it (also if the call
    /// panics: a call that panics counts as made, never repeated).
    ///
    /// # Safety
    /// Every mapping pushed came from a successful `map` on `ops` and had
    /// its record removed by the caller; none is unmapped elsewhere.
    pub(crate) unsafe fn flush(&mut self, ops: &dyn DmaOps) {
        let len = core::mem::take(&mut self.len);
        if len > 0 {
            // SAFETY: `batch[..len]` were written by `push` (`DmaMapping` is
            // `Copy`, so nothing needs dropping), and `MaybeUninit<T>` has
            // `T`'s layout.
            let batch = unsafe { &*(&raw const self.batch[..len] as *const [DmaMapping]) };
            // SAFETY: forwarded caller contract.
            unsafe { ops.unmap_batch(batch) };
        }
    }
}
