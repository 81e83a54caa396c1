//! Blocks of page metadata: the [`PageMeta`]s of one slow-path refill live
//! side by side, one cache line long each, in one allocation with their block's
//! header.
//!
//! Every return of a page reads its meta (to find its pool), and a
//! `put_bulk` of 64 pages reads 64 of them. Allocated one by one, metas
//! land wherever the allocator has a hole: between page blocks, at strides
//! of whole pages, where they share a few cache sets and evict each other.
//! In a block, the metas of a refill are adjacent lines, and the metas of
//! a pool fill few pages of memory.
//!
//! # Invariants
//!
//! - A block has `capacity` slots. Its `live` count is the number of slots
//!   that hold a page's meta, plus, while its [`MetaFiller`] exists, the
//!   slots not yet filled. It starts at `capacity`; the filler gives up the
//!   slots it left empty when it is dropped, and [`take`] gives up one slot
//!   per freed meta. Whoever brings it to zero frees the block: no slot is
//!   in use then, and none will be.
//! - A slot is written once, by the filler, before its meta is shared, and
//!   moved out once, by [`take`], when its page is freed.

use core::alloc::Layout;
use core::marker::PhantomData;
use core::ptr::NonNull;

use crate::mode::TrackingMode;
use crate::shared::PageMeta;
use crate::sync::{AtomicUsize, Ordering};

/// The header of one block of metas. A block is one allocation of
/// `capacity + 1` meta-sized cells: the header in the first,
/// the metas in the others.
pub(crate) struct MetaBlock<M: TrackingMode> {
    /// See the module invariants.
    live: AtomicUsize,
    capacity: usize,
    _metas: PhantomData<PageMeta<M>>,
}

impl<M: TrackingMode> MetaBlock<M> {
    /// The allocation of a block of `capacity` metas.
    fn layout(capacity: usize) -> Layout {
        const {
            assert!(core::mem::size_of::<Self>() <= core::mem::size_of::<PageMeta<M>>());
            assert!(core::mem::align_of::<Self>() <= core::mem::align_of::<PageMeta<M>>());
        }
        // At most a pool's cache size (validated by the builder) plus one.
        Layout::array::<PageMeta<M>>(capacity + 1).expect("a block of metas fits in memory")
    }

    /// The slot of meta `index` (< `capacity`).
    fn slot(block: NonNull<Self>, index: usize) -> NonNull<PageMeta<M>> {
        // SAFETY: `index + 1 <= capacity`: inside the block's allocation.
        unsafe { block.cast::<PageMeta<M>>().add(index + 1) }
    }

    /// Gives up `count` live slots; the last one frees the block.
    ///
    /// # Safety
    /// The caller holds `count` of the block's live slots (see the module
    /// invariants) and uses none of them afterwards.
    unsafe fn release(block: NonNull<Self>, count: usize) {
        // SAFETY: the block lives while the caller's slots are live.
        let header = unsafe { block.as_ref() };
        // AcqRel: every other slot's last use happens-before the free below
        // (as for the last reference of an `Arc`).
        if header.live.fetch_sub(count, Ordering::AcqRel) != count {
            return;
        }
        let layout = Self::layout(header.capacity);
        // SAFETY: the count reached zero: no slot is in use and none will
        // be (module invariant), so the block is ours alone. Its slots hold
        // no values (each was moved out by `take`); the header is dropped
        // here, once, and not used afterwards.
        unsafe { core::ptr::drop_in_place(block.as_ptr()) };
        // SAFETY: allocated in `MetaFiller::new` with this layout (same
        // capacity), freed once.
        unsafe { std::alloc::dealloc(block.as_ptr().cast(), layout) };
    }
}

/// Fills one new block's slots, in order, during one refill. Dropping it
/// gives up the slots it left empty (the refill made fewer pages, or a
/// callback panicked), so a block whose slots all stayed empty is freed.
pub(crate) struct MetaFiller<M: TrackingMode> {
    block: NonNull<MetaBlock<M>>,
    filled: usize,
}

impl<M: TrackingMode> MetaFiller<M> {
    /// A new block with room for `capacity` metas (at least one): one
    /// allocation.
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let layout = MetaBlock::<M>::layout(capacity);
        // SAFETY: the layout has a non-zero size (at least two metas).
        let base = unsafe { std::alloc::alloc(layout) };
        let Some(base) = NonNull::new(base) else {
            std::alloc::handle_alloc_error(layout)
        };
        let block = base.cast::<MetaBlock<M>>();
        // SAFETY: the first cell is the header's: fresh, large and aligned
        // enough (checked in `layout`).
        unsafe {
            block.as_ptr().write(MetaBlock {
                live: AtomicUsize::new(capacity),
                capacity,
                _metas: PhantomData,
            })
        };
        Self { block, filled: 0 }
    }

    /// Whether every slot is filled.
    pub(crate) fn is_full(&self) -> bool {
        // SAFETY: the block lives while the filler holds its empty slots.
        self.filled == unsafe { self.block.as_ref() }.capacity
    }

    /// Moves `meta` into the next slot, as a meta of this block, and
    /// returns where it lives. A full filler first starts a new block of
    /// the same capacity (the full one lives on with its metas).
    pub(crate) fn place(&mut self, mut meta: PageMeta<M>) -> NonNull<PageMeta<M>> {
        if self.is_full() {
            // SAFETY: the block lives while the filler holds its empty slots.
            let capacity = unsafe { self.block.as_ref() }.capacity;
            // The full filler holds no empty slot: dropping it gives up none.
            *self = Self::new(capacity);
        }
        meta.block = Some(self.block);
        // `filled < capacity`: not full.
        let slot = MetaBlock::slot(self.block, self.filled);
        // SAFETY: the slot is empty and the filler's alone (written once,
        // module invariant); it becomes the meta's until `take`.
        unsafe { slot.as_ptr().write(meta) };
        self.filled += 1;
        slot
    }
}

impl<M: TrackingMode> Drop for MetaFiller<M> {
    fn drop(&mut self) {
        // SAFETY: the block lives while the filler holds its empty slots.
        let empty = unsafe { self.block.as_ref() }.capacity - self.filled;
        if empty > 0 {
            // SAFETY: the filler holds exactly the empty slots, and uses
            // none afterwards.
            unsafe { MetaBlock::release(self.block, empty) };
        }
    }
}

/// Moves a meta out of its block slot and gives the slot up (freeing the
/// block with its last slot).
///
/// # Safety
/// `meta` was placed by a [`MetaFiller`], is live, and is not used
/// afterwards by anyone (its page is being freed).
pub(crate) unsafe fn take<M: TrackingMode>(meta: NonNull<PageMeta<M>>) -> PageMeta<M> {
    // SAFETY: live and ours alone (caller): moved out once.
    let value = unsafe { meta.as_ptr().read() };
    let block = value
        .block
        .expect("`take` is called only for metas placed in a block");
    // SAFETY: the slot was one of the block's live slots, and is no longer
    // used (its value moved out above).
    unsafe { MetaBlock::release(block, 1) };
    value
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use super::*;
    use crate::device::Device;
    use crate::dma::DmaAddr;
    use crate::mode::Tracked;
    use crate::shared::PoolShared;
    use crate::sync::Arc;
    use crate::sync::UnsafeCell;
    use crate::tracker::RecordId;

    fn pool() -> (Device<Tracked>, Arc<PoolShared<Tracked>>) {
        let device = Device::new(crate::checking::CheckingDevice::new(
            crate::checking::CheckMode::Record,
        ));
        let pool = device.pool_builder().build().unwrap();
        let shared = Arc::clone(&pool.shared);
        drop(pool);
        (device, shared)
    }

    fn meta(pool: &Arc<PoolShared<Tracked>>, i: usize) -> PageMeta<Tracked> {
        PageMeta {
            cpu: NonNull::dangling(),
            dma: DmaAddr(i as u64),
            record: UnsafeCell::new(RecordId::NONE),
            pool: Arc::clone(pool),
            frag_refs: AtomicUsize::new(0),
            dirty_len: UnsafeCell::new(usize::MAX),
            region: None,
            block: None,
        }
    }

    /// Metas of one filler are adjacent, one line apart, each names its
    /// block, and the block is freed with the last meta taken (Miri reports
    /// a block that is never freed, or freed while in use).
    #[test]
    fn a_block_holds_adjacent_metas_and_goes_with_the_last() {
        let (_device, pool) = pool();
        let mut filler = MetaFiller::new(3);
        let placed: Vec<_> = (0..3).map(|i| filler.place(meta(&pool, i))).collect();
        assert!(filler.is_full());
        let next = filler.place(meta(&pool, 9));
        assert!(!filler.is_full(), "a full filler starts a new block");
        drop(filler);
        // SAFETY: placed above, taken once.
        let value = unsafe { take(next) };
        assert_ne!(
            value.block,
            placed_block(placed[0]),
            "in a block of its own"
        );
        for pair in placed.windows(2) {
            assert_eq!(
                pair[1].as_ptr() as usize - pair[0].as_ptr() as usize,
                core::mem::size_of::<PageMeta<Tracked>>()
            );
        }
        // Taken in any order; each keeps its contents.
        for &i in &[1usize, 0, 2] {
            // SAFETY: placed above, taken once.
            let value = unsafe { take(placed[i]) };
            assert_eq!(value.dma, DmaAddr(i as u64));
            assert!(value.block.is_some());
        }
    }

    /// A filler that filled fewer slots than it had gives the rest up: the
    /// block goes with its last placed meta, or at once if none was placed.
    #[test]
    fn empty_slots_are_given_up_when_the_filler_goes() {
        let (_device, pool) = pool();
        drop(MetaFiller::<Tracked>::new(4));
        let mut filler = MetaFiller::new(4);
        let only = filler.place(meta(&pool, 7));
        drop(filler);
        // SAFETY: placed above, taken once.
        let value = unsafe { take(only) };
        assert_eq!(value.dma, DmaAddr(7));
    }

    fn placed_block(meta: NonNull<PageMeta<Tracked>>) -> Option<NonNull<MetaBlock<Tracked>>> {
        // SAFETY: placed and not yet taken.
        unsafe { meta.as_ref() }.block
    }

    #[test]
    fn a_meta_is_one_cache_line_long() {
        assert_eq!(core::mem::size_of::<PageMeta<Tracked>>(), 64);
    }
}
