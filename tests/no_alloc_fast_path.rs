//! The allocation targets, measured with a counting global allocator:
//!
//! - the fast path (alloc + `recycle_direct` through the local cache) makes
//!   no heap allocation, tracked or untracked; nor does the ring path once
//!   warm;
//! - in-flight tracking costs at most 16 heap bytes per mapped page.
//!
//! The counters are per thread: every test does its work on its own thread,
//! so tests running in parallel do not disturb each other's counts.

#[path = "support/noop.rs"]
mod noop;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::Arc;

use noop::NoopOps;
use pagepool::{
    Device, OutOfMemory, Page, PageSource, Tracked, TrackingMode, Untracked, PAGE_SIZE,
};

struct Counting;

thread_local! {
    /// Allocation calls (alloc, alloc_zeroed, realloc) made by this thread.
    static CALLS: Cell<u64> = const { Cell::new(0) };
    /// Bytes allocated minus bytes freed by this thread.
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

fn note(calls: u64, bytes: i64) {
    // `try_with`: a thread being torn down may still free memory.
    let _ = CALLS.try_with(|c| c.set(c.get() + calls));
    let _ = LIVE.try_with(|l| l.set(l.get() + bytes));
}

// SAFETY: forwards every call to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(1, layout.size() as i64);
        // SAFETY: forwarded caller contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(1, layout.size() as i64);
        // SAFETY: forwarded caller contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(0, -(layout.size() as i64));
        // SAFETY: forwarded caller contract.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(1, new_size as i64 - layout.size() as i64);
        // SAFETY: forwarded caller contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn calls() -> u64 {
    CALLS.with(Cell::get)
}
fn live() -> i64 {
    LIVE.with(Cell::get)
}

trait Mode: TrackingMode {
    fn device() -> Device<Self>;
}
impl Mode for Tracked {
    fn device() -> Device<Self> {
        Device::new(NoopOps)
    }
}
impl Mode for Untracked {
    fn device() -> Device<Self> {
        Device::new_untracked(NoopOps)
    }
}

/// Runs `f` on a fresh thread, so the counters see only `f`'s work.
fn on_own_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}

fn fast_path_allocates_nothing<M: Mode>() {
    on_own_thread(|| {
        let device = M::device();
        let mut pool = device.pool_builder().build().unwrap();
        // Warm up: the first alloc maps a batch of 64 pages (heap metadata,
        // tracker records); after that everything comes from the cache.
        let mut held: Vec<Page<M>> = Vec::with_capacity(32);
        for _ in 0..4 {
            held.extend((0..32).map(|_| pool.alloc().unwrap()));
            held.drain(..).for_each(|p| pool.recycle_direct(p));
        }
        let slow_before = pool.stats().alloc.slow;

        let (calls0, live0) = (calls(), live());
        for i in 0..100_000 {
            let page = pool.alloc().unwrap();
            pool.recycle_direct(std::hint::black_box(page));
            if i % 1000 == 0 {
                // Deeper in the cache too: 32 out, 32 back.
                held.extend((0..32).map(|_| pool.alloc().unwrap()));
                held.drain(..).for_each(|p| pool.recycle_direct(p));
            } else if i % 1000 == 500 {
                // And in bulk: `alloc_bulk` into room the caller has.
                assert_eq!(pool.alloc_bulk(&mut held, 32), Ok(32));
                held.drain(..).for_each(|p| pool.recycle_direct(p));
            }
        }
        let (calls1, live1) = (calls(), live());

        assert_eq!(pool.stats().alloc.slow, slow_before, "left the fast path");
        assert_eq!(calls1 - calls0, 0, "heap allocations on the fast path");
        assert_eq!(live1 - live0, 0, "heap bytes on the fast path");
    });
}

#[test]
fn fast_path_makes_no_heap_allocation_tracked() {
    fast_path_allocates_nothing::<Tracked>();
}

#[test]
fn fast_path_makes_no_heap_allocation_untracked() {
    fast_path_allocates_nothing::<Untracked>();
}

fn ring_path_allocates_nothing<M: Mode>() {
    on_own_thread(|| {
        let device = M::device();
        let mut pool = device.pool_builder().build().unwrap();
        for _ in 0..1000 {
            drop(pool.alloc().unwrap());
        }
        let mut burst: Vec<Page<M>> = Vec::with_capacity(64);
        let (calls0, live0) = (calls(), live());
        for i in 0..100_000 {
            // Dropped, not recycled: through the ring, back by refills.
            drop(std::hint::black_box(pool.alloc().unwrap()));
            if i % 1000 == 0 {
                // Bulk both ways: `alloc_bulk` refills from the ring too.
                assert_eq!(pool.alloc_bulk(&mut burst, 64), Ok(64));
                pagepool::put_bulk(burst.drain(..));
            }
        }
        let (calls1, live1) = (calls(), live());
        let stats = pool.stats();
        assert_eq!(stats.alloc.slow, 1, "mapped more than the first batch");
        assert!(stats.alloc.refill > 1000, "did not go through the ring");
        assert_eq!(calls1 - calls0, 0, "heap allocations on the ring path");
        assert_eq!(live1 - live0, 0, "heap bytes on the ring path");
    });
}

#[test]
fn ring_path_makes_no_heap_allocation_tracked() {
    ring_path_allocates_nothing::<Tracked>();
}

#[test]
fn ring_path_makes_no_heap_allocation_untracked() {
    ring_path_allocates_nothing::<Untracked>();
}

/// Page memory from one region allocated up front (and never touched), so
/// that mapping many pages allocates only what the pool itself needs.
struct Region {
    base: NonNull<u8>,
    pages: usize,
}

// SAFETY: the region is plain memory owned by this value; it is handed out
// in disjoint blocks.
unsafe impl Send for Region {}
// SAFETY: as above; `RegionPages` synchronises the hand-out.
unsafe impl Sync for Region {}

impl Region {
    fn layout(pages: usize) -> Layout {
        Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap()
    }
    fn new(pages: usize) -> Arc<Self> {
        // SAFETY: non-zero size; freed in Drop with the same layout.
        let base = unsafe { std::alloc::alloc(Self::layout(pages)) };
        Arc::new(Region {
            base: NonNull::new(base).expect("region allocation failed"),
            pages,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; every page source
        // holding the region (and so every page from it) is gone.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), Self::layout(self.pages)) }
    }
}

/// A bump allocator over a [`Region`]; freeing is a no-op.
struct RegionPages {
    region: Arc<Region>,
    next: std::sync::atomic::AtomicUsize,
}

// SAFETY: each block is a distinct, page-aligned, 4 KiB piece of the region,
// handed out once; the region lives as long as this source (the pool keeps
// its source until its last page is freed).
unsafe impl PageSource for RegionPages {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        assert_eq!(order, 0);
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if i >= self.region.pages {
            return Err(OutOfMemory);
        }
        // SAFETY: inside the region.
        Ok(unsafe { self.region.base.add(i * PAGE_SIZE) })
    }
    unsafe fn free_pages(&self, _block: NonNull<u8>, _order: u32) {}
}

struct Mapped {
    /// Heap bytes live after mapping, minus before.
    live: i64,
    /// `Device::tracker_heap_bytes` after, minus before.
    tracker: usize,
}

/// Maps `n` pages on a fresh device and holds them; measures the heap.
fn map_pages<M: Mode>(n: usize) -> Mapped {
    on_own_thread(|| {
        let region = Region::new(n + 64);
        let device = M::device();
        let mut pool = device
            .pool_builder()
            .page_source(RegionPages {
                region,
                next: 0.into(),
            })
            .build()
            .unwrap();
        let mut held: Vec<Page<M>> = Vec::with_capacity(n);
        let tracker0 = device.tracker_heap_bytes();
        let live0 = live();
        held.extend((0..n).map(|_| pool.alloc().unwrap()));
        let mapped = Mapped {
            live: live() - live0,
            tracker: device.tracker_heap_bytes() - tracker0,
        };
        assert_eq!(device.tracked_mappings(), if M::TRACKED { n } else { 0 });
        drop(held);
        drop(pool);
        mapped
    })
}

#[test]
fn tracking_costs_at_most_16_bytes_per_mapped_page() {
    // 64 Ki pages (a power of two: the tracker's vector is exactly full) and
    // 40,000 (not one: spare capacity left).
    for n in [1usize << 16, 40_000] {
        let tracked = map_pages::<Tracked>(n);
        let untracked = map_pages::<Untracked>(n);
        let per_page = (tracked.live - untracked.live) as f64 / n as f64;
        let reported = tracked.tracker as f64 / n as f64;
        println!(
            "{n} pages mapped: tracking holds {per_page:.2} heap bytes/page \
             (counting allocator, tracked - untracked), {reported:.2} by \
             tracker_heap_bytes; per-page heap total tracked {:.2}, untracked {:.2}",
            tracked.live as f64 / n as f64,
            untracked.live as f64 / n as f64,
        );
        assert!(per_page <= 16.0, "{per_page} bytes of tracking per page");
        assert!(
            (per_page - reported).abs() < 0.01,
            "tracker_heap_bytes ({reported}) disagrees with the allocator ({per_page})"
        );
        assert_eq!(untracked.tracker, 0);
    }
}
