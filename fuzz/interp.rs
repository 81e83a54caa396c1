//! The operation interpreter and reference model shared by three drivers:
//!
//! - `tests/state_machine.rs`: proptest generates [`Config`] + `Vec<Op>`,
//! - `fuzz/fuzz_targets/interleavings.rs`: libFuzzer bytes, [`decode`]d,
//! - `tests/fuzz_replay.rs`: every seed file (and fuzz regression) replayed
//!   as an ordinary stable `cargo test`.
//!
//! Each file includes this one with `#[path = ...] mod interp;`, so the three
//! run exactly the same decoding, execution and checks.
//!
//! # What runs
//!
//! One [`CheckingDevice`] in record mode, one [`Device`] on it, up to
//! [`POOLS`] pools (pool `i` owned by logical thread `i`), all taking page
//! memory from one [`CountingPages`] source. [`THREADS`] logical threads each
//! hold their own pages, fragments and `Bytes`; every [`Op`] names the
//! logical thread that acts, so the input chooses the interleaving.
//!
//! - [`run`] (deterministic): every op runs on the calling OS thread, except
//!   that drops may really happen on a spawned thread (spawn + join) or on a
//!   worker thread (send + wait), and unbind may run on a spawned thread.
//!   After every op the [`Harness`] compares the real state with a reference
//!   [`Model`]: pages held, pages in flight (pool stats), pages cached,
//!   mappings live (checking device and tracker), page blocks live,
//!   allocated and freed (counting source), the unbind report, every
//!   allocation result; and zero violations.
//! - [`run_threaded`]: the ops of each logical thread run on a real OS thread
//!   of its own, concurrently; items sent between threads go through
//!   channels. Only model-free invariants are checked (zero violations,
//!   content after every successful sync), and at the end the same leak
//!   checks.
//!
//! At the end everything is dropped (held buffers, pools, device) and every
//! page block must have been freed exactly once, no mapping may be left and
//! no violation recorded. Any failure panics, which is a crash for the
//! fuzzer and a (shrunk) failure for proptest.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread;

use pagepool::checking::{CheckMode, CheckingDevice};
use pagepool::{
    put_bulk, AllocError, BuildError, Device, DmaAddr, DmaDirection, DmaError, Frag, GlobalPages,
    OutOfMemory, Page, PagePool, PageSource, SyncError, UnbindError, FRAG_ALIGN, PAGE_SIZE,
};

/// Logical threads.
pub const THREADS: usize = 3;
/// Pool slots; slot `i` is owned by logical thread `i`.
pub const POOLS: usize = 2;
/// Longest op sequence [`decode`] produces.
pub const MAX_OPS: usize = 512;

// ---------------------------------------------------------------------------
// Page source

/// A page source that records every block it hands out, checks each is freed
/// exactly once, and can be told to fail the next allocations.
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
    fail_next: AtomicUsize,
}

impl CountingPages {
    /// Blocks handed out so far.
    pub fn allocated(&self) -> usize {
        self.inner.allocated.load(Ordering::SeqCst)
    }
    /// Blocks given back so far (each once).
    pub fn freed(&self) -> usize {
        self.inner.freed.load(Ordering::SeqCst)
    }
    /// Blocks handed out and not given back.
    pub fn live(&self) -> usize {
        self.inner.live.lock().unwrap().len()
    }
    /// Frees of a block that was not live.
    pub fn double_frees(&self) -> usize {
        self.inner.double_frees.load(Ordering::SeqCst)
    }
    /// Makes the next `n` allocations fail (replaces an earlier count).
    pub fn fail_next(&self, n: usize) {
        self.inner.fail_next.store(n, Ordering::SeqCst);
    }
}

// SAFETY: delegates to GlobalPages, which meets the contract; the
// bookkeeping never touches the blocks.
unsafe impl PageSource for CountingPages {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        let failing = self
            .inner
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(OutOfMemory);
        }
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
        let was_live = self
            .inner
            .live
            .lock()
            .unwrap()
            .remove(&(block.as_ptr() as usize));
        if !was_live {
            // Do not pass it on: a double free would corrupt the heap.
            self.inner.double_frees.fetch_add(1, Ordering::SeqCst);
            return;
        }
        self.inner.freed.fetch_add(1, Ordering::SeqCst);
        // SAFETY: the block came from GlobalPages with this order and is
        // freed once (checked just above).
        unsafe { GlobalPages.free_pages(block, order) }
    }
}

// ---------------------------------------------------------------------------
// Configuration and operations

/// One pool's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolCfg {
    /// Page order, 0 or 1.
    pub order: u32,
    /// Local cache capacity.
    pub cache_size: usize,
    /// Pages per refill (`1..=cache_size`).
    pub refill_batch: usize,
    /// Shared ring capacity.
    pub ring_size: usize,
    /// DMA direction.
    pub direction: DmaDirection,
    /// Sync-for-device on recycle: `(offset, max_len)`, valid for the page.
    pub sync: Option<(usize, usize)>,
}

impl PoolCfg {
    /// Bytes per page.
    pub fn page_len(&self) -> usize {
        PAGE_SIZE << self.order
    }
}

/// The configuration of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Pool slot configurations (a slot's pool is rebuilt with the same one).
    pub pools: [PoolCfg; POOLS],
}

impl Config {
    /// A `FromDevice` pool syncing for the device on recycle does what Linux's
    /// page_pool does (a pure ownership transfer); the checking device must
    /// then accept for-device syncs of `FromDevice` mappings.
    fn strict_sync_directions(&self) -> bool {
        !self
            .pools
            .iter()
            .any(|p| p.direction == DmaDirection::FromDevice && p.sync.is_some())
    }
}

/// How a buffer is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// On the acting (OS) thread.
    Here,
    /// On a freshly spawned OS thread (spawn + join).
    Spawned,
    /// Sent to a long-lived worker thread, which drops it and acknowledges.
    Worker,
    /// Through `put_bulk` (pages only; other buffers drop as `Here`).
    Bulk,
}

/// How the device is unbound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnbindHow {
    /// `device.unbind()` on the acting thread.
    Call,
    /// `device.unbind()` on another OS thread.
    OtherThread,
    /// Dropping the `Device` (unbinds).
    DropDevice,
}

/// One step. `t` is the acting logical thread (taken modulo [`THREADS`]);
/// `item` picks one of its held buffers (modulo how many it holds). An op
/// that does not apply (no such buffer, no pool) does nothing, so every
/// subsequence of a valid sequence is valid: shrinking works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Allocate a page from the thread's pool.
    Alloc { t: u8 },
    /// Allocate a fragment of `size` bytes (0 and oversize included).
    AllocFrag { t: u8, size: u16 },
    /// `recycle_direct` a held page into the thread's pool.
    RecycleDirect { t: u8, item: u8 },
    /// Drop a held buffer.
    Drop { t: u8, item: u8, how: How },
    /// Hand a held buffer to another logical thread.
    Send { t: u8, item: u8, to: u8 },
    /// Give up to `n % 8 + 1` held pages back with one `put_bulk`.
    PutBulk { t: u8, n: u8 },
    /// Allocate `ring_size + extra % 3 + 1` pages and drop them all: the
    /// ring overflows.
    FillRing { t: u8, extra: u8, how: How },
    /// Device write + `sync_for_cpu` (or CPU write + `sync_for_device` +
    /// device read) of a range, checking the content; after unbind, the
    /// sync must fail with `Unbound` and the memory stay usable.
    Sync {
        t: u8,
        item: u8,
        start: u16,
        len: u16,
        tag: u8,
        to_device: bool,
    },
    /// A sync of a range outside the buffer: `OutOfRange`, no device call.
    SyncOutOfRange { t: u8, item: u8, past: u16 },
    /// Read the buffer and check the last synced range.
    Check { t: u8, item: u8 },
    /// `Page::set_dirty_len`.
    SetDirtyLen { t: u8, item: u8, len: u16 },
    /// Turn a page or fragment into `Bytes` (feature `bytes`).
    IntoBytes { t: u8, item: u8 },
    /// Clone a held `Bytes`.
    CloneBytes { t: u8, item: u8 },
    /// Drop the thread's pool.
    DropPool { t: u8 },
    /// Build the thread's pool again (fails with `Unbound` after unbind).
    NewPool { t: u8 },
    /// Unbind the device.
    Unbind { how: UnbindHow },
    /// Make the next `n % 4` maps fail.
    FailMaps { n: u8 },
    /// Make the next `n % 4` page allocations fail.
    FailPageAllocs { n: u8 },
}

// ---------------------------------------------------------------------------
// Byte decoding (fuzzer, seed files) and encoding (seed generation)

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
}

fn direction_from(b: u8) -> DmaDirection {
    match b % 3 {
        0 => DmaDirection::FromDevice,
        1 => DmaDirection::Bidirectional,
        _ => DmaDirection::ToDevice,
    }
}

fn direction_code(d: DmaDirection) -> u8 {
    match d {
        DmaDirection::FromDevice => 0,
        DmaDirection::Bidirectional => 1,
        DmaDirection::ToDevice => 2,
    }
}

fn how_from(b: u8) -> How {
    match b % 4 {
        0 => How::Here,
        1 => How::Spawned,
        2 => How::Worker,
        _ => How::Bulk,
    }
}

fn how_code(h: How) -> u8 {
    match h {
        How::Here => 0,
        How::Spawned => 1,
        How::Worker => 2,
        How::Bulk => 3,
    }
}

/// Builds a valid pool configuration from any four bytes.
pub fn pool_cfg_from(b: [u8; 4]) -> PoolCfg {
    let order = u32::from(b[0] & 1);
    let page_len = PAGE_SIZE << order;
    let direction = direction_from((b[0] >> 1) & 3);
    let cache_size = 1 + usize::from(b[1] & 7);
    let refill_batch = 1 + usize::from(b[1] >> 3) % cache_size;
    let ring_size = 1 + usize::from(b[2] & 7);
    let sync = (b[0] & 0x80 != 0).then(|| {
        let max_len = 1 + (usize::from(b[3]) * 61) % page_len;
        let offset = (usize::from(b[2] >> 3) * FRAG_ALIGN) % (page_len - max_len + 1);
        (offset, max_len)
    });
    PoolCfg {
        order,
        cache_size,
        refill_batch,
        ring_size,
        direction,
        sync,
    }
}

/// Decodes fuzzer input: byte 0 chooses the mode (bit 0: real threads),
/// then 4 bytes per pool slot ([`pool_cfg_from`]), then ops (one tag byte
/// and its fields each) until the input or [`MAX_OPS`] runs out. Every
/// input decodes to something runnable.
pub fn decode(data: &[u8]) -> (Config, bool, Vec<Op>) {
    let mut c = Cursor { data, pos: 0 };
    let threaded = c.byte() & 1 == 1;
    let pools = [0; POOLS].map(|_| pool_cfg_from([c.byte(), c.byte(), c.byte(), c.byte()]));
    let mut ops = Vec::new();
    while !c.done() && ops.len() < MAX_OPS {
        let tag = c.byte();
        let op = match tag % 18 {
            0 => Op::Alloc { t: c.byte() },
            1 => Op::AllocFrag {
                t: c.byte(),
                size: c.u16(),
            },
            2 => Op::RecycleDirect {
                t: c.byte(),
                item: c.byte(),
            },
            3 => Op::Drop {
                t: c.byte(),
                item: c.byte(),
                how: how_from(c.byte()),
            },
            4 => Op::Send {
                t: c.byte(),
                item: c.byte(),
                to: c.byte(),
            },
            5 => Op::PutBulk {
                t: c.byte(),
                n: c.byte(),
            },
            6 => Op::FillRing {
                t: c.byte(),
                extra: c.byte(),
                how: how_from(c.byte()),
            },
            7 => {
                let (t, item) = (c.byte(), c.byte());
                let (start, len) = (c.u16(), c.u16());
                let tag = c.byte();
                Op::Sync {
                    t,
                    item,
                    start,
                    len,
                    to_device: tag & 1 == 1,
                    tag,
                }
            }
            8 => Op::SyncOutOfRange {
                t: c.byte(),
                item: c.byte(),
                past: c.u16(),
            },
            9 => Op::Check {
                t: c.byte(),
                item: c.byte(),
            },
            10 => Op::SetDirtyLen {
                t: c.byte(),
                item: c.byte(),
                len: c.u16(),
            },
            11 => Op::IntoBytes {
                t: c.byte(),
                item: c.byte(),
            },
            12 => Op::CloneBytes {
                t: c.byte(),
                item: c.byte(),
            },
            13 => Op::DropPool { t: c.byte() },
            14 => Op::NewPool { t: c.byte() },
            15 => Op::Unbind {
                how: match c.byte() % 3 {
                    0 => UnbindHow::Call,
                    1 => UnbindHow::OtherThread,
                    _ => UnbindHow::DropDevice,
                },
            },
            16 => Op::FailMaps { n: c.byte() },
            _ => Op::FailPageAllocs { n: c.byte() },
        };
        ops.push(op);
    }
    (Config { pools }, threaded, ops)
}

/// The inverse of [`decode`] (up to the modulo reductions): writes seed
/// files and regression inputs.
pub fn encode(config: &Config, threaded: bool, ops: &[Op]) -> Vec<u8> {
    let mut out = vec![u8::from(threaded)];
    for p in &config.pools {
        let (offset, max_len) = p.sync.unwrap_or((0, 1));
        // max_len = 1 + (b3 * 61) % page_len: find a b3 that gives it back,
        // else the nearest the encoding can say.
        let page_len = p.page_len();
        let b3 = (0..=255u8)
            .find(|&b| 1 + (usize::from(b) * 61) % page_len == max_len)
            .unwrap_or(0);
        let max_len = 1 + (usize::from(b3) * 61) % page_len;
        let b2hi = (0..32u8)
            .find(|&b| (usize::from(b) * FRAG_ALIGN) % (page_len - max_len + 1) == offset)
            .unwrap_or(0);
        let b0 = (p.order as u8 & 1)
            | (direction_code(p.direction) << 1)
            | if p.sync.is_some() { 0x80 } else { 0 };
        let b1 = ((p.cache_size - 1) as u8 & 7) | (((p.refill_batch - 1) as u8) << 3);
        let b2 = ((p.ring_size - 1) as u8 & 7) | (b2hi << 3);
        out.extend([b0, b1, b2, b3]);
    }
    for op in ops {
        match *op {
            Op::Alloc { t } => out.extend([0, t]),
            Op::AllocFrag { t, size } => {
                out.extend([1, t]);
                out.extend(size.to_le_bytes());
            }
            Op::RecycleDirect { t, item } => out.extend([2, t, item]),
            Op::Drop { t, item, how } => out.extend([3, t, item, how_code(how)]),
            Op::Send { t, item, to } => out.extend([4, t, item, to]),
            Op::PutBulk { t, n } => out.extend([5, t, n]),
            Op::FillRing { t, extra, how } => out.extend([6, t, extra, how_code(how)]),
            Op::Sync {
                t,
                item,
                start,
                len,
                tag,
                to_device,
            } => {
                out.extend([7, t, item]);
                out.extend(start.to_le_bytes());
                out.extend(len.to_le_bytes());
                out.push((tag & !1) | u8::from(to_device));
            }
            Op::SyncOutOfRange { t, item, past } => {
                out.extend([8, t, item]);
                out.extend(past.to_le_bytes());
            }
            Op::Check { t, item } => out.extend([9, t, item]),
            Op::SetDirtyLen { t, item, len } => {
                out.extend([10, t, item]);
                out.extend(len.to_le_bytes());
            }
            Op::IntoBytes { t, item } => out.extend([11, t, item]),
            Op::CloneBytes { t, item } => out.extend([12, t, item]),
            Op::DropPool { t } => out.extend([13, t]),
            Op::NewPool { t } => out.extend([14, t]),
            Op::Unbind { how } => out.extend([
                15,
                match how {
                    UnbindHow::Call => 0,
                    UnbindHow::OtherThread => 1,
                    UnbindHow::DropDevice => 2,
                },
            ]),
            Op::FailMaps { n } => out.extend([16, n]),
            Op::FailPageAllocs { n } => out.extend([17, n]),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Held buffers

/// What a `Bytes` owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Under {
    Page,
    Frag,
}

enum Buf {
    Page(Page),
    Frag(Frag),
    #[cfg(feature = "bytes")]
    Bytes(bytes::Bytes),
}

impl Buf {
    fn len(&self) -> usize {
        match self {
            Buf::Page(p) => p.len(),
            Buf::Frag(f) => f.len(),
            #[cfg(feature = "bytes")]
            Buf::Bytes(b) => b.len(),
        }
    }

    fn read(&self) -> &[u8] {
        match self {
            Buf::Page(p) => p.as_slice(),
            Buf::Frag(f) => f.as_slice(),
            #[cfg(feature = "bytes")]
            Buf::Bytes(b) => b,
        }
    }
}

/// A buffer held by a logical thread, with what the model knows of it.
struct Held {
    buf: Buf,
    /// Model index of its pool.
    pool: usize,
    /// The page's device address at allocation (unique: the checking device
    /// never reuses an address), naming the page in the model.
    key: u64,
    /// For `Bytes`: the clone group and what the group owns.
    group: Option<(u64, Under)>,
    /// The last range written and synced: (start, len, byte).
    expect: Option<(usize, usize, u8)>,
}

impl Held {
    fn check_content(&self, context: &str) {
        if let Some((start, len, tag)) = self.expect {
            let bytes = &self.buf.read()[start..start + len];
            if let Some(i) = bytes.iter().position(|&b| b != tag) {
                panic!(
                    "{context}: content lost: byte {} of the buffer is {:#x}, expected {tag:#x}",
                    start + i,
                    bytes[i]
                );
            }
        }
    }
}

/// A long-lived thread that drops what it is sent.
struct Worker {
    tx: Option<mpsc::Sender<Buf>>,
    ack: mpsc::Receiver<()>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Worker {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel::<Buf>();
        let (ack_tx, ack) = mpsc::channel();
        let handle = thread::spawn(move || {
            for buf in rx {
                drop(buf);
                if ack_tx.send(()).is_err() {
                    break;
                }
            }
        });
        Self {
            tx: Some(tx),
            ack,
            handle: Some(handle),
        }
    }

    fn drop_there(&self, buf: Buf) {
        self.tx.as_ref().unwrap().send(buf).expect("worker alive");
        self.ack.recv().expect("worker acknowledges");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            // A panic in the worker (a pool bug) is reported here, unless
            // we are already unwinding.
            if h.join().is_err() && !thread::panicking() {
                panic!("the worker thread panicked");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The reference model

/// The model of one pool (one per pool ever built).
#[derive(Clone, Debug)]
pub struct PoolModel {
    cfg: PoolCfg,
    /// The `PagePool` handle exists.
    alive: bool,
    /// The pool refuses pages (dropped, or its device unbound).
    closed: bool,
    cache: usize,
    ring: usize,
    /// Pages handed out and not given back (stats `pages_in_flight`).
    out: usize,
    /// Pages mapped (stats `pages_mapped`).
    mapped: usize,
    /// Page blocks allocated and not freed.
    blocks: usize,
    /// The current fragment page: its key and next offset.
    frag: Option<(u64, usize)>,
}

/// The reference model of the device, its pools and its pages.
#[derive(Clone, Debug, Default)]
pub struct Model {
    bound: bool,
    pools: Vec<PoolModel>,
    /// Fragment pages: references (live fragments + the owner's).
    frag_refs: HashMap<u64, usize>,
    /// `Bytes` clone groups: live clones.
    groups: HashMap<u64, usize>,
    next_group: u64,
    map_fail: u64,
    src_fail: u64,
    allocated: usize,
    freed: usize,
}

/// What `unbind` should report.
#[derive(Debug, PartialEq, Eq)]
struct ExpectedUnbind {
    pools: usize,
    pages_from_rings: usize,
    pages_in_flight: usize,
    bytes_unmapped: u64,
}

impl Model {
    fn new_pool(&mut self, cfg: PoolCfg) -> usize {
        self.pools.push(PoolModel {
            cfg,
            alive: true,
            closed: false,
            cache: 0,
            ring: 0,
            out: 0,
            mapped: 0,
            blocks: 0,
            frag: None,
        });
        self.pools.len() - 1
    }

    /// A page leaves pool `m` for good: unmapped (if the device is still
    /// bound; else unbind did it) and freed.
    fn release(&mut self, m: usize) {
        let bound = self.bound;
        let p = &mut self.pools[m];
        if bound {
            p.mapped -= 1;
        }
        p.blocks -= 1;
        self.freed += 1;
    }

    fn ring_push(&mut self, m: usize) {
        let p = &mut self.pools[m];
        if p.closed || p.ring == p.cfg.ring_size {
            self.release(m);
        } else {
            p.ring += 1;
        }
    }

    /// A page comes back from any thread (drop, `put_bulk`, last fragment).
    fn ret_remote(&mut self, m: usize) {
        let bound = self.bound;
        let p = &mut self.pools[m];
        p.out -= 1;
        if p.closed || (p.cfg.sync.is_some() && !bound) {
            self.release(m);
        } else {
            self.ring_push(m);
        }
    }

    /// A page comes back through its own pool's `recycle_direct`. After
    /// unbind it is released at once, like on every other return path.
    fn ret_direct(&mut self, m: usize) {
        let bound = self.bound;
        let p = &mut self.pools[m];
        p.out -= 1;
        if p.closed || (p.cfg.sync.is_some() && !bound) {
            self.release(m);
        } else if p.cache < p.cfg.cache_size {
            p.cache += 1;
        } else {
            self.ring_push(m);
        }
    }

    fn frag_unref(&mut self, key: u64, m: usize) {
        let r = self.frag_refs.get_mut(&key).expect("fragment page known");
        *r -= 1;
        if *r == 0 {
            self.frag_refs.remove(&key);
            self.ret_remote(m);
        }
    }

    fn finish_frag(&mut self, m: usize) {
        if let Some((key, _)) = self.pools[m].frag.take() {
            self.frag_unref(key, m);
        }
    }

    /// `PagePool::alloc` on pool `m`.
    fn alloc(&mut self, m: usize) -> Result<(), AllocError> {
        let p = &self.pools[m];
        if p.closed {
            return Err(AllocError::Unbound);
        }
        if p.cache == 0 {
            let n = p.cfg.refill_batch.min(p.ring);
            if n > 0 {
                let p = &mut self.pools[m];
                p.ring -= n;
                p.cache += n;
            } else {
                let want = if p.cfg.order == 0 {
                    p.cfg.refill_batch
                } else {
                    1
                };
                let page_len = p.cfg.page_len();
                let mut err = None;
                for _ in 0..want {
                    if self.src_fail > 0 {
                        self.src_fail -= 1;
                        err = Some(AllocError::OutOfMemory { bytes: page_len });
                        break;
                    }
                    self.allocated += 1;
                    if self.map_fail > 0 {
                        self.map_fail -= 1;
                        self.freed += 1;
                        err = Some(AllocError::Map(DmaError::Injected));
                        break;
                    }
                    let p = &mut self.pools[m];
                    p.mapped += 1;
                    p.blocks += 1;
                    p.cache += 1;
                }
                if self.pools[m].cache == 0 {
                    return Err(err.expect("no page and no error"));
                }
            }
        }
        let p = &mut self.pools[m];
        p.cache -= 1;
        p.out += 1;
        Ok(())
    }

    /// `PagePool::alloc_frag(size)` on pool `m`. `Ok(Some((key, offset)))`
    /// when the fragment must come from the current page, `Ok(None)` when
    /// it comes from a new page at offset 0 (the caller then calls
    /// [`Self::frag_new_page`]).
    fn alloc_frag(&mut self, m: usize, size: usize) -> Result<Option<(u64, usize)>, AllocError> {
        let page_len = self.pools[m].cfg.page_len();
        if size == 0 || size > page_len {
            return Err(AllocError::FragmentSize {
                requested: size,
                page_len,
            });
        }
        if self.pools[m].closed {
            return Err(AllocError::Unbound);
        }
        let step = size.next_multiple_of(FRAG_ALIGN);
        if let Some((key, offset)) = self.pools[m].frag {
            if offset + size <= page_len {
                self.pools[m].frag = Some((key, offset + step));
                *self.frag_refs.get_mut(&key).expect("fragment page known") += 1;
                return Ok(Some((key, offset)));
            }
        }
        self.finish_frag(m);
        self.alloc(m)?;
        Ok(None)
    }

    fn frag_new_page(&mut self, m: usize, key: u64, size: usize) {
        let step = size.next_multiple_of(FRAG_ALIGN);
        self.pools[m].frag = Some((key, step));
        let old = self.frag_refs.insert(key, 2);
        assert!(old.is_none(), "page {key:#x} already a fragment page");
    }

    fn drop_pool(&mut self, m: usize) {
        self.finish_frag(m);
        let p = &mut self.pools[m];
        p.closed = true;
        p.alive = false;
        let n = p.cache + p.ring;
        p.cache = 0;
        p.ring = 0;
        for _ in 0..n {
            self.release(m);
        }
    }

    fn unbind(&mut self) -> ExpectedUnbind {
        let mut e = ExpectedUnbind {
            pools: 0,
            pages_from_rings: 0,
            pages_in_flight: 0,
            bytes_unmapped: 0,
        };
        for p in self.pools.iter_mut() {
            let page_len = p.cfg.page_len() as u64;
            if p.alive {
                e.pools += 1;
                p.closed = true;
                e.pages_from_rings += p.ring;
                e.bytes_unmapped += p.ring as u64 * page_len;
                p.mapped -= p.ring;
                p.blocks -= p.ring;
                self.freed += p.ring;
                p.ring = 0;
            }
            e.pages_in_flight += p.mapped;
            e.bytes_unmapped += p.mapped as u64 * page_len;
            p.mapped = 0;
        }
        self.bound = false;
        e
    }

    /// A held buffer is gone (its last handle dropped).
    fn dropped(&mut self, pool: usize, key: u64, kind: Under, group: Option<(u64, Under)>) {
        if let Some((g, under)) = group {
            let n = self.groups.get_mut(&g).expect("bytes group known");
            *n -= 1;
            if *n > 0 {
                return;
            }
            self.groups.remove(&g);
            return self.dropped(pool, key, under, None);
        }
        match kind {
            Under::Page => self.ret_remote(pool),
            Under::Frag => self.frag_unref(key, pool),
        }
    }

    fn mapped(&self) -> usize {
        self.pools.iter().map(|p| p.mapped).sum()
    }

    fn blocks(&self) -> usize {
        self.pools.iter().map(|p| p.blocks).sum()
    }
}

fn kind_of(buf: &Buf) -> Under {
    match buf {
        Buf::Frag(_) => Under::Frag,
        _ => Under::Page,
    }
}

// ---------------------------------------------------------------------------
// The deterministic harness

/// Runs ops one at a time and checks the model after each.
pub struct Harness {
    cfg: Config,
    checking: CheckingDevice,
    source: CountingPages,
    device: Option<Device>,
    pools: [Option<(PagePool, usize)>; POOLS],
    held: [Vec<Held>; THREADS],
    worker: Option<Worker>,
    model: Model,
    step: usize,
}

fn build_pool(
    device: &Device,
    cfg: &PoolCfg,
    source: &CountingPages,
) -> Result<PagePool, BuildError> {
    let mut b = device
        .pool_builder()
        .order(cfg.order)
        .cache_size(cfg.cache_size)
        .refill_batch(cfg.refill_batch)
        .ring_size(cfg.ring_size)
        .direction(cfg.direction)
        .page_source(source.clone());
    if let Some((offset, max_len)) = cfg.sync {
        b = b.sync_for_device(offset, max_len);
    }
    b.build()
}

fn checking_device(cfg: &Config) -> CheckingDevice {
    CheckingDevice::builder()
        .mode(CheckMode::Record)
        .strict_sync_directions(cfg.strict_sync_directions())
        .build()
}

/// A sync range inside a buffer of `len` bytes, from two arbitrary numbers.
fn range_in(len: usize, start: u16, n: u16) -> (usize, usize) {
    let start = usize::from(start) % len;
    let n = 1 + usize::from(n) % (len - start);
    (start, n)
}

impl Harness {
    /// A device with every pool slot built.
    pub fn new(cfg: Config) -> Self {
        let checking = checking_device(&cfg);
        let source = CountingPages::default();
        let device = Device::new(checking.clone());
        let mut model = Model {
            bound: true,
            ..Model::default()
        };
        let pools = [0, 1].map(|i| {
            let pool = build_pool(&device, &cfg.pools[i], &source).expect("valid config");
            Some((pool, model.new_pool(cfg.pools[i])))
        });
        let h = Self {
            cfg,
            checking,
            source,
            device: Some(device),
            pools,
            held: Default::default(),
            worker: None,
            model,
            step: 0,
        };
        h.check("start");
        h
    }

    /// The model (for reports).
    pub fn model(&self) -> &Model {
        &self.model
    }

    fn pool_of(&mut self, t: u8) -> Option<(&mut PagePool, usize)> {
        let slot = usize::from(t) % THREADS;
        self.pools
            .get_mut(slot)?
            .as_mut()
            .map(|(pool, m)| (pool, *m))
    }

    fn item(&self, t: u8, item: u8) -> Option<(usize, usize)> {
        let t = usize::from(t) % THREADS;
        let n = self.held[t].len();
        (n > 0).then(|| (t, usize::from(item) % n))
    }

    fn worker(&mut self) -> &Worker {
        self.worker.get_or_insert_with(Worker::new)
    }

    /// Drops `held` as `how` says and updates the model.
    fn drop_held(&mut self, held: Held, how: How) {
        let Held {
            buf,
            pool,
            key,
            group,
            ..
        } = held;
        let kind = kind_of(&buf);
        self.model.dropped(pool, key, kind, group);
        match (how, buf) {
            (How::Spawned, buf) => thread::spawn(move || drop(buf))
                .join()
                .expect("drop on another thread panicked"),
            (How::Worker, buf) => self.worker().drop_there(buf),
            (How::Bulk, Buf::Page(page)) => put_bulk([page]),
            (_, buf) => drop(buf),
        }
    }

    /// Allocates one page from pool slot `t` for thread `t`; returns
    /// whether it did.
    fn alloc_into(&mut self, t: u8, keep: bool) -> Option<Held> {
        let (pool, m) = self.pool_of(t)?;
        let got = pool.alloc();
        let want = self.model.alloc(m);
        let ctx = self.ctx("alloc");
        match (got, want) {
            (Ok(page), Ok(())) => {
                let key = page.dma_addr().0;
                let held = Held {
                    buf: Buf::Page(page),
                    pool: m,
                    key,
                    group: None,
                    expect: None,
                };
                if keep {
                    self.held[usize::from(t) % THREADS].push(held);
                    None
                } else {
                    Some(held)
                }
            }
            (Err(e), Err(w)) => {
                assert_eq!(e, w, "{ctx}: wrong error");
                None
            }
            (got, want) => panic!("{ctx}: got {got:?}, model says {want:?}"),
        }
    }

    fn ctx(&self, what: &str) -> String {
        format!("step {} ({what})", self.step)
    }

    /// Runs one op, then checks the model.
    pub fn apply(&mut self, op: &Op) {
        self.step += 1;
        self.exec(op);
        self.check(&format!("after {op:?}"));
    }

    fn exec(&mut self, op: &Op) {
        match *op {
            Op::Alloc { t } => {
                self.alloc_into(t, true);
            }
            Op::AllocFrag { t, size } => self.alloc_frag(t, usize::from(size)),
            Op::RecycleDirect { t, item } => {
                let Some((ti, i)) = self.item(t, item) else {
                    return;
                };
                if !matches!(self.held[ti][i].buf, Buf::Page(_)) {
                    return;
                }
                let Some((_, target)) = self.pool_of(t) else {
                    return;
                };
                let held = self.held[ti].swap_remove(i);
                if held.pool == target {
                    self.model.ret_direct(target);
                } else {
                    self.model.ret_remote(held.pool);
                }
                let Buf::Page(page) = held.buf else {
                    unreachable!()
                };
                let (pool, _) = self.pool_of(t).expect("checked");
                pool.recycle_direct(page);
            }
            Op::Drop { t, item, how } => {
                if let Some((ti, i)) = self.item(t, item) {
                    let held = self.held[ti].swap_remove(i);
                    self.drop_held(held, how);
                }
            }
            Op::Send { t, item, to } => {
                if let Some((ti, i)) = self.item(t, item) {
                    let held = self.held[ti].swap_remove(i);
                    self.held[usize::from(to) % THREADS].push(held);
                }
            }
            Op::PutBulk { t, n } => {
                let ti = usize::from(t) % THREADS;
                let mut pages = Vec::new();
                let mut i = 0;
                while i < self.held[ti].len() && pages.len() <= usize::from(n % 8) {
                    if matches!(self.held[ti][i].buf, Buf::Page(_)) {
                        let held = self.held[ti].remove(i);
                        self.model.ret_remote(held.pool);
                        let Buf::Page(page) = held.buf else {
                            unreachable!()
                        };
                        pages.push(page);
                    } else {
                        i += 1;
                    }
                }
                put_bulk(pages);
            }
            Op::FillRing { t, extra, how } => {
                if self.pool_of(t).is_none() {
                    return;
                }
                let slot = usize::from(t) % THREADS;
                let n = self.cfg.pools[slot].ring_size + 1 + usize::from(extra % 3);
                let mut got = Vec::new();
                for _ in 0..n {
                    match self.alloc_into(t, false) {
                        Some(h) => got.push(h),
                        None => break,
                    }
                }
                match how {
                    How::Spawned => {
                        for h in &got {
                            self.model.ret_remote(h.pool);
                        }
                        let bufs: Vec<Buf> = got.into_iter().map(|h| h.buf).collect();
                        thread::spawn(move || drop(bufs))
                            .join()
                            .expect("drop on another thread panicked");
                    }
                    How::Bulk => {
                        let mut pages = Vec::new();
                        for h in got {
                            self.model.ret_remote(h.pool);
                            if let Buf::Page(p) = h.buf {
                                pages.push(p);
                            }
                        }
                        put_bulk(pages);
                    }
                    How::Here | How::Worker => {
                        for h in got {
                            self.drop_held(h, how);
                        }
                    }
                }
            }
            Op::Sync {
                t,
                item,
                start,
                len,
                tag,
                to_device,
            } => self.sync(t, item, start, len, tag, to_device),
            Op::SyncOutOfRange { t, item, past } => {
                let Some((ti, i)) = self.item(t, item) else {
                    return;
                };
                let before = self.checking.stats();
                let ctx = self.ctx("sync out of range");
                let h = &mut self.held[ti][i];
                let len = h.buf.len();
                // Odd `past`: a reversed range; even: one running past the end.
                let (s, e) = if past % 2 == 1 {
                    (2 + usize::from(past) % len, 1)
                } else {
                    (usize::from(past) % len, len + 1 + usize::from(past))
                };
                let want = Err(SyncError::OutOfRange {
                    start: s,
                    end: e,
                    len,
                });
                #[allow(clippy::reversed_empty_ranges)]
                let range = s..e;
                let got = match &mut h.buf {
                    Buf::Page(p) if to_cpu(past) => p.sync_for_cpu(range),
                    Buf::Page(p) => p.sync_for_device(range),
                    Buf::Frag(f) if to_cpu(past) => f.sync_for_cpu(range),
                    Buf::Frag(f) => f.sync_for_device(range),
                    #[cfg(feature = "bytes")]
                    Buf::Bytes(_) => return,
                };
                assert_eq!(got, want, "{ctx}");
                let after = self.checking.stats();
                assert_eq!(
                    (before.syncs_for_cpu, before.syncs_for_device),
                    (after.syncs_for_cpu, after.syncs_for_device),
                    "{ctx}: a rejected sync reached the device"
                );
            }
            Op::Check { t, item } => {
                if let Some((ti, i)) = self.item(t, item) {
                    let ctx = self.ctx("check");
                    self.held[ti][i].check_content(&ctx);
                }
            }
            Op::SetDirtyLen { t, item, len } => {
                if let Some((ti, i)) = self.item(t, item) {
                    if let Buf::Page(p) = &mut self.held[ti][i].buf {
                        p.set_dirty_len(usize::from(len));
                    }
                }
            }
            Op::IntoBytes { t, item } => self.convert_to_bytes(t, item),
            Op::CloneBytes { t, item } => self.clone_bytes(t, item),
            Op::DropPool { t } => {
                let slot = usize::from(t) % THREADS;
                if let Some((pool, m)) = self.pools.get_mut(slot).and_then(Option::take) {
                    self.model.drop_pool(m);
                    drop(pool);
                }
            }
            Op::NewPool { t } => {
                let slot = usize::from(t) % THREADS;
                if slot >= POOLS || self.pools[slot].is_some() {
                    return;
                }
                let Some(device) = &self.device else {
                    return;
                };
                let got = build_pool(device, &self.cfg.pools[slot], &self.source);
                let ctx = self.ctx("new pool");
                match got {
                    Ok(pool) => {
                        assert!(self.model.bound, "{ctx}: built a pool on an unbound device");
                        let m = self.model.new_pool(self.cfg.pools[slot]);
                        self.pools[slot] = Some((pool, m));
                    }
                    Err(e) => {
                        assert!(!self.model.bound, "{ctx}: {e}");
                        assert_eq!(e, BuildError::Unbound, "{ctx}");
                    }
                }
            }
            Op::Unbind { how } => self.unbind(how),
            Op::FailMaps { n } => {
                let n = n % 4;
                self.checking.fail_next_maps(u64::from(n));
                self.model.map_fail = u64::from(n);
            }
            Op::FailPageAllocs { n } => {
                let n = n % 4;
                self.source.fail_next(usize::from(n));
                self.model.src_fail = u64::from(n);
            }
        }
    }

    fn alloc_frag(&mut self, t: u8, size: usize) {
        let ctx = self.ctx("alloc_frag");
        let Some((pool, m)) = self.pool_of(t) else {
            return;
        };
        let got = pool.alloc_frag(size);
        let want = self.model.alloc_frag(m, size);
        match (got, want) {
            (Ok(frag), Ok(same_page)) => {
                assert_eq!(frag.len(), size, "{ctx}");
                let offset = frag.offset();
                let key = frag.dma_addr().0 - offset as u64;
                match same_page {
                    Some((k, o)) => {
                        assert_eq!((key, offset), (k, o), "{ctx}: fragment placed wrongly")
                    }
                    None => {
                        assert_eq!(offset, 0, "{ctx}: a new fragment page starts at 0");
                        self.model.frag_new_page(m, key, size);
                    }
                }
                self.held[usize::from(t) % THREADS].push(Held {
                    buf: Buf::Frag(frag),
                    pool: m,
                    key,
                    group: None,
                    expect: None,
                });
            }
            (Err(e), Err(w)) => assert_eq!(e, w, "{ctx}: wrong error"),
            (got, want) => panic!("{ctx}: got {got:?}, model says {want:?}"),
        }
    }

    fn sync(&mut self, t: u8, item: u8, start: u16, len: u16, tag: u8, to_device: bool) {
        let Some((ti, i)) = self.item(t, item) else {
            return;
        };
        let ctx = self.ctx("sync");
        let bound = self.model.bound;
        let h = &self.held[ti][i];
        let direction = self.model.pools[h.pool].cfg.direction;
        let (s, n) = range_in(h.buf.len(), start, len);
        let device_writes = match direction {
            DmaDirection::FromDevice => true,
            DmaDirection::ToDevice => false,
            DmaDirection::Bidirectional => !to_device,
        };
        let checking = self.checking.clone();
        let h = &mut self.held[ti][i];
        let data = vec![tag; n];
        let r = s..s + n;
        match &mut h.buf {
            Buf::Page(p) => sync_one(&ctx, &checking, bound, device_writes, p, &data, r),
            Buf::Frag(f) => sync_one(&ctx, &checking, bound, device_writes, f, &data, r),
            #[cfg(feature = "bytes")]
            Buf::Bytes(_) => {
                // Immutable: just a read.
                h.check_content(&ctx);
                return;
            }
        }
        h.expect = Some((s, n, tag));
        h.check_content(&ctx);
    }

    #[cfg(feature = "bytes")]
    fn convert_to_bytes(&mut self, t: u8, item: u8) {
        let Some((ti, i)) = self.item(t, item) else {
            return;
        };
        if matches!(self.held[ti][i].buf, Buf::Bytes(_)) {
            return;
        }
        let ctx = self.ctx("into_bytes");
        let mut held = self.held[ti].swap_remove(i);
        let len = held.buf.len();
        let (bytes, under) = match held.buf {
            Buf::Page(p) => (p.into_bytes(), Under::Page),
            Buf::Frag(f) => (f.into_bytes(), Under::Frag),
            Buf::Bytes(_) => unreachable!(),
        };
        assert_eq!(bytes.len(), len, "{ctx}");
        let g = self.model.next_group;
        self.model.next_group += 1;
        self.model.groups.insert(g, 1);
        held.buf = Buf::Bytes(bytes);
        held.group = Some((g, under));
        held.check_content(&ctx);
        self.held[ti].push(held);
    }

    #[cfg(not(feature = "bytes"))]
    fn convert_to_bytes(&mut self, _: u8, _: u8) {}

    #[cfg(feature = "bytes")]
    fn clone_bytes(&mut self, t: u8, item: u8) {
        let Some((ti, i)) = self.item(t, item) else {
            return;
        };
        let h = &self.held[ti][i];
        let (Buf::Bytes(b), Some((g, under))) = (&h.buf, h.group) else {
            return;
        };
        let clone = Held {
            buf: Buf::Bytes(b.clone()),
            pool: h.pool,
            key: h.key,
            group: Some((g, under)),
            expect: h.expect,
        };
        *self.model.groups.get_mut(&g).expect("group known") += 1;
        self.held[ti].push(clone);
    }

    #[cfg(not(feature = "bytes"))]
    fn clone_bytes(&mut self, _: u8, _: u8) {}

    fn unbind(&mut self, how: UnbindHow) {
        let ctx = self.ctx("unbind");
        let Some(device) = &self.device else {
            return;
        };
        if !self.model.bound {
            if how == UnbindHow::DropDevice {
                self.device = None;
            } else {
                assert_eq!(device.unbind(), Err(UnbindError::AlreadyUnbound), "{ctx}");
            }
            return;
        }
        let want = self.model.unbind();
        let report = match how {
            UnbindHow::Call => device.unbind(),
            UnbindHow::OtherThread => thread::scope(|s| {
                s.spawn(|| device.unbind())
                    .join()
                    .expect("unbind on another thread panicked")
            }),
            UnbindHow::DropDevice => {
                self.device = None;
                return;
            }
        };
        let report = report.unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let got = ExpectedUnbind {
            pools: report.pools,
            pages_from_rings: report.pages_from_rings,
            pages_in_flight: report.pages_in_flight,
            bytes_unmapped: report.bytes_unmapped,
        };
        assert_eq!(got, want, "{ctx}: unbind report {report}");
        assert_eq!(report.mappings_left, 0, "{ctx}");
    }

    /// Compares everything observable with the model.
    fn check(&self, what: &str) {
        let ctx = format!("step {} {what}", self.step);
        let verdict = self.checking.verdict();
        if verdict.violations != 0 {
            panic!("{ctx}: violations:\n{}", self.checking.report());
        }
        let m = &self.model;
        assert_eq!(
            self.checking.live_mappings(),
            m.mapped(),
            "{ctx}: live mappings (checking device) vs model; model {m:#?}"
        );
        assert_eq!(self.checking.is_unbound(), !m.bound, "{ctx}: unbound?");
        if let Some(device) = &self.device {
            assert_eq!(device.is_bound(), m.bound, "{ctx}");
            assert_eq!(device.tracked_mappings(), m.mapped(), "{ctx}: tracker");
            let alive = m.pools.iter().filter(|p| p.alive && m.bound).count();
            assert_eq!(device.pools().len(), alive, "{ctx}: registered pools");
        }
        assert_eq!(
            self.source.double_frees(),
            0,
            "{ctx}: a page was freed twice"
        );
        assert_eq!(
            self.source.allocated(),
            m.allocated,
            "{ctx}: blocks allocated"
        );
        assert_eq!(self.source.freed(), m.freed, "{ctx}: blocks freed");
        assert_eq!(self.source.live(), m.blocks(), "{ctx}: blocks live");
        for (pool, mi) in self.pools.iter().flatten() {
            let p = &m.pools[*mi];
            let stats = pool.stats();
            assert_eq!(
                stats.pages_in_flight, p.out as u64,
                "{ctx}: pool {mi} pages in flight; stats {stats:#?}, model {p:#?}"
            );
            assert_eq!(
                stats.pages_mapped, p.mapped as u64,
                "{ctx}: pool {mi} pages mapped; stats {stats:#?}, model {p:#?}"
            );
            assert_eq!(pool.cached(), p.cache, "{ctx}: pool {mi} cached");
        }
        // Pages held: a pool's pages out are exactly those behind a held
        // buffer plus its current fragment page.
        let mut out: Vec<HashSet<u64>> = vec![HashSet::new(); m.pools.len()];
        for h in self.held.iter().flatten() {
            out[h.pool].insert(h.key);
        }
        for (mi, p) in m.pools.iter().enumerate() {
            if let Some((key, _)) = p.frag {
                out[mi].insert(key);
            }
            assert_eq!(
                out[mi].len(),
                p.out,
                "{ctx}: pool {mi}: pages behind held buffers vs model pages out"
            );
        }
    }

    /// Drops everything (held buffers, pools, then the device) with checks
    /// after each step, then the final checks: every page block freed
    /// exactly once, no mapping left, zero violations.
    pub fn finish(mut self) {
        for t in 0..THREADS {
            while let Some(h) = self.held[t].pop() {
                self.step += 1;
                self.drop_held(h, How::Here);
                self.check("teardown: drop held");
            }
        }
        for t in 0..POOLS as u8 {
            self.apply(&Op::DropPool { t });
        }
        self.apply(&Op::Unbind {
            how: UnbindHow::DropDevice,
        });
        let m = &self.model;
        assert!(m
            .pools
            .iter()
            .all(|p| p.out == 0 && p.mapped == 0 && p.blocks == 0));
        assert_eq!(self.source.live(), 0, "page blocks leaked");
        assert_eq!(self.source.allocated(), self.source.freed());
        assert_eq!(self.source.double_frees(), 0);
        assert_eq!(self.checking.live_mappings(), 0);
        assert!(self.checking.is_unbound());
        self.checking.assert_clean();
    }
}

fn to_cpu(past: u16) -> bool {
    past & 2 == 0
}

/// A page or a fragment, for [`sync_one`].
trait SyncBuf {
    fn dma(&self) -> DmaAddr;
    fn write(&mut self) -> &mut [u8];
    fn for_cpu(&mut self, r: std::ops::Range<usize>) -> Result<(), SyncError>;
    fn for_device(&mut self, r: std::ops::Range<usize>) -> Result<(), SyncError>;
}

impl SyncBuf for Page {
    fn dma(&self) -> DmaAddr {
        self.dma_addr()
    }
    fn write(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
    fn for_cpu(&mut self, r: std::ops::Range<usize>) -> Result<(), SyncError> {
        self.sync_for_cpu(r)
    }
    fn for_device(&mut self, r: std::ops::Range<usize>) -> Result<(), SyncError> {
        self.sync_for_device(r)
    }
}

impl SyncBuf for Frag {
    fn dma(&self) -> DmaAddr {
        self.dma_addr()
    }
    fn write(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
    fn for_cpu(&mut self, r: std::ops::Range<usize>) -> Result<(), SyncError> {
        self.sync_for_cpu(r)
    }
    fn for_device(&mut self, r: std::ops::Range<usize>) -> Result<(), SyncError> {
        self.sync_for_device(r)
    }
}

/// One transfer of `data` into range `r` of `b`. `device_writes`: the
/// device writes it and the CPU syncs it in; else the CPU writes it, syncs
/// it out, and the device must read exactly it. After unbind: the sync
/// fails with `Unbound` and the CPU, which now owns the memory for good,
/// writes it.
fn sync_one(
    ctx: &str,
    checking: &CheckingDevice,
    bound: bool,
    device_writes: bool,
    b: &mut impl SyncBuf,
    data: &[u8],
    r: std::ops::Range<usize>,
) {
    let at = b.dma().offset(r.start as u64);
    if !bound {
        let got = if device_writes {
            b.for_cpu(r.clone())
        } else {
            b.for_device(r.clone())
        };
        assert_eq!(got, Err(SyncError::Unbound), "{ctx}");
        b.write()[r].copy_from_slice(data);
        return;
    }
    if device_writes {
        checking
            .device_write(at, data)
            .unwrap_or_else(|v| panic!("{ctx}: device write: {v}"));
        b.for_cpu(r)
            .unwrap_or_else(|e| panic!("{ctx}: sync_for_cpu: {e}"));
    } else {
        b.write()[r.clone()].copy_from_slice(data);
        b.for_device(r)
            .unwrap_or_else(|e| panic!("{ctx}: sync_for_device: {e}"));
        let got = checking
            .device_read(at, data.len())
            .unwrap_or_else(|v| panic!("{ctx}: device read: {v}"));
        assert!(
            got == data,
            "{ctx}: the device read other bytes than the CPU synced"
        );
    }
}

/// Runs `ops` deterministically with full model checks, then tears down.
pub fn run(cfg: &Config, ops: &[Op]) {
    let mut h = Harness::new(cfg.clone());
    for op in ops {
        h.apply(op);
    }
    h.finish();
}

// ---------------------------------------------------------------------------
// Real threads

/// A buffer held by a real thread.
struct TItem {
    buf: Buf,
    direction: DmaDirection,
    expect: Option<(usize, usize, u8)>,
}

impl TItem {
    fn check_content(&self, ctx: &str) {
        if let Some((start, len, tag)) = self.expect {
            let bytes = &self.buf.read()[start..start + len];
            if let Some(i) = bytes.iter().position(|&b| b != tag) {
                panic!(
                    "{ctx}: content lost: byte {} is {:#x}, expected {tag:#x}",
                    start + i,
                    bytes[i]
                );
            }
        }
    }
}

/// What the real threads share.
struct Shared<'a> {
    cfg: &'a Config,
    checking: &'a CheckingDevice,
    source: &'a CountingPages,
    device: &'a Device,
    /// The simulated device (device_write / device_read) holds this shared;
    /// unbind holds it exclusively. A real driver quiesces its device before
    /// remove; without this the harness itself would touch the device after
    /// unbind. Pool calls (syncs, maps, unmaps) are not under it and race
    /// unbind freely.
    sim: &'a RwLock<()>,
    inboxes: Vec<mpsc::Sender<TItem>>,
}

/// One real thread: its pool (threads `0..POOLS`), its buffers, its inbox.
struct Actor<'a> {
    t: usize,
    sh: &'a Shared<'a>,
    pool: Option<PagePool>,
    held: Vec<TItem>,
    inbox: mpsc::Receiver<TItem>,
}

fn alloc_error_allowed(e: &AllocError) -> bool {
    matches!(
        e,
        AllocError::Unbound | AllocError::Map(DmaError::Injected) | AllocError::OutOfMemory { .. }
    )
}

impl Actor<'_> {
    fn ctx(&self, what: &str) -> String {
        format!("thread {}: {what}", self.t)
    }

    fn take_inbox(&mut self) {
        while let Ok(item) = self.inbox.try_recv() {
            self.held.push(item);
        }
    }

    fn pick(&self, item: u8) -> Option<usize> {
        let n = self.held.len();
        (n > 0).then(|| usize::from(item) % n)
    }

    fn alloc(&mut self) -> Option<TItem> {
        let pool = self.pool.as_mut()?;
        match pool.alloc() {
            Ok(page) => Some(TItem {
                buf: Buf::Page(page),
                direction: pool.direction(),
                expect: None,
            }),
            Err(e) => {
                assert!(
                    alloc_error_allowed(&e),
                    "{}",
                    self.ctx(&format!("alloc: {e}"))
                );
                None
            }
        }
    }

    fn exec(&mut self, op: &Op) {
        self.take_inbox();
        match *op {
            Op::Alloc { .. } => {
                if let Some(item) = self.alloc() {
                    self.held.push(item);
                }
            }
            Op::AllocFrag { size, .. } => {
                let Some(pool) = self.pool.as_mut() else {
                    return;
                };
                let page_len = pool.page_len();
                match pool.alloc_frag(usize::from(size)) {
                    Ok(frag) => {
                        assert_eq!(frag.len(), usize::from(size));
                        self.held.push(TItem {
                            buf: Buf::Frag(frag),
                            direction: pool.direction(),
                            expect: None,
                        });
                    }
                    Err(AllocError::FragmentSize { .. })
                        if size == 0 || usize::from(size) > page_len => {}
                    Err(e) => {
                        assert!(
                            alloc_error_allowed(&e),
                            "{}",
                            self.ctx(&format!("alloc_frag: {e}"))
                        )
                    }
                }
            }
            Op::RecycleDirect { item, .. } => {
                let (Some(i), Some(_)) = (self.pick(item), &self.pool) else {
                    return;
                };
                if matches!(self.held[i].buf, Buf::Page(_)) {
                    let Buf::Page(page) = self.held.swap_remove(i).buf else {
                        unreachable!()
                    };
                    self.pool.as_mut().unwrap().recycle_direct(page);
                }
            }
            Op::Drop { item, how, .. } => {
                if let Some(i) = self.pick(item) {
                    let item = self.held.swap_remove(i);
                    match (how, item.buf) {
                        (How::Spawned | How::Worker, buf) => thread::spawn(move || drop(buf))
                            .join()
                            .expect("drop on another thread panicked"),
                        (How::Bulk, Buf::Page(page)) => put_bulk([page]),
                        (_, buf) => drop(buf),
                    }
                }
            }
            Op::Send { item, to, .. } => {
                if let Some(i) = self.pick(item) {
                    let item = self.held.swap_remove(i);
                    // A receiver that already finished leaves it in its
                    // inbox, which the teardown empties.
                    self.sh.inboxes[usize::from(to) % THREADS]
                        .send(item)
                        .expect("inboxes outlive the threads");
                }
            }
            Op::PutBulk { n, .. } => {
                let mut pages = Vec::new();
                let mut i = 0;
                while i < self.held.len() && pages.len() <= usize::from(n % 8) {
                    if matches!(self.held[i].buf, Buf::Page(_)) {
                        let Buf::Page(page) = self.held.remove(i).buf else {
                            unreachable!()
                        };
                        pages.push(page);
                    } else {
                        i += 1;
                    }
                }
                put_bulk(pages);
            }
            Op::FillRing { extra, how, .. } => {
                if self.pool.is_none() {
                    return;
                }
                let n = self.sh.cfg.pools[self.t].ring_size + 1 + usize::from(extra % 3);
                let got: Vec<TItem> = (0..n).map_while(|_| self.alloc()).collect();
                match how {
                    How::Bulk => put_bulk(got.into_iter().filter_map(|i| match i.buf {
                        Buf::Page(p) => Some(p),
                        _ => None,
                    })),
                    How::Spawned | How::Worker => thread::spawn(move || drop(got))
                        .join()
                        .expect("drop on another thread panicked"),
                    How::Here => drop(got),
                }
            }
            Op::Sync {
                item,
                start,
                len,
                tag,
                to_device,
                ..
            } => self.sync(item, start, len, tag, to_device),
            Op::SyncOutOfRange { item, past, .. } => {
                let Some(i) = self.pick(item) else { return };
                let len = self.held[i].buf.len();
                let (s, e) = (usize::from(past) % len, len + 1 + usize::from(past));
                let got = match &mut self.held[i].buf {
                    Buf::Page(p) => p.sync_for_cpu(s..e),
                    Buf::Frag(f) => f.sync_for_device(s..e),
                    #[cfg(feature = "bytes")]
                    Buf::Bytes(_) => return,
                };
                assert_eq!(
                    got,
                    Err(SyncError::OutOfRange {
                        start: s,
                        end: e,
                        len
                    })
                );
            }
            Op::Check { item, .. } => {
                if let Some(i) = self.pick(item) {
                    self.held[i].check_content(&self.ctx("check"));
                }
            }
            Op::SetDirtyLen { item, len, .. } => {
                if let Some(i) = self.pick(item) {
                    if let Buf::Page(p) = &mut self.held[i].buf {
                        p.set_dirty_len(usize::from(len));
                    }
                }
            }
            #[cfg(feature = "bytes")]
            Op::IntoBytes { item, .. } => {
                if let Some(i) = self.pick(item) {
                    let it = self.held.swap_remove(i);
                    let buf = match it.buf {
                        Buf::Page(p) => Buf::Bytes(p.into_bytes()),
                        Buf::Frag(f) => Buf::Bytes(f.into_bytes()),
                        b => b,
                    };
                    let it = TItem { buf, ..it };
                    it.check_content(&self.ctx("into_bytes"));
                    self.held.push(it);
                }
            }
            #[cfg(feature = "bytes")]
            Op::CloneBytes { item, .. } => {
                if let Some(i) = self.pick(item) {
                    if let Buf::Bytes(b) = &self.held[i].buf {
                        let clone = TItem {
                            buf: Buf::Bytes(b.clone()),
                            direction: self.held[i].direction,
                            expect: self.held[i].expect,
                        };
                        self.held.push(clone);
                    }
                }
            }
            #[cfg(not(feature = "bytes"))]
            Op::IntoBytes { .. } | Op::CloneBytes { .. } => {}
            Op::DropPool { .. } => drop(self.pool.take()),
            Op::NewPool { .. } => {
                if self.t < POOLS && self.pool.is_none() {
                    match build_pool(self.sh.device, &self.sh.cfg.pools[self.t], self.sh.source) {
                        Ok(pool) => self.pool = Some(pool),
                        Err(e) => assert_eq!(e, BuildError::Unbound, "{}", self.ctx("new pool")),
                    }
                }
            }
            Op::Unbind { .. } => {
                let _quiet = self.sh.sim.write().unwrap();
                if let Ok(report) = self.sh.device.unbind() {
                    assert_eq!(report.mappings_left, 0, "{}", self.ctx("unbind"));
                }
                assert_eq!(
                    self.sh.checking.live_mappings(),
                    0,
                    "{}",
                    self.ctx("after unbind")
                );
            }
            Op::FailMaps { n } => self.sh.checking.fail_next_maps(u64::from(n % 4)),
            Op::FailPageAllocs { n } => self.sh.source.fail_next(usize::from(n % 4)),
        }
        if self.sh.checking.verdict().violations != 0 {
            panic!(
                "{}: violations:\n{}",
                self.ctx(&format!("after {op:?}")),
                self.sh.checking.report()
            );
        }
    }

    fn sync(&mut self, item: u8, start: u16, len: u16, tag: u8, to_device: bool) {
        let Some(i) = self.pick(item) else { return };
        let ctx = self.ctx("sync");
        let sh = self.sh;
        let it = &mut self.held[i];
        let (s, n) = range_in(it.buf.len(), start, len);
        let r = s..s + n;
        let data = vec![tag; n];
        let device_writes = match it.direction {
            DmaDirection::FromDevice => true,
            DmaDirection::ToDevice => false,
            DmaDirection::Bidirectional => !to_device,
        };
        let b: &mut dyn SyncBufDyn = match &mut it.buf {
            Buf::Page(p) => p,
            Buf::Frag(f) => f,
            #[cfg(feature = "bytes")]
            Buf::Bytes(_) => return it.check_content(&ctx),
        };
        let at = b.dma_dyn().offset(s as u64);
        let synced = if device_writes {
            let written = {
                let _sim = sh.sim.read().unwrap();
                !sh.checking.is_unbound()
                    && sh
                        .checking
                        .device_write(at, &data)
                        .map(|()| true)
                        .unwrap_or_else(|v| panic!("{ctx}: device write: {v}"))
            };
            match b.for_cpu_dyn(r.clone()) {
                Ok(()) => {
                    assert!(written, "{ctx}: sync_for_cpu succeeded after unbind");
                    true
                }
                Err(SyncError::Unbound) => false,
                Err(e) => panic!("{ctx}: sync_for_cpu: {e}"),
            }
        } else {
            b.write_dyn()[r.clone()].copy_from_slice(&data);
            match b.for_device_dyn(r.clone()) {
                Ok(()) => {
                    let _sim = sh.sim.read().unwrap();
                    if !sh.checking.is_unbound() {
                        let got = sh
                            .checking
                            .device_read(at, n)
                            .unwrap_or_else(|v| panic!("{ctx}: device read: {v}"));
                        assert!(got == data, "{ctx}: the device read other bytes");
                    }
                }
                Err(SyncError::Unbound) => {}
                Err(e) => panic!("{ctx}: sync_for_device: {e}"),
            }
            true
        };
        if !synced {
            // Unbound: the CPU owns the memory for good; write it directly.
            b.write_dyn()[r].copy_from_slice(&data);
        }
        it.expect = Some((s, n, tag));
        it.check_content(&ctx);
    }
}

/// Object-safe twin of [`SyncBuf`].
trait SyncBufDyn {
    fn dma_dyn(&self) -> DmaAddr;
    fn write_dyn(&mut self) -> &mut [u8];
    fn for_cpu_dyn(&mut self, r: std::ops::Range<usize>) -> Result<(), SyncError>;
    fn for_device_dyn(&mut self, r: std::ops::Range<usize>) -> Result<(), SyncError>;
}

impl<T: SyncBuf> SyncBufDyn for T {
    fn dma_dyn(&self) -> DmaAddr {
        self.dma()
    }
    fn write_dyn(&mut self) -> &mut [u8] {
        self.write()
    }
    fn for_cpu_dyn(&mut self, r: std::ops::Range<usize>) -> Result<(), SyncError> {
        self.for_cpu(r)
    }
    fn for_device_dyn(&mut self, r: std::ops::Range<usize>) -> Result<(), SyncError> {
        self.for_device(r)
    }
}

/// Runs the ops of each logical thread on a real OS thread of its own, all
/// concurrently (ops without a thread, like unbind, go to thread
/// `index % THREADS`). No model: the checks are zero violations after every
/// op, content after every sync that succeeded, and at the end (everything
/// dropped) every block freed exactly once and no mapping left.
pub fn run_threaded(cfg: &Config, ops: &[Op]) {
    let checking = checking_device(cfg);
    let source = CountingPages::default();
    let device = Device::new(checking.clone());
    let sim = RwLock::new(());
    let mut per_thread: [Vec<Op>; THREADS] = Default::default();
    for (i, op) in ops.iter().enumerate() {
        let t = match *op {
            Op::Alloc { t }
            | Op::AllocFrag { t, .. }
            | Op::RecycleDirect { t, .. }
            | Op::Drop { t, .. }
            | Op::Send { t, .. }
            | Op::PutBulk { t, .. }
            | Op::FillRing { t, .. }
            | Op::Sync { t, .. }
            | Op::SyncOutOfRange { t, .. }
            | Op::Check { t, .. }
            | Op::SetDirtyLen { t, .. }
            | Op::IntoBytes { t, .. }
            | Op::CloneBytes { t, .. }
            | Op::DropPool { t }
            | Op::NewPool { t } => usize::from(t) % THREADS,
            Op::Unbind { .. } | Op::FailMaps { .. } | Op::FailPageAllocs { .. } => i % THREADS,
        };
        per_thread[t].push(*op);
    }
    let (inboxes, mut receivers): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| mpsc::channel()).unzip();
    let shared = Shared {
        cfg,
        checking: &checking,
        source: &source,
        device: &device,
        sim: &sim,
        inboxes,
    };
    let mut pools: Vec<Option<PagePool>> = cfg
        .pools
        .iter()
        .map(|c| Some(build_pool(&device, c, &source).expect("valid config")))
        .collect();
    let leftovers: Vec<(Vec<TItem>, Option<PagePool>, mpsc::Receiver<TItem>)> =
        thread::scope(|s| {
            let handles: Vec<_> = per_thread
                .iter()
                .enumerate()
                .map(|(t, my_ops)| {
                    let mut actor = Actor {
                        t,
                        sh: &shared,
                        pool: pools.get_mut(t).and_then(Option::take),
                        held: Vec::new(),
                        inbox: receivers.remove(0),
                    };
                    s.spawn(move || {
                        for op in my_ops {
                            actor.exec(op);
                        }
                        (actor.held, actor.pool, actor.inbox)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
    drop(shared);
    for (held, pool, inbox) in leftovers {
        drop(held);
        drop(inbox.try_iter().collect::<Vec<_>>());
        drop(pool);
    }
    drop(device);
    assert_eq!(source.double_frees(), 0, "a page was freed twice");
    assert_eq!(source.live(), 0, "page blocks leaked");
    assert_eq!(source.allocated(), source.freed());
    assert_eq!(checking.live_mappings(), 0);
    assert!(checking.is_unbound());
    checking.assert_clean();
}
