//! The shared ring: where pages recycled from other threads wait for the
//! pool's owner.
//!
//! A bounded stack of page pointers under one mutex (Linux's `ptr_ring`
//! also takes a producer lock). Producers are any threads dropping pages;
//! the consumer is the owner refilling its local cache, a batch at a time
//! under one lock. Bulk producers push many pages under one lock.
//!
//! # Invariants
//!
//! - A bounded ring never holds more than `capacity` pages; its storage is
//!   allocated once, at build time, and never grows. The unbounded ring (a
//!   region pool's spare list) grows only on the slow path that carves a
//!   region.
//! - Once closed (by the pool's drop or by `unbind`), a push is refused and
//!   the page handed back, so nothing enters a ring whose pool or device is
//!   going away (the CVE-2025-38129 race). Closing hands back everything the
//!   ring held, in the same critical section.
//! - A page is in at most one place: the ring owns the pages it holds.

use core::ptr::NonNull;

use crate::stats::RingCounters;
use crate::sync::{Mutex, MutexGuard};

/// Why a push was refused; the page stays the caller's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PushRefused {
    Full,
    Closed,
}

pub(crate) struct RingState<T> {
    pages: Vec<NonNull<T>>,
    /// The most pages the ring holds.
    limit: usize,
    closed: bool,
    pub(crate) counters: RingCounters,
}

impl<T> RingState<T> {
    /// Whether the ring was closed: every push is refused.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Pushes one page, counting it.
    pub(crate) fn push(&mut self, page: NonNull<T>) -> Result<(), PushRefused> {
        if self.closed {
            return Err(PushRefused::Closed);
        }
        if self.pages.len() == self.limit {
            self.counters.ring_full += 1;
            return Err(PushRefused::Full);
        }
        self.pages.push(page);
        self.counters.ring += 1;
        Ok(())
    }

    /// Pushes as many of `pages` as there is room for, in order, counting
    /// them: one copy, no per-page check. Returns how many it took (a
    /// prefix of `pages`) and, if it did not take them all, why the rest
    /// were refused; those stay the caller's.
    pub(crate) fn push_many(&mut self, pages: &[NonNull<T>]) -> (usize, Option<PushRefused>) {
        if self.closed {
            return (0, Some(PushRefused::Closed));
        }
        let room = self.limit - self.pages.len();
        let taken = room.min(pages.len());
        self.pages.extend_from_slice(&pages[..taken]);
        self.counters.ring += taken as u64;
        if taken == pages.len() {
            (taken, None)
        } else {
            self.counters.ring_full += (pages.len() - taken) as u64;
            (taken, Some(PushRefused::Full))
        }
    }
}

/// A bounded, closable ring of page pointers. Its lock and counters sit on
/// a line of their own (two, for the adjacent-line prefetcher): producers
/// and the owner write them, and nothing read on the fast paths shares it.
#[repr(align(128))]
pub(crate) struct Ring<T> {
    state: Mutex<RingState<T>>,
}

// SAFETY: the ring only moves page pointers between threads; the pages they
// point to are owned by whoever holds the pointer, and `T` (page metadata)
// is itself Send + Sync.
unsafe impl<T: Send + Sync> Send for Ring<T> {}
// SAFETY: all access goes through the mutex.
unsafe impl<T: Send + Sync> Sync for Ring<T> {}

impl<T> Ring<T> {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            state: Mutex::new(RingState {
                pages: Vec::with_capacity(capacity),
                limit: capacity,
                closed: false,
                counters: RingCounters::default(),
            }),
        }
    }

    /// A ring that is never full: a region pool's spare list, which holds at
    /// most the pages its regions carved, and grows (on the slow path only)
    /// as regions are added.
    pub(crate) fn unbounded() -> Self {
        Self {
            state: Mutex::new(RingState {
                pages: Vec::new(),
                limit: usize::MAX,
                closed: false,
                counters: RingCounters::default(),
            }),
        }
    }

    /// Locks the ring, for pushing several pages under one lock.
    pub(crate) fn lock(&self) -> MutexGuard<'_, RingState<T>> {
        self.state.lock()
    }

    /// Moves up to `max` pages into `out` (which must have room: it never
    /// grows). Returns how many moved.
    #[inline]
    pub(crate) fn pop_into(&self, out: &mut Vec<NonNull<T>>, max: usize) -> usize {
        let mut state = self.state.lock();
        let n = max.min(state.pages.len()).min(out.capacity() - out.len());
        let from = state.pages.len() - n;
        // One copy of the block, not a loop over the pages.
        out.extend_from_slice(&state.pages[from..]);
        state.pages.truncate(from);
        n
    }

    /// Closes the ring and hands back what it held.
    pub(crate) fn close(&self) -> Vec<NonNull<T>> {
        let mut state = self.state.lock();
        // BROKEN VARIANT (test-only, `--cfg pagepool_broken`,
        // PAGEPOOL_BROKEN=ring-push-after-close): drain the ring but leave it
        // open, with its capacity, so a page recycled after the drain stays
        // in it forever (CVE-2025-38129's race). Caught by the pool-drop loom model.
        #[cfg(pagepool_broken)]
        if crate::sync::broken("ring-push-after-close") {
            return state.pages.drain(..).collect();
        }
        state.closed = true;
        core::mem::take(&mut state.pages)
    }

    /// The counters, read under the lock.
    pub(crate) fn counters(&self) -> RingCounters {
        self.state.lock().counters
    }

    /// Pages waiting in the ring now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.state.lock().pages.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_counted_and_closable() {
        let mut values = [1u32, 2, 3];
        let ptrs: Vec<NonNull<u32>> = values.iter_mut().map(NonNull::from).collect();
        let ring = Ring::with_capacity(2);
        assert_eq!(ring.lock().push(ptrs[0]), Ok(()));
        assert_eq!(ring.lock().push(ptrs[1]), Ok(()));
        assert_eq!(ring.lock().push(ptrs[2]), Err(PushRefused::Full));
        let c = ring.counters();
        assert_eq!((c.ring, c.ring_full), (2, 1));

        let mut out = Vec::with_capacity(1);
        assert_eq!(
            ring.pop_into(&mut out, 8),
            1,
            "bounded by the room in `out`"
        );
        assert_eq!(out, vec![ptrs[1]]);

        let left = ring.close();
        assert_eq!(left, vec![ptrs[0]]);
        assert_eq!(ring.lock().push(ptrs[2]), Err(PushRefused::Closed));
        assert_eq!(ring.len(), 0);
    }

    #[test]
    fn push_many_takes_a_prefix_and_counts_the_rest_as_refused() {
        let mut values = [1u32, 2, 3, 4, 5];
        let ptrs: Vec<NonNull<u32>> = values.iter_mut().map(NonNull::from).collect();
        let ring = Ring::with_capacity(4);
        assert_eq!(ring.lock().push_many(&ptrs[..1]), (1, None));
        assert_eq!(
            ring.lock().push_many(&ptrs[1..]),
            (3, Some(PushRefused::Full)),
            "room for three of four"
        );
        let c = ring.counters();
        assert_eq!((c.ring, c.ring_full), (4, 1));
        let mut out = Vec::with_capacity(8);
        assert_eq!(ring.pop_into(&mut out, 8), 4);
        assert_eq!(out, ptrs[..4].to_vec(), "in order");
        assert_eq!(ring.lock().push_many(&[]), (0, None));
        assert!(ring.close().is_empty());
        assert_eq!(
            ring.lock().push_many(&ptrs[4..]),
            (0, Some(PushRefused::Closed))
        );
        let c = ring.counters();
        assert_eq!(
            (c.ring, c.ring_full),
            (4, 1),
            "a closed ring counts nothing"
        );
    }

    /// `pop_into` fills only the room left in `out`, not its whole
    /// capacity: the owner's cache is refilled while it still holds pages.
    #[test]
    fn pop_into_is_bounded_by_the_room_left_not_the_capacity() {
        let mut values = [1u32, 2, 3, 4];
        let ptrs: Vec<NonNull<u32>> = values.iter_mut().map(NonNull::from).collect();
        let ring = Ring::with_capacity(4);
        assert_eq!(ring.lock().push_many(&ptrs[1..]), (3, None));
        let mut out = Vec::with_capacity(2);
        out.push(ptrs[0]);
        let room = out.capacity() - out.len();
        assert_eq!(ring.pop_into(&mut out, 8), room);
        assert_eq!(out.len(), out.capacity(), "filled to capacity, no more");
        assert_eq!(ring.len(), 3 - room);
    }
}
