//! The owned [`Page`] handle and the return path of pages to their pool.
//!
//! A `Page` is the owned handle to one page handed out by a pool: `Send`,
//! one pointer to the page's [`PageMeta`] (so a burst of handles is a burst
//! of pointers), and it gives the page back when dropped. What a meta holds
//! and its invariants are written once, in `shared.rs`; where metas live,
//! in `mapping/meta_block.rs`.
//!
//! # Invariants
//!
//! - `dirty_len` belongs to the page's one owner: in a pool that syncs on
//!   recycle the `Page` writes it and the recycle reads and resets it; in
//!   any other pool nobody writes it.
//! - The CPU views (`as_slice`, `as_mut_slice`) and the syncs read the
//!   page's address, length and flags from its meta (`PageView`), never
//!   the pool's configuration or the device: a consumer on another core
//!   reaches the frame one load after the handle, and the meta is a line
//!   no one writes per packet, so handing a page over moves its frame, not
//!   its metadata.
//! - Exactly one owner at a time: the local cache, the ring, a `Page`, or
//!   the set of fragments sharing `frag_refs`.

use core::fmt;
use core::mem::{ManuallyDrop, MaybeUninit};
use core::ops::Range;
use core::ptr::NonNull;

use crate::access_site;
use crate::checking::CpuAccess;
use crate::dma::{DmaAddr, DmaDirection};
use crate::error::SyncError;
use crate::mapping::release_pages;
use crate::memory::PAGE_SIZE;
use crate::mode::{Tracked, TrackingMode};
use crate::remote;
use crate::ring::PushRefused;
use crate::shared::{meta_ref, PageMeta, PoolShared};
use crate::sync::{Arc, Ordering};
use crate::trace;

/// An owned page on its way back to its pool. If it is dropped before
/// [`into_raw`](Self::into_raw) (a sync on recycle panicked), the page is
/// released: unmapped and freed, so a panicking callback leaks nothing.
pub(crate) struct Returning<M: TrackingMode>(NonNull<PageMeta<M>>);

impl<M: TrackingMode> Returning<M> {
    /// # Safety
    /// The caller owns `page` and gives it to the guard.
    pub(crate) unsafe fn new(page: NonNull<PageMeta<M>>) -> Self {
        Self(page)
    }

    pub(crate) fn into_raw(self) -> NonNull<PageMeta<M>> {
        ManuallyDrop::new(self).0
    }
}

impl<M: TrackingMode> Drop for Returning<M> {
    #[cold]
    fn drop(&mut self) {
        // Counted as released instead of recycled (`released_closed`), so
        // the pool's in-flight count stays exact.
        recycle_refused(self.0, PushRefused::Closed);
    }
}

/// Gives a page back from any thread. Fast path: the pool batches remote
/// returns and is open, so the page waits in this thread's batch
/// (`remote.rs`). Otherwise [`recycle_remote_slow`].
///
/// # Safety
/// The caller owns `page` and does not use it afterwards.
#[inline]
pub(crate) unsafe fn recycle_remote<M: TrackingMode>(page: NonNull<PageMeta<M>>) {
    // SAFETY: owned by the caller, live.
    let meta = unsafe { meta_ref(page) };
    let pool: &PoolShared<M> = &meta.pool;
    if pool.remote_batch > 1
        && !pool.closed.load(Ordering::Acquire)
        // SAFETY: owned by the caller and given up; it belongs to `pool`,
        // whose pages `hand_back_batch::<M>` takes (a pool with a remote
        // batch has no sync on recycle).
        && unsafe {
            remote::stash(
                Arc::as_ptr(&meta.pool).cast(),
                pool.remote_batch,
                page.cast(),
                hand_back_batch::<M>,
            )
        }
    {
        return;
    }
    // SAFETY: forwarded caller contract (not stashed: still ours).
    unsafe { recycle_remote_slow(page) }
}

/// The slow path of [`recycle_remote`]: syncs the page for the device if
/// the pool asks for that, then pushes it into the shared ring; releases it
/// if the ring is full or the pool is closing.
///
/// # Safety
/// As for [`recycle_remote`].
#[inline(never)]
unsafe fn recycle_remote_slow<M: TrackingMode>(page: NonNull<PageMeta<M>>) {
    // SAFETY: owned by the caller, live.
    let meta = unsafe { meta_ref(page) };
    let pool: &PoolShared<M> = &meta.pool;
    let refused = if pool.closed.load(Ordering::Acquire) {
        PushRefused::Closed
    } else {
        // SAFETY: owned by the caller; the guard releases it on unwind.
        let returning = unsafe { Returning::new(page) };
        // SAFETY: owned by the caller (through the guard).
        let synced = unsafe { sync_on_recycle(pool, meta) };
        let page = returning.into_raw();
        if !synced {
            PushRefused::Closed
        } else {
            // Once the ring lock is released with the page inside, the owner
            // may take the page and the pool may go away: neither `meta` nor
            // `pool` is touched after this statement unless the push was
            // refused.
            match pool.ring.lock().push(page) {
                Ok(()) => return,
                Err(why) => why,
            }
        }
    };
    recycle_refused(page, refused);
}

/// Gives a thread's batch of remote returns back to its pool: the
/// [`remote::HandBack`] of pools of tracking mode `M`.
///
/// # Safety
/// As [`remote::HandBack`]: owned pages of one pool of mode `M`, not empty.
unsafe fn hand_back_batch<M: TrackingMode>(pages: &[NonNull<()>]) {
    // SAFETY: `NonNull<()>` and `NonNull<PageMeta<M>>` have one layout, and
    // these pointers were `NonNull<PageMeta<M>>` before `stash` erased them.
    let pages: &[NonNull<PageMeta<M>>] =
        unsafe { core::slice::from_raw_parts(pages.as_ptr().cast(), pages.len()) };
    // SAFETY: forwarded caller contract.
    unsafe { push_run(pages) }
}

/// Pushes pages of one pool into its ring under one lock; releases the
/// pages the ring refuses (full, or closed: counted in `released_closed`).
///
/// # Safety
/// The caller owns every page in `pages` (not empty), all belong to one
/// pool, and none is used afterwards.
pub(crate) unsafe fn push_run<M: TrackingMode>(pages: &[NonNull<PageMeta<M>>]) {
    // SAFETY: owned, live.
    let first = unsafe { meta_ref(pages[0]) };
    // Once the ring lock is released with pages inside, the owner may take
    // them and the pool may go away: neither `first` nor its pool is
    // touched after this statement; the refused pages (still ours) are.
    let (taken, refused) = first.pool.ring.lock().push_many(pages);
    if let Some(why) = refused {
        let rest = &pages[taken..];
        // SAFETY: refused, so still owned.
        let meta = unsafe { meta_ref(rest[0]) };
        // A strong reference of our own: releasing the pages frees their
        // metadata, which may hold the pool's last one.
        let pool = Arc::clone(&meta.pool);
        if why == PushRefused::Closed {
            pool.released_closed
                .fetch_add(rest.len() as u64, Ordering::Relaxed);
        } else {
            trace::event!(trace, pool = pool.id, pages = rest.len(), "ring full");
        }
        // SAFETY: owned, all of `pool`, not used afterwards.
        unsafe { release_pages(&pool, rest) };
    }
}

/// The release path of [`recycle_remote`]: the page is still ours.
#[cold]
#[inline(never)]
fn recycle_refused<M: TrackingMode>(page: NonNull<PageMeta<M>>, why: PushRefused) {
    // SAFETY: refused pages stay owned by the caller of `recycle_remote`.
    let meta = unsafe { meta_ref(page) };
    // A strong reference of our own: releasing the page frees `meta`, which
    // may hold the pool's (and through it the device's) last one.
    let pool = Arc::clone(&meta.pool);
    if why == PushRefused::Closed {
        pool.released_closed.fetch_add(1, Ordering::Relaxed);
    } else {
        trace::event!(trace, pool = pool.id, pages = 1, "ring full");
    }
    // SAFETY: owned, not used afterwards.
    unsafe { release_pages(&pool, &[page]) };
}

/// Syncs a recycled page for the device when the pool is configured to:
/// `min(dirty length, max_len)` bytes from `offset`, and resets the page's
/// dirty length to the whole `max_len` for its next owner. Returns `false` when the
/// page must be released instead of recycled: the device is unbinding (no
/// sync may reach it), or the thread is unwinding from a panic (a page
/// whose sync cannot be trusted leaves the pool, and a second panic from
/// the backend here would abort the process).
///
/// # Safety
/// The caller owns the page of `meta` (the one owner its dirty length
/// belongs to).
pub(crate) unsafe fn sync_on_recycle<M: TrackingMode>(
    pool: &PoolShared<M>,
    meta: &PageMeta<M>,
) -> bool {
    let Some(sync) = pool.recycle_sync else {
        return true;
    };
    // SAFETY: the caller owns the page.
    let dirty_len = unsafe { meta.take_dirty_len() };
    if std::thread::panicking() {
        return false;
    }
    let Some(call) = pool.device_call() else {
        return false;
    };
    let len = dirty_len.min(sync.max_len);
    if len > 0 {
        let (mapping, page_offset) = meta.device_range();
        // SAFETY: the page is live and mapped (the gate is open and the page
        // has not left the pool), the range lies inside it (checked by the
        // builder), and its owner is recycling it, so no CPU reference
        // exists.
        unsafe { call.sync_for_device(mapping, page_offset + sync.offset, len) };
    }
    true
}

/// An owned page from a [`PagePool`](crate::PagePool): DMA-mapped for the
/// pool's device, returned to its pool when dropped (from any thread).
///
/// The CPU views ([`as_slice`](Self::as_slice),
/// [`as_mut_slice`](Self::as_mut_slice)) are for when the CPU owns the
/// buffer: after the device is done with it and
/// [`sync_for_cpu`](Self::sync_for_cpu) handed it back, or before the driver
/// gives it to the device with [`sync_for_device`](Self::sync_for_device).
/// A page stays valid memory after its device unbinds (it is just no longer
/// mapped); dropping it then frees it without any device call.
#[repr(transparent)]
pub struct Page<M: TrackingMode = Tracked> {
    meta: NonNull<PageMeta<M>>,
}

// SAFETY: a Page owns its page exclusively; the metadata it points to is
// immutable apart from atomics, and the pool it names is Send + Sync.
unsafe impl<M: TrackingMode> Send for Page<M> {}
// SAFETY: `&Page` only reads the page (as `&[u8]`) and immutable metadata
// (the dirty length, the one field a `Page` writes, takes `&mut Page`).
unsafe impl<M: TrackingMode> Sync for Page<M> {}

impl<M: TrackingMode> Page<M> {
    /// Wraps a page its caller owns.
    pub(crate) fn from_meta(meta: NonNull<PageMeta<M>>) -> Self {
        Self { meta }
    }

    /// Gives up the handle without returning the page; the caller owns it.
    pub(crate) fn into_raw(self) -> NonNull<PageMeta<M>> {
        ManuallyDrop::new(self).meta
    }

    fn meta(&self) -> &PageMeta<M> {
        // SAFETY: a Page owns a live meta until it is dropped.
        unsafe { meta_ref(self.meta) }
    }

    /// Length of the page in bytes (`4096 << order`).
    #[inline]
    pub fn len(&self) -> usize {
        self.meta().view.len()
    }

    /// Always `false`: a page is never empty. Here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The page's device address, to put in a descriptor. After the device
    /// is unbound this address is stale and must not be given to hardware.
    pub fn dma_addr(&self) -> DmaAddr {
        self.meta().dma
    }

    /// The direction the page is mapped for.
    pub fn direction(&self) -> DmaDirection {
        self.meta().view.direction
    }

    /// The id of the pool the page belongs to.
    pub fn pool_id(&self) -> u32 {
        self.meta().pool.id
    }

    /// The page as bytes, for the CPU.
    ///
    /// Reads the page's metadata line and nothing else of the pool's (the
    /// address and length are there): a consumer on another core reaches
    /// the frame after one load of a line nobody writes.
    #[inline]
    #[track_caller]
    pub fn as_slice(&self) -> &[u8] {
        let meta = self.meta();
        let len = meta.view.len();
        cpu_access_hook(meta, 0, len, CpuAccess::Read);
        // SAFETY: the page memory is valid for page_len bytes while the meta
        // lives; this handle owns the page, and `&self` rules out a
        // concurrent `&mut` view from it.
        unsafe { core::slice::from_raw_parts(meta.cpu.as_ptr(), len) }
    }

    /// The page as mutable bytes, for the CPU. Writes nothing but the page
    /// (no metadata: see [`as_slice`](Self::as_slice)).
    #[inline]
    #[track_caller]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let meta = self.meta();
        let len = meta.view.len();
        cpu_access_hook(meta, 0, len, CpuAccess::Write);
        let cpu = meta.cpu;
        // SAFETY: as in `as_slice`; `&mut self` makes the view exclusive.
        unsafe { core::slice::from_raw_parts_mut(cpu.as_ptr(), len) }
    }

    /// Hands `range` of the page back to the CPU after the device wrote it.
    ///
    /// # Errors
    /// [`SyncError::OutOfRange`] for a range outside the page;
    /// [`SyncError::Unbound`] once the device is unbound (nothing is mapped
    /// any more: the CPU owns the memory for good).
    ///
    /// ```
    /// use pagepool::checking::{CheckMode, CheckingDevice};
    /// use pagepool::{Device, SyncError};
    ///
    /// let nic = CheckingDevice::new(CheckMode::Panic);
    /// let device = Device::new(nic.clone());
    /// let mut rx = device.pool_builder().build()?;
    /// let mut page = rx.alloc()?;
    /// nic.device_write(page.dma_addr(), b"frame")?; // the NIC's DMA
    /// page.sync_for_cpu(0..5)?; // then the CPU may read it
    /// assert_eq!(&page.as_slice()[..5], b"frame");
    /// assert!(matches!(page.sync_for_cpu(0..5000), Err(SyncError::OutOfRange { .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[inline]
    #[track_caller]
    pub fn sync_for_cpu(&mut self, range: Range<usize>) -> Result<(), SyncError> {
        // SAFETY: `&mut self`: no CPU view of this page exists.
        unsafe { sync_range(self.meta(), 0, PageLen(self), range, SyncTo::Cpu) }
    }

    /// Hands `range` of the page to the device after the CPU wrote it
    /// (transmit buffers).
    ///
    /// # Errors
    /// As for [`sync_for_cpu`](Self::sync_for_cpu).
    ///
    /// ```
    /// use pagepool::checking::{CheckMode, CheckingDevice};
    /// use pagepool::{Device, DmaDirection};
    ///
    /// let nic = CheckingDevice::new(CheckMode::Panic);
    /// let device = Device::new(nic.clone());
    /// let mut tx = device.pool_builder().direction(DmaDirection::ToDevice).build()?;
    /// let mut page = tx.alloc()?;
    /// page.as_mut_slice()[..4].copy_from_slice(b"ping");
    /// page.sync_for_device(0..4)?; // then the NIC may read it
    /// assert_eq!(nic.device_read(page.dma_addr(), 4)?, b"ping");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[inline]
    #[track_caller]
    pub fn sync_for_device(&mut self, range: Range<usize>) -> Result<(), SyncError> {
        // SAFETY: `&mut self`: no CPU view of this page exists.
        unsafe { sync_range(self.meta(), 0, PageLen(self), range, SyncTo::Device) }
    }

    /// Tells the pool how many bytes from the sync offset the device may
    /// have written, so recycling syncs only those (Linux's
    /// `dma_sync_size`). The default is the whole `max_len`; each recycle
    /// sets it back to that for the page's next owner. Pools that do not
    /// sync on recycle ignore it.
    ///
    /// In a pool that does not sync on recycle this writes nothing: the
    /// page's metadata stays untouched by its holders.
    #[inline]
    pub fn set_dirty_len(&mut self, len: usize) {
        let meta = self.meta();
        if meta.view.recycle_sync() {
            // SAFETY: this handle owns the page, and `&mut self` rules out
            // any other access through it.
            unsafe { meta.set_dirty_len(len) }
        }
    }
}

impl<M: TrackingMode> Drop for Page<M> {
    fn drop(&mut self) {
        // SAFETY: the handle owns the page and is going away.
        unsafe { recycle_remote(self.meta) }
    }
}

impl<M: TrackingMode> fmt::Debug for Page<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Page")
            .field("pool", &self.pool_id())
            .field("dma_addr", &self.dma_addr())
            .field("len", &self.len())
            .finish()
    }
}

/// The length of the buffer a sync covers, as [`sync_range`] checks it:
/// `at_least` is known without a load, `len` reads it.
pub(crate) trait BufferLen {
    /// A length the buffer has at least.
    fn at_least(&self) -> usize;
    /// The buffer's length.
    fn len(&self) -> usize;
}

/// A fragment's length, in the fragment.
impl BufferLen for usize {
    #[inline(always)]
    fn at_least(&self) -> usize {
        *self
    }
    #[inline(always)]
    fn len(&self) -> usize {
        *self
    }
}

/// A whole page's length: at least `PAGE_SIZE`, so a range inside the
/// first `PAGE_SIZE` bytes (a frame's headers: a constant range) is checked
/// without reading the page's order.
struct PageLen<'a, M: TrackingMode>(&'a Page<M>);

impl<M: TrackingMode> BufferLen for PageLen<'_, M> {
    #[inline(always)]
    fn at_least(&self) -> usize {
        PAGE_SIZE
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Which way a sync hands the buffer.
#[derive(Clone, Copy)]
pub(crate) enum SyncTo {
    Cpu,
    Device,
}

/// Syncs `range` (relative to a buffer at `base..base+len` of the page).
///
/// Inlined into the accessors, with the device call: the RX loop's
/// per-packet sync is then one gate hold and one call through the ops,
/// with no call of the pool's own between (the direction is known where
/// it is inlined, so no dispatch on it either).
///
/// # Safety
/// No CPU reference to the buffer exists while this runs.
#[inline(always)]
#[track_caller]
pub(crate) unsafe fn sync_range<M: TrackingMode>(
    meta: &PageMeta<M>,
    base: usize,
    len: impl BufferLen,
    range: Range<usize>,
    to: SyncTo,
) -> Result<(), SyncError> {
    if range.start > range.end || (range.end > len.at_least() && range.end > len.len()) {
        return Err(SyncError::OutOfRange {
            start: range.start,
            end: range.end,
            len: len.len(),
        });
    }
    let pool = &*meta.pool;
    if !meta.view.needs_sync() {
        // The backend's syncs do nothing (coherent DMA): no device call, no
        // gate hold, just the same answer once the device is going away.
        return if pool.gate.is_closed() {
            Err(SyncError::Unbound)
        } else {
            Ok(())
        };
    }
    sync_through_device(meta, base + range.start, range.len(), to)
}

/// The device call of [`sync_range`].
#[inline(always)]
#[track_caller]
fn sync_through_device<M: TrackingMode>(
    meta: &PageMeta<M>,
    offset: usize,
    len: usize,
    to: SyncTo,
) -> Result<(), SyncError> {
    // A checked device's report of this sync points at the caller.
    let _site = if meta.view.checked() {
        Some(access_site::note())
    } else {
        None
    };
    let Some(call) = meta.pool.device_call() else {
        return Err(SyncError::Unbound);
    };
    if len == 0 {
        return Ok(());
    }
    // A region page's range is a sub-range of its region's mapping.
    let (mapping, page_offset) = meta.device_range();
    let offset = page_offset + offset;
    match to {
        // SAFETY: the mapping is live (gate open, page owned by the caller),
        // the range is inside it, and no CPU reference exists (caller).
        SyncTo::Cpu => unsafe { call.sync_for_cpu(mapping, offset, len) },
        // SAFETY: as above.
        SyncTo::Device => unsafe { call.sync_for_device(mapping, offset, len) },
    }
    Ok(())
}

/// Tells the device's CPU-access check (if it has one) about a CPU access,
/// inside a device call's gate hold: `unbind` waits for it, and none runs
/// once the gate is closed. Without a check (real backends) this is one
/// test of the meta's own line.
#[inline(always)]
#[track_caller]
pub(crate) fn cpu_access_hook<M: TrackingMode>(
    meta: &PageMeta<M>,
    offset: usize,
    len: usize,
    access: CpuAccess,
) {
    if meta.view.checked() {
        cpu_access_check(meta, offset, len, access);
    }
}

/// The device call of [`cpu_access_hook`], out of line.
#[cold]
#[inline(never)]
#[track_caller]
fn cpu_access_check<M: TrackingMode>(
    meta: &PageMeta<M>,
    offset: usize,
    len: usize,
    access: CpuAccess,
) {
    let pool = &*meta.pool;
    if let Some(check) = &pool.device.cpu_access_check {
        let _site = access_site::note();
        if let Some(_call) = pool.device_call() {
            let (mapping, page_offset) = meta.device_range();
            check.cpu_access(mapping, page_offset + offset, len, access);
        }
    }
}

/// Gives many pages back at once, from any thread: pages of the same pool
/// that come in a row go into its ring under one lock, up to
/// [`MAX_REMOTE_BATCH`](crate::MAX_REMOTE_BATCH) at a time (Linux's bulk
/// put). Pages the ring has no room for leave the pool (unmapped and
/// freed), as with single drops.
///
/// If a sync on recycle panics, every page already taken from `pages` is
/// released (unmapped and freed) before the panic goes on; the pages not yet
/// taken are dropped as usual.
///
/// ```
/// use pagepool::{put_bulk, Device, IdentityDma};
///
/// let device = Device::new(IdentityDma::new());
/// let mut rx = device.pool_builder().build()?;
/// let mut completed = Vec::new();
/// rx.alloc_bulk(&mut completed, 64)?;
/// // A TX completion or a socket hands a burst back from its own thread:
/// // one ring lock per pool, not one per page.
/// std::thread::spawn(move || put_bulk(completed)).join().unwrap();
/// assert_eq!(rx.stats().pages_held, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn put_bulk<M: TrackingMode>(pages: impl IntoIterator<Item = Page<M>>) {
    let mut pages = pages.into_iter();
    let mut run = PageRun::<M>::new();
    while let Some((page, pool)) = run.add_fast(&mut pages) {
        run.add_slow(page, pool);
    }
    run.finish();
}

/// Syncs one page of a [`put_bulk`] for the device, outside any lock.
/// Returns `false` if the page must be released instead (its device is
/// unbinding); if the sync panics, the page is released and the panic goes
/// on.
fn sync_for_bulk<M: TrackingMode>(pool: &PoolShared<M>, page: NonNull<PageMeta<M>>) -> bool {
    // SAFETY: owned by the caller; the guard releases it on unwind.
    let returning = unsafe { Returning::new(page) };
    // SAFETY: owned (through the guard), live.
    let meta = unsafe { meta_ref(page) };
    // SAFETY: owned by the caller (through the guard).
    let synced = unsafe { sync_on_recycle(pool, meta) };
    returning.into_raw();
    synced
}

/// Pages one [`put_bulk`] run holds at most.
const RUN_LEN: usize = crate::remote::MAX_REMOTE_BATCH;

/// The pages of one run of [`put_bulk`]: out of their `Page` handles, all of
/// one pool, not yet in its ring. On the stack: a burst allocates nothing.
/// Released one by one if dropped with any left (a sync panicked).
///
/// The slots are left uninitialised until a page is stored (a burst does
/// not pay for writing 64 placeholders): `pages[..ready]` and
/// `pages[RUN_LEN - refused..]` are initialised, and only those are read.
struct PageRun<M: TrackingMode> {
    /// `pages[..ready]` go to the ring; `pages[RUN_LEN - refused..]` leave
    /// the pool (it is closing, or their sync found the device unbinding).
    pages: [MaybeUninit<NonNull<PageMeta<M>>>; RUN_LEN],
    ready: usize,
    refused: usize,
    /// The run's pool (compared only while the run holds pages, which keep
    /// it alive).
    pool: *const PoolShared<M>,
    /// Whether the run's pool was open when the run began.
    open: bool,
    /// Whether the run's pool syncs on recycle.
    syncs: bool,
    /// `pool` while the run takes pages on the fast path (the pool was open
    /// and does not sync), else null.
    plain_pool: *const PoolShared<M>,
}

impl<M: TrackingMode> PageRun<M> {
    fn new() -> Self {
        Self {
            pages: [const { MaybeUninit::uninit() }; RUN_LEN],
            ready: 0,
            refused: 0,
            pool: core::ptr::null(),
            open: false,
            syncs: false,
            plain_pool: core::ptr::null(),
        }
    }

    /// The fast path of [`put_bulk`]: takes pages from `pages` into the run
    /// while each is another page of the run's open pool that does not
    /// sync and the run has room (one compare and one store a page).
    /// Returns the first page that does not fit, with its pool, for
    /// [`add_slow`](Self::add_slow); `None` once `pages` is done.
    ///
    /// The run's length is counted in a local (no reload after each page's
    /// store), and stored after each page, so a panic in the caller's
    /// iterator releases every page taken.
    #[inline(always)]
    fn add_fast(
        &mut self,
        pages: &mut impl Iterator<Item = Page<M>>,
    ) -> Option<(Page<M>, *const PoolShared<M>)> {
        let plain_pool = self.plain_pool;
        let mut ready = self.ready;
        for page in pages {
            let pool = Arc::as_ptr(&page.meta().pool);
            if pool == plain_pool && ready < RUN_LEN {
                self.pages[ready].write(page.into_raw());
                ready += 1;
                self.ready = ready;
            } else {
                return Some((page, pool));
            }
        }
        None
    }

    /// The slow path of [`put_bulk`]: the page starts a new run (another
    /// pool, or the run is full), or its pool is closing or syncs.
    #[cold]
    #[inline(never)]
    fn add_slow(&mut self, page: Page<M>, pool: *const PoolShared<M>) {
        // The previous run goes first, while this page is still in its
        // handle: if a callback of that release panics, the handle (not a
        // raw pointer) unwinds, and the page goes back as any dropped page.
        if self.is_full() || (!self.is_empty() && self.pool != pool) {
            self.finish();
        }
        let page = page.into_raw();
        // SAFETY: the page came out of an owned handle.
        let meta = unsafe { meta_ref(page) };
        if self.is_empty() {
            self.pool = pool;
            self.open = !meta.pool.closed.load(Ordering::Acquire);
            self.syncs = meta.pool.recycle_sync.is_some();
            if self.open && !self.syncs {
                self.plain_pool = pool;
            }
        }
        // Sync outside the ring lock: device calls never nest in it.
        if self.open && (!self.syncs || sync_for_bulk(&meta.pool, page)) {
            self.pages[self.ready].write(page);
            self.ready += 1;
        } else {
            self.refused += 1;
            self.pages[RUN_LEN - self.refused].write(page);
        }
    }

    fn is_empty(&self) -> bool {
        self.ready + self.refused == 0
    }

    fn is_full(&self) -> bool {
        self.ready + self.refused == RUN_LEN
    }

    /// The initialised slots `pages[range]`.
    ///
    /// # Safety
    /// Every slot in `range` holds a page (`range` lies in `..ready` or in
    /// `RUN_LEN - refused..`, or was filled by `finish`'s move).
    unsafe fn slots(&self, range: Range<usize>) -> &[NonNull<PageMeta<M>>] {
        let slots = &self.pages[range];
        // SAFETY: the slots are initialised (caller), and `MaybeUninit<T>`
        // has `T`'s layout.
        unsafe { &*(slots as *const [MaybeUninit<NonNull<PageMeta<M>>>] as *const [_]) }
    }

    /// Pushes the ready pages into the pool's ring under one lock, then
    /// releases what the ring refused together with the refused pages, in
    /// one release.
    fn finish(&mut self) {
        // Out of the run first: a panic in the release below must not make
        // the run's drop release them again.
        let ready = core::mem::take(&mut self.ready);
        let refused = core::mem::take(&mut self.refused);
        self.plain_pool = core::ptr::null();
        let (taken, why) = if ready > 0 {
            // SAFETY: `pages[..ready]` hold the run's ready pages.
            let pages = unsafe { self.slots(0..ready) };
            // SAFETY: owned by the run, live.
            let first = unsafe { meta_ref(pages[0]) };
            // Once the lock is released with pages inside, the owner may
            // take them and the pool may go away: neither `first` nor its
            // pool is touched after this statement.
            first.pool.ring.lock().push_many(pages)
        } else {
            (0, None)
        };
        if taken == ready && refused == 0 {
            // The common case: the ring took the whole run.
            return;
        }
        self.release_rest(ready, refused, taken, why);
    }

    /// The slow end of [`finish`](Self::finish): releases the pages the
    /// ring did not take (`pages[taken..ready]`, refused because the ring
    /// was full or closed) together with the `refused` pages the run kept
    /// apart, in one release.
    #[cold]
    #[inline(never)]
    fn release_rest(
        &mut self,
        ready: usize,
        refused: usize,
        taken: usize,
        why: Option<PushRefused>,
    ) {
        // The refused pages join what the ring refused: `pages[taken..end]`.
        self.pages.copy_within(RUN_LEN - refused..RUN_LEN, ready);
        let end = ready + refused;
        // SAFETY: `pages[taken..ready]` were ready and not taken by the
        // ring, and the move above filled `pages[ready..end]`.
        let leaving = unsafe { self.slots(taken..end) };
        // SAFETY: not in the ring, so still owned.
        let meta = unsafe { meta_ref(leaving[0]) };
        // A strong reference of our own: releasing the pages frees their
        // metadata, which may hold the pool's last one.
        let pool = Arc::clone(&meta.pool);
        let closed = refused
            + if why == Some(PushRefused::Closed) {
                ready - taken
            } else {
                0
            };
        if closed > 0 {
            pool.released_closed
                .fetch_add(closed as u64, Ordering::Relaxed);
        }
        // SAFETY: owned, all of `pool`, not used afterwards.
        unsafe { release_pages(&pool, leaving) };
    }
}

impl<M: TrackingMode> Drop for PageRun<M> {
    fn drop(&mut self) {
        let ready = core::mem::take(&mut self.ready);
        let refused = core::mem::take(&mut self.refused);
        if ready + refused == 0 {
            return;
        }
        // SAFETY: the run's ready slots hold its pages.
        let ready = unsafe { self.slots(0..ready) };
        // SAFETY: as are its refused slots.
        let refused = unsafe { self.slots(RUN_LEN - refused..RUN_LEN) };
        for &page in ready.iter().chain(refused) {
            recycle_refused(page, PushRefused::Closed);
        }
    }
}
