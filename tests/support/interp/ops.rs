//! The input language: a [`Config`] and a sequence of [`Op`]s.
//!
//! Invariant: every op is valid in every state. One that does not apply (no
//! such buffer, no pool) does nothing, so every subsequence of a valid
//! sequence is valid and proptest's shrinking works.

use pagepool::{DmaDirection, PAGE_SIZE};

use super::{POOLS, THREADS};

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
    // Only `tests/state_machine.rs` draws callbacks from this list; the other
    // includers get theirs from bytes.
    #[allow(dead_code)]
    pub fn all() -> [Callback; 7] {
        CALLBACKS
    }
}

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
    pub(super) fn strict_sync_directions(&self) -> bool {
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
    /// Drop the thread's pool. A thread that owns no pool (see
    /// [`Op::flushes`]) calls `pagepool::flush_thread_returns()` instead:
    /// the deterministic runner on its main OS thread, the threaded runner
    /// on the acting thread.
    DropPool { t: u8 },
    /// Build the thread's pool again (fails with `Unbound` after unbind). A
    /// thread that owns no pool (see [`Op::flushes`]) calls
    /// `pagepool::flush_thread_returns()` instead: the deterministic runner
    /// on its worker thread (if started), the threaded runner on the acting
    /// thread.
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

impl Op {
    /// Whether `DropPool { t }` / `NewPool { t }` flush remote returns
    /// instead: logical thread `t` owns no pool slot, so these encodings
    /// did nothing before the flush existed (old inputs decode unchanged;
    /// such ops now flush).
    pub fn flushes(t: u8) -> bool {
        usize::from(t) % THREADS >= POOLS
    }
}
