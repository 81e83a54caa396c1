//! [`VfioDevice`]: one PCI function's VFIO device fd, for BARs and config
//! space. Small on purpose: what a userspace NIC driver needs to reach its
//! registers and turn on bus mastering.
//!
//! Invariants: an [`MmioRegion`] holds the device fd it was mapped from, so
//! the mapping is valid for as long as the region lives, however the
//! `VfioDevice` is dropped; it does not hold the container, so the DMA side
//! is released (every mapping removed) when the last [`VfioDma`] handle
//! goes, even while a region lives. MMIO accesses are single volatile
//! accesses, ordered as Linux's `writel`/`readl` on x86-64 and arm64.

use core::ptr::NonNull;
use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use super::container::VfioDma;
use super::error::VfioError;
use super::ioctl::{errno, ioctl_ptr, ioctl_val};
use super::sys;
use super::sysfs::normalize_bdf;
#[cfg_attr(target_arch = "aarch64", allow(unused_imports))]
use crate::sync::{fence, Ordering};

/// VFIO region index of BAR 0 (`VFIO_PCI_BAR0_REGION_INDEX`); BAR n is n.
pub const BAR0_REGION_INDEX: u32 = 0;
/// VFIO region index of PCI config space (`VFIO_PCI_CONFIG_REGION_INDEX`).
pub const CONFIG_REGION_INDEX: u32 = 7;

/// PCI command register offset and its bus-master bit.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// PCI status register, its capability-list bit, and the list's head.
const PCI_STATUS: u64 = 0x06;
const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
const PCI_CAPABILITY_LIST: u64 = 0x34;
/// The PCI Express capability, its Device Control register and the Enable
/// No Snoop bit in it.
const PCI_CAP_ID_EXP: u8 = 0x10;
const PCI_EXP_DEVCTL: u64 = 0x08;
const PCI_EXP_DEVCTL_NOSNOOP_EN: u16 = 1 << 11;

/// What `VFIO_DEVICE_GET_REGION_INFO` says about one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region index.
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*` bits.
    pub flags: u32,
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Where the region starts in the device fd's file offsets.
    pub offset: u64,
}

impl RegionInfo {
    /// Whether the region can be `mmap`ed ([`VfioDevice::map_region`]).
    pub fn mappable(&self) -> bool {
        self.flags & sys::REGION_INFO_FLAG_MMAP != 0
    }
}

impl VfioDma {
    /// Opens the device fd of `bdf` (a device of this group) with
    /// `VFIO_GROUP_GET_DEVICE_FD`.
    pub fn open_device(&self, bdf: &str) -> Result<VfioDevice, VfioError> {
        VfioDevice::from_group(self.clone(), normalize_bdf(bdf)?)
    }
}

/// The VFIO device fd of one PCI function, opened from a [`VfioDma`]'s
/// group. It keeps the group (and so the container) open while it lives;
/// its [`MmioRegion`]s keep the device fd (not the container) open while
/// they live.
pub struct VfioDevice {
    // Field order is drop order: the device fd closes (unless a region
    // still holds it) before the group.
    fd: Arc<OwnedFd>,
    dma: VfioDma,
    bdf: String,
    config: Option<RegionInfo>,
}

impl core::fmt::Debug for VfioDevice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VfioDevice")
            .field("bdf", &self.bdf)
            .field("dma", &self.dma)
            .finish()
    }
}

impl VfioDevice {
    /// Opens PCI device `bdf` (bound to vfio-pci): its group in a new
    /// container ([`VfioDma::open_group_of`]), then the device fd.
    pub fn open(bdf: &str) -> Result<Self, VfioError> {
        VfioDma::open_group_of(bdf)?.open_device(bdf)
    }

    pub(super) fn from_group(dma: VfioDma, bdf: String) -> Result<Self, VfioError> {
        let name =
            CString::new(bdf.clone()).map_err(|_| VfioError::NoSuchDevice { bdf: bdf.clone() })?;
        // SAFETY: GROUP_GET_DEVICE_FD reads a NUL-terminated string from the
        // pointer; `name` lives across the call and is not written.
        let fd = unsafe {
            ioctl_ptr(
                dma.counters(),
                dma.group_fd(),
                sys::GROUP_GET_DEVICE_FD,
                name.as_ptr().cast_mut(),
            )
        }
        .map_err(|errno| match errno {
            libc::ENODEV | libc::ENOENT => VfioError::NoSuchDevice { bdf: bdf.clone() },
            errno => VfioError::Os {
                op: "VFIO_GROUP_GET_DEVICE_FD",
                errno,
            },
        })?;
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut device = Self {
            fd,
            dma,
            bdf,
            config: None,
        };
        device.config = device
            .region_info(CONFIG_REGION_INDEX)
            .ok()
            .filter(|r| r.size != 0);
        Ok(device)
    }

    /// The DMA side: the container this device's group is in. Clone it to
    /// hand it to a pool.
    pub fn dma(&self) -> &VfioDma {
        &self.dma
    }

    /// The PCI address, `0000:00:02.0` form.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// The device fd, for calls this type does not wrap (interrupts, say).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for region `index`.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, VfioError> {
        let mut info = sys::RegionInfo {
            argsz: sys::argsz::<sys::RegionInfo>(),
            index,
            ..Default::default()
        };
        // SAFETY: `info` is a writable `vfio_region_info` with `argsz` set.
        unsafe {
            ioctl_ptr(
                self.dma.counters(),
                self.fd(),
                sys::DEVICE_GET_REGION_INFO,
                &mut info,
            )
        }
        .map_err(|errno| match errno {
            libc::EINVAL => VfioError::NoSuchRegion { index },
            errno => VfioError::Os {
                op: "VFIO_DEVICE_GET_REGION_INFO",
                errno,
            },
        })?;
        Ok(RegionInfo {
            index,
            flags: info.flags,
            size: info.size,
            offset: info.offset,
        })
    }

    fn region(&self, index: u32) -> Result<RegionInfo, VfioError> {
        match self.config {
            Some(config) if index == CONFIG_REGION_INDEX => Ok(config),
            _ => self.region_info(index),
        }
    }

    fn bounds(region: &RegionInfo, offset: u64, len: usize) -> Result<u64, VfioError> {
        let end = offset.checked_add(len as u64);
        if region.size == 0 {
            return Err(VfioError::NoSuchRegion {
                index: region.index,
            });
        }
        match end {
            Some(end) if end <= region.size => Ok(region.offset + offset),
            _ => Err(VfioError::OutOfBounds {
                index: region.index,
                offset,
                len,
                size: region.size,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset` in region `index` (`pread` on
    /// the device fd). Register-sized reads (1, 2, 4 bytes) are single
    /// accesses.
    pub fn read_region(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        let at = Self::bounds(&self.region(index)?, offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: `rest` is writable for `rest.len()` bytes; the fd is open.
            let n = unsafe {
                libc::pread(
                    self.fd_raw(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    (at + done as u64) as libc::off_t,
                )
            };
            if n <= 0 {
                let errno = if n == 0 { libc::EIO } else { errno() };
                return Err(VfioError::Os {
                    op: "pread(VFIO device)",
                    errno,
                });
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` in region `index` (`pwrite` on the device
    /// fd).
    pub fn write_region(&self, index: u32, offset: u64, buf: &[u8]) -> Result<(), VfioError> {
        let at = Self::bounds(&self.region(index)?, offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let rest = &buf[done..];
            // SAFETY: `rest` is readable for `rest.len()` bytes; the fd is open.
            let n = unsafe {
                libc::pwrite(
                    self.fd_raw(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    (at + done as u64) as libc::off_t,
                )
            };
            if n <= 0 {
                let errno = if n == 0 { libc::EIO } else { errno() };
                return Err(VfioError::Os {
                    op: "pwrite(VFIO device)",
                    errno,
                });
            }
            done += n as usize;
        }
        Ok(())
    }

    fn fd_raw(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }

    /// Reads PCI config space at `offset`.
    pub fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        self.read_region(CONFIG_REGION_INDEX, offset, buf)
    }

    /// Writes PCI config space at `offset` (vfio-pci virtualises some
    /// fields and filters others).
    pub fn write_config(&self, offset: u64, buf: &[u8]) -> Result<(), VfioError> {
        self.write_region(CONFIG_REGION_INDEX, offset, buf)
    }

    /// A 16-bit config register (little-endian, as PCI is).
    pub fn config_read_u16(&self, offset: u64) -> Result<u16, VfioError> {
        let mut b = [0; 2];
        self.read_config(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// A 32-bit config register (little-endian).
    pub fn config_read_u32(&self, offset: u64) -> Result<u32, VfioError> {
        let mut b = [0; 4];
        self.read_config(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a 16-bit config register.
    pub fn config_write_u16(&self, offset: u64, value: u16) -> Result<(), VfioError> {
        self.write_config(offset, &value.to_le_bytes())
    }

    /// The offset of the PCI Express capability in config space, if the
    /// device has one.
    fn pcie_capability(&self) -> Result<Option<u64>, VfioError> {
        if self.config_read_u16(PCI_STATUS)? & PCI_STATUS_CAP_LIST == 0 {
            return Ok(None);
        }
        let mut byte = [0u8; 2];
        self.read_config(PCI_CAPABILITY_LIST, &mut byte[..1])?;
        let mut at = u64::from(byte[0] & !3);
        // At most 48 capabilities fit in the 256 bytes: a loop is malformed.
        for _ in 0..48 {
            if at < 0x40 {
                return Ok(None);
            }
            self.read_config(at, &mut byte)?;
            if byte[0] == PCI_CAP_ID_EXP {
                return Ok(Some(at));
            }
            at = u64::from(byte[1] & !3);
        }
        Ok(None)
    }

    /// Whether the device may mark its requests No Snoop (Enable No Snoop
    /// in the PCI Express Device Control register); `None` for a device
    /// without the PCI Express capability.
    pub fn no_snoop_enabled(&self) -> Result<Option<bool>, VfioError> {
        let Some(cap) = self.pcie_capability()? else {
            return Ok(None);
        };
        let devctl = self.config_read_u16(cap + PCI_EXP_DEVCTL)?;
        Ok(Some(devctl & PCI_EXP_DEVCTL_NOSNOOP_EN != 0))
    }

    /// Sets or clears Enable No Snoop. A request marked No Snoop skips the
    /// CPU caches unless the IOMMU enforces coherency
    /// ([`VfioDma::cache_coherent`]); the pool does no cache maintenance
    /// (VFIO gives user space none), so a device must not use it there.
    /// Clearing it on a device without the PCI Express capability does
    /// nothing.
    pub fn set_no_snoop(&self, enable: bool) -> Result<(), VfioError> {
        let Some(cap) = self.pcie_capability()? else {
            return if enable {
                Err(VfioError::Unsupported {
                    what: "a PCI Express capability (No Snoop) on this device",
                })
            } else {
                Ok(())
            };
        };
        let devctl = self.config_read_u16(cap + PCI_EXP_DEVCTL)?;
        let devctl = if enable {
            devctl | PCI_EXP_DEVCTL_NOSNOOP_EN
        } else {
            devctl & !PCI_EXP_DEVCTL_NOSNOOP_EN
        };
        self.config_write_u16(cap + PCI_EXP_DEVCTL, devctl)
    }

    /// Sets or clears Bus Master Enable (bit 2 of the command register):
    /// without it the device cannot DMA at all. Enabling it on a container
    /// whose IOMMU does not enforce coherency ([`VfioDma::cache_coherent`]
    /// false) first clears the device's Enable No Snoop
    /// ([`set_no_snoop`](Self::set_no_snoop)), since the pool's syncs do
    /// nothing.
    pub fn set_bus_master(&self, enable: bool) -> Result<(), VfioError> {
        if enable && !self.dma.cache_coherent() {
            self.set_no_snoop(false)?;
        }
        let command = self.config_read_u16(PCI_COMMAND)?;
        let command = if enable {
            command | PCI_COMMAND_MASTER
        } else {
            command & !PCI_COMMAND_MASTER
        };
        self.config_write_u16(PCI_COMMAND, command)
    }

    /// `VFIO_DEVICE_RESET`: a function-level (or equivalent) reset.
    pub fn reset(&self) -> Result<(), VfioError> {
        ioctl_val(self.dma.counters(), self.fd(), sys::DEVICE_RESET, 0)
            .map(drop)
            .map_err(|errno| VfioError::Os {
                op: "VFIO_DEVICE_RESET",
                errno,
            })
    }

    /// `mmap`s region `index` (a memory BAR) whole, for register access
    /// through [`MmioRegion`]. Regions that are not mappable (I/O BARs,
    /// config space) fail with [`VfioError::RegionNotMappable`]; a BAR
    /// holding the MSI-X table may refuse a whole-region mapping, use
    /// [`read_region`](Self::read_region) there.
    pub fn map_region(&self, index: u32) -> Result<MmioRegion, VfioError> {
        let info = self.region_info(index)?;
        if info.size == 0 {
            return Err(VfioError::NoSuchRegion { index });
        }
        if !info.mappable() {
            return Err(VfioError::RegionNotMappable { index });
        }
        let len = usize::try_from(info.size).map_err(|_| VfioError::RegionNotMappable { index })?;
        // SAFETY: a fresh shared mapping of the device fd at the region's
        // offset; the kernel picks the address, so no existing memory is
        // replaced.
        let ptr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd_raw(),
                info.offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VfioError::Os {
                op: "mmap(VFIO region)",
                errno: errno(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(VfioError::Os {
            op: "mmap(VFIO region)",
            errno: libc::EFAULT,
        })?;
        Ok(MmioRegion {
            ptr,
            len,
            index,
            _fd: Arc::clone(&self.fd),
        })
    }
}

impl AsFd for VfioDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A `mmap`ed device region (a BAR): registers, reached only by volatile
/// reads and writes, never through a Rust reference. Unmapped on drop.
///
/// Accesses must be naturally aligned and inside the region; anything else
/// panics. Like Linux's `writel`, a write is ordered after all earlier
/// memory writes of this thread (descriptors filled before a doorbell reach
/// memory first); like `readl`, a read is ordered before later memory reads.
/// The barriers are Linux's own on x86-64 (none needed beyond the compiler's)
/// and arm64 (`dmb oshst` before a write, `dmb oshld` after a read); other
/// architectures get sequentially consistent fences, which may not order
/// device memory there.
///
/// The region holds its device's fd: it stays valid however the
/// [`VfioDevice`] is dropped, and the device stays open (its group busy)
/// until the region is dropped too. DMA mappings do not wait for it: the
/// last [`VfioDma`] handle removes them.
pub struct MmioRegion {
    ptr: NonNull<u8>,
    len: usize,
    index: u32,
    /// The device fd the mapping came from.
    _fd: Arc<OwnedFd>,
}

/// The barrier before an MMIO write: every earlier memory write of this
/// thread is visible to the device before the write (Linux's `__iowmb`).
#[inline]
fn io_write_barrier() {
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a barrier instruction: no memory access, no register changed.
    unsafe {
        core::arch::asm!("dmb oshst", options(nostack, preserves_flags))
    };
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    fence(Ordering::Release);
    #[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64", target_arch = "x86")))]
    fence(Ordering::SeqCst);
}

/// The barrier after an MMIO read: later memory reads of this thread see
/// what the device wrote before the value read (Linux's `__iormb`).
#[inline]
fn io_read_barrier() {
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a barrier instruction: no memory access, no register changed.
    unsafe {
        core::arch::asm!("dmb oshld", options(nostack, preserves_flags))
    };
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    fence(Ordering::Acquire);
    #[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64", target_arch = "x86")))]
    fence(Ordering::SeqCst);
}

// SAFETY: the region is device memory shared by every thread of the
// process; volatile accesses from several threads are what the hardware
// serves anyway, and `MmioRegion` holds no thread-bound state.
unsafe impl Send for MmioRegion {}
// SAFETY: as above; `&MmioRegion` only allows volatile accesses.
unsafe impl Sync for MmioRegion {}

impl core::fmt::Debug for MmioRegion {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MmioRegion")
            .field("index", &self.index)
            .field("len", &self.len)
            .finish()
    }
}

macro_rules! mmio_access {
    ($read:ident, $write:ident, $t:ty) => {
        #[doc = concat!("Volatile read of a `", stringify!($t), "` register at byte `offset`.")]
        pub fn $read(&self, offset: usize) -> $t {
            let p = self.at::<$t>(offset);
            // SAFETY: `at` checked that `offset` is aligned and the access
            // lies inside the live mapping.
            let value = unsafe { p.read_volatile() };
            io_read_barrier();
            value
        }

        #[doc = concat!("Volatile write of a `", stringify!($t), "` register at byte `offset`.")]
        pub fn $write(&self, offset: usize, value: $t) {
            let p = self.at::<$t>(offset);
            io_write_barrier();
            // SAFETY: `at` checked that `offset` is aligned and the access
            // lies inside the live mapping.
            unsafe { p.write_volatile(value) }
        }
    };
}

impl MmioRegion {
    /// Size of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never, for a mapped region).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The VFIO region index this maps.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The start of the mapping, for accesses this type does not offer.
    /// Only volatile accesses are meaningful on it.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn at<T>(&self, offset: usize) -> *mut T {
        let size = core::mem::size_of::<T>();
        assert!(
            offset % size == 0 && offset.checked_add(size).is_some_and(|end| end <= self.len),
            "MMIO access of {size} bytes at {offset:#x} outside or misaligned in region {} ({:#x} bytes)",
            self.index,
            self.len
        );
        // SAFETY: `offset + size <= len`, so the result is inside the mapping.
        unsafe { self.ptr.as_ptr().add(offset).cast::<T>() }
    }

    mmio_access!(read8, write8, u8);
    mmio_access!(read16, write16, u16);
    mmio_access!(read32, write32, u32);
    mmio_access!(read64, write64, u64);
}

impl Drop for MmioRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping made by `map_region` that
        // nothing else unmaps; no reference into it can outlive `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
