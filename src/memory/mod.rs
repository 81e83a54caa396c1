//! Where page memory comes from: [`PageSource`].
//!
//! The pool asks a source for blocks of `PAGE_SIZE << order` bytes, aligned
//! to at least [`PAGE_SIZE`], and gives each block back exactly once, after
//! the block's DMA mapping is gone (invariant 4). The default source,
//! [`GlobalPages`], uses the global allocator; supply your own to take pages
//! from hugepages or from a pre-registered region.
//!
//! A region-mapped pool takes whole regions instead, from a
//! [`RegionSource`] ([`regions`]).

use core::alloc::Layout;
use core::fmt;
use core::ptr::NonNull;

use crate::sync;

pub(crate) mod regions;
pub use regions::{
    RegionBacking, RegionBlock, RegionSource, SystemRegions, DEFAULT_REGION_SIZE, MAX_REGION_SIZE,
};

/// Size of an order-0 page: 4 KiB.
pub const PAGE_SIZE: usize = 4096;

/// The highest page order a pool accepts (4 MiB pages, as Linux's
/// `MAX_PAGE_ORDER`).
pub const MAX_ORDER: u32 = 10;

/// The source had no memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfMemory;

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("page source is out of memory")
    }
}

impl std::error::Error for OutOfMemory {}

/// A supplier of page memory.
///
/// The pool never calls a page source inside a device call or under one of
/// its locks, so a source may block (waiting for memory to come back), panic
/// (an `alloc_pages` that panics allocated nothing; a `free_pages` that
/// panics is not repeated, and the pool still frees the other pages of the
/// batch), drop pages and pools, or allocate from other pools. `unbind`
/// never waits for a page source: a slow path blocked in `alloc_pages` finds
/// the device unbound when it returns, gives the block back, and fails with
/// [`AllocError::Unbound`](crate::AllocError::Unbound). Calling
/// [`Device::unbind`](crate::Device::unbind) from `alloc_pages` works; from a
/// `free_pages` that `unbind` itself runs it returns
/// [`UnbindError::InsideCallback`](crate::UnbindError::InsideCallback).
///
/// The pool refuses a block not aligned to the device's IOMMU page
/// ([`DmaOps::min_page_size`](crate::DmaOps::min_page_size), when the
/// backend reports one) with
/// [`AllocError::Misaligned`](crate::AllocError::Misaligned), giving it
/// back, since mapping it would expose its neighbours to the device: align
/// blocks to their size, as [`GlobalPages`] does.
///
/// ```
/// use std::alloc::{alloc_zeroed, dealloc, Layout};
/// use std::ptr::NonNull;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use pagepool::{Device, IdentityDma, OutOfMemory, PageSource, PAGE_SIZE};
///
/// /// Page memory with a budget: at most `limit` blocks out at a time.
/// struct Budgeted {
///     out: AtomicUsize,
///     limit: usize,
/// }
///
/// fn layout(order: u32) -> Layout {
///     Layout::from_size_align(PAGE_SIZE << order, PAGE_SIZE).unwrap()
/// }
///
/// // SAFETY: blocks come from the global allocator with the page layout,
/// // each live until `free_pages` deallocates it with the same layout.
/// unsafe impl PageSource for Budgeted {
///     fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
///         if self.out.fetch_add(1, Ordering::Relaxed) >= self.limit {
///             self.out.fetch_sub(1, Ordering::Relaxed);
///             return Err(OutOfMemory);
///         }
///         // SAFETY: the layout's size is not zero.
///         NonNull::new(unsafe { alloc_zeroed(layout(order)) }).ok_or(OutOfMemory)
///     }
///
///     unsafe fn free_pages(&self, block: NonNull<u8>, order: u32) {
///         self.out.fetch_sub(1, Ordering::Relaxed);
///         // SAFETY: from `alloc_pages(order)`, freed once (the caller's
///         // contract).
///         unsafe { dealloc(block.as_ptr(), layout(order)) }
///     }
/// }
///
/// let device = Device::new(IdentityDma::new());
/// let mut pool = device
///     .pool_builder()
///     .page_source(Budgeted { out: AtomicUsize::new(0), limit: 4 })
///     .refill_batch(4)
///     .cache_size(4)
///     .build()?;
/// let pages: Vec<_> = (0..4).map(|_| pool.alloc()).collect::<Result<_, _>>()?;
/// assert!(pool.alloc().is_err(), "over budget");
/// drop(pages);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Safety
/// An implementation must return blocks that are valid for reads and writes
/// of `PAGE_SIZE << order` bytes, aligned to [`PAGE_SIZE`], not aliased by
/// any other live block, and that stay valid until passed to
/// [`free_pages`](Self::free_pages). The pool relies on this for memory
/// safety of every page handle.
pub unsafe trait PageSource: Send + Sync + 'static {
    /// Allocates one block of `PAGE_SIZE << order` bytes.
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory>;

    /// Returns a block.
    ///
    /// # Safety
    /// `block` came from `alloc_pages(order)` on this source, is freed once,
    /// and nothing uses it afterwards.
    unsafe fn free_pages(&self, block: NonNull<u8>, order: u32);
}

/// Page memory from the global allocator, zeroed, aligned to its own size
/// (as the kernel's buddy allocator aligns an order-n block), so a page is
/// aligned to any IOMMU page that is not larger than it.
#[derive(Clone, Copy, Debug, Default)]
pub struct GlobalPages;

pub(crate) fn layout_for(order: u32) -> Layout {
    // PAGE_SIZE is a power of two and order <= MAX_ORDER keeps the size far
    // below isize::MAX, so this cannot fail.
    Layout::from_size_align(PAGE_SIZE << order, PAGE_SIZE << order).expect("page layout")
}

// SAFETY: blocks come from the global allocator with a layout of the exact
// size and PAGE_SIZE alignment; each is a distinct live allocation until
// `free_pages` deallocates it with the same layout.
unsafe impl PageSource for GlobalPages {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        // SAFETY: the layout's size is PAGE_SIZE << order, never zero.
        let ptr = unsafe { sync::alloc_zeroed(layout_for(order)) };
        NonNull::new(ptr).ok_or(OutOfMemory)
    }

    unsafe fn free_pages(&self, block: NonNull<u8>, order: u32) {
        // SAFETY: the caller passes a block from `alloc_pages(order)`, which
        // used this same layout, exactly once.
        unsafe { sync::dealloc(block.as_ptr(), layout_for(order)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_pages_are_aligned_zeroed_and_sized() {
        for order in [0, 1, 3, 4] {
            let block = GlobalPages.alloc_pages(order).unwrap();
            assert_eq!(
                block.as_ptr() as usize % (PAGE_SIZE << order),
                0,
                "aligned to its own size"
            );
            let len = PAGE_SIZE << order;
            // SAFETY: the block is valid for `len` bytes until freed below.
            let bytes = unsafe { core::slice::from_raw_parts(block.as_ptr(), len) };
            assert!(bytes.iter().all(|&b| b == 0));
            // SAFETY: freed once, with the order it was allocated with.
            unsafe { GlobalPages.free_pages(block, order) };
        }
    }
}
