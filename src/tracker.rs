//! The in-flight tracker: a record of every live DMA mapping of a device.
//!
//! Every page the pool maps gets a record here, inserted in the device call that
//! mapped it and removed right before `unmap`. `unbind` walks the tracker and
//! unmaps what is left, including pages held far outside the pool, so no
//! mapping outlives the driver.
//!
//! # Layout
//!
//! [`SHARDS`] shards, each a mutex around a [`CompactSlab`] of pointers to
//! page metadata, each on its own cache line. A pool inserts into the shard
//! chosen when it was built, so pools on different threads (one per RX
//! queue) never contend; removal goes to the shard named in the record id.
//!
//! A record is one pointer-sized word: 8 bytes per mapped page on 64-bit
//! targets, at most 16 with the slab's spare capacity (the `slab` crate's
//! `Entry` enum would take 16 bytes per slot, so up to 32 per page; this
//! module exists to meet the 16-byte budget).
//!
//! # Invariants
//!
//! - A record is removed at most once: [`InFlightTracker::remove`] succeeds
//!   only if the slot still holds that very page, and whoever removes a
//!   record performs the unmap. That makes "unmapped exactly once" hold when
//!   a page leaves the pool on one thread while `unbind` runs on another.
//! - Once [`InFlightTracker::close_and_drain`] has passed a shard, nothing is
//!   inserted into it again: insertion into a closed shard fails.
//! - The fast path never touches the tracker: only map (slow path) and
//!   unmap (a page leaving the pool) do.

use core::ptr::{self, NonNull};

use crate::sync::Mutex;

/// Number of shards; a power of two.
pub(crate) const SHARDS: usize = 16;
const SHARD_BITS: u32 = SHARDS.trailing_zeros();
/// Largest slot index a record id can name. One below the field's maximum:
/// shard `SHARDS - 1` with the maximum slot would spell [`RecordId::NONE`].
const MAX_SLOT: usize = (u32::MAX >> SHARD_BITS) as usize - 1;

/// Names one record: shard in the low bits, slot above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordId(u32);

impl RecordId {
    /// Names no record: what an untracked page carries. Removing it fails.
    pub(crate) const NONE: RecordId = RecordId(u32::MAX);

    fn new(shard: usize, slot: usize) -> Self {
        debug_assert!(shard < SHARDS && slot <= MAX_SLOT);
        RecordId(((slot as u32) << SHARD_BITS) | shard as u32)
    }
    fn shard(self) -> usize {
        (self.0 as usize) & (SHARDS - 1)
    }
    fn slot(self) -> usize {
        (self.0 >> SHARD_BITS) as usize
    }
}

/// Why a record could not be inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InsertError {
    /// The tracker was closed by unbind.
    Closed,
    /// The shard has `MAX_SLOT` live records.
    Full,
}

/// A slab of pointers in one word per slot.
///
/// Occupied slots hold the pointer itself (aligned, so bit 0 is clear);
/// vacant slots hold `(next_vacant << 1) | 1` as an address without
/// provenance, forming the free list.
struct CompactSlab<T> {
    slots: Vec<*mut T>,
    free_head: usize,
    len: usize,
}

const NIL: usize = usize::MAX >> 1;

impl<T> CompactSlab<T> {
    const fn new() -> Self {
        Self {
            slots: Vec::new(),
            free_head: NIL,
            len: 0,
        }
    }

    fn vacant(next: usize) -> *mut T {
        ptr::without_provenance_mut((next << 1) | 1)
    }

    fn is_vacant(slot: *mut T) -> bool {
        slot.addr() & 1 == 1
    }

    fn insert(&mut self, item: NonNull<T>) -> Option<usize> {
        debug_assert!(
            item.as_ptr().addr() & 1 == 0,
            "tracked pointers are aligned"
        );
        if self.free_head != NIL {
            let slot = self.free_head;
            self.free_head = self.slots[slot].addr() >> 1;
            self.slots[slot] = item.as_ptr();
            self.len += 1;
            return Some(slot);
        }
        let slot = self.slots.len();
        if slot > MAX_SLOT {
            return None;
        }
        self.slots.push(item.as_ptr());
        self.len += 1;
        Some(slot)
    }

    fn remove(&mut self, slot: usize, item: NonNull<T>) -> bool {
        match self.slots.get_mut(slot) {
            Some(entry) if *entry == item.as_ptr() => {
                *entry = Self::vacant(self.free_head);
                self.free_head = slot;
                self.len -= 1;
                true
            }
            _ => false,
        }
    }

    /// Empties the slab, handing every occupied pointer to `f`, and frees
    /// its memory.
    fn drain(&mut self, mut f: impl FnMut(NonNull<T>)) {
        for &entry in &self.slots {
            if !Self::is_vacant(entry) {
                // Occupied slots only ever hold pointers from `insert`,
                // which were non-null.
                if let Some(item) = NonNull::new(entry) {
                    f(item);
                }
            }
        }
        *self = Self::new();
    }

    fn heap_bytes(&self) -> usize {
        self.slots.capacity() * core::mem::size_of::<*mut T>()
    }
}

struct Shard<T> {
    slab: CompactSlab<T>,
    closed: bool,
}

/// A shard on its own cache line(s), so neighbours do not false-share.
#[repr(align(128))]
struct PaddedShard<T>(Mutex<Shard<T>>);

/// The sharded record of live mappings. See the [module docs](self).
pub(crate) struct InFlightTracker<T> {
    shards: Box<[PaddedShard<T>]>,
}

// SAFETY: the tracker stores pointers only as opaque keys and hands them
// back to the caller; all access to them is under the shard mutexes. The
// caller (the device) owns what they point to and is Send + Sync itself.
unsafe impl<T: Send + Sync> Send for InFlightTracker<T> {}
// SAFETY: as above; every method takes the shard lock.
unsafe impl<T: Send + Sync> Sync for InFlightTracker<T> {}

impl<T> InFlightTracker<T> {
    pub(crate) fn new() -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                PaddedShard(Mutex::new(Shard {
                    slab: CompactSlab::new(),
                    closed: false,
                }))
            })
            .collect();
        Self { shards }
    }

    /// Records `item` in shard `shard_hint % SHARDS`.
    pub(crate) fn insert(
        &self,
        shard_hint: usize,
        item: NonNull<T>,
    ) -> Result<RecordId, InsertError> {
        let shard_index = shard_hint % SHARDS;
        let mut shard = self.shards[shard_index].0.lock();
        if shard.closed {
            return Err(InsertError::Closed);
        }
        let slot = shard.slab.insert(item).ok_or(InsertError::Full)?;
        Ok(RecordId::new(shard_index, slot))
    }

    /// Removes the record `id` if it still names `item`. Returns whether it
    /// did: the caller that gets `true` must unmap the page.
    pub(crate) fn remove(&self, id: RecordId, item: NonNull<T>) -> bool {
        if id == RecordId::NONE {
            return false;
        }
        self.shards[id.shard()]
            .0
            .lock()
            .slab
            .remove(id.slot(), item)
    }

    /// Closes every shard (no insertion succeeds afterwards) and removes
    /// every record, handing each to `f`. Returns how many there were.
    ///
    /// Each shard's records are removed under its lock, all at once, and
    /// handed to `f` after the lock is released: `f` may call back into the
    /// tracker (a callback that drops a page) without deadlocking, and a
    /// record is always removed before `f` sees it.
    pub(crate) fn close_and_drain(&self, mut f: impl FnMut(NonNull<T>)) -> usize {
        let mut drained = 0;
        for shard in self.shards.iter() {
            let mut slab = {
                let mut shard = shard.0.lock();
                shard.closed = true;
                core::mem::replace(&mut shard.slab, CompactSlab::new())
            };
            slab.drain(|item| {
                drained += 1;
                f(item)
            });
        }
        drained
    }

    /// Number of live records.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().slab.len).sum()
    }

    /// Heap bytes the tracker uses now: the shards plus every slab's
    /// capacity.
    pub(crate) fn heap_bytes(&self) -> usize {
        let shards = self.shards.len() * core::mem::size_of::<PaddedShard<T>>();
        shards
            + self
                .shards
                .iter()
                .map(|s| s.0.lock().slab.heap_bytes())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Boxed so each item has its own stable, aligned address.
    #[allow(clippy::vec_box)]
    fn items(n: usize) -> Vec<Box<u64>> {
        (0..n as u64).map(Box::new).collect()
    }

    fn ptr(b: &mut Box<u64>) -> NonNull<u64> {
        NonNull::from(&mut **b)
    }

    #[test]
    fn insert_remove_once() {
        let tracker = InFlightTracker::new();
        let mut xs = items(3);
        let ids: Vec<_> = xs
            .iter_mut()
            .map(|x| tracker.insert(5, ptr(x)).unwrap())
            .collect();
        assert_eq!(tracker.len(), 3);
        assert!(tracker.remove(ids[1], ptr(&mut xs[1])));
        assert!(
            !tracker.remove(ids[1], ptr(&mut xs[1])),
            "second removal must fail"
        );
        assert!(
            !tracker.remove(ids[0], ptr(&mut xs[2])),
            "wrong item must not remove"
        );
        assert_eq!(tracker.len(), 2);
    }

    #[test]
    fn closed_tracker_refuses_records() {
        let tracker = InFlightTracker::new();
        let mut xs = items(2);
        let id = tracker.insert(3, ptr(&mut xs[0])).unwrap();
        assert!(tracker.remove(id, ptr(&mut xs[0])));
        assert_eq!(tracker.close_and_drain(|_| {}), 0);
        assert_eq!(tracker.insert(3, ptr(&mut xs[1])), Err(InsertError::Closed));
    }

    #[test]
    fn vacant_slots_are_reused() {
        let tracker = InFlightTracker::new();
        let mut xs = items(2);
        let a = tracker.insert(0, ptr(&mut xs[0])).unwrap();
        assert!(tracker.remove(a, ptr(&mut xs[0])));
        let b = tracker.insert(0, ptr(&mut xs[1])).unwrap();
        assert_eq!(a, b);
        assert!(tracker.remove(b, ptr(&mut xs[1])));
        assert_eq!(tracker.len(), 0);
    }

    /// The free list ends in `NIL` again once its last vacant slot is
    /// reused: the next insert appends a new slot.
    #[test]
    fn the_free_list_ends_after_its_last_slot_is_reused() {
        let tracker = InFlightTracker::new();
        let mut xs = items(3);
        let a = tracker.insert(0, ptr(&mut xs[0])).unwrap();
        assert!(tracker.remove(a, ptr(&mut xs[0])));
        let b = tracker.insert(0, ptr(&mut xs[1])).unwrap();
        assert_eq!(b, a, "the vacant slot is reused");
        let c = tracker.insert(0, ptr(&mut xs[2])).unwrap();
        assert_ne!(c, b, "then a new slot");
        assert!(tracker.remove(c, ptr(&mut xs[2])));
        assert!(tracker.remove(b, ptr(&mut xs[1])));
        assert_eq!(tracker.len(), 0);
    }

    /// A shard holds `MAX_SLOT + 1` records (slots `0..=MAX_SLOT`) and
    /// refuses the next. The slots are zeroed memory the test never
    /// touches (2 GiB of address space, not of memory); too big for Miri.
    #[test]
    #[cfg_attr(miri, ignore)]
    fn a_shard_holds_slots_up_to_max_slot_and_no_more() {
        let mut x = Box::new(0u64);
        let mut slab = CompactSlab::<u64>::new();
        let capacity = MAX_SLOT + 2;
        let layout = std::alloc::Layout::array::<*mut u64>(capacity).unwrap();
        // SAFETY: the layout's size is not zero.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<*mut u64>();
        assert!(!raw.is_null(), "2 GiB of address space");
        // SAFETY: allocated by the global allocator with the layout of
        // `capacity` pointers; the first `MAX_SLOT` are zero, i.e. null
        // pointers, which is a valid `*mut u64`.
        slab.slots = unsafe { Vec::from_raw_parts(raw, MAX_SLOT, capacity) };
        assert_eq!(slab.insert(ptr(&mut x)), Some(MAX_SLOT));
        assert_eq!(slab.insert(ptr(&mut x)), None, "no slot above MAX_SLOT");
        assert_eq!(slab.slots.len(), MAX_SLOT + 1);
    }

    #[test]
    fn drain_visits_each_live_record_once_and_closes() {
        let tracker = InFlightTracker::new();
        let mut xs = items(40);
        let ids: Vec<_> = xs
            .iter_mut()
            .enumerate()
            .map(|(i, x)| tracker.insert(i, ptr(x)).unwrap())
            .collect();
        for i in (0..40).step_by(3) {
            assert!(tracker.remove(ids[i], ptr(&mut xs[i])));
        }
        let mut seen = Vec::new();
        let n = tracker.close_and_drain(|p| {
            // SAFETY: every tracked pointer points into a live Box in `xs`.
            seen.push(unsafe { *p.as_ptr() })
        });
        seen.sort();
        let expected: Vec<u64> = (0..40).filter(|i| i % 3 != 0).collect();
        assert_eq!(seen, expected);
        assert_eq!(n, expected.len());
        assert_eq!(tracker.len(), 0);
        assert_eq!(tracker.insert(0, ptr(&mut xs[0])), Err(InsertError::Closed));
        assert!(
            !tracker.remove(ids[1], ptr(&mut xs[1])),
            "drained records are gone"
        );
    }

    #[test]
    fn no_record_id_spells_none() {
        for shard in 0..SHARDS {
            let id = RecordId::new(shard, MAX_SLOT);
            assert_ne!(id, RecordId::NONE);
            assert_eq!((id.shard(), id.slot()), (shard, MAX_SLOT));
        }
    }

    /// An empty tracker's heap is its shards, each on lines of its own.
    #[test]
    fn an_empty_tracker_is_its_padded_shards() {
        let tracker = InFlightTracker::<u64>::new();
        assert_eq!(core::mem::size_of::<PaddedShard<u64>>() % 128, 0);
        assert_eq!(
            tracker.heap_bytes(),
            SHARDS * core::mem::size_of::<PaddedShard<u64>>()
        );
    }

    #[test]
    fn a_record_is_one_word() {
        let tracker = InFlightTracker::new();
        let mut xs = items(1024);
        let base = tracker.heap_bytes();
        for x in xs.iter_mut() {
            tracker.insert(0, ptr(x)).unwrap();
        }
        let per_record = (tracker.heap_bytes() - base) as f64 / 1024.0;
        assert_eq!(per_record, core::mem::size_of::<usize>() as f64);
    }
}
