//! A strict checking [`DmaOps`](crate::DmaOps) backend: [`CheckingDevice`].
//!
//! `CheckingDevice` behaves like a device behind an IOMMU, with no hardware.
//! It hands out its own device addresses, keeps a device-side shadow copy of
//! every mapping, and checks every call against the rules of the DMA API. It
//! catches everything Linux's dma-debug (`CONFIG_DMA_API_DEBUG`) catches for
//! single mappings, plus what dma-debug cannot see: any call after the
//! device was unbound, device accesses where nothing is mapped (IOMMU
//! faults), the CPU reading device-written data before `sync_for_cpu`, and
//! the device reading CPU-written data before `sync_for_device`.
//!
//! Drivers and pools use it in tests, loom models and fuzzers; a test plays
//! the device with [`CheckingDevice::device_write`] and
//! [`CheckingDevice::device_read`], and inspects the result with
//! [`violations`](CheckingDevice::violations),
//! [`verdict`](CheckingDevice::verdict) and
//! [`report`](CheckingDevice::report). Every detected problem is a
//! [`Violation`]; in [`CheckMode::Panic`] the first one panics with its
//! text, in [`CheckMode::Record`] all are recorded.
//!
//! The CPU side is checked through a hook that is not part of
//! [`DmaOps`](crate::DmaOps): [`CpuAccessCheck`], which `CheckingDevice`
//! implements. A [`Device`](crate::Device) bound straight on a
//! `CheckingDevice` (`Device::new(checker.clone())`) uses it for every page
//! and fragment access; a test that wraps the checking device in a `DmaOps`
//! of its own binds with
//! [`Device::with_cpu_access_check`](crate::Device::with_cpu_access_check)
//! instead. See [`CpuAccessCheck`] for the rules.
//!
//! Region-mapped pools need nothing special: a region is one mapping, a
//! page's sync or CPU access is a sub-range of it, and the device may reach
//! any byte of a live region, including pages sitting free in the pool
//! (that is what one mapping per region means). An access outside every
//! live mapping faults, and after unbind nothing of a region is reachable.
//!
//! # The checks
//!
//! | Call | Violation |
//! |---|---|
//! | `map` | [`InvalidMap`](Violation::InvalidMap) (zero or wrapping length), [`MapUnaligned`](Violation::MapUnaligned) (not aligned to the IOMMU page set with [`CheckingDeviceBuilder::iommu_page`]), [`MapOverlap`](Violation::MapOverlap) (CPU memory overlaps a live mapping) |
//! | `unmap`, `unmap_batch` | [`UnmapInvalidAddress`](Violation::UnmapInvalidAddress), [`UnmapNotMapped`](Violation::UnmapNotMapped), [`DoubleUnmap`](Violation::DoubleUnmap), [`UnmapSizeMismatch`](Violation::UnmapSizeMismatch), [`UnmapDirectionMismatch`](Violation::UnmapDirectionMismatch) |
//! | `sync_for_cpu`, `sync_for_device`, `cpu_access` | [`NotMapped`](Violation::NotMapped), [`OutOfRange`](Violation::OutOfRange), [`MappingLenMismatch`](Violation::MappingLenMismatch), [`MappingDirectionMismatch`](Violation::MappingDirectionMismatch) |
//! | `sync_for_cpu`, `sync_for_device` | [`SyncDirectionNotAllowed`](Violation::SyncDirectionNotAllowed) (for-CPU sync of a `ToDevice` mapping, for-device sync of a `FromDevice` mapping; opt-in with [`CheckingDeviceBuilder::strict_sync_directions`]) |
//! | `cpu_access(Read)` ([`CpuAccessCheck`]) | [`CpuReadBeforeSync`](Violation::CpuReadBeforeSync) |
//! | `device_read`, `device_write` | [`IommuFault`](Violation::IommuFault), [`DeviceReadBeforeSync`](Violation::DeviceReadBeforeSync) |
//! | `on_unbind` | [`Leak`](Violation::Leak) (mappings still live) |
//! | anything after `on_unbind` | [`CallAfterUnbind`](Violation::CallAfterUnbind) |
//!
//! # Parts
//!
//! Each part's module documentation states the invariants it keeps.
//!
//! - `violation`: the vocabulary: [`Violation`], [`Op`], [`DeviceAccess`],
//!   [`FaultReason`] and their dma-debug-style texts, and [`CheckMode`].
//! - `report`: what the device tells about itself: [`CheckingStats`],
//!   [`LiveMapping`], [`Verdict`] and the text of
//!   [`report`](CheckingDevice::report).
//! - `model`: the simulated IOMMU behind the lock: the IOVA space
//!   ([`IOVA_BASE`]..[`IOVA_END`]), the live and retired mappings, the
//!   device-side shadows and per-byte sync marks, and every check. It keeps
//!   the memory-access, address, live-set, shadow and unbind invariants.
//! - `cpu_access`: the CPU-access hook, [`CpuAccessCheck`] and
//!   [`CpuAccess`], and how a device picks its check.
//! - `device`: the handle, [`CheckingDevice`], its builder, and its
//!   [`DmaOps`](crate::DmaOps) and [`CpuAccessCheck`] impls: one lock per
//!   call, the call delay, and the panic of [`CheckMode::Panic`]. It keeps
//!   the concurrency invariant.

mod cpu_access;
mod device;
mod model;
mod report;
mod violation;

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests;

pub(crate) use cpu_access::detect;
pub use cpu_access::{CpuAccess, CpuAccessCheck};
pub use device::{CheckingDevice, CheckingDeviceBuilder};
pub use model::{
    DEFAULT_RETIRED_CAPACITY, IOVA_BASE, IOVA_END, IOVA_PAGE, MAX_RECORDED_VIOLATIONS,
};
pub use report::{CheckingStats, LiveMapping, Verdict};
pub use violation::{CheckMode, DeviceAccess, FaultReason, Op, Violation};
