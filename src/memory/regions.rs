//! Where region memory comes from: [`RegionSource`] and the system's own,
//! [`SystemRegions`].
//!
//! A region-mapped pool (see [`PagePoolBuilder::regions`]) maps one large
//! block of contiguous memory, a *region*, with one `DmaOps::map`, and carves
//! its pages out of it. This module supplies those blocks.
//!
//! [`SystemRegions`] asks the operating system, in this order:
//!
//! 1. **Huge pages** (`mmap` with `MAP_HUGETLB`): 2 MiB pages reserved by the
//!    administrator (`vm.nr_hugepages`, or `hugepages=` on the kernel command
//!    line). One IOTLB entry covers 2 MiB and the memory cannot be swapped.
//! 2. **Transparent huge pages**: anonymous memory aligned to 2 MiB with
//!    `madvise(MADV_HUGEPAGE)`, which the kernel backs with huge pages when
//!    it can (`/sys/kernel/mm/transparent_hugepage/enabled` set to `always`
//!    or `madvise`).
//! 3. Elsewhere (not Linux, or under Miri, loom and shuttle): aligned
//!    memory from the global allocator.
//!
//! Which one a region got is its [`RegionBacking`], reported per pool in
//! [`RegionInfo`](crate::RegionInfo). A region source of your own (memory
//! registered elsewhere, a device-memory carve-out) reports
//! [`RegionBacking::User`].
//!
//! # Invariants
//!
//! - Every block is zeroed, valid for reads and writes of its whole length,
//!   aligned to at least [`PAGE_SIZE`] (and, from [`SystemRegions`], to
//!   `min(len, 2 MiB)`, so to any IOMMU page the region is a multiple of,
//!   up to 2 MiB), and returned exactly once, after its mapping is gone.
//! - A [`SystemRegions`] block is populated (faulted in as if written)
//!   before it is handed out: no page of it is the shared zero page when a
//!   device-reads mapping pins it.
//!
//! [`PagePoolBuilder::regions`]: crate::PagePoolBuilder::regions

use core::fmt;
use core::ptr::NonNull;

use super::{OutOfMemory, PAGE_SIZE};

/// The default region size: 2 MiB, one x86-64 huge page.
pub const DEFAULT_REGION_SIZE: usize = 2 << 20;

/// The largest region size a pool accepts: 1 GiB, one x86-64 gigantic page.
pub const MAX_REGION_SIZE: usize = 1 << 30;

/// What memory a region got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RegionBacking {
    /// Reserved huge pages (`MAP_HUGETLB`).
    HugeTlb,
    /// Anonymous memory aligned to 2 MiB with transparent huge pages
    /// requested (`MADV_HUGEPAGE`); the kernel decides whether it gets them.
    TransparentHuge,
    /// Aligned memory from the global allocator (no huge pages).
    Heap,
    /// Memory from a [`RegionSource`] of the user's.
    User,
}

impl fmt::Display for RegionBacking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HugeTlb => "hugetlb",
            Self::TransparentHuge => "transparent huge pages",
            Self::Heap => "heap",
            Self::User => "user",
        })
    }
}

/// A block of region memory from a [`RegionSource`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionBlock {
    /// The first byte of the block.
    pub ptr: NonNull<u8>,
    /// What backs it.
    pub backing: RegionBacking,
}

/// A supplier of region memory.
///
/// The pool calls it outside every device call and lock, as it calls a
/// [`PageSource`](crate::PageSource), so it may block or panic (an
/// `alloc_region` that panics allocated nothing; a `free_region` that panics
/// is not repeated).
///
/// The pool refuses a block not aligned to the device's IOMMU page
/// ([`DmaOps::min_page_size`](crate::DmaOps::min_page_size)) with
/// [`AllocError::Misaligned`](crate::AllocError::Misaligned), giving it
/// back: align blocks to their length (or at least to that page). Memory a
/// device only reads should be populated (written, or faulted in with
/// `MADV_POPULATE_WRITE`) before it is mapped, as [`SystemRegions`] does:
/// Linux before 6.2 may pin the shared zero page for untouched memory.
///
/// # Safety
/// `alloc_region(len)` returns a block valid for reads and writes of `len`
/// bytes, aligned to at least [`PAGE_SIZE`], not aliased by any other live
/// block, that stays valid until passed to
/// [`free_region`](Self::free_region). The pool hands the block's pages out
/// as page handles and relies on this for their memory safety.
pub unsafe trait RegionSource: Send + Sync + 'static {
    /// Allocates one block of `len` bytes (a power of two, at least
    /// [`PAGE_SIZE`]).
    fn alloc_region(&self, len: usize) -> Result<RegionBlock, OutOfMemory>;

    /// Returns a block.
    ///
    /// # Safety
    /// `block` is what `alloc_region(len)` on this source returned, it is
    /// freed once, and nothing uses its memory afterwards.
    unsafe fn free_region(&self, block: RegionBlock, len: usize);
}

/// Region memory from the operating system, in this order:
///
/// 1. **Huge pages** (`mmap` with `MAP_HUGETLB`): 2 MiB pages reserved by
///    the administrator (`vm.nr_hugepages`, or `hugepages=` on the kernel
///    command line). One IOTLB entry covers 2 MiB.
/// 2. **Transparent huge pages**: anonymous memory aligned to 2 MiB with
///    `madvise(MADV_HUGEPAGE)`, backed with huge pages when the kernel can.
/// 3. Elsewhere (not Linux, or under Miri, loom and shuttle): aligned
///    memory from the global allocator.
///
/// Which one a region got is reported as its [`RegionBacking`] in
/// [`RegionInfo`](crate::RegionInfo).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SystemRegions {
    huge_tlb: bool,
}

impl Default for SystemRegions {
    fn default() -> Self {
        Self::new()
    }
}

impl SystemRegions {
    /// Tries reserved huge pages first.
    pub const fn new() -> Self {
        Self { huge_tlb: true }
    }

    /// Never asks for reserved huge pages: transparent huge pages (or the
    /// heap) only. For systems whose huge pages are kept for something
    /// else, and for testing the fallback.
    pub const fn without_huge_tlb() -> Self {
        Self { huge_tlb: false }
    }
}

// SAFETY: every block is a fresh anonymous mapping (or a fresh heap
// allocation) of at least `len` bytes, page aligned and zeroed, owned by the
// caller until `free_region` unmaps (or deallocates) exactly it.
unsafe impl RegionSource for SystemRegions {
    fn alloc_region(&self, len: usize) -> Result<RegionBlock, OutOfMemory> {
        if len < PAGE_SIZE || !len.is_power_of_two() {
            return Err(OutOfMemory);
        }
        os::alloc(len, self.huge_tlb)
    }

    unsafe fn free_region(&self, block: RegionBlock, len: usize) {
        // SAFETY: forwarded caller contract: the block came from `alloc` with
        // this length.
        unsafe { os::free(block, len) }
    }
}

#[cfg(all(target_os = "linux", not(miri), not(loom), not(shuttle)))]
mod os {
    use core::ptr::NonNull;

    use super::{OutOfMemory, RegionBacking, RegionBlock};

    /// The x86-64 (and arm64 4K-granule) huge page size.
    const HUGE_PAGE: usize = 2 << 20;

    /// `MADV_POPULATE_WRITE` (Linux 5.14), not in `libc` yet.
    const MADV_POPULATE_WRITE: libc::c_int = 23;

    pub(super) fn alloc(len: usize, huge_tlb: bool) -> Result<RegionBlock, OutOfMemory> {
        if huge_tlb && len % HUGE_PAGE == 0 {
            // 2 MiB pages named explicitly: where the default huge page is
            // 1 GiB, a bare MAP_HUGETLB would take one per region. Populated
            // at once (reserved pages, nothing to wait for).
            if let Some(ptr) = mmap(
                len,
                libc::MAP_HUGETLB | libc::MAP_HUGE_2MB | libc::MAP_POPULATE,
            ) {
                return Ok(RegionBlock {
                    ptr,
                    backing: RegionBacking::HugeTlb,
                });
            }
        }
        transparent_huge(len)
    }

    /// Faults the block in as if written, so every page is a private page
    /// of its own: a device-reads mapping pinned later then pins the pages
    /// the CPU writes, never the (huge) zero page that a read fault maps.
    /// Falls back to writing one byte per page where the advice is unknown.
    fn populate(block: NonNull<u8>, len: usize) {
        // SAFETY: the block is a fresh private anonymous mapping of `len`
        // bytes; the advice only faults it in, keeping its (zero) contents.
        if unsafe { libc::madvise(block.as_ptr().cast(), len, MADV_POPULATE_WRITE) } == 0 {
            return;
        }
        for offset in (0..len).step_by(super::PAGE_SIZE) {
            let byte = block.as_ptr().wrapping_add(offset);
            // SAFETY: inside the fresh mapping, writable, not yet shared:
            // writing the zero it holds changes nothing but the backing.
            unsafe { byte.write_volatile(0) };
        }
    }

    /// Maps `len + align` bytes, trims them to `len` bytes aligned to
    /// `min(len, 2 MiB)`, and asks for transparent huge pages.
    fn transparent_huge(len: usize) -> Result<RegionBlock, OutOfMemory> {
        let align = len.min(HUGE_PAGE);
        let span = len.checked_add(align).ok_or(OutOfMemory)?;
        let raw = mmap(span, 0).ok_or(OutOfMemory)?;
        let (head, tail) = trim(raw.as_ptr().addr(), align);
        // SAFETY: `head <= align`, so the aligned block and both trimmed ends
        // lie inside the `span` bytes just mapped.
        let block = unsafe { raw.add(head) };
        if head > 0 {
            // SAFETY: `[raw, raw + head)` is part of the fresh mapping and
            // nothing refers to it.
            unsafe { libc::munmap(raw.as_ptr().cast(), head) };
        }
        if tail > 0 {
            let end = block.as_ptr().wrapping_add(len);
            // SAFETY: `[block + len, raw + span)` is part of the fresh
            // mapping and nothing refers to it.
            unsafe { libc::munmap(end.cast(), tail) };
        }
        // SAFETY: the block is a live private anonymous mapping of `len`
        // bytes; the advice only changes how it is backed.
        unsafe { libc::madvise(block.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        populate(block, len);
        Ok(RegionBlock {
            ptr: block,
            backing: RegionBacking::TransparentHuge,
        })
    }

    /// How much of a mapping of `len + align` bytes at address `start` to
    /// cut off in front (`head`) and behind (`tail`) so that `len` bytes
    /// aligned to `align` remain: `head + tail == align`.
    pub(super) fn trim(start: usize, align: usize) -> (usize, usize) {
        let head = start.next_multiple_of(align) - start;
        (head, align - head)
    }

    fn mmap(len: usize, flags: libc::c_int) -> Option<NonNull<u8>> {
        // SAFETY: an anonymous private mapping at an address of the
        // kernel's choosing touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        NonNull::new(ptr.cast())
    }

    /// # Safety
    /// `block` came from [`alloc`] with this `len` and is not used again.
    pub(super) unsafe fn free(block: RegionBlock, len: usize) {
        // SAFETY: the block is exactly a mapping (or the trimmed middle of
        // one) of `len` bytes that `alloc` made; nothing uses it afterwards
        // (caller).
        let result = unsafe { libc::munmap(block.ptr.as_ptr().cast(), len) };
        // Only a bad address or length fails, which `alloc` never hands out.
        debug_assert_eq!(result, 0, "munmap of a region failed");
    }
}

#[cfg(not(all(target_os = "linux", not(miri), not(loom), not(shuttle))))]
use os_heap as os;

/// Region memory from the heap where `mmap` is not used (other targets,
/// Miri, the model checkers).
#[cfg(not(all(target_os = "linux", not(miri), not(loom), not(shuttle))))]
mod os_heap {
    use core::alloc::Layout;
    use core::ptr::NonNull;

    use super::{OutOfMemory, RegionBacking, RegionBlock};
    use crate::sync;

    fn layout(len: usize) -> Result<Layout, OutOfMemory> {
        Layout::from_size_align(len, len.min(2 << 20)).map_err(|_| OutOfMemory)
    }

    pub(super) fn alloc(len: usize, _huge_tlb: bool) -> Result<RegionBlock, OutOfMemory> {
        // SAFETY: the layout's size is `len`, a power of two >= PAGE_SIZE.
        let ptr = unsafe { sync::alloc_zeroed(layout(len)?) };
        Ok(RegionBlock {
            ptr: NonNull::new(ptr).ok_or(OutOfMemory)?,
            backing: RegionBacking::Heap,
        })
    }

    /// # Safety
    /// `block` came from [`alloc`] with this `len` and is not used again.
    pub(super) unsafe fn free(block: RegionBlock, len: usize) {
        let Ok(layout) = layout(len) else { return };
        // SAFETY: allocated by `alloc` with this same layout (caller).
        unsafe { sync::dealloc(block.ptr.as_ptr(), layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_regions_are_aligned_zeroed_and_writable() {
        for source in [SystemRegions::new(), SystemRegions::without_huge_tlb()] {
            let len = DEFAULT_REGION_SIZE;
            let block = source.alloc_region(len).unwrap();
            assert_eq!(block.ptr.as_ptr().addr() % PAGE_SIZE, 0);
            if block.backing != RegionBacking::Heap {
                assert_eq!(block.ptr.as_ptr().addr() % len, 0, "2 MiB aligned");
            }
            // SAFETY: the block is valid for `len` bytes until freed below.
            let bytes = unsafe { core::slice::from_raw_parts_mut(block.ptr.as_ptr(), len) };
            assert!(bytes.iter().step_by(4096).all(|&b| b == 0));
            bytes[len - 1] = 1;
            // SAFETY: freed once, with its length.
            unsafe { source.free_region(block, len) };
        }
    }

    #[test]
    fn backings_display_as_documented() {
        let shown: Vec<String> = [
            RegionBacking::HugeTlb,
            RegionBacking::TransparentHuge,
            RegionBacking::Heap,
            RegionBacking::User,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(shown, ["hugetlb", "transparent huge pages", "heap", "user"]);
    }

    /// The smallest region is one page; smaller, or not a power of two, is
    /// refused.
    #[test]
    fn a_region_of_one_page_is_the_smallest() {
        let source = SystemRegions::new();
        let block = source.alloc_region(PAGE_SIZE).unwrap();
        // SAFETY: freed once, with its length.
        unsafe { source.free_region(block, PAGE_SIZE) };
        for len in [0, PAGE_SIZE / 2, 3 * PAGE_SIZE] {
            assert!(source.alloc_region(len).is_err(), "{len} bytes");
        }
    }

    /// The trim of a transparent-huge-page region: whatever the address the
    /// kernel picked, what is cut off in front brings the block to the
    /// alignment, and the two cuts together are the extra `align` bytes.
    #[cfg(all(target_os = "linux", not(miri), not(loom), not(shuttle)))]
    #[test]
    fn the_trim_leaves_an_aligned_block_of_the_asked_length() {
        const MIB2: usize = 2 << 20;
        assert_eq!(os::trim(MIB2, MIB2), (0, MIB2));
        assert_eq!(
            os::trim(MIB2 + PAGE_SIZE, MIB2),
            (MIB2 - PAGE_SIZE, PAGE_SIZE)
        );
        assert_eq!(
            os::trim(3 * PAGE_SIZE, 4 * PAGE_SIZE),
            (PAGE_SIZE, 3 * PAGE_SIZE)
        );
    }

    /// Free reserved huge pages, from `/proc/meminfo` (0 where unknown).
    #[cfg(all(target_os = "linux", not(miri), not(loom), not(shuttle)))]
    fn free_huge_pages() -> usize {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| {
                let line = info.lines().find(|l| l.starts_with("HugePages_Free:"))?;
                line.split_whitespace().nth(1)?.parse().ok()
            })
            .unwrap_or(0)
    }

    /// Where huge pages are reserved (CI reserves some when it may), a
    /// region of a multiple of 2 MiB gets them; a region of another size,
    /// or a source built without them, never does.
    #[cfg(all(target_os = "linux", not(miri), not(loom), not(shuttle)))]
    #[test]
    fn reserved_huge_pages_back_regions_of_whole_huge_pages() {
        const MIB2: usize = 2 << 20;
        let source = SystemRegions::new();
        let free_before = free_huge_pages();
        let block = source.alloc_region(MIB2).unwrap();
        let got = block.backing;
        // SAFETY: freed once, with its length.
        unsafe { source.free_region(block, MIB2) };
        if got != RegionBacking::HugeTlb {
            // Only if none was free (another test may hold the last ones).
            assert!(
                free_before == 0 || free_huge_pages() == 0,
                "{free_before} huge pages free, and the region got {got}"
            );
        }
        for (source, len) in [
            (SystemRegions::new(), MIB2 / 2),
            (SystemRegions::without_huge_tlb(), MIB2),
        ] {
            let block = source.alloc_region(len).unwrap();
            assert_ne!(block.backing, RegionBacking::HugeTlb, "{len} bytes");
            // SAFETY: freed once, with its length.
            unsafe { source.free_region(block, len) };
        }
    }

    #[test]
    fn without_huge_tlb_never_reports_huge_tlb() {
        let block = SystemRegions::without_huge_tlb()
            .alloc_region(DEFAULT_REGION_SIZE)
            .unwrap();
        assert_ne!(block.backing, RegionBacking::HugeTlb);
        // SAFETY: freed once.
        unsafe { SystemRegions::without_huge_tlb().free_region(block, DEFAULT_REGION_SIZE) };
    }

    #[test]
    fn bad_lengths_are_refused() {
        assert_eq!(SystemRegions::new().alloc_region(3 << 20), Err(OutOfMemory));
        assert_eq!(SystemRegions::new().alloc_region(1024), Err(OutOfMemory));
    }
}
