//! The reference model of the device, its pools and its pages: what every
//! pool call should do, worked out without the pool.
//!
//! Besides the counts (pages cached, in the ring, handed out, mapped,
//! blocks allocated and freed) it follows every callback the pool makes,
//! in order (page source allocations and frees, maps, unmap batches, syncs,
//! `on_unbind`), to know where an armed fault fires and what the pool does
//! about it.
//!
//! It also follows the remote-return batches (`src/remote.rs`) of every OS
//! thread the harness uses ([`Th`]): a page dropped away from the ring path
//! waits in its thread's batch (four slots, one pool each, round-robin
//! eviction) and reaches its pool's ring when the slot fills, when it is
//! evicted, when the pool's owner runs dry or drops the pool on that
//! thread, on `flush_thread_returns`, or when the thread exits.
//!
//! Invariants: the model never touches the real pool, the device or a
//! buffer (the harness runs the call and compares); between two pool calls
//! it is never left mid-call (`unwinding`, `unbinding` false, nothing
//! deferred, the acting thread the main one, no thread exiting, a spawned
//! thread's batches empty); at most one fault is armed, and none fires
//! while another acts or while a panic unwinds.

use std::collections::HashMap;

use pagepool::{AllocError, DmaError, DEFAULT_REMOTE_BATCH, FRAG_ALIGN};

use super::buffers::Under;
use super::faults::Injected;
use super::ops::{Callback, PoolCfg};

/// The model of one pool (one per pool ever built).
#[derive(Clone, Debug)]
pub(super) struct PoolModel {
    pub(super) cfg: PoolCfg,
    /// The pool's effective remote batch (`PoolShared::remote_batch`): 0
    /// when it does not batch (see [`remote_batch`]).
    pub(super) batch: usize,
    /// The device lists the pool as open (`Device::pools`, until unbind).
    pub(super) registered: bool,
    /// The pool refuses pages (dropped, or its device unbound).
    pub(super) closed: bool,
    pub(super) cache: usize,
    pub(super) ring: usize,
    /// Pages handed out and not given back (stats `pages_held`): held,
    /// the fragment page, and pages waiting in a thread's batch.
    pub(super) out: usize,
    /// Pages mapped (stats `pages_mapped`).
    pub(super) mapped: usize,
    /// Page blocks allocated and not freed.
    pub(super) blocks: usize,
    /// The current fragment page: its key and next offset.
    pub(super) frag: Option<(u64, usize)>,
}

/// A held buffer as the model sees it.
#[derive(Clone, Debug)]
pub(super) struct ItemModel {
    pub(super) pool: usize,
    pub(super) key: u64,
    pub(super) kind: Under,
    pub(super) group: Option<(u64, Under)>,
    pub(super) dirty: usize,
}

/// The model's armed fault.
#[derive(Clone, Debug)]
pub(super) enum TrapModel {
    Panic(Callback),
    Drop(Callback, ItemModel),
}

impl TrapModel {
    pub(super) fn at(&self) -> Callback {
        match self {
            TrapModel::Panic(at) | TrapModel::Drop(at, _) => *at,
        }
    }
}

/// What a pool call does, as far as faults go: returns, or raises the
/// injected panic of a callback.
pub(super) type Step = Result<(), Injected>;

/// Why an allocation gave no buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Fail {
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

/// Slots of a thread's batches (`remote::SLOTS`).
const SLOTS: usize = 4;

/// The effective remote batch of a pool of configuration `cfg`, as the
/// builder works it out from the default `remote_batch` (the harness never
/// sets one): `min(remote_batch, ring_size)`, 0 when that is 1
/// (every page straight to the ring) or when the pool syncs for the device
/// on recycle (the checking device reports `needs_sync`; the harness
/// asserts it).
pub(super) fn remote_batch(cfg: &PoolCfg) -> usize {
    if cfg.sync.is_some() {
        return 0;
    }
    match DEFAULT_REMOTE_BATCH.min(cfg.ring_size) {
        n if n > 1 => n,
        _ => 0,
    }
}

/// An OS thread of the deterministic runner, as far as its remote-return
/// batches go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Th {
    /// The thread that runs the harness (and every pool call).
    #[default]
    Main,
    /// The long-lived worker (`How::Worker` drops, worker flushes).
    Worker,
    /// A thread spawned for one op and joined (`How::Spawned`, unbind on
    /// another thread); its batches are handed back when it exits, right
    /// after its work.
    Spawned,
}

impl Th {
    fn index(self) -> usize {
        self as usize
    }
}

/// One slot of a thread's batches: a pool and its pages (by key), in the
/// order they came.
#[derive(Clone, Debug)]
pub(super) struct SlotModel {
    pub(super) pool: usize,
    pub(super) keys: Vec<u64>,
}

/// One thread's batches (`remote::Batches`).
#[derive(Clone, Debug, Default)]
pub(super) struct BatchesModel {
    pub(super) slots: [Option<SlotModel>; SLOTS],
    /// The slot evicted next when all are taken.
    next_victim: usize,
    /// The thread is exiting and its batches are being dropped: a page
    /// dropped on it now takes the direct path (`try_with` fails).
    pub(super) exiting: bool,
}

impl BatchesModel {
    pub(super) fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }
}

/// The reference model of the device, its pools and its pages.
///
/// Besides the counts it follows every callback the pool makes, in order
/// (page source allocations and frees, maps, unmap batches, syncs,
/// `on_unbind`), to know where an armed fault fires and what the pool does
/// about it.
#[derive(Clone, Debug, Default)]
pub(super) struct Model {
    pub(super) bound: bool,
    /// `unbind` has closed the gates and not yet finished its unmaps: pages
    /// released now are handed to it and freed at its end.
    pub(super) unbinding: bool,
    /// Pages handed to `unbind` (their pools).
    pub(super) deferred: Vec<usize>,
    /// The thread unwinds from an injected panic: syncs on recycle are
    /// skipped (the page is released instead) and faults do not fire.
    pub(super) unwinding: bool,
    /// The armed fault.
    pub(super) trap: Option<TrapModel>,
    pub(super) pools: Vec<PoolModel>,
    /// Fragment pages: references (live fragments + the owner's).
    pub(super) frag_refs: HashMap<u64, usize>,
    /// `Bytes` clone groups: live clones.
    pub(super) groups: HashMap<u64, usize>,
    /// The next clone group's name.
    #[cfg(feature = "bytes")]
    pub(super) next_group: u64,
    pub(super) map_fail: u64,
    pub(super) src_fail: u64,
    pub(super) allocated: usize,
    pub(super) freed: usize,
    /// The OS thread the modelled call runs on (its callbacks, and the
    /// drops they make, run there too).
    pub(super) thread: Th,
    /// Every thread's batches, by [`Th`].
    pub(super) batches: [BatchesModel; 3],
}

/// What `unbind` should report.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ExpectedUnbind {
    pub(super) pools: usize,
    pub(super) pages_from_rings: usize,
    pub(super) pages_held_or_cached: usize,
    pub(super) bytes_unmapped: u64,
}

impl Model {
    pub(super) fn new_pool(&mut self, cfg: PoolCfg) -> usize {
        self.pools.push(PoolModel {
            cfg,
            batch: remote_batch(&cfg),
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
    pub(super) fn hit(&mut self, at: Callback) -> Step {
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

    /// A page comes back from any thread (drop, last fragment, a page of
    /// another pool recycled directly): into the acting thread's batch if
    /// its pool is open and batches and the thread's batches are alive,
    /// else straight to the ring (`recycle_remote`).
    fn ret_remote(&mut self, m: usize, key: u64, dirty: usize) -> Step {
        let p = &self.pools[m];
        if !p.closed && p.batch > 1 && !self.batches[self.thread.index()].exiting {
            return self.stash(m, key);
        }
        self.pools[m].out -= 1;
        self.recycle_remote(m, dirty)
    }

    /// `Batches::stash` on the acting thread: appended to the pool's slot
    /// (handed back once it holds `batch` pages), or into the first empty
    /// slot, or into the next victim's slot, whose pages are taken out
    /// first and handed back after.
    fn stash(&mut self, m: usize, key: u64) -> Step {
        let limit = self.pools[m].batch;
        let b = &mut self.batches[self.thread.index()];
        let mine = b
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.pool == m));
        if let Some(i) = mine {
            let keys = &mut b.slots[i].as_mut().expect("found").keys;
            keys.push(key);
            if keys.len() < limit {
                return Ok(());
            }
            return self.hand_back_slot(i);
        }
        let fresh = SlotModel {
            pool: m,
            keys: vec![key],
        };
        if let Some(empty) = b.slots.iter_mut().find(|s| s.is_none()) {
            *empty = Some(fresh);
            return Ok(());
        }
        let victim = b.next_victim;
        b.next_victim = (victim + 1) % SLOTS;
        let evicted = b.slots[victim].replace(fresh).expect("every slot taken");
        self.push_run(evicted.pool, evicted.keys.len())
    }

    /// `push_run` of `n` pages of pool `m` (a slot handed back): under one
    /// ring lock a closed ring refuses them all, an open one takes what it
    /// has room for; what it refused goes in one `release_pages`.
    fn push_run(&mut self, m: usize, n: usize) -> Step {
        let p = &mut self.pools[m];
        p.out -= n;
        if p.closed {
            return self.release_pages(m, n);
        }
        let taken = n.min(p.cfg.ring_size - p.ring);
        p.ring += taken;
        match n - taken {
            0 => Ok(()),
            rest => self.release_pages(m, rest),
        }
    }

    /// Empties slot `i` of the acting thread's batches and hands its pages
    /// back (`Slot::hand_back`).
    fn hand_back_slot(&mut self, i: usize) -> Step {
        match self.batches[self.thread.index()].slots[i].take() {
            Some(slot) => self.push_run(slot.pool, slot.keys.len()),
            None => Ok(()),
        }
    }

    /// `remote::hand_back_pool(m)` on the acting thread: its slot of pool
    /// `m`, if it has one (nothing once its batches are being dropped).
    fn hand_back_pool(&mut self, m: usize) -> Step {
        let b = &self.batches[self.thread.index()];
        if b.exiting {
            return Ok(());
        }
        match b
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.pool == m))
        {
            Some(i) => self.hand_back_slot(i),
            None => Ok(()),
        }
    }

    /// `pagepool::flush_thread_returns()` on the acting thread: every slot
    /// in order, each whatever the others' callbacks do (a page dropped
    /// meanwhile is stashed as usual), the first panic raised at the end.
    pub(super) fn flush(&mut self) -> Step {
        if self.batches[self.thread.index()].exiting {
            return Ok(());
        }
        let mut r = Ok(());
        for i in 0..SLOTS {
            let h = self.hand_back_slot(i);
            r = r.and(h);
        }
        r
    }

    /// The acting thread exits: its batches are dropped, every slot handed
    /// back in order, a panic in each caught and dropped (it never reaches
    /// the joiner); a page dropped meanwhile on the thread takes the direct
    /// path. A later thread of the same kind starts with empty batches.
    pub(super) fn thread_exit(&mut self) {
        let th = self.thread.index();
        self.batches[th].exiting = true;
        for i in 0..SLOTS {
            // Swallowed, like the thread-local's destructor does.
            let _ = self.hand_back_slot(i);
        }
        assert!(
            self.batches[th].is_empty(),
            "model: nothing is stashed while the thread exits"
        );
        self.batches[th] = BatchesModel::default();
    }

    /// Runs `f` as a call on OS thread `th`.
    pub(super) fn on<R>(&mut self, th: Th, f: impl FnOnce(&mut Self) -> R) -> R {
        let was = std::mem::replace(&mut self.thread, th);
        let r = f(self);
        self.thread = was;
        r
    }

    /// Runs `f` on a freshly spawned thread, then lets the thread exit
    /// (spawn + join): `f`'s panic goes on to the joiner, the exit's do
    /// not.
    pub(super) fn on_spawned<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        assert!(
            self.batches[Th::Spawned.index()].is_empty(),
            "model: a spawned thread starts with empty batches"
        );
        self.on(Th::Spawned, |s| {
            let r = f(s);
            s.thread_exit();
            r
        })
    }

    /// Every page waiting in a thread's batches, as `(pool, key)`.
    pub(super) fn batched(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.batches
            .iter()
            .flat_map(|b| b.slots.iter().flatten())
            .flat_map(|s| s.keys.iter().map(move |&k| (s.pool, k)))
    }

    /// `recycle_direct` of a page of pool `m` into pool `target`. After
    /// unbind the page is released at once, like on every other return
    /// path.
    pub(super) fn ret_direct(&mut self, target: usize, m: usize, key: u64, dirty: usize) -> Step {
        if m != target {
            return self.ret_remote(m, key, dirty);
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

    /// `put_bulk` of pages `(pool, key, dirty length)`, in order: runs of
    /// pages of one pool; each page synced (if its pool is open), then the run
    /// pushed into the ring under one lock, then what the ring refused (or
    /// the sync refused) released in one `release_pages`. A panicking sync
    /// releases every page of its run one by one (the run's guard), and the
    /// pages not yet taken are dropped while the panic unwinds. The pages
    /// go to the ring, never into a batch.
    pub(super) fn put_bulk(&mut self, pages: &[(usize, u64, usize)]) -> Step {
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
                    self.sync_on_recycle(m, pages[j].2)
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

    /// Pages dropped while a panic unwinds (into the batch as usual).
    fn drop_unwinding(&mut self, pages: &[(usize, u64, usize)]) {
        for &(m, key, dirty) in pages {
            let nested = self.unwinding(|s| s.ret_remote(m, key, dirty));
            assert_eq!(nested, Ok(()), "model: no fault fires while unwinding");
        }
    }

    fn frag_unref(&mut self, key: u64, m: usize) -> Step {
        let r = self.frag_refs.get_mut(&key).expect("fragment page known");
        *r -= 1;
        if *r == 0 {
            self.frag_refs.remove(&key);
            return self.ret_remote(m, key, usize::MAX);
        }
        Ok(())
    }

    fn finish_frag(&mut self, m: usize) -> Step {
        match self.pools[m].frag.take() {
            Some((key, _)) => self.frag_unref(key, m),
            None => Ok(()),
        }
    }

    /// `PagePool::alloc` on pool `m`. The slow path (cache empty) first
    /// hands back the acting thread's batch of `m`, then refills from the
    /// ring, else maps fresh pages.
    pub(super) fn alloc(&mut self, m: usize) -> Result<(), Fail> {
        if self.pools[m].closed {
            return Err(Fail::Alloc(AllocError::Unbound));
        }
        if self.pools[m].cache == 0 {
            if self.pools[m].batch > 1 {
                self.hand_back_pool(m)?;
            }
            let p = &self.pools[m];
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
    pub(super) fn alloc_frag(
        &mut self,
        m: usize,
        size: usize,
    ) -> Result<Option<(u64, usize)>, Fail> {
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

    pub(super) fn frag_new_page(&mut self, m: usize, key: u64, size: usize) {
        let step = size.next_multiple_of(FRAG_ALIGN);
        self.pools[m].frag = Some((key, step));
        let old = self.frag_refs.insert(key, 2);
        assert!(old.is_none(), "page {key:#x} already a fragment page");
    }

    /// Dropping pool `m`'s handle: the fragment page let go, the acting
    /// thread's batch of `m` handed back, the pool closed, cache and ring
    /// released, the pool unregistered; every step made whatever a callback
    /// does, the first panic raised at the end.
    pub(super) fn drop_pool(&mut self, m: usize) -> Step {
        let mut r = self.finish_frag(m);
        if self.pools[m].batch > 1 {
            let h = self.hand_back_pool(m);
            r = r.and(h);
        }
        let p = &mut self.pools[m];
        p.closed = true;
        let n = p.cache + p.ring;
        p.cache = 0;
        p.ring = 0;
        let released = self.release_pages(m, n);
        self.pools[m].registered = false;
        r.and(released)
    }

    /// `Device::unbind` of a bound device. Every step is made whatever a
    /// callback does; a panic comes out at the end, instead of the report.
    pub(super) fn unbind(&mut self) -> Result<ExpectedUnbind, Injected> {
        let mut e = ExpectedUnbind {
            pools: 0,
            pages_from_rings: 0,
            pages_held_or_cached: 0,
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
            e.pages_held_or_cached += p.mapped;
            e.bytes_unmapped += p.mapped as u64 * p.cfg.page_len() as u64;
            p.mapped = 0;
        }
        for _ in 0..e.pages_held_or_cached.div_ceil(UNMAP_BATCH) {
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
    pub(super) fn dropped(&mut self, item: &ItemModel) -> Step {
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
            Under::Page => self.ret_remote(item.pool, item.key, item.dirty),
            Under::Frag => self.frag_unref(item.key, item.pool),
        }
    }

    pub(super) fn mapped(&self) -> usize {
        self.pools.iter().map(|p| p.mapped).sum()
    }

    pub(super) fn blocks(&self) -> usize {
        self.pools.iter().map(|p| p.blocks).sum()
    }
}
