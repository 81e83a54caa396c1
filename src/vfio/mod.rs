//! A [`DmaOps`] backend over Linux VFIO (type1 IOMMU), for userspace
//! drivers of real PCI devices.
//!
//! Enabled by the `vfio` feature, on Linux only.
//!
//! - [`VfioDma`] owns a VFIO container with one group in it and implements
//!   [`DmaOps`]: `map` is `VFIO_IOMMU_MAP_DMA` at an IOVA this backend picks
//!   from the IOMMU's valid ranges, `unmap` is `VFIO_IOMMU_UNMAP_DMA` with
//!   the exact IOVA and size, and a refused or short unmap is reported to
//!   the pool (which then keeps the memory). It is a cheap handle (clones
//!   share one container), so one clone can go to the pool while you keep
//!   another to read [`dma_avail`](VfioDma::dma_avail) and
//!   [`stats`](VfioDma::stats).
//! - One `VfioDma` per container: its IOVA allocator must be the only one
//!   in that IOVA space. A second handle on the same container (from
//!   duplicated fds through [`VfioDma::from_fds`]) or a second group in it
//!   is refused with [`VfioError::ContainerShared`]: clone the handle
//!   instead, and give another group a container of its own.
//! - [`VfioDevice`] is the device file descriptor of one PCI function in
//!   that group, for its BARs ([`VfioDevice::map_region`]) and its config
//!   space ([`VfioDevice::read_config`]).
//! - [`VfioDevice::request_notifier`] arms the device request interrupt
//!   with an eventfd ([`DeviceNotifier`]): the kernel signals it when it
//!   wants the device back (hot-unplug, `remove` or unbind in sysfs) and
//!   waits until the user closes the device; see "Removal" below.
//!
//! ```no_run
//! # fn main() -> Result<(), pagepool::vfio::VfioError> {
//! use pagepool::vfio::VfioDevice;
//!
//! // The NIC must be bound to vfio-pci first.
//! let device = VfioDevice::open("0000:00:02.0")?;
//! let dma = device.dma().clone(); // give this to the pool
//! println!("{} mappings left", dma.dma_avail()?);
//! device.set_bus_master(true)?;
//! let bar0 = device.map_region(pagepool::vfio::BAR0_REGION_INDEX)?;
//! let status = bar0.read32(0x0008);
//! # let _ = status; Ok(()) }
//! ```
//!
//! # Directions
//!
//! VFIO's `READ` flag means the device may read the memory, `WRITE` that it
//! may write it. `ToDevice` maps `READ` only, `FromDevice` `WRITE` only (as
//! Linux's DMA API does; should an IOMMU refuse write-only mappings with
//! `EINVAL`, the backend retries once with both flags and keeps doing so),
//! `Bidirectional` both.
//!
//! # Sync is a no-op
//!
//! `sync_for_device` and `sync_for_cpu` do nothing: VFIO gives user space
//! no cache maintenance and no bounce buffers, and the device reads and
//! writes the very pages the CPU uses. That is right where DMA snoops the
//! CPU caches, as on x86, unless the device marks requests No Snoop: the
//! IOMMU overrides that only when it enforces coherency
//! ([`VfioDma::cache_coherent`], `VFIO_DMA_CC_IOMMU`; Intel's emulated VT-d
//! does not), so [`VfioDevice::set_bus_master`] clears the device's Enable
//! No Snoop there ([`VfioDevice::set_no_snoop`]). Ordering between CPU
//! accesses and the device is the driver's part, as in the kernel: a
//! volatile MMIO doorbell write after filling descriptors, and a volatile
//! read of the descriptor's done bit before reading the buffer
//! ([`MmioRegion`] orders them as Linux's `writel`/`readl` on x86-64 and
//! arm64).
//!
//! # Alignment and read-only pins
//!
//! `map` maps exactly what it is given: memory not aligned to the IOMMU's
//! smallest page ([`VfioDma::page_size`]), or not a whole number of them,
//! is refused with [`VfioError::Unaligned`] (`DmaError::Unaligned` through
//! [`DmaOps`]), never widened to the pages around it, which the device
//! could then reach. The pool allocates page and region memory aligned to
//! the IOMMU page. Memory the device only reads (`ToDevice`) is faulted in
//! for writing (`MADV_POPULATE_WRITE`) before `MAP_DMA`: Linux before 6.2
//! (Debian 12's 6.1 among them) pins the shared zero page for memory never
//! written, and the device would then transmit zeros whatever the CPU
//! writes later. On kernels without that advice (before 5.14) such
//! mappings are made readable and writable instead.
//!
//! # Limits you will meet
//!
//! - Each `MAP_DMA` uses one entry of the container's `dma_entry_limit`
//!   (65535 by default), whatever its size. A pool mapped page by page
//!   spends one entry per 4 KiB page, so it maps at most 256 MiB; past it
//!   `map` fails with [`DmaError::MappingLimit`] (the pool's
//!   `AllocError::Map(DmaError::MappingLimit { .. })`). A region-mapped
//!   pool ([`PagePoolBuilder::regions`]) spends one entry per 2 MiB region
//!   of 512 pages, so the same limit holds 128 GiB, and the slow path and
//!   `unbind` make one `MAP_DMA` and one unmap per region instead of per
//!   page. Otherwise raise the `vfio_iommu_type1` module parameter
//!   `dma_entry_limit` (writable at run time; a container takes the value
//!   in force when it is set up).
//! - Mapped pages are pinned and count against `RLIMIT_MEMLOCK` unless the
//!   process has `CAP_IPC_LOCK`; past it `map` fails with
//!   [`DmaError::LockedMemoryLimit`]. A region is pinned whole, its free
//!   pages too, from its first page handed out until the pool is dropped or
//!   the device unbound.
//! - The IOMMU maps whole pages of its smallest page size
//!   ([`VfioDma::page_size`], reported to the pool as
//!   [`DmaOps::min_page_size`]; 4 KiB with Intel's and AMD's IOMMUs). A
//!   pool mapped page by page whose pages are smaller is refused with
//!   [`BuildError::PageBelowIommuPage`], since the device would reach the
//!   rest of the IOMMU page; a region must be a multiple of it.
//! - [`VfioDma::dma_avail`] reads the kernel's own count of entries left
//!   (`DMA_AVAIL`, Linux 5.10+): the exact oracle for a leak check. Under
//!   iommufd's type1 compatibility layer it reads `u32::MAX` and means
//!   nothing (no `dma_entry_limit` either): the backend detects that
//!   ([`VfioDma::is_iommufd_compat`]) and `dma_avail` then fails with
//!   [`VfioError::Unsupported`].
//!
//! # Regions and huge pages
//!
//! A region-mapped pool takes its regions from
//! [`SystemRegions`](crate::SystemRegions) by default: reserved huge pages
//! (`MAP_HUGETLB`) where the system has them (`vm.nr_hugepages`, or
//! `hugepages=` on the kernel command line), else memory aligned to 2 MiB
//! with transparent huge pages requested. Either way a 2 MiB region is
//! usually physically contiguous, and this backend hands it a 2 MiB-aligned
//! IOVA, so the IOMMU can map it with one 2 MiB page where it supports
//! them (bit 21 of [`VfioDma::page_sizes`]). `unbind` unmaps every region
//! once, in as few `UNMAP_DMA` calls as touching IOVA ranges allow, and
//! pages held outside the pool stay valid memory.
//!
//! # Soundness
//!
//! Nothing here ever creates a Rust reference (`&[u8]`, `&mut [u8]`) to
//! memory the device may write, nor to device registers: `map` takes a raw
//! pointer and the caller's `unsafe` promise (see [`DmaOps::map`]), and
//! [`MmioRegion`] offers volatile reads and writes only.
//!
//! # Lifetimes
//!
//! The last [`VfioDma`] handle (clones, and the one inside each
//! [`VfioDevice`]) removes every mapping still in the container when it is
//! dropped (`VFIO_IOMMU_UNMAP_DMA` with `VFIO_DMA_UNMAP_FLAG_ALL`, Linux
//! 5.13 and later), then closes the group and the container fds. Closing
//! the fds alone would not be enough while anything else holds the files:
//! a live [`MmioRegion`] (it holds its device's fd, so it stays valid; the
//! device, and so its group, stays open until it is dropped), an fd
//! duplicated elsewhere, or a forked child. On kernels before 5.13 the
//! mappings go only when the last of those goes. A pool's [`Device`]
//! holds a handle until it is unbound.
//!
//! # Removal: when the kernel wants the device back
//!
//! On hot-unplug, `echo 1 > /sys/bus/pci/devices/<bdf>/remove` or an
//! unbind from vfio-pci, the kernel signals the device request
//! ([`REQ_IRQ_INDEX`], armed by [`VfioDevice::request_notifier`]), logs
//! "Relaying device request to user (#0)", and blocks the removal until
//! every fd of the device is closed, repeating the signal and the log line
//! every 10 s. The driver's answer, in this order: stop the device's DMA
//! (and wait, bounded, for it to go quiet; clear Bus Master Enable if it
//! would not), take its ring buffers back, [`Device::unbind`] (every
//! mapping of every pool on the device removed before it returns, pages
//! held elsewhere stay valid memory), free what the driver mapped itself
//! (descriptor rings), then drop every [`VfioDevice`], [`MmioRegion`] and
//! [`VfioDma`] handle. The kernel then finishes the removal at once. The
//! notifier holds none of those, so the thread waiting on it never keeps
//! the device. [`VfioDevice::error_notifier`] arms the PCI error interrupt
//! the same way, on PCI Express devices.
//!
//! # Parts
//!
//! - `container`: [`VfioDma`] (the container, its group and its
//!   [`DmaOps`]) and [`VfioStats`].
//! - `device`: [`VfioDevice`] and [`MmioRegion`].
//! - `irq`: [`DeviceNotifier`], the device request and error interrupts
//!   delivered to an eventfd.
//! - `info`: `VFIO_IOMMU_GET_INFO` and its capability chain, [`IommuInfo`].
//! - `iova`: the IOVA allocator over the valid [`IovaRange`]s (with the
//!   quarantine of freed IOVAs and the validation of the kernel's ranges).
//! - `pin`: what is checked and done before memory is pinned: alignment to
//!   the IOMMU page, populating memory the device only reads. Shared by any
//!   VFIO backend (an iommufd one pins the same way).
//! - `ioctl`: the ioctl helpers and the call counters they bump.
//! - `sysfs`: BDFs, IOMMU groups and limits, read from the host.
//! - `error`: [`VfioError`], what went wrong and what to do about it.
//! - `sys`: the VFIO kernel ABI, written out by hand.

mod container;
mod device;
mod error;
mod info;
mod ioctl;
mod irq;
mod pin;
mod sys;
mod sysfs;

pub use crate::iova::IovaRange;
pub use container::{VfioDma, VfioStats, CONTAINER_PATH};
pub use device::{MmioRegion, RegionInfo, VfioDevice, BAR0_REGION_INDEX, CONFIG_REGION_INDEX};
pub use error::{VfioError, DEFAULT_DMA_ENTRY_LIMIT, DMA_ENTRY_LIMIT_PARAM};
pub use info::IommuInfo;
pub use irq::{DeviceNotifier, IrqInfo, ERR_IRQ_INDEX, REQ_IRQ_INDEX};

#[cfg(doc)]
use crate::{BuildError, Device, DmaError, DmaOps, PagePoolBuilder};
