//! [`IovaAllocator`]: picks device addresses inside an IOMMU's valid
//! ranges, for backends where user space chooses the IOVA of every mapping
//! (VFIO type1 and iommufd with a fixed IOVA). The crate's VFIO backend
//! uses it; it is public for authors of their own IOMMU backends.
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
//! - A block freed after an unmap waits in a FIFO quarantine (of
//!   [`DEFAULT_QUARANTINE`] blocks, or as many as the backend asks) before
//!   it can be handed out again, so a stale
//!   descriptor (an IOVA the driver forgot) faults in the IOMMU for a while
//!   instead of writing into the next buffer mapped there. A block whose
//!   map failed was never visible to the device and is free at once; when
//!   nothing else fits, the quarantine is released oldest first rather
//!   than failing an allocation.
//!
//! Cost: allocation walks the free extents from the lowest address until one
//! fits. With one mapping size (a page pool) the first extent always fits;
//! mixed sizes can make the walk longer. The allocator is not synchronised:
//! a backend keeps it under its own lock, as the VFIO backend does.
//!
//! ```
//! use pagepool::iova::{IovaAllocator, IovaError, IovaRange};
//!
//! // The IOMMU's usable ranges, as the kernel reports them (inclusive).
//! let ranges = [IovaRange { start: 0, end: 0xfedf_ffff }];
//! let mut iova = IovaAllocator::new(&ranges, 4096)?;
//! let a = iova.alloc(4096)?;
//! let b = iova.alloc(2 << 20)?;
//! assert_ne!(a, 0, "page 0 is never handed out");
//! assert_eq!(b % (2 << 20), 0, "aligned to its size");
//! // After the unmap: the block waits in quarantine before reuse.
//! iova.free(a, 4096)?;
//! assert_eq!(iova.free(a, 4096), Err(IovaError::NotAllocated { iova: a, size: 4096 }));
//! assert_ne!(iova.alloc(4096)?, a);
//! # Ok::<(), IovaError>(())
//! ```

use core::fmt;
use std::collections::{BTreeMap, VecDeque};

/// Blocks a freed IOVA waits behind before it is reused, unless the
/// backend asks for another length ([`IovaAllocator::with_quarantine`]).
pub const DEFAULT_QUARANTINE: usize = 256;

/// Why the allocator refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IovaError {
    /// The IOMMU page size given is not a power of two.
    PageNotPowerOfTwo {
        /// The page size given.
        page: u64,
    },
    /// A size of zero, or not a multiple of the IOMMU page.
    BadSize {
        /// The size asked for.
        size: u64,
        /// The allocator's page size.
        page: u64,
    },
    /// No free block of this size is left, even with the quarantine
    /// released.
    Exhausted {
        /// The size asked for.
        size: u64,
    },
    /// Part of the block is free or quarantined already: a double free, or
    /// a block this allocator never handed out.
    NotAllocated {
        /// Start of the block given back.
        iova: u64,
        /// Its size.
        size: u64,
    },
}

impl fmt::Display for IovaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PageNotPowerOfTwo { page } => {
                write!(f, "IOMMU page size {page} is not a power of two")
            }
            Self::BadSize { size, page } => write!(
                f,
                "IOVA block of {size} bytes is not a non-zero multiple of the {page}-byte IOMMU page"
            ),
            Self::Exhausted { size } => {
                write!(f, "no free IOVA block of {size} bytes left")
            }
            Self::NotAllocated { iova, size } => write!(
                f,
                "IOVA block {iova:#x}+{size:#x} is not allocated (double free?)"
            ),
        }
    }
}

impl std::error::Error for IovaError {}

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
fn normalize_ranges(ranges: &[IovaRange]) -> Vec<IovaRange> {
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

/// A first-fit IOVA allocator over an IOMMU's valid ranges; see the
/// [module docs](self).
#[derive(Debug)]
pub struct IovaAllocator {
    /// Free IOVA extents, `start -> last` (inclusive), disjoint and
    /// coalesced.
    free: BTreeMap<u64, u64>,
    /// Freed blocks `(start, size)`, oldest first, not yet in `free`.
    quarantine: VecDeque<(u64, u64)>,
    /// Blocks that wait in `quarantine` at most.
    quarantine_len: usize,
    page: u64,
}

impl IovaAllocator {
    /// An allocator over `ranges` (in any order, overlapping or not: they
    /// are sorted and merged first), handing out multiples of `page` (the
    /// IOMMU's smallest page, a power of two) aligned to at least `page`,
    /// with a quarantine of [`DEFAULT_QUARANTINE`] freed blocks.
    pub fn new(ranges: &[IovaRange], page: u64) -> Result<Self, IovaError> {
        Self::with_quarantine(ranges, page, DEFAULT_QUARANTINE)
    }

    /// As [`new`](Self::new), with freed blocks waiting behind `blocks`
    /// others before reuse (0: reused at once).
    pub fn with_quarantine(
        ranges: &[IovaRange],
        page: u64,
        blocks: usize,
    ) -> Result<Self, IovaError> {
        if !page.is_power_of_two() {
            return Err(IovaError::PageNotPowerOfTwo { page });
        }
        let mut this = Self {
            free: BTreeMap::new(),
            quarantine: VecDeque::new(),
            quarantine_len: blocks,
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
        Ok(this)
    }

    /// The IOMMU page size blocks are multiples of.
    pub fn page_size(&self) -> u64 {
        self.page
    }

    /// Total free bytes, quarantined ones included.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|(s, l)| l - s + 1).sum::<u64>()
            + self.quarantine.iter().map(|&(_, size)| size).sum::<u64>()
    }

    /// Allocates `size` bytes (a non-zero multiple of the page size),
    /// aligned to `size.next_power_of_two()`. When nothing fits, the
    /// quarantine is released oldest first before giving up.
    pub fn alloc(&mut self, size: u64) -> Result<u64, IovaError> {
        if size == 0 || size % self.page != 0 {
            return Err(IovaError::BadSize {
                size,
                page: self.page,
            });
        }
        loop {
            if let Some(at) = self.alloc_free(size) {
                return Ok(at);
            }
            let (start, block) = self
                .quarantine
                .pop_front()
                .ok_or(IovaError::Exhausted { size })?;
            self.insert(start, start + (block - 1));
        }
    }

    fn alloc_free(&mut self, size: u64) -> Option<u64> {
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

    /// Gives back `[iova, iova + size)`, just unmapped: it waits in the
    /// quarantine, and the oldest quarantined block goes back to the free
    /// extents once more than the quarantine's length wait. Changes
    /// nothing and returns [`IovaError::NotAllocated`] if any part of it is
    /// already free or quarantined (a double free).
    pub fn free(&mut self, iova: u64, size: u64) -> Result<(), IovaError> {
        if size == 0 {
            return Ok(());
        }
        if !self.is_allocated(iova, size) {
            return Err(IovaError::NotAllocated { iova, size });
        }
        self.quarantine.push_back((iova, size));
        while self.quarantine.len() > self.quarantine_len {
            if let Some((start, block)) = self.quarantine.pop_front() {
                self.insert(start, start + (block - 1));
            }
        }
        Ok(())
    }

    /// Gives back `[iova, iova + size)`, which the device never saw (its
    /// map failed): free again at once, no quarantine. Changes nothing and
    /// returns [`IovaError::NotAllocated`] on a double free.
    pub fn release(&mut self, iova: u64, size: u64) -> Result<(), IovaError> {
        if size == 0 {
            return Ok(());
        }
        if !self.is_allocated(iova, size) {
            return Err(IovaError::NotAllocated { iova, size });
        }
        self.insert(iova, iova + (size - 1));
        Ok(())
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
        let mut a = IovaAllocator::new(&q35_ranges(), PAGE).unwrap();
        assert_eq!(a.alloc(PAGE).ok(), Some(PAGE));
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
        let mut a = IovaAllocator::new(&ranges, PAGE).unwrap();
        let total = a.free_bytes();
        assert_eq!(total, 15 * PAGE);
        let pages: Vec<u64> = (0..15).map(|_| a.alloc(PAGE).unwrap()).collect();
        assert_eq!(a.alloc(PAGE).ok(), None);
        // Pages come out dense and in order.
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(*p, (i as u64 + 1) * PAGE);
        }
        // A freed block is quarantined, but when nothing else fits the
        // quarantine gives it back rather than fail.
        assert!(a.free(pages[7], PAGE).is_ok());
        assert_eq!(a.alloc(PAGE).ok(), Some(pages[7]));
        for p in &pages {
            assert!(a.free(*p, PAGE).is_ok());
        }
        assert_eq!(a.free_bytes(), total);
        // Releasing the quarantine coalesces everything back into one.
        assert_eq!(a.alloc(15 * PAGE).ok(), None);
        assert_eq!(a.free.len(), 1, "free extents coalesce back into one");
        assert!(a.quarantine.is_empty());
        // 8 pages aligned to 32 KiB fit once the space is whole again.
        assert_eq!(a.alloc(8 * PAGE).ok(), Some(8 * PAGE));
    }

    #[test]
    fn double_free_is_refused() {
        let mut a = IovaAllocator::new(&q35_ranges(), PAGE).unwrap();
        let x = a.alloc(2 * PAGE).unwrap();
        assert!(a.free(x, 2 * PAGE).is_ok());
        assert!(a.free(x, 2 * PAGE).is_err(), "quarantined");
        assert!(a.free(x + PAGE, PAGE).is_err());
        assert!(a.release(x, PAGE).is_err());
        let y = a.alloc(PAGE).unwrap();
        assert!(a.release(y, PAGE).is_ok());
        assert!(a.release(y, PAGE).is_err(), "free");
        assert!(a.free(y, PAGE).is_err());
    }

    /// A freed IOVA is not handed out again until `DEFAULT_QUARANTINE` later
    /// blocks have been freed: a stale descriptor faults for that long
    /// instead of reaching the next buffer. A block whose map failed is
    /// reused at once.
    #[test]
    fn freed_iovas_wait_in_quarantine() {
        let mut a = IovaAllocator::new(&q35_ranges(), PAGE).unwrap();
        let first = a.alloc(PAGE).unwrap();
        assert!(a.free(first, PAGE).is_ok());
        let mut later = Vec::new();
        for _ in 0..DEFAULT_QUARANTINE {
            let x = a.alloc(PAGE).unwrap();
            assert_ne!(x, first, "quarantined");
            later.push(x);
        }
        for &x in &later {
            assert!(a.free(x, PAGE).is_ok());
        }
        // `first` is out of quarantine now, and the lowest free block.
        assert_eq!(a.alloc(PAGE).ok(), Some(first));
        let failed = a.alloc(PAGE).unwrap();
        assert!(a.release(failed, PAGE).is_ok());
        assert_eq!(
            a.alloc(PAGE).ok(),
            Some(failed),
            "never mapped: reused at once"
        );
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
        let mut a = IovaAllocator::new(&ranges, PAGE).unwrap();
        assert_eq!(a.alloc(PAGE).ok(), Some(PAGE));
        // Two pages do not fit in the first range any more; the second has
        // room at 8 pages (aligned to 8 KiB).
        assert_eq!(a.alloc(2 * PAGE).ok(), Some(8 * PAGE));
        assert_eq!(a.alloc(2 * PAGE).ok(), Some(10 * PAGE));
        assert_eq!(a.alloc(PAGE).ok(), None);
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
        let mut a = IovaAllocator::new(&ranges, PAGE).unwrap();
        assert_eq!(a.free_bytes(), 11 * PAGE, "page 0 excluded, nothing twice");
        let mut got = Vec::new();
        while let Ok(x) = a.alloc(PAGE) {
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
        let mut a = IovaAllocator::new(&ranges, PAGE).unwrap();
        let mut got = Vec::new();
        while let Ok(x) = a.alloc(PAGE) {
            got.push(x);
        }
        // The last page (holding u64::MAX) is never handed out.
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|x| x.checked_add(PAGE).is_some()));
    }

    #[test]
    fn bad_requests_are_refused_with_typed_errors() {
        assert_eq!(
            IovaAllocator::new(&q35_ranges(), 3 * PAGE).unwrap_err(),
            IovaError::PageNotPowerOfTwo { page: 3 * PAGE }
        );
        let mut a = IovaAllocator::new(&q35_ranges(), PAGE).unwrap();
        assert_eq!(a.page_size(), PAGE);
        for size in [0, PAGE + 1] {
            assert_eq!(a.alloc(size), Err(IovaError::BadSize { size, page: PAGE }));
        }
        let mut tiny = IovaAllocator::new(
            &[IovaRange {
                start: 0,
                end: 2 * PAGE - 1,
            }],
            PAGE,
        )
        .unwrap();
        assert!(tiny.alloc(PAGE).is_ok());
        assert_eq!(tiny.alloc(PAGE), Err(IovaError::Exhausted { size: PAGE }));
        assert!(IovaError::Exhausted { size: PAGE }
            .to_string()
            .contains("4096"));
    }

    #[test]
    fn a_quarantine_of_zero_reuses_at_once() {
        let mut a = IovaAllocator::with_quarantine(&q35_ranges(), PAGE, 0).unwrap();
        let x = a.alloc(PAGE).unwrap();
        a.free(x, PAGE).unwrap();
        assert_eq!(a.alloc(PAGE), Ok(x));
    }
}
