//! The state a device, its pools and their pages share: [`DeviceShared`],
//! [`PoolShared`], [`PageMeta`] and, for region-mapped pools, [`Region`].
//! The handles (`Device`, `PagePool`, `Page`, `Frag`) sit on top of it;
//! the lifecycle of a mapping (`mapping/`) and the mechanisms (`gate.rs`,
//! `held.rs`, `ring.rs`, `tracker.rs`) below it.
//!
//! # Invariants
//!
//! - A pool's shared state lives while any of its pages does: each page's
//!   metadata holds an `Arc` of it, and it holds one of its device's.
//! - A `PageMeta` is created when its page is mapped and freed, with the
//!   page memory, only after the mapping is gone (`mapping/`).
//! - All fields of a `PageMeta` but `record`, `frag_refs` and `dirty_len`
//!   are written before the meta is shared and never again (`dirty_len` is
//!   the owner's, see `page.rs`); `record` is written once,
//!   in the device call that maps the page, before any holder but the
//!   tracker (which treats it as an opaque key) can reach the meta. So any
//!   holder may read them without synchronisation.
//! - A region page's meta lives inside its [`Region`], which lives (mapped
//!   or not) until its last page has left the pool for good; its memory is
//!   freed only after its one mapping is gone.
//! - Exactly one owner per page at a time: the local cache, the ring, a
//!   `Page`, the set of fragments sharing `frag_refs`, or a running
//!   `unbind` it was handed to.
//! - The registry lists every pool that can still make a device call: the
//!   open ones and, until their last page is freed, the detached ones.

use core::marker::PhantomData;
use core::ptr::NonNull;
use std::time::SystemTime;

use crate::checking::CpuAccessCheck;
use crate::dma::{DmaAddr, DmaDirection, DmaMapping, DmaOps};
use crate::error::BuildError;
use crate::gate::{CallGate, DeviceCall, OpsCell};
use crate::mapping::KeptMappings;
use crate::memory::{PageSource, RegionBacking, RegionSource, PAGE_SIZE};
use crate::mode::TrackingMode;
use crate::ring::Ring;
use crate::stats::{AllocStats, OwnerCounters, PoolInfo, PoolStats, RecycleStats, RegionInfo};
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering, UnsafeCell};
use crate::tracker::{InFlightTracker, RecordId};

/// The pools of a device, while it is bound.
pub(crate) struct Registry<M: TrackingMode> {
    pub(crate) bound: bool,
    pub(crate) pools: Vec<Arc<PoolShared<M>>>,
    /// Pools dropped by their owner while some of their pages were still
    /// out: listed by [`Device::detached_pools`](crate::Device::detached_pools) (with their detach time)
    /// until the last page comes back, as Linux's `page-pool-get` lists
    /// them, and counted by an untracked unbind. Pruned lazily; emptied by
    /// `unbind`.
    pub(crate) detached: Vec<Arc<PoolShared<M>>>,
}

impl<M: TrackingMode> Registry<M> {
    pub(crate) fn prune_detached(&mut self) {
        self.detached
            .retain(|p| p.pages_allocated.load(Ordering::Acquire) > 0);
    }
}

/// Pages that came back while `unbind` was running, waiting for it to
/// finish its unmaps before they are freed.
struct AfterClose<M: TrackingMode> {
    /// `unbind` has unmapped everything: pages coming back are freed at once.
    unbound: bool,
    pages: Vec<NonNull<PageMeta<M>>>,
    /// Regions whose last page came back meanwhile.
    regions: Vec<NonNull<Region<M>>>,
}

// SAFETY: the pointers are owned pages handed over by their last owner;
// the metadata is Send + Sync.
unsafe impl<M: TrackingMode> Send for AfterClose<M> {}

/// What came back to a running `unbind`, for it to free once its unmaps
/// are done.
pub(crate) struct HandedOver<M: TrackingMode> {
    pub(crate) pages: Vec<NonNull<PageMeta<M>>>,
    pub(crate) regions: Vec<NonNull<Region<M>>>,
}

/// State shared by a device, its pools and their pages.
pub(crate) struct DeviceShared<M: TrackingMode> {
    pub(crate) ops: OpsCell,
    /// The backend's [`DmaOps::needs_sync`], read once at bind.
    pub(crate) needs_sync: bool,
    /// The device's CPU-access check, fixed at bind (see
    /// [`CpuAccessCheck`]); called only inside a device call's gate hold.
    pub(crate) cpu_access_check: Option<Box<dyn CpuAccessCheck>>,
    pub(crate) tracker: InFlightTracker<PageMeta<M>>,
    /// The records of region mappings (one per region, not per page).
    pub(crate) region_tracker: InFlightTracker<Region<M>>,
    /// The backend's smallest mapping granule ([`DmaOps::min_page_size`]),
    /// read once at bind.
    pub(crate) min_page_size: Option<usize>,
    /// Untracked builds: pages whose memory had to be leaked (see
    /// [`Untracked`](crate::Untracked)).
    pub(crate) leaked_pages: AtomicUsize,
    /// Mappings whose unmap failed: their memory is never freed.
    pub(crate) kept: KeptMappings,
    pub(crate) registry: Mutex<Registry<M>>,
    /// Held for the whole of `unbind`, so a second caller waits for the
    /// first to finish.
    pub(crate) unbinding: Mutex<()>,
    /// The thread running `unbind` ([`held::thread_token`]), or 0: written
    /// under `unbinding`, so a callback of that unbind can be refused
    /// instead of deadlocking on the lock.
    ///
    /// [`held::thread_token`]: crate::gate::held::thread_token
    pub(crate) unbinder: AtomicUsize,
    after_close: Mutex<AfterClose<M>>,
}

impl<M: TrackingMode> DeviceShared<M> {
    /// A bound device over `ops`, with `cpu_access_check` told of CPU
    /// accesses to its pages.
    pub(crate) fn new(
        ops: Box<dyn DmaOps>,
        cpu_access_check: Option<Box<dyn CpuAccessCheck>>,
    ) -> Self {
        let needs_sync = ops.needs_sync();
        let min_page_size = ops.min_page_size();
        Self {
            ops: OpsCell::new(ops),
            needs_sync,
            tracker: InFlightTracker::new(),
            region_tracker: InFlightTracker::new(),
            min_page_size,
            cpu_access_check,
            leaked_pages: AtomicUsize::new(0),
            kept: KeptMappings::default(),
            registry: Mutex::new(Registry {
                bound: true,
                pools: Vec::new(),
                detached: Vec::new(),
            }),
            unbinding: Mutex::new(()),
            unbinder: AtomicUsize::new(0),
            after_close: Mutex::new(AfterClose {
                unbound: false,
                pages: Vec::new(),
                regions: Vec::new(),
            }),
        }
    }

    /// How the device is named in the per-thread list of device calls.
    pub(crate) fn key(&self) -> usize {
        core::ptr::from_ref(self).addr()
    }

    pub(crate) fn register(&self, pool: Arc<PoolShared<M>>) -> Result<(), BuildError> {
        let mut registry = self.registry.lock();
        if !registry.bound {
            return Err(BuildError::Unbound);
        }
        registry.pools.push(pool);
        Ok(())
    }

    pub(crate) fn unregister(&self, pool: &Arc<PoolShared<M>>) {
        let mut registry = self.registry.lock();
        registry.pools.retain(|p| !Arc::ptr_eq(p, pool));
        registry.prune_detached();
        if registry.bound && pool.pages_allocated.load(Ordering::Acquire) > 0 {
            registry.detached.push(Arc::clone(pool));
        }
    }

    /// Hands `pages` to a running `unbind`; returns `false` (keeping
    /// nothing) if `unbind` has already finished its unmaps.
    pub(crate) fn defer_until_unbound(&self, pages: &[NonNull<PageMeta<M>>]) -> bool {
        let mut after_close = self.after_close.lock();
        if after_close.unbound {
            return false;
        }
        after_close.pages.extend_from_slice(pages);
        true
    }

    /// Hands `regions` (each with no page left) to a running `unbind`;
    /// returns `false` (keeping nothing) if `unbind` has already finished
    /// its unmaps.
    pub(crate) fn defer_regions_until_unbound(&self, regions: &[NonNull<Region<M>>]) -> bool {
        let mut after_close = self.after_close.lock();
        if after_close.unbound {
            return false;
        }
        after_close.regions.extend_from_slice(regions);
        true
    }

    /// Marks the unmaps done and takes the pages and regions handed over
    /// meanwhile.
    pub(crate) fn finish_unbind(&self) -> HandedOver<M> {
        let mut after_close = self.after_close.lock();
        after_close.unbound = true;
        HandedOver {
            pages: core::mem::take(&mut after_close.pages),
            regions: core::mem::take(&mut after_close.regions),
        }
    }
}

/// Sync-for-device on recycle (Linux's `PP_FLAG_DMA_SYNC_DEV`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncForDevice {
    /// Where in the page the device starts writing.
    pub offset: usize,
    /// The most the device writes from `offset`.
    pub max_len: usize,
}

/// The validated configuration of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PoolConfig {
    pub(crate) order: u32,
    pub(crate) page_len: usize,
    pub(crate) direction: DmaDirection,
    pub(crate) ring_size: usize,
    pub(crate) cache_size: usize,
    pub(crate) refill_batch: usize,
    pub(crate) sync_for_device: Option<SyncForDevice>,
    /// The builder's `remote_batch`, at most the ring size.
    pub(crate) remote_batch: usize,
    /// Region size in bytes for a region-mapped pool; `None` maps per page.
    pub(crate) region_len: Option<usize>,
}

/// What a pool shares with its pages and its device.
pub(crate) struct PoolShared<M: TrackingMode> {
    /// Device calls made for this pool (see `gate.rs`); on its own line.
    pub(crate) gate: CallGate,
    pub(crate) id: u32,
    pub(crate) device: Arc<DeviceShared<M>>,
    pub(crate) config: PoolConfig,
    pub(crate) source: Box<dyn PageSource>,
    /// The device's `needs_sync`: when `false`, syncs skip the device.
    pub(crate) needs_sync: bool,
    /// `config.sync_for_device` if the device needs syncs, else `None`.
    pub(crate) recycle_sync: Option<SyncForDevice>,
    /// Pages a thread keeps back before handing them to the ring (see
    /// `remote.rs`); 0 when remote returns go to the ring one by one (a
    /// pool that syncs on recycle, or one built so).
    pub(crate) remote_batch: usize,
    /// Set when the pool stops accepting pages: at its drop or at unbind.
    /// Advisory for recycling (a page may still reach the ring just after
    /// it is set; the ring's own close is what stops that), authoritative
    /// for allocation.
    pub(crate) closed: AtomicBool,
    pub(crate) ring: Ring<PageMeta<M>>,
    pub(crate) owner: OwnerCounters,
    /// Pages released because the pool was closed when they came back
    /// (`RecycleStats::released_closed`).
    pub(crate) released_closed: AtomicU64,
    /// The builder's label and queue index, for introspection only.
    pub(crate) label: Option<std::sync::Arc<str>>,
    pub(crate) queue: Option<u32>,
    pub(crate) pages_mapped: AtomicUsize,
    pub(crate) pages_allocated: AtomicUsize,
    pub(crate) tracker_shard: usize,
    pub(crate) detach_time: Mutex<Option<SystemTime>>,
    /// Region-mapped pools only.
    pub(crate) regions: Option<RegionPool<M>>,
}

/// What a region-mapped pool keeps besides what every pool keeps.
pub(crate) struct RegionPool<M: TrackingMode> {
    /// Bytes per region: a power of two, a multiple of the page length.
    pub(crate) len: usize,
    /// Pages carved from each region.
    pub(crate) pages_per_region: usize,
    pub(crate) source: Box<dyn RegionSource>,
    /// Mapped pages that found the ring full: a region's pages never leave
    /// it one by one, so they wait here for the slow path. Closed with the
    /// ring.
    pub(crate) spare: Ring<PageMeta<M>>,
    /// Regions mapped now.
    pub(crate) mapped: AtomicUsize,
    /// Regions allocated and not yet freed (mapped, or unmapped by `unbind`
    /// while some of their pages are still held).
    pub(crate) live: AtomicUsize,
    /// Regions ever mapped.
    pub(crate) total: AtomicU64,
    /// What the last region allocated got.
    pub(crate) backing: Mutex<Option<RegionBacking>>,
}

impl<M: TrackingMode> PoolShared<M> {
    /// Starts one device call for this pool, or `None` once its device has
    /// begun to unbind.
    #[inline]
    pub(crate) fn device_call(&self) -> Option<DeviceCall<'_>> {
        // SAFETY: the gate belongs to this pool's device, whose ops these are.
        unsafe { DeviceCall::enter(&self.gate, &self.device.ops) }
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let o = &self.owner;
        let ring = self.ring.counters();
        let recycle = RecycleStats {
            cached: o.cached.get(),
            cache_full: o.cache_full.get(),
            ring: ring.ring,
            ring_full: ring.ring_full,
            released_refcnt: 0,
            released_closed: self.released_closed.load(Ordering::Relaxed),
        };
        let returned = recycle.cached + recycle.ring + recycle.ring_full + recycle.released_closed;
        // Every page handed out is counted once: by `fast`, or by the one
        // slow-path event (refill, slow, slow_high_order) that produced it.
        let handed_out = o.fast.get() + o.refill.get() + o.slow.get() + o.slow_high_order.get();
        let held = handed_out.saturating_sub(returned);
        let mapped = self.pages_mapped.load(Ordering::Relaxed) as u64;
        let page_len = self.config.page_len as u64;
        let kept = self.device.kept.pool(self.id);
        PoolStats {
            alloc: AllocStats {
                fast: o.fast.get(),
                slow: o.slow.get(),
                slow_high_order: o.slow_high_order.get(),
                empty: o.empty.get(),
                refill: o.refill.get(),
                waive: 0,
            },
            recycle,
            pages_held: held,
            bytes_held: held * page_len,
            pages_mapped: mapped,
            bytes_mapped: mapped * page_len,
            unmap_failures: kept.mappings,
            bytes_kept: kept.bytes,
        }
    }

    pub(crate) fn info(&self) -> PoolInfo {
        let stats = self.stats();
        let inflight = self.pages_allocated.load(Ordering::Relaxed) as u64;
        PoolInfo {
            id: self.id,
            label: self.label.clone(),
            queue: self.queue,
            inflight,
            inflight_mem: inflight * self.config.page_len as u64,
            stats,
            detach_time: *self.detach_time.lock(),
            regions: self.regions.as_ref().map(|r| {
                let live = r.live.load(Ordering::Relaxed) as u64;
                let mapped = r.mapped.load(Ordering::Relaxed) as u64;
                RegionInfo {
                    region_len: r.len,
                    regions_mapped: mapped,
                    regions_live: live,
                    regions_total: r.total.load(Ordering::Relaxed),
                    pages_carved: live * r.pages_per_region as u64,
                    bytes_pinned: mapped * r.len as u64,
                    backing: *r.backing.lock(),
                }
            }),
        }
    }
}

/// Metadata of one pool page: seven words (56 bytes, the size class the
/// allocator serves a meta boxed on its own from; one more word measured
/// 20–25% slower on that slow path).
///
/// A page handle points here, and everything a page's CPU views and its
/// return read is in the first three words (`repr(C)`): the address, the
/// pool, and the [`PageView`] copied from the pool and device when the meta
/// is made. So `Page::as_slice` reaches the frame one load after the
/// handle (not through the pool's configuration and the device), and a
/// drop reads no line but this one and the pool's. All of it is written
/// once, before the meta is shared; the one field a holder writes,
/// `dirty_len`, is written only in pools that sync on recycle, which read
/// it back: in every other pool the meta stays a read-only copy in each
/// core's cache, and handing a page to another core moves its frame and
/// nothing of its metadata.
#[repr(C)]
pub(crate) struct PageMeta<M: TrackingMode> {
    /// The page memory, from the pool's page source.
    pub(crate) cpu: NonNull<u8>,
    /// The pool the page belongs to; kept alive by every page.
    pub(crate) pool: Arc<PoolShared<M>>,
    /// What the page's CPU views and syncs need besides `cpu` and `dma`
    /// (see [`PageView`]).
    pub(crate) view: PageView,
    /// How many bytes from the pool's sync offset the device may have
    /// written (`Page::set_dirty_len`, clamped to `u32::MAX`); `u32::MAX`
    /// (all of `max_len`, which is at most a page) unless the page's owner
    /// said less. Written and read only in pools that sync on recycle (see
    /// [`take_dirty_len`](Self::take_dirty_len)).
    pub(crate) dirty_len: UnsafeCell<u32>,
    /// Where the device sees it.
    pub(crate) dma: DmaAddr,
    /// The page's record in the device's in-flight tracker: written once,
    /// after the tracker took the page and before the page reaches another
    /// thread (see [`record`](Self::record)).
    pub(crate) record: UnsafeCell<RecordId>,
    /// Fragment references (see `frag.rs`); unused for whole pages.
    pub(crate) frag_refs: AtomicUsize,
    /// Where the meta lives: in a region (the page was carved from it, in
    /// a region-mapped pool, and is part of the region's mapping, not a
    /// mapping of its own), in a block of metas (see
    /// `mapping/meta_block.rs`), or boxed on its own.
    pub(crate) home: MetaHome<M>,
}

/// What a page's CPU views and syncs need besides its addresses, copied
/// from its pool and device when its meta is made (see
/// [`PageMeta::view`]): three bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageView {
    /// The page order: the page is `PAGE_SIZE << order` bytes.
    order: u8,
    /// [`Self::CHECKED`], [`Self::NEEDS_SYNC`], [`Self::RECYCLE_SYNC`].
    flags: u8,
    /// The pool's DMA direction.
    pub(crate) direction: DmaDirection,
}

impl PageView {
    /// The device has a [`CpuAccessCheck`], to tell of every CPU view.
    const CHECKED: u8 = 1;
    /// The device's `needs_sync`: when clear, syncs skip the device.
    const NEEDS_SYNC: u8 = 2;
    /// The pool syncs on recycle (`PoolShared::recycle_sync`), so it reads
    /// the page's dirty length.
    const RECYCLE_SYNC: u8 = 4;

    /// The view of every page of `pool`.
    pub(crate) fn of<M: TrackingMode>(pool: &PoolShared<M>) -> Self {
        let flag = |set: bool, flag: u8| if set { flag } else { 0 };
        Self {
            order: u8::try_from(pool.config.order).expect("orders are at most MAX_ORDER"),
            flags: flag(pool.device.cpu_access_check.is_some(), Self::CHECKED)
                | flag(pool.needs_sync, Self::NEEDS_SYNC)
                | flag(pool.recycle_sync.is_some(), Self::RECYCLE_SYNC),
            direction: pool.config.direction,
        }
    }

    /// The page length in bytes.
    #[inline]
    pub(crate) fn len(self) -> usize {
        PAGE_SIZE << self.order
    }

    /// The device checks CPU accesses.
    #[inline]
    pub(crate) fn checked(self) -> bool {
        self.flags & Self::CHECKED != 0
    }

    /// The device's syncs do something.
    #[inline]
    pub(crate) fn needs_sync(self) -> bool {
        self.flags & Self::NEEDS_SYNC != 0
    }

    /// The pool syncs on recycle and reads the dirty length.
    #[inline]
    pub(crate) fn recycle_sync(self) -> bool {
        self.flags & Self::RECYCLE_SYNC != 0
    }
}

/// The header of one block of metas (see `mapping/meta_block.rs`, which
/// owns its life). A block is one allocation of `capacity + 1` meta-sized
/// cells: the header in the first, the metas in the others.
pub(crate) struct MetaBlock<M: TrackingMode> {
    /// The slots in use or still to be filled (the module invariants of
    /// `mapping/meta_block.rs`).
    pub(crate) live: AtomicUsize,
    pub(crate) capacity: usize,
    pub(crate) _metas: PhantomData<PageMeta<M>>,
}

/// Where a [`PageMeta`] lives, in one word (a meta stays one cache line):
/// null for a meta
/// boxed on its own, else a pointer to its block, or to its region with the
/// low bit set (both are at least 8-aligned).
pub(crate) struct MetaHome<M: TrackingMode> {
    tagged: *mut u8,
    _home: PhantomData<HomeTypes<M>>,
}

/// What a [`MetaHome`] may point to.
type HomeTypes<M> = (NonNull<MetaBlock<M>>, NonNull<Region<M>>);

impl<M: TrackingMode> Clone for MetaHome<M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M: TrackingMode> Copy for MetaHome<M> {}

impl<M: TrackingMode> MetaHome<M> {
    /// The low bit that marks a region.
    const REGION: usize = 1;

    /// A meta boxed on its own.
    pub(crate) fn boxed() -> Self {
        Self {
            tagged: core::ptr::null_mut(),
            _home: PhantomData,
        }
    }

    /// A meta in `block`.
    pub(crate) fn block(block: NonNull<MetaBlock<M>>) -> Self {
        Self {
            tagged: block.as_ptr().cast(),
            _home: PhantomData,
        }
    }

    /// A meta in `region`.
    pub(crate) fn region(region: NonNull<Region<M>>) -> Self {
        const { assert!(core::mem::align_of::<Region<M>>() > Self::REGION) };
        Self {
            tagged: region.as_ptr().cast::<u8>().map_addr(|a| a | Self::REGION),
            _home: PhantomData,
        }
    }

    /// The region, for a meta in one.
    #[inline]
    pub(crate) fn as_region(self) -> Option<NonNull<Region<M>>> {
        if self.tagged.addr() & Self::REGION == 0 {
            return None;
        }
        NonNull::new(self.tagged.map_addr(|a| a & !Self::REGION).cast())
    }

    /// The block, for a meta in one.
    #[inline]
    pub(crate) fn as_block(self) -> Option<NonNull<MetaBlock<M>>> {
        if self.tagged.addr() & Self::REGION != 0 {
            return None;
        }
        NonNull::new(self.tagged.cast())
    }
}

// SAFETY: all fields but `frag_refs` (atomic) and `dirty_len` are written
// before the meta is shared and never again (module invariant); `dirty_len`
// and the memory behind `cpu` follow the one-owner-at-a-time rule (only the
// page's owner touches them, through `unsafe` accessors that say so). Without these,
// the tracker and the rings (hence `Device`, which the driver's remove path
// must reach from any thread) would be neither `Send` nor `Sync`.
unsafe impl<M: TrackingMode> Send for PageMeta<M> {}
// SAFETY: as above: `&PageMeta` reads immutable fields and atomics only;
// the owner-only fields are reached through `unsafe` accessors.
unsafe impl<M: TrackingMode> Sync for PageMeta<M> {}

impl<M: TrackingMode> PageMeta<M> {
    /// The page's tracker record.
    ///
    /// The one field written after the meta was published (to the tracker,
    /// inside the slow path's device call): through a `sync::UnsafeCell`,
    /// so loom checks that the write happens-before every read on another
    /// thread (a release, `unbind`'s walk of the rings).
    #[inline]
    pub(crate) fn record(&self) -> RecordId {
        // SAFETY: the only write is `set_record`'s, whose caller guarantees
        // that no thread reads the record until the page is handed out
        // (which orders the write before every later read).
        self.record.with(|record| unsafe { *record })
    }

    /// Sets the dirty length of the page.
    ///
    /// # Safety
    /// The caller owns the page (exactly one owner at a time: a `Page`, the
    /// cache, the ring, a thread's batch, or a run of `put_bulk`), so no
    /// other thread reads or writes the field meanwhile; the hand-off of
    /// the page to its next owner orders this write before that owner's
    /// read.
    #[inline]
    pub(crate) unsafe fn set_dirty_len(&self, len: usize) {
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        // SAFETY: forwarded caller contract: no concurrent access.
        self.dirty_len.with_mut(|dirty| unsafe { *dirty = len });
    }

    /// The dirty length, reset to the whole `max_len` (`u32::MAX`) for
    /// the page's next owner.
    ///
    /// # Safety
    /// As for [`set_dirty_len`](Self::set_dirty_len).
    #[inline]
    pub(crate) unsafe fn take_dirty_len(&self) -> usize {
        // SAFETY: forwarded caller contract: no concurrent access.
        self.dirty_len
            .with_mut(|dirty| unsafe { core::mem::replace(&mut *dirty, u32::MAX) }) as usize
    }

    /// Sets the tracker record of a page just mapped.
    ///
    /// # Safety
    /// The page has not been handed out yet: no other thread reads its
    /// record (`unbind` reads records only of pages it takes from a ring, or
    /// through its tracker walk, which never reads the meta's field).
    pub(crate) unsafe fn set_record(&self, id: RecordId) {
        // SAFETY: forwarded caller contract: no concurrent access.
        self.record.with_mut(|record| unsafe { *record = id });
    }

    /// The region the page was carved from, in a region-mapped pool.
    #[inline]
    pub(crate) fn region(&self) -> Option<NonNull<Region<M>>> {
        self.home.as_region()
    }

    /// The page's own mapping. Only for pages mapped one by one.
    #[inline]
    pub(crate) fn mapping(&self) -> DmaMapping {
        debug_assert!(self.region().is_none());
        DmaMapping {
            addr: self.dma,
            len: self.view.len(),
            direction: self.view.direction,
        }
    }

    /// The mapping the page lies in and the page's offset inside it: its
    /// own mapping at 0, or its region's mapping at its place in the region.
    /// Syncs of a region page are sub-range syncs of its region's mapping.
    #[inline]
    pub(crate) fn device_range(&self) -> (DmaMapping, usize) {
        match self.region() {
            None => (self.mapping(), 0),
            Some(region) => {
                // SAFETY: a region outlives each of its pages' metas (they
                // live inside it), and its fields are immutable once shared.
                let region = unsafe { region.as_ref() };
                let offset = self.cpu.as_ptr().addr() - region.cpu.as_ptr().addr();
                (region.mapping(), offset)
            }
        }
    }
}

/// One region of a region-mapped pool: a block of contiguous memory mapped
/// with one `DmaOps::map` and carved into the pool's pages.
///
/// Lives until its last page has left the pool for good (pool dropped or
/// device unbound): whoever retires the last page owns the region and
/// releases it (`mapping::region`). All fields but `live_pages` are written
/// before the region is shared and never again; `record` is written in the
/// device call that mapped it, before anyone but the tracker can reach it.
pub(crate) struct Region<M: TrackingMode> {
    /// The region's memory, from the pool's region source.
    pub(crate) cpu: NonNull<u8>,
    pub(crate) backing: RegionBacking,
    /// Where the device sees the region.
    pub(crate) dma: DmaAddr,
    /// The region's record in the device's region tracker: written once, as
    /// a page's (see [`PageMeta::record`]).
    pub(crate) record: UnsafeCell<RecordId>,
    /// The pool the region belongs to; kept alive by the region.
    pub(crate) pool: Arc<PoolShared<M>>,
    /// Pages of the region that have not yet left the pool for good.
    pub(crate) live_pages: AtomicUsize,
    /// The metas of the region's pages, in address order: a leaked
    /// `Box<[PageMeta]>`, reclaimed when the region is freed (page handles
    /// point into it).
    pub(crate) pages: NonNull<[PageMeta<M>]>,
}

// SAFETY: as for `PageMeta`: immutable after publication but for the atomic
// `live_pages`; the memory behind `cpu` is reached through page handles,
// under the one-owner rule.
unsafe impl<M: TrackingMode> Send for Region<M> {}
// SAFETY: as above.
unsafe impl<M: TrackingMode> Sync for Region<M> {}

impl<M: TrackingMode> Region<M> {
    /// The region's tracker record (see [`PageMeta::record`]).
    #[inline]
    pub(crate) fn record(&self) -> RecordId {
        // SAFETY: as for `PageMeta::record`.
        self.record.with(|record| unsafe { *record })
    }

    /// Sets the tracker record of a region just mapped.
    ///
    /// # Safety
    /// As for [`PageMeta::set_record`]: none of the region's pages has been
    /// handed out yet.
    pub(crate) unsafe fn set_record(&self, id: RecordId) {
        // SAFETY: forwarded caller contract: no concurrent access.
        self.record.with_mut(|record| unsafe { *record = id });
    }

    /// The region's one mapping.
    pub(crate) fn mapping(&self) -> DmaMapping {
        DmaMapping {
            addr: self.dma,
            len: self.pages.len() * self.pool.config.page_len,
            direction: self.pool.config.direction,
        }
    }
}

/// Reads the meta behind a pointer held by its current owner.
///
/// # Safety
/// `meta` points to a live `PageMeta` (one not yet passed to `free_page`).
pub(crate) unsafe fn meta_ref<'a, M: TrackingMode>(meta: NonNull<PageMeta<M>>) -> &'a PageMeta<M> {
    // SAFETY: forwarded caller contract; the fields read through the
    // reference are immutable after publication (module invariant).
    unsafe { meta.as_ref() }
}
