//! Blocks of page metadata: the [`PageMeta`]s of one slow-path refill live
//! side by side, in one allocation with their block's
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
use crate::shared::{MetaBlock, MetaHome, PageMeta};
use crate::sync::{AtomicUsize, Ordering};

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
///
/// A refill of one page gains nothing from a block: its meta is boxed on
/// its own, as it would be in a block of one, without the header.
pub(crate) struct MetaFiller<M: TrackingMode> {
    /// `None`: each meta is boxed on its own.
    block: Option<NonNull<MetaBlock<M>>>,
    filled: usize,
}

impl<M: TrackingMode> MetaFiller<M> {
    /// A filler for `capacity` metas: one block (one allocation) for two
    /// or more, none for one.
    pub(crate) fn new(capacity: usize) -> Self {
        if capacity <= 1 {
            return Self {
                block: None,
                filled: 0,
            };
        }
        let layout = MetaBlock::<M>::layout(capacity);
        // SAFETY: the layout has a non-zero size (at least three metas).
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
        Self {
            block: Some(block),
            filled: 0,
        }
    }

    /// The block's capacity and whether every slot is filled; `None` for a
    /// filler that boxes each meta.
    #[inline]
    fn fill_state(&self) -> Option<(usize, bool)> {
        let block = self.block?;
        // SAFETY: the block lives while the filler holds its empty slots.
        let capacity = unsafe { block.as_ref() }.capacity;
        Some((capacity, self.filled == capacity))
    }

    /// Moves `meta` into the next slot, as a meta of this block, and
    /// returns where it lives. A full filler first starts a new block of
    /// the same capacity (the full one lives on with its metas).
    #[inline]
    pub(crate) fn place(&mut self, mut meta: PageMeta<M>) -> NonNull<PageMeta<M>> {
        match self.fill_state() {
            None => {
                meta.home = MetaHome::boxed();
                return NonNull::from(Box::leak(Box::new(meta)));
            }
            Some((capacity, true)) => {
                // The full filler holds no empty slot: dropping it gives up none.
                *self = Self::new(capacity);
            }
            Some((_, false)) => {}
        }
        let Some(block) = self.block else {
            unreachable!("a filler of two or more metas has a block")
        };
        meta.home = MetaHome::block(block);
        // `filled < capacity`: not full.
        let slot = MetaBlock::slot(block, self.filled);
        // SAFETY: the slot is empty and the filler's alone (written once,
        // module invariant); it becomes the meta's until `take`.
        unsafe { slot.as_ptr().write(meta) };
        self.filled += 1;
        slot
    }
}

impl<M: TrackingMode> Drop for MetaFiller<M> {
    fn drop(&mut self) {
        let (Some(block), Some((capacity, _))) = (self.block, self.fill_state()) else {
            return;
        };
        let empty = capacity - self.filled;
        if empty > 0 {
            // SAFETY: the filler holds exactly the empty slots, and uses
            // none afterwards.
            unsafe { MetaBlock::release(block, empty) };
        }
    }
}

/// Moves a meta out of its block slot (or its own box). The returned
/// [`EmptySlot`] gives the slot up when dropped (freeing the block with its
/// last slot, or the box): the caller drops it once it has freed the page,
/// so a page's memory goes back before its meta's, as it did when each
/// meta was boxed.
///
/// # Safety
/// `meta` was placed by a [`MetaFiller`], is live, and is not used
/// afterwards by anyone (its page is being freed).
#[inline]
pub(crate) unsafe fn take<M: TrackingMode>(
    meta: NonNull<PageMeta<M>>,
) -> (PageMeta<M>, EmptySlot<M>) {
    // SAFETY: live and ours alone (caller): moved out once.
    let value = unsafe { meta.as_ptr().read() };
    let slot = EmptySlot {
        slot: meta,
        block: value.home.as_block(),
    };
    (value, slot)
}

/// The slot of a meta moved out by [`take`]: given up when dropped.
pub(crate) struct EmptySlot<M: TrackingMode> {
    slot: NonNull<PageMeta<M>>,
    block: Option<NonNull<MetaBlock<M>>>,
}

impl<M: TrackingMode> Drop for EmptySlot<M> {
    #[inline]
    fn drop(&mut self) {
        match self.block {
            // SAFETY: the slot was one of the block's live slots, and is no
            // longer used (its value was moved out by `take`).
            Some(block) => unsafe { MetaBlock::release(block, 1) },
            // SAFETY: boxed by `place` (a filler without a block), freed
            // once; the value was moved out, so the box is freed without a
            // drop.
            None => drop(unsafe {
                Box::from_raw(
                    self.slot
                        .as_ptr()
                        .cast::<core::mem::MaybeUninit<PageMeta<M>>>(),
                )
            }),
        }
    }
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use super::*;
    use crate::dma::DmaAddr;
    use crate::mode::Tracked;
    use crate::shared::{PageView, PoolShared};
    use crate::sync::Arc;
    use crate::sync::UnsafeCell;
    use crate::tracker::RecordId;
    use crate::Device;

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
            view: PageView::of(pool),
            dma: DmaAddr(i as u64),
            record: UnsafeCell::new(RecordId::NONE),
            pool: Arc::clone(pool),
            frag_refs: AtomicUsize::new(0),
            dirty_len: UnsafeCell::new(u32::MAX),
            home: MetaHome::boxed(),
        }
    }

    /// Metas of one filler are adjacent, each names its
    /// block, and every meta keeps its contents until it is taken, in any
    /// order (under Miri, a block freed while a meta is still in it is a
    /// use after free).
    #[test]
    fn a_block_holds_adjacent_metas_and_goes_with_the_last() {
        let (_device, pool) = pool();
        let mut filler = MetaFiller::new(3);
        let placed: Vec<_> = (0..3).map(|i| filler.place(meta(&pool, i))).collect();
        assert_eq!(filler.fill_state(), Some((3, true)));
        let next = filler.place(meta(&pool, 9));
        assert_eq!(
            filler.fill_state(),
            Some((3, false)),
            "a full filler starts a new block"
        );
        drop(filler);
        // SAFETY: placed above, taken once.
        let (value, _slot) = unsafe { take(next) };
        assert_ne!(
            value.home.as_block(),
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
            let (value, _slot) = unsafe { take(placed[i]) };
            assert_eq!(value.dma, DmaAddr(i as u64));
            assert!(value.home.as_block().is_some());
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
        let (value, _slot) = unsafe { take(only) };
        assert_eq!(value.dma, DmaAddr(7));
    }

    fn placed_block(meta: NonNull<PageMeta<Tracked>>) -> Option<NonNull<MetaBlock<Tracked>>> {
        // SAFETY: placed and not yet taken.
        unsafe { meta.as_ref() }.home.as_block()
    }

    /// A filler for one meta boxes it, without a block, as often as asked.
    #[test]
    fn a_filler_of_one_boxes_each_meta() {
        let (_device, pool) = pool();
        let mut filler = MetaFiller::new(1);
        let placed: Vec<_> = (0..2).map(|i| filler.place(meta(&pool, i))).collect();
        drop(filler);
        for (i, &meta) in placed.iter().enumerate() {
            assert_eq!(placed_block(meta), None);
            // SAFETY: placed above, taken once.
            assert_eq!(unsafe { take(meta) }.0.dma, DmaAddr(i as u64));
        }
    }

    #[test]
    fn a_meta_is_seven_words() {
        assert_eq!(core::mem::size_of::<PageMeta<Tracked>>(), 56);
    }
}
