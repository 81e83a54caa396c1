//! The IOVA allocator: picks device addresses inside the IOMMU's valid
//! ranges (VFIO type1 lets userspace choose the IOVA of every mapping).
//!
//! A first-fit range allocator over the free extents, kept in address order
//! and coalesced on free:
//! - every block is aligned to its size rounded up to a power of two (its
//!   page order), as Linux's own IOVA allocator does, so large mappings can
//!   use large IOMMU pages;
//! - blocks never overlap, and a freed block is reused by the next
//!   allocation that fits (first fit keeps the address space dense, so pages
//!   mapped one after another get neighbouring IOVAs and a batch unmap can
//!   merge them into one `UNMAP_DMA`);
//! - IOVA page 0 is never handed out, so a zero descriptor address is never
//!   a valid buffer.
//! - A block freed after an unmap waits in a FIFO quarantine of
//!   [`QUARANTINE`] blocks before it can be handed out again, so a stale
//!   descriptor (an IOVA the driver forgot) faults in the IOMMU for a while
//!   instead of writing into the next buffer mapped there. A block whose
//!   map failed was never visible to the device and is free at once; when
//!   nothing else fits, the quarantine is released oldest first rather
//!   than failing an allocation.
//!
//! Cost: allocation walks the free extents from the lowest address until one
//! fits. With one mapping size (a page pool) the first extent always fits;
//! mixed sizes can make the walk longer.

use std::collections::{BTreeMap, VecDeque};

/// Blocks a freed IOVA waits behind before it is reused.
pub(crate) const QUARANTINE: usize = 256;

/// One range of valid IOVAs, both ends inclusive (as the kernel reports it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IovaRange {
    /// First valid address.
    pub start: u64,
    /// Last valid address (inclusive).
    pub end: u64,
}

/// The kernel's ranges made safe to allocate from: inverted ones dropped,
/// the rest sorted and overlapping or touching ones merged, so blocks
/// carved from them can never overlap.
pub(crate) fn normalize_ranges(ranges: &[IovaRange]) -> Vec<IovaRange> {
    let mut sorted: Vec<IovaRange> = ranges
        .iter()
        .copied()
        .filter(|r| r.start <= r.end)
        .collect();
    sorted.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<IovaRange> = Vec::with_capacity(sorted.len());
    for range in sorted {
        match out.last_mut() {
            Some(last) if range.start <= last.end.saturating_add(1) => {
                last.end = last.end.max(range.end);
            }
            _ => out.push(range),
        }
    }
    out
}

/// Free IOVA extents, `start -> last` (inclusive), disjoint and coalesced.
#[derive(Debug)]
pub(crate) struct IovaAllocator {
    free: BTreeMap<u64, u64>,
    /// Freed blocks `(start, size)`, oldest first, not yet in `free`.
    quarantine: VecDeque<(u64, u64)>,
    page: u64,
}

impl IovaAllocator {
    /// An allocator over `ranges`, handing out multiples of `page` (a power
    /// of two) aligned to at least `page`.
    pub(crate) fn new(ranges: &[IovaRange], page: u64) -> Self {
        assert!(
            page.is_power_of_two(),
            "IOMMU page size must be a power of two"
        );
        let mut this = Self {
            free: BTreeMap::new(),
            quarantine: VecDeque::new(),
            page,
        };
        for range in &normalize_ranges(ranges) {
            // Never page 0; never a block touching u64::MAX (DmaAddr::ERROR).
            let Some(start) = align_up(range.start.max(page), page) else {
                continue;
            };
            // Exclusive end, rounded down to a page; a range reaching
            // u64::MAX loses its last page.
            let end = range.end.saturating_add(1) & !(page - 1);
            if end > start {
                this.insert(start, end - 1);
            }
        }
        this
    }

    /// Total free bytes, quarantined ones included (for tests and
    /// diagnostics).
    #[cfg(test)]
    pub(crate) fn free_bytes(&self) -> u64 {
        self.free.iter().map(|(s, l)| l - s + 1).sum::<u64>()
            + self.quarantine.iter().map(|&(_, size)| size).sum::<u64>()
    }

    /// Allocates `size` bytes (a non-zero multiple of the page size),
    /// aligned to `size.next_power_of_two()`; `None` when nothing fits,
    /// even with the quarantine released.
    pub(crate) fn alloc(&mut self, size: u64) -> Option<u64> {
        loop {
            if let Some(at) = self.alloc_free(size) {
                return Some(at);
            }
            let (start, size) = self.quarantine.pop_front()?;
            self.insert(start, start + (size - 1));
        }
    }

    fn alloc_free(&mut self, size: u64) -> Option<u64> {
        debug_assert!(size != 0 && size % self.page == 0);
        let align = size.checked_next_power_of_two()?.max(self.page);
        let mut found = None;
        for (&start, &last) in &self.free {
            let Some(at) = align_up(start, align) else {
                break;
            };
            if at <= last && size - 1 <= last - at {
                found = Some((start, last, at));
                break;
            }
        }
        let (start, last, at) = found?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - 1);
        }
        let block_last = at + (size - 1);
        if block_last < last {
            self.free.insert(block_last + 1, last);
        }
        Some(at)
    }

    /// Puts `[iova, iova + size)`, just unmapped, in the quarantine; the
    /// oldest quarantined block goes back to the free extents once more
    /// than [`QUARANTINE`] wait. Returns `false` (and changes nothing) if
    /// any part of it is already free or quarantined: a double free.
    pub(crate) fn free(&mut self, iova: u64, size: u64) -> bool {
        if size == 0 {
            return true;
        }
        if !self.is_allocated(iova, size) {
            return false;
        }
        self.quarantine.push_back((iova, size));
        if self.quarantine.len() > QUARANTINE {
            if let Some((start, size)) = self.quarantine.pop_front() {
                self.insert(start, start + (size - 1));
            }
        }
        true
    }

    /// Returns `[iova, iova + size)`, which was never mapped (its map
    /// failed), to the free extents at once. Returns `false` (and changes
    /// nothing) on a double free.
    pub(crate) fn release(&mut self, iova: u64, size: u64) -> bool {
        if size == 0 {
            return true;
        }
        if !self.is_allocated(iova, size) {
            return false;
        }
        self.insert(iova, iova + (size - 1));
        true
    }

    /// Whether no byte of `[iova, iova + size)` is free or quarantined.
    fn is_allocated(&self, iova: u64, size: u64) -> bool {
        let Some(last) = iova.checked_add(size - 1) else {
            return false;
        };
        let overlaps = |&(start, len): &(u64, u64)| start <= last && iova <= start + (len - 1);
        if self.quarantine.iter().any(overlaps) {
            return false;
        }
        // The extent starting at or before `iova` must end before it.
        if let Some((_, &prev_last)) = self.free.range(..=iova).next_back() {
            if prev_last >= iova {
                return false;
            }
        }
        // No extent may start inside the block.
        self.free.range(iova..=last).next().is_none()
    }

    /// Inserts a disjoint extent, merging it with touching neighbours.
    fn insert(&mut self, mut start: u64, mut last: u64) {
        if let Some((&prev_start, &prev_last)) = self.free.range(..start).next_back() {
            if prev_last.checked_add(1) == Some(start) {
                self.free.remove(&prev_start);
                start = prev_start;
            }
        }
        if let Some(next_start) = last.checked_add(1) {
            if let Some(next_last) = self.free.remove(&next_start) {
                last = next_last;
            }
        }
        self.free.insert(start, last);
    }
}

/// `value` rounded up to a multiple of `align` (a power of two).
fn align_up(value: u64, align: u64) -> Option<u64> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    fn q35_ranges() -> Vec<IovaRange> {
        // What the emulated VT-d reports: everything but the MSI window.
        vec![
            IovaRange {
                start: 0,
                end: 0xfedf_ffff,
            },
            IovaRange {
                start: 0xfef0_0000,
                end: 0x7f_ffff_ffff,
            },
        ]
    }

    #[test]
    fn never_hands_out_page_zero_and_aligns_to_order() {
        let mut a = IovaAllocator::new(&q35_ranges(), PAGE);
        assert_eq!(a.alloc(PAGE), Some(PAGE));
        // 3 pages round up to an order-2 (16 KiB) alignment.
        let b = a.alloc(3 * PAGE).unwrap();
        assert_eq!(b % (4 * PAGE), 0);
        let c = a.alloc(64 * 1024).unwrap();
        assert_eq!(c % (64 * 1024), 0);
        assert!(c >= b + 3 * PAGE);
    }

    #[test]
    fn freed_blocks_are_reused_and_coalesced() {
        let ranges = [IovaRange {
            start: 0,
            end: 16 * PAGE - 1,
        }];
        let mut a = IovaAllocator::new(&ranges, PAGE);
        let total = a.free_bytes();
        assert_eq!(total, 15 * PAGE);
        let pages: Vec<u64> = (0..15).map(|_| a.alloc(PAGE).unwrap()).collect();
        assert_eq!(a.alloc(PAGE), None);
        // Pages come out dense and in order.
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(*p, (i as u64 + 1) * PAGE);
        }
        // A freed block is quarantined, but when nothing else fits the
        // quarantine gives it back rather than fail.
        assert!(a.free(pages[7], PAGE));
        assert_eq!(a.alloc(PAGE), Some(pages[7]));
        for p in &pages {
            assert!(a.free(*p, PAGE));
        }
        assert_eq!(a.free_bytes(), total);
        // Releasing the quarantine coalesces everything back into one.
        assert_eq!(a.alloc(15 * PAGE), None);
        assert_eq!(a.free.len(), 1, "free extents coalesce back into one");
        assert!(a.quarantine.is_empty());
        // 8 pages aligned to 32 KiB fit once the space is whole again.
        assert_eq!(a.alloc(8 * PAGE), Some(8 * PAGE));
    }

    #[test]
    fn double_free_is_refused() {
        let mut a = IovaAllocator::new(&q35_ranges(), PAGE);
        let x = a.alloc(2 * PAGE).unwrap();
        assert!(a.free(x, 2 * PAGE));
        assert!(!a.free(x, 2 * PAGE), "quarantined");
        assert!(!a.free(x + PAGE, PAGE));
        assert!(!a.release(x, PAGE));
        let y = a.alloc(PAGE).unwrap();
        assert!(a.release(y, PAGE));
        assert!(!a.release(y, PAGE), "free");
        assert!(!a.free(y, PAGE));
    }

    /// A freed IOVA is not handed out again until `QUARANTINE` later
    /// blocks have been freed: a stale descriptor faults for that long
    /// instead of reaching the next buffer. A block whose map failed is
    /// reused at once.
    #[test]
    fn freed_iovas_wait_in_quarantine() {
        let mut a = IovaAllocator::new(&q35_ranges(), PAGE);
        let first = a.alloc(PAGE).unwrap();
        assert!(a.free(first, PAGE));
        let mut later = Vec::new();
        for _ in 0..QUARANTINE {
            let x = a.alloc(PAGE).unwrap();
            assert_ne!(x, first, "quarantined");
            later.push(x);
        }
        for &x in &later {
            assert!(a.free(x, PAGE));
        }
        // `first` is out of quarantine now, and the lowest free block.
        assert_eq!(a.alloc(PAGE), Some(first));
        let failed = a.alloc(PAGE).unwrap();
        assert!(a.release(failed, PAGE));
        assert_eq!(a.alloc(PAGE), Some(failed), "never mapped: reused at once");
    }

    #[test]
    fn respects_holes_between_ranges() {
        let ranges = [
            IovaRange {
                start: 0,
                end: 2 * PAGE - 1,
            },
            IovaRange {
                start: 8 * PAGE,
                end: 12 * PAGE - 1,
            },
        ];
        let mut a = IovaAllocator::new(&ranges, PAGE);
        assert_eq!(a.alloc(PAGE), Some(PAGE));
        // Two pages do not fit in the first range any more; the second has
        // room at 8 pages (aligned to 8 KiB).
        assert_eq!(a.alloc(2 * PAGE), Some(8 * PAGE));
        assert_eq!(a.alloc(2 * PAGE), Some(10 * PAGE));
        assert_eq!(a.alloc(PAGE), None);
    }

    /// Overlapping, unsorted or inverted ranges from the kernel never make
    /// overlapping blocks.
    #[test]
    fn overlapping_ranges_are_merged_before_use() {
        let ranges = [
            IovaRange {
                start: 8 * PAGE,
                end: 12 * PAGE - 1,
            },
            IovaRange {
                start: 0,
                end: 10 * PAGE - 1,
            },
            IovaRange {
                start: 5 * PAGE,
                end: PAGE,
            },
        ];
        assert_eq!(
            normalize_ranges(&ranges),
            [IovaRange {
                start: 0,
                end: 12 * PAGE - 1
            }]
        );
        let mut a = IovaAllocator::new(&ranges, PAGE);
        assert_eq!(a.free_bytes(), 11 * PAGE, "page 0 excluded, nothing twice");
        let mut got = Vec::new();
        while let Some(x) = a.alloc(PAGE) {
            got.push(x);
        }
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 11, "every block distinct");
    }

    #[test]
    fn top_of_address_space_is_safe() {
        let ranges = [IovaRange {
            start: u64::MAX - 4 * PAGE + 1,
            end: u64::MAX,
        }];
        let mut a = IovaAllocator::new(&ranges, PAGE);
        let mut got = Vec::new();
        while let Some(x) = a.alloc(PAGE) {
            got.push(x);
        }
        // The last page (holding u64::MAX) is never handed out.
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|x| x.checked_add(PAGE).is_some()));
    }
}
