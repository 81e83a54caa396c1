//! The simulated IOMMU: the device-address space, the records of live and
//! recently unmapped mappings, the device-side shadow of each live mapping
//! with its per-byte sync marks, and every check. All of it is [`State`],
//! which [`CheckingDevice`] keeps behind its one lock; the handle only
//! decides when a call runs, this module decides what it does.
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

use core::ops::Range;
use core::ptr::NonNull;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use super::cpu_access::CpuAccess;
use super::report::{CheckingStats, LiveMapping};
use super::violation::{CheckMode, DeviceAccess, FaultReason, Op, Violation};
use crate::dma::{DmaAddr, DmaDirection, DmaError, DmaMapping};

#[cfg(doc)]
use super::CheckingDevice;
#[cfg(doc)]
use crate::dma::DmaOps;

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
        let src = self.cpu.0.as_ptr().wrapping_add(range.start);
        let dst = self.shadow[range].as_mut_ptr();
        // SAFETY: by the caller's promise the mapping is live, so by the
        // `DmaOps::map` contract `cpu..cpu+len` is valid memory; `range` is
        // inside `0..len`, and no CPU reference aliases it during this call.
        // The shadow is our own allocation of `len` bytes, so the two do not
        // overlap.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, n) };
    }

    /// Copies the shadow into CPU memory for `range`.
    ///
    /// # Safety
    /// The entry is live in the checker's records, `range` lies inside it,
    /// and no CPU reference to that memory exists during the call
    /// (`sync_for_cpu` contract).
    unsafe fn copy_to_cpu(&mut self, range: Range<usize>) {
        let n = range.len();
        let src = self.shadow[range.clone()].as_ptr();
        let dst = self.cpu.0.as_ptr().wrapping_add(range.start);
        // SAFETY: as in `copy_from_cpu`: the memory is valid while mapped
        // (`DmaOps::map` contract), `range` is inside it, and the
        // `sync_for_cpu` contract lets the backend write the range since no
        // CPU reference to it exists during the call.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, n) };
    }
}

/// Everything the device knows, behind the one lock of [`CheckingDevice`].
pub(super) struct State {
    pub(super) mode: CheckMode,
    pub(super) call_delay: Duration,
    mapping_limit: Option<usize>,
    /// Maps still to fail (`fail_next_maps`).
    pub(super) fail_next: u64,
    /// Fail every k-th map attempt (0: never).
    pub(super) fail_every: u64,
    /// Map attempts that reached failure injection.
    pub(super) map_attempts: u64,
    /// Unmaps still to fail (`fail_next_unmaps`): the mapping stays live.
    pub(super) fail_next_unmaps: u64,
    /// The smallest IOMMU page this device reports (`iommu_page`), if any.
    pub(super) iommu_page: Option<usize>,
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
    pub(super) violations: Vec<Violation>,
    /// In `Panic` mode: the text of the first violation of this call.
    pub(super) panic_message: Option<String>,
    pub(super) stats: CheckingStats,
    pub(super) unbound: bool,
}

impl State {
    /// A bound device with nothing mapped, set up as the builder says.
    pub(super) fn new(
        mode: CheckMode,
        call_delay: Duration,
        mapping_limit: Option<usize>,
        fail_every: u64,
        strict_sync_directions: bool,
        retired_capacity: usize,
    ) -> Self {
        Self {
            mode,
            call_delay,
            mapping_limit,
            fail_next: 0,
            fail_every,
            map_attempts: 0,
            fail_next_unmaps: 0,
            iommu_page: None,
            strict_sync_directions,
            retired_capacity,
            next_iova: IOVA_BASE,
            live: BTreeMap::new(),
            by_cpu: BTreeMap::new(),
            retired: BTreeSet::new(),
            retired_order: VecDeque::new(),
            violations: Vec::new(),
            panic_message: None,
            stats: CheckingStats::default(),
            unbound: false,
        }
    }

    /// How many mappings are live.
    pub(super) fn live_len(&self) -> usize {
        self.live.len()
    }

    /// The live mappings, by device address.
    pub(super) fn live_mapping_list(&self) -> Vec<LiveMapping> {
        self.live
            .iter()
            .map(|(&addr, e)| LiveMapping {
                mapping: e.mapping(addr),
                cpu_addr: e.cpu.0.as_ptr().addr(),
                unsynced_device_bytes: e.count_marked(DEVICE_DIRTY),
            })
            .collect()
    }

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
    pub(super) fn dead(&mut self, op: Op) -> bool {
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
    pub(super) unsafe fn map(
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
        if let Some(iommu_page) = self.iommu_page {
            if cpu_addr % iommu_page != 0 || len % iommu_page != 0 {
                self.report(Violation::MapUnaligned {
                    cpu_addr,
                    len,
                    iommu_page,
                });
                return Err(DmaError::Unaligned { iommu_page });
            }
        }
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

    pub(super) fn unmap_one(&mut self, m: DmaMapping) {
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
    pub(super) unsafe fn sync(&mut self, op: Op, m: DmaMapping, offset: usize, len: usize) {
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

    pub(super) fn cpu_access(
        &mut self,
        m: DmaMapping,
        offset: usize,
        len: usize,
        access: CpuAccess,
    ) {
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

    pub(super) fn device_write(&mut self, addr: DmaAddr, data: &[u8]) -> Result<(), Violation> {
        let (start, range) = self.device_access(addr, data.len(), DeviceAccess::Write)?;
        let entry = self.live.get_mut(&start).expect("checked live");
        entry.shadow[range.clone()].copy_from_slice(data);
        entry.clear_marks(range.clone(), CPU_DIRTY);
        entry.set_marks(range, DEVICE_DIRTY);
        Ok(())
    }

    pub(super) fn device_read(&mut self, addr: DmaAddr, len: usize) -> Result<Vec<u8>, Violation> {
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

    pub(super) fn on_unbind(&mut self) {
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
