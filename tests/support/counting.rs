//! A page source that counts: every block it hands out is recorded, and
//! each must be freed exactly once.
//!
//! The one page source of this kind in the repository: the tests take it
//! through `mod support;`, the fuzz interpreter (`interp/`) and
//! `examples/nic_demo.rs` include this file by `#[path]`, so it must stay
//! self-contained (no `super::`, nothing beyond `pagepool` and `std`).

use std::collections::HashSet;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use pagepool::{GlobalPages, OutOfMemory, PageSource};

/// A page source that records every block it hands out and checks each is
/// freed exactly once. Clones share the records.
#[derive(Clone, Default)]
pub struct CountingPages {
    inner: Arc<CountingInner>,
}

#[derive(Default)]
struct CountingInner {
    live: Mutex<HashSet<usize>>,
    allocated: AtomicUsize,
    freed: AtomicUsize,
    double_frees: AtomicUsize,
}

impl CountingPages {
    /// The live set; a panic elsewhere (injected by a test) never poisons
    /// the records for good.
    fn live_set(&self) -> MutexGuard<'_, HashSet<usize>> {
        self.inner
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks handed out so far.
    pub fn allocated(&self) -> usize {
        self.inner.allocated.load(Ordering::SeqCst)
    }

    /// Blocks given back so far (each once).
    pub fn freed(&self) -> usize {
        self.inner.freed.load(Ordering::SeqCst)
    }

    /// Frees of a block that was not live (not passed on to the allocator).
    pub fn double_frees(&self) -> usize {
        self.inner.double_frees.load(Ordering::SeqCst)
    }

    /// [`PageSource::free_pages`] that tells whether the block was live: a
    /// block that was not is counted as a double free and not passed on
    /// (that would corrupt the heap).
    ///
    /// # Safety
    ///
    /// The contract of [`PageSource::free_pages`].
    pub unsafe fn free_once(&self, block: NonNull<u8>, order: u32) -> bool {
        let was_live = self.live_set().remove(&(block.as_ptr() as usize));
        if !was_live {
            self.inner.double_frees.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        self.inner.freed.fetch_add(1, Ordering::SeqCst);
        // SAFETY: the block came from GlobalPages with this order and is
        // freed once (checked just above).
        unsafe { GlobalPages.free_pages(block, order) };
        true
    }
}

// The assertions of the tests and the fuzz interpreter;
// `examples/nic_demo.rs` reports the counts instead of asserting.
#[allow(dead_code)]
impl CountingPages {
    /// Blocks handed out and not given back.
    pub fn live(&self) -> usize {
        self.live_set().len()
    }

    /// Every block allocated was freed exactly once.
    #[track_caller]
    pub fn assert_all_freed_once(&self) {
        assert_eq!(self.double_frees(), 0, "a page was freed twice");
        assert_eq!(self.live(), 0, "pages leaked");
        assert_eq!(self.allocated(), self.freed());
    }
}

// SAFETY: delegates to GlobalPages, which meets the contract; the
// bookkeeping never touches the blocks, and a block that is not live is
// never passed on.
unsafe impl PageSource for CountingPages {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        let block = GlobalPages.alloc_pages(order)?;
        self.live_set().insert(block.as_ptr() as usize);
        self.inner.allocated.fetch_add(1, Ordering::SeqCst);
        Ok(block)
    }

    unsafe fn free_pages(&self, block: NonNull<u8>, order: u32) {
        // SAFETY: forwarded contract.
        unsafe { self.free_once(block, order) };
    }
}
