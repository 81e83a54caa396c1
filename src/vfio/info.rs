//! What the IOMMU says about itself: `VFIO_IOMMU_GET_INFO` ([`get_info`])
//! and the parser of its header and capability chain ([`parse_info`]) into
//! an [`IommuInfo`]: page sizes, valid IOVA ranges, `DMA_AVAIL`.
//!
//! Invariants: the parser never trusts the kernel's buffer: every read is
//! bounds-checked (a field past the end reads as absent), unknown
//! capabilities are skipped, and a capability chain is followed for at most
//! as many links as the buffer could hold, so a malformed or looping chain
//! ends the parse instead of hanging it. `get_info` grows its buffer to the
//! size the kernel asks for (a few times at most) and remembers the size
//! that sufficed, so later calls need one ioctl.

use std::os::fd::BorrowedFd;

use super::error::VfioError;
use super::ioctl::{ioctl_ptr, Counters};
use super::sys;
use crate::iova::IovaRange;
use crate::sync::{AtomicUsize, Ordering};

/// What `VFIO_IOMMU_GET_INFO` reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuInfo {
    /// Bitmap of the IOMMU page sizes (bit n set: 2^n bytes supported).
    pub page_sizes: u64,
    /// The valid IOVA ranges (capability 1), if the kernel reports them.
    pub iova_ranges: Option<Vec<IovaRange>>,
    /// Mapping entries left in the container (capability 3, `DMA_AVAIL`),
    /// if the kernel reports them.
    pub dma_avail: Option<u32>,
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}
fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}
fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// Parses the buffer `VFIO_IOMMU_GET_INFO` filled (header and capability
/// chain; offsets are relative to the buffer's start).
fn parse_info(buf: &[u8]) -> IommuInfo {
    let flags = read_u32(buf, 4).unwrap_or(0);
    let page_sizes = if flags & sys::IOMMU_INFO_PGSIZES != 0 {
        read_u64(buf, 8).unwrap_or(0)
    } else {
        0
    };
    let mut info = IommuInfo {
        page_sizes,
        iova_ranges: None,
        dma_avail: None,
    };
    if flags & sys::IOMMU_INFO_CAPS == 0 {
        return info;
    }
    let mut at = read_u32(buf, 16).unwrap_or(0) as usize;
    // A chain longer than the buffer could hold is malformed; stop there.
    let mut budget = buf.len() / sys::CAP_HEADER_LEN;
    while at != 0 && budget > 0 {
        budget -= 1;
        let (Some(id), Some(next)) = (read_u16(buf, at), read_u32(buf, at + 4)) else {
            break;
        };
        let body = at + sys::CAP_HEADER_LEN;
        match id {
            sys::CAP_IOVA_RANGE => {
                let n = read_u32(buf, body).unwrap_or(0) as usize;
                let ranges: Vec<IovaRange> = (0..n)
                    .map_while(|i| {
                        let base = body + 8 + 16 * i;
                        Some(IovaRange {
                            start: read_u64(buf, base)?,
                            end: read_u64(buf, base + 8)?,
                        })
                    })
                    .collect();
                info.iova_ranges = Some(ranges);
            }
            sys::CAP_DMA_AVAIL => info.dma_avail = read_u32(buf, body),
            _ => {}
        }
        at = next as usize;
    }
    info
}

/// Runs `VFIO_IOMMU_GET_INFO` with room for the capability chain, growing
/// the buffer as the kernel asks. `hint` is a buffer size known to suffice.
pub(super) fn get_info(
    counters: &Counters,
    container: BorrowedFd<'_>,
    hint: &AtomicUsize,
) -> Result<IommuInfo, VfioError> {
    let mut len = hint
        .load(Ordering::Relaxed)
        .max(core::mem::size_of::<sys::Type1Info>());
    for _ in 0..4 {
        // u64 words keep the buffer aligned for the structure.
        let mut buf = vec![0u64; len.div_ceil(8)];
        let header = buf.as_mut_ptr().cast::<sys::Type1Info>();
        // SAFETY: `buf` is at least `size_of::<Type1Info>()` bytes, 8-aligned
        // and zeroed; writing one field through the pointer is in bounds.
        unsafe { (*header).argsz = len as u32 };
        // SAFETY: `header` points to `len` writable bytes, `argsz` says so;
        // the kernel writes at most `argsz` bytes.
        unsafe { ioctl_ptr(counters, container, sys::IOMMU_GET_INFO, header) }.map_err(
            |errno| VfioError::Os {
                op: "VFIO_IOMMU_GET_INFO",
                errno,
            },
        )?;
        // SAFETY: as above; the kernel filled the header.
        let needed = unsafe { (*header).argsz } as usize;
        if needed > len {
            len = needed;
            continue;
        }
        hint.store(len, Ordering::Relaxed);
        // SAFETY: `buf` owns `buf.len() * 8` initialised bytes; the byte view
        // lives no longer than `buf` and nothing else accesses it meanwhile.
        let bytes = unsafe { core::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), len) };
        return Ok(parse_info(bytes));
    }
    Err(VfioError::Os {
        op: "VFIO_IOMMU_GET_INFO",
        errno: libc::EOVERFLOW,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_capability_chain() {
        // Header (24 bytes), IOVA range cap at 24 with two ranges, DMA_AVAIL
        // cap after it.
        let mut buf = vec![0u8; 24 + 16 + 32 + 16];
        let len = buf.len() as u32;
        buf[0..4].copy_from_slice(&len.to_ne_bytes());
        buf[4..8].copy_from_slice(&(sys::IOMMU_INFO_PGSIZES | sys::IOMMU_INFO_CAPS).to_ne_bytes());
        buf[8..16].copy_from_slice(&0x4020_1000u64.to_ne_bytes());
        buf[16..20].copy_from_slice(&24u32.to_ne_bytes());
        let cap = 24;
        buf[cap..cap + 2].copy_from_slice(&sys::CAP_IOVA_RANGE.to_ne_bytes());
        buf[cap + 4..cap + 8].copy_from_slice(&72u32.to_ne_bytes());
        buf[cap + 8..cap + 12].copy_from_slice(&2u32.to_ne_bytes());
        buf[cap + 16..cap + 24].copy_from_slice(&0u64.to_ne_bytes());
        buf[cap + 24..cap + 32].copy_from_slice(&0xfedf_ffffu64.to_ne_bytes());
        buf[cap + 32..cap + 40].copy_from_slice(&0xfef0_0000u64.to_ne_bytes());
        buf[cap + 40..cap + 48].copy_from_slice(&0x7f_ffff_ffffu64.to_ne_bytes());
        let cap = 72;
        buf[cap..cap + 2].copy_from_slice(&sys::CAP_DMA_AVAIL.to_ne_bytes());
        buf[cap + 8..cap + 12].copy_from_slice(&65519u32.to_ne_bytes());
        let info = parse_info(&buf);
        assert_eq!(info.page_sizes, 0x4020_1000);
        assert_eq!(info.dma_avail, Some(65519));
        assert_eq!(
            info.iova_ranges.unwrap(),
            vec![
                IovaRange {
                    start: 0,
                    end: 0xfedf_ffff
                },
                IovaRange {
                    start: 0xfef0_0000,
                    end: 0x7f_ffff_ffff
                }
            ]
        );
    }

    #[test]
    fn a_looping_capability_chain_terminates() {
        let mut buf = vec![0u8; 40];
        buf[4..8].copy_from_slice(&sys::IOMMU_INFO_CAPS.to_ne_bytes());
        buf[16..20].copy_from_slice(&24u32.to_ne_bytes());
        buf[24..26].copy_from_slice(&sys::CAP_DMA_AVAIL.to_ne_bytes());
        buf[28..32].copy_from_slice(&24u32.to_ne_bytes()); // next: itself
        buf[32..36].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(parse_info(&buf).dma_avail, Some(7));
    }
}
