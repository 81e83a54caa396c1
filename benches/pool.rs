//! Benchmarks of the pool's fast, ring and slow paths with tracking on and
//! off, cross-thread recycling, the RX loop's per-packet sync, unbind, and
//! the pools a Rust user would pick instead, all in one harness so every
//! ratio comes from one run.
//!
//! Run: `cargo bench --bench pool` (a few minutes; see BENCHMARKS.md).
//! A filter runs a part: `cargo bench --bench pool -- single_thread`.
//!
//! Groups (ids are `group/name`):
//! - `single_thread`: alloc + free of one 4 KiB page-aligned buffer on one
//!   thread, [`OPS`] pairs per iteration: the pool's fast path (alloc +
//!   `recycle_direct`) tracked and untracked, the bare `Vec` floor, peers.
//! - `ring`: alloc + drop on the owner thread, so every page goes through
//!   the shared ring and comes back by a refill (Linux's ptr_ring bench).
//! - `slow`: every alloc maps a fresh page and every release unmaps and
//!   frees it (ring of 1, cache of 1 or 64, pages released in rounds of
//!   [`SLOW_ROUND`]), with `GlobalPages` (zeroed pages from the global
//!   allocator) and with an arena source that costs nothing, which leaves
//!   the pool's own overhead.
//! - `rx_pipeline`: a driver's receive path on two threads (see the section
//!   comment), against the same pipeline over `ArrayQueue` and `Mutex<Vec>`
//!   pools and over a hand-written premapped pool ([`PremappedPool`]:
//!   buffers mapped once through the same `DmaOps`, syncing through them
//!   where the device needs it).
//! - `cross_thread`: one thread allocates, another frees (the pool's pages
//!   come back through its ring), phased so that the CPU work per page is
//!   measured repeatably; `cross_thread_bulk64`: the same, freeing in bursts
//!   of 64 (`put_bulk`); `cross_thread_streaming`: both threads at once,
//!   wall time per page (needs two idle cores). See the section comment.
//! - `unbind`: `Device::unbind` with 1 K, 64 K and 1 M pages held outside the
//!   pool; only the `unbind` call is timed.
//! - `sync`: the RX loop's alloc + `sync_for_cpu(0..64)` + `recycle_direct`
//!   against the fast path alone, with a backend whose syncs are needed
//!   (no-op body) and one that says none are (`needs_sync() == false`).
//!   `sync_two_queues`: two threads, one pool each, syncing every page, with
//!   both pools on one device or each on its own.
//! - `unbind_during_slow_map`: `unbind` while another thread's slow path maps
//!   a batch of 1024 pages with a 1 ms `map`.
//! - `regions`: region-mapped pools against pools mapped page by page.
//!   `slow_fill/*`: a fresh pool hands out [`FILL_PAGES`] pages, all from
//!   the slow path, and everything is given back and unmapped (pages
//!   dropped, pool dropped): the whole life of a mapping per page, with the
//!   no-op backend and with one whose `map` spins for 1 µs. `unbind_1M`:
//!   `unbind` with 1 M region pages held outside the pool.
//!
//! With `PAGEPOOL_COUNT=<workload>:<n>` in the environment the binary runs
//! one workload `n` times instead, for instruction counts under callgrind
//! (see [`count`]); with `PAGEPOOL_COUNT=lines:<group/name>:<n>` it runs one
//! phased workload for `n` packets, for `scripts/line_transfers.py`, which
//! counts the cache lines its two threads hand each other.

// The no-op device, shared with `tests/no_alloc_fast_path.rs`.
#[path = "../tests/support/noop.rs"]
mod noop;

use std::alloc::Layout;
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use lockfree_object_pool::{LinearObjectPool, SpinLockObjectPool};
use noop::NoopOps;
use pagepool::{
    put_bulk, Device, DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, OutOfMemory, Page,
    PagePool, PageSource, RegionBacking, RegionBlock, RegionSource, Tracked, TrackingMode,
    UnmapError, Untracked, DEFAULT_REGION_SIZE, PAGE_SIZE,
};

type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// Alloc + free pairs per iteration in the single-thread groups.
const OPS: u64 = 1000;
/// Pages allocated, then released, per round of the slow-path bench.
const SLOW_ROUND: usize = 256;
/// Pages per burst in the bulk cross-thread bench.
const BURST: usize = 64;
/// Bursts the bulk hand-off queue holds.
const BURSTS_IN_FLIGHT: usize = 8;

// ---------------------------------------------------------------------------
// The no-op device and page sources.

/// [`NoopOps`] that says its syncs do nothing (`needs_sync() == false`, as
/// VFIO does): the pool then skips every sync.
struct CoherentOps;

impl DmaOps for CoherentOps {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        // SAFETY: forwarded contract.
        unsafe { NoopOps.map(cpu, len, direction) }
    }
    unsafe fn unmap(&self, _mapping: DmaMapping) -> Result<(), UnmapError> {
        Ok(())
    }
    unsafe fn sync_for_device(&self, _mapping: DmaMapping, _offset: usize, _len: usize) {}
    unsafe fn sync_for_cpu(&self, _mapping: DmaMapping, _offset: usize, _len: usize) {}
    fn needs_sync(&self) -> bool {
        false
    }
}

/// [`NoopOps`] whose `map` takes [`SLOW_MAP`] (a sleep), and which tells
/// when the first map began.
struct SlowMapOps {
    mapping: std::sync::Arc<AtomicBool>,
}

/// How long one [`SlowMapOps::map`] takes.
const SLOW_MAP: Duration = Duration::from_millis(1);

impl DmaOps for SlowMapOps {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        self.mapping.store(true, Ordering::Release);
        thread::sleep(SLOW_MAP);
        // SAFETY: forwarded contract.
        unsafe { NoopOps.map(cpu, len, direction) }
    }
    unsafe fn unmap(&self, _mapping: DmaMapping) -> Result<(), UnmapError> {
        Ok(())
    }
    unsafe fn sync_for_device(&self, _mapping: DmaMapping, _offset: usize, _len: usize) {}
    unsafe fn sync_for_cpu(&self, _mapping: DmaMapping, _offset: usize, _len: usize) {}
}

/// Tracking on or off, as the type the device is built with.
trait Mode: TrackingMode {
    const NAME: &'static str;
    fn device() -> Device<Self>;
}

impl Mode for Tracked {
    const NAME: &'static str = "tracked";
    fn device() -> Device<Self> {
        Device::new(NoopOps)
    }
}

impl Mode for Untracked {
    const NAME: &'static str = "untracked";
    fn device() -> Device<Self> {
        Device::new_untracked(NoopOps)
    }
}

/// Pages carved out of one large, never-touched allocation: a page source
/// that costs a lock and a pointer pop, and touches no page memory. Used
/// where the page allocator is not what is measured (unbind setup, the
/// pool's own slow-path overhead).
struct Arena {
    free: Mutex<Vec<usize>>,
}

/// Pages in the arena: 1 M for the largest unbind, plus slack.
const ARENA_PAGES: usize = (1 << 20) + 4096;

fn arena() -> &'static Arena {
    static ARENA: OnceLock<Arena> = OnceLock::new();
    ARENA.get_or_init(|| {
        let layout = Layout::from_size_align(ARENA_PAGES * PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: non-zero size. Never freed: the arena lives for the process.
        // The kernel backs it lazily; nothing here touches the pages.
        let base = unsafe { std::alloc::alloc(layout) };
        assert!(!base.is_null(), "arena allocation failed");
        let free = (0..ARENA_PAGES)
            .rev()
            .map(|i| base as usize + i * PAGE_SIZE)
            .collect();
        Arena {
            free: Mutex::new(free),
        }
    })
}

#[derive(Clone, Copy)]
struct ArenaPages;

// SAFETY: every block is a distinct, page-aligned 4 KiB piece of one live
// allocation that is never freed; a block is handed out at most once until
// it is given back.
unsafe impl PageSource for ArenaPages {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        assert_eq!(order, 0, "the arena hands out order-0 pages only");
        let addr = arena().free.lock().unwrap().pop().ok_or(OutOfMemory)?;
        NonNull::new(addr as *mut u8).ok_or(OutOfMemory)
    }

    unsafe fn free_pages(&self, block: NonNull<u8>, _order: u32) {
        arena().free.lock().unwrap().push(block.as_ptr() as usize);
    }
}

/// Regions carved out of one large, never-touched allocation, as
/// [`ArenaPages`] for pages: a lock and a pointer pop per region.
struct RegionArena {
    free: Mutex<Vec<usize>>,
}

/// 2 MiB regions in the arena: 1 M pages for the largest unbind, plus
/// slack.
const ARENA_REGIONS: usize = (1 << 20) / (DEFAULT_REGION_SIZE / PAGE_SIZE) + 16;

fn region_arena() -> &'static RegionArena {
    static ARENA: OnceLock<RegionArena> = OnceLock::new();
    ARENA.get_or_init(|| {
        let layout =
            Layout::from_size_align(ARENA_REGIONS * DEFAULT_REGION_SIZE, DEFAULT_REGION_SIZE)
                .unwrap();
        // SAFETY: non-zero size. Never freed: the arena lives for the process.
        // The kernel backs it lazily; nothing here touches the pages.
        let base = unsafe { std::alloc::alloc(layout) };
        assert!(!base.is_null(), "region arena allocation failed");
        let free = (0..ARENA_REGIONS)
            .rev()
            .map(|i| base as usize + i * DEFAULT_REGION_SIZE)
            .collect();
        RegionArena {
            free: Mutex::new(free),
        }
    })
}

#[derive(Clone, Copy)]
struct ArenaRegions;

// SAFETY: every block is a distinct, 2 MiB-aligned 2 MiB piece of one live
// allocation that is never freed; a block is handed out at most once until
// it is given back.
unsafe impl RegionSource for ArenaRegions {
    fn alloc_region(&self, len: usize) -> Result<RegionBlock, OutOfMemory> {
        assert_eq!(
            len, DEFAULT_REGION_SIZE,
            "the arena hands out 2 MiB regions"
        );
        let addr = region_arena()
            .free
            .lock()
            .unwrap()
            .pop()
            .ok_or(OutOfMemory)?;
        Ok(RegionBlock {
            ptr: NonNull::new(addr as *mut u8).ok_or(OutOfMemory)?,
            backing: RegionBacking::User,
        })
    }

    unsafe fn free_region(&self, block: RegionBlock, _len: usize) {
        region_arena()
            .free
            .lock()
            .unwrap()
            .push(block.ptr.as_ptr() as usize);
    }
}

/// [`NoopOps`] whose `map` spins for [`SPIN_MAP`]: an IOMMU map with a
/// realistic price (the kernel's IOMMU benchmark reports about 1 µs per
/// small mapping).
struct SpinMapOps;

/// How long one [`SpinMapOps::map`] spins.
const SPIN_MAP: Duration = Duration::from_micros(1);

impl DmaOps for SpinMapOps {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        let start = Instant::now();
        while start.elapsed() < SPIN_MAP {
            std::hint::spin_loop();
        }
        // SAFETY: forwarded contract.
        unsafe { NoopOps.map(cpu, len, direction) }
    }
    unsafe fn unmap(&self, _mapping: DmaMapping) -> Result<(), UnmapError> {
        Ok(())
    }
    unsafe fn sync_for_device(&self, _mapping: DmaMapping, _offset: usize, _len: usize) {}
    unsafe fn sync_for_cpu(&self, _mapping: DmaMapping, _offset: usize, _len: usize) {}
}

// ---------------------------------------------------------------------------
// The peers' buffers: 4 KiB, page-aligned, from the global allocator.

#[repr(C, align(4096))]
struct PageBuf([u8; PAGE_SIZE]);

fn new_buf() -> Box<PageBuf> {
    let layout = Layout::new::<PageBuf>();
    // SAFETY: `PageBuf` has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<PageBuf>();
    assert!(!p.is_null(), "out of memory");
    // SAFETY: the block is non-null, zeroed (a valid `PageBuf`) and has
    // `PageBuf`'s layout, so the Box may own and free it.
    unsafe { Box::from_raw(p) }
}

/// sharded-slab pools need `Default + Clear`; clearing keeps the buffer.
struct SlabBuf(Box<PageBuf>);

impl Default for SlabBuf {
    fn default() -> Self {
        SlabBuf(new_buf())
    }
}

impl sharded_slab::Clear for SlabBuf {
    fn clear(&mut self) {}
}

fn page_layout() -> Layout {
    Layout::from_size_align(PAGE_SIZE, PAGE_SIZE).unwrap()
}

/// A raw buffer pointer that may cross threads (for the global allocator
/// and the transport floor).
struct SendPtr(NonNull<u8>);
// SAFETY: it is only an address handed from one thread to another, which
// then owns (frees) or ignores it.
unsafe impl Send for SendPtr {}

/// The `Mutex<Vec<_>>` pool, as object-pool builds it.
struct MutexPool<M> {
    items: M,
}

type StdMutexPool = MutexPool<Mutex<Vec<Box<PageBuf>>>>;
type PlMutexPool = MutexPool<parking_lot::Mutex<Vec<Box<PageBuf>>>>;

impl StdMutexPool {
    fn new(n: usize) -> Self {
        Self {
            items: Mutex::new((0..n).map(|_| new_buf()).collect()),
        }
    }
    #[inline]
    fn get(&self) -> Box<PageBuf> {
        let popped = self.items.lock().unwrap().pop();
        popped.unwrap_or_else(new_buf)
    }
    #[inline]
    fn put(&self, b: Box<PageBuf>) {
        self.items.lock().unwrap().push(b);
    }
}

impl PlMutexPool {
    fn new(n: usize) -> Self {
        Self {
            items: parking_lot::Mutex::new((0..n).map(|_| new_buf()).collect()),
        }
    }
    #[inline]
    fn get(&self) -> Box<PageBuf> {
        let popped = self.items.lock().pop();
        popped.unwrap_or_else(new_buf)
    }
    #[inline]
    fn put(&self, b: Box<PageBuf>) {
        self.items.lock().push(b);
    }
}

/// The crossbeam `ArrayQueue` pool: pop or allocate, push or free.
struct QueuePool(ArrayQueue<Box<PageBuf>>);

impl QueuePool {
    fn new(capacity: usize, n: usize) -> Self {
        let q = ArrayQueue::new(capacity);
        for _ in 0..n {
            let _ = q.push(new_buf());
        }
        Self(q)
    }
    #[inline]
    fn get(&self) -> Box<PageBuf> {
        self.0.pop().unwrap_or_else(new_buf)
    }
    #[inline]
    fn put(&self, b: Box<PageBuf>) {
        let _ = self.0.push(b);
    }
}

/// One buffer of a [`PremappedPool`]: its memory and its device address.
/// Raw, not a `Box`: memory the device may write is never behind a Rust
/// reference while it is mapped, except while the CPU owns it.
struct PremappedBuf {
    cpu: NonNull<u8>,
    dma: DmaAddr,
}

// SAFETY: an owned buffer's address and device address, handed from one
// thread to another, which then owns the buffer.
unsafe impl Send for PremappedBuf {}

impl PremappedBuf {
    /// The buffer for the CPU (the holder owns it and the device is not
    /// writing it: the pipeline's "device" write happens through here).
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `cpu` is a live `PAGE_SIZE` allocation of the pool, owned
        // by this handle; `&mut self` makes the view exclusive.
        unsafe { core::slice::from_raw_parts_mut(self.cpu.as_ptr(), PAGE_SIZE) }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: as in `as_mut_slice`; `&self` rules out a `&mut` view.
        unsafe { core::slice::from_raw_parts(self.cpu.as_ptr(), PAGE_SIZE) }
    }
}

/// The hand-written alternative to pagepool a driver author would write: a
/// fixed set of page buffers mapped once at start through the same
/// [`DmaOps`] the pool uses (held as `Box<dyn DmaOps>`, as the pool holds
/// it), an `ArrayQueue` of (buffer, device address), and syncs through the
/// same ops where the device needs them (`needs_sync`, read once). No
/// tracking, no unbind, no checks: buffers are unmapped when the pool is
/// dropped, whoever still holds one.
struct PremappedPool {
    ops: Box<dyn DmaOps>,
    needs_sync: bool,
    free: ArrayQueue<PremappedBuf>,
    /// Every buffer and its device address, for the drop.
    all: Vec<(NonNull<u8>, DmaAddr)>,
}

// SAFETY: the pointers in `all` are only used by `drop`; the ops are used
// through `&self` from any thread, as pagepool's device uses them.
unsafe impl Sync for PremappedPool {}

impl PremappedPool {
    /// `n` buffers, each allocated and mapped now.
    fn new(ops: impl DmaOps, n: usize) -> Self {
        let ops: Box<dyn DmaOps> = Box::new(ops);
        let needs_sync = ops.needs_sync();
        let free = ArrayQueue::new(n);
        let mut all = Vec::with_capacity(n);
        for _ in 0..n {
            // SAFETY: non-zero size.
            let cpu = NonNull::new(unsafe { std::alloc::alloc_zeroed(page_layout()) })
                .expect("out of memory");
            // SAFETY: `cpu` is a fresh `PAGE_SIZE` allocation, kept until
            // it is unmapped in `drop`; no reference to it exists.
            let dma = unsafe { ops.map(cpu, PAGE_SIZE, DmaDirection::FromDevice) }.unwrap();
            all.push((cpu, dma));
            free.push(PremappedBuf { cpu, dma }).ok().unwrap();
        }
        Self {
            ops,
            needs_sync,
            free,
            all,
        }
    }

    #[inline]
    fn get(&self) -> PremappedBuf {
        self.free
            .pop()
            .expect("the premapped pool is sized for the bench")
    }

    #[inline]
    fn put(&self, buf: PremappedBuf) {
        let _ = self.free.push(buf);
    }

    /// Hands `range` of `buf` to the CPU, through the ops if the device
    /// needs syncs.
    #[inline]
    fn sync_for_cpu(&self, buf: &mut PremappedBuf, len: usize) {
        if self.needs_sync {
            let mapping = DmaMapping {
                addr: buf.dma,
                len: PAGE_SIZE,
                direction: DmaDirection::FromDevice,
            };
            // SAFETY: the buffer is mapped (until the pool drops) with this
            // exact mapping, `len <= PAGE_SIZE`, and `&mut buf` rules out a
            // CPU reference to it.
            unsafe { self.ops.sync_for_cpu(mapping, 0, len) };
        }
    }
}

impl Drop for PremappedPool {
    fn drop(&mut self) {
        while self.free.pop().is_some() {}
        for &(cpu, dma) in &self.all {
            let mapping = DmaMapping {
                addr: dma,
                len: PAGE_SIZE,
                direction: DmaDirection::FromDevice,
            };
            // SAFETY: mapped once in `new` with this mapping, unmapped once;
            // every buffer handle is gone (the benches return them all).
            if unsafe { self.ops.unmap(mapping) }.is_ok() {
                // SAFETY: allocated in `new` with this layout, now unmapped.
                unsafe { std::alloc::dealloc(cpu.as_ptr(), page_layout()) };
            }
            // A failed unmap leaves the device able to reach the buffer: its
            // memory is kept (leaked), as the pool keeps such memory.
        }
    }
}

fn lfop_linear() -> LinearObjectPool<Box<PageBuf>> {
    LinearObjectPool::new(new_buf, |_| {})
}

fn lfop_spinlock() -> SpinLockObjectPool<Box<PageBuf>> {
    SpinLockObjectPool::new(new_buf, |_| {})
}

// ---------------------------------------------------------------------------
// One thread, alloc + free.

fn pool_fast<M: Mode>(c: &mut Group<'_>) {
    let device = M::device();
    let mut pool = device.pool_builder().build().unwrap();
    // Warm up: the first alloc maps a batch; afterwards all is local cache.
    let p = pool.alloc().unwrap();
    pool.recycle_direct(p);
    c.bench_function(BenchmarkId::new("pagepool_fast", M::NAME), |b| {
        b.iter(|| {
            for _ in 0..OPS {
                let page = pool.alloc().unwrap();
                pool.recycle_direct(black_box(page));
            }
        })
    });
    assert_eq!(
        pool.stats().alloc.slow,
        1,
        "the fast path bench left the cache"
    );
}

fn single_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("single_thread");
    g.throughput(Throughput::Elements(OPS));

    pool_fast::<Tracked>(&mut g);
    pool_fast::<Untracked>(&mut g);

    // The floor: a Vec of pointers, pop + push.
    let mut v: Vec<NonNull<u8>> = Vec::with_capacity(128);
    let bufs: Vec<Box<PageBuf>> = (0..64).map(|_| new_buf()).collect();
    v.extend(bufs.iter().map(|b| NonNull::from(&**b).cast::<u8>()));
    g.bench_function("vec_floor", |b| {
        b.iter(|| {
            for _ in 0..OPS {
                let p = black_box(&mut v).pop().unwrap();
                black_box(&mut v).push(black_box(p));
            }
        })
    });

    let pool = StdMutexPool::new(64);
    g.bench_function("peer/mutex_vec_std", |b| {
        b.iter(|| {
            for _ in 0..OPS {
                let buf = pool.get();
                pool.put(black_box(buf));
            }
        })
    });

    let pool = PlMutexPool::new(64);
    g.bench_function("peer/mutex_vec_parking_lot", |b| {
        b.iter(|| {
            for _ in 0..OPS {
                let buf = pool.get();
                pool.put(black_box(buf));
            }
        })
    });

    let pool = QueuePool::new(1024, 64);
    g.bench_function("peer/crossbeam_array_queue", |b| {
        b.iter(|| {
            for _ in 0..OPS {
                let buf = pool.get();
                pool.put(black_box(buf));
            }
        })
    });

    let slab: sharded_slab::Pool<SlabBuf> = sharded_slab::Pool::new();
    g.bench_function("peer/sharded_slab_pool", |b| {
        b.iter(|| {
            for _ in 0..OPS {
                let key = {
                    let mut r = slab.create().unwrap();
                    black_box(&mut r.0);
                    r.key()
                };
                slab.clear(black_box(key));
            }
        })
    });

    let pool = lfop_linear();
    g.bench_function("peer/lockfree_linear", |b| {
        b.iter(|| {
            for _ in 0..OPS {
                let r = pool.pull();
                drop(black_box(r));
            }
        })
    });

    let pool = lfop_spinlock();
    g.bench_function("peer/lockfree_spinlock", |b| {
        b.iter(|| {
            for _ in 0..OPS {
                let r = pool.pull();
                drop(black_box(r));
            }
        })
    });

    let layout = page_layout();
    g.bench_function("peer/global_alloc", |b| {
        b.iter(|| {
            for _ in 0..OPS {
                // SAFETY: non-zero size.
                let p = unsafe { std::alloc::alloc(layout) };
                // SAFETY: allocated just above with the same layout.
                unsafe { std::alloc::dealloc(black_box(p), layout) };
            }
        })
    });
    g.finish();
    drop(bufs);
}

// ---------------------------------------------------------------------------
// The ring path, one thread.

/// Alloc + drop on the owner thread; `remote_batch` as the builder takes
/// it (the default batches drops per thread, 0 pushes each into the ring).
fn pool_ring<M: Mode>(g: &mut Group<'_>, remote_batch: usize) {
    let device = M::device();
    let mut pool = device
        .pool_builder()
        .remote_batch(remote_batch)
        .build()
        .unwrap();
    drop(pool.alloc().unwrap());
    let name = if remote_batch > 1 {
        "pagepool_ring"
    } else {
        "pagepool_ring_unbatched"
    };
    g.bench_function(BenchmarkId::new(name, M::NAME), |b| {
        b.iter(|| {
            for _ in 0..OPS {
                let page = pool.alloc().unwrap();
                // Dropped, not recycled directly: through this thread's
                // remote batch into the shared ring; the cache refills from
                // it 64 pages at a time.
                drop(black_box(page));
            }
        })
    });
    let s = pool.stats();
    assert_eq!(s.alloc.slow, 1, "the ring bench mapped pages: {s:?}");
    assert_eq!(s.recycle.ring_full, 0, "the ring bench overflowed: {s:?}");
}

fn ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(OPS));
    pool_ring::<Tracked>(&mut g, pagepool::DEFAULT_REMOTE_BATCH);
    pool_ring::<Untracked>(&mut g, pagepool::DEFAULT_REMOTE_BATCH);
    pool_ring::<Tracked>(&mut g, 0);
    pool_ring::<Untracked>(&mut g, 0);
    g.finish();
}

// ---------------------------------------------------------------------------
// The slow path.

/// Every alloc maps a fresh page, every release unmaps and frees it: a ring
/// of one page and rounds of `SLOW_ROUND` allocs then drops. Per round one
/// alloc takes the page the ring kept and one drop puts a page there; the
/// other `SLOW_ROUND - 1` of each map and unmap (checked below).
fn pool_slow<M: Mode, S: PageSource + Copy>(
    g: &mut Group<'_>,
    name: &str,
    source: S,
    cache: usize,
) {
    let device = M::device();
    let mut pool: PagePool<M> = device
        .pool_builder()
        .cache_size(cache)
        .refill_batch(cache)
        .ring_size(1)
        .page_source(source)
        .build()
        .unwrap();
    let mut held: Vec<Page<M>> = Vec::with_capacity(SLOW_ROUND);
    let mut allocs = 0u64;
    g.bench_function(BenchmarkId::new(name, M::NAME), |b| {
        b.iter_custom(|iters| {
            allocs += iters;
            let start = Instant::now();
            let mut left = iters as usize;
            while left > 0 {
                let n = left.min(SLOW_ROUND);
                for _ in 0..n {
                    held.push(pool.alloc().unwrap());
                }
                held.clear();
                left -= n;
            }
            start.elapsed()
        })
    });
    let s = pool.stats();
    let mapped = s.alloc.slow * if cache == 1 { 1 } else { cache as u64 };
    let released = s.recycle.ring_full;
    eprintln!(
        "slow/{name}/{}: {:.1}% of allocs mapped a fresh page, {:.1}% of releases unmapped",
        M::NAME,
        100.0 * mapped.min(allocs) as f64 / allocs as f64,
        100.0 * released as f64 / allocs as f64
    );
    drop(pool);
}

fn slow(c: &mut Criterion) {
    let mut g = c.benchmark_group("slow");
    g.throughput(Throughput::Elements(1));
    // Cache of 1, refill of 1: one page mapped per alloc.
    pool_slow::<Tracked, _>(&mut g, "global_pages", pagepool::GlobalPages, 1);
    pool_slow::<Untracked, _>(&mut g, "global_pages", pagepool::GlobalPages, 1);
    pool_slow::<Tracked, _>(&mut g, "arena", ArenaPages, 1);
    pool_slow::<Untracked, _>(&mut g, "arena", ArenaPages, 1);
    // Linux maps in bulk, 64 pages per refill.
    pool_slow::<Tracked, _>(&mut g, "arena_batch64", ArenaPages, 64);
    pool_slow::<Untracked, _>(&mut g, "arena_batch64", ArenaPages, 64);
    g.finish();
}

// ---------------------------------------------------------------------------
// Cross-thread.
//
// Two measurements, both "alloc on one thread, free on another":
//
// - phased (`cross_thread`, `cross_thread_bulk64`): per round this thread
//   allocates `ROUND` items (timed), hands them to a second thread, which
//   frees them (timed there), and waits for it. The sum of the two timed
//   phases is the CPU work per page, cache-line transfers between the cores
//   included. It does not need both threads on a core at the same moment,
//   so it is repeatable on a shared machine.
// - streaming (`cross_thread_streaming`): both threads run at once, items
//   handed over in bursts of 64 through a bounded queue; wall time per page.
//   This is the RX-thread / consumer-thread pipeline, and it needs two idle
//   cores: on a loaded machine it measures the scheduler (see BENCHMARKS.md).

/// Items per round of the phased bench: under the ring's 1024, so every
/// page freed on the other thread goes back through the ring.
const ROUND: usize = 512;

/// The set of `cpus` (those below `CPU_SETSIZE`).
#[cfg(target_os = "linux")]
fn cpu_set(cpus: impl IntoIterator<Item = usize>) -> libc::cpu_set_t {
    // SAFETY: `cpu_set_t` is a plain bit array: all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    for cpu in cpus.into_iter().filter(|&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: `cpu` is below `CPU_SETSIZE`, so the bit lies in `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    set
}

/// Lets the calling thread run on the CPUs of `set` only.
#[cfg(target_os = "linux")]
fn set_affinity(set: &libc::cpu_set_t) -> bool {
    // SAFETY: pid 0 is the calling thread; `set` is a valid set of the size
    // passed; the call changes only this thread's affinity.
    unsafe { libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), set) == 0 }
}

/// Pins the calling thread to CPU `cpu` (Linux; elsewhere, or if the
/// machine has fewer CPUs, it stays where the scheduler puts it). Returns
/// whether it did.
fn pin_to_cpu(cpu: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        set_affinity(&cpu_set([cpu]))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpu;
        false
    }
}

/// Lets the calling thread run on every CPU again.
fn unpin() {
    #[cfg(target_os = "linux")]
    set_affinity(&cpu_set(
        0..thread::available_parallelism().map_or(1, |n| n.get()),
    ));
}

/// The phased measurement. The producer runs on CPU 0 and the consumer on
/// CPU 1 (where the machine has two), so every round moves the items'
/// cache lines from one core to the other, as in a driver whose RX thread
/// and consumer run on different cores; left to the scheduler, the two
/// threads sometimes share a core and the figures jump between runs.
fn phased<T: Send>(
    iters: u64,
    mut alloc: impl FnMut(&mut Vec<T>, usize),
    mut free: impl FnMut(&mut Vec<T>) + Send,
) -> Duration {
    let (to_consumer, from_producer) = mpsc::sync_channel::<Vec<T>>(1);
    let (to_producer, from_consumer) = mpsc::sync_channel::<(Vec<T>, Duration)>(1);
    let pinned = pin_to_cpu(0);
    let total = phased_pinned(
        iters,
        &mut alloc,
        &mut free,
        to_consumer,
        from_producer,
        to_producer,
        from_consumer,
    );
    if pinned {
        unpin();
    }
    total
}

fn phased_pinned<T: Send>(
    iters: u64,
    alloc: &mut impl FnMut(&mut Vec<T>, usize),
    free: &mut (impl FnMut(&mut Vec<T>) + Send),
    to_consumer: mpsc::SyncSender<Vec<T>>,
    from_producer: mpsc::Receiver<Vec<T>>,
    to_producer: mpsc::SyncSender<(Vec<T>, Duration)>,
    from_consumer: mpsc::Receiver<(Vec<T>, Duration)>,
) -> Duration {
    thread::scope(|s| {
        s.spawn(move || {
            pin_to_cpu(1);
            for mut items in from_producer {
                let start = Instant::now();
                mark(CONSUMER);
                free(&mut items);
                mark(IDLE);
                let took = start.elapsed();
                assert!(items.is_empty(), "the consumer freed every item");
                to_producer.send((items, took)).unwrap();
            }
        });
        let mut items = Vec::with_capacity(ROUND);
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let n = left.min(ROUND as u64) as usize;
            let start = Instant::now();
            mark(PRODUCER);
            alloc(&mut items, n);
            mark(IDLE);
            total += start.elapsed();
            to_consumer.send(items).unwrap();
            let (back, took) = from_consumer.recv().unwrap();
            total += took;
            items = back;
            left -= n as u64;
        }
        drop(to_consumer);
        total
    })
}

/// Where the phased workloads run: under criterion, or once, for the
/// memory tracer that counts the cache lines each side hands the other
/// (`PAGEPOOL_COUNT=lines:<id>:<n>`, see [`count_lines`]).
enum Runner<'a, 'c> {
    Bench(&'a mut Group<'c>),
    /// Runs only the workload named `id` (`group/name`), `iters` packets.
    Trace {
        group: &'static str,
        id: &'a str,
        iters: u64,
    },
}

impl Runner<'_, '_> {
    fn run(&mut self, name: impl Into<String>, mut workload: impl FnMut(u64) -> Duration) {
        let name = name.into();
        match self {
            Runner::Bench(g) => {
                g.bench_function(name, |b| b.iter_custom(&mut workload));
            }
            Runner::Trace { group, id, iters } => {
                if format!("{group}/{name}") == *id {
                    workload(*iters);
                }
            }
        }
    }
}

/// Phase markers for the memory tracer: `phased` loads one of these when a
/// side starts its half of a round and [`IDLE`] when it is done, so a trace
/// of the process's memory accesses says which side made each access.
static PHASE_MARKERS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
const PRODUCER: usize = 0;
const CONSUMER: usize = 1;
const IDLE: usize = 2;

/// Marks the start of a phase (one load, once per round: nothing next to
/// a round of 512 packets).
#[inline(always)]
fn mark(phase: usize) {
    black_box(PHASE_MARKERS[phase].load(Ordering::Relaxed));
}

fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        *spins = 0;
        thread::yield_now();
    }
}

/// Streaming: `iters` items made one at a time by `alloc` on this thread,
/// handed over in bursts of `BURST` through a bounded queue to a second
/// thread running at the same time, which frees each burst with `free`.
/// Wall time from both threads being ready to the last burst freed.
fn streaming<T: Send>(
    iters: u64,
    mut alloc: impl FnMut() -> T,
    mut free: impl FnMut(&mut Vec<T>) + Send,
) -> Duration {
    // At most BURSTS_IN_FLIGHT + 2 bursts (640 pages) between the threads,
    // so the pool's ring (1024) takes every page back; more in flight than
    // ring + cache would churn the slow path.
    let full: ArrayQueue<Vec<T>> = ArrayQueue::new(BURSTS_IN_FLIGHT);
    let empty: ArrayQueue<Vec<T>> = ArrayQueue::new(BURSTS_IN_FLIGHT + 2);
    for _ in 0..BURSTS_IN_FLIGHT + 2 {
        empty.push(Vec::with_capacity(BURST)).ok().unwrap();
    }
    let bursts = iters.div_ceil(BURST as u64);
    let ready = AtomicBool::new(false);
    thread::scope(|s| {
        let (full, empty, ready) = (&full, &empty, &ready);
        let consumer = s.spawn(move || {
            ready.store(true, Ordering::Release);
            let mut spins = 0;
            let mut n = 0;
            while n < bursts {
                match full.pop() {
                    Some(mut burst) => {
                        free(&mut burst);
                        assert!(burst.is_empty(), "the consumer freed every item");
                        empty.push(burst).ok().unwrap();
                        n += 1;
                    }
                    None => backoff(&mut spins),
                }
            }
        });
        while !ready.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        let start = Instant::now();
        let mut spins = 0;
        let mut left = iters;
        for _ in 0..bursts {
            let mut burst = loop {
                match empty.pop() {
                    Some(b) => break b,
                    None => backoff(&mut spins),
                }
            };
            let n = left.min(BURST as u64);
            for _ in 0..n {
                burst.push(alloc());
            }
            left -= n;
            while let Err(back) = full.push(burst) {
                burst = back;
                backoff(&mut spins);
            }
        }
        consumer.join().unwrap();
        start.elapsed()
    })
}

/// Frees pages in bursts of up to `BURST` with `put_bulk`.
fn put_bulk_bursts<M: TrackingMode>(pages: &mut Vec<Page<M>>) {
    while !pages.is_empty() {
        let from = pages.len().saturating_sub(BURST);
        put_bulk(pages.drain(from..));
    }
}

fn report_pool<M: Mode>(what: &str, pool: &PagePool<M>) {
    let s = pool.stats();
    eprintln!(
        "{what}/{}: {} slow refills, {} ring refills, {} pages released for a full ring",
        M::NAME,
        s.alloc.slow,
        s.alloc.refill,
        s.recycle.ring_full
    );
}

/// How the phased pool bench allocates and frees.
#[derive(Clone, Copy, PartialEq)]
enum Burst {
    /// `alloc` one page at a time; pages dropped one at a time.
    Single,
    /// `alloc` one page at a time; `put_bulk` in bursts of `BURST`.
    PutBulk,
    /// `alloc_bulk` and `put_bulk`, both in bursts of `BURST`: the shape of
    /// the bulk `Mutex<Vec>` peer (one lock per burst on each side).
    Both,
}

fn pool_phased<M: Mode>(r: &mut Runner<'_, '_>, burst: Burst) {
    pool_phased_batched::<M>(r, burst, pagepool::DEFAULT_REMOTE_BATCH);
}

/// [`pool_phased`] with the pool's remote batch set to `remote_batch`
/// (0: every page dropped goes to the ring under its own lock).
fn pool_phased_batched<M: Mode>(r: &mut Runner<'_, '_>, burst: Burst, remote_batch: usize) {
    let device = M::device();
    let mut pool = device
        .pool_builder()
        .remote_batch(remote_batch)
        .build()
        .unwrap();
    let name = match (burst, remote_batch) {
        (Burst::PutBulk, _) => "pagepool_put_bulk".to_string(),
        (Burst::Both, _) => "pagepool_alloc_bulk_put_bulk".to_string(),
        (Burst::Single, pagepool::DEFAULT_REMOTE_BATCH) => "pagepool".to_string(),
        (Burst::Single, 0) => "pagepool_unbatched".to_string(),
        (Burst::Single, n) => format!("pagepool_batch{n}"),
    };
    r.run(format!("{}/{}", name.as_str(), M::NAME), |iters| {
        phased(
            iters,
            |items, n| {
                if burst == Burst::Both {
                    while items.len() < n {
                        let k = (n - items.len()).min(BURST);
                        pool.alloc_bulk(items, k).unwrap();
                    }
                } else {
                    items.extend((0..n).map(|_| pool.alloc().unwrap()))
                }
            },
            |items| {
                if burst == Burst::Single {
                    items.clear()
                } else {
                    put_bulk_bursts(items)
                }
            },
        )
    });
    report_pool(&format!("phased/{name}"), &pool);
    assert_eq!(
        pool.stats().recycle.ring_full,
        0,
        "every page came back through the ring"
    );
}

fn pool_streaming<M: Mode>(g: &mut Group<'_>, bulk: bool) {
    let device = M::device();
    let mut pool = device.pool_builder().build().unwrap();
    let name = if bulk {
        "pagepool_put_bulk"
    } else {
        "pagepool"
    };
    g.bench_function(BenchmarkId::new(name, M::NAME), |b| {
        b.iter_custom(|iters| {
            streaming(
                iters,
                || pool.alloc().unwrap(),
                |burst| {
                    if bulk {
                        put_bulk(burst.drain(..))
                    } else {
                        burst.clear()
                    }
                },
            )
        })
    });
    report_pool(&format!("streaming/{name}"), &pool);
}

fn floor_ptr() -> SendPtr {
    SendPtr(NonNull::from(black_box(&0u8)).cast())
}

fn cross_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_thread");
    g.throughput(Throughput::Elements(1));
    cross_thread_phased(&mut Runner::Bench(&mut g));
    g.finish();

    let mut g = c.benchmark_group("cross_thread_bulk64");
    g.throughput(Throughput::Elements(1));
    cross_thread_bulk64(&mut Runner::Bench(&mut g));
    g.finish();

    cross_thread_streaming(c);
}

/// The `cross_thread` group: single allocs and single drops, phased.
fn cross_thread_phased(r: &mut Runner<'_, '_>) {
    pool_phased::<Tracked>(r, Burst::Single);
    pool_phased::<Untracked>(r, Burst::Single);
    // The same without per-thread batches, and with batches of 32.
    pool_phased_batched::<Tracked>(r, Burst::Single, 0);
    pool_phased_batched::<Tracked>(r, Burst::Single, 32);

    r.run("transport_floor", |iters| {
        phased(
            iters,
            |items, n| items.extend((0..n).map(|_| floor_ptr())),
            |items| {
                items.drain(..).for_each(|p| {
                    black_box(p);
                })
            },
        )
    });

    let pool = StdMutexPool::new(ROUND);
    r.run("peer/mutex_vec_std", |iters| {
        phased(
            iters,
            |items, n| items.extend((0..n).map(|_| pool.get())),
            |items| items.drain(..).for_each(|x| pool.put(x)),
        )
    });

    let pool = PlMutexPool::new(ROUND);
    r.run("peer/mutex_vec_parking_lot", |iters| {
        phased(
            iters,
            |items, n| items.extend((0..n).map(|_| pool.get())),
            |items| items.drain(..).for_each(|x| pool.put(x)),
        )
    });

    let pool = QueuePool::new(2 * ROUND, ROUND);
    r.run("peer/crossbeam_array_queue", |iters| {
        phased(
            iters,
            |items, n| items.extend((0..n).map(|_| pool.get())),
            |items| items.drain(..).for_each(|x| pool.put(x)),
        )
    });

    let pool = PremappedPool::new(NoopOps, 2 * ROUND);
    r.run("peer/premapped_array_queue", |iters| {
        phased(
            iters,
            |items, n| items.extend((0..n).map(|_| pool.get())),
            |items| items.drain(..).for_each(|x| pool.put(x)),
        )
    });

    let slab: sharded_slab::Pool<SlabBuf> = sharded_slab::Pool::new();
    r.run("peer/sharded_slab_pool", |iters| {
        phased(
            iters,
            |keys, n| {
                keys.extend((0..n).map(|_| {
                    let mut r = slab.create().unwrap();
                    black_box(&mut r.0);
                    r.key()
                }))
            },
            |keys| {
                keys.drain(..).for_each(|k| {
                    slab.clear(k);
                })
            },
        )
    });

    let pool = lfop_linear();
    r.run("peer/lockfree_linear", |iters| {
        phased(
            iters,
            |items, n| items.extend((0..n).map(|_| pool.pull())),
            |items| items.clear(),
        )
    });

    let pool = lfop_spinlock();
    r.run("peer/lockfree_spinlock", |iters| {
        phased(
            iters,
            |items, n| items.extend((0..n).map(|_| pool.pull())),
            |items| items.clear(),
        )
    });

    let layout = page_layout();
    r.run("peer/global_alloc", |iters| {
        phased(
            iters,
            |items, n| {
                items.extend((0..n).map(|_| {
                    // SAFETY: non-zero size.
                    SendPtr(NonNull::new(unsafe { std::alloc::alloc(layout) }).unwrap())
                }))
            },
            |items| {
                items.drain(..).for_each(|p| {
                    // SAFETY: allocated above with this layout, freed once.
                    unsafe { std::alloc::dealloc(p.0.as_ptr(), layout) }
                })
            },
        )
    });
}

/// The `cross_thread_bulk64` group. Bursts of 64: the pool frees with
/// `put_bulk` (one ring lock per burst); of the peers only the Mutex<Vec>
/// pools have a bulk form (one lock per burst on each side). The others'
/// bulk is their single form.
fn cross_thread_bulk64(r: &mut Runner<'_, '_>) {
    pool_phased::<Tracked>(r, Burst::Both);
    pool_phased::<Untracked>(r, Burst::Both);
    pool_phased::<Tracked>(r, Burst::PutBulk);
    pool_phased::<Untracked>(r, Burst::PutBulk);

    let pool = StdMutexPool::new(ROUND);
    r.run("peer/mutex_vec_std", |iters| {
        phased(
            iters,
            |items, n| {
                while items.len() < n {
                    let k = (n - items.len()).min(BURST);
                    let mut held = pool.items.lock().unwrap();
                    items.extend((0..k).map(|_| held.pop().unwrap_or_else(new_buf)));
                }
            },
            |items| {
                while !items.is_empty() {
                    let from = items.len().saturating_sub(BURST);
                    pool.items.lock().unwrap().extend(items.drain(from..));
                }
            },
        )
    });

    let pool = PlMutexPool::new(ROUND);
    r.run("peer/mutex_vec_parking_lot", |iters| {
        phased(
            iters,
            |items, n| {
                while items.len() < n {
                    let k = (n - items.len()).min(BURST);
                    let mut held = pool.items.lock();
                    items.extend((0..k).map(|_| held.pop().unwrap_or_else(new_buf)));
                }
            },
            |items| {
                while !items.is_empty() {
                    let from = items.len().saturating_sub(BURST);
                    pool.items.lock().extend(items.drain(from..));
                }
            },
        )
    });
}

fn cross_thread_streaming(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_thread_streaming");
    g.throughput(Throughput::Elements(1));

    pool_streaming::<Tracked>(&mut g, false);
    pool_streaming::<Untracked>(&mut g, false);
    pool_streaming::<Tracked>(&mut g, true);
    pool_streaming::<Untracked>(&mut g, true);

    g.bench_function("transport_floor", |b| {
        b.iter_custom(|iters| {
            streaming(iters, floor_ptr, |burst| {
                burst.drain(..).for_each(|p| {
                    black_box(p);
                })
            })
        })
    });

    let pool = PlMutexPool::new(2048);
    g.bench_function("peer/mutex_vec_parking_lot", |b| {
        b.iter_custom(|iters| {
            streaming(
                iters,
                || pool.get(),
                |burst| burst.drain(..).for_each(|x| pool.put(x)),
            )
        })
    });
    g.bench_function("peer/mutex_vec_parking_lot_bulk", |b| {
        b.iter_custom(|iters| {
            streaming(
                iters,
                || pool.get(),
                |burst| pool.items.lock().append(burst),
            )
        })
    });

    let pool = QueuePool::new(2048, 2048);
    g.bench_function("peer/crossbeam_array_queue", |b| {
        b.iter_custom(|iters| {
            streaming(
                iters,
                || pool.get(),
                |burst| burst.drain(..).for_each(|x| pool.put(x)),
            )
        })
    });

    let pool = lfop_linear();
    g.bench_function("peer/lockfree_linear", |b| {
        b.iter_custom(|iters| streaming(iters, || pool.pull(), |burst| burst.clear()))
    });
    g.finish();
}

// ---------------------------------------------------------------------------
// The RX loop's per-packet sync: alloc + `sync_for_cpu(0..64)` +
// `recycle_direct`, against the fast path alone, in one group.

/// Bytes of each received page synced for the CPU (a frame's headers).
const RX_SYNC: usize = 64;

fn rx_loop<M: TrackingMode>(pool: &mut PagePool<M>, ops: u64) {
    for _ in 0..ops {
        let mut page = pool.alloc().unwrap();
        page.sync_for_cpu(0..RX_SYNC).unwrap();
        pool.recycle_direct(black_box(page));
    }
}

fn fast_loop<M: TrackingMode>(pool: &mut PagePool<M>, ops: u64) {
    for _ in 0..ops {
        let page = pool.alloc().unwrap();
        pool.recycle_direct(black_box(page));
    }
}

fn warm<M: TrackingMode>(pool: &mut PagePool<M>) {
    let page = pool.alloc().unwrap();
    pool.recycle_direct(page);
}

fn sync(c: &mut Criterion) {
    let mut g = c.benchmark_group("sync");
    g.throughput(Throughput::Elements(OPS));
    let device = Device::new(NoopOps);
    let mut pool = device.pool_builder().build().unwrap();
    warm(&mut pool);
    g.bench_function("fast_path", |b| b.iter(|| fast_loop(&mut pool, OPS)));
    let coherent = Device::new(CoherentOps);
    let mut coherent_pool = coherent.pool_builder().build().unwrap();
    warm(&mut coherent_pool);
    g.bench_function("rx_loop/no_sync_needed", |b| {
        b.iter(|| rx_loop(&mut coherent_pool, OPS))
    });
    g.bench_function("rx_loop/sync_needed", |b| {
        b.iter(|| rx_loop(&mut pool, OPS))
    });
    g.finish();

    // Two RX loops on two threads, one pool each, syncing every page: both
    // pools on one device, or each on its own. Wall time of the slower
    // thread per page; both threads start together behind a barrier.
    let mut g = c.benchmark_group("sync_two_queues");
    g.throughput(Throughput::Elements(OPS));
    for (name, shared_device) in [("one_device", true), ("two_devices", false)] {
        let first = Device::new(NoopOps);
        let second = Device::new(NoopOps);
        let mut pools = [
            first.pool_builder().build().unwrap(),
            if shared_device { &first } else { &second }
                .pool_builder()
                .build()
                .unwrap(),
        ];
        for pool in &mut pools {
            warm(pool);
        }
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = std::sync::Barrier::new(2);
                thread::scope(|s| {
                    let runs: Vec<_> = pools
                        .iter_mut()
                        .map(|pool| {
                            let start = &start;
                            s.spawn(move || {
                                start.wait();
                                let began = Instant::now();
                                rx_loop(pool, iters * OPS);
                                began.elapsed()
                            })
                        })
                        .collect();
                    runs.into_iter()
                        .map(|run| run.join().unwrap())
                        .max()
                        .unwrap()
                })
            })
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------
// Unbind while another thread's slow path maps a batch of 1024 pages, each
// `map` taking 1 ms: unbind waits for the one map in progress, not for the
// batch. Only the `unbind` call is timed.

fn unbind_during_slow_map(c: &mut Criterion) {
    let mut g = c.benchmark_group("unbind_during_slow_map");
    g.sampling_mode(criterion::SamplingMode::Flat);
    g.sample_size(10);
    g.bench_function("batch1024_map1ms", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let mapping = std::sync::Arc::new(AtomicBool::new(false));
                let device = Device::new(SlowMapOps {
                    mapping: std::sync::Arc::clone(&mapping),
                });
                let mut pool = device
                    .pool_builder()
                    .cache_size(1024)
                    .refill_batch(1024)
                    .page_source(ArenaPages)
                    .build()
                    .unwrap();
                thread::scope(|s| {
                    let owner = s.spawn(move || pool.alloc().map(drop));
                    while !mapping.load(Ordering::Acquire) {
                        thread::yield_now();
                    }
                    let start = Instant::now();
                    device.unbind().unwrap();
                    timed += start.elapsed();
                    assert!(owner.join().unwrap().is_err(), "the batch was cut short");
                });
            }
            timed
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------
// Unbind with pages in flight.

fn unbind(c: &mut Criterion) {
    let mut g = c.benchmark_group("unbind");
    g.sampling_mode(criterion::SamplingMode::Flat);
    for (label, pages) in [("1K", 1usize << 10), ("64K", 1 << 16), ("1M", 1 << 20)] {
        g.throughput(Throughput::Elements(pages as u64));
        if pages >= 1 << 20 {
            // Setup (mapping a million pages) dominates: the fewest samples.
            g.sample_size(10);
        }
        g.bench_function(BenchmarkId::new("tracked", label), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut held: Vec<Page> = Vec::with_capacity(pages);
                for _ in 0..iters {
                    let device = Device::new(NoopOps);
                    let mut pool = device
                        .pool_builder()
                        .page_source(ArenaPages)
                        .build()
                        .unwrap();
                    held.extend((0..pages).map(|_| pool.alloc().unwrap()));
                    let start = Instant::now();
                    let report = device.unbind().unwrap();
                    timed += start.elapsed();
                    assert_eq!(report.pages_held_or_cached, pages, "{report}");
                    held.clear();
                    drop(pool);
                }
                timed
            })
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------
// Region-mapped pools against pools mapped page by page.

/// Pages each `slow_fill` round maps and unmaps: 8 regions.
const FILL_PAGES: usize = 8 * DEFAULT_REGION_SIZE / PAGE_SIZE;

/// One `slow_fill` round: a fresh pool hands out `FILL_PAGES` pages from
/// its slow path, then the pages and the pool are dropped, which unmaps
/// everything. Returns the tracker's heap bytes at the peak.
fn fill_round(device: &Device, regions: bool, held: &mut Vec<Page>) -> usize {
    let builder = device.pool_builder().cache_size(64).refill_batch(64);
    let builder = if regions {
        builder.region_source(ArenaRegions)
    } else {
        builder.page_source(ArenaPages)
    };
    let mut pool = builder.build().unwrap();
    held.extend((0..FILL_PAGES).map(|_| pool.alloc().unwrap()));
    let tracker_bytes = device.tracker_heap_bytes();
    held.clear();
    drop(pool);
    tracker_bytes
}

fn slow_fill(g: &mut Group<'_>, backend: &str, ops: fn() -> Device) {
    for (mode, regions) in [("per_page", false), ("region", true)] {
        let mut held: Vec<Page> = Vec::with_capacity(FILL_PAGES);
        // Tracker bytes per page in flight, on a fresh device: what the
        // records cost above the empty tracker.
        let fresh = ops();
        let empty = fresh.tracker_heap_bytes();
        let peak = fill_round(&fresh, regions, &mut held);
        eprintln!(
            "regions/slow_fill/{mode}/{backend}: {:.3} tracker bytes per page in flight",
            (peak - empty) as f64 / FILL_PAGES as f64
        );
        drop(fresh);
        let device = ops();
        g.bench_function(format!("slow_fill/{mode}/{backend}"), |b| {
            b.iter_custom(|iters| {
                // One iteration is one page: whole rounds, the time scaled
                // to the pages asked for.
                let rounds = (iters as usize).div_ceil(FILL_PAGES);
                let start = Instant::now();
                for _ in 0..rounds {
                    fill_round(&device, regions, &mut held);
                }
                start
                    .elapsed()
                    .mul_f64(iters as f64 / (rounds * FILL_PAGES) as f64)
            })
        });
        drop(device);
    }
}

fn regions(c: &mut Criterion) {
    let mut g = c.benchmark_group("regions");
    g.throughput(Throughput::Elements(1));
    slow_fill(&mut g, "noop", || Device::new(NoopOps));
    slow_fill(&mut g, "map1us", || Device::new(SpinMapOps));

    const PAGES: usize = 1 << 20;
    g.throughput(Throughput::Elements(PAGES as u64));
    g.sampling_mode(criterion::SamplingMode::Flat);
    g.sample_size(10);
    g.bench_function("unbind_1M", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut held: Vec<Page> = Vec::with_capacity(PAGES);
            for _ in 0..iters {
                let device = Device::new(NoopOps);
                let mut pool = device
                    .pool_builder()
                    .region_source(ArenaRegions)
                    .build()
                    .unwrap();
                held.extend((0..PAGES).map(|_| pool.alloc().unwrap()));
                let start = Instant::now();
                let report = device.unbind().unwrap();
                timed += start.elapsed();
                assert_eq!(
                    report.regions_unmapped,
                    PAGES * PAGE_SIZE / DEFAULT_REGION_SIZE,
                    "{report}"
                );
                held.clear();
                drop(pool);
            }
            timed
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

// ---------------------------------------------------------------------------
// The RX pipeline: a driver's receive path, phased (see `phased`). Per round
// the RX thread (timed) allocates `ROUND` pages, lets the "device" write a
// frame into each (a `FRAME`-byte store into the page, as the NIC's DMA
// would), syncs the frame for the CPU and hands the pages to a consumer
// thread; the consumer (timed) reads each frame's first bytes and drops
// the page. The RX thread's next round refills from what the consumer's
// drops returned. The sum is the CPU work per packet on both threads.

/// Bytes the device writes and the consumer's sync covers.
const FRAME: usize = 64;

/// The "device" writes a frame into the buffer.
#[inline]
fn device_writes_frame(buf: &mut [u8], seq: u8) {
    black_box(&mut buf[..FRAME]).fill(seq);
}

/// The consumer reads the frame's first bytes.
#[inline]
fn consumer_reads_frame(buf: &[u8]) -> u64 {
    u64::from_le_bytes(black_box(&buf[..8]).try_into().unwrap())
}

fn rx_pipeline_pool<O: DmaOps>(r: &mut Runner<'_, '_>, name: &str, ops: O, remote_batch: usize) {
    let device = Device::new(ops);
    let mut pool = device
        .pool_builder()
        .remote_batch(remote_batch)
        .build()
        .unwrap();
    let mut seq = 0u8;
    r.run(name, |iters| {
        phased(
            iters,
            |pages, n| {
                for _ in 0..n {
                    let mut page = pool.alloc().unwrap();
                    seq = seq.wrapping_add(1);
                    device_writes_frame(page.as_mut_slice(), seq);
                    page.sync_for_cpu(0..FRAME).unwrap();
                    pages.push(page);
                }
            },
            |pages| {
                for page in pages.drain(..) {
                    black_box(consumer_reads_frame(page.as_slice()));
                }
            },
        )
    });
    let s = pool.stats();
    eprintln!(
        "rx_pipeline/{name}: {} slow refills, {} ring refills, {} released for a full ring",
        s.alloc.slow, s.alloc.refill, s.recycle.ring_full
    );
    assert_eq!(
        s.recycle.ring_full, 0,
        "every page came back through the ring"
    );
}

/// The RX pipeline over a peer's buffers: `get` one, the "device" writes a
/// frame, hand it over; the consumer reads it and `put`s it back.
fn rx_pipeline_peer(
    r: &mut Runner<'_, '_>,
    name: &str,
    get: impl Fn() -> Box<PageBuf>,
    put: impl Fn(Box<PageBuf>) + Sync,
) {
    let mut seq = 0u8;
    r.run(name, |iters| {
        phased(
            iters,
            |bufs, n| {
                for _ in 0..n {
                    let mut buf = get();
                    seq = seq.wrapping_add(1);
                    device_writes_frame(&mut buf.0, seq);
                    bufs.push(buf);
                }
            },
            |bufs| {
                for buf in bufs.drain(..) {
                    black_box(consumer_reads_frame(&buf.0));
                    put(buf);
                }
            },
        )
    });
}

/// The RX pipeline over the hand-written premapped pool: `get` a buffer,
/// the "device" writes a frame, sync it for the CPU through the ops if the
/// device needs that, hand it over; the consumer reads it and `put`s it
/// back.
fn rx_pipeline_premapped(r: &mut Runner<'_, '_>, name: &str, pool: &PremappedPool) {
    let mut seq = 0u8;
    r.run(name, |iters| {
        phased(
            iters,
            |bufs, n| {
                for _ in 0..n {
                    let mut buf = pool.get();
                    seq = seq.wrapping_add(1);
                    device_writes_frame(buf.as_mut_slice(), seq);
                    pool.sync_for_cpu(&mut buf, FRAME);
                    bufs.push(buf);
                }
            },
            |bufs| {
                for buf in bufs.drain(..) {
                    black_box(consumer_reads_frame(buf.as_slice()));
                    pool.put(buf);
                }
            },
        )
    });
}

fn rx_pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("rx_pipeline");
    g.throughput(Throughput::Elements(1));
    rx_pipeline_all(&mut Runner::Bench(&mut g));
    g.finish();
}

/// The `rx_pipeline` group's workloads.
fn rx_pipeline_all(r: &mut Runner<'_, '_>) {
    // A device that needs syncs (each sync is a device call through the
    // pool's gate), one that does not (the pool skips the call), and the
    // first without per-thread batches of returns.
    rx_pipeline_pool(r, "pagepool", NoopOps, pagepool::DEFAULT_REMOTE_BATCH);
    rx_pipeline_pool(
        r,
        "pagepool_coherent",
        CoherentOps,
        pagepool::DEFAULT_REMOTE_BATCH,
    );
    rx_pipeline_pool(r, "pagepool_unbatched", NoopOps, 0);

    // The hand-written premapped pool, mapped once through the same ops:
    // syncing through them (the `pagepool` row's device), and on the
    // coherent device (no sync call, as `pagepool_coherent`).
    let pool = PremappedPool::new(NoopOps, 2 * ROUND);
    rx_pipeline_premapped(r, "peer/premapped_array_queue", &pool);
    drop(pool);
    let pool = PremappedPool::new(CoherentOps, 2 * ROUND);
    rx_pipeline_premapped(r, "peer/premapped_array_queue_coherent", &pool);
    drop(pool);

    // The peers: the same pipeline over their buffers, with no mapping and
    // no sync at all (they know no device).
    let pool = QueuePool::new(2 * ROUND, ROUND);
    rx_pipeline_peer(
        r,
        "peer/crossbeam_array_queue",
        || pool.get(),
        |b| pool.put(b),
    );
    let pool = PlMutexPool::new(ROUND);
    rx_pipeline_peer(
        r,
        "peer/mutex_vec_parking_lot",
        || pool.get(),
        |b| pool.put(b),
    );
}

/// The RX pipeline's work on one thread: rounds of `ROUND` packets
/// received (alloc, frame write, sync) and then consumed (read, drop).
fn count_rx_pipeline(n: u64) {
    let device = Device::new(NoopOps);
    let mut pool = device.pool_builder().build().unwrap();
    let mut pages = Vec::with_capacity(ROUND);
    let mut left = n as usize;
    while left > 0 {
        let k = left.min(ROUND);
        for i in 0..k {
            let mut page = pool.alloc().unwrap();
            device_writes_frame(page.as_mut_slice(), i as u8);
            page.sync_for_cpu(0..FRAME).unwrap();
            pages.push(page);
        }
        for page in pages.drain(..) {
            black_box(consumer_reads_frame(page.as_slice()));
        }
        left -= k;
    }
}

// ---------------------------------------------------------------------------
// Instruction counts: `PAGEPOOL_COUNT=<workload>:<n>` runs one workload n
// times and exits, for `valgrind --tool=callgrind`. Counting at n and 2n and
// dividing the difference by n gives instructions per operation, setup and
// warm-up cancelled out (BENCHMARKS.md has the loop).

fn count_fast<M: Mode>(n: u64) {
    let device = M::device();
    let mut pool = device.pool_builder().build().unwrap();
    drop(pool.alloc().unwrap());
    for _ in 0..n {
        let page = pool.alloc().unwrap();
        pool.recycle_direct(black_box(page));
    }
}

/// Alloc + drop on the owner thread: the page goes through the thread's
/// remote batch (if `remote_batch > 1`) to the ring and back by a refill.
fn count_ring<M: Mode>(n: u64, remote_batch: usize) {
    let device = M::device();
    let mut pool = device
        .pool_builder()
        .remote_batch(remote_batch)
        .build()
        .unwrap();
    drop(pool.alloc().unwrap());
    for _ in 0..n {
        drop(black_box(pool.alloc().unwrap()));
    }
}

fn count_slow<M: Mode>(n: u64, cache: usize) {
    let device = M::device();
    let mut pool = device
        .pool_builder()
        .cache_size(cache)
        .refill_batch(cache)
        .ring_size(1)
        .page_source(ArenaPages)
        .build()
        .unwrap();
    let mut held: Vec<Page<M>> = Vec::with_capacity(SLOW_ROUND);
    let mut left = n as usize;
    while left > 0 {
        let k = left.min(SLOW_ROUND);
        held.extend((0..k).map(|_| pool.alloc().unwrap()));
        held.clear();
        left -= k;
    }
}

/// Alloc `BURST` pages, give them back with `put_bulk` (same thread: into
/// the ring), `n / BURST` times.
fn count_bulk<M: Mode>(n: u64) {
    let device = M::device();
    let mut pool = device.pool_builder().build().unwrap();
    let mut burst: Vec<Page<M>> = Vec::with_capacity(BURST);
    for _ in 0..n / BURST as u64 {
        burst.extend((0..BURST).map(|_| pool.alloc().unwrap()));
        put_bulk(burst.drain(..));
    }
}

/// Alloc `BURST` pages with `alloc_bulk`, give them back with `put_bulk`,
/// `n / BURST` times.
fn count_bulk_both<M: Mode>(n: u64) {
    let device = M::device();
    let mut pool = device.pool_builder().build().unwrap();
    let mut burst: Vec<Page<M>> = Vec::with_capacity(BURST);
    for _ in 0..n / BURST as u64 {
        pool.alloc_bulk(&mut burst, BURST).unwrap();
        put_bulk(burst.drain(..));
    }
}

/// Runs one phased workload (`group/name`, of `rx_pipeline`,
/// `cross_thread` or `cross_thread_bulk64`) for `n` packets, after printing
/// the phase markers' addresses, for a memory trace (`valgrind
/// --tool=lackey --trace-mem=yes`) that `scripts/line_transfers.py` turns
/// into cache lines handed between the two sides per packet.
fn count_lines(id: &str, n: u64) {
    eprintln!(
        "markers producer={:p} consumer={:p} idle={:p}",
        &PHASE_MARKERS[PRODUCER], &PHASE_MARKERS[CONSUMER], &PHASE_MARKERS[IDLE]
    );
    let group = id.split_once('/').map_or(id, |(g, _)| g);
    match group {
        "rx_pipeline" => rx_pipeline_all(&mut Runner::Trace {
            group: "rx_pipeline",
            id,
            iters: n,
        }),
        "cross_thread" => cross_thread_phased(&mut Runner::Trace {
            group: "cross_thread",
            id,
            iters: n,
        }),
        "cross_thread_bulk64" => cross_thread_bulk64(&mut Runner::Trace {
            group: "cross_thread_bulk64",
            id,
            iters: n,
        }),
        other => panic!("no phased group {other:?}"),
    }
}

fn count(spec: &str) {
    if let Some(lines) = spec.strip_prefix("lines:") {
        let (id, n) = lines
            .rsplit_once(':')
            .expect("PAGEPOOL_COUNT=lines:<id>:<n>");
        count_lines(id, n.parse().expect("PAGEPOOL_COUNT: n is a number"));
        return;
    }
    let (workload, n) = spec.split_once(':').expect("PAGEPOOL_COUNT=<workload>:<n>");
    let n: u64 = n.parse().expect("PAGEPOOL_COUNT: n is a number");
    match workload {
        "fast_tracked" => count_fast::<Tracked>(n),
        "fast_untracked" => count_fast::<Untracked>(n),
        "ring_tracked" => count_ring::<Tracked>(n, pagepool::DEFAULT_REMOTE_BATCH),
        "ring_untracked" => count_ring::<Untracked>(n, pagepool::DEFAULT_REMOTE_BATCH),
        "ring_unbatched_tracked" => count_ring::<Tracked>(n, 0),
        "ring_unbatched_untracked" => count_ring::<Untracked>(n, 0),
        "rx_pipeline" => count_rx_pipeline(n),
        "slow_arena_tracked" => count_slow::<Tracked>(n, 1),
        "slow_arena_untracked" => count_slow::<Untracked>(n, 1),
        "slow_arena_batch64_tracked" => count_slow::<Tracked>(n, 64),
        "slow_arena_batch64_untracked" => count_slow::<Untracked>(n, 64),
        "bulk_tracked" => count_bulk::<Tracked>(n),
        "rx_sync_needed" => {
            let device = Device::new(NoopOps);
            let mut pool = device.pool_builder().build().unwrap();
            warm(&mut pool);
            rx_loop(&mut pool, n);
        }
        "rx_no_sync_needed" => {
            let device = Device::new(CoherentOps);
            let mut pool = device.pool_builder().build().unwrap();
            warm(&mut pool);
            rx_loop(&mut pool, n);
        }
        "bulk_untracked" => count_bulk::<Untracked>(n),
        "bulk_both_tracked" => count_bulk_both::<Tracked>(n),
        "bulk_both_untracked" => count_bulk_both::<Untracked>(n),
        "mutex_vec_std_bulk" => {
            let pool = StdMutexPool::new(BURST);
            let mut burst: Vec<Box<PageBuf>> = Vec::with_capacity(BURST);
            for _ in 0..n / BURST as u64 {
                let mut held = pool.items.lock().unwrap();
                burst.extend((0..BURST).map(|_| held.pop().unwrap_or_else(new_buf)));
                drop(held);
                pool.items
                    .lock()
                    .unwrap()
                    .extend(black_box(&mut burst).drain(..));
            }
        }
        "vec_floor" => {
            let bufs: Vec<Box<PageBuf>> = (0..64).map(|_| new_buf()).collect();
            let mut v: Vec<NonNull<u8>> = Vec::with_capacity(128);
            v.extend(bufs.iter().map(|b| NonNull::from(&**b).cast::<u8>()));
            for _ in 0..n {
                let p = black_box(&mut v).pop().unwrap();
                black_box(&mut v).push(black_box(p));
            }
        }
        "mutex_vec_std" => {
            let pool = StdMutexPool::new(64);
            for _ in 0..n {
                let buf = pool.get();
                pool.put(black_box(buf));
            }
        }
        "mutex_vec_parking_lot" => {
            let pool = PlMutexPool::new(64);
            for _ in 0..n {
                let buf = pool.get();
                pool.put(black_box(buf));
            }
        }
        "crossbeam_array_queue" => {
            let pool = QueuePool::new(1024, 64);
            for _ in 0..n {
                let buf = pool.get();
                pool.put(black_box(buf));
            }
        }
        "sharded_slab_pool" => {
            let slab: sharded_slab::Pool<SlabBuf> = sharded_slab::Pool::new();
            for _ in 0..n {
                let key = {
                    let mut r = slab.create().unwrap();
                    black_box(&mut r.0);
                    r.key()
                };
                slab.clear(black_box(key));
            }
        }
        "lockfree_linear" => {
            let pool = lfop_linear();
            for _ in 0..n {
                drop(black_box(pool.pull()));
            }
        }
        "lockfree_spinlock" => {
            let pool = lfop_spinlock();
            for _ in 0..n {
                drop(black_box(pool.pull()));
            }
        }
        "global_alloc" => {
            let layout = page_layout();
            for _ in 0..n {
                // SAFETY: non-zero size.
                let p = unsafe { std::alloc::alloc(layout) };
                // SAFETY: allocated just above with the same layout.
                unsafe { std::alloc::dealloc(black_box(p), layout) };
            }
        }
        other => panic!("unknown PAGEPOOL_COUNT workload {other:?}"),
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = rx_pipeline, single_thread, ring, slow, cross_thread, unbind, sync,
        unbind_during_slow_map, regions
}

fn main() {
    if let Ok(spec) = std::env::var("PAGEPOOL_COUNT") {
        count(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
