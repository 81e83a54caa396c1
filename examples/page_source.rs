//! A page source of your own: pool pages carved from one pre-allocated,
//! page-aligned region (as a driver would use a hugepage or a region it
//! registered with its IOMMU up front), plus fragments and zero-copy `Bytes`
//! on top of it.
//!
//! Run: `cargo run --example page_source --features bytes`

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use pagepool::checking::{CheckMode, CheckingDevice};
use pagepool::{Device, OutOfMemory, PageSource, PAGE_SIZE};

/// One big region, handed out in blocks of one size, with a free list.
/// Dropped (and its memory returned) when the pool and the last page that
/// came from it are gone: the pool keeps the source alive that long.
struct RegionPages {
    region: NonNull<u8>,
    layout: Layout,
    block: usize,
    free: Mutex<Vec<usize>>,
    freed_back: Arc<Mutex<usize>>,
}

// SAFETY: the region is plain memory owned by this struct; blocks are handed
// out under the free-list mutex, each to one owner at a time.
unsafe impl Send for RegionPages {}
// SAFETY: as above; all shared state is behind the mutex.
unsafe impl Sync for RegionPages {}

impl RegionPages {
    fn new(blocks: usize, order: u32, freed_back: Arc<Mutex<usize>>) -> Self {
        let block = PAGE_SIZE << order;
        let layout = Layout::from_size_align(block * blocks, PAGE_SIZE).expect("region layout");
        // SAFETY: the layout has a non-zero size.
        let region = NonNull::new(unsafe { alloc_zeroed(layout) }).expect("out of memory");
        Self {
            region,
            layout,
            block,
            free: Mutex::new((0..blocks).rev().collect()),
            freed_back,
        }
    }
}

impl Drop for RegionPages {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the pool has returned
        // every block (it drops its source only after its last page).
        unsafe { dealloc(self.region.as_ptr(), self.layout) }
    }
}

// SAFETY: each block is `block` bytes inside the region, PAGE_SIZE-aligned
// (the region is, and `block` is a multiple of PAGE_SIZE), handed to one
// owner until it comes back through `free_pages`; the region outlives every
// block because the pool keeps this source until its last page is freed.
unsafe impl PageSource for RegionPages {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        assert_eq!(PAGE_SIZE << order, self.block, "one block size per region");
        let index = self.free.lock().unwrap().pop().ok_or(OutOfMemory)?;
        // SAFETY: index < blocks, so the offset stays inside the region.
        Ok(unsafe { self.region.add(index * self.block) })
    }

    unsafe fn free_pages(&self, block: NonNull<u8>, _order: u32) {
        let index = (block.as_ptr() as usize - self.region.as_ptr() as usize) / self.block;
        self.free.lock().unwrap().push(index);
        *self.freed_back.lock().unwrap() += 1;
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let checker = CheckingDevice::new(CheckMode::Panic);
    let device = Device::new(checker.clone());
    let freed = Arc::new(Mutex::new(0));

    // 16 blocks of order 1 (8 KiB): the pool can never hold more than that.
    let mut pool = device
        .pool_builder()
        .order(1)
        .cache_size(8)
        .refill_batch(8)
        .page_source(RegionPages::new(16, 1, Arc::clone(&freed)))
        .build()?;

    let pages: Vec<_> = (0..16).map(|_| pool.alloc()).collect::<Result<_, _>>()?;
    println!(
        "16 pages of {} bytes from the region, {} mappings",
        pages[0].len(),
        checker.live_mappings()
    );
    match pool.alloc() {
        Err(e) => println!("the 17th: {e}"),
        Ok(_) => unreachable!("the region has 16 blocks"),
    }
    drop(pages); // back through the ring (1024), ready for reuse

    // Fragments: several receive buffers per page; the last drop recycles it.
    let mut small = pool.alloc_frag(1500)?;
    checker.device_write(small.dma_addr(), b"a 1500-byte frame")?;
    small.sync_for_cpu(0..17)?;
    let bytes = small.into_bytes(); // zero-copy; the page returns with the last clone
    let header = bytes.slice(0..7);
    println!("fragment as Bytes: {:?}", std::str::from_utf8(&header)?);

    let report = device.unbind()?;
    println!("{report}");
    drop((bytes, header)); // still valid memory after unbind; freed with no device call
    drop(pool);
    println!(
        "blocks given back to the region: {}; checker: {}",
        freed.lock().unwrap(),
        checker.verdict()
    );
    assert_eq!(*freed.lock().unwrap(), 16);
    assert!(checker.verdict().is_clean());
    Ok(())
}
