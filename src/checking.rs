//! A strict checking [`DmaOps`] backend: [`CheckingDevice`].
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
//! # The checks
//!
//! | Call | Violation |
//! |---|---|
//! | `map` | [`InvalidMap`](Violation::InvalidMap) (zero or wrapping length), [`MapOverlap`](Violation::MapOverlap) (CPU memory overlaps a live mapping) |
//! | `unmap`, `unmap_batch` | [`UnmapInvalidAddress`](Violation::UnmapInvalidAddress), [`UnmapNotMapped`](Violation::UnmapNotMapped), [`DoubleUnmap`](Violation::DoubleUnmap), [`UnmapSizeMismatch`](Violation::UnmapSizeMismatch), [`UnmapDirectionMismatch`](Violation::UnmapDirectionMismatch) |
//! | `sync_for_cpu`, `sync_for_device`, `cpu_access` | [`NotMapped`](Violation::NotMapped), [`OutOfRange`](Violation::OutOfRange), [`MappingLenMismatch`](Violation::MappingLenMismatch), [`MappingDirectionMismatch`](Violation::MappingDirectionMismatch) |
//! | `sync_for_cpu`, `sync_for_device` | [`SyncDirectionNotAllowed`](Violation::SyncDirectionNotAllowed) (for-CPU sync of a `ToDevice` mapping, for-device sync of a `FromDevice` mapping; opt-in with [`CheckingDeviceBuilder::strict_sync_directions`]) |
//! | `cpu_access(Read)` | [`CpuReadBeforeSync`](Violation::CpuReadBeforeSync) |
//! | `device_read`, `device_write` | [`IommuFault`](Violation::IommuFault), [`DeviceReadBeforeSync`](Violation::DeviceReadBeforeSync) |
//! | `on_unbind` | [`Leak`](Violation::Leak) (mappings still live) |
//! | anything after `on_unbind` | [`CallAfterUnbind`](Violation::CallAfterUnbind) |
//!
//! # Invariants
//!
//! - **Memory access.** CPU memory is read only by `map` (to fill the shadow
//!   of a `ToDevice`/`Bidirectional` mapping) and by `sync_for_device`, and
//!   written only by `sync_for_cpu`; each time only inside a range the
//!   checker has verified to lie in a mapping that is live in its own
//!   records. `unmap`, `unmap_batch`, `cpu_access`, `on_unbind` and the
//!   simulated device never touch CPU memory. A call that violates the
//!   contract is reported and has no effect on memory, so the checker stays
//!   sound even when the code under test is not; it relies only on the
//!   [`DmaOps::map`] contract (the memory stays valid until its unmap) and
//!   on the sync contract (no CPU reference to the range during a sync).
//! - **Addresses.** Device addresses come from a bump allocator starting at
//!   [`IOVA_BASE`]; each mapping starts on a 4096-byte boundary and is
//!   followed by at least one unmapped guard page, `DmaAddr::ERROR` is
//!   never returned, and an address is never reused. The last
//!   `retired_capacity` (default [`DEFAULT_RETIRED_CAPACITY`]) unmapped
//!   mappings are remembered, so a second unmap of one of them is reported
//!   precisely as a [`DoubleUnmap`](Violation::DoubleUnmap).
//! - **Live set.** Live mappings never overlap in CPU memory: an
//!   overlapping `map` is reported and refused with [`DmaError::Overlap`].
//! - **Shadow.** Each live mapping has a device-side copy of its bytes. The
//!   device reads and writes only the shadow; the CPU sees device data only
//!   after `sync_for_cpu`, the device sees CPU data only after `map` or
//!   `sync_for_device`. Per byte the checker remembers "written by the
//!   device, not yet synced for the CPU" and "written by the CPU (as told
//!   through `cpu_access`), not yet synced for the device".
//! - **Unbind.** After `on_unbind` the device is dead: every call is a
//!   [`CallAfterUnbind`](Violation::CallAfterUnbind) and does nothing else
//!   (`map` returns [`DmaError::Unbound`]). Mappings still live at unbind
//!   stay listed for inspection but their memory is never touched again.
//! - **Concurrency.** All state sits behind one lock from
//!   `crate::sync`, so the device is `Send + Sync` and is modelled
//!   faithfully under loom. With a call delay, a call pauses (outside the
//!   lock) before it takes effect and again after, which widens both race
//!   windows; under loom a pause is a yield.

use core::fmt;
use core::ops::Range;
use core::ptr::NonNull;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::dma::{CpuAccess, DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps};
use crate::sync::{pause, Arc, Mutex};

/// The first device address [`CheckingDevice`] hands out.
pub const IOVA_BASE: u64 = 0x1_0000_0000;

/// The end (exclusive) of [`CheckingDevice`]'s device address space: a
/// 48-bit IOMMU.
pub const IOVA_END: u64 = 1 << 48;

/// Alignment of every device address [`CheckingDevice`] hands out.
pub const IOVA_PAGE: u64 = 4096;

/// How many unmapped mappings are remembered for double-unmap detection,
/// unless the builder says otherwise.
pub const DEFAULT_RETIRED_CAPACITY: usize = 1 << 20;

/// At most this many violations are kept for inspection; further ones are
/// still counted in [`CheckingStats::violations`].
pub const MAX_RECORDED_VIOLATIONS: usize = 1 << 16;

/// Per-byte mark: the device wrote the byte, the CPU has not synced it yet.
const DEVICE_DIRTY: u8 = 1;
/// Per-byte mark: the CPU wrote the byte, the device has not synced it yet.
const CPU_DIRTY: u8 = 2;

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
    /// [`DmaOps::cpu_access`].
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

/// Counters of a [`CheckingDevice`], from [`CheckingDevice::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckingStats {
    /// Successful maps.
    pub maps: u64,
    /// Maps that returned an error (injected, refused or after unbind).
    pub map_failures: u64,
    /// Of `map_failures`, those injected on purpose.
    pub injected_failures: u64,
    /// Mappings named for unmapping while bound (each `unmap` call and each
    /// element of an `unmap_batch`), including bad ones.
    pub unmaps: u64,
    /// `unmap_batch` calls while bound.
    pub batch_unmaps: u64,
    /// `sync_for_device` calls while bound.
    pub syncs_for_device: u64,
    /// `sync_for_cpu` calls while bound.
    pub syncs_for_cpu: u64,
    /// `cpu_access` calls while bound.
    pub cpu_accesses: u64,
    /// `device_write` calls while bound.
    pub device_writes: u64,
    /// `device_read` calls while bound.
    pub device_reads: u64,
    /// Calls of any kind after `on_unbind`.
    pub calls_after_unbind: u64,
    /// Violations detected (including any beyond
    /// [`MAX_RECORDED_VIOLATIONS`] that were not kept).
    pub violations: u64,
    /// The most mappings live at once.
    pub peak_live_mappings: u64,
}

/// One live mapping, from [`CheckingDevice::live_mapping_list`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LiveMapping {
    /// The mapping as `map` returned it.
    pub mapping: DmaMapping,
    /// Address of its CPU memory.
    pub cpu_addr: usize,
    /// Bytes the device wrote that were not yet synced for the CPU.
    pub unsynced_device_bytes: usize,
}

/// A one-line summary of a [`CheckingDevice`], from
/// [`CheckingDevice::verdict`]; `Display` gives e.g.
/// `"0 violations, 0 live mappings"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verdict {
    /// Violations detected so far.
    pub violations: u64,
    /// Mappings live now.
    pub live_mappings: usize,
    /// Whether `on_unbind` was called.
    pub unbound: bool,
}

impl Verdict {
    /// No violation was detected. (Live mappings before unbind are normal;
    /// live mappings at unbind are a [`Violation::Leak`].)
    pub fn is_clean(&self) -> bool {
        self.violations == 0
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = if self.violations == 1 { "" } else { "s" };
        let m = if self.live_mappings == 1 { "" } else { "s" };
        write!(
            f,
            "{} violation{v}, {} live mapping{m}",
            self.violations, self.live_mappings
        )?;
        if self.unbound {
            f.write_str(" (unbound)")?;
        }
        Ok(())
    }
}

/// Builds a [`CheckingDevice`] with non-default settings; from
/// [`CheckingDevice::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct CheckingDeviceBuilder {
    mode: CheckMode,
    call_delay: Duration,
    mapping_limit: Option<usize>,
    fail_every: u64,
    strict_sync_directions: bool,
    retired_capacity: usize,
}

impl CheckingDeviceBuilder {
    /// What to do on a violation (default [`CheckMode::Panic`]).
    pub fn mode(mut self, mode: CheckMode) -> Self {
        self.mode = mode;
        self
    }

    /// Delay of every `DmaOps` call (see [`CheckingDevice::set_call_delay`]).
    pub fn call_delay(mut self, delay: Duration) -> Self {
        self.call_delay = delay;
        self
    }

    /// Refuse maps with [`DmaError::MappingLimit`] while `limit` mappings
    /// are live (VFIO's `dma_entry_limit`). Default: no limit.
    pub fn mapping_limit(mut self, limit: usize) -> Self {
        self.mapping_limit = Some(limit);
        self
    }

    /// Fail every `k`-th map (see [`CheckingDevice::fail_maps_every`]).
    pub fn fail_maps_every(mut self, k: u64) -> Self {
        self.fail_every = k;
        self
    }

    /// Whether a `sync_for_cpu` of a `ToDevice` mapping and a
    /// `sync_for_device` of a `FromDevice` mapping are violations (default
    /// `false`, as in dma-debug, whose `check_sync` reports these only
    /// together with a direction mismatch: Linux's page_pool syncs its
    /// `FROM_DEVICE` pages for the device on every recycle). When `false`
    /// such syncs are accepted as pure ownership transfers that copy no data;
    /// `true` makes the checker stricter than dma-debug.
    pub fn strict_sync_directions(mut self, strict: bool) -> Self {
        self.strict_sync_directions = strict;
        self
    }

    /// How many unmapped mappings to remember for double-unmap detection
    /// (default [`DEFAULT_RETIRED_CAPACITY`]); older ones are forgotten
    /// first, and a repeated unmap of a forgotten one is reported as
    /// [`Violation::UnmapNotMapped`].
    pub fn retired_capacity(mut self, capacity: usize) -> Self {
        self.retired_capacity = capacity;
        self
    }

    /// Creates the device.
    pub fn build(self) -> CheckingDevice {
        let state = State {
            mode: self.mode,
            call_delay: self.call_delay,
            mapping_limit: self.mapping_limit,
            fail_next: 0,
            fail_every: self.fail_every,
            map_attempts: 0,
            strict_sync_directions: self.strict_sync_directions,
            retired_capacity: self.retired_capacity,
            next_iova: IOVA_BASE,
            live: BTreeMap::new(),
            by_cpu: BTreeMap::new(),
            retired: BTreeSet::new(),
            retired_order: VecDeque::new(),
            violations: Vec::new(),
            panic_message: None,
            stats: CheckingStats::default(),
            unbound: false,
        };
        CheckingDevice {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
            }),
        }
    }
}

impl Default for CheckingDeviceBuilder {
    fn default() -> Self {
        Self {
            mode: CheckMode::Panic,
            call_delay: Duration::ZERO,
            mapping_limit: None,
            fail_every: 0,
            strict_sync_directions: false,
            retired_capacity: DEFAULT_RETIRED_CAPACITY,
        }
    }
}

/// A strict checking [`DmaOps`] backend with a simulated device; see the
/// [module documentation](self).
///
/// A cheap `Clone` handle: all clones share one device, so a test keeps a
/// clone for inspection and playing the device while another serves as a
/// pool's `DmaOps`.
#[derive(Clone)]
pub struct CheckingDevice {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
}

/// A CPU pointer given to `map`, kept while the mapping is live.
struct CpuPtr(NonNull<u8>);

// SAFETY: the `DmaOps::map` contract says the memory stays valid, and is
// handed to no one else, until the mapping is unmapped, and every `DmaOps`
// method may be called from any thread. The pointer is dereferenced only
// under the state lock, while the mapping is live in the checker's records
// (see the module's "Memory access" invariant), so moving it between
// threads is sound.
unsafe impl Send for CpuPtr {}

/// The checker's record of one live mapping.
struct Entry {
    len: usize,
    direction: DmaDirection,
    cpu: CpuPtr,
    /// The device's copy of the bytes.
    shadow: Vec<u8>,
    /// Per-byte `DEVICE_DIRTY` / `CPU_DIRTY` marks; empty while all clear.
    marks: Vec<u8>,
}

impl Entry {
    fn mapping(&self, addr: u64) -> DmaMapping {
        DmaMapping {
            addr: DmaAddr(addr),
            len: self.len,
            direction: self.direction,
        }
    }

    fn set_marks(&mut self, range: Range<usize>, flag: u8) {
        if range.is_empty() {
            return;
        }
        if self.marks.is_empty() {
            self.marks = vec![0; self.len];
        }
        for m in &mut self.marks[range] {
            *m |= flag;
        }
    }

    fn clear_marks(&mut self, range: Range<usize>, flag: u8) {
        if self.marks.is_empty() {
            return;
        }
        for m in &mut self.marks[range] {
            *m &= !flag;
        }
    }

    fn first_marked(&self, range: Range<usize>, flag: u8) -> Option<usize> {
        if self.marks.is_empty() {
            return None;
        }
        let start = range.start;
        self.marks[range]
            .iter()
            .position(|m| m & flag != 0)
            .map(|i| start + i)
    }

    fn count_marked(&self, flag: u8) -> usize {
        self.marks.iter().filter(|m| **m & flag != 0).count()
    }

    /// Copies CPU memory into the shadow for `range`.
    ///
    /// # Safety
    /// The entry is live in the checker's records, `range` lies inside it,
    /// and no CPU reference to that memory exists during the call (`map`
    /// and `sync_for_device` contracts).
    unsafe fn copy_from_cpu(&mut self, range: Range<usize>) {
        let n = range.len();
        // SAFETY: by the caller's promise the mapping is live, so by the
        // `DmaOps::map` contract `cpu..cpu+len` is valid memory; `range` is
        // inside `0..len`, and no CPU reference aliases it during this call.
        // The shadow is our own allocation of `len` bytes, so the two do not
        // overlap.
        unsafe {
            let src = self.cpu.0.as_ptr().add(range.start);
            let dst = self.shadow.as_mut_ptr().add(range.start);
            core::ptr::copy_nonoverlapping(src, dst, n);
        }
    }

    /// Copies the shadow into CPU memory for `range`.
    ///
    /// # Safety
    /// The entry is live in the checker's records, `range` lies inside it,
    /// and no CPU reference to that memory exists during the call
    /// (`sync_for_cpu` contract).
    unsafe fn copy_to_cpu(&mut self, range: Range<usize>) {
        let n = range.len();
        // SAFETY: as in `copy_from_cpu`: the memory is valid while mapped
        // (`DmaOps::map` contract), `range` is inside it, and the
        // `sync_for_cpu` contract lets the backend write the range since no
        // CPU reference to it exists during the call.
        unsafe {
            let src = self.shadow.as_ptr().add(range.start);
            let dst = self.cpu.0.as_ptr().add(range.start);
            core::ptr::copy_nonoverlapping(src, dst, n);
        }
    }
}

struct State {
    mode: CheckMode,
    call_delay: Duration,
    mapping_limit: Option<usize>,
    /// Maps still to fail (`fail_next_maps`).
    fail_next: u64,
    /// Fail every k-th map attempt (0: never).
    fail_every: u64,
    /// Map attempts that reached failure injection.
    map_attempts: u64,
    strict_sync_directions: bool,
    retired_capacity: usize,
    next_iova: u64,
    /// Live mappings by device address.
    live: BTreeMap<u64, Entry>,
    /// Live mappings by CPU address (value: device address).
    by_cpu: BTreeMap<usize, u64>,
    /// Device addresses of recently unmapped mappings.
    retired: BTreeSet<u64>,
    /// Device addresses in `retired`, oldest first.
    retired_order: VecDeque<u64>,
    violations: Vec<Violation>,
    /// In `Panic` mode: the text of the first violation of this call.
    panic_message: Option<String>,
    stats: CheckingStats,
    unbound: bool,
}

impl State {
    fn report(&mut self, v: Violation) {
        self.stats.violations += 1;
        if self.mode == CheckMode::Panic && self.panic_message.is_none() {
            self.panic_message = Some(v.to_string());
        }
        if self.violations.len() < MAX_RECORDED_VIOLATIONS {
            self.violations.push(v);
        }
    }

    /// Reports a call after unbind; true if the device is unbound.
    fn dead(&mut self, op: Op) -> bool {
        if self.unbound {
            self.stats.calls_after_unbind += 1;
            self.report(Violation::CallAfterUnbind { op });
        }
        self.unbound
    }

    /// Maps after the unbind check; errors are counted by the caller.
    ///
    /// # Safety
    /// The `DmaOps::map` contract for `cpu`, `len`.
    unsafe fn map(
        &mut self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        let cpu_addr = cpu.as_ptr().addr();
        let Some(cpu_end) = cpu_addr.checked_add(len).filter(|_| len > 0) else {
            self.report(Violation::InvalidMap { cpu_addr, len });
            return Err(DmaError::InvalidArgument);
        };
        // Live CPU ranges are disjoint and sorted, so their ends are sorted
        // too: only the last one starting before `cpu_end` can overlap.
        if let Some((&start, &iova)) = self.by_cpu.range(..cpu_end).next_back() {
            let existing = &self.live[&iova];
            if start + existing.len > cpu_addr {
                let existing = existing.mapping(iova);
                self.report(Violation::MapOverlap {
                    cpu_addr,
                    len,
                    existing,
                    existing_cpu_addr: start,
                });
                return Err(DmaError::Overlap);
            }
        }
        if self.fail_next > 0 {
            self.fail_next -= 1;
            self.stats.injected_failures += 1;
            return Err(DmaError::Injected);
        }
        self.map_attempts += 1;
        if self.fail_every != 0 && self.map_attempts % self.fail_every == 0 {
            self.stats.injected_failures += 1;
            return Err(DmaError::Injected);
        }
        if let Some(limit) = self.mapping_limit {
            if self.live.len() >= limit {
                return Err(DmaError::MappingLimit {
                    limit: Some(limit as u64),
                });
            }
        }
        // The mapping, rounded up to whole pages, plus one guard page.
        let span = (len as u64)
            .checked_next_multiple_of(IOVA_PAGE)
            .and_then(|s| s.checked_add(IOVA_PAGE));
        let addr = self.next_iova;
        let next = span.and_then(|s| addr.checked_add(s));
        let Some(next) = next.filter(|&n| n <= IOVA_END) else {
            return Err(DmaError::AddressSpaceExhausted);
        };
        self.next_iova = next;
        let mut entry = Entry {
            len,
            direction,
            cpu: CpuPtr(cpu),
            shadow: vec![0; len],
            marks: Vec::new(),
        };
        if direction.device_reads() {
            // SAFETY: the caller's `map` contract: `cpu..cpu+len` is valid
            // and not referenced by the CPU during this call.
            unsafe { entry.copy_from_cpu(0..len) };
        }
        self.live.insert(addr, entry);
        self.by_cpu.insert(cpu_addr, addr);
        self.stats.maps += 1;
        self.stats.peak_live_mappings = self.stats.peak_live_mappings.max(self.live.len() as u64);
        Ok(DmaAddr(addr))
    }

    fn unmap_one(&mut self, m: DmaMapping) {
        self.stats.unmaps += 1;
        if m.addr == DmaAddr::ERROR {
            self.report(Violation::UnmapInvalidAddress {
                len: m.len,
                direction: m.direction,
            });
            return;
        }
        let Some(entry) = self.live.remove(&m.addr.0) else {
            let v = if self.retired.contains(&m.addr.0) {
                Violation::DoubleUnmap {
                    addr: m.addr,
                    len: m.len,
                    direction: m.direction,
                }
            } else {
                Violation::UnmapNotMapped {
                    addr: m.addr,
                    len: m.len,
                    direction: m.direction,
                }
            };
            self.report(v);
            return;
        };
        // Never write CPU memory here: the entry (and its shadow) just goes.
        self.by_cpu.remove(&entry.cpu.0.as_ptr().addr());
        if entry.len != m.len {
            self.report(Violation::UnmapSizeMismatch {
                addr: m.addr,
                mapped_len: entry.len,
                unmap_len: m.len,
            });
        }
        if entry.direction != m.direction {
            self.report(Violation::UnmapDirectionMismatch {
                addr: m.addr,
                len: entry.len,
                mapped: entry.direction,
                unmapped: m.direction,
            });
        }
        if self.retired_capacity > 0 {
            if self.retired_order.len() >= self.retired_capacity {
                if let Some(old) = self.retired_order.pop_front() {
                    self.retired.remove(&old);
                }
            }
            self.retired_order.push_back(m.addr.0);
            self.retired.insert(m.addr.0);
        }
    }

    /// Checks a sync or `cpu_access` against the records; returns the range
    /// if it lies inside a live mapping (other mismatches are reported but
    /// do not stop the call).
    fn check_range(
        &mut self,
        op: Op,
        m: DmaMapping,
        offset: usize,
        len: usize,
    ) -> Option<Range<usize>> {
        let Some(entry) = self.live.get(&m.addr.0) else {
            self.report(Violation::NotMapped {
                op,
                addr: m.addr,
                offset,
                len,
            });
            return None;
        };
        let (mapped_len, mapped_dir) = (entry.len, entry.direction);
        let range = offset
            .checked_add(len)
            .filter(|&end| end <= mapped_len)
            .map(|end| offset..end);
        if range.is_none() {
            self.report(Violation::OutOfRange {
                op,
                addr: m.addr,
                mapped_len,
                offset,
                len,
            });
        }
        if m.len != mapped_len {
            self.report(Violation::MappingLenMismatch {
                op,
                addr: m.addr,
                mapped_len,
                given_len: m.len,
            });
        }
        if mapped_dir != DmaDirection::Bidirectional && m.direction != mapped_dir {
            self.report(Violation::MappingDirectionMismatch {
                op,
                addr: m.addr,
                mapped: mapped_dir,
                given: m.direction,
            });
        }
        range
    }

    /// # Safety
    /// The `DmaOps::sync_for_device` / `sync_for_cpu` contract: no CPU
    /// reference to the range exists during the call.
    unsafe fn sync(&mut self, op: Op, m: DmaMapping, offset: usize, len: usize) {
        let Some(range) = self.check_range(op, m, offset, len) else {
            return;
        };
        let strict = self.strict_sync_directions;
        let entry = self.live.get_mut(&m.addr.0).expect("checked live");
        let direction = entry.direction;
        let allowed = match op {
            Op::SyncForCpu => direction != DmaDirection::ToDevice,
            _ => direction != DmaDirection::FromDevice,
        };
        if allowed {
            if op == Op::SyncForCpu {
                // SAFETY: the entry is live in our records and `range` lies
                // inside it (checked above); the caller guarantees no CPU
                // reference to the range exists during the sync.
                unsafe { entry.copy_to_cpu(range.clone()) };
            } else {
                // SAFETY: as above.
                unsafe { entry.copy_from_cpu(range.clone()) };
            }
            // CPU memory and shadow now agree on the range.
            entry.clear_marks(range, DEVICE_DIRTY | CPU_DIRTY);
        } else if strict {
            let len = entry.len;
            self.report(Violation::SyncDirectionNotAllowed {
                op,
                addr: m.addr,
                len,
                direction,
            });
        }
    }

    fn cpu_access(&mut self, m: DmaMapping, offset: usize, len: usize, access: CpuAccess) {
        let Some(range) = self.check_range(Op::CpuAccess, m, offset, len) else {
            return;
        };
        let entry = self.live.get_mut(&m.addr.0).expect("checked live");
        match access {
            CpuAccess::Read => {
                if let Some(first_unsynced) = entry.first_marked(range, DEVICE_DIRTY) {
                    self.report(Violation::CpuReadBeforeSync {
                        addr: m.addr,
                        offset,
                        len,
                        first_unsynced,
                    });
                }
            }
            CpuAccess::Write => {
                // The CPU now sees its own bytes there, not the device's.
                entry.clear_marks(range.clone(), DEVICE_DIRTY);
                if entry.direction.device_reads() {
                    entry.set_marks(range, CPU_DIRTY);
                }
            }
        }
    }

    /// Finds the mapping a device access falls in and checks it.
    fn device_access(
        &mut self,
        addr: DmaAddr,
        len: usize,
        access: DeviceAccess,
    ) -> Result<(u64, Range<usize>), Violation> {
        let fault = |reason| Violation::IommuFault {
            addr,
            len,
            access,
            reason,
        };
        let found = self
            .live
            .range(..=addr.0)
            .next_back()
            .filter(|(&start, e)| addr.0 - start < e.len as u64);
        let result = match found {
            None => Err(fault(FaultReason::Unmapped)),
            Some((&start, e)) => {
                let offset = (addr.0 - start) as usize;
                match offset.checked_add(len).filter(|&end| end <= e.len) {
                    None => Err(fault(FaultReason::PastEnd {
                        mapping: DmaAddr(start),
                        mapping_len: e.len,
                    })),
                    Some(end) => {
                        let ok = match access {
                            DeviceAccess::Read => e.direction.device_reads(),
                            DeviceAccess::Write => e.direction.device_writes(),
                        };
                        if ok {
                            Ok((start, offset..end))
                        } else {
                            Err(fault(FaultReason::Direction(e.direction)))
                        }
                    }
                }
            }
        };
        if let Err(v) = &result {
            self.report(v.clone());
        }
        result
    }

    fn device_write(&mut self, addr: DmaAddr, data: &[u8]) -> Result<(), Violation> {
        let (start, range) = self.device_access(addr, data.len(), DeviceAccess::Write)?;
        let entry = self.live.get_mut(&start).expect("checked live");
        entry.shadow[range.clone()].copy_from_slice(data);
        entry.clear_marks(range.clone(), CPU_DIRTY);
        entry.set_marks(range, DEVICE_DIRTY);
        Ok(())
    }

    fn device_read(&mut self, addr: DmaAddr, len: usize) -> Result<Vec<u8>, Violation> {
        let (start, range) = self.device_access(addr, len, DeviceAccess::Read)?;
        let entry = &self.live[&start];
        let data = entry.shadow[range.clone()].to_vec();
        if let Some(first) = entry.first_marked(range, CPU_DIRTY) {
            let v = Violation::DeviceReadBeforeSync {
                addr,
                len,
                first_unsynced: DmaAddr(start + first as u64),
            };
            self.report(v.clone());
            return Err(v);
        }
        Ok(data)
    }

    fn on_unbind(&mut self) {
        self.unbound = true;
        if let Some((&addr, entry)) = self.live.iter().next() {
            let v = Violation::Leak {
                count: self.live.len(),
                example: entry.mapping(addr),
            };
            self.report(v);
        }
    }
}

impl CheckingDevice {
    /// A device with default settings that reacts to violations per `mode`.
    pub fn new(mode: CheckMode) -> Self {
        Self::builder().mode(mode).build()
    }

    /// A builder for non-default settings.
    pub fn builder() -> CheckingDeviceBuilder {
        CheckingDeviceBuilder::default()
    }

    /// Runs one call: optional pause, the body under the lock, optional
    /// pause, then a panic in `Panic` mode if the body reported a violation.
    fn call<R>(&self, delayed: bool, body: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.inner.state.lock();
        let delay = if delayed {
            st.call_delay
        } else {
            Duration::ZERO
        };
        if !delay.is_zero() {
            drop(st);
            pause(delay);
            st = self.inner.state.lock();
        }
        let result = body(&mut st);
        let panic_message = st.panic_message.take();
        drop(st);
        pause(delay);
        // A second panic while unwinding (say, from a pool's `Drop`) would
        // abort the process and hide the first message: only record then.
        if let Some(message) = panic_message.filter(|_| !std::thread::panicking()) {
            panic!("{message}");
        }
        result
    }

    /// How this device reacts to violations.
    pub fn mode(&self) -> CheckMode {
        self.inner.state.lock().mode
    }

    /// Makes the next `n` maps fail with [`DmaError::Injected`], mapping
    /// nothing (replaces any earlier count).
    pub fn fail_next_maps(&self, n: u64) {
        self.inner.state.lock().fail_next = n;
    }

    /// Makes every `k`-th map attempt from now on fail with
    /// [`DmaError::Injected`]; `0` turns this off.
    pub fn fail_maps_every(&self, k: u64) {
        let mut st = self.inner.state.lock();
        st.fail_every = k;
        st.map_attempts = 0;
    }

    /// Makes every `DmaOps` call pause for `delay` before it takes effect
    /// and again after, outside the lock, to widen race windows. Under loom
    /// a non-zero delay is a yield. `Duration::ZERO` (the default) turns
    /// this off.
    pub fn set_call_delay(&self, delay: Duration) {
        self.inner.state.lock().call_delay = delay;
    }

    /// The simulated device writes `data` at `addr`: into the shadow of the
    /// live mapping containing `addr..addr+data.len()`, marking the bytes as
    /// not yet synced for the CPU. The CPU sees them after `sync_for_cpu`.
    ///
    /// # Errors
    /// [`Violation::IommuFault`] if nothing is mapped at `addr`, the range
    /// runs past the mapping's end, or the mapping is `ToDevice`;
    /// [`Violation::CallAfterUnbind`] after `on_unbind`. The violation is
    /// also recorded (or panics, per mode).
    pub fn device_write(&self, addr: DmaAddr, data: &[u8]) -> Result<(), Violation> {
        self.call(false, |st| {
            if st.dead(Op::DeviceWrite) {
                return Err(Violation::CallAfterUnbind {
                    op: Op::DeviceWrite,
                });
            }
            st.stats.device_writes += 1;
            st.device_write(addr, data)
        })
    }

    /// The simulated device reads `len` bytes at `addr` from the shadow of
    /// the live mapping containing them: what the CPU wrote before `map` or
    /// the last `sync_for_device`, plus what the device wrote since.
    ///
    /// # Errors
    /// [`Violation::IommuFault`] if nothing is mapped at `addr`, the range
    /// runs past the mapping's end, or the mapping is `FromDevice`;
    /// [`Violation::DeviceReadBeforeSync`] if the CPU wrote some of the
    /// bytes (as told through `cpu_access`) and did not sync them for the
    /// device; [`Violation::CallAfterUnbind`] after `on_unbind`. The
    /// violation is also recorded (or panics, per mode).
    pub fn device_read(&self, addr: DmaAddr, len: usize) -> Result<Vec<u8>, Violation> {
        self.call(false, |st| {
            if st.dead(Op::DeviceRead) {
                return Err(Violation::CallAfterUnbind { op: Op::DeviceRead });
            }
            st.stats.device_reads += 1;
            st.device_read(addr, len)
        })
    }

    /// The violations recorded so far (at most [`MAX_RECORDED_VIOLATIONS`]).
    pub fn violations(&self) -> Vec<Violation> {
        self.inner.state.lock().violations.clone()
    }

    /// Removes and returns the violations recorded so far. The count in
    /// [`CheckingStats::violations`] and [`Verdict`] is kept.
    pub fn take_violations(&self) -> Vec<Violation> {
        core::mem::take(&mut self.inner.state.lock().violations)
    }

    /// How many mappings are live.
    pub fn live_mappings(&self) -> usize {
        self.inner.state.lock().live.len()
    }

    /// The live mappings, by device address.
    pub fn live_mapping_list(&self) -> Vec<LiveMapping> {
        let st = self.inner.state.lock();
        st.live
            .iter()
            .map(|(&addr, e)| LiveMapping {
                mapping: e.mapping(addr),
                cpu_addr: e.cpu.0.as_ptr().addr(),
                unsynced_device_bytes: e.count_marked(DEVICE_DIRTY),
            })
            .collect()
    }

    /// The counters.
    pub fn stats(&self) -> CheckingStats {
        self.inner.state.lock().stats
    }

    /// Whether `on_unbind` was called.
    pub fn is_unbound(&self) -> bool {
        self.inner.state.lock().unbound
    }

    /// A one-line summary, e.g. `"0 violations, 0 live mappings"`.
    pub fn verdict(&self) -> Verdict {
        let st = self.inner.state.lock();
        Verdict {
            violations: st.stats.violations,
            live_mappings: st.live.len(),
            unbound: st.unbound,
        }
    }

    /// A human-readable report: the verdict, the counters, and every
    /// recorded violation.
    pub fn report(&self) -> String {
        use fmt::Write as _;
        let verdict = self.verdict();
        let st = self.inner.state.lock();
        let s = &st.stats;
        let mut out = format!("{verdict}\n");
        let _ = writeln!(
            out,
            "maps={} map_failures={} (injected {}) unmaps={} batch_unmaps={} \
             syncs_for_device={} syncs_for_cpu={} cpu_accesses={} device_writes={} \
             device_reads={} calls_after_unbind={} peak_live_mappings={}",
            s.maps,
            s.map_failures,
            s.injected_failures,
            s.unmaps,
            s.batch_unmaps,
            s.syncs_for_device,
            s.syncs_for_cpu,
            s.cpu_accesses,
            s.device_writes,
            s.device_reads,
            s.calls_after_unbind,
            s.peak_live_mappings
        );
        for (i, v) in st.violations.iter().enumerate() {
            let _ = writeln!(out, "violation {}: {v}", i + 1);
        }
        let kept = st.violations.len() as u64;
        if s.violations > kept {
            let _ = writeln!(out, "({} more violations not listed)", s.violations - kept);
        }
        out
    }

    /// Panics with the [`report`](Self::report) if any violation was
    /// detected.
    #[track_caller]
    pub fn assert_clean(&self) {
        if !self.verdict().is_clean() {
            panic!("CheckingDevice found violations:\n{}", self.report());
        }
    }
}

// A panic (in `Panic` mode) is raised only after the call's effect is
// complete and the lock released, and the lock does not poison: the device
// stays consistent and usable across `catch_unwind`.
impl std::panic::UnwindSafe for CheckingDevice {}
impl std::panic::RefUnwindSafe for CheckingDevice {}

impl Default for CheckingDevice {
    /// A device in [`CheckMode::Panic`].
    fn default() -> Self {
        Self::new(CheckMode::Panic)
    }
}

impl fmt::Debug for CheckingDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = self.verdict();
        f.debug_struct("CheckingDevice")
            .field("mode", &self.mode())
            .field("violations", &verdict.violations)
            .field("live_mappings", &verdict.live_mappings)
            .field("unbound", &verdict.unbound)
            .finish()
    }
}

impl DmaOps for CheckingDevice {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        self.call(true, |st| {
            let result = if st.dead(Op::Map) {
                Err(DmaError::Unbound)
            } else {
                // SAFETY: forwarded `DmaOps::map` contract.
                unsafe { st.map(cpu, len, direction) }
            };
            if result.is_err() {
                st.stats.map_failures += 1;
            }
            result
        })
    }

    unsafe fn unmap(&self, mapping: DmaMapping) {
        self.call(true, |st| {
            if !st.dead(Op::Unmap) {
                st.unmap_one(mapping);
            }
        });
    }

    unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) {
        self.call(true, |st| {
            if !st.dead(Op::UnmapBatch) {
                st.stats.batch_unmaps += 1;
                for m in mappings {
                    st.unmap_one(*m);
                }
            }
        });
    }

    unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
        self.call(true, |st| {
            if !st.dead(Op::SyncForDevice) {
                st.stats.syncs_for_device += 1;
                // SAFETY: forwarded `sync_for_device` contract.
                unsafe { st.sync(Op::SyncForDevice, mapping, offset, len) };
            }
        });
    }

    unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
        self.call(true, |st| {
            if !st.dead(Op::SyncForCpu) {
                st.stats.syncs_for_cpu += 1;
                // SAFETY: forwarded `sync_for_cpu` contract.
                unsafe { st.sync(Op::SyncForCpu, mapping, offset, len) };
            }
        });
    }

    fn checks_cpu_access(&self) -> bool {
        true
    }

    fn cpu_access(&self, mapping: DmaMapping, offset: usize, len: usize, access: CpuAccess) {
        self.call(true, |st| {
            if !st.dead(Op::CpuAccess) {
                st.stats.cpu_accesses += 1;
                st.cpu_access(mapping, offset, len, access);
            }
        });
    }

    fn on_unbind(&self) {
        self.call(true, |st| {
            if !st.dead(Op::OnUnbind) {
                st.on_unbind();
            }
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use DmaDirection::{Bidirectional, FromDevice, ToDevice};

    /// CPU memory for tests: a heap buffer reached only through its raw
    /// pointer, so handing that pointer to `map` is clean under Miri.
    struct Buf {
        ptr: NonNull<[u8]>,
    }

    impl Buf {
        fn new(len: usize) -> Self {
            let raw = Box::into_raw(vec![0u8; len].into_boxed_slice());
            Self {
                ptr: NonNull::new(raw).expect("Box is non-null"),
            }
        }

        fn len(&self) -> usize {
            self.ptr.len()
        }

        fn at(&self, offset: usize) -> NonNull<u8> {
            assert!(offset <= self.len());
            // SAFETY: `offset` is within (or one past) the allocation.
            unsafe { self.ptr.cast::<u8>().add(offset) }
        }

        fn read(&self) -> Vec<u8> {
            // SAFETY: the buffer is live; no mutable reference exists and no
            // device call runs concurrently in these tests.
            unsafe { core::slice::from_raw_parts(self.at(0).as_ptr(), self.len()).to_vec() }
        }

        fn write(&self, offset: usize, data: &[u8]) {
            assert!(offset + data.len() <= self.len());
            // SAFETY: in bounds (asserted); no reference to the buffer exists.
            unsafe {
                core::ptr::copy_nonoverlapping(data.as_ptr(), self.at(offset).as_ptr(), data.len())
            };
        }
    }

    impl Drop for Buf {
        fn drop(&mut self) {
            // SAFETY: `ptr` came from `Box::into_raw` and is freed once.
            drop(unsafe { Box::from_raw(self.ptr.as_ptr()) });
        }
    }

    fn record() -> CheckingDevice {
        CheckingDevice::new(CheckMode::Record)
    }

    fn map_at(
        dev: &CheckingDevice,
        buf: &Buf,
        offset: usize,
        len: usize,
        dir: DmaDirection,
    ) -> DmaMapping {
        try_map(dev, buf, offset, len, dir).expect("map failed")
    }

    fn try_map(
        dev: &CheckingDevice,
        buf: &Buf,
        offset: usize,
        len: usize,
        dir: DmaDirection,
    ) -> Result<DmaMapping, DmaError> {
        assert!(offset + len <= buf.len());
        // SAFETY: the buffer outlives the device calls of each test and is
        // not referenced while a call runs.
        let addr = unsafe { dev.map(buf.at(offset), len, dir) }?;
        Ok(DmaMapping {
            addr,
            len,
            direction: dir,
        })
    }

    fn map(dev: &CheckingDevice, buf: &Buf, dir: DmaDirection) -> DmaMapping {
        map_at(dev, buf, 0, buf.len(), dir)
    }

    fn unmap(dev: &CheckingDevice, m: DmaMapping) {
        // SAFETY: the checker touches no memory on unmap.
        unsafe { dev.unmap(m) }
    }

    fn sync_cpu(dev: &CheckingDevice, m: DmaMapping, offset: usize, len: usize) {
        // SAFETY: the test's buffer is live and not referenced during the call.
        unsafe { dev.sync_for_cpu(m, offset, len) }
    }

    fn sync_dev(dev: &CheckingDevice, m: DmaMapping, offset: usize, len: usize) {
        // SAFETY: the test's buffer is live and not referenced during the call.
        unsafe { dev.sync_for_device(m, offset, len) }
    }

    /// Asserts exactly these violations were recorded, in order.
    fn expect(dev: &CheckingDevice, expected: &[Violation]) {
        assert_eq!(dev.take_violations(), expected, "{}", dev.report());
    }

    #[test]
    fn is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<CheckingDevice>();
        check::<Violation>();
    }

    #[test]
    fn correct_sequence_has_no_violations() {
        let dev = CheckingDevice::new(CheckMode::Panic);
        assert!(dev.checks_cpu_access());
        let rx = Buf::new(64);
        let tx = Buf::new(32);
        let rx_m = map(&dev, &rx, FromDevice);
        tx.write(0, b"hello");
        let tx_m = map(&dev, &tx, ToDevice);
        assert_eq!(dev.live_mappings(), 2);

        // Device receives, driver syncs part of it for the CPU and reads it.
        dev.device_write(rx_m.addr.offset(8), b"packet").unwrap();
        sync_cpu(&dev, rx_m, 8, 6);
        dev.cpu_access(rx_m, 8, 6, CpuAccess::Read);
        assert_eq!(&rx.read()[8..14], b"packet");
        // Reading bytes the device did not write is fine too.
        dev.cpu_access(rx_m, 20, 10, CpuAccess::Read);

        // Device transmits.
        assert_eq!(dev.device_read(tx_m.addr, 5).unwrap(), b"hello");
        dev.cpu_access(tx_m, 0, 5, CpuAccess::Write);
        tx.write(0, b"world");
        sync_dev(&dev, tx_m, 0, 5);
        assert_eq!(dev.device_read(tx_m.addr, 5).unwrap(), b"world");

        // Bidirectional: both syncs allowed.
        let bi = Buf::new(16);
        let bi_m = map(&dev, &bi, Bidirectional);
        sync_dev(&dev, bi_m, 0, 16);
        sync_cpu(&dev, bi_m, 4, 4);

        unmap(&dev, rx_m);
        // SAFETY: the checker touches no memory on unmap.
        unsafe { dev.unmap_batch(&[tx_m, bi_m]) };
        dev.on_unbind();

        assert!(dev.violations().is_empty());
        let verdict = dev.verdict();
        assert!(verdict.is_clean());
        assert_eq!(
            verdict.to_string(),
            "0 violations, 0 live mappings (unbound)"
        );
        assert!(dev.is_unbound());
        dev.assert_clean();
        let s = dev.stats();
        assert_eq!(s.maps, 3);
        assert_eq!(s.unmaps, 3);
        assert_eq!(s.batch_unmaps, 1);
        assert_eq!(s.syncs_for_cpu, 2);
        assert_eq!(s.syncs_for_device, 2);
        assert_eq!(s.cpu_accesses, 3);
        assert_eq!(s.device_writes, 1);
        assert_eq!(s.device_reads, 2);
        assert_eq!(s.violations, 0);
        assert_eq!(s.peak_live_mappings, 3);
    }

    #[test]
    fn addresses_are_aligned_distinct_guarded_and_never_reused() {
        let dev = record();
        let buf = Buf::new(3 * 4096 + 100);
        let mut seen = Vec::new();
        for i in 0..3 {
            let m = map_at(&dev, &buf, i * 4096, 4096 + (i % 2) * 50, FromDevice);
            assert_ne!(m.addr, DmaAddr::ERROR);
            assert_eq!(m.addr.0 % IOVA_PAGE, 0);
            assert!(m.addr.0 >= IOVA_BASE);
            seen.push(m);
            // Unmapping before the next map must not let the address return.
            if i == 1 {
                unmap(&dev, m);
            }
        }
        for w in seen.windows(2) {
            // At least one unmapped guard page between mappings.
            let end = w[0].addr.0 + w[0].len as u64;
            assert!(w[1].addr.0 >= end.next_multiple_of(IOVA_PAGE) + IOVA_PAGE);
        }
        let again = map_at(&dev, &buf, 4096, 10, FromDevice);
        assert!(seen.iter().all(|m| m.addr != again.addr));
        // The guard page after a mapping faults.
        let first = seen[0];
        assert!(dev.device_write(first.addr.offset(4096), &[1]).is_err());
        assert_eq!(dev.stats().violations, 1);
    }

    #[test]
    fn shadow_device_data_reaches_cpu_only_after_sync_for_cpu() {
        let dev = record();
        let buf = Buf::new(32);
        let m = map(&dev, &buf, FromDevice);
        dev.device_write(m.addr, &[7; 32]).unwrap();
        assert_eq!(buf.read(), vec![0; 32], "device data leaked before sync");
        sync_cpu(&dev, m, 0, 8);
        let seen = buf.read();
        assert_eq!(&seen[..8], &[7; 8]);
        assert_eq!(&seen[8..], &[0; 24], "partial sync copied too much");
        assert_eq!(dev.live_mapping_list()[0].unsynced_device_bytes, 24);
        sync_cpu(&dev, m, 8, 24);
        assert_eq!(buf.read(), vec![7; 32]);
        assert_eq!(dev.live_mapping_list()[0].unsynced_device_bytes, 0);
        unmap(&dev, m);
        dev.on_unbind();
        expect(&dev, &[]);
    }

    #[test]
    fn shadow_cpu_data_reaches_device_at_map_and_after_sync_for_device() {
        let dev = record();
        let buf = Buf::new(8);
        buf.write(0, b"abcdefgh");
        let m = map(&dev, &buf, ToDevice);
        assert_eq!(dev.device_read(m.addr, 8).unwrap(), b"abcdefgh");
        buf.write(0, b"ABCDEFGH");
        assert_eq!(dev.device_read(m.addr, 8).unwrap(), b"abcdefgh");
        sync_dev(&dev, m, 2, 3);
        assert_eq!(dev.device_read(m.addr, 8).unwrap(), b"abCDEfgh");
        // A FromDevice mapping starts zeroed on the device side.
        let rx = Buf::new(4);
        rx.write(0, b"junk");
        let rx_m = map(&dev, &rx, Bidirectional);
        assert_eq!(dev.device_read(rx_m.addr, 4).unwrap(), b"junk");
        expect(&dev, &[]);
    }

    #[test]
    fn unmap_never_writes_cpu_memory() {
        let dev = record();
        let buf = Buf::new(16);
        buf.write(0, &[1; 16]);
        let m = map(&dev, &buf, Bidirectional);
        dev.device_write(m.addr, &[9; 16]).unwrap();
        unmap(&dev, m);
        assert_eq!(buf.read(), vec![1; 16]);
        expect(&dev, &[]);
    }

    #[test]
    fn unmap_of_never_mapped_address() {
        let dev = record();
        let bogus = DmaMapping {
            addr: DmaAddr(0x1234_0000),
            len: 64,
            direction: FromDevice,
        };
        unmap(&dev, bogus);
        // Inside a live mapping, but not its start.
        let buf = Buf::new(64);
        let m = map(&dev, &buf, FromDevice);
        let inside = DmaMapping {
            addr: m.addr.offset(8),
            ..m
        };
        unmap(&dev, inside);
        expect(
            &dev,
            &[
                Violation::UnmapNotMapped {
                    addr: DmaAddr(0x1234_0000),
                    len: 64,
                    direction: FromDevice,
                },
                Violation::UnmapNotMapped {
                    addr: m.addr.offset(8),
                    len: 64,
                    direction: FromDevice,
                },
            ],
        );
        assert_eq!(dev.live_mappings(), 1);
    }

    #[test]
    fn unmap_size_mismatch() {
        let dev = record();
        let buf = Buf::new(64);
        let m = map(&dev, &buf, FromDevice);
        unmap(&dev, DmaMapping { len: 32, ..m });
        expect(
            &dev,
            &[Violation::UnmapSizeMismatch {
                addr: m.addr,
                mapped_len: 64,
                unmap_len: 32,
            }],
        );
        // The mapping is gone anyway (as in dma-debug): no cascade.
        assert_eq!(dev.live_mappings(), 0);
    }

    #[test]
    fn unmap_direction_mismatch() {
        let dev = record();
        let buf = Buf::new(64);
        let m = map(&dev, &buf, FromDevice);
        unmap(
            &dev,
            DmaMapping {
                direction: Bidirectional,
                ..m
            },
        );
        expect(
            &dev,
            &[Violation::UnmapDirectionMismatch {
                addr: m.addr,
                len: 64,
                mapped: FromDevice,
                unmapped: Bidirectional,
            }],
        );
    }

    #[test]
    fn unmap_of_error_address() {
        let dev = record();
        unmap(
            &dev,
            DmaMapping {
                addr: DmaAddr::ERROR,
                len: 4096,
                direction: ToDevice,
            },
        );
        expect(
            &dev,
            &[Violation::UnmapInvalidAddress {
                len: 4096,
                direction: ToDevice,
            }],
        );
    }

    #[test]
    fn double_unmap() {
        let dev = record();
        let buf = Buf::new(64);
        let m = map(&dev, &buf, FromDevice);
        unmap(&dev, m);
        expect(&dev, &[]);
        unmap(&dev, m);
        let double = Violation::DoubleUnmap {
            addr: m.addr,
            len: 64,
            direction: FromDevice,
        };
        expect(&dev, std::slice::from_ref(&double));
        // Within one batch too.
        let m2 = map(&dev, &buf, FromDevice);
        // SAFETY: the checker touches no memory on unmap.
        unsafe { dev.unmap_batch(&[m2, m2]) };
        expect(
            &dev,
            &[Violation::DoubleUnmap {
                addr: m2.addr,
                len: 64,
                direction: FromDevice,
            }],
        );
        assert_eq!(dev.stats().batch_unmaps, 1);
        assert_eq!(dev.stats().unmaps, 4);
    }

    #[test]
    fn retired_record_is_bounded_fifo() {
        let dev = CheckingDevice::builder()
            .mode(CheckMode::Record)
            .retired_capacity(2)
            .build();
        let buf = Buf::new(8);
        let ms: Vec<_> = (0..3)
            .map(|_| {
                let m = map(&dev, &buf, ToDevice);
                unmap(&dev, m);
                m
            })
            .collect();
        unmap(&dev, ms[0]);
        unmap(&dev, ms[2]);
        let [oldest, newest] = dev.take_violations().try_into().unwrap();
        assert!(
            matches!(oldest, Violation::UnmapNotMapped { .. }),
            "{oldest}"
        );
        assert!(matches!(newest, Violation::DoubleUnmap { .. }), "{newest}");
    }

    #[test]
    fn sync_of_never_mapped_address() {
        let dev = record();
        let bogus = DmaMapping {
            addr: DmaAddr(IOVA_BASE),
            len: 64,
            direction: Bidirectional,
        };
        sync_cpu(&dev, bogus, 0, 64);
        sync_dev(&dev, bogus, 4, 8);
        expect(
            &dev,
            &[
                Violation::NotMapped {
                    op: Op::SyncForCpu,
                    addr: DmaAddr(IOVA_BASE),
                    offset: 0,
                    len: 64,
                },
                Violation::NotMapped {
                    op: Op::SyncForDevice,
                    addr: DmaAddr(IOVA_BASE),
                    offset: 4,
                    len: 8,
                },
            ],
        );
    }

    #[test]
    fn sync_after_unmap_is_not_mapped_and_touches_nothing() {
        let dev = record();
        let buf = Buf::new(8);
        let m = map(&dev, &buf, FromDevice);
        dev.device_write(m.addr, &[5; 8]).unwrap();
        unmap(&dev, m);
        sync_cpu(&dev, m, 0, 8);
        assert_eq!(buf.read(), vec![0; 8]);
        expect(
            &dev,
            &[Violation::NotMapped {
                op: Op::SyncForCpu,
                addr: m.addr,
                offset: 0,
                len: 8,
            }],
        );
    }

    #[test]
    fn sync_outside_the_mapping() {
        let dev = record();
        let buf = Buf::new(64);
        let m = map(&dev, &buf, FromDevice);
        dev.device_write(m.addr, &[3; 64]).unwrap();
        sync_cpu(&dev, m, 60, 8);
        sync_cpu(&dev, m, usize::MAX, 2);
        // Nothing was copied by the bad syncs.
        assert_eq!(buf.read(), vec![0; 64]);
        // Partial syncs inside, including at the very end, are fine.
        sync_cpu(&dev, m, 56, 8);
        sync_cpu(&dev, m, 64, 0);
        expect(
            &dev,
            &[
                Violation::OutOfRange {
                    op: Op::SyncForCpu,
                    addr: m.addr,
                    mapped_len: 64,
                    offset: 60,
                    len: 8,
                },
                Violation::OutOfRange {
                    op: Op::SyncForCpu,
                    addr: m.addr,
                    mapped_len: 64,
                    offset: usize::MAX,
                    len: 2,
                },
            ],
        );
        assert_eq!(&buf.read()[56..], &[3; 8]);
    }

    #[test]
    fn sync_for_cpu_of_to_device_mapping() {
        let dev = CheckingDevice::builder()
            .mode(CheckMode::Record)
            .strict_sync_directions(true)
            .build();
        let buf = Buf::new(16);
        let m = map(&dev, &buf, ToDevice);
        sync_cpu(&dev, m, 0, 16);
        expect(
            &dev,
            &[Violation::SyncDirectionNotAllowed {
                op: Op::SyncForCpu,
                addr: m.addr,
                len: 16,
                direction: ToDevice,
            }],
        );
    }

    #[test]
    fn sync_for_device_of_from_device_mapping() {
        let dev = CheckingDevice::builder()
            .mode(CheckMode::Record)
            .strict_sync_directions(true)
            .build();
        let buf = Buf::new(16);
        let m = map(&dev, &buf, FromDevice);
        sync_dev(&dev, m, 0, 16);
        expect(
            &dev,
            &[Violation::SyncDirectionNotAllowed {
                op: Op::SyncForDevice,
                addr: m.addr,
                len: 16,
                direction: FromDevice,
            }],
        );
    }

    #[test]
    fn lenient_sync_directions_are_ownership_only() {
        let dev = CheckingDevice::builder()
            .mode(CheckMode::Record)
            .strict_sync_directions(false)
            .build();
        let rx = Buf::new(8);
        let rx_m = map(&dev, &rx, FromDevice);
        dev.device_write(rx_m.addr, &[1; 8]).unwrap();
        sync_dev(&dev, rx_m, 0, 8);
        // No data moved, and the device data is still unsynced for the CPU.
        assert_eq!(dev.live_mapping_list()[0].unsynced_device_bytes, 8);
        let tx = Buf::new(8);
        tx.write(0, &[2; 8]);
        let tx_m = map(&dev, &tx, ToDevice);
        tx.write(0, &[0; 8]);
        sync_cpu(&dev, tx_m, 0, 8);
        assert_eq!(tx.read(), vec![0; 8]);
        expect(&dev, &[]);
    }

    #[test]
    fn sync_with_different_direction() {
        let dev = record();
        let buf = Buf::new(16);
        let m = map(&dev, &buf, FromDevice);
        let wrong = DmaMapping {
            direction: Bidirectional,
            ..m
        };
        sync_cpu(&dev, wrong, 0, 16);
        expect(
            &dev,
            &[Violation::MappingDirectionMismatch {
                op: Op::SyncForCpu,
                addr: m.addr,
                mapped: FromDevice,
                given: Bidirectional,
            }],
        );
        // Not checked when the mapping is bidirectional.
        let bi = Buf::new(16);
        let bi_m = map(&dev, &bi, Bidirectional);
        sync_cpu(
            &dev,
            DmaMapping {
                direction: FromDevice,
                ..bi_m
            },
            0,
            16,
        );
        sync_dev(
            &dev,
            DmaMapping {
                direction: ToDevice,
                ..bi_m
            },
            0,
            16,
        );
        expect(&dev, &[]);
    }

    #[test]
    fn sync_with_different_length() {
        let dev = record();
        let buf = Buf::new(16);
        let m = map(&dev, &buf, ToDevice);
        sync_dev(&dev, DmaMapping { len: 8, ..m }, 0, 8);
        expect(
            &dev,
            &[Violation::MappingLenMismatch {
                op: Op::SyncForDevice,
                addr: m.addr,
                mapped_len: 16,
                given_len: 8,
            }],
        );
    }

    #[test]
    fn map_overlapping_live_cpu_memory() {
        let dev = record();
        let buf = Buf::new(64);
        let a = map_at(&dev, &buf, 16, 16, FromDevice);
        // Adjacent ranges are fine.
        let below = map_at(&dev, &buf, 0, 16, FromDevice);
        let above = map_at(&dev, &buf, 32, 16, ToDevice);
        expect(&dev, &[]);
        // Overlaps at the end, at the start, and containing.
        assert_eq!(
            try_map(&dev, &buf, 8, 16, FromDevice),
            Err(DmaError::Overlap)
        );
        assert_eq!(
            try_map(&dev, &buf, 20, 4, FromDevice),
            Err(DmaError::Overlap)
        );
        let cpu = buf.at(0).as_ptr().addr();
        let expected = Violation::MapOverlap {
            cpu_addr: cpu + 8,
            len: 16,
            existing: a,
            existing_cpu_addr: cpu + 16,
        };
        let got = dev.take_violations();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], expected);
        assert!(matches!(got[1], Violation::MapOverlap { existing, .. } if existing == a));
        assert_eq!(dev.live_mappings(), 3);
        assert_eq!(dev.stats().map_failures, 2);
        // After unmapping, the memory can be mapped again.
        for m in [a, below, above] {
            unmap(&dev, m);
        }
        let whole = map(&dev, &buf, Bidirectional);
        unmap(&dev, whole);
        expect(&dev, &[]);
    }

    #[test]
    fn map_of_zero_length() {
        let dev = record();
        let buf = Buf::new(8);
        assert_eq!(
            try_map(&dev, &buf, 0, 0, FromDevice),
            Err(DmaError::InvalidArgument)
        );
        expect(
            &dev,
            &[Violation::InvalidMap {
                cpu_addr: buf.at(0).as_ptr().addr(),
                len: 0,
            }],
        );
        assert_eq!(dev.live_mappings(), 0);
    }

    #[test]
    fn every_call_after_unbind_is_reported() {
        let dev = record();
        let buf = Buf::new(8);
        let m = map(&dev, &buf, Bidirectional);
        unmap(&dev, m);
        dev.on_unbind();
        expect(&dev, &[]);

        assert_eq!(
            try_map(&dev, &buf, 0, 8, FromDevice),
            Err(DmaError::Unbound)
        );
        unmap(&dev, m);
        // SAFETY: the checker touches no memory on unmap.
        unsafe { dev.unmap_batch(&[m]) };
        sync_dev(&dev, m, 0, 8);
        sync_cpu(&dev, m, 0, 8);
        dev.cpu_access(m, 0, 8, CpuAccess::Read);
        let after = |op| Violation::CallAfterUnbind { op };
        assert_eq!(dev.device_write(m.addr, &[1]), Err(after(Op::DeviceWrite)));
        assert_eq!(dev.device_read(m.addr, 1), Err(after(Op::DeviceRead)));
        dev.on_unbind();
        expect(
            &dev,
            &[
                after(Op::Map),
                after(Op::Unmap),
                after(Op::UnmapBatch),
                after(Op::SyncForDevice),
                after(Op::SyncForCpu),
                after(Op::CpuAccess),
                after(Op::DeviceWrite),
                after(Op::DeviceRead),
                after(Op::OnUnbind),
            ],
        );
        let s = dev.stats();
        assert_eq!(s.calls_after_unbind, 9);
        assert_eq!(s.map_failures, 1);
        assert_eq!(s.unmaps, 1, "calls after unbind do nothing");
    }

    #[test]
    fn calls_after_unbind_with_live_mappings_touch_nothing() {
        let dev = record();
        let buf = Buf::new(8);
        let m = map(&dev, &buf, FromDevice);
        dev.device_write(m.addr, &[4; 8]).unwrap();
        dev.on_unbind();
        sync_cpu(&dev, m, 0, 8);
        assert_eq!(buf.read(), vec![0; 8]);
        let v = dev.take_violations();
        assert!(matches!(v[0], Violation::Leak { count: 1, .. }));
        assert_eq!(v[1], Violation::CallAfterUnbind { op: Op::SyncForCpu });
    }

    #[test]
    fn iommu_faults() {
        let dev = record();
        let tx = Buf::new(16);
        let rx = Buf::new(16);
        let tx_m = map(&dev, &tx, ToDevice);
        let rx_m = map(&dev, &rx, FromDevice);
        let fault = |addr, len, access, reason| Violation::IommuFault {
            addr,
            len,
            access,
            reason,
        };
        let expected = [
            fault(DmaAddr(0x42), 4, DeviceAccess::Write, FaultReason::Unmapped),
            fault(
                rx_m.addr.offset(12),
                8,
                DeviceAccess::Write,
                FaultReason::PastEnd {
                    mapping: rx_m.addr,
                    mapping_len: 16,
                },
            ),
            fault(
                tx_m.addr,
                4,
                DeviceAccess::Write,
                FaultReason::Direction(ToDevice),
            ),
            fault(
                rx_m.addr,
                4,
                DeviceAccess::Read,
                FaultReason::Direction(FromDevice),
            ),
            fault(
                rx_m.addr.offset(16),
                1,
                DeviceAccess::Read,
                FaultReason::Unmapped,
            ),
            fault(
                DmaAddr(u64::MAX - 1),
                4,
                DeviceAccess::Read,
                FaultReason::Unmapped,
            ),
        ];
        assert_eq!(
            dev.device_write(DmaAddr(0x42), &[0; 4]),
            Err(expected[0].clone())
        );
        assert_eq!(
            dev.device_write(rx_m.addr.offset(12), &[0; 8]),
            Err(expected[1].clone())
        );
        assert_eq!(
            dev.device_write(tx_m.addr, &[0; 4]),
            Err(expected[2].clone())
        );
        assert_eq!(dev.device_read(rx_m.addr, 4), Err(expected[3].clone()));
        assert_eq!(
            dev.device_read(rx_m.addr.offset(16), 1),
            Err(expected[4].clone())
        );
        assert_eq!(
            dev.device_read(DmaAddr(u64::MAX - 1), 4),
            Err(expected[5].clone())
        );
        expect(&dev, &expected);
        // Nothing was written by the faulting write.
        unmap(&dev, rx_m);
        // A write after unmap faults too.
        assert_eq!(
            dev.device_write(rx_m.addr, &[1]),
            Err(fault(
                rx_m.addr,
                1,
                DeviceAccess::Write,
                FaultReason::Unmapped
            ))
        );
        assert_eq!(rx.read(), vec![0; 16]);
    }

    #[test]
    fn cpu_read_of_device_data_before_sync_for_cpu() {
        let dev = record();
        let buf = Buf::new(32);
        let m = map(&dev, &buf, FromDevice);
        dev.device_write(m.addr.offset(10), &[1; 4]).unwrap();
        dev.cpu_access(m, 0, 10, CpuAccess::Read);
        expect(&dev, &[]);
        dev.cpu_access(m, 0, 32, CpuAccess::Read);
        expect(
            &dev,
            &[Violation::CpuReadBeforeSync {
                addr: m.addr,
                offset: 0,
                len: 32,
                first_unsynced: 10,
            }],
        );
        sync_cpu(&dev, m, 0, 32);
        dev.cpu_access(m, 0, 32, CpuAccess::Read);
        // A CPU write replaces device data in the CPU's view.
        dev.device_write(m.addr, &[2; 4]).unwrap();
        dev.cpu_access(m, 0, 4, CpuAccess::Write);
        dev.cpu_access(m, 0, 4, CpuAccess::Read);
        expect(&dev, &[]);
    }

    #[test]
    fn device_read_of_cpu_data_before_sync_for_device() {
        let dev = record();
        let buf = Buf::new(16);
        let m = map(&dev, &buf, ToDevice);
        dev.cpu_access(m, 4, 4, CpuAccess::Write);
        buf.write(4, &[9; 4]);
        assert_eq!(dev.device_read(m.addr, 4).unwrap(), vec![0; 4]);
        let v = Violation::DeviceReadBeforeSync {
            addr: m.addr,
            len: 16,
            first_unsynced: m.addr.offset(4),
        };
        assert_eq!(dev.device_read(m.addr, 16), Err(v.clone()));
        expect(&dev, &[v]);
        sync_dev(&dev, m, 0, 16);
        assert_eq!(&dev.device_read(m.addr, 16).unwrap()[4..8], &[9; 4]);
        expect(&dev, &[]);
    }

    #[test]
    fn cpu_access_checks_mapping_and_range() {
        let dev = record();
        let buf = Buf::new(16);
        let m = map(&dev, &buf, FromDevice);
        dev.cpu_access(m, 8, 16, CpuAccess::Read);
        dev.cpu_access(DmaMapping { len: 4, ..m }, 0, 4, CpuAccess::Write);
        unmap(&dev, m);
        dev.cpu_access(m, 0, 4, CpuAccess::Read);
        expect(
            &dev,
            &[
                Violation::OutOfRange {
                    op: Op::CpuAccess,
                    addr: m.addr,
                    mapped_len: 16,
                    offset: 8,
                    len: 16,
                },
                Violation::MappingLenMismatch {
                    op: Op::CpuAccess,
                    addr: m.addr,
                    mapped_len: 16,
                    given_len: 4,
                },
                Violation::NotMapped {
                    op: Op::CpuAccess,
                    addr: m.addr,
                    offset: 0,
                    len: 4,
                },
            ],
        );
    }

    #[test]
    fn leak_at_unbind() {
        let dev = record();
        let a = Buf::new(64);
        let b = Buf::new(32);
        let ma = map(&dev, &a, FromDevice);
        let _mb = map(&dev, &b, ToDevice);
        dev.on_unbind();
        let v = dev.take_violations();
        assert_eq!(
            v,
            [Violation::Leak {
                count: 2,
                example: ma,
            }]
        );
        let text = v[0].to_string();
        assert!(
            text.starts_with(
                "device driver has pending DMA allocations while released from device [count=2]"
            ),
            "{text}"
        );
        assert!(
            text.contains(&format!("[device address={}]", ma.addr)),
            "{text}"
        );
        assert!(text.contains("[size=64 bytes]"), "{text}");
        assert!(text.contains("DMA_FROM_DEVICE"), "{text}");
        assert!(dev.is_unbound());
        assert_eq!(dev.live_mapping_list().len(), 2);
        assert_eq!(
            dev.verdict().to_string(),
            "1 violation, 2 live mappings (unbound)"
        );
    }

    #[test]
    fn fail_next_maps_maps_nothing() {
        let dev = CheckingDevice::new(CheckMode::Panic);
        let buf = Buf::new(8);
        dev.fail_next_maps(2);
        assert_eq!(
            try_map(&dev, &buf, 0, 8, FromDevice),
            Err(DmaError::Injected)
        );
        assert_eq!(
            try_map(&dev, &buf, 0, 8, FromDevice),
            Err(DmaError::Injected)
        );
        assert_eq!(dev.live_mappings(), 0);
        let m = map(&dev, &buf, FromDevice);
        unmap(&dev, m);
        let s = dev.stats();
        assert_eq!((s.maps, s.map_failures, s.injected_failures), (1, 2, 2));
        assert!(dev.verdict().is_clean());
    }

    #[test]
    fn fail_maps_every_kth() {
        let dev = CheckingDevice::builder().fail_maps_every(3).build();
        let buf = Buf::new(8);
        let results: Vec<bool> = (0..6)
            .map(|_| match try_map(&dev, &buf, 0, 8, FromDevice) {
                Ok(m) => {
                    unmap(&dev, m);
                    true
                }
                Err(e) => {
                    assert_eq!(e, DmaError::Injected);
                    false
                }
            })
            .collect();
        assert_eq!(results, [true, true, false, true, true, false]);
        dev.fail_maps_every(0);
        let m = map(&dev, &buf, FromDevice);
        unmap(&dev, m);
        assert_eq!(dev.stats().injected_failures, 2);
    }

    #[test]
    fn mapping_limit() {
        let dev = CheckingDevice::builder().mapping_limit(1).build();
        let a = Buf::new(8);
        let b = Buf::new(8);
        let m = map(&dev, &a, FromDevice);
        assert_eq!(
            try_map(&dev, &b, 0, 8, FromDevice),
            Err(DmaError::MappingLimit { limit: Some(1) })
        );
        unmap(&dev, m);
        let m = map(&dev, &b, FromDevice);
        unmap(&dev, m);
        dev.assert_clean();
    }

    #[test]
    #[should_panic(expected = "device driver unmaps DMA memory it never mapped")]
    fn panic_mode_panics_at_first_violation() {
        let dev = CheckingDevice::new(CheckMode::Panic);
        unmap(
            &dev,
            DmaMapping {
                addr: DmaAddr(IOVA_BASE),
                len: 1,
                direction: ToDevice,
            },
        );
    }

    #[test]
    #[should_panic(expected = "pending DMA allocations while released from device [count=1]")]
    fn panic_mode_panics_on_leak() {
        let dev = CheckingDevice::default();
        let buf = Buf::new(8);
        let _m = map(&dev, &buf, FromDevice);
        dev.on_unbind();
    }

    #[test]
    fn panic_mode_records_and_stays_usable() {
        let dev = CheckingDevice::new(CheckMode::Panic);
        let clone = dev.clone();
        let r = std::panic::catch_unwind(move || {
            clone.device_write(DmaAddr(1), &[0]).ok();
        });
        assert!(r.is_err());
        assert_eq!(dev.violations().len(), 1);
        let buf = Buf::new(8);
        let m = map(&dev, &buf, FromDevice);
        unmap(&dev, m);
        assert_eq!(dev.stats().violations, 1);
    }

    #[test]
    fn panic_mode_does_not_panic_while_unwinding() {
        struct UnmapOnDrop(CheckingDevice);
        impl Drop for UnmapOnDrop {
            fn drop(&mut self) {
                let bogus = DmaMapping {
                    addr: DmaAddr(IOVA_BASE),
                    len: 1,
                    direction: ToDevice,
                };
                unmap(&self.0, bogus);
            }
        }
        let dev = CheckingDevice::new(CheckMode::Panic);
        let guard = UnmapOnDrop(dev.clone());
        let r = std::panic::catch_unwind(move || {
            let _guard = guard;
            panic!("first");
        });
        assert_eq!(*r.unwrap_err().downcast::<&str>().unwrap(), "first");
        assert!(matches!(
            dev.violations()[..],
            [Violation::UnmapNotMapped { .. }]
        ));
    }

    #[test]
    #[should_panic(expected = "CheckingDevice found violations")]
    fn assert_clean_panics_with_report() {
        let dev = record();
        dev.on_unbind();
        dev.on_unbind();
        dev.assert_clean();
    }

    #[test]
    fn clones_share_one_device() {
        let dev = record();
        let ops: Box<dyn DmaOps> = Box::new(dev.clone());
        let buf = Buf::new(8);
        // SAFETY: `buf` outlives the mapping.
        let addr = unsafe { ops.map(buf.at(0), 8, FromDevice) }.unwrap();
        assert_eq!(dev.live_mappings(), 1);
        dev.device_write(addr, &[1; 8]).unwrap();
        // SAFETY: the checker touches no memory on unmap.
        unsafe {
            ops.unmap(DmaMapping {
                addr,
                len: 8,
                direction: FromDevice,
            })
        };
        ops.on_unbind();
        drop(ops);
        assert!(dev.is_unbound());
        assert_eq!(
            dev.verdict().to_string(),
            "0 violations, 0 live mappings (unbound)"
        );
    }

    #[test]
    fn call_delay_slows_every_call() {
        let dev = CheckingDevice::builder()
            .call_delay(Duration::from_millis(2))
            .build();
        let buf = Buf::new(8);
        let start = std::time::Instant::now();
        let m = map(&dev, &buf, FromDevice);
        assert!(start.elapsed() >= Duration::from_millis(4));
        dev.set_call_delay(Duration::ZERO);
        unmap(&dev, m);
        dev.assert_clean();
    }

    #[test]
    fn concurrent_use_from_threads() {
        let dev = CheckingDevice::new(CheckMode::Panic);
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let dev = dev.clone();
                std::thread::spawn(move || {
                    let buf = Buf::new(16);
                    for i in 0..4u8 {
                        let m = map(&dev, &buf, FromDevice);
                        dev.device_write(m.addr, &[t * 16 + i; 16]).unwrap();
                        sync_cpu(&dev, m, 0, 16);
                        dev.cpu_access(m, 0, 16, CpuAccess::Read);
                        assert_eq!(buf.read(), vec![t * 16 + i; 16]);
                        unmap(&dev, m);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(dev.stats().maps, 12);
        assert_eq!(dev.verdict().to_string(), "0 violations, 0 live mappings");
    }

    #[test]
    fn report_lists_violations() {
        let dev = CheckingDevice::builder()
            .mode(CheckMode::Record)
            .strict_sync_directions(true)
            .build();
        let buf = Buf::new(8);
        let m = map(&dev, &buf, ToDevice);
        sync_cpu(&dev, m, 0, 8);
        dev.device_write(m.addr, &[0]).ok();
        let report = dev.report();
        assert!(
            report.starts_with("2 violations, 1 live mapping\n"),
            "{report}"
        );
        assert!(
            report.contains(
                "violation 1: device driver calls sync_for_cpu on a DMA_TO_DEVICE mapping"
            ),
            "{report}"
        );
        assert!(
            report.contains("violation 2: IOMMU fault: device write"),
            "{report}"
        );
        assert!(format!("{dev:?}").contains("violations: 2"));
        // Taking keeps the count.
        assert_eq!(dev.take_violations().len(), 2);
        assert!(dev.violations().is_empty());
        assert_eq!(dev.verdict().violations, 2);
    }

    #[test]
    fn every_violation_displays() {
        let m = DmaMapping {
            addr: DmaAddr(IOVA_BASE),
            len: 8,
            direction: FromDevice,
        };
        let all = [
            Violation::InvalidMap {
                cpu_addr: 1,
                len: 0,
            },
            Violation::MapOverlap {
                cpu_addr: 1,
                len: 2,
                existing: m,
                existing_cpu_addr: 0,
            },
            Violation::UnmapInvalidAddress {
                len: 1,
                direction: ToDevice,
            },
            Violation::UnmapNotMapped {
                addr: m.addr,
                len: 1,
                direction: ToDevice,
            },
            Violation::DoubleUnmap {
                addr: m.addr,
                len: 1,
                direction: ToDevice,
            },
            Violation::UnmapSizeMismatch {
                addr: m.addr,
                mapped_len: 1,
                unmap_len: 2,
            },
            Violation::UnmapDirectionMismatch {
                addr: m.addr,
                len: 1,
                mapped: ToDevice,
                unmapped: FromDevice,
            },
            Violation::NotMapped {
                op: Op::SyncForCpu,
                addr: m.addr,
                offset: 0,
                len: 1,
            },
            Violation::OutOfRange {
                op: Op::SyncForDevice,
                addr: m.addr,
                mapped_len: 1,
                offset: 1,
                len: 1,
            },
            Violation::MappingLenMismatch {
                op: Op::CpuAccess,
                addr: m.addr,
                mapped_len: 1,
                given_len: 2,
            },
            Violation::MappingDirectionMismatch {
                op: Op::SyncForCpu,
                addr: m.addr,
                mapped: ToDevice,
                given: FromDevice,
            },
            Violation::SyncDirectionNotAllowed {
                op: Op::SyncForDevice,
                addr: m.addr,
                len: 1,
                direction: FromDevice,
            },
            Violation::CpuReadBeforeSync {
                addr: m.addr,
                offset: 0,
                len: 1,
                first_unsynced: 0,
            },
            Violation::DeviceReadBeforeSync {
                addr: m.addr,
                len: 1,
                first_unsynced: m.addr,
            },
            Violation::IommuFault {
                addr: m.addr,
                len: 1,
                access: DeviceAccess::Read,
                reason: FaultReason::Unmapped,
            },
            Violation::CallAfterUnbind { op: Op::Map },
            Violation::Leak {
                count: 1,
                example: m,
            },
        ];
        for v in &all {
            let text = v.to_string();
            assert!(text.contains("device") || text.starts_with("CPU"), "{text}");
        }
        assert!(all[11].to_string().contains("the device never reads it"));
        assert!(all[6]
            .to_string()
            .contains("[mapped as DMA_TO_DEVICE] [unmapped as DMA_FROM_DEVICE]"));
    }
}
