//! The operation interpreter and reference model shared by three drivers
//! (it lives with the tests; the fuzz target includes it from here):
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
//! One [`CheckingDevice`] in record mode behind a [`FaultyOps`] wrapper, one
//! [`Device`] on it, up to [`POOLS`] pools (pool `i` owned by logical thread
//! `i`), all taking page memory from one [`CountingPages`] source.
//! [`THREADS`] logical threads each hold their own pages, fragments and
//! `Bytes`; every [`Op`] names the logical thread that acts, so the input
//! chooses the interleaving.
//!
//! - [`run`] (deterministic): every op runs on the calling OS thread, except
//!   that drops may really happen on a spawned thread (spawn + join) or on a
//!   worker thread (send + wait), and unbind may run on a spawned thread.
//!   After every op the [`Harness`] compares the real state with a reference
//!   [`Model`]: pages held, pages in flight (pool stats), pages cached,
//!   mappings live (checking device and tracker), page blocks live,
//!   allocated and freed (counting source), the unbind report, every
//!   allocation result, whether an armed callback fault fired (and the
//!   panic it raised); and zero violations.
//! - [`run_threaded`]: the ops of each logical thread run on a real OS thread
//!   of its own, concurrently; items sent between threads go through
//!   channels. Only model-free invariants are checked (zero violations,
//!   content after every successful sync), and at the end the same leak
//!   checks.
//!
//! # Callback faults
//!
//! [`Op::ArmPanic`] and [`Op::ArmDrop`] arm the one fault slot ([`Faults`])
//! shared by the backend wrapper and the page source: the next call of the
//! chosen [`Callback`] panics (with an [`Injected`] payload), or drops one of
//! the interpreter's held buffers from inside the call (a re-entrant drop:
//! the page goes back to its pool while the pool is inside a device call or
//! a page-source call). `map` and `alloc_pages` act before the call takes
//! effect (a panicking `map` maps nothing, a panicking `alloc_pages` returns
//! no block); `unmap_batch`, the syncs, `on_unbind` and `free_pages` act
//! after it (a call that panics counts as made). The interpreter runs every
//! pool call under `catch_unwind`; an [`Injected`] panic is expected exactly
//! when the model says the fault fires in that call, any other panic is a
//! failure.
//!
//! At the end everything is dropped (held buffers, pools, device, the armed
//! fault's buffer) and every page block must have been freed exactly once,
//! no mapping may be left, no device call may follow unbind and no
//! violation may be recorded. Any failure panics, which is a crash for the
//! fuzzer and a (shrunk) failure for proptest.
//!
#![allow(dead_code)]

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once, PoisonError, RwLock};
use std::thread;

use pagepool::checking::{CheckMode, CheckingDevice};
use pagepool::{
    put_bulk, AllocError, BuildError, CpuAccess, Device, DmaAddr, DmaDirection, DmaError,
    DmaMapping, DmaOps, Frag, GlobalPages, OutOfMemory, Page, PagePool, PageSource, SyncError,
    UnbindError, FRAG_ALIGN, PAGE_SIZE,
};

/// Logical threads.
pub const THREADS: usize = 3;
/// Pool slots; slot `i` is owned by logical thread `i`.
pub const POOLS: usize = 2;
/// Longest op sequence [`decode`] produces.
pub const MAX_OPS: usize = 512;

// ---------------------------------------------------------------------------
// Callback faults

/// A callback the pool makes into user code: a [`DmaOps`] method of the
/// backend or a [`PageSource`] method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Callback {
    /// `DmaOps::map` (the fault acts before the map).
    Map,
    /// `DmaOps::unmap_batch` (after the unmaps).
    UnmapBatch,
    /// `DmaOps::sync_for_device` (after the sync).
    SyncForDevice,
    /// `DmaOps::sync_for_cpu` (after the sync).
    SyncForCpu,
    /// `DmaOps::on_unbind` (after it).
    OnUnbind,
    /// `PageSource::alloc_pages` (before the allocation).
    AllocPages,
    /// `PageSource::free_pages` (after the block is freed).
    FreePages,
}

const CALLBACKS: [Callback; 7] = [
    Callback::Map,
    Callback::UnmapBatch,
    Callback::SyncForDevice,
    Callback::SyncForCpu,
    Callback::OnUnbind,
    Callback::AllocPages,
    Callback::FreePages,
];

impl Callback {
    /// Any byte names a callback.
    pub fn from_byte(b: u8) -> Self {
        CALLBACKS[usize::from(b) % CALLBACKS.len()]
    }

    /// The byte [`from_byte`](Self::from_byte) maps back to `self`.
    pub fn code(self) -> u8 {
        CALLBACKS.iter().position(|&c| c == self).expect("listed") as u8
    }

    /// Every callback.
    pub fn all() -> [Callback; 7] {
        CALLBACKS
    }
}

/// The payload of a panic raised by an armed fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injected(pub Callback);

/// What an armed fault does.
enum Action {
    Panic,
    /// Drops the buffer (a `Held` or a `TItem`) from inside the call.
    Drop(Box<dyn Any + Send>),
}

struct Trap {
    at: Callback,
    action: Action,
}

/// The one fault slot, shared by the backend wrapper ([`FaultyOps`]) and the
/// page source ([`CountingPages`]). A fault is one-shot: the first call of
/// its callback takes it out of the slot (under the lock) and then acts
/// (outside the lock, so a re-entrant drop may make callbacks of its own).
/// Arming replaces the fault armed before and hands back its buffer, if it
/// had one. A thread that is already unwinding never fires a fault (a
/// second panic would abort the process).
#[derive(Clone, Default)]
pub struct Faults {
    slot: Arc<Mutex<Option<Trap>>>,
}

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Trap>> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn arm(&self, at: Callback, action: Action) -> Option<Box<dyn Any + Send>> {
        let old = self.lock().replace(Trap { at, action });
        match old {
            Some(Trap {
                action: Action::Drop(item),
                ..
            }) => Some(item),
            _ => None,
        }
    }

    /// Arms a panic in the next call of `at`.
    pub fn arm_panic(&self, at: Callback) -> Option<Box<dyn Any + Send>> {
        self.arm(at, Action::Panic)
    }

    /// Arms a drop of `item` inside the next call of `at`.
    pub fn arm_drop(&self, at: Callback, item: Box<dyn Any + Send>) -> Option<Box<dyn Any + Send>> {
        self.arm(at, Action::Drop(item))
    }

    /// Takes the armed fault out; hands back its buffer, if it had one.
    pub fn disarm(&self) -> Option<Box<dyn Any + Send>> {
        match self.lock().take() {
            Some(Trap {
                action: Action::Drop(item),
                ..
            }) => Some(item),
            _ => None,
        }
    }

    /// The callback the armed fault waits for.
    pub fn armed(&self) -> Option<Callback> {
        self.lock().as_ref().map(|t| t.at)
    }

    /// Called by the wrappers at the point where a fault of `at` acts.
    fn fire(&self, at: Callback) {
        if thread::panicking() {
            return;
        }
        let trap = {
            let mut slot = self.lock();
            let fires = slot.as_ref().is_some_and(|t| t.at == at);
            if fires {
                slot.take()
            } else {
                None
            }
        };
        match trap.map(|t| t.action) {
            None => {}
            Some(Action::Panic) => std::panic::panic_any(Injected(at)),
            Some(Action::Drop(item)) => drop(item),
        }
    }
}

/// Runs `f`; an [`Injected`] panic comes back as `Err`, any other panic goes
/// on (a failure).
pub fn catching<R>(f: impl FnOnce() -> R) -> Result<R, Injected> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => Ok(r),
        Err(payload) => match payload.downcast::<Injected>() {
            Ok(injected) => Err(*injected),
            Err(payload) => resume_unwind(payload),
        },
    }
}

/// Runs `f` on a fresh OS thread and waits for it; a panic there goes on
/// here, payload unchanged.
fn on_spawned_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|payload| resume_unwind(payload))
    })
}

/// Silences the panic hook for [`Injected`] panics (they are expected and
/// caught); every other panic reaches the hook installed before (the
/// default one, or libFuzzer's, which aborts). Installed once per process.
pub fn quiet_injected_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<Injected>() {
                previous(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------
// The backend

/// The backend the pools see: a [`CheckingDevice`] behind the fault slot.
/// Every method delegates; `map` lets an armed fault act first,
/// `unmap_batch`, the syncs and `on_unbind` after the checking device has
/// performed the call.
pub struct FaultyOps {
    inner: CheckingDevice,
    faults: Faults,
}

impl FaultyOps {
    /// Wraps `inner`; faults come from `faults`.
    pub fn new(inner: CheckingDevice, faults: Faults) -> Self {
        Self { inner, faults }
    }
}

impl DmaOps for FaultyOps {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        self.faults.fire(Callback::Map);
        // SAFETY: forwarded `DmaOps::map` contract.
        unsafe { self.inner.map(cpu, len, direction) }
    }

    unsafe fn unmap(&self, mapping: DmaMapping) {
        // SAFETY: forwarded `DmaOps::unmap` contract.
        unsafe { self.inner.unmap(mapping) }
    }

    unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) {
        // SAFETY: forwarded `DmaOps::unmap_batch` contract.
        unsafe { self.inner.unmap_batch(mappings) };
        self.faults.fire(Callback::UnmapBatch);
    }

    unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded `DmaOps::sync_for_device` contract.
        unsafe { self.inner.sync_for_device(mapping, offset, len) };
        self.faults.fire(Callback::SyncForDevice);
    }

    unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded `DmaOps::sync_for_cpu` contract.
        unsafe { self.inner.sync_for_cpu(mapping, offset, len) };
        self.faults.fire(Callback::SyncForCpu);
    }

    fn needs_sync(&self) -> bool {
        self.inner.needs_sync()
    }

    fn checks_cpu_access(&self) -> bool {
        self.inner.checks_cpu_access()
    }

    fn cpu_access(&self, mapping: DmaMapping, offset: usize, len: usize, access: CpuAccess) {
        self.inner.cpu_access(mapping, offset, len, access);
    }

    fn on_unbind(&self) {
        self.inner.on_unbind();
        self.faults.fire(Callback::OnUnbind);
    }
}

// ---------------------------------------------------------------------------
// Page source

/// A page source that records every block it hands out, checks each is freed
/// exactly once, can be told to fail the next allocations, and lets an
/// armed fault act in `alloc_pages` (before allocating) and `free_pages`
/// (after freeing).
#[derive(Clone, Default)]
pub struct CountingPages {
    inner: Arc<CountingInner>,
    faults: Faults,
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
    /// A source whose faults come from `faults`.
    pub fn new(faults: Faults) -> Self {
        Self {
            inner: Arc::default(),
            faults,
        }
    }
    fn live_set(&self) -> std::sync::MutexGuard<'_, HashSet<usize>> {
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
    /// Blocks handed out and not given back.
    pub fn live(&self) -> usize {
        self.live_set().len()
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
// bookkeeping never touches the blocks, and a fault never hands out or
// keeps a block (a panicking alloc_pages allocates nothing, a panicking
// free_pages has freed its block).
unsafe impl PageSource for CountingPages {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        self.faults.fire(Callback::AllocPages);
        let failing = self
            .inner
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(OutOfMemory);
        }
        let block = GlobalPages.alloc_pages(order)?;
        self.live_set().insert(block.as_ptr() as usize);
        self.inner.allocated.fetch_add(1, Ordering::SeqCst);
        Ok(block)
    }

    unsafe fn free_pages(&self, block: NonNull<u8>, order: u32) {
        let was_live = self.live_set().remove(&(block.as_ptr() as usize));
        if !was_live {
            // Do not pass it on: a double free would corrupt the heap.
            self.inner.double_frees.fetch_add(1, Ordering::SeqCst);
            return;
        }
        self.inner.freed.fetch_add(1, Ordering::SeqCst);
        // SAFETY: the block came from GlobalPages with this order and is
        // freed once (checked just above).
        unsafe { GlobalPages.free_pages(block, order) };
        self.faults.fire(Callback::FreePages);
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
    /// Arm the next call of `at` to panic (replacing the fault armed
    /// before; a buffer it held goes back to the thread that armed it).
    ArmPanic { at: Callback },
    /// Arm the next call of `at` to drop one of thread `t`'s held buffers
    /// from inside the call (replacing the fault armed before, as above).
    /// The buffer leaves the thread now; until the fault fires (or the end
    /// of the run) it sits in the fault slot.
    ArmDrop { t: u8, item: u8, at: Callback },
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
///
/// Ops, by `tag % 20` (fields one byte each unless marked u16, little
/// endian): 0 `Alloc` t; 1 `AllocFrag` t size:u16; 2 `RecycleDirect` t
/// item; 3 `Drop` t item how; 4 `Send` t item to; 5 `PutBulk` t n;
/// 6 `FillRing` t extra how; 7 `Sync` t item start:u16 len:u16 tag (bit 0:
/// to_device); 8 `SyncOutOfRange` t item past:u16; 9 `Check` t item;
/// 10 `SetDirtyLen` t item len:u16; 11 `IntoBytes` t item; 12 `CloneBytes`
/// t item; 13 `DropPool` t; 14 `NewPool` t; 15 `Unbind` how; 16 `FailMaps`
/// n; 17 `FailPageAllocs` n; 18 `ArmPanic` at; 19 `ArmDrop` t item at.
/// `at % 7` names the [`Callback`]: 0 map, 1 unmap_batch, 2
/// sync_for_device, 3 sync_for_cpu, 4 on_unbind, 5 alloc_pages,
/// 6 free_pages.
pub fn decode(data: &[u8]) -> (Config, bool, Vec<Op>) {
    let mut c = Cursor { data, pos: 0 };
    let threaded = c.byte() & 1 == 1;
    let pools = [0; POOLS].map(|_| pool_cfg_from([c.byte(), c.byte(), c.byte(), c.byte()]));
    let mut ops = Vec::new();
    while !c.done() && ops.len() < MAX_OPS {
        let tag = c.byte();
        // New op codes are appended (the modulus grows), so inputs written
        // for fewer ops decode as before.
        let op = match tag % 20 {
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
            17 => Op::FailPageAllocs { n: c.byte() },
            18 => Op::ArmPanic {
                at: Callback::from_byte(c.byte()),
            },
            _ => Op::ArmDrop {
                t: c.byte(),
                item: c.byte(),
                at: Callback::from_byte(c.byte()),
            },
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
            Op::ArmPanic { at } => out.extend([18, at.code()]),
            Op::ArmDrop { t, item, at } => out.extend([19, t, item, at.code()]),
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

    fn is_bytes(&self) -> bool {
        match self {
            Buf::Page(_) | Buf::Frag(_) => false,
            #[cfg(feature = "bytes")]
            Buf::Bytes(_) => true,
        }
    }
}

/// Drops every buffer, each on its own (a panicking drop does not turn the
/// drops after it into drops during unwinding), then raises the first
/// injected panic again.
fn drop_each(bufs: Vec<Buf>) {
    let mut first = None;
    for buf in bufs {
        if let Err(injected) = catching(|| drop(buf)) {
            first.get_or_insert(injected);
        }
    }
    if let Some(injected) = first {
        std::panic::panic_any(injected);
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
    /// The page's dirty length (`Page::set_dirty_len`; `usize::MAX` until
    /// set): whether its sync on recycle makes a device call.
    dirty: usize,
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

    fn model(&self) -> ItemModel {
        ItemModel {
            pool: self.pool,
            key: self.key,
            kind: kind_of(&self.buf),
            group: self.group,
            dirty: self.dirty,
        }
    }
}

/// A long-lived thread that drops what it is sent; a drop that panics is
/// reported back to the sender.
struct Worker {
    tx: Option<mpsc::Sender<Buf>>,
    ack: mpsc::Receiver<Option<Box<dyn Any + Send>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Worker {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel::<Buf>();
        let (ack_tx, ack) = mpsc::channel();
        let handle = thread::spawn(move || {
            for buf in rx {
                let panicked = catch_unwind(AssertUnwindSafe(|| drop(buf))).err();
                if ack_tx.send(panicked).is_err() {
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

    /// Drops `buf` on the worker; a panic there goes on here.
    fn drop_there(&self, buf: Buf) {
        self.tx.as_ref().unwrap().send(buf).expect("worker alive");
        if let Some(payload) = self.ack.recv().expect("worker acknowledges") {
            resume_unwind(payload);
        }
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
    /// The device lists the pool as open (`Device::pools`, until unbind).
    registered: bool,
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

/// A held buffer as the model sees it.
#[derive(Clone, Debug)]
struct ItemModel {
    pool: usize,
    key: u64,
    kind: Under,
    group: Option<(u64, Under)>,
    dirty: usize,
}

/// The model's armed fault.
#[derive(Clone, Debug)]
enum TrapModel {
    Panic(Callback),
    Drop(Callback, ItemModel),
}

impl TrapModel {
    fn at(&self) -> Callback {
        match self {
            TrapModel::Panic(at) | TrapModel::Drop(at, _) => *at,
        }
    }
}

/// What a pool call does, as far as faults go: returns, or raises the
/// injected panic of a callback.
type Step = Result<(), Injected>;

/// Why an allocation gave no buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fail {
    Alloc(AllocError),
    Panicked(Injected),
}

impl From<Injected> for Fail {
    fn from(i: Injected) -> Self {
        Fail::Panicked(i)
    }
}

/// Mappings per `unmap_batch` call (the pool's batch size).
const UNMAP_BATCH: usize = 64;

/// The reference model of the device, its pools and its pages.
///
/// Besides the counts it follows every callback the pool makes, in order
/// (page source allocations and frees, maps, unmap batches, syncs,
/// `on_unbind`), to know where an armed fault fires and what the pool does
/// about it.
#[derive(Clone, Debug, Default)]
pub struct Model {
    bound: bool,
    /// `unbind` has closed the gates and not yet finished its unmaps: pages
    /// released now are handed to it and freed at its end.
    unbinding: bool,
    /// Pages handed to `unbind` (their pools).
    deferred: Vec<usize>,
    /// The thread unwinds from an injected panic: syncs on recycle are
    /// skipped (the page is released instead) and faults do not fire.
    unwinding: bool,
    /// The armed fault.
    trap: Option<TrapModel>,
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
            registered: true,

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

    /// A call of `at` takes effect: the armed fault fires if it waits for
    /// `at` (a re-entrant drop runs here, inside the call).
    fn hit(&mut self, at: Callback) -> Step {
        if self.unwinding || self.trap.as_ref().map(TrapModel::at) != Some(at) {
            return Ok(());
        }
        match self.trap.take().expect("checked") {
            TrapModel::Panic(at) => Err(Injected(at)),
            TrapModel::Drop(_, item) => {
                // Only one fault is armed at a time, so nothing the dropped
                // buffer's return does can fire another.
                let nested = self.dropped(&item);
                assert_eq!(nested, Ok(()), "model: a fault fired inside a fault");
                Ok(())
            }
        }
    }

    /// Runs `f` as the pool does while a panic unwinds through it.
    fn unwinding<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let was = std::mem::replace(&mut self.unwinding, true);
        let r = f(self);
        self.unwinding = was;
        r
    }

    /// `PageSource::free_pages` of a block that never became a page.
    fn free_block(&mut self) -> Step {
        self.freed += 1;
        self.hit(Callback::FreePages)
    }

    /// `PageSource::free_pages` of a page of pool `m`.
    fn free_page(&mut self, m: usize) -> Step {
        self.pools[m].blocks -= 1;
        self.free_block()
    }

    /// `release_pages` of `n` pages of pool `m`: per batch of up to
    /// [`UNMAP_BATCH`], one `unmap_batch` then one `free_pages` per page,
    /// every step made whatever the others do, the first panic raised at
    /// the end. Once `unbind` has begun the pages go to it (freed at its
    /// end), or are freed at once if it has finished; no device call.
    fn release_pages(&mut self, m: usize, n: usize) -> Step {
        let mut r = Ok(());
        let mut left = n;
        while left > 0 {
            if !self.bound {
                if self.unbinding {
                    self.deferred.extend(std::iter::repeat_n(m, left));
                } else {
                    for _ in 0..left {
                        let f = self.free_page(m);
                        r = r.and(f);
                    }
                }
                break;
            }
            let chunk = left.min(UNMAP_BATCH);
            left -= chunk;
            self.pools[m].mapped -= chunk;
            let u = self.hit(Callback::UnmapBatch);
            r = r.and(u);
            for _ in 0..chunk {
                let f = self.free_page(m);
                r = r.and(f);
            }
        }
        r
    }

    /// A page released after its sync on recycle panicked (the guard that
    /// held it runs while the panic unwinds).
    fn release_unwinding(&mut self, m: usize) {
        let nested = self.unwinding(|s| s.release_pages(m, 1));
        assert_eq!(nested, Ok(()), "model: no fault fires while unwinding");
    }

    /// `sync_on_recycle`: `Ok(false)` when the page must be released
    /// instead (device unbinding, thread unwinding).
    fn sync_on_recycle(&mut self, m: usize, dirty: usize) -> Result<bool, Injected> {
        let Some((_, max_len)) = self.pools[m].cfg.sync else {
            return Ok(true);
        };
        if self.unwinding || !self.bound {
            return Ok(false);
        }
        if dirty.min(max_len) > 0 {
            self.hit(Callback::SyncForDevice)?;
        }
        Ok(true)
    }

    fn ring_push(&mut self, m: usize) -> Step {
        let p = &mut self.pools[m];
        if p.ring == p.cfg.ring_size {
            self.release_pages(m, 1)
        } else {
            p.ring += 1;
            Ok(())
        }
    }

    /// `recycle_remote`: a page of pool `m` comes back from any thread.
    fn recycle_remote(&mut self, m: usize, dirty: usize) -> Step {
        if self.pools[m].closed {
            return self.release_pages(m, 1);
        }
        match self.sync_on_recycle(m, dirty) {
            Err(injected) => {
                self.release_unwinding(m);
                Err(injected)
            }
            Ok(false) => self.release_pages(m, 1),
            Ok(true) => self.ring_push(m),
        }
    }

    /// A page comes back from any thread (drop, last fragment).
    fn ret_remote(&mut self, m: usize, dirty: usize) -> Step {
        self.pools[m].out -= 1;
        self.recycle_remote(m, dirty)
    }

    /// `recycle_direct` of a page of pool `m` into pool `target`. After
    /// unbind the page is released at once, like on every other return
    /// path.
    fn ret_direct(&mut self, target: usize, m: usize, dirty: usize) -> Step {
        if m != target {
            return self.ret_remote(m, dirty);
        }
        self.pools[m].out -= 1;
        if self.pools[m].closed {
            return self.release_pages(m, 1);
        }
        match self.sync_on_recycle(m, dirty) {
            Err(injected) => {
                self.release_unwinding(m);
                return Err(injected);
            }
            Ok(false) => return self.release_pages(m, 1),
            Ok(true) => {}
        }
        let p = &mut self.pools[m];
        if p.cache < p.cfg.cache_size {
            p.cache += 1;
            Ok(())
        } else {
            self.ring_push(m)
        }
    }

    /// `put_bulk` of pages `(pool, dirty length)`, in order: runs of pages
    /// of one pool; each page synced (if its pool is open), then the run
    /// pushed into the ring under one lock, then what the ring refused (or
    /// the sync refused) released in one `release_pages`. A panicking sync
    /// releases every page of its run one by one (the run's guard), and the
    /// pages not yet taken are dropped while the panic unwinds.
    fn put_bulk(&mut self, pages: &[(usize, usize)]) -> Step {
        let mut i = 0;
        while i < pages.len() {
            let m = pages[i].0;
            let open = !self.pools[m].closed;
            let (mut ready, mut release) = (0, 0);
            let mut j = i;
            while j < pages.len() && pages[j].0 == m {
                self.pools[m].out -= 1;
                ready += 1;
                let synced = if open {
                    self.sync_on_recycle(m, pages[j].1)
                } else {
                    Ok(false)
                };
                match synced {
                    Ok(true) => {}
                    Ok(false) => {
                        ready -= 1;
                        release += 1;
                    }
                    Err(injected) => {
                        for _ in 0..ready + release {
                            self.release_unwinding(m);
                        }
                        self.drop_unwinding(&pages[j + 1..]);
                        return Err(injected);
                    }
                }
                j += 1;
            }
            for _ in 0..ready {
                let p = &mut self.pools[m];
                if p.ring == p.cfg.ring_size {
                    release += 1;
                } else {
                    p.ring += 1;
                }
            }
            if release > 0 {
                if let Err(injected) = self.release_pages(m, release) {
                    self.drop_unwinding(&pages[j..]);
                    return Err(injected);
                }
            }
            i = j;
        }
        Ok(())
    }

    /// Pages dropped while a panic unwinds.
    fn drop_unwinding(&mut self, pages: &[(usize, usize)]) {
        for &(m, dirty) in pages {
            let nested = self.unwinding(|s| s.ret_remote(m, dirty));
            assert_eq!(nested, Ok(()), "model: no fault fires while unwinding");
        }
    }

    fn frag_unref(&mut self, key: u64, m: usize) -> Step {
        let r = self.frag_refs.get_mut(&key).expect("fragment page known");
        *r -= 1;
        if *r == 0 {
            self.frag_refs.remove(&key);
            return self.ret_remote(m, usize::MAX);
        }
        Ok(())
    }

    fn finish_frag(&mut self, m: usize) -> Step {
        match self.pools[m].frag.take() {
            Some((key, _)) => self.frag_unref(key, m),
            None => Ok(()),
        }
    }

    /// `PagePool::alloc` on pool `m`.
    fn alloc(&mut self, m: usize) -> Result<(), Fail> {
        let p = &self.pools[m];
        if p.closed {
            return Err(Fail::Alloc(AllocError::Unbound));
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
                // One `map_page` per page: the page source outside any
                // gate, then one device call to map and record it. Pages
                // mapped before a panic stay in the cache.
                for _ in 0..want {
                    self.hit(Callback::AllocPages)?;
                    if self.src_fail > 0 {
                        self.src_fail -= 1;
                        err = Some(AllocError::OutOfMemory { bytes: page_len });
                        break;
                    }
                    self.allocated += 1;
                    if let Err(injected) = self.hit(Callback::Map) {
                        // A panicking map mapped nothing: the block goes
                        // back to its source while the panic unwinds.
                        let nested = self.unwinding(Self::free_block);
                        assert_eq!(nested, Ok(()));
                        return Err(injected.into());
                    }
                    if self.map_fail > 0 {
                        self.map_fail -= 1;
                        self.free_block()?;
                        err = Some(AllocError::Map(DmaError::Injected));
                        break;
                    }
                    let p = &mut self.pools[m];
                    p.mapped += 1;
                    p.blocks += 1;
                    p.cache += 1;
                }
                if self.pools[m].cache == 0 {
                    return Err(Fail::Alloc(err.expect("no page and no error")));
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
    fn alloc_frag(&mut self, m: usize, size: usize) -> Result<Option<(u64, usize)>, Fail> {
        let page_len = self.pools[m].cfg.page_len();
        if size == 0 || size > page_len {
            return Err(Fail::Alloc(AllocError::FragmentSize {
                requested: size,
                page_len,
            }));
        }
        if self.pools[m].closed {
            return Err(Fail::Alloc(AllocError::Unbound));
        }
        let step = size.next_multiple_of(FRAG_ALIGN);
        if let Some((key, offset)) = self.pools[m].frag {
            if offset + size <= page_len {
                self.pools[m].frag = Some((key, offset + step));
                *self.frag_refs.get_mut(&key).expect("fragment page known") += 1;
                return Ok(Some((key, offset)));
            }
        }
        self.finish_frag(m)?;
        self.alloc(m)?;
        Ok(None)
    }

    fn frag_new_page(&mut self, m: usize, key: u64, size: usize) {
        let step = size.next_multiple_of(FRAG_ALIGN);
        self.pools[m].frag = Some((key, step));
        let old = self.frag_refs.insert(key, 2);
        assert!(old.is_none(), "page {key:#x} already a fragment page");
    }

    /// Dropping pool `m`'s handle: the fragment page let go, the pool
    /// closed, cache and ring released, the pool unregistered; every step
    /// made whatever a callback does, the first panic raised at the end.
    fn drop_pool(&mut self, m: usize) -> Step {
        let r = self.finish_frag(m);
        let p = &mut self.pools[m];
        p.closed = true;
        p.alive = false;
        let n = p.cache + p.ring;
        p.cache = 0;
        p.ring = 0;
        let released = self.release_pages(m, n);
        self.pools[m].registered = false;
        r.and(released)
    }

    /// `Device::unbind` of a bound device. Every step is made whatever a
    /// callback does; a panic comes out at the end, instead of the report.
    fn unbind(&mut self) -> Result<ExpectedUnbind, Injected> {
        let mut e = ExpectedUnbind {
            pools: 0,
            pages_from_rings: 0,
            pages_in_flight: 0,
            bytes_unmapped: 0,
        };
        // 1. and 2.: close every pool and its gate.
        self.bound = false;
        self.unbinding = true;
        for p in self.pools.iter_mut().filter(|p| p.registered) {
            e.pools += 1;
            p.closed = true;
            p.registered = false;
        }
        let mut r = Ok(());
        // 3. Drain the rings of the open pools (the dropped ones closed
        // theirs), registration order: one unmap_batch and the frees each.
        for m in 0..self.pools.len() {
            let p = &mut self.pools[m];
            if p.ring == 0 {
                continue;
            }
            let n = std::mem::take(&mut p.ring);
            p.mapped -= n;
            e.pages_from_rings += n;
            e.bytes_unmapped += n as u64 * p.cfg.page_len() as u64;
            let u = self.hit(Callback::UnmapBatch);
            r = r.and(u);
            for _ in 0..n {
                let f = self.free_page(m);
                r = r.and(f);
            }
        }
        // 4. Every mapping still recorded, in batches.
        for p in self.pools.iter_mut() {
            e.pages_in_flight += p.mapped;
            e.bytes_unmapped += p.mapped as u64 * p.cfg.page_len() as u64;
            p.mapped = 0;
        }
        for _ in 0..e.pages_in_flight.div_ceil(UNMAP_BATCH) {
            let u = self.hit(Callback::UnmapBatch);
            r = r.and(u);
        }
        // 5.
        let u = self.hit(Callback::OnUnbind);
        r = r.and(u);
        // 6. Free the pages handed over meanwhile.
        self.unbinding = false;
        for m in std::mem::take(&mut self.deferred) {
            let f = self.free_page(m);
            r = r.and(f);
        }
        r.map(|()| e)
    }

    /// A held buffer is gone (its last handle dropped).
    fn dropped(&mut self, item: &ItemModel) -> Step {
        if let Some((g, under)) = item.group {
            let n = self.groups.get_mut(&g).expect("bytes group known");
            *n -= 1;
            if *n > 0 {
                return Ok(());
            }
            self.groups.remove(&g);
            let owner = ItemModel {
                kind: under,
                group: None,
                ..item.clone()
            };
            return self.dropped(&owner);
        }
        match item.kind {
            Under::Page => self.ret_remote(item.pool, item.dirty),
            Under::Frag => self.frag_unref(item.key, item.pool),
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

/// Panics unless the pool call and the model agree on whether an injected
/// panic came out, and which.
fn agree(ctx: &str, got: Result<(), Injected>, want: Step) {
    assert_eq!(
        got, want,
        "{ctx}: real (left) and model (right) disagree on an injected panic"
    );
}

// ---------------------------------------------------------------------------
// The deterministic harness

/// Runs ops one at a time and checks the model after each.
pub struct Harness {
    cfg: Config,
    checking: CheckingDevice,
    faults: Faults,
    source: CountingPages,
    device: Option<Device>,
    pools: [Option<(PagePool, usize)>; POOLS],
    held: [Vec<Held>; THREADS],
    /// The thread whose buffer sits in the fault slot (it gets the buffer
    /// back if the fault is replaced before it fires).
    armed_by: Option<usize>,
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
        quiet_injected_panics();
        let checking = checking_device(&cfg);
        let faults = Faults::default();
        let source = CountingPages::new(faults.clone());
        let device = Device::new(FaultyOps::new(checking.clone(), faults.clone()));
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
            faults,
            source,
            device: Some(device),
            pools,
            held: Default::default(),
            armed_by: None,
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

    /// The callback the armed fault waits for (for reports).
    pub fn armed(&self) -> Option<Callback> {
        self.faults.armed()
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
        let ctx = self.ctx("drop");
        let item = held.model();
        let buf = held.buf;
        let bulk = how == How::Bulk && matches!(buf, Buf::Page(_));
        let want = if bulk {
            self.model.put_bulk(&[(item.pool, item.dirty)])
        } else {
            self.model.dropped(&item)
        };
        let got = match (how, buf) {
            (How::Spawned, buf) => catching(|| on_spawned_thread(move || drop(buf))),
            (How::Worker, buf) => {
                let worker = self.worker();
                catching(|| worker.drop_there(buf))
            }
            (How::Bulk, Buf::Page(page)) => catching(|| put_bulk([page])),
            (_, buf) => catching(|| drop(buf)),
        };
        agree(&ctx, got, want);
    }

    /// Allocates one page from pool slot `t` for thread `t`: kept by the
    /// thread (`keep`) or handed back.
    fn alloc_into(&mut self, t: u8, keep: bool) -> Option<Held> {
        let ctx = self.ctx("alloc");
        let (pool, m) = self.pool_of(t)?;
        let got = catching(|| pool.alloc());
        let want = self.model.alloc(m);
        match (got, want) {
            (Ok(Ok(page)), Ok(())) => {
                let key = page.dma_addr().0;
                let held = Held {
                    buf: Buf::Page(page),
                    pool: m,
                    key,
                    group: None,
                    expect: None,
                    dirty: usize::MAX,
                };
                if keep {
                    self.held[usize::from(t) % THREADS].push(held);
                    None
                } else {
                    Some(held)
                }
            }
            (Ok(Err(e)), Err(Fail::Alloc(w))) => {
                assert_eq!(e, w, "{ctx}: wrong error");
                None
            }
            (Err(injected), Err(Fail::Panicked(w))) => {
                assert_eq!(injected, w, "{ctx}: another callback panicked");
                None
            }
            (got, want) => panic!(
                "{ctx}: got {:?}, model says {want:?}",
                got.map(|r| r.map(|p| p.dma_addr()))
            ),
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

    /// Takes the armed fault out of the slot (real and model); a buffer it
    /// held goes back to the thread that armed it.
    fn disarm(&mut self) {
        if let Some(item) = self.faults.disarm() {
            let held = *item.downcast::<Held>().expect("the slot holds a Held");
            let t = self.armed_by.expect("armed by a thread");
            self.held[t].push(held);
        }
        self.armed_by = None;
        self.model.trap = None;
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
                let ctx = self.ctx("recycle_direct");
                let held = self.held[ti].swap_remove(i);
                let want = self.model.ret_direct(target, held.pool, held.dirty);
                let Buf::Page(page) = held.buf else {
                    unreachable!()
                };
                let (pool, _) = self.pool_of(t).expect("checked");
                let got = catching(|| pool.recycle_direct(page));
                agree(&ctx, got, want);
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
                let mut models = Vec::new();
                let mut i = 0;
                while i < self.held[ti].len() && pages.len() <= usize::from(n % 8) {
                    if matches!(self.held[ti][i].buf, Buf::Page(_)) {
                        let held = self.held[ti].remove(i);
                        models.push((held.pool, held.dirty));
                        let Buf::Page(page) = held.buf else {
                            unreachable!()
                        };
                        pages.push(page);
                    } else {
                        i += 1;
                    }
                }
                let ctx = self.ctx("put_bulk");
                let want = self.model.put_bulk(&models);
                let got = catching(|| put_bulk(pages));
                agree(&ctx, got, want);
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
                let ctx = self.ctx("fill ring");
                match how {
                    How::Spawned => {
                        let mut want = Ok(());
                        for h in &got {
                            let w = self.model.dropped(&h.model());
                            want = want.and(w);
                        }
                        let bufs: Vec<Buf> = got.into_iter().map(|h| h.buf).collect();
                        let r = catching(|| on_spawned_thread(move || drop_each(bufs)));
                        agree(&ctx, r, want);
                    }
                    How::Bulk => {
                        let models: Vec<_> = got.iter().map(|h| (h.pool, h.dirty)).collect();
                        let want = self.model.put_bulk(&models);
                        let pages: Vec<Page> = got
                            .into_iter()
                            .filter_map(|h| match h.buf {
                                Buf::Page(p) => Some(p),
                                _ => None,
                            })
                            .collect();
                        let r = catching(|| put_bulk(pages));
                        agree(&ctx, r, want);
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
                    let h = &mut self.held[ti][i];
                    if let Buf::Page(p) = &mut h.buf {
                        p.set_dirty_len(usize::from(len));
                        h.dirty = usize::from(len);
                    }
                }
            }
            Op::IntoBytes { t, item } => self.convert_to_bytes(t, item),
            Op::CloneBytes { t, item } => self.clone_bytes(t, item),
            Op::DropPool { t } => {
                let slot = usize::from(t) % THREADS;
                if let Some((pool, m)) = self.pools.get_mut(slot).and_then(Option::take) {
                    let ctx = self.ctx("drop pool");
                    let want = self.model.drop_pool(m);
                    let got = catching(|| drop(pool));
                    agree(&ctx, got, want);
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
            Op::ArmPanic { at } => {
                self.disarm();
                let displaced = self.faults.arm_panic(at);
                assert!(displaced.is_none(), "disarmed just before");
                self.model.trap = Some(TrapModel::Panic(at));
            }
            Op::ArmDrop { t, item, at } => {
                let Some((ti, i)) = self.item(t, item) else {
                    return;
                };
                self.disarm();
                let held = self.held[ti].swap_remove(i);
                let model = held.model();
                let displaced = self.faults.arm_drop(at, Box::new(held));
                assert!(displaced.is_none(), "disarmed just before");
                self.model.trap = Some(TrapModel::Drop(at, model));
                self.armed_by = Some(ti);
            }
        }
    }

    fn alloc_frag(&mut self, t: u8, size: usize) {
        let ctx = self.ctx("alloc_frag");
        let Some((pool, m)) = self.pool_of(t) else {
            return;
        };
        let got = catching(|| pool.alloc_frag(size));
        let want = self.model.alloc_frag(m, size);
        match (got, want) {
            (Ok(Ok(frag)), Ok(same_page)) => {
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
                    dirty: usize::MAX,
                });
            }
            (Ok(Err(e)), Err(Fail::Alloc(w))) => assert_eq!(e, w, "{ctx}: wrong error"),
            (Err(injected), Err(Fail::Panicked(w))) => {
                assert_eq!(injected, w, "{ctx}: another callback panicked")
            }
            (got, want) => panic!(
                "{ctx}: got {:?}, model says {want:?}",
                got.map(|r| r.map(|f| f.dma_addr()))
            ),
        }
    }

    fn sync(&mut self, t: u8, item: u8, start: u16, len: u16, tag: u8, to_device: bool) {
        let Some((ti, i)) = self.item(t, item) else {
            return;
        };
        let ctx = self.ctx("sync");
        let bound = self.model.bound;
        let h = &self.held[ti][i];
        if h.buf.is_bytes() {
            // Immutable: just a read.
            return h.check_content(&ctx);
        }
        let direction = self.model.pools[h.pool].cfg.direction;
        let (s, n) = range_in(h.buf.len(), start, len);
        let device_writes = match direction {
            DmaDirection::FromDevice => true,
            DmaDirection::ToDevice => false,
            DmaDirection::Bidirectional => !to_device,
        };
        // One device call while bound (the range is never empty).
        let want = if !bound {
            Ok(())
        } else if device_writes {
            self.model.hit(Callback::SyncForCpu)
        } else {
            self.model.hit(Callback::SyncForDevice)
        };
        let checking = self.checking.clone();
        let h = &mut self.held[ti][i];
        let data = vec![tag; n];
        let r = s..s + n;
        let got = match &mut h.buf {
            Buf::Page(p) => sync_one(&ctx, &checking, bound, device_writes, p, &data, r),
            Buf::Frag(f) => sync_one(&ctx, &checking, bound, device_writes, f, &data, r),
            #[cfg(feature = "bytes")]
            Buf::Bytes(_) => unreachable!("handled above"),
        };
        agree(&ctx, got, want);
        // A sync that panicked after the backend made it counts as made:
        // the content moved either way.
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
            dirty: h.dirty,
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
        let got = match how {
            UnbindHow::Call => catching(|| device.unbind().map(Some)),
            UnbindHow::OtherThread => catching(|| on_spawned_thread(|| device.unbind()).map(Some)),
            UnbindHow::DropDevice => {
                let device = self.device.take();
                catching(|| drop(device)).map(|()| Ok(None))
            }
        };
        let report = match (got, want) {
            (Ok(Ok(report)), Ok(want)) => report.map(|r| (r, want)),
            (Ok(Err(e)), _) => panic!("{ctx}: {e}"),
            (Err(injected), Err(w)) => {
                assert_eq!(injected, w, "{ctx}: another callback panicked");
                None
            }
            (got, want) => panic!("{ctx}: got {got:?}, model says {want:?}"),
        };
        if let Some((report, want)) = report {
            let got = ExpectedUnbind {
                pools: report.pools,
                pages_from_rings: report.pages_from_rings,
                pages_in_flight: report.pages_in_flight,
                bytes_unmapped: report.bytes_unmapped,
            };
            assert_eq!(got, want, "{ctx}: unbind report {report}");
            assert_eq!(report.mappings_left, 0, "{ctx}");
        }
    }

    /// Compares everything observable with the model.
    fn check(&self, what: &str) {
        let ctx = format!("step {} {what}", self.step);
        let verdict = self.checking.verdict();
        if verdict.violations != 0 {
            panic!("{ctx}: violations:\n{}", self.checking.report());
        }
        let m = &self.model;
        assert!(
            !m.unwinding && !m.unbinding && m.deferred.is_empty(),
            "{ctx}: model left mid-call"
        );
        assert_eq!(
            self.faults.armed(),
            m.trap.as_ref().map(TrapModel::at),
            "{ctx}: armed fault: real (left) vs model (right): it fired in another call"
        );
        assert_eq!(
            self.checking.live_mappings(),
            m.mapped(),
            "{ctx}: live mappings (checking device) vs model; model {m:#?}"
        );
        assert_eq!(self.checking.is_unbound(), !m.bound, "{ctx}: unbound?");
        if let Some(device) = &self.device {
            assert_eq!(device.is_bound(), m.bound, "{ctx}");
            assert_eq!(device.tracked_mappings(), m.mapped(), "{ctx}: tracker");
            let open = m.pools.iter().filter(|p| p.registered).count();
            assert_eq!(device.pools().len(), open, "{ctx}: registered pools");
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
        // buffer, its current fragment page and the armed fault's buffer.
        let mut out: Vec<HashSet<u64>> = vec![HashSet::new(); m.pools.len()];
        for h in self.held.iter().flatten() {
            out[h.pool].insert(h.key);
        }
        if let Some(TrapModel::Drop(_, item)) = &m.trap {
            out[item.pool].insert(item.key);
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

    /// Drops everything (held buffers, pools, the device, then the armed
    /// fault's buffer if it never fired) with checks after each step, then
    /// the final checks: every page block freed exactly once, no mapping
    /// left, zero violations. A fault still armed acts during the teardown
    /// like anywhere else.
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
        self.step += 1;
        let armed = self.faults.disarm();
        self.model.trap = None;
        if let Some(item) = armed {
            let held = *item.downcast::<Held>().expect("the slot holds a Held");
            self.drop_held(held, How::Here);
        }
        self.check("teardown: the armed fault's buffer");
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
        assert_eq!(self.checking.stats().calls_after_unbind, 0);
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
/// writes it. Returns the injected panic of the sync call, if any (the
/// sync was made before it: the transfer is checked all the same).
fn sync_one(
    ctx: &str,
    checking: &CheckingDevice,
    bound: bool,
    device_writes: bool,
    b: &mut impl SyncBuf,
    data: &[u8],
    r: std::ops::Range<usize>,
) -> Result<(), Injected> {
    let at = b.dma().offset(r.start as u64);
    if !bound {
        let got = if device_writes {
            b.for_cpu(r.clone())
        } else {
            b.for_device(r.clone())
        };
        assert_eq!(got, Err(SyncError::Unbound), "{ctx}");
        b.write()[r].copy_from_slice(data);
        return Ok(());
    }
    if device_writes {
        checking
            .device_write(at, data)
            .unwrap_or_else(|v| panic!("{ctx}: device write: {v}"));
        let got = catching(|| b.for_cpu(r));
        got.map(|res| res.unwrap_or_else(|e| panic!("{ctx}: sync_for_cpu: {e}")))
    } else {
        b.write()[r.clone()].copy_from_slice(data);
        let got = catching(|| b.for_device(r));
        let got = got.map(|res| res.unwrap_or_else(|e| panic!("{ctx}: sync_for_device: {e}")));
        let read = checking
            .device_read(at, data.len())
            .unwrap_or_else(|v| panic!("{ctx}: device read: {v}"));
        assert!(
            read == data,
            "{ctx}: the device read other bytes than the CPU synced"
        );
        got
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
    faults: &'a Faults,
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
                        (How::Spawned | How::Worker, buf) => on_spawned_thread(move || drop(buf)),
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
                    How::Spawned | How::Worker => on_spawned_thread(move || drop(got)),
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
            Op::DropPool { .. } => {
                drop(self.pool.take());
            }
            Op::NewPool { .. } => {
                if self.t < POOLS && self.pool.is_none() {
                    match build_pool(self.sh.device, &self.sh.cfg.pools[self.t], self.sh.source) {
                        Ok(pool) => self.pool = Some(pool),
                        Err(e) => assert_eq!(e, BuildError::Unbound, "{}", self.ctx("new pool")),
                    }
                }
            }
            Op::Unbind { .. } => {
                // A panicking unbind poisons the lock; the device is unbound
                // all the same.
                let _quiet = self.sh.sim.write().unwrap_or_else(PoisonError::into_inner);
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
            Op::ArmPanic { at } => {
                drop(self.sh.faults.disarm());
                drop(self.sh.faults.arm_panic(at));
            }
            Op::ArmDrop { item, at, .. } => {
                if let Some(i) = self.pick(item) {
                    let it = self.held.swap_remove(i);
                    drop(self.sh.faults.disarm());
                    drop(self.sh.faults.arm_drop(at, Box::new(it)));
                }
            }
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
                let _sim = sh.sim.read().unwrap_or_else(PoisonError::into_inner);
                !sh.checking.is_unbound()
                    && sh
                        .checking
                        .device_write(at, &data)
                        .map(|()| true)
                        .unwrap_or_else(|v| panic!("{ctx}: device write: {v}"))
            };
            // An injected panic comes after the backend made the sync: the
            // content moved all the same.
            match catching(|| b.for_cpu_dyn(r.clone())).unwrap_or(Ok(())) {
                Ok(()) => {
                    assert!(written, "{ctx}: sync_for_cpu succeeded after unbind");
                    true
                }
                Err(SyncError::Unbound) => false,
                Err(e) => panic!("{ctx}: sync_for_cpu: {e}"),
            }
        } else {
            b.write_dyn()[r.clone()].copy_from_slice(&data);
            match catching(|| b.for_device_dyn(r.clone())).unwrap_or(Ok(())) {
                Ok(()) => {
                    let _sim = sh.sim.read().unwrap_or_else(PoisonError::into_inner);
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
    quiet_injected_panics();
    let checking = checking_device(cfg);
    let faults = Faults::default();
    let source = CountingPages::new(faults.clone());
    let device = Device::new(FaultyOps::new(checking.clone(), faults.clone()));
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
            | Op::NewPool { t }
            | Op::ArmDrop { t, .. } => usize::from(t) % THREADS,
            Op::Unbind { .. }
            | Op::FailMaps { .. }
            | Op::FailPageAllocs { .. }
            | Op::ArmPanic { .. } => i % THREADS,
        };
        per_thread[t].push(*op);
    }
    let (inboxes, mut receivers): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| mpsc::channel()).unzip();
    let shared = Shared {
        cfg,
        checking: &checking,
        faults: &faults,
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
                            // An injected panic ends the op; the next one
                            // runs (any other panic is a failure).
                            let _ = catching(|| actor.exec(op));
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
    // A fault that never fired: its buffer comes back like any other.
    drop(faults.disarm());
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
    assert_eq!(checking.stats().calls_after_unbind, 0);
    checking.assert_clean();
}
