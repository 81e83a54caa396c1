//! Remote returns: pages dropped away from their pool's owner wait in a
//! small per-thread batch and reach the pool's ring many at a time, under
//! one lock (as snmalloc and mimalloc batch remote frees).
//!
//! Dropping a page on a socket or application thread is then a few plain
//! stores into this thread's batch: no lock, no atomic read-modify-write.
//! The ring lock is taken once per batch.
//!
//! The batches do not know page types: a batch holds type-erased page
//! pointers of one pool and the function, instantiated for that pool's
//! tracking mode by `page.rs`, that gives a batch back to its pool.
//!
//! # Invariants
//!
//! - **Owned, mapped, tracked.** A page in a batch is owned by the batch.
//!   It is still mapped and still in the device's tracker, like a page the
//!   network stack holds: `unbind` unmaps it through the tracker. When the
//!   batch is handed back and its ring is closed, the page is released
//!   (freed with no device call once its device is unbound).
//! - **Bounded.** A thread keeps back at most [`SLOTS`] pools' pages, at
//!   most the pool's batch size (≤ [`MAX_REMOTE_BATCH`]) of each, so at most
//!   `SLOTS * MAX_REMOTE_BATCH` pages in all.
//! - **Never stranded.** A slot is handed back when it is full; when a page
//!   of a pool with no slot needs one and every slot is taken (the oldest
//!   goes); when the pool's owner runs out of cached pages on this thread
//!   (before it refills from the ring) or drops the pool on it; on [`flush_thread_returns`]; and when the thread
//!   exits.
//! - **Taken out first.** A slot is emptied before its pages are handed
//!   back, so a callback that drops pages during the hand-back (re-entrant)
//!   finds an empty slot, never a half-processed one.
//! - **A slot names a live pool.** A slot's pool pointer is set only while
//!   the slot holds pages, and those pages keep their pool alive; an empty
//!   slot's pointer is null, so a new pool at a reused address never matches
//!   a stale slot.
//! - A slot is only ever touched by its own thread (thread-local storage);
//!   no field here is shared.

use core::cell::Cell;
use core::ptr::{self, NonNull};

use crate::held;
use crate::unwind::Panics;

/// The most pages of one pool a thread keeps back before handing them to
/// the pool's ring (the largest [`remote_batch`] a pool accepts).
///
/// [`remote_batch`]: crate::PagePoolBuilder::remote_batch
pub const MAX_REMOTE_BATCH: usize = 64;

/// Pools a thread batches at once (a consumer thread draining several RX
/// queues of one device keeps one batch per queue).
pub(crate) const SLOTS: usize = 4;

/// Gives a batch of pages of one pool back to that pool.
///
/// # Safety
/// The caller owns every page in the slice, all belong to one pool (of the
/// tracking mode the function was instantiated for), the slice is not
/// empty, and no page is used afterwards.
pub(crate) type HandBack = unsafe fn(&[NonNull<()>]);

/// One pool's batch on one thread.
struct Slot {
    /// The pool these pages belong to (its shared state's address); null
    /// when the slot is empty.
    pool: Cell<*const ()>,
    /// How many of `pages` are in use.
    len: Cell<usize>,
    /// The pool's batch size: handed back when `len` reaches it.
    limit: Cell<usize>,
    hand_back: Cell<Option<HandBack>>,
    pages: [Cell<*mut ()>; MAX_REMOTE_BATCH],
}

impl Slot {
    const fn empty() -> Slot {
        Slot {
            pool: Cell::new(ptr::null()),
            len: Cell::new(0),
            limit: Cell::new(0),
            hand_back: Cell::new(None),
            pages: [const { Cell::new(ptr::null_mut()) }; MAX_REMOTE_BATCH],
        }
    }

    /// Empties the slot and returns what it held (see the module's "taken
    /// out first").
    fn take(&self) -> Option<Taken> {
        let len = self.len.replace(0);
        self.pool.set(ptr::null());
        let hand_back = self.hand_back.take()?;
        if len == 0 {
            return None;
        }
        let mut pages = [NonNull::<()>::dangling(); MAX_REMOTE_BATCH];
        // SAFETY: `Cell<*mut ()>` has the layout of `*mut ()`, which has
        // that of `NonNull<()>`; `self.pages[..len]` were set by `stash`
        // from non-null page pointers; the two arrays do not overlap; and
        // nothing else touches this thread-local slot during the copy.
        unsafe {
            ptr::copy_nonoverlapping(
                self.pages.as_ptr().cast::<NonNull<()>>(),
                pages.as_mut_ptr(),
                len,
            );
        }
        Some(Taken {
            hand_back,
            pages,
            len,
        })
    }

    /// Empties the slot, then hands its pages back.
    #[cold]
    #[inline(never)]
    fn hand_back(&self) {
        if let Some(taken) = self.take() {
            taken.hand_back();
        }
    }

    /// Makes the empty slot `pool`'s, holding `page`.
    fn fill(&self, pool: *const (), limit: usize, page: NonNull<()>, hand_back: HandBack) {
        debug_assert!(self.pool.get().is_null() && self.len.get() == 0);
        debug_assert!((2..=MAX_REMOTE_BATCH).contains(&limit));
        self.pool.set(pool);
        self.limit.set(limit);
        self.hand_back.set(Some(hand_back));
        self.pages[0].set(page.as_ptr());
        self.len.set(1);
    }
}

/// A slot's pages, out of the slot, on their way to their pool.
struct Taken {
    hand_back: HandBack,
    pages: [NonNull<()>; MAX_REMOTE_BATCH],
    len: usize,
}

impl Taken {
    fn hand_back(self) {
        // SAFETY: the slot owned these pages (all of one pool, `len > 0`),
        // and it no longer names them: ownership passes to `hand_back`.
        unsafe { (self.hand_back)(&self.pages[..self.len]) };
    }
}

/// A thread's batches.
struct Batches {
    slots: [Slot; SLOTS],
    /// The slot to hand back next when all are taken (round robin, so the
    /// one taken longest ago goes first).
    next_victim: Cell<usize>,
}

impl Batches {
    const fn new() -> Self {
        Self {
            slots: [Slot::empty(), Slot::empty(), Slot::empty(), Slot::empty()],
            next_victim: Cell::new(0),
        }
    }

    /// Keeps `page` of `pool` back: the fast path of a remote return. The
    /// page is in a slot before anything is handed back, so a callback that
    /// panics during a hand-back loses no page.
    #[inline]
    fn stash(&self, pool: *const (), limit: usize, page: NonNull<()>, hand_back: HandBack) {
        for slot in &self.slots {
            if slot.pool.get() == pool {
                let len = slot.len.get();
                slot.pages[len].set(page.as_ptr());
                slot.len.set(len + 1);
                if len + 1 >= slot.limit.get() {
                    slot.hand_back();
                }
                return;
            }
        }
        self.stash_in_new_slot(pool, limit, page, hand_back);
    }

    /// The slow path of [`stash`](Self::stash): the pool has no slot on this
    /// thread; take an empty one, or empty the oldest, take it, and then
    /// hand its old pages back.
    #[cold]
    #[inline(never)]
    fn stash_in_new_slot(
        &self,
        pool: *const (),
        limit: usize,
        page: NonNull<()>,
        hand_back: HandBack,
    ) {
        if let Some(slot) = self.slots.iter().find(|s| s.pool.get().is_null()) {
            slot.fill(pool, limit, page, hand_back);
            return;
        }
        let victim = self.next_victim.get();
        self.next_victim.set((victim + 1) % SLOTS);
        let slot = &self.slots[victim];
        let evicted = slot.take();
        slot.fill(pool, limit, page, hand_back);
        if let Some(evicted) = evicted {
            evicted.hand_back();
        }
    }

    /// Hands back the slot of `pool`, if this thread has one.
    fn hand_back_pool(&self, pool: *const ()) {
        if let Some(slot) = self.slots.iter().find(|s| s.pool.get() == pool) {
            slot.hand_back();
        }
    }

    /// Hands back every slot, in order, each whatever the others' callbacks
    /// do; the first panic goes on at the end.
    fn hand_back_all(&self) {
        let mut panics = Panics::new();
        for slot in &self.slots {
            panics.run(|| slot.hand_back());
        }
        panics.resume();
    }
}

impl Drop for Batches {
    /// The thread is exiting: every page kept back goes home. A callback
    /// that panics here (an unmap or a page source's free, for pages the
    /// ring refuses) is stopped, as a panic leaving a thread-local's
    /// destructor aborts the process; the panic hook has reported it, and
    /// the release it interrupted finishes on its own (`release_pages` runs
    /// every step whatever a callback does).
    fn drop(&mut self) {
        // BROKEN VARIANT (test-only, `--cfg pagepool_broken`,
        // PAGEPOOL_BROKEN=remote-exit-forgets): a thread exits without
        // sending its kept-back pages home, so they are never unmapped by
        // their release nor freed. Caught by the thread-exit loom model.
        #[cfg(pagepool_broken)]
        if crate::sync::broken("remote-exit-forgets") {
            return;
        }
        held::exiting();
        for slot in &self.slots {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| slot.hand_back()));
        }
    }
}

crate::sync::per_thread! {
    static BATCHES: Batches = const { Batches::new() };
}

/// Keeps `page` of `pool` back in this thread's batch. Returns `false` if
/// the thread's batches are gone (the thread is exiting and they were
/// already dropped): the caller then returns the page itself.
///
/// `limit` is the pool's batch size, in `2..=MAX_REMOTE_BATCH`.
///
/// # Safety
/// The caller owns `page`, which belongs to the pool at `pool`, and gives
/// it up; `hand_back` is that pool's hand-back function.
#[inline]
pub(crate) unsafe fn stash(
    pool: *const (),
    limit: usize,
    page: NonNull<()>,
    hand_back: HandBack,
) -> bool {
    BATCHES
        .try_with(|batches| batches.stash(pool, limit, page, hand_back))
        .is_ok()
}

/// Hands back this thread's batch for `pool`, if it has one (the pool's
/// owner runs this before it maps fresh pages and when it drops the pool).
pub(crate) fn hand_back_pool(pool: *const ()) {
    let _ = BATCHES.try_with(|batches| batches.hand_back_pool(pool));
}

/// Gives back every page this thread keeps back for later return to its
/// pool.
///
/// Pages dropped on a thread that does not own their pool wait in a small
/// per-thread batch (at most the pool's
/// [`remote_batch`](crate::PagePoolBuilder::remote_batch) pages per pool,
/// for at most four pools) and go to the pool's ring together. A batch is
/// handed back when it fills, when the thread exits, and when the pool's
/// owner runs dry on the same thread; a thread that stops dropping pages
/// for a long time (a consumer about to block) calls this so its pages go
/// home now. Cheap when there is nothing to give back.
///
/// ```
/// use pagepool::checking::{CheckMode, CheckingDevice};
/// use pagepool::Device;
///
/// let device = Device::new(CheckingDevice::new(CheckMode::Panic));
/// let mut pool = device.pool_builder().build().unwrap();
/// let page = pool.alloc().unwrap();
/// std::thread::spawn(move || {
///     drop(page); // kept back in this thread's batch
///     pagepool::flush_thread_returns(); // now in the pool's ring
/// })
/// .join()
/// .unwrap();
/// assert_eq!(pool.stats().recycle.ring, 1);
/// ```
pub fn flush_thread_returns() {
    let _ = BATCHES.try_with(Batches::hand_back_all);
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::panic::AssertUnwindSafe;

    std::thread_local! {
        static HANDED: RefCell<Vec<Vec<usize>>> = const { RefCell::new(Vec::new()) };
    }

    /// Records each batch handed back (as page addresses).
    unsafe fn record(pages: &[NonNull<()>]) {
        HANDED.with(|h| {
            h.borrow_mut()
                .push(pages.iter().map(|p| p.as_ptr() as usize).collect())
        });
    }

    fn handed() -> Vec<Vec<usize>> {
        HANDED.with(|h| core::mem::take(&mut *h.borrow_mut()))
    }

    /// A pool's address, as the batches see it (never dereferenced).
    fn pool_at(n: usize) -> *const () {
        ptr::without_provenance(n * 64)
    }

    fn page(n: usize) -> NonNull<()> {
        NonNull::new(ptr::without_provenance_mut(n)).unwrap()
    }

    #[test]
    fn a_full_batch_goes_back_in_order() {
        let b = Batches::new();
        let pool = pool_at(1);
        for n in 1..=3 {
            b.stash(pool, 3, page(n), record);
        }
        assert_eq!(handed(), vec![vec![1, 2, 3]]);
        b.stash(pool, 3, page(4), record);
        assert!(handed().is_empty(), "kept back until full");
        b.hand_back_pool(pool);
        assert_eq!(handed(), vec![vec![4]]);
        b.hand_back_all();
        assert!(handed().is_empty(), "an empty slot hands back nothing");
    }

    #[test]
    fn a_fifth_pool_hands_the_oldest_slot_back_after_taking_its_place() {
        let b = Batches::new();
        for pool in 1..=SLOTS {
            b.stash(pool_at(pool), 8, page(pool * 10), record);
        }
        assert!(handed().is_empty());
        b.stash(pool_at(99), 8, page(990), record);
        assert_eq!(handed(), vec![vec![10]], "the first pool's slot went");
        b.hand_back_all();
        let mut rest = handed();
        rest.sort();
        assert_eq!(rest, vec![vec![20], vec![30], vec![40], vec![990]]);
    }

    /// Panics for pool 1's pages, records the others.
    unsafe fn panic_for_pool_1(pages: &[NonNull<()>]) {
        if pages[0].as_ptr() as usize / 10 == 1 {
            panic!("hand-back of pool 1");
        }
        // SAFETY: forwarded.
        unsafe { record(pages) }
    }

    #[test]
    fn a_panicking_hand_back_loses_no_page_and_stops_no_other_slot() {
        let b = Batches::new();
        for pool in 1..=SLOTS {
            b.stash(pool_at(pool), 8, page(pool * 10), panic_for_pool_1);
        }
        // The fifth pool evicts pool 1, whose hand-back panics: the new page
        // is already in the slot.
        let evict = std::panic::catch_unwind(AssertUnwindSafe(|| {
            b.stash(pool_at(5), 8, page(50), panic_for_pool_1)
        }));
        assert!(evict.is_err());
        b.stash(pool_at(5), 8, page(51), panic_for_pool_1);
        b.stash(pool_at(1), 8, page(11), panic_for_pool_1);
        // Pool 1 is back, in the next victim's slot (pool 2's, handed back):
        // every slot goes back, even though pool 1's panics.
        let all = std::panic::catch_unwind(AssertUnwindSafe(|| b.hand_back_all()));
        assert!(all.is_err(), "pool 1's panic goes on at the end");
        let mut rest = handed();
        rest.sort();
        assert_eq!(rest, vec![vec![20], vec![30], vec![40], vec![50, 51]]);
        assert!(b.slots.iter().all(|s| s.pool.get().is_null()), "all empty");
    }

    #[test]
    fn dropping_the_batches_hands_everything_back() {
        {
            let b = Batches::new();
            b.stash(pool_at(1), 8, page(1), record);
            b.stash(pool_at(2), 8, page(2), record);
        }
        let mut all = handed();
        all.sort();
        assert_eq!(all, vec![vec![1], vec![2]]);
    }
}
