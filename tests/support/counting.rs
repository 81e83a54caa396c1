//! Counting stand-ins: a page source that checks every block is freed
//! exactly once, and a `DmaOps` that counts its calls.

use std::collections::HashSet;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pagepool::{DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, GlobalPages, PageSource};

/// A page source that records every block it hands out and checks each is
/// freed exactly once.
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
    pub fn allocated(&self) -> usize {
        self.inner.allocated.load(Ordering::SeqCst)
    }
    pub fn freed(&self) -> usize {
        self.inner.freed.load(Ordering::SeqCst)
    }
    pub fn live(&self) -> usize {
        self.inner.live.lock().unwrap().len()
    }
    pub fn double_frees(&self) -> usize {
        self.inner.double_frees.load(Ordering::SeqCst)
    }
    /// Every page allocated was freed exactly once.
    pub fn assert_all_freed_once(&self) {
        assert_eq!(self.double_frees(), 0, "a page was freed twice");
        assert_eq!(self.live(), 0, "pages leaked");
        assert_eq!(self.allocated(), self.freed());
    }
}

// SAFETY: delegates to GlobalPages, which meets the contract; the
// bookkeeping does not touch the blocks.
unsafe impl PageSource for CountingPages {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, pagepool::OutOfMemory> {
        let block = GlobalPages.alloc_pages(order)?;
        self.inner
            .live
            .lock()
            .unwrap()
            .insert(block.as_ptr() as usize);
        self.inner.allocated.fetch_add(1, Ordering::SeqCst);
        Ok(block)
    }

    unsafe fn free_pages(&self, block: NonNull<u8>, order: u32) {
        if !self
            .inner
            .live
            .lock()
            .unwrap()
            .remove(&(block.as_ptr() as usize))
        {
            self.inner.double_frees.fetch_add(1, Ordering::SeqCst);
            return;
        }
        self.inner.freed.fetch_add(1, Ordering::SeqCst);
        // SAFETY: the block came from GlobalPages with this order, once.
        unsafe { GlobalPages.free_pages(block, order) }
    }
}

/// A device that maps nothing real: counts calls, hands out fake addresses.
#[derive(Clone, Default)]
pub struct CountingOps {
    pub maps: Arc<AtomicU64>,
    pub unmaps: Arc<AtomicU64>,
    pub syncs: Arc<AtomicU64>,
    next: Arc<AtomicU64>,
}

impl DmaOps for CountingOps {
    unsafe fn map(&self, _: NonNull<u8>, len: usize, _: DmaDirection) -> Result<DmaAddr, DmaError> {
        self.maps.fetch_add(1, Ordering::SeqCst);
        Ok(DmaAddr(
            0x1000_0000 + self.next.fetch_add(len as u64, Ordering::SeqCst),
        ))
    }
    unsafe fn unmap(&self, _: DmaMapping) {
        self.unmaps.fetch_add(1, Ordering::SeqCst);
    }
    unsafe fn sync_for_device(&self, _: DmaMapping, _: usize, _: usize) {
        self.syncs.fetch_add(1, Ordering::SeqCst);
    }
    unsafe fn sync_for_cpu(&self, _: DmaMapping, _: usize, _: usize) {
        self.syncs.fetch_add(1, Ordering::SeqCst);
    }
}
