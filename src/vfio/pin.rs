//! What every VFIO backend does before it pins memory for a device, kept
//! apart from the type1 container so that an iommufd backend (`IOAS_MAP`
//! pins the same way) shares it rather than copies it:
//!
//! - [`check_aligned`]: map exactly what was given. Memory not aligned to
//!   the IOMMU page, or not a whole number of them, is refused
//!   ([`VfioError::Unaligned`]), never widened over its neighbours.
//! - [`populate_for_device_read`]: memory the device only reads is faulted
//!   in for writing first (`MADV_POPULATE_WRITE`), so a pin without write
//!   access never takes the shared (huge) zero page or a copy-on-write page
//!   that the CPU's next write replaces (Linux before 6.2). Where the
//!   kernel lacks the advice ([`probe_populate_write`] says so), the caller
//!   pins with write access instead, which breaks copy-on-write itself.
//!
//! The IOVA side (allocator, quarantine, range validation) is in `iova`,
//! equally shared.

use core::ptr::NonNull;

use super::error::VfioError;
use super::sys;

/// Whether `MADV_POPULATE_WRITE` is known to this kernel: tried once on a
/// page of our own.
pub(super) fn probe_populate_write() -> bool {
    // SAFETY: a fresh anonymous private page at an address of the kernel's
    // choosing touches no existing memory.
    let page = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        return false;
    }
    // SAFETY: the advice only faults in the page just mapped.
    let ok = unsafe { libc::madvise(page, 4096, sys::MADV_POPULATE_WRITE) } == 0;
    // SAFETY: the page mapped above, nothing refers to it.
    unsafe { libc::munmap(page, 4096) };
    ok
}

/// Faults `len` bytes at `cpu` in for writing, keeping their contents, if
/// `supported` (see [`probe_populate_write`]). Returns `false` when the
/// kernel cannot: the caller must then pin with write access. A failure on
/// a kernel that can (memory the CPU cannot write, device memory) leaves
/// nothing a later CPU write could replace, and is ignored.
///
/// # Safety
/// `cpu..cpu + len` is memory the caller owns (as for `DmaOps::map`), with
/// no CPU reference to it while this runs.
pub(super) unsafe fn populate_for_device_read(
    cpu: NonNull<u8>,
    len: usize,
    supported: bool,
) -> bool {
    if !supported {
        return false;
    }
    // SAFETY: the caller's range; the advice only faults it in, keeping its
    // contents.
    let _ = unsafe { libc::madvise(cpu.as_ptr().cast(), len, sys::MADV_POPULATE_WRITE) };
    true
}

/// Refuses memory the IOMMU cannot map exactly: `vaddr` and `len` must be
/// multiples of `page` (a power of two).
pub(super) fn check_aligned(vaddr: u64, len: u64, page: u64) -> Result<(), VfioError> {
    if (vaddr | len) & (page - 1) != 0 {
        return Err(VfioError::Unaligned {
            vaddr,
            len,
            iommu_page: page,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a host with 64 KiB IOMMU pages sees: a 4 KiB-aligned page (15
    /// of every 16 such pages) is refused, never widened; aligned whole
    /// pages pass.
    #[test]
    fn memory_not_aligned_to_a_64k_iommu_page_is_refused() {
        const P64: u64 = 64 << 10;
        for (vaddr, len) in [(0x1_1000, P64), (0x1_0000, 4096), (0x1_0000, P64 + 4096)] {
            assert_eq!(
                check_aligned(vaddr, len, P64),
                Err(VfioError::Unaligned {
                    vaddr,
                    len,
                    iommu_page: P64
                })
            );
        }
        assert_eq!(check_aligned(0x2_0000, 2 * P64, P64), Ok(()));
        assert_eq!(check_aligned(0x1000, 4096, 4096), Ok(()));
    }

    #[test]
    fn populate_write_is_probed_without_harm() {
        // Linux 5.14 and later know it; either answer must leave no trace.
        let _ = probe_populate_write();
    }
}
