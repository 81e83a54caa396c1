//! The violation vocabulary: [`Violation`], one broken rule, and the words
//! its variants are built from: [`Op`] (the call), [`DeviceAccess`] and
//! [`FaultReason`] (for IOMMU faults); plus [`CheckMode`], what the device
//! does when it detects one.
//!
//! Invariants: these are plain values (`Clone`, `Eq`), detached from the
//! device that detected them, so they can be kept, compared and printed
//! after the device is gone. Every `Display` text follows dma-debug's style:
//! one sentence saying who broke which rule, then the details in brackets,
//! so a message reads the same as its kernel counterpart. The enums are
//! `#[non_exhaustive]` where new checks may add variants.

use core::fmt;

use crate::dma::{DmaAddr, DmaDirection, DmaMapping};

#[cfg(doc)]
use super::{CheckingDevice, CheckingDeviceBuilder};
#[cfg(doc)]
use crate::dma::DmaOps;

/// What [`CheckingDevice`] does when it detects a [`Violation`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckMode {
    /// Record the violation, then panic with its text (in the thread that
    /// made the call). The default. A call made while the thread is
    /// already panicking (from a destructor during unwinding) only records,
    /// since a second panic would abort the process.
    #[default]
    Panic,
    /// Record every violation and carry on (fuzzers, demos); inspect them
    /// with [`CheckingDevice::violations`].
    Record,
}

/// The call in which a [`Violation`] was detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// [`DmaOps::map`].
    Map,
    /// [`DmaOps::unmap`].
    Unmap,
    /// [`DmaOps::unmap_batch`].
    UnmapBatch,
    /// [`DmaOps::sync_for_device`].
    SyncForDevice,
    /// [`DmaOps::sync_for_cpu`].
    SyncForCpu,
    /// [`CpuAccessCheck::cpu_access`](super::CpuAccessCheck::cpu_access).
    CpuAccess,
    /// [`DmaOps::on_unbind`].
    OnUnbind,
    /// [`CheckingDevice::device_write`] (the simulated device).
    DeviceWrite,
    /// [`CheckingDevice::device_read`] (the simulated device).
    DeviceRead,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Map => "map",
            Self::Unmap => "unmap",
            Self::UnmapBatch => "unmap_batch",
            Self::SyncForDevice => "sync_for_device",
            Self::SyncForCpu => "sync_for_cpu",
            Self::CpuAccess => "cpu_access",
            Self::OnUnbind => "on_unbind",
            Self::DeviceWrite => "device_write",
            Self::DeviceRead => "device_read",
        })
    }
}

/// Whether the simulated device reads or writes (see [`Violation::IommuFault`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceAccess {
    /// The device reads memory ([`CheckingDevice::device_read`]).
    Read,
    /// The device writes memory ([`CheckingDevice::device_write`]).
    Write,
}

impl fmt::Display for DeviceAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "write",
        })
    }
}

/// Why the simulated IOMMU faulted a device access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultReason {
    /// No live mapping contains the first byte.
    Unmapped,
    /// The access starts inside a mapping but runs past its end.
    PastEnd {
        /// The mapping the access starts in.
        mapping: DmaAddr,
        /// That mapping's length in bytes.
        mapping_len: usize,
    },
    /// The mapping's direction forbids this access (a device write to a
    /// `ToDevice` mapping, a device read of a `FromDevice` one).
    Direction(DmaDirection),
}

impl fmt::Display for FaultReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unmapped => f.write_str("nothing is mapped there"),
            Self::PastEnd {
                mapping,
                mapping_len,
            } => write!(
                f,
                "it runs past the end of the mapping at {mapping} [size={mapping_len} bytes]"
            ),
            Self::Direction(d) => write!(f, "the mapping is {d}"),
        }
    }
}

/// One broken rule, as detected by [`CheckingDevice`].
///
/// The `Display` text follows dma-debug's style: a sentence, then the
/// details in brackets.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// `map` of a zero-length range or of one that wraps the address space.
    InvalidMap {
        /// CPU address of the range.
        cpu_addr: usize,
        /// Its length.
        len: usize,
    },
    /// `map` of CPU memory not aligned to the device's IOMMU page (see
    /// [`CheckingDeviceBuilder::iommu_page`](super::CheckingDeviceBuilder::iommu_page)),
    /// or not a whole number of them: a real IOMMU would map the whole
    /// pages around it, exposing the neighbouring memory to the device.
    MapUnaligned {
        /// CPU address of the range.
        cpu_addr: usize,
        /// Its length.
        len: usize,
        /// The IOMMU page.
        iommu_page: usize,
    },
    /// `map` of CPU memory overlapping the CPU memory of a live mapping.
    MapOverlap {
        /// CPU address of the new range.
        cpu_addr: usize,
        /// Its length.
        len: usize,
        /// The live mapping it overlaps.
        existing: DmaMapping,
        /// That mapping's CPU address.
        existing_cpu_addr: usize,
    },
    /// `unmap` of `DmaAddr::ERROR`.
    UnmapInvalidAddress {
        /// Length given to unmap.
        len: usize,
        /// Direction given to unmap.
        direction: DmaDirection,
    },
    /// `unmap` of an address that was never mapped (or that was unmapped
    /// so long ago it is no longer remembered, or that lies inside a
    /// mapping instead of at its start).
    UnmapNotMapped {
        /// Address given to unmap.
        addr: DmaAddr,
        /// Length given to unmap.
        len: usize,
        /// Direction given to unmap.
        direction: DmaDirection,
    },
    /// `unmap` of an address that was mapped and has already been unmapped.
    DoubleUnmap {
        /// Address given to unmap.
        addr: DmaAddr,
        /// Length given to unmap.
        len: usize,
        /// Direction given to unmap.
        direction: DmaDirection,
    },
    /// `unmap` with a length different from the map's.
    UnmapSizeMismatch {
        /// The mapping's address.
        addr: DmaAddr,
        /// Length it was mapped with.
        mapped_len: usize,
        /// Length given to unmap.
        unmap_len: usize,
    },
    /// `unmap` with a direction different from the map's.
    UnmapDirectionMismatch {
        /// The mapping's address.
        addr: DmaAddr,
        /// Its length.
        len: usize,
        /// Direction it was mapped with.
        mapped: DmaDirection,
        /// Direction given to unmap.
        unmapped: DmaDirection,
    },
    /// A sync or `cpu_access` naming an address that is not the start of a
    /// live mapping.
    NotMapped {
        /// The call.
        op: Op,
        /// Address named.
        addr: DmaAddr,
        /// Offset named.
        offset: usize,
        /// Length named.
        len: usize,
    },
    /// A sync or `cpu_access` whose range does not lie inside the mapping
    /// (partial ranges inside are fine).
    OutOfRange {
        /// The call.
        op: Op,
        /// The mapping's address.
        addr: DmaAddr,
        /// Its recorded length.
        mapped_len: usize,
        /// Offset named.
        offset: usize,
        /// Length named.
        len: usize,
    },
    /// A sync or `cpu_access` passing a `DmaMapping` whose length differs
    /// from the recorded mapping.
    MappingLenMismatch {
        /// The call.
        op: Op,
        /// The mapping's address.
        addr: DmaAddr,
        /// Its recorded length.
        mapped_len: usize,
        /// Length in the `DmaMapping` passed.
        given_len: usize,
    },
    /// A sync or `cpu_access` passing a `DmaMapping` whose direction differs
    /// from the recorded mapping (not checked when the mapping is
    /// `Bidirectional`).
    MappingDirectionMismatch {
        /// The call.
        op: Op,
        /// The mapping's address.
        addr: DmaAddr,
        /// Its recorded direction.
        mapped: DmaDirection,
        /// Direction in the `DmaMapping` passed.
        given: DmaDirection,
    },
    /// `sync_for_cpu` of a `ToDevice` mapping, or `sync_for_device` of a
    /// `FromDevice` mapping (see
    /// [`CheckingDeviceBuilder::strict_sync_directions`]).
    SyncDirectionNotAllowed {
        /// The sync.
        op: Op,
        /// The mapping's address.
        addr: DmaAddr,
        /// Its length.
        len: usize,
        /// Its recorded direction.
        direction: DmaDirection,
    },
    /// The CPU is about to read bytes the device wrote that were not yet
    /// synced for the CPU (it would see stale data on real hardware).
    CpuReadBeforeSync {
        /// The mapping's address.
        addr: DmaAddr,
        /// Offset of the read.
        offset: usize,
        /// Length of the read.
        len: usize,
        /// Offset (in the mapping) of the first unsynced byte.
        first_unsynced: usize,
    },
    /// The simulated device read bytes the CPU wrote (as told through
    /// `cpu_access(.., Write)`) that were not yet synced for the device.
    DeviceReadBeforeSync {
        /// Device address of the read.
        addr: DmaAddr,
        /// Length of the read.
        len: usize,
        /// Device address of the first unsynced byte.
        first_unsynced: DmaAddr,
    },
    /// The simulated device accessed memory the IOMMU does not allow.
    IommuFault {
        /// Device address of the access.
        addr: DmaAddr,
        /// Its length.
        len: usize,
        /// Read or write.
        access: DeviceAccess,
        /// Why it faulted.
        reason: FaultReason,
    },
    /// Any call after `on_unbind` (including a second `on_unbind`).
    CallAfterUnbind {
        /// The call.
        op: Op,
    },
    /// `on_unbind` while mappings are still live.
    Leak {
        /// How many mappings were live.
        count: usize,
        /// One of them (the lowest address).
        example: DmaMapping,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidMap { cpu_addr, len } => write!(
                f,
                "device driver maps an invalid CPU range [cpu address={cpu_addr:#x}] [size={len} bytes]"
            ),
            Self::MapUnaligned {
                cpu_addr,
                len,
                iommu_page,
            } => write!(
                f,
                "device driver maps CPU memory not aligned to the {iommu_page}-byte IOMMU page \
                 [cpu address={cpu_addr:#x}] [size={len} bytes]"
            ),
            Self::MapOverlap {
                cpu_addr,
                len,
                existing,
                existing_cpu_addr,
            } => write!(
                f,
                "device driver maps CPU memory that overlaps a live mapping \
                 [cpu address={cpu_addr:#x}] [size={len} bytes] \
                 [live mapping: device address={} cpu address={existing_cpu_addr:#x} size={} bytes {}]",
                existing.addr, existing.len, existing.direction
            ),
            Self::UnmapInvalidAddress { len, direction } => write!(
                f,
                "device driver unmaps the invalid DMA address DMA_MAPPING_ERROR \
                 [size={len} bytes] [direction={direction}]"
            ),
            Self::UnmapNotMapped {
                addr,
                len,
                direction,
            } => write!(
                f,
                "device driver unmaps DMA memory it never mapped \
                 [device address={addr}] [size={len} bytes] [direction={direction}]"
            ),
            Self::DoubleUnmap {
                addr,
                len,
                direction,
            } => write!(
                f,
                "device driver unmaps DMA memory that is already unmapped (double unmap) \
                 [device address={addr}] [size={len} bytes] [direction={direction}]"
            ),
            Self::UnmapSizeMismatch {
                addr,
                mapped_len,
                unmap_len,
            } => write!(
                f,
                "device driver unmaps DMA memory with a size different from the map \
                 [device address={addr}] [map size={mapped_len} bytes] [unmap size={unmap_len} bytes]"
            ),
            Self::UnmapDirectionMismatch {
                addr,
                len,
                mapped,
                unmapped,
            } => write!(
                f,
                "device driver unmaps DMA memory with a direction different from the map \
                 [device address={addr}] [size={len} bytes] [mapped as {mapped}] [unmapped as {unmapped}]"
            ),
            Self::NotMapped {
                op,
                addr,
                offset,
                len,
            } => write!(
                f,
                "device driver calls {op} on DMA memory that is not mapped \
                 [device address={addr}] [offset={offset}] [size={len} bytes]"
            ),
            Self::OutOfRange {
                op,
                addr,
                mapped_len,
                offset,
                len,
            } => write!(
                f,
                "device driver calls {op} outside the mapped range \
                 [device address={addr}] [mapping size={mapped_len} bytes] \
                 [offset={offset}] [size={len} bytes]"
            ),
            Self::MappingLenMismatch {
                op,
                addr,
                mapped_len,
                given_len,
            } => write!(
                f,
                "device driver calls {op} with a mapping of a different size \
                 [device address={addr}] [mapped size={mapped_len} bytes] [given size={given_len} bytes]"
            ),
            Self::MappingDirectionMismatch {
                op,
                addr,
                mapped,
                given,
            } => write!(
                f,
                "device driver calls {op} with a different direction \
                 [device address={addr}] [mapped as {mapped}] [given as {given}]"
            ),
            Self::SyncDirectionNotAllowed {
                op,
                addr,
                len,
                direction,
            } => {
                let why = if *op == Op::SyncForCpu {
                    "the device never writes it"
                } else {
                    "the device never reads it"
                };
                write!(
                    f,
                    "device driver calls {op} on a {direction} mapping, but {why} \
                     [device address={addr}] [size={len} bytes]"
                )
            }
            Self::CpuReadBeforeSync {
                addr,
                offset,
                len,
                first_unsynced,
            } => write!(
                f,
                "CPU reads DMA memory the device wrote before sync_for_cpu \
                 [device address={addr}] [offset={offset}] [size={len} bytes] \
                 [first unsynced byte at offset {first_unsynced}]"
            ),
            Self::DeviceReadBeforeSync {
                addr,
                len,
                first_unsynced,
            } => write!(
                f,
                "device reads DMA memory the CPU wrote before sync_for_device \
                 [device address={addr}] [size={len} bytes] [first unsynced byte at {first_unsynced}]"
            ),
            Self::IommuFault {
                addr,
                len,
                access,
                reason,
            } => write!(
                f,
                "IOMMU fault: device {access} [device address={addr}] [size={len} bytes] \
                 refused because {reason}"
            ),
            Self::CallAfterUnbind { op } => write!(
                f,
                "device driver calls {op} after the device was released (on_unbind)"
            ),
            Self::Leak { count, example } => write!(
                f,
                "device driver has pending DMA allocations while released from device [count={count}]\n\
                 One leaked entry: [device address={}] [size={} bytes] [direction={}]",
                example.addr, example.len, example.direction
            ),
        }
    }
}

impl std::error::Error for Violation {}
