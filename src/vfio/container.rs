//! [`VfioDma`]: the container with its one group, and the [`DmaOps`] built
//! on it (`MAP_DMA`/`UNMAP_DMA` with IOVAs picked by [`IovaAllocator`]),
//! with the call counters behind [`VfioStats`].
//!
//! Invariants:
//! - **Setup.** A `VfioDma` exists only for a viable group attached to a
//!   container with a type1 IOMMU (TYPE1v2 selected here unless the group
//!   was already attached), whose page size and valid IOVA ranges were read
//!   once at setup (below the MSI window when the kernel reports none;
//!   sorted and merged when they overlap).
//! - **One allocator per container.** No two `VfioDma`s of the process
//!   (clones aside) share a container: setup refuses, with
//!   [`VfioError::ContainerShared`], a group whose container already has an
//!   IOMMU (another group is in it), and an already attached group whose
//!   container or group a live `VfioDma` has (the container compared with
//!   `kcmp`, where the kernel offers it).
//! - **Alignment.** `map` maps exactly the memory it is given: memory not
//!   aligned to the IOMMU page, or not a whole number of them, is refused
//!   ([`VfioError::Unaligned`]), never widened.
//! - **Read-only pins.** Memory the device only reads is faulted in for
//!   writing (`MADV_POPULATE_WRITE`) before `MAP_DMA`, so the kernel never
//!   pins the shared zero page (or a copy-on-write page the CPU's next
//!   write replaces); where the kernel lacks that advice, such mappings
//!   are made readable and writable, which makes the pin break
//!   copy-on-write itself.
//! - **IOVA records.** Every mapping gets its own block of whole IOMMU
//!   pages from the allocator; the block is freed only when the kernel
//!   confirms the unmap with the exact size, and then waits in the
//!   allocator's quarantine before reuse (or, when `MAP_DMA` failed and
//!   nothing was mapped, is free at once). A mismatched unmap leaves the block reserved, so
//!   an IOVA still in the container is never handed out again, and is
//!   reported to the pool as failed, which then keeps the memory.
//! - **Drop.** The last handle's drop removes every mapping still in the
//!   container with `VFIO_DMA_UNMAP_FLAG_ALL` (Linux 5.13 and later), so
//!   no mapping outlives the handles even while something else (an
//!   [`MmioRegion`](super::MmioRegion), a duplicated fd, a forked child)
//!   keeps the files open; then the group fd closes before the container
//!   fd (field order).

use core::ptr::NonNull;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex as StdMutex;

use super::error::VfioError;
use super::info::{get_info, IommuInfo};
use super::ioctl::{ioctl_ptr, ioctl_val, open_node, Counters};
use super::pin;
use super::sys;
use super::sysfs::{self, entry_limit_param, group_devices, group_id_of, memlock_limit};
use crate::iova::{IovaAllocator, IovaRange};
use crate::sync::{Arc, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};
use crate::{DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, UnmapBatchError, UnmapError};

/// The VFIO container node.
pub const CONTAINER_PATH: &str = "/dev/vfio/vfio";

/// Counters of every VFIO call this backend made (see [`VfioDma::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VfioStats {
    /// Every ioctl on the container, group or device fd, of any kind.
    pub ioctls: u64,
    /// `VFIO_IOMMU_MAP_DMA` calls, failed ones included.
    pub map_calls: u64,
    /// `VFIO_IOMMU_MAP_DMA` calls that failed.
    pub map_failures: u64,
    /// `VFIO_IOMMU_UNMAP_DMA` calls (one per merged run in a batch).
    pub unmap_calls: u64,
    /// Mappings torn down (a merged `UNMAP_DMA` counts each of its mappings).
    pub unmapped: u64,
    /// Unmaps the kernel refused or answered with a different size (each
    /// reported to the pool as failed: it keeps their memory).
    pub unmap_errors: u64,
    /// Mappings made through this backend and not yet unmapped.
    pub live_mappings: u64,
    /// Bytes of IOVA space they cover.
    pub live_bytes: u64,
}

struct Inner {
    // Field order is drop order: the group leaves the container before the
    // container closes.
    group: OwnedFd,
    container: OwnedFd,
    group_id: Option<u32>,
    page_size: u64,
    page_sizes: u64,
    iova_ranges: Vec<IovaRange>,
    entry_limit: Option<u64>,
    info_len: AtomicUsize,
    write_only_refused: AtomicBool,
    /// `MADV_POPULATE_WRITE` works on this kernel (5.14 and later).
    populate_write: bool,
    /// The kernel supports `VFIO_DMA_UNMAP_FLAG_ALL`.
    unmap_all: bool,
    /// `VFIO_DMA_CC_IOMMU`: the IOMMU enforces cache coherency.
    cache_coherent: bool,
    /// `DMA_AVAIL` reads `u32::MAX`: iommufd's type1 compatibility layer,
    /// which has no entry limit and no meaningful count.
    iommufd_compat: bool,
    iova: Mutex<IovaAllocator>,
    counters: Counters,
    last_error: Mutex<Option<VfioError>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.unmap_all {
            // Whatever still holds the container or group files (an
            // `MmioRegion`, a duplicated fd, a forked child), no mapping
            // outlives the last handle.
            let mut unmap = sys::DmaUnmap {
                argsz: sys::argsz::<sys::DmaUnmap>(),
                flags: sys::DMA_UNMAP_FLAG_ALL,
                iova: 0,
                size: 0,
            };
            // SAFETY: `unmap` is a writable `vfio_iommu_type1_dma_unmap` with
            // `argsz` set; the kernel writes the unmapped size back into it.
            let _ = unsafe {
                ioctl_ptr(
                    &self.counters,
                    self.container.as_fd(),
                    sys::IOMMU_UNMAP_DMA,
                    &mut unmap,
                )
            };
        }
        // Unregistered before the fds close (after this body).
        let key = core::ptr::from_ref(self).addr();
        CONTAINERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&(k, _, _)| k != key);
    }
}

/// A VFIO type1 container holding one IOMMU group: the [`DmaOps`] of the
/// devices in that group. Clones share the container.
///
/// See the [module documentation](crate::vfio) for directions, sync and limits.
#[derive(Clone)]
pub struct VfioDma {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for VfioDma {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VfioDma")
            .field("group", &self.inner.group_id)
            .field("page_size", &self.inner.page_size)
            .field("iova_ranges", &self.inner.iova_ranges)
            .field("entry_limit", &self.inner.entry_limit)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Containers of the live `VfioDma`s: (key, container fd, group id).
/// An entry is removed before its fds close, so every fd here is open.
static CONTAINERS: StdMutex<Vec<(usize, RawFd, Option<u32>)>> = StdMutex::new(Vec::new());

/// Whether two fds of this process refer to the same open file (the same
/// container): `kcmp(KCMP_FILE)`. `None` where the kernel does not say.
fn same_file(a: RawFd, b: RawFd) -> Option<bool> {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: getpid cannot fail and touches no memory.
    let pid = unsafe { libc::getpid() };
    // SAFETY: kcmp only compares kernel objects named by pid and fd
    // numbers; it reads and writes no user memory.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    match r {
        0 => Some(true),
        1..=3 => Some(false),
        _ => None,
    }
}

/// Where the fallback IOVA window ends when the kernel reports no ranges
/// (pre-5.4 kernels): below the x86 MSI window, which is never mappable.
const FALLBACK_IOVA_END: u64 = 0xfedf_ffff;

impl VfioDma {
    /// Opens the container and the group node at `group_path` (for example
    /// `/dev/vfio/12`), and sets them up (see [`from_fds`](Self::from_fds)).
    pub fn open_group(group_path: impl AsRef<Path>) -> Result<Self, VfioError> {
        let group_path = group_path.as_ref();
        let container = open_node(Path::new(CONTAINER_PATH), true)?;
        let group = open_node(group_path, false)?;
        Self::setup(container, group, group_id_of(group_path))
    }

    /// Opens the container and the IOMMU group of PCI device `bdf` (as
    /// `lspci -D` prints it, `0000:00:02.0`; `00:02.0` means domain 0),
    /// found through `/sys/bus/pci/devices/<bdf>/iommu_group`.
    pub fn open_group_of(bdf: &str) -> Result<Self, VfioError> {
        Self::open_group(Self::group_path_of(bdf)?)
    }

    /// The `/dev/vfio/<group>` node of PCI device `bdf`.
    pub fn group_path_of(bdf: &str) -> Result<PathBuf, VfioError> {
        sysfs::group_path_of(bdf)
    }

    /// Takes an already open container (`/dev/vfio/vfio`) and group
    /// (`/dev/vfio/<n>`): checks the API version (0) and the TYPE1v2
    /// extension, that the group is viable, and, unless the group already
    /// has a container, attaches it to `container` and selects TYPE1v2. A
    /// group that is already attached must be attached to `container`,
    /// with its IOMMU type set by the caller.
    ///
    /// One `VfioDma` per container (its IOVA allocator must be the only one
    /// there): fails with [`VfioError::ContainerShared`], leaving the group
    /// as it was, if `container` already has an IOMMU with another group in
    /// it, or if a live `VfioDma` of this process already has this group or
    /// this container (compared with `kcmp`, where the kernel has it).
    /// Clone the existing handle instead.
    pub fn from_fds(container: OwnedFd, group: OwnedFd) -> Result<Self, VfioError> {
        // The group number, from the node the fd was opened from.
        let group_id = sysfs::group_id_of_fd(group.as_fd());
        Self::setup(container, group, group_id)
    }

    fn setup(container: OwnedFd, group: OwnedFd, group_id: Option<u32>) -> Result<Self, VfioError> {
        let counters = Counters::default();
        let c = container.as_fd();
        let version =
            ioctl_val(&counters, c, sys::GET_API_VERSION, 0).map_err(|errno| VfioError::Os {
                op: "VFIO_GET_API_VERSION",
                errno,
            })?;
        if version != sys::API_VERSION {
            return Err(VfioError::ApiVersion { found: version });
        }
        match ioctl_val(&counters, c, sys::CHECK_EXTENSION, sys::TYPE1V2_IOMMU) {
            Ok(n) if n > 0 => {}
            Ok(_) => return Err(VfioError::NoType1v2),
            Err(errno) => {
                return Err(VfioError::Os {
                    op: "VFIO_CHECK_EXTENSION",
                    errno,
                })
            }
        }

        let mut status = sys::GroupStatus {
            argsz: sys::argsz::<sys::GroupStatus>(),
            flags: 0,
        };
        // SAFETY: `status` is a writable `vfio_group_status` with `argsz` set.
        unsafe { ioctl_ptr(&counters, group.as_fd(), sys::GROUP_GET_STATUS, &mut status) }
            .map_err(|errno| VfioError::Os {
                op: "VFIO_GROUP_GET_STATUS",
                errno,
            })?;
        if status.flags & sys::GROUP_FLAGS_VIABLE == 0 {
            return Err(VfioError::GroupNotViable {
                group: group_id,
                devices: group_devices(group_id),
            });
        }

        // Held until this handle is registered: two setups on one
        // container cannot both pass the check below.
        let mut registry = CONTAINERS.lock().unwrap_or_else(|e| e.into_inner());
        let mut set_iommu_here = false;
        if status.flags & sys::GROUP_FLAGS_CONTAINER_SET != 0 {
            // Already attached: refuse a container (or group) another
            // handle of this process already allocates IOVAs in.
            let shared = registry.iter().any(|&(_, fd, group)| {
                (group.is_some() && group == group_id)
                    || same_file(fd, container.as_raw_fd()) == Some(true)
            });
            if shared {
                return Err(VfioError::ContainerShared { group: group_id });
            }
        } else {
            let mut container_fd: RawFd = container.as_raw_fd();
            // SAFETY: GROUP_SET_CONTAINER reads one `int` (the container fd)
            // from the pointer; `container_fd` lives across the call.
            unsafe {
                ioctl_ptr(
                    &counters,
                    group.as_fd(),
                    sys::GROUP_SET_CONTAINER,
                    &mut container_fd,
                )
            }
            .map_err(|errno| VfioError::Os {
                op: "VFIO_GROUP_SET_CONTAINER",
                errno,
            })?;
            match ioctl_val(&counters, c, sys::SET_IOMMU, sys::TYPE1V2_IOMMU) {
                Ok(_) => set_iommu_here = true,
                Err(errno) => {
                    // Leave the group as we found it.
                    let _ = ioctl_val(&counters, group.as_fd(), sys::GROUP_UNSET_CONTAINER, 0);
                    return Err(match errno {
                        // The container already has an IOMMU, so another
                        // group is in it, with IOVAs someone else picks.
                        libc::EINVAL | libc::EBUSY => {
                            VfioError::ContainerShared { group: group_id }
                        }
                        errno => VfioError::Os {
                            op: "VFIO_SET_IOMMU",
                            errno,
                        },
                    });
                }
            }
        }

        let info_len = AtomicUsize::new(0);
        let info = get_info(&counters, c, &info_len)?;
        let page_sizes = if info.page_sizes == 0 {
            4096
        } else {
            info.page_sizes
        };
        let page_size = 1u64 << page_sizes.trailing_zeros();
        let iova_ranges = info
            .iova_ranges
            .clone()
            .filter(|r| r.iter().any(|r| r.start <= r.end))
            .unwrap_or_else(|| {
                vec![IovaRange {
                    start: 0,
                    end: FALLBACK_IOVA_END,
                }]
            });
        let (entry_limit, iommufd_compat) =
            entry_limit(set_iommu_here, info.dma_avail, entry_limit_param);
        let extension =
            |ext| matches!(ioctl_val(&counters, c, sys::CHECK_EXTENSION, ext), Ok(n) if n > 0);
        let cache_coherent = extension(sys::DMA_CC_IOMMU);
        let unmap_all = extension(sys::UNMAP_ALL);
        let iova = match IovaAllocator::new(&iova_ranges, page_size) {
            Ok(iova) => Mutex::new(iova),
            // `page_size` is one bit of `page_sizes`: a power of two.
            Err(e) => unreachable!("{e}"),
        };
        let this = Self {
            inner: Arc::new(Inner {
                group,
                container,
                group_id,
                page_size,
                page_sizes,
                iova_ranges,
                entry_limit,
                info_len,
                write_only_refused: AtomicBool::new(false),
                populate_write: pin::probe_populate_write(),
                unmap_all,
                cache_coherent,
                iommufd_compat,
                iova,
                counters,
                last_error: Mutex::new(None),
            }),
        };
        let key = Arc::as_ptr(&this.inner).addr();
        registry.push((key, this.inner.container.as_raw_fd(), group_id));
        Ok(this)
    }

    /// The container fd, for calls this backend does not wrap. Mapping or
    /// unmapping through it behind the backend's back breaks its records.
    pub fn container_fd(&self) -> BorrowedFd<'_> {
        self.inner.container.as_fd()
    }

    /// The container's call counters, for the ioctls of its devices.
    pub(super) fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// The group fd.
    pub fn group_fd(&self) -> BorrowedFd<'_> {
        self.inner.group.as_fd()
    }

    /// The IOMMU group number, where known.
    pub fn group_id(&self) -> Option<u32> {
        self.inner.group_id
    }

    /// The smallest IOMMU page size: the granule of every mapping. Memory
    /// passed to `map` is mapped in whole pages of this size.
    pub fn page_size(&self) -> u64 {
        self.inner.page_size
    }

    /// Bitmap of all IOMMU page sizes (bit n: 2^n bytes).
    pub fn page_sizes(&self) -> u64 {
        self.inner.page_sizes
    }

    /// The valid IOVA ranges this backend allocates from.
    pub fn iova_ranges(&self) -> &[IovaRange] {
        &self.inner.iova_ranges
    }

    /// The container's `dma_entry_limit`, where known: the most mappings it
    /// can hold at once.
    pub fn entry_limit(&self) -> Option<u64> {
        self.inner.entry_limit
    }

    /// Reads `VFIO_IOMMU_GET_INFO` now (one or two ioctls).
    pub fn iommu_info(&self) -> Result<IommuInfo, VfioError> {
        get_info(
            &self.inner.counters,
            self.container_fd(),
            &self.inner.info_len,
        )
    }

    /// The number of mapping entries the container has left (`DMA_AVAIL`):
    /// the kernel's exact count, so `limit - dma_avail()` is the number of
    /// live mappings in the container, whoever made them. Under iommufd's
    /// type1 compatibility layer (`/dev/vfio/vfio` served by iommufd) the
    /// count means nothing (it reads `u32::MAX`, and there is no
    /// `dma_entry_limit`): then this fails with
    /// [`VfioError::Unsupported`] (see [`is_iommufd_compat`](Self::is_iommufd_compat)).
    pub fn dma_avail(&self) -> Result<u32, VfioError> {
        if self.inner.iommufd_compat {
            return Err(VfioError::Unsupported {
                what: "a meaningful DMA_AVAIL (iommufd's type1 compatibility layer reports \
                       u32::MAX and has no dma_entry_limit)",
            });
        }
        self.iommu_info()?.dma_avail.ok_or(VfioError::Unsupported {
            what: "the DMA_AVAIL capability of VFIO_IOMMU_GET_INFO",
        })
    }

    /// Whether the container is served by iommufd's type1 compatibility
    /// layer (detected by its `DMA_AVAIL` of `u32::MAX`): mappings are not
    /// limited by `dma_entry_limit` there, and [`dma_avail`](Self::dma_avail)
    /// has no count to give.
    pub fn is_iommufd_compat(&self) -> bool {
        self.inner.iommufd_compat
    }

    /// Whether the IOMMU enforces cache-coherent DMA (`VFIO_DMA_CC_IOMMU`):
    /// it then snoops even requests a device marks No Snoop. Where it does
    /// not (Intel's emulated VT-d, some real ones), a device must not use No
    /// Snoop, since the pool does no cache maintenance (see
    /// [`DmaOps::needs_sync`]): [`VfioDevice::set_bus_master`](super::VfioDevice::set_bus_master)
    /// clears its Enable No Snoop bit.
    pub fn cache_coherent(&self) -> bool {
        self.inner.cache_coherent
    }

    /// A snapshot of the call counters.
    pub fn stats(&self) -> VfioStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VfioStats {
            ioctls: get(&c.ioctls),
            map_calls: get(&c.map_calls),
            map_failures: get(&c.map_failures),
            unmap_calls: get(&c.unmap_calls),
            unmapped: get(&c.unmapped),
            unmap_errors: get(&c.unmap_errors),
            live_mappings: get(&c.live_mappings),
            live_bytes: get(&c.live_bytes),
        }
    }

    /// The last unmap failure, if any (also reported to the caller of
    /// [`DmaOps::unmap`], and counted in [`VfioStats::unmap_errors`]).
    pub fn last_unmap_error(&self) -> Option<VfioError> {
        self.inner.last_error.lock().clone()
    }

    /// The IOVA-page-aligned span `(iova, size)` that `map` gave `mapping`.
    fn span(&self, addr: u64, len: usize) -> (u64, u64) {
        let page = self.inner.page_size;
        let base = addr & !(page - 1);
        let size = ((addr - base) + len as u64).div_ceil(page) * page;
        (base, size)
    }

    /// Maps `len` bytes at `cpu` for `direction` with `VFIO_IOMMU_MAP_DMA`
    /// and returns the device address; the richer-error form of
    /// [`DmaOps::map`].
    ///
    /// `cpu` must be aligned to [`page_size`](Self::page_size) and `len` a
    /// multiple of it ([`VfioError::Unaligned`] otherwise): the IOMMU maps
    /// whole pages, and widening the mapping to them would let the device
    /// reach the memory around the buffer. Memory the device only reads
    /// (`ToDevice`) is faulted in for writing first, so the kernel pins the
    /// pages the CPU writes, never the shared zero page.
    ///
    /// # Safety
    /// As for [`DmaOps::map`]: the memory stays allocated and unused by
    /// anyone else until it is unmapped, and no CPU reference to it exists
    /// while the device may write it.
    pub unsafe fn try_map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, VfioError> {
        let inner = &*self.inner;
        let vaddr = cpu.as_ptr() as u64;
        if len == 0 {
            return Err(VfioError::InvalidArgument {
                op: "VFIO_IOMMU_MAP_DMA",
                detail: "a zero-length mapping".into(),
            });
        }
        let page = inner.page_size;
        pin::check_aligned(vaddr, len as u64, page)?;
        let (base, size) = (vaddr, len as u64);
        let iova = inner
            .iova
            .lock()
            .alloc(size)
            .map_err(|_| VfioError::AddressSpaceExhausted { size })?;

        let mut flags = 0;
        if direction.device_reads() {
            flags |= sys::DMA_MAP_FLAG_READ;
        }
        if direction.device_writes() {
            flags |= sys::DMA_MAP_FLAG_WRITE;
        }
        if flags == sys::DMA_MAP_FLAG_WRITE && inner.write_only_refused.load(Ordering::Relaxed) {
            flags |= sys::DMA_MAP_FLAG_READ;
        }
        if flags == sys::DMA_MAP_FLAG_READ {
            // The kernel pins a read-only mapping without write access:
            // memory never written would pin the shared zero page (before
            // Linux 6.2, also a copy-on-write page), and the CPU's later
            // writes would go to a copy the device never sees.
            // SAFETY: the caller's `map` contract: valid memory, no CPU
            // reference to it during the call.
            if !unsafe { pin::populate_for_device_read(cpu, len, inner.populate_write) } {
                // No populate on this kernel: a writable pin breaks
                // copy-on-write itself.
                flags |= sys::DMA_MAP_FLAG_WRITE;
            }
        }
        let mut result = self.map_dma(base, iova, size, flags);
        if result == Err(libc::EINVAL) && flags == sys::DMA_MAP_FLAG_WRITE {
            // Some IOMMUs cannot express write-only; read+write is what
            // they would do anyway. Remember it.
            result = self.map_dma(base, iova, size, flags | sys::DMA_MAP_FLAG_READ);
            if result.is_ok() {
                inner.write_only_refused.store(true, Ordering::Relaxed);
            }
        }
        match result {
            Ok(()) => {
                inner.counters.live_mappings.fetch_add(1, Ordering::Relaxed);
                inner.counters.live_bytes.fetch_add(size, Ordering::Relaxed);
                Ok(DmaAddr(iova))
            }
            Err(errno) => {
                // Nothing was mapped: the IOVA block is free again at once.
                let freed = inner.iova.lock().release(iova, size);
                debug_assert!(freed.is_ok(), "{freed:?}");
                Err(match errno {
                    libc::ENOSPC => VfioError::MappingLimit {
                        limit: inner.entry_limit.or_else(entry_limit_param),
                    },
                    libc::ENOMEM => VfioError::LockedMemoryLimit {
                        requested: size,
                        limit: memlock_limit(),
                    },
                    libc::EEXIST => VfioError::Overlap { iova, size },
                    libc::EINVAL => VfioError::InvalidArgument {
                        op: "VFIO_IOMMU_MAP_DMA",
                        detail: format!(
                            "vaddr {base:#x} iova {iova:#x} size {size:#x} flags {flags:#x}"
                        ),
                    },
                    errno => VfioError::Os {
                        op: "VFIO_IOMMU_MAP_DMA",
                        errno,
                    },
                })
            }
        }
    }

    /// One `VFIO_IOMMU_MAP_DMA`.
    fn map_dma(&self, vaddr: u64, iova: u64, size: u64, flags: u32) -> Result<(), i32> {
        let counters = &self.inner.counters;
        let mut map = sys::DmaMap {
            argsz: sys::argsz::<sys::DmaMap>(),
            flags,
            vaddr,
            iova,
            size,
        };
        counters.map_calls.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `map` is a `vfio_iommu_type1_dma_map` with `argsz` set. The
        // kernel pins the user pages at `vaddr`; the caller of `try_map`
        // guarantees they stay allocated until unmapped.
        let result =
            unsafe { ioctl_ptr(counters, self.container_fd(), sys::IOMMU_MAP_DMA, &mut map) };
        if result.is_err() {
            counters.map_failures.fetch_add(1, Ordering::Relaxed);
        }
        result.map(drop)
    }

    /// One `VFIO_IOMMU_UNMAP_DMA` of `[iova, iova + size)`, which covers
    /// `count` whole mappings of this backend; frees the IOVA block when the
    /// kernel confirms the size.
    fn unmap_span(&self, iova: u64, size: u64, count: u64) -> Result<(), VfioError> {
        let inner = &*self.inner;
        let c = &inner.counters;
        let mut unmap = sys::DmaUnmap {
            argsz: sys::argsz::<sys::DmaUnmap>(),
            flags: 0,
            iova,
            size,
        };
        c.unmap_calls.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `unmap` is a writable `vfio_iommu_type1_dma_unmap` with
        // `argsz` set; the kernel writes the unmapped size back into it.
        let result = unsafe { ioctl_ptr(c, self.container_fd(), sys::IOMMU_UNMAP_DMA, &mut unmap) };
        match result {
            Ok(_) if unmap.size == size => {
                c.unmapped.fetch_add(count, Ordering::Relaxed);
                c.live_mappings.fetch_sub(count, Ordering::Relaxed);
                c.live_bytes.fetch_sub(size, Ordering::Relaxed);
                let freed = inner.iova.lock().free(iova, size);
                // The kernel just confirmed these were live mappings of ours,
                // so their block cannot be free already.
                debug_assert!(freed.is_ok(), "{freed:?} while mapped");
                Ok(())
            }
            // The kernel removed something else than asked: the records no
            // longer match the container, so the block stays reserved.
            Ok(_) => Err(VfioError::UnmapMismatch {
                iova,
                expected: size,
                unmapped: unmap.size,
            }),
            Err(libc::EINVAL) => Err(VfioError::InvalidArgument {
                op: "VFIO_IOMMU_UNMAP_DMA",
                detail: format!("iova {iova:#x} size {size:#x}"),
            }),
            Err(errno) => Err(VfioError::Os {
                op: "VFIO_IOMMU_UNMAP_DMA",
                errno,
            }),
        }
    }

    fn record(&self, error: &VfioError) {
        self.inner
            .counters
            .unmap_errors
            .fetch_add(1, Ordering::Relaxed);
        *self.inner.last_error.lock() = Some(error.clone());
    }

    /// Unmaps one mapping with `VFIO_IOMMU_UNMAP_DMA` and checks the size
    /// the kernel reports; the richer-error form of [`DmaOps::unmap`].
    /// Failures are also counted in [`VfioStats::unmap_errors`].
    ///
    /// # Safety
    /// As for [`DmaOps::unmap`]: `mapping` came from `map` on this backend
    /// and is unmapped once.
    pub unsafe fn try_unmap(&self, mapping: DmaMapping) -> Result<(), VfioError> {
        let (iova, size) = self.span(mapping.addr.0, mapping.len);
        self.unmap_span(iova, size, 1)
            .inspect_err(|e| self.record(e))
    }

    /// Unmaps several mappings, merging those whose IOVA blocks touch into
    /// one `VFIO_IOMMU_UNMAP_DMA` each (TYPE1v2 accepts an unmap that covers
    /// several whole mappings, never part of one). Returns the number of
    /// `UNMAP_DMA` calls made; on failure, the first error (every mapping is
    /// still attempted, and failures are counted in
    /// [`VfioStats::unmap_errors`]).
    ///
    /// # Safety
    /// As for [`DmaOps::unmap_batch`].
    pub unsafe fn try_unmap_batch(&self, mappings: &[DmaMapping]) -> Result<u64, VfioError> {
        let (calls, failed) = self.unmap_runs(mappings);
        match failed.into_iter().next() {
            Some((_, error)) => Err(error),
            None => Ok(calls),
        }
    }

    /// The work of [`try_unmap_batch`](Self::try_unmap_batch): the calls
    /// made, and every mapping (by index) that may still be mapped. A
    /// merged call the kernel answered with another size fails every
    /// mapping it covered: which of them went is unknown.
    fn unmap_runs(&self, mappings: &[DmaMapping]) -> (u64, Vec<(usize, VfioError)>) {
        let mut spans: Vec<(u64, u64, usize)> = mappings
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let (iova, size) = self.span(m.addr.0, m.len);
                (iova, size, i)
            })
            .collect();
        spans.sort_unstable();
        let mut calls = 0;
        let mut failed = Vec::new();
        let mut run_start = 0;
        while run_start < spans.len() {
            let (iova, mut size, _) = spans[run_start];
            let mut run_end = run_start + 1;
            while run_end < spans.len() && iova.checked_add(size) == Some(spans[run_end].0) {
                size += spans[run_end].1;
                run_end += 1;
            }
            let run = &spans[run_start..run_end];
            calls += 1;
            match self.unmap_span(iova, size, run.len() as u64) {
                Ok(()) => {}
                Err(VfioError::InvalidArgument { .. }) if run.len() > 1 => {
                    // The kernel refused the merged range before touching
                    // it: fall back to one call per mapping.
                    for &(iova, size, index) in run {
                        calls += 1;
                        if let Err(e) = self.unmap_span(iova, size, 1) {
                            self.record(&e);
                            failed.push((index, e));
                        }
                    }
                }
                Err(e) => {
                    self.record(&e);
                    failed.extend(run.iter().map(|&(_, _, index)| (index, e.clone())));
                }
            }
            run_start = run_end;
        }
        (calls, failed)
    }
}

impl DmaOps for VfioDma {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        // SAFETY: forwarded caller contract (identical).
        unsafe { self.try_map(cpu, len, direction) }.map_err(DmaError::from)
    }

    /// A refused or short `UNMAP_DMA` is reported (the pool then keeps the
    /// memory), and also counted in [`VfioStats::unmap_errors`].
    unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
        // SAFETY: forwarded caller contract.
        unsafe { self.try_unmap(mapping) }.map_err(UnmapError::from)
    }

    /// As [`unmap`](Self::unmap), merging touching IOVA blocks; every
    /// mapping of a refused or short call is reported.
    unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) -> Result<(), UnmapBatchError> {
        let (_, failed) = self.unmap_runs(mappings);
        let mut error = UnmapBatchError::new();
        for (index, e) in failed {
            error.push(index, UnmapError::from(e));
        }
        error.into_result()
    }

    /// Nothing to do: VFIO devices do cache-coherent DMA straight into the
    /// mapped pages (see the module documentation).
    unsafe fn sync_for_device(&self, _mapping: DmaMapping, _offset: usize, _len: usize) {}

    /// Nothing to do: VFIO devices do cache-coherent DMA straight into the
    /// mapped pages (see the module documentation).
    unsafe fn sync_for_cpu(&self, _mapping: DmaMapping, _offset: usize, _len: usize) {}

    /// `false`: VFIO type1 gives userspace no cache maintenance and no
    /// bounce buffers, so both syncs are no-ops and the pool skips them (and
    /// their call gate) entirely, as Linux skips syncs when
    /// `dma_need_sync()` is false. That is right where DMA snoops the CPU
    /// caches: always on x86 unless the device sets No Snoop in its
    /// requests, which the IOMMU overrides only where
    /// [`cache_coherent`](VfioDma::cache_coherent) is true; elsewhere keep
    /// Enable No Snoop clear ([`VfioDevice::set_bus_master`](super::VfioDevice::set_bus_master)
    /// does).
    fn needs_sync(&self) -> bool {
        false
    }

    /// The IOMMU's smallest page (the lowest bit of `iova_pgsizes`): a pool
    /// whose pages are smaller is refused, since mapping one would expose
    /// the rest of its IOMMU page to the device.
    fn min_page_size(&self) -> Option<usize> {
        usize::try_from(self.inner.page_size).ok()
    }
}

/// The container's `dma_entry_limit`, and whether it is iommufd's type1
/// compatibility layer (`DMA_AVAIL` reads `u32::MAX` there, and it has no
/// limit). Right after `SET_IOMMU` the container is empty, so `DMA_AVAIL`
/// is the limit itself; otherwise the module parameter (`param`) says.
fn entry_limit(
    set_iommu_here: bool,
    dma_avail: Option<u32>,
    param: impl FnOnce() -> Option<u64>,
) -> (Option<u64>, bool) {
    match (set_iommu_here, dma_avail) {
        (_, Some(u32::MAX)) => (None, true),
        (true, Some(avail)) => (Some(u64::from(avail)), false),
        _ => (param(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// iommufd's compatibility layer answers `DMA_AVAIL` with `u32::MAX`:
    /// detected, and never taken for an entry limit.
    #[test]
    fn iommufd_compat_is_detected_and_has_no_entry_limit() {
        assert_eq!(
            entry_limit(true, Some(u32::MAX), || Some(65535)),
            (None, true)
        );
        assert_eq!(
            entry_limit(false, Some(u32::MAX), || Some(65535)),
            (None, true)
        );
        assert_eq!(
            entry_limit(true, Some(65535), || None),
            (Some(65535), false)
        );
        assert_eq!(
            entry_limit(false, Some(100), || Some(64)),
            (Some(64), false)
        );
        assert_eq!(entry_limit(true, None, || None), (None, false));
    }

    #[test]
    fn missing_device_gives_a_typed_error() {
        assert!(matches!(
            VfioDma::open_group_of("ffff:ff:1f.7"),
            Err(VfioError::NoSuchDevice { .. })
        ));
    }

    #[test]
    fn missing_group_node_gives_a_typed_error() {
        match VfioDma::open_group("/dev/vfio/does-not-exist") {
            Err(VfioError::NoVfio { .. } | VfioError::GroupNotFound { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
