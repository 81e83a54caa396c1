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
//! - A mapping the backend reports as not unmapped is recorded in the
//!   device's [`KeptMappings`] before `flush` returns, and never unmapped
//!   again. Every path that frees mapped memory (`free_pages`,
//!   `free_regions`, a fresh region whose record failed) asks
//!   [`KeptMappings::is_kept`] first and leaves kept memory allocated for
//!   good (invariant 4). The record happens-before that question: on the
//!   same thread, or, for a page or region `unbind` unmapped while someone
//!   else held it, through the hand-over to `unbind` (its lock) that every
//!   such page or region goes through before it is freed.

use core::mem::MaybeUninit;
use std::collections::{HashMap, HashSet};

use crate::dma::{DmaMapping, DmaOps, UnmapError};
use crate::mode::TrackingMode;
use crate::shared::{PageMeta, Region};
use crate::sync::{AtomicUsize, Mutex, Ordering};

/// Mappings whose unmap failed, kept for good: one per device.
pub(crate) struct KeptMappings {
    /// The number of keys in `state`: 0 on every device whose unmaps all
    /// succeeded, so the question costs one load there.
    count: AtomicUsize,
    state: Mutex<KeptState>,
}

#[derive(Default)]
struct KeptState {
    /// Addresses of the `PageMeta`s and `Region`s whose mapping may still
    /// exist. Never freed, so an address is never reused by another.
    keys: HashSet<usize>,
    /// Per pool id: mappings and bytes kept.
    pools: HashMap<u32, KeptCount>,
    total: KeptCount,
    last_error: Option<UnmapError>,
}

/// Mappings kept because their unmap failed, and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct KeptCount {
    pub(crate) mappings: u64,
    pub(crate) bytes: u64,
}

impl Default for KeptMappings {
    fn default() -> Self {
        Self {
            count: AtomicUsize::new(0),
            state: Mutex::new(KeptState::default()),
        }
    }
}

impl KeptMappings {
    fn record(&self, entry: &Entry, error: UnmapError) {
        let mut state = self.state.lock();
        if state.keys.insert(entry.key) {
            let add = |count: &mut KeptCount| {
                count.mappings += 1;
                count.bytes += entry.bytes;
            };
            add(state.pools.entry(entry.pool).or_default());
            add(&mut state.total);
            state.last_error = Some(error);
            self.count.fetch_add(1, Ordering::Release);
        }
    }

    /// Whether the memory at `key` (a `PageMeta` or `Region` address) must
    /// be kept: its unmap failed.
    pub(crate) fn is_kept<T>(&self, key: *const T) -> bool {
        self.count.load(Ordering::Acquire) != 0 && self.state.lock().keys.contains(&key.addr())
    }

    /// What pool `pool` has kept.
    pub(crate) fn pool(&self, pool: u32) -> KeptCount {
        if self.count.load(Ordering::Acquire) == 0 {
            return KeptCount::default();
        }
        self.state
            .lock()
            .pools
            .get(&pool)
            .copied()
            .unwrap_or_default()
    }

    /// What the whole device has kept.
    pub(crate) fn total(&self) -> KeptCount {
        if self.count.load(Ordering::Acquire) == 0 {
            return KeptCount::default();
        }
        self.state.lock().total
    }

    /// The last failure the backend reported.
    pub(crate) fn last_error(&self) -> Option<UnmapError> {
        self.state.lock().last_error.clone()
    }
}

/// Who a pushed mapping belongs to, for [`KeptMappings`].
#[derive(Clone, Copy)]
struct Entry {
    key: usize,
    pool: u32,
    bytes: u64,
}

/// Mappings handed to one `unmap_batch` call.
pub(crate) const UNMAP_BATCH: usize = 64;

/// Mappings waiting for one `unmap_batch` call, on the stack. The array is
/// left uninitialised until pushed to, so a one-page release does not write
/// the whole batch.
pub(crate) struct Unmapper {
    /// `batch[..len]` and `owners[..len]` are initialised.
    batch: [MaybeUninit<DmaMapping>; UNMAP_BATCH],
    owners: [MaybeUninit<Entry>; UNMAP_BATCH],
    len: usize,
}

impl Unmapper {
    pub(crate) const fn new() -> Self {
        Self {
            batch: [const { MaybeUninit::uninit() }; UNMAP_BATCH],
            owners: [const { MaybeUninit::uninit() }; UNMAP_BATCH],
            len: 0,
        }
    }

    /// Adds the mapping of `meta`, whose record the caller removed (or, in
    /// an untracked build, whose page the caller owns). Returns whether the
    /// batch is now full and must be flushed.
    pub(crate) fn push<M: TrackingMode>(&mut self, meta: &PageMeta<M>) -> bool {
        meta.pool.pages_mapped.fetch_sub(1, Ordering::Relaxed);
        let mapping = meta.mapping();
        self.push_mapping(
            mapping,
            Entry {
                key: core::ptr::from_ref(meta).addr(),
                pool: meta.pool.id,
                bytes: mapping.len as u64,
            },
        )
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
        let mapping = region.mapping();
        self.push_mapping(
            mapping,
            Entry {
                key: core::ptr::from_ref(region).addr(),
                pool: pool.id,
                bytes: mapping.len as u64,
            },
        )
    }

    fn push_mapping(&mut self, mapping: DmaMapping, owner: Entry) -> bool {
        self.batch[self.len].write(mapping);
        self.owners[self.len].write(owner);
        self.len += 1;
        self.len == UNMAP_BATCH
    }

    /// Unmaps the batch in one call and empties it (also if the call
    /// panics: a call that panics counts as made, never repeated). Every
    /// mapping the backend reports as not unmapped is recorded in `kept`;
    /// returns how many.
    ///
    /// # Safety
    /// Every mapping pushed came from a successful `map` on `ops` and had
    /// its record removed by the caller; none is unmapped elsewhere.
    pub(crate) unsafe fn flush(&mut self, ops: &dyn DmaOps, kept: &KeptMappings) -> usize {
        let len = core::mem::take(&mut self.len);
        if len == 0 {
            return 0;
        }
        // SAFETY: `batch[..len]` were written by `push` (`DmaMapping` is
        // `Copy`, so nothing needs dropping), and `MaybeUninit<T>` has
        // `T`'s layout.
        let batch = unsafe { &*(&raw const self.batch[..len] as *const [DmaMapping]) };
        // SAFETY: forwarded caller contract.
        let Err(failed) = (unsafe { ops.unmap_batch(batch) }) else {
            return 0;
        };
        let mut count = 0;
        for (index, error) in failed.failed() {
            // An index outside the batch is the backend's mistake: then
            // nothing it reported can be trusted, so keep the whole batch.
            if *index >= len {
                for owner in &self.owners[..len] {
                    // SAFETY: written with its mapping by `push_mapping`.
                    kept.record(unsafe { owner.assume_init_ref() }, error.clone());
                }
                return len;
            }
        }
        for (index, error) in failed.failed() {
            // SAFETY: `index < len`, written by `push_mapping`.
            kept.record(
                unsafe { self.owners[*index].assume_init_ref() },
                error.clone(),
            );
            count += 1;
        }
        count
    }
}
