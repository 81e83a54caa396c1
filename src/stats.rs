//! Pool statistics, named as Linux's `CONFIG_PAGE_POOL_STATS`, and the
//! `page-pool-get` style snapshot.
//!
//! Counters are kept where they are cheap:
//! - the owner's counters (alloc, direct recycle) are written only by the
//!   context that owns the pool, with a relaxed load and store (no
//!   read-modify-write), and summed on read, like Linux's per-CPU counters;
//! - ring counters are plain integers under the ring's own lock;
//! - counters of the slow paths (release, map, unmap) are atomic adds.
//!
//! A snapshot read while the pool runs is not atomic across counters: each
//! counter is exact, their sum may be off by the operations in progress.

use std::time::SystemTime;

use crate::memory::RegionBacking;
use crate::sync::{AtomicU64, Ordering};

/// Allocation counters (Linux: `page_pool_alloc_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Pages handed out from the local cache.
    pub fast: u64,
    /// Slow-path batches of order-0 pages: allocations that found cache
    /// and ring empty and mapped fresh pages (up to a refill batch each).
    /// Counts events, not pages, as Linux's `slow` does.
    pub slow: u64,
    /// Slow-path allocations of a higher-order page (one page each).
    pub slow_high_order: u64,
    /// Times the shared ring was empty when the cache needed a refill.
    pub empty: u64,
    /// Refills of the local cache from the shared ring (up to a refill
    /// batch of pages each). Counts events, not pages, as Linux's `refill`
    /// does.
    pub refill: u64,
    /// Linux counts pages dropped on refill for being on the wrong NUMA
    /// node here. This pool has no NUMA placement policy, so it never waives
    /// a page and this stays 0; it is kept so dashboards built for Linux's
    /// names read the same fields.
    pub waive: u64,
}

/// Recycling counters (Linux: `page_pool_recycle_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecycleStats {
    /// Pages recycled directly into the local cache.
    pub cached: u64,
    /// Direct recycles that found the local cache full (and went on to the
    /// ring).
    pub cache_full: u64,
    /// Pages recycled into the shared ring.
    pub ring: u64,
    /// Pages that found the ring full: left the pool (unmapped and freed),
    /// or, in a region-mapped pool, went to the pool's spare list (a
    /// region's pages stay mapped with their region).
    pub ring_full: u64,
    /// Pages that came back after their pool was dropped or its device
    /// unbound, and were released instead of recycled.
    pub released_refcnt: u64,
}

/// A point-in-time view of one pool's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Allocation counters.
    pub alloc: AllocStats,
    /// Recycling counters.
    pub recycle: RecycleStats,
    /// Pages handed out and not yet given back.
    pub pages_in_flight: u64,
    /// `pages_in_flight` in bytes.
    pub bytes_in_flight: u64,
    /// Pages of this pool currently DMA-mapped (in cache, ring or held).
    pub pages_mapped: u64,
    /// `pages_mapped` in bytes.
    pub bytes_mapped: u64,
}

/// What netlink's `page-pool-get` reports for a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolInfo {
    /// The pool's id, unique in the process.
    pub id: u32,
    /// Pages handed out and not yet given back (`inflight`).
    pub inflight: u64,
    /// `inflight` in bytes (`inflight-mem`).
    pub inflight_mem: u64,
    /// When the pool was dropped by its owner, if it was (`detach-time`).
    pub detach_time: Option<SystemTime>,
    /// A region-mapped pool's regions; `None` for a pool mapped page by
    /// page.
    pub regions: Option<RegionInfo>,
}

/// The regions of a region-mapped pool (see
/// [`PagePoolBuilder::regions`](crate::PagePoolBuilder::regions)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Bytes per region.
    pub region_len: usize,
    /// Regions mapped now: one device mapping each.
    pub regions_mapped: u64,
    /// Regions allocated now: the mapped ones, plus those `unbind` unmapped
    /// while some of their pages were still held.
    pub regions_live: u64,
    /// Regions mapped since the pool was built.
    pub regions_total: u64,
    /// Pages carved from the regions allocated now.
    pub pages_carved: u64,
    /// Memory pinned for the device now: every mapped region whole, free
    /// pages included (`regions_mapped * region_len`).
    pub bytes_pinned: u64,
    /// What backs the last region allocated (huge pages or not).
    pub backing: Option<RegionBacking>,
}

/// A counter with a single writer: bumped by load + store, never an atomic
/// read-modify-write. Readers on other threads see a value that is exact
/// but possibly a few increments old.
#[derive(Debug, Default)]
pub(crate) struct OwnerCounter(AtomicU64);

impl OwnerCounter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        // Only the pool's owner writes this counter (it takes `&mut
        // PagePool` to get here), so load + store loses no update.
        self.0
            .store(self.0.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters written only by the pool's owner, on every allocation: on a
/// line (two, for the adjacent-line prefetcher) of their own, so a thread
/// returning pages (which reads the pool's flags) never waits for the line
/// the owner just wrote.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct OwnerCounters {
    pub(crate) fast: OwnerCounter,
    pub(crate) slow: OwnerCounter,
    pub(crate) slow_high_order: OwnerCounter,
    pub(crate) empty: OwnerCounter,
    pub(crate) refill: OwnerCounter,
    pub(crate) cached: OwnerCounter,
    pub(crate) cache_full: OwnerCounter,
}

/// Counters of the ring, kept under the ring's lock.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RingCounters {
    pub(crate) ring: u64,
    pub(crate) ring_full: u64,
}
