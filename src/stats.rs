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
//! Every counter is readable from any thread: through the pool
//! ([`PagePool::stats`](crate::PagePool::stats)) or through its device
//! ([`Device::pools`](crate::Device::pools), [`Device::stats`](crate::Device::stats)).
//!
//! # Names
//!
//! Where a name is Linux's, it means what Linux means by it: the alloc and
//! recycle counters are `page_pool_stats`' (printed with their ethtool
//! names, `rx_pp_*`, by [`PoolStats`]'s `Display`), and [`PoolInfo`]'s
//! fields are netlink `page-pool-get`'s (`inflight` counts every page the
//! pool took from memory and has not released, its cache and ring
//! included). Counters Linux does not have carry names of their own
//! (`pages_held`, `released_closed`).

use core::fmt;
use core::iter::Sum;
use core::ops::{Add, AddAssign};
use std::sync::Arc;
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
    /// Linux counts pages released instead of recycled because someone
    /// else still held a reference to them. A page here has one owner (a
    /// page's fragments and `Bytes` clones give it back only when the last
    /// one goes), so none is ever released for that reason and this stays
    /// 0; it is kept so dashboards built for Linux's names read the same
    /// fields. Pages released because their pool was closed are
    /// [`released_closed`](Self::released_closed).
    pub released_refcnt: u64,
    /// Pages that came back after their pool was dropped or its device
    /// unbound, and were released (unmapped and freed; after an unbind,
    /// freed with no device call) instead of recycled.
    pub released_closed: u64,
}

/// A point-in-time view of one pool's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Allocation counters.
    pub alloc: AllocStats,
    /// Recycling counters.
    pub recycle: RecycleStats,
    /// Pages handed out (to the driver, and through it to the stack) and
    /// not yet given back. Not Linux's `inflight`, which also counts the
    /// pool's cache and ring: that is [`PoolInfo::inflight`].
    pub pages_held: u64,
    /// `pages_held` in bytes.
    pub bytes_held: u64,
    /// Pages of this pool currently DMA-mapped (in cache, ring or held).
    pub pages_mapped: u64,
    /// `pages_mapped` in bytes.
    pub bytes_mapped: u64,
    /// Mappings of this pool (pages, or regions of a region-mapped pool)
    /// whose unmap the backend reported as failed. They are no longer
    /// counted in `pages_mapped`, but their memory is kept: never freed,
    /// never reused, since the device may still reach it.
    pub unmap_failures: u64,
    /// Bytes of those mappings.
    pub bytes_kept: u64,
}

/// What netlink's `page-pool-get` reports for a pool, with the pool's
/// counters: readable from any thread through
/// [`Device::pools`](crate::Device::pools).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolInfo {
    /// The pool's id, unique in the process.
    pub id: u32,
    /// The pool's label, if its builder gave one
    /// ([`PagePoolBuilder::label`](crate::PagePoolBuilder::label); Linux
    /// names the netdev).
    pub label: Option<Arc<str>>,
    /// The queue the pool serves, if its builder said
    /// ([`PagePoolBuilder::queue`](crate::PagePoolBuilder::queue); Linux's
    /// `queue_idx`).
    pub queue: Option<u32>,
    /// Pages the pool took from memory and has not released (Linux's
    /// `inflight`): handed out, in its cache, in its ring or kept back in a
    /// thread's batch of remote returns. For a pool its owner dropped, the
    /// pages still held outside.
    pub inflight: u64,
    /// `inflight` in bytes (`inflight-mem`).
    pub inflight_mem: u64,
    /// The pool's counters.
    pub stats: PoolStats,
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

/// Field-wise sums, for totals over pools (a device's queues).
macro_rules! field_sums {
    ($type:ty { $($field:ident),* $(,)? } $( { $($nested:ident),* } )?) => {
        impl AddAssign for $type {
            fn add_assign(&mut self, other: Self) {
                $(self.$field += other.$field;)*
                $($(self.$nested += other.$nested;)*)?
            }
        }

        impl Add for $type {
            type Output = Self;

            fn add(mut self, other: Self) -> Self {
                self += other;
                self
            }
        }

        impl Sum for $type {
            fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
                iter.fold(Self::default(), Add::add)
            }
        }

        impl<'a> Sum<&'a $type> for $type {
            fn sum<I: Iterator<Item = &'a Self>>(iter: I) -> Self {
                iter.copied().sum()
            }
        }
    };
}

field_sums!(AllocStats {
    fast,
    slow,
    slow_high_order,
    empty,
    refill,
    waive
});
field_sums!(RecycleStats {
    cached,
    cache_full,
    ring,
    ring_full,
    released_refcnt,
    released_closed
});
field_sums!(PoolStats {
    alloc,
    recycle,
    pages_held,
    bytes_held,
    pages_mapped,
    bytes_mapped
});

/// `ethtool -S` style: one `name: value` line per counter, Linux's eleven
/// `rx_pp_*` counters first, under their ethtool names, then this crate's
/// own (`pp_*`).
///
/// ```
/// use pagepool::{AllocStats, PoolStats};
///
/// let stats = PoolStats {
///     alloc: AllocStats { fast: 7, ..AllocStats::default() },
///     ..PoolStats::default()
/// };
/// let text = stats.to_string();
/// assert!(text.starts_with("rx_pp_alloc_fast: 7\n"));
/// assert!(text.contains("rx_pp_recycle_released_ref: 0\n"));
/// ```
impl fmt::Display for PoolStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, r) = (&self.alloc, &self.recycle);
        let lines: [(&str, u64); 16] = [
            ("rx_pp_alloc_fast", a.fast),
            ("rx_pp_alloc_slow", a.slow),
            ("rx_pp_alloc_slow_ho", a.slow_high_order),
            ("rx_pp_alloc_empty", a.empty),
            ("rx_pp_alloc_refill", a.refill),
            ("rx_pp_alloc_waive", a.waive),
            ("rx_pp_recycle_cached", r.cached),
            ("rx_pp_recycle_cache_full", r.cache_full),
            ("rx_pp_recycle_ring", r.ring),
            ("rx_pp_recycle_ring_full", r.ring_full),
            ("rx_pp_recycle_released_ref", r.released_refcnt),
            ("pp_recycle_released_closed", r.released_closed),
            ("pp_pages_held", self.pages_held),
            ("pp_bytes_held", self.bytes_held),
            ("pp_pages_mapped", self.pages_mapped),
            ("pp_bytes_mapped", self.bytes_mapped),
        ];
        for (name, value) in lines {
            writeln!(f, "{name}: {value}")?;
        }
        Ok(())
    }
}

/// One line: id, label and queue where set, `inflight`, detach state.
impl fmt::Display for PoolInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pool {}", self.id)?;
        if let Some(label) = &self.label {
            write!(f, " {label}")?;
        }
        if let Some(queue) = self.queue {
            write!(f, " queue {queue}")?;
        }
        write!(
            f,
            ": inflight {} ({} bytes), held {}",
            self.inflight, self.inflight_mem, self.stats.pages_held
        )?;
        if self.detach_time.is_some() {
            f.write_str(", detached")?;
        }
        Ok(())
    }
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
