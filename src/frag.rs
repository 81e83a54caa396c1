//! Fragments: several buffers carved from one pool page (Linux's
//! `page_pool_alloc_frag`).
//!
//! The owner carves fragments from its current fragment page, each aligned
//! to [`FRAG_ALIGN`]. The page's reference count starts at a large bias
//! when the page is taken, so handing out a fragment costs no atomic
//! operation; when the owner moves on to a new page it subtracts the bias it
//! did not use. Each [`Frag`] dropped (on any thread) subtracts one; whoever
//! brings the count to zero recycles the page, and only then is it synced
//! for the device.
//!
//! # Invariants
//!
//! - `frag_refs` = `BIAS` - (fragments handed out) + (fragments still live)
//!   while the owner holds the page; it reaches 0 exactly once, after the
//!   owner let go and every fragment dropped.
//! - Fragments of one page never overlap, so each may be written through
//!   its own `&mut` view on its own thread.

use core::fmt;
use core::ops::Range;
use core::ptr::NonNull;

use crate::checking::CpuAccess;
use crate::dma::{DmaAddr, DmaDirection};
use crate::error::SyncError;
use crate::mode::{Tracked, TrackingMode};
use crate::page::{cpu_access_hook, recycle_remote, sync_range, SyncTo};
use crate::shared::{meta_ref, PageMeta};
use crate::sync::Ordering;

/// Fragments start at multiples of this many bytes (a cache line).
pub const FRAG_ALIGN: usize = 64;

/// The reference bias a fresh fragment page starts with.
const BIAS: usize = usize::MAX >> 2;

/// A fragment of a pool page: an owned buffer of `len` bytes at `offset` in
/// the page. The page returns to its pool when the last of its fragments is
/// dropped, on whatever thread.
pub struct Frag<M: TrackingMode = Tracked> {
    meta: NonNull<PageMeta<M>>,
    offset: usize,
    len: usize,
}

// SAFETY: a fragment owns its byte range exclusively; the page's shared
// reference count is atomic and its metadata otherwise immutable.
unsafe impl<M: TrackingMode> Send for Frag<M> {}
// SAFETY: `&Frag` only reads its own range.
unsafe impl<M: TrackingMode> Sync for Frag<M> {}

impl<M: TrackingMode> Frag<M> {
    fn meta(&self) -> &PageMeta<M> {
        // SAFETY: the page lives while any of its fragments does.
        unsafe { meta_ref(self.meta) }
    }

    /// Length of the fragment in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the fragment is empty (never: fragments are at least 1 byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offset of the fragment in its page.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Device address of the fragment's first byte (stale after unbind).
    pub fn dma_addr(&self) -> DmaAddr {
        self.meta().dma.offset(self.offset as u64)
    }

    /// The DMA direction of the page.
    pub fn direction(&self) -> DmaDirection {
        self.meta().pool.config.direction
    }

    /// The fragment's bytes, for the CPU.
    #[track_caller]
    pub fn as_slice(&self) -> &[u8] {
        let meta = self.meta();
        cpu_access_hook(meta, self.offset, self.len, CpuAccess::Read);
        // SAFETY: the range lies in the page (checked at carve time), the
        // page is valid while this fragment lives, and no other fragment
        // overlaps it.
        unsafe {
            core::slice::from_raw_parts(meta.cpu.as_ptr().wrapping_add(self.offset), self.len)
        }
    }

    /// The fragment's bytes, mutable, for the CPU.
    #[track_caller]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let meta = self.meta();
        cpu_access_hook(meta, self.offset, self.len, CpuAccess::Write);
        let cpu = meta.cpu;
        // SAFETY: as in `as_slice`; `&mut self` makes the view exclusive.
        unsafe { core::slice::from_raw_parts_mut(cpu.as_ptr().wrapping_add(self.offset), self.len) }
    }

    /// Hands `range` (relative to the fragment) back to the CPU. Errors as
    /// for [`Page::sync_for_cpu`](crate::Page::sync_for_cpu).
    ///
    /// ```
    /// use pagepool::checking::{CheckMode, CheckingDevice};
    /// use pagepool::Device;
    ///
    /// let nic = CheckingDevice::new(CheckMode::Panic);
    /// let device = Device::new(nic.clone());
    /// let mut rx = device.pool_builder().build()?;
    /// let mut header = rx.alloc_frag(128)?; // small buffers share a page
    /// nic.device_write(header.dma_addr(), b"hdr")?;
    /// header.sync_for_cpu(0..3)?;
    /// assert_eq!(&header.as_slice()[..3], b"hdr");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[track_caller]
    pub fn sync_for_cpu(&mut self, range: Range<usize>) -> Result<(), SyncError> {
        // SAFETY: `&mut self`: no CPU view of this fragment exists, and no
        // other fragment covers its bytes.
        unsafe { sync_range(self.meta(), self.offset, self.len, range, SyncTo::Cpu) }
    }

    /// Hands `range` (relative to the fragment) to the device. Errors as
    /// for [`Page::sync_for_cpu`](crate::Page::sync_for_cpu).
    #[track_caller]
    pub fn sync_for_device(&mut self, range: Range<usize>) -> Result<(), SyncError> {
        // SAFETY: as in `sync_for_cpu`.
        unsafe { sync_range(self.meta(), self.offset, self.len, range, SyncTo::Device) }
    }
}

impl<M: TrackingMode> Drop for Frag<M> {
    fn drop(&mut self) {
        // SAFETY: the page is live while this fragment holds a reference.
        let refs = &unsafe { meta_ref(self.meta) }.frag_refs;
        if refs.fetch_sub(1, Ordering::Release) == 1 {
            // Every other user's writes happen-before the recycle. An
            // acquire load rather than a standalone fence: the same on x86
            // (a plain load after the `lock xadd`), and ThreadSanitizer,
            // which does not model standalone fences, sees it.
            let _ = refs.load(Ordering::Acquire);
            // SAFETY: the count reached zero: this thread owns the page.
            unsafe { recycle_remote(self.meta) };
        }
    }
}

impl<M: TrackingMode> fmt::Debug for Frag<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frag")
            .field("dma_addr", &self.dma_addr())
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

/// The owner's current fragment page (see
/// [`PagePool::alloc_frag`](crate::PagePool::alloc_frag)).
pub(crate) struct FragState<M: TrackingMode> {
    page: NonNull<PageMeta<M>>,
    /// Where the next fragment starts.
    offset: usize,
    /// Fragments handed out from the page so far.
    users: usize,
}

impl<M: TrackingMode> FragState<M> {
    /// Takes `page` (owned by the caller) as the fragment page and carves
    /// its first fragment, of `size` bytes.
    pub(crate) fn start(page: NonNull<PageMeta<M>>, size: usize) -> (Self, Frag<M>) {
        // SAFETY: the page was just handed to the caller; no fragment exists
        // yet, so a plain store is enough to set the bias.
        unsafe { meta_ref(page) }
            .frag_refs
            .store(BIAS, Ordering::Relaxed);
        let state = Self {
            page,
            offset: size.next_multiple_of(FRAG_ALIGN),
            users: 1,
        };
        let frag = Frag {
            meta: page,
            offset: 0,
            len: size,
        };
        (state, frag)
    }

    /// Carves the next `size`-byte fragment, if it fits in the page's
    /// `page_len` bytes. Costs no atomic operation (the bias covers it).
    pub(crate) fn carve(&mut self, size: usize, page_len: usize) -> Option<Frag<M>> {
        if self.offset + size > page_len {
            return None;
        }
        let offset = self.offset;
        self.offset += size.next_multiple_of(FRAG_ALIGN);
        self.users += 1;
        Some(Frag {
            meta: self.page,
            offset,
            len: size,
        })
    }

    /// Lets go of the page: removes the unused bias, and recycles the page
    /// if all its fragments are already gone.
    pub(crate) fn finish(self) {
        let unused = BIAS - self.users;
        // SAFETY: the owner holds the page until the bias is removed.
        let refs = &unsafe { meta_ref(self.page) }.frag_refs;
        if refs.fetch_sub(unused, Ordering::AcqRel) == unused {
            // SAFETY: the count reached zero: we own the page. Recycle through
            // the ring: the owner's cache may be closing (pool drop).
            unsafe { recycle_remote(self.page) };
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::checking::{CheckMode, CheckingDevice};
    use crate::error::AllocError;
    use crate::Device;

    #[test]
    fn fragments_share_a_page_and_the_last_one_recycles_it() {
        let checker = CheckingDevice::new(CheckMode::Panic);
        let device = Device::new(checker.clone());
        let mut pool = device
            .pool_builder()
            .cache_size(2)
            .refill_batch(1)
            .sync_for_device(0, 4096)
            .build()
            .unwrap();
        let a = pool.alloc_frag(1000).unwrap();
        let b = pool.alloc_frag(1000).unwrap();
        assert_eq!(
            a.dma_addr().offset(1024),
            b.dma_addr(),
            "aligned to FRAG_ALIGN"
        );
        let c = pool.alloc_frag(3000).unwrap(); // does not fit: a new page
        assert_ne!(c.offset(), 2048);
        assert_eq!(c.offset(), 0);
        assert_eq!(checker.stats().maps, 2);
        let b_thread = std::thread::spawn(move || drop(b));
        drop(a);
        b_thread.join().unwrap();
        assert_eq!(
            pool.stats().recycle.ring,
            1,
            "first page back after its last fragment"
        );
        assert_eq!(
            checker.stats().syncs_for_device,
            1,
            "synced once, on recycle"
        );
        drop(c);
        drop(pool);
        assert_eq!(checker.live_mappings(), 0);
    }

    #[test]
    fn fragment_sizes_are_checked() {
        let device = Device::new(CheckingDevice::new(CheckMode::Panic));
        let mut pool = device.pool_builder().build().unwrap();
        assert_eq!(
            pool.alloc_frag(0).unwrap_err(),
            AllocError::FragmentSize {
                requested: 0,
                page_len: 4096
            }
        );
        assert!(pool.alloc_frag(4097).is_err());
        assert_eq!(pool.alloc_frag(4096).unwrap().len(), 4096);
    }
}
