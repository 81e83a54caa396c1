//! [`PagePool`]: the owner's handle, its builder, and the state it shares
//! with its pages.
//!
//! # Paths
//!
//! - **Fast path** ([`PagePool::alloc`], [`PagePool::alloc_bulk`],
//!   [`PagePool::recycle_direct`]): the
//!   local cache, a `Vec` of page pointers owned through `&mut PagePool` by
//!   one context (the driver's RX/NAPI loop). Pop or push, an acquire load
//!   of the `closed` flag (a plain load on x86), a check that a recycled
//!   page is the pool's own, single-writer counters: no lock, no
//!   atomic read-modify-write, no allocation, no tracker access. (With
//!   sync-for-device configured on a device that needs syncs, recycling
//!   makes that device call inside the pool's own call gate.)
//! - **Ring path**: pages dropped on other threads wait in that thread's
//!   batch of remote returns (`remote.rs`: plain stores, no lock) and go
//!   into the pool's bounded shared ring ([`crate::ring`]) a batch at a
//!   time under one lock; the owner refills its cache from the ring
//!   `refill_batch` pages at a time under one lock, after handing back its
//!   own thread's batch.
//! - **Slow path** ([`PagePool::alloc_slow`]): cache and ring empty, so
//!   allocate pages from the page source one at a time, outside any gate,
//!   and map and record each in one device call (`mapping::map_page`), up to
//!   a refill batch.
//!
//! # Invariants
//!
//! - Every page in the cache or the ring is mapped and tracked (unless the
//!   device has begun to unbind, which unmaps them through the tracker).
//! - A page enters the pool mapped, once; it is unmapped only when it leaves
//!   the pool (ring full, pool dropped) or at `unbind`.
//! - The pool's shared state lives while any of its pages does: each page's
//!   metadata holds an `Arc` of it, taken on the slow path only.

use core::fmt;
use core::ptr::NonNull;
use std::time::SystemTime;

use crate::dma::DmaDirection;
use crate::error::{AllocError, BuildError, ConfigError};
use crate::frag::{Frag, FragState};
use crate::gate::CallGate;
use crate::mapping::{map_page, map_region, release_pages, MetaFiller};
use crate::memory::{
    GlobalPages, PageSource, RegionSource, SystemRegions, DEFAULT_REGION_SIZE, MAX_ORDER,
    MAX_REGION_SIZE, PAGE_SIZE,
};
use crate::mode::{Tracked, TrackingMode};
use crate::page::{sync_on_recycle, Page, Returning};
use crate::remote::{self, MAX_REMOTE_BATCH};
use crate::ring::{PushRefused, Ring};
use crate::shared::{
    meta_ref, DeviceShared, PageMeta, PoolConfig, PoolShared, RegionPool, SyncForDevice,
};
use crate::stats::{OwnerCounters, PoolInfo, PoolStats};
use crate::sync::{self, Arc, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};
use crate::trace;
use crate::unwind::Panics;

/// Linux's `PP_ALLOC_CACHE_SIZE`.
pub const DEFAULT_CACHE_SIZE: usize = 128;
/// Linux's `PP_ALLOC_CACHE_REFILL` (the NAPI budget).
pub const DEFAULT_REFILL_BATCH: usize = 64;
/// Linux's default `ptr_ring` size.
pub const DEFAULT_RING_SIZE: usize = 1024;
/// Linux's largest `ptr_ring` size.
pub const MAX_RING_SIZE: usize = 16384;
/// The largest local cache the builder accepts.
pub const MAX_CACHE_SIZE: usize = 65536;
/// Pages a thread keeps back from a pool it does not own before handing
/// them to the pool's ring (see [`PagePoolBuilder::remote_batch`]): one
/// refill of the owner's cache ([`DEFAULT_REFILL_BATCH`]).
pub const DEFAULT_REMOTE_BATCH: usize = 64;

/// What the builder's range checks accept, spelled from the constants.
const ORDER_RANGE: &str = concat!("0..=", 10);
const RING_SIZE_RANGE: &str = concat!("1..=", 16384);
const CACHE_SIZE_RANGE: &str = concat!("1..=", 65536);
const REMOTE_BATCH_RANGE: &str = concat!("0..=", 64);
const _: () = assert!(
    MAX_ORDER == 10 && MAX_RING_SIZE == 16384 && MAX_CACHE_SIZE == 65536 && MAX_REMOTE_BATCH == 64
);

/// Builds a [`PagePool`] on a device; from
/// [`Device::pool_builder`](crate::Device::pool_builder).
///
/// Defaults: order 0 (4 KiB pages), ring of 1024, local cache of 128 with
/// refills of 64, direction `FromDevice`, no sync on recycle, pages from
/// [`GlobalPages`].
///
/// ```
/// use pagepool::{BuildError, ConfigError, Device, DmaDirection, IdentityDma};
///
/// let device = Device::new(IdentityDma::new());
/// // An RX queue's pool: 8 KiB pages, the device syncs the first 1536
/// // bytes of a recycled page back to itself (when it needs syncs).
/// let rx = device
///     .pool_builder()
///     .label("eth0-rx")
///     .queue(0)
///     .order(1)
///     .direction(DmaDirection::FromDevice)
///     .ring_size(2048)
///     .sync_for_device(0, 1536)
///     .build()?;
/// assert_eq!(rx.page_len(), 8192);
/// // A bad setting is named, with what it accepts.
/// let err = device.pool_builder().ring_size(0).build().unwrap_err();
/// assert!(matches!(
///     err,
///     BuildError::Config(ConfigError::OutOfRange { field: "ring_size", .. })
/// ));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use]
pub struct PagePoolBuilder<'d, M: TrackingMode = Tracked> {
    device: &'d Arc<DeviceShared<M>>,
    order: u32,
    ring_size: usize,
    cache_size: usize,
    refill_batch: usize,
    direction: DmaDirection,
    sync_for_device: Option<SyncForDevice>,
    source: Option<Box<dyn PageSource>>,
    region_len: Option<usize>,
    /// Whether `region_len` was set with `region_size` (not the default).
    region_len_set: bool,
    region_source: Option<Box<dyn RegionSource>>,
    remote_batch: usize,
    label: Option<String>,
    queue: Option<u32>,
}

impl<M: TrackingMode> fmt::Debug for PagePoolBuilder<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagePoolBuilder")
            .field("order", &self.order)
            .field("ring_size", &self.ring_size)
            .field("cache_size", &self.cache_size)
            .field("refill_batch", &self.refill_batch)
            .field("direction", &self.direction)
            .field("sync_for_device", &self.sync_for_device)
            .field("region_len", &self.region_len)
            .field("remote_batch", &self.remote_batch)
            .field("label", &self.label)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl<'d, M: TrackingMode> PagePoolBuilder<'d, M> {
    pub(crate) fn new(device: &'d Arc<DeviceShared<M>>) -> Self {
        Self {
            device,
            order: 0,
            ring_size: DEFAULT_RING_SIZE,
            cache_size: DEFAULT_CACHE_SIZE,
            refill_batch: DEFAULT_REFILL_BATCH,
            direction: DmaDirection::FromDevice,
            sync_for_device: None,
            source: None,
            region_len: None,
            region_len_set: false,
            region_source: None,
            remote_batch: DEFAULT_REMOTE_BATCH,
            label: None,
            queue: None,
        }
    }

    /// Page order: pages are `4096 << order` bytes (0..=10).
    pub fn order(mut self, order: u32) -> Self {
        self.order = order;
        self
    }

    /// Capacity of the shared ring (1..=16384).
    pub fn ring_size(mut self, pages: usize) -> Self {
        self.ring_size = pages;
        self
    }

    /// Capacity of the owner's local cache (1..=65536).
    pub fn cache_size(mut self, pages: usize) -> Self {
        self.cache_size = pages;
        self
    }

    /// Pages moved per refill, from the ring or from the page source
    /// (1..=cache_size).
    pub fn refill_batch(mut self, pages: usize) -> Self {
        self.refill_batch = pages;
        self
    }

    /// DMA direction of every page of the pool.
    pub fn direction(mut self, direction: DmaDirection) -> Self {
        self.direction = direction;
        self
    }

    /// Sync `min(dirty length, max_len)` bytes from `offset` for the device
    /// whenever a page is recycled (`offset + max_len` must fit the page;
    /// `max_len` > 0).
    pub fn sync_for_device(mut self, offset: usize, max_len: usize) -> Self {
        self.sync_for_device = Some(SyncForDevice { offset, max_len });
        self
    }

    /// Takes page memory from `source` instead of the global allocator.
    /// Not for region-mapped pools, which take regions from a
    /// [`RegionSource`].
    pub fn page_source(mut self, source: impl PageSource) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Maps memory a region at a time instead of page by page: each region
    /// of [`DEFAULT_REGION_SIZE`] (2 MiB) is mapped with one `DmaOps::map`
    /// and recorded once, and the pool's pages are carved from it. Region
    /// memory comes from [`SystemRegions`] (huge pages where the system has
    /// them) unless [`region_source`](Self::region_source) says otherwise.
    ///
    /// What it buys: one map, one record and one unmap per region instead
    /// of per page (the slow path and `unbind` get that much cheaper, and an
    /// IOMMU with a mapping limit holds 512 times more memory), and huge
    /// pages for the IOTLB. What it costs: a region stays mapped, and its
    /// memory pinned, until every one of its pages has left the pool for
    /// good (the pool dropped or the device unbound), so the pool never
    /// shrinks while it lives; and the device can reach every page of a
    /// mapped region, also the ones sitting free in the pool. `unbind`
    /// still unmaps every region, whatever its pages are doing, and pages
    /// held outside stay valid memory.
    pub fn regions(mut self) -> Self {
        self.region_len.get_or_insert(DEFAULT_REGION_SIZE);
        self
    }

    /// The region size of a region-mapped pool (implies
    /// [`regions`](Self::regions)): a power of two from the page length and
    /// 4 KiB up to [`MAX_REGION_SIZE`] (1 GiB), and a multiple of the
    /// device's smallest IOMMU page.
    pub fn region_size(mut self, bytes: usize) -> Self {
        self.region_len = Some(bytes);
        self.region_len_set = true;
        self
    }

    /// Takes region memory from `source` (implies
    /// [`regions`](Self::regions)): memory registered elsewhere, or a
    /// carve-out of your own.
    pub fn region_source(mut self, source: impl RegionSource) -> Self {
        self.region_source = Some(Box::new(source));
        self.regions()
    }

    /// Pages a thread that does not own the pool keeps back before giving
    /// them to the pool's ring under one lock (0..=[`MAX_REMOTE_BATCH`];
    /// default [`DEFAULT_REMOTE_BATCH`], at most the ring size). 0 or 1
    /// sends every page to the ring as it is dropped. A pool that syncs
    /// for the device on recycle does not batch (each return is a device
    /// call anyway).
    ///
    /// Batching makes a page dropped away from the owner cost a few plain
    /// stores instead of a lock; the price is that up to this many pages
    /// per thread wait before the owner can reuse them (they are handed
    /// back when the batch fills, when the thread exits, when the owner
    /// runs dry on the same thread, and on
    /// [`flush_thread_returns`](crate::flush_thread_returns)). A waiting
    /// page stays mapped and tracked: `unbind` unmaps it like any page the
    /// stack holds.
    pub fn remote_batch(mut self, pages: usize) -> Self {
        self.remote_batch = pages;
        self
    }

    /// A name for the pool in its [`PoolInfo`] and its stats (Linux names
    /// the netdev a pool serves; a driver might say `"eth0-rx"`). For
    /// introspection only.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// The queue the pool serves, shown in its [`PoolInfo`] (Linux's
    /// `queue_idx`). For introspection only.
    pub fn queue(mut self, index: u32) -> Self {
        self.queue = Some(index);
        self
    }

    fn validate(&self) -> Result<PoolConfig, ConfigError> {
        let bad = |field, value, expected| {
            Err(ConfigError::OutOfRange {
                field,
                value,
                expected,
            })
        };
        if self.order > MAX_ORDER {
            return bad("order", self.order as usize, ORDER_RANGE);
        }
        let page_len = PAGE_SIZE << self.order;
        if !(1..=MAX_RING_SIZE).contains(&self.ring_size) {
            return bad("ring_size", self.ring_size, RING_SIZE_RANGE);
        }
        if !(1..=MAX_CACHE_SIZE).contains(&self.cache_size) {
            return bad("cache_size", self.cache_size, CACHE_SIZE_RANGE);
        }
        if !(1..=self.cache_size).contains(&self.refill_batch) {
            return bad("refill_batch", self.refill_batch, "1..=cache_size");
        }
        if self.remote_batch > MAX_REMOTE_BATCH {
            return bad("remote_batch", self.remote_batch, REMOTE_BATCH_RANGE);
        }
        if let Some(sync) = self.sync_for_device {
            if sync.max_len == 0 || sync.max_len > page_len {
                return bad("sync_for_device.max_len", sync.max_len, "1..=page length");
            }
            if sync.offset > page_len - sync.max_len {
                return bad(
                    "sync_for_device.offset",
                    sync.offset,
                    "offset + max_len <= page length",
                );
            }
        }
        if let Some(region_len) = self.region_len {
            if self.source.is_some() {
                return Err(ConfigError::Conflict {
                    field: "page_source",
                    with: if self.region_source.is_some() {
                        "region_source"
                    } else if self.region_len_set {
                        "region_size"
                    } else {
                        "regions"
                    },
                    hint: "a region-mapped pool takes its memory from a region source",
                });
            }
            if region_len.is_power_of_two()
                && region_len <= MAX_REGION_SIZE
                && region_len < page_len
            {
                return Err(ConfigError::PageLargerThanRegion {
                    order: self.order,
                    page_len,
                    region_len,
                    region_len_is_default: !self.region_len_set,
                });
            }
            if !region_len.is_power_of_two()
                || region_len < page_len
                || region_len > MAX_REGION_SIZE
            {
                return bad(
                    "region_size",
                    region_len,
                    "a power of two from the page length up to MAX_REGION_SIZE",
                );
            }
            if let Some(granule) = self.device.min_page_size {
                if granule.is_power_of_two() && region_len % granule != 0 {
                    return bad(
                        "region_size",
                        region_len,
                        if self.region_len_set {
                            "a multiple of the device's smallest IOMMU page"
                        } else {
                            "a multiple of the device's smallest IOMMU page: the default region size is not, set region_size"
                        },
                    );
                }
            }
        }
        Ok(PoolConfig {
            order: self.order,
            page_len,
            direction: self.direction,
            ring_size: self.ring_size,
            cache_size: self.cache_size,
            refill_batch: self.refill_batch,
            sync_for_device: self.sync_for_device,
            remote_batch: self.remote_batch.min(self.ring_size),
            region_len: self.region_len,
        })
    }

    /// Checks the configuration and creates the pool. Maps nothing yet.
    pub fn build(self) -> Result<PagePool<M>, BuildError> {
        if let Some(min_page_size) = self.device.min_page_size {
            if !min_page_size.is_power_of_two() {
                return Err(BuildError::InvalidIommuPage { min_page_size });
            }
        }
        let config = self.validate()?;
        let device = self.device;
        if let (None, Some(iommu_page)) = (config.region_len, device.min_page_size) {
            if config.page_len < iommu_page {
                return Err(BuildError::PageBelowIommuPage {
                    page_len: config.page_len,
                    iommu_page,
                });
            }
        }
        let regions = config.region_len.map(|len| RegionPool {
            len,
            pages_per_region: len / config.page_len,
            source: self
                .region_source
                .unwrap_or_else(|| Box::new(SystemRegions::new())),
            spare: Ring::unbounded(),
            mapped: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            backing: Mutex::new(None),
        });
        let id = sync::next_pool_id();
        let shared = Arc::new(PoolShared {
            gate: CallGate::new(device.key()),
            id,
            device: Arc::clone(device),
            config,
            source: self.source.unwrap_or_else(|| Box::new(GlobalPages)),
            needs_sync: device.needs_sync,
            recycle_sync: config.sync_for_device.filter(|_| device.needs_sync),
            remote_batch: match config.sync_for_device.filter(|_| device.needs_sync) {
                Some(_) => 0,
                None if config.remote_batch > 1 => config.remote_batch,
                None => 0,
            },
            closed: AtomicBool::new(false),
            ring: Ring::with_capacity(config.ring_size),
            owner: OwnerCounters::default(),
            released_closed: AtomicU64::new(0),
            label: self.label.map(Into::into),
            queue: self.queue,
            pages_mapped: AtomicUsize::new(0),
            pages_allocated: AtomicUsize::new(0),
            tracker_shard: id as usize,
            detach_time: Mutex::new(None),
            regions,
        });
        device.register(Arc::clone(&shared))?;
        trace::event!(
            debug,
            pool = shared.id,
            label = shared.label.as_deref(),
            queue = shared.queue,
            page_len = config.page_len,
            ring_size = config.ring_size,
            cache_size = config.cache_size,
            regions = config.region_len.is_some(),
            "page pool created"
        );
        Ok(PagePool {
            shared,
            cache: Vec::with_capacity(config.cache_size),
            cache_size: config.cache_size,
            sync_on_recycle: config.sync_for_device.is_some() && device.needs_sync,
            frag: None,
        })
    }
}

/// A DMA page pool: the owner's handle.
///
/// One context owns it (for a NIC, one RX queue's poll loop) and allocates
/// and recycles through `&mut self` on the lock-free fast path. Pages it hands
/// out may be dropped on any thread. Dropping the pool releases its cached
/// pages; pages still held stay mapped until they come back or the device
/// unbinds.
///
/// ```
/// use pagepool::{Device, IdentityDma};
///
/// let device = Device::new(IdentityDma::new());
/// let mut rx = device.pool_builder().build()?;
/// // The RX loop owns the pool: allocate, post to the NIC, hand the
/// // filled page up the stack.
/// let mut stack = Vec::new();
/// for _ in 0..3 {
///     let page = rx.alloc()?;
///     stack.push(page);
/// }
/// // The stack lets go on another thread: the pages go home to `rx`.
/// std::thread::spawn(move || drop(stack)).join().unwrap();
/// pagepool::flush_thread_returns();
/// assert_eq!(rx.stats().pages_held, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PagePool<M: TrackingMode = Tracked> {
    pub(crate) shared: Arc<PoolShared<M>>,
    pub(crate) cache: Vec<NonNull<PageMeta<M>>>,
    /// `config.cache_size`, kept here so the fast path reads one cache line.
    cache_size: usize,
    /// Whether recycling syncs for the device (`shared.recycle_sync`).
    sync_on_recycle: bool,
    pub(crate) frag: Option<FragState<M>>,
}

// SAFETY: the pool owns the pages in its cache; their metadata and the
// shared state are Send + Sync. It is not Sync: `&mut self` is the fast
// path's exclusion.
unsafe impl<M: TrackingMode> Send for PagePool<M> {}

impl<M: TrackingMode> fmt::Debug for PagePool<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagePool")
            .field("id", &self.shared.id)
            .field("config", &self.shared.config)
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl<M: TrackingMode> PagePool<M> {
    /// The pool's id, unique in the process.
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// Length of each page in bytes.
    pub fn page_len(&self) -> usize {
        self.shared.config.page_len
    }

    /// The DMA direction of the pool's pages.
    pub fn direction(&self) -> DmaDirection {
        self.shared.config.direction
    }

    /// Pages waiting in the local cache.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The label given by [`PagePoolBuilder::label`], if any.
    pub fn label(&self) -> Option<&str> {
        self.shared.label.as_deref()
    }

    /// The queue index given by [`PagePoolBuilder::queue`], if any.
    pub fn queue(&self) -> Option<u32> {
        self.shared.queue
    }

    /// Whether the pool's device is still bound. Once it is not, every
    /// allocation fails with [`AllocError::Unbound`]; an RX loop whose ring
    /// is full (so it allocates nothing) can poll this to notice an unbind.
    /// One load, no device call.
    pub fn is_bound(&self) -> bool {
        !self.shared.gate.is_closed()
    }

    /// Allocates a mapped page: from the local cache (fast path), else by
    /// refilling from the shared ring, else by mapping fresh pages.
    ///
    /// # Errors
    /// [`AllocError::Unbound`] once the device is unbound;
    /// [`AllocError::Map`] if the device refused to map a fresh page;
    /// [`AllocError::OutOfMemory`] if the page source had none. Nothing is
    /// leaked in any case.
    ///
    /// ```
    /// use pagepool::{AllocError, Device, IdentityDma};
    ///
    /// let device = Device::new(IdentityDma::new());
    /// let mut pool = device.pool_builder().build()?;
    /// let page = pool.alloc()?; // the slow path maps a batch of 64
    /// assert_eq!(pool.cached(), 63);
    /// assert_eq!(page.len(), 4096);
    /// drop(page);
    /// device.unbind()?;
    /// assert_eq!(pool.alloc().unwrap_err(), AllocError::Unbound);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[inline]
    pub fn alloc(&mut self) -> Result<Page<M>, AllocError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(AllocError::Unbound);
        }
        match self.cache.pop() {
            Some(page) => {
                self.shared.owner.fast.add(1);
                Ok(Page::from_meta(page))
            }
            None => self.alloc_slow(),
        }
    }

    /// Allocates up to `count` mapped pages and appends them to `pages`:
    /// what `count` calls of [`alloc`](Self::alloc) would give, in one call
    /// (Linux's bulk allocation). Pages in the local cache are moved out as
    /// one block, so a driver refilling its RX ring pays for the pool's
    /// checks once per refill, not once per page.
    ///
    /// Returns how many pages it appended: `count`, or fewer if the pool
    /// could not make more (the page source or the device failed, or the
    /// device began to unbind) after it had appended at least one. Returns
    /// the error that stopped it if it could not append any; `Ok(0)` only
    /// for a `count` of 0.
    ///
    /// ```
    /// use pagepool::{put_bulk, Device, IdentityDma};
    ///
    /// let device = Device::new(IdentityDma::new());
    /// let mut rx = device.pool_builder().build()?;
    /// // Refill 32 RX descriptors in one call.
    /// let mut ring = Vec::new();
    /// assert_eq!(rx.alloc_bulk(&mut ring, 32)?, 32);
    /// // Completed frames go back in bulk, from any thread.
    /// put_bulk(ring.drain(..));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn alloc_bulk(
        &mut self,
        pages: &mut Vec<Page<M>>,
        count: usize,
    ) -> Result<usize, AllocError> {
        // Room for what the cache holds at most, not for `count`: a huge
        // `count` is a request for as many pages as the pool can make, not
        // a capacity overflow.
        pages.reserve(count.min(self.cache_size));
        let mut left = count;
        while left > 0 {
            if self.shared.closed.load(Ordering::Acquire) {
                return Self::bulk_result(count, left, AllocError::Unbound);
            }
            let from = self.cache.len().saturating_sub(left);
            let taken = self.cache.len() - from;
            if taken == 0 {
                match self.alloc_slow() {
                    Ok(page) => {
                        pages.push(page);
                        left -= 1;
                    }
                    Err(why) => return Self::bulk_result(count, left, why),
                }
                continue;
            }
            self.move_to_handles(from, pages);
            self.shared.owner.fast.add(taken as u64);
            left -= taken;
        }
        Ok(count)
    }

    /// Moves the cached pages `cache[from..]` out of the cache into `pages`,
    /// as handles: one copy of the block (a `Page` is its meta pointer).
    #[inline]
    fn move_to_handles(&mut self, from: usize, pages: &mut Vec<Page<M>>) {
        let taken = self.cache.len() - from;
        pages.reserve(taken);
        let start = pages.len();
        let src = self.cache[from..].as_ptr().cast::<Page<M>>();
        let dst = pages.spare_capacity_mut().as_mut_ptr().cast::<Page<M>>();
        // SAFETY: `Page<M>` is `repr(transparent)` over the cache's
        // `NonNull<PageMeta<M>>`, so `src` points to `taken` valid handles'
        // worth of owned pages; `dst` has room for `taken` (reserved above);
        // the two are different allocations.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, taken) };
        // SAFETY: the pages moved (they are now `pages[start..]`): the cache
        // gives them up before `pages` counts them, and nothing between can
        // panic, so every page has one owner throughout. `from` is at most
        // the cache's length.
        unsafe { self.cache.set_len(from) };
        // SAFETY: `pages[start..start + taken]` were initialised just above.
        unsafe { pages.set_len(start + taken) };
    }

    /// What [`alloc_bulk`](Self::alloc_bulk) returns when `why` stopped it
    /// with `left` of `count` pages still to allocate.
    #[cold]
    fn bulk_result(count: usize, left: usize, why: AllocError) -> Result<usize, AllocError> {
        if left == count {
            Err(why)
        } else {
            Ok(count - left)
        }
    }

    /// Returns a page into the local cache, from the owning context (Linux's
    /// direct recycling). If the cache is full the page goes to the ring; a
    /// page of another pool goes back to its own pool.
    ///
    /// ```
    /// use pagepool::{Device, IdentityDma};
    ///
    /// let device = Device::new(IdentityDma::new());
    /// let mut rx = device.pool_builder().build()?;
    /// let page = rx.alloc()?;
    /// let addr = page.dma_addr();
    /// // XDP_DROP: the frame is not needed; reuse the buffer at once.
    /// rx.recycle_direct(page);
    /// assert_eq!(rx.alloc()?.dma_addr(), addr, "no unmap, no map");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[inline]
    pub fn recycle_direct(&mut self, page: Page<M>) {
        let page = page.into_raw();
        // SAFETY: the page came out of an owned handle.
        let meta = unsafe { meta_ref(page) };
        if !Arc::ptr_eq(&meta.pool, &self.shared) {
            Self::recycle_foreign(page);
            return;
        }
        if self.shared.closed.load(Ordering::Acquire)
            || (self.sync_on_recycle && !self.sync_for_recycle(page))
        {
            self.recycle_unbound(page);
            return;
        }
        if self.cache.len() < self.cache_size {
            // `cache_size` is the capacity the cache was allocated with, so
            // this never reallocates (the fast path allocates nothing).
            debug_assert!(self.cache.len() < self.cache.capacity());
            self.cache.push(page);
            self.shared.owner.cached.add(1);
        } else {
            self.shared.owner.cache_full.add(1);
            self.recycle_into_ring(page);
        }
    }

    /// A page of another pool given to [`recycle_direct`](Self::recycle_direct):
    /// it goes home as if dropped (kept out of line, so the fast path stays
    /// small).
    #[cold]
    #[inline(never)]
    fn recycle_foreign(page: NonNull<PageMeta<M>>) {
        // SAFETY: owned (it came out of a `Page`); not used afterwards.
        unsafe { crate::page::recycle_remote(page) };
    }

    /// The sync on recycle of [`recycle_direct`](Self::recycle_direct);
    /// if the backend panics, the page is released, not leaked.
    fn sync_for_recycle(&self, page: NonNull<PageMeta<M>>) -> bool {
        // SAFETY: owned by the caller, who hands it to the guard until the
        // sync returned.
        let returning = unsafe { Returning::new(page) };
        // SAFETY: owned (through the guard), live.
        let meta = unsafe { meta_ref(page) };
        // SAFETY: owned by the caller (through the guard).
        let synced = unsafe { sync_on_recycle(&self.shared, meta) };
        returning.into_raw();
        synced
    }

    /// A page came back after unbind began: it is released (unmapped by
    /// unbind, freed here or by unbind).
    #[cold]
    fn recycle_unbound(&mut self, page: NonNull<PageMeta<M>>) {
        self.shared.released_closed.fetch_add(1, Ordering::Relaxed);
        // SAFETY: owned; not used afterwards.
        unsafe { release_pages(&self.shared, &[page]) };
    }

    /// Cache full: the ring takes it, or it leaves the pool.
    #[cold]
    fn recycle_into_ring(&mut self, page: NonNull<PageMeta<M>>) {
        let refused = self.shared.ring.lock().push(page);
        if let Err(why) = refused {
            if why == PushRefused::Closed {
                self.shared.released_closed.fetch_add(1, Ordering::Relaxed);
            } else {
                trace::event!(trace, pool = self.shared.id, pages = 1, "ring full");
            }
            // SAFETY: refused, so still owned.
            unsafe { release_pages(&self.shared, &[page]) };
        }
    }

    /// The slow path: refill from the ring, else map a fresh batch.
    #[cold]
    #[inline(never)]
    fn alloc_slow(&mut self) -> Result<Page<M>, AllocError> {
        let batch = self.shared.config.refill_batch;
        if self.shared.remote_batch > 1 {
            // Pages this thread dropped and kept back go to the ring first,
            // so the owner never maps fresh pages while its own wait here.
            remote::hand_back_pool(Arc::as_ptr(&self.shared).cast());
        }
        if self.shared.ring.pop_into(&mut self.cache, batch) > 0 {
            self.shared.owner.refill.add(1);
        } else if self.refill_from_spare(batch) {
            self.shared.owner.empty.add(1);
            self.shared.owner.refill.add(1);
        } else {
            self.shared.owner.empty.add(1);
            self.map_fresh_pages().inspect_err(|_error| {
                trace::event!(
                    warn,
                    pool = self.shared.id,
                    error = %_error,
                    "slow path could not make a page"
                );
            })?;
            if self.shared.config.order == 0 {
                self.shared.owner.slow.add(1);
            } else {
                self.shared.owner.slow_high_order.add(1);
            }
        }
        let page = self
            .cache
            .pop()
            .expect("the refill put at least one page in the cache");
        Ok(Page::from_meta(page))
    }

    /// Allocates and maps up to `refill_batch` order-0 pages (one page for
    /// higher orders) into the empty cache, one device call per page, so an
    /// `unbind` waits for one `map`, never for the batch. Fails if none
    /// could be made, or if the device began to unbind (the pages already
    /// mapped stay in the cache, recorded, for `unbind` to unmap); nothing
    /// is leaked either way, also if the page source or `map` panics.
    fn map_fresh_pages(&mut self) -> Result<(), AllocError> {
        let config = self.shared.config;
        if config.region_len.is_some() {
            let room = config
                .refill_batch
                .min(config.cache_size - self.cache.len());
            return map_region(&self.shared, &mut self.cache, room);
        }
        let want = if config.order == 0 {
            config.refill_batch
        } else {
            1
        };
        let want = want.min(config.cache_size - self.cache.len());
        // The batch's metas side by side; the filler gives up the slots
        // of pages not made (error, unbind, panic) when it goes.
        let mut metas = MetaFiller::new(want);
        for _ in 0..want {
            match map_page(&self.shared, &mut metas) {
                Ok(page) => self.cache.push(page),
                Err(AllocError::Unbound) => return Err(AllocError::Unbound),
                Err(e) if self.cache.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// A region-mapped pool's pages that found the ring full wait, mapped,
    /// in its spare list: the slow path takes them before mapping a region.
    fn refill_from_spare(&mut self, batch: usize) -> bool {
        match &self.shared.regions {
            Some(regions) => regions.spare.pop_into(&mut self.cache, batch) > 0,
            None => false,
        }
    }

    /// Carves a `size`-byte fragment from the current fragment page, taking
    /// a new page (fast path first) when it does not fit (Linux's
    /// `page_pool_alloc_frag`). Fragments start at multiples of
    /// [`FRAG_ALIGN`](crate::FRAG_ALIGN) bytes.
    pub fn alloc_frag(&mut self, size: usize) -> Result<Frag<M>, AllocError> {
        let page_len = self.shared.config.page_len;
        if size == 0 || size > page_len {
            return Err(AllocError::FragmentSize {
                requested: size,
                page_len,
            });
        }
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(AllocError::Unbound);
        }
        if let Some(frag) = self
            .frag
            .as_mut()
            .and_then(|state| state.carve(size, page_len))
        {
            return Ok(frag);
        }
        if let Some(state) = self.frag.take() {
            state.finish();
        }
        let page = self.alloc()?.into_raw();
        let (state, frag) = FragState::start(page, size);
        self.frag = Some(state);
        Ok(frag)
    }

    /// This pool's counters (see [`PoolStats`]).
    pub fn stats(&self) -> PoolStats {
        self.shared.stats()
    }

    /// A `page-pool-get` style snapshot.
    pub fn info(&self) -> PoolInfo {
        self.shared.info()
    }
}

impl<M: TrackingMode> Drop for PagePool<M> {
    /// Lets go of the fragment page, releases the cache and the ring, and
    /// leaves the device's list of open pools; every step runs even if a
    /// callback panics in an earlier one (the first panic is resumed at the
    /// end).
    fn drop(&mut self) {
        let mut panics = Panics::new();
        if let Some(frag) = self.frag.take() {
            panics.run(|| frag.finish());
        }
        if self.shared.remote_batch > 1 {
            // This thread's kept-back pages join the ring and leave with it.
            panics.run(|| remote::hand_back_pool(Arc::as_ptr(&self.shared).cast()));
        }
        self.shared.closed.store(true, Ordering::Release);
        let mut pages = core::mem::take(&mut self.cache);
        pages.extend(self.shared.ring.close());
        if let Some(regions) = &self.shared.regions {
            // Closed with the ring: the pages below leave for good (retired;
            // each region whose pages are all back is unmapped and freed).
            pages.extend(regions.spare.close());
        }
        // SAFETY: the cache and the (now closed) ring owned these pages.
        panics.run(|| unsafe { release_pages(&self.shared, &pages) });
        *self.shared.detach_time.lock() = Some(SystemTime::now());
        self.shared.device.unregister(&self.shared);
        let _still_out = self.shared.pages_allocated.load(Ordering::Relaxed);
        trace::event!(debug, pool = self.shared.id, "page pool destroyed");
        if _still_out > 0 && self.is_bound() {
            trace::event!(
                info,
                pool = self.shared.id,
                pages = _still_out,
                "page pool detached with pages in flight: listed until they come back or the device unbinds"
            );
        }
        panics.resume();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checking::{CheckMode, CheckingDevice};
    use crate::Device;

    fn small_pool(device: &Device) -> PagePool {
        device
            .pool_builder()
            .cache_size(4)
            .refill_batch(2)
            .ring_size(2)
            .build()
            .unwrap()
    }

    #[test]
    fn fast_path_reuses_the_mapping() {
        let checker = CheckingDevice::new(CheckMode::Panic);
        let device = Device::new(checker.clone());
        let mut pool = small_pool(&device);
        let page = pool.alloc().unwrap();
        let addr = page.dma_addr();
        pool.recycle_direct(page);
        let again = pool.alloc().unwrap();
        assert_eq!(
            again.dma_addr(),
            addr,
            "the last page recycled is the next handed out"
        );
        assert_eq!(
            checker.stats().maps,
            2,
            "one slow-path batch of refill_batch pages"
        );
        let stats = pool.stats();
        assert_eq!(
            (stats.alloc.slow, stats.alloc.fast, stats.recycle.cached),
            (1, 1, 1)
        );
        assert_eq!(stats.pages_held, 1);
        assert_eq!(stats.pages_mapped, 2);
        drop(again);
        drop(pool);
        assert_eq!(checker.live_mappings(), 0);
    }

    #[test]
    fn ring_refills_the_cache_and_overflow_leaves_the_pool() {
        let checker = CheckingDevice::new(CheckMode::Panic);
        let device = Device::new(checker.clone());
        let mut pool = small_pool(&device);
        let pages: Vec<_> = (0..4).map(|_| pool.alloc().unwrap()).collect();
        assert_eq!(checker.stats().maps, 4);
        drop(pages); // ring holds 2, the other 2 find it full
        let stats = pool.stats();
        assert_eq!((stats.recycle.ring, stats.recycle.ring_full), (2, 2));
        assert_eq!(checker.live_mappings(), 2, "ring-full pages were unmapped");
        let _a = pool.alloc().unwrap();
        assert_eq!(pool.stats().alloc.refill, 1);
        assert_eq!(
            checker.stats().maps,
            4,
            "refilled from the ring, not mapped"
        );
    }

    #[test]
    fn builder_rejects_each_bad_field_by_name() {
        let device = Device::new(CheckingDevice::new(CheckMode::Panic));
        let field = |b: PagePoolBuilder<'_>| match b.build() {
            Err(BuildError::Config(e)) => e.field(),
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(field(device.pool_builder().order(11)), "order");
        assert_eq!(field(device.pool_builder().ring_size(0)), "ring_size");
        assert_eq!(field(device.pool_builder().ring_size(16385)), "ring_size");
        assert_eq!(field(device.pool_builder().cache_size(0)), "cache_size");
        assert_eq!(
            field(device.pool_builder().cache_size(8).refill_batch(9)),
            "refill_batch"
        );
        assert_eq!(
            field(device.pool_builder().sync_for_device(0, 0)),
            "sync_for_device.max_len"
        );
        assert_eq!(
            field(device.pool_builder().sync_for_device(1, 4096)),
            "sync_for_device.offset"
        );
    }

    #[test]
    fn map_failure_is_typed_and_leaks_nothing() {
        let checker = CheckingDevice::new(CheckMode::Panic);
        let device = Device::new(checker.clone());
        let mut pool = small_pool(&device);
        checker.fail_next_maps(1);
        assert_eq!(
            pool.alloc().unwrap_err(),
            AllocError::Map(crate::DmaError::Injected)
        );
        assert_eq!(checker.live_mappings(), 0);
        assert_eq!(device.tracked_mappings(), 0);
        assert!(pool.alloc().is_ok(), "the next allocation maps normally");
    }

    #[test]
    fn higher_order_pages_come_one_at_a_time() {
        let checker = CheckingDevice::new(CheckMode::Panic);
        let device = Device::new(checker.clone());
        let mut pool = device.pool_builder().order(2).build().unwrap();
        let page = pool.alloc().unwrap();
        assert_eq!(page.len(), 16384);
        assert_eq!(checker.stats().maps, 1);
        assert_eq!(pool.stats().alloc.slow_high_order, 1);
    }

    #[test]
    fn sync_on_recycle_covers_min_of_dirty_and_max_len() {
        let checker = CheckingDevice::new(CheckMode::Panic);
        let device = Device::new(checker.clone());
        let mut pool = device
            .pool_builder()
            .cache_size(2)
            .refill_batch(1)
            .sync_for_device(64, 1024)
            .build()
            .unwrap();
        let mut page = pool.alloc().unwrap();
        page.set_dirty_len(100);
        pool.recycle_direct(page);
        let page = pool.alloc().unwrap();
        pool.recycle_direct(page); // default dirty length: max_len
        assert_eq!(checker.stats().syncs_for_device, 2);
        assert!(checker.verdict().is_clean());
    }

    #[test]
    fn direct_recycle_after_unbind_frees_the_page() {
        let checker = CheckingDevice::new(CheckMode::Panic);
        let device = Device::new(checker.clone());
        let mut pool = small_pool(&device);
        let page = pool.alloc().unwrap();
        device.unbind().unwrap();
        let calls = checker.stats();
        let cached = pool.cached();
        pool.recycle_direct(page);
        assert_eq!(pool.cached(), cached, "not put back into the cache");
        assert_eq!(pool.stats().recycle.released_closed, 1);
        assert_eq!(checker.stats(), calls, "no device call");
    }
}
