//! The handle: [`CheckingDevice`], its builder, and its [`DmaOps`] and
//! [`CpuAccessCheck`] impls.
//!
//! The handle only decides when and how a call runs; what the call does is
//! [`State`]'s business. Each call (see `CheckingDevice::call`) takes the
//! lock, asks the state whether the device is already unbound, runs the
//! state's check under the lock, releases the lock, and only then raises
//! the panic of [`CheckMode::Panic`] if the call reported a violation.
//!
//! # Invariants
//!
//! - **Concurrency.** All state sits behind one lock from
//!   `crate::sync`, so the device is `Send + Sync` and is modelled
//!   faithfully under loom. With a call delay, a call pauses (outside the
//!   lock) before it takes effect and again after, which widens both race
//!   windows; under loom a pause is a yield.
//! - **Unwinding.** A panic (in `Panic` mode) is raised only after the
//!   call's effect is complete and the lock released, and the lock does not
//!   poison, so the device stays consistent and usable across
//!   `catch_unwind`. A call made while its thread is already panicking only
//!   records, since a second panic would abort the process.

use core::fmt;
use core::ptr::NonNull;
use std::time::Duration;

use super::cpu_access::{CpuAccess, CpuAccessCheck};
use super::model::{State, DEFAULT_RETIRED_CAPACITY};
use super::report::{self, CheckingStats, LiveMapping, Verdict};
use super::violation::{CheckMode, Op, Violation};
use crate::dma::{
    DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, UnmapBatchError, UnmapError,
};
use crate::sync::{pause, Arc, Mutex};

#[cfg(doc)]
use super::MAX_RECORDED_VIOLATIONS;

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
    iommu_page: Option<usize>,
}

impl CheckingDeviceBuilder {
    /// Acts as a device behind an IOMMU whose smallest page is `bytes` (a
    /// power of two, at least 4096): reports it as
    /// [`DmaOps::min_page_size`], and refuses a `map` of memory not
    /// aligned to it or not a whole number of such pages with
    /// [`DmaError::Unaligned`], recording [`Violation::MapUnaligned`].
    /// Default: none (any page-aligned memory maps exactly).
    pub fn iommu_page(mut self, bytes: usize) -> Self {
        self.iommu_page = Some(bytes);
        self
    }

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
        let state = State::new(
            self.mode,
            self.call_delay,
            self.mapping_limit,
            self.fail_every,
            self.strict_sync_directions,
            self.retired_capacity,
        );
        let mut state = state;
        state.iommu_page = self.iommu_page;
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
            iommu_page: None,
        }
    }
}

/// A strict checking [`DmaOps`] backend with a simulated device; see the
/// [module documentation](crate::checking).
///
/// A cheap `Clone` handle: all clones share one device, so a test keeps a
/// clone for inspection and playing the device while another serves as a
/// pool's `DmaOps`.
///
/// ```
/// use pagepool::checking::{CheckMode, CheckingDevice, Violation};
/// use pagepool::{Device, DmaDirection};
///
/// // Record mode: violations are kept for the test to inspect.
/// let checker = CheckingDevice::new(CheckMode::Record);
/// let device = Device::new(checker.clone());
/// let mut rx = device.pool_builder().direction(DmaDirection::FromDevice).build()?;
/// let mut page = rx.alloc()?;
/// // Play the NIC: DMA a frame into the page.
/// checker.device_write(page.dma_addr(), b"hello")?;
/// // A driver bug: reading before `sync_for_cpu`.
/// let _ = page.as_slice()[0];
/// assert!(matches!(checker.violations()[..], [Violation::CpuReadBeforeSync { .. }]));
/// // The fix: sync first, then read what the device wrote.
/// page.sync_for_cpu(0..5)?;
/// assert_eq!(&page.as_slice()[..5], b"hello");
/// drop(page);
/// device.unbind()?;
/// assert_eq!(checker.live_mappings(), 0);
/// assert_eq!(checker.verdict().violations, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct CheckingDevice {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
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
            // The driver's line, where the pool's caller noted it (a page or
            // fragment access or sync); a call the pool makes on its own
            // (an unmap, a recycle's sync) has none.
            match crate::access_site::current() {
                Some(site) => panic!(
                    "{message}
  called at {site}"
                ),
                None => panic!("{message}"),
            }
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

    /// Makes the next `n` unmapped mappings fail with
    /// [`UnmapError::Injected`]: they stay mapped (the device can still
    /// reach them, and `on_unbind` reports them as leaked), as after a
    /// failed `VFIO_IOMMU_UNMAP_DMA`. Replaces any earlier count.
    pub fn fail_next_unmaps(&self, n: u64) {
        self.inner.state.lock().fail_next_unmaps = n;
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
        self.inner.state.lock().live_len()
    }

    /// The live mappings, by device address.
    pub fn live_mapping_list(&self) -> Vec<LiveMapping> {
        self.inner.state.lock().live_mapping_list()
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
            live_mappings: st.live_len(),
            unbound: st.unbound,
        }
    }

    /// A human-readable report: the verdict, the counters, and every
    /// recorded violation.
    pub fn report(&self) -> String {
        let verdict = self.verdict();
        let st = self.inner.state.lock();
        report::render(verdict, &st.stats, &st.violations)
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

    unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
        self.call(true, |st| {
            if !st.dead(Op::Unmap) {
                if st.fail_next_unmaps > 0 {
                    st.fail_next_unmaps -= 1;
                    st.stats.injected_unmap_failures += 1;
                    return Err(UnmapError::Injected);
                }
                st.unmap_one(mapping);
            }
            Ok(())
        })
    }

    unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) -> Result<(), UnmapBatchError> {
        self.call(true, |st| {
            let mut failed = UnmapBatchError::new();
            if !st.dead(Op::UnmapBatch) {
                st.stats.batch_unmaps += 1;
                for (index, m) in mappings.iter().enumerate() {
                    if st.fail_next_unmaps > 0 {
                        st.fail_next_unmaps -= 1;
                        st.stats.injected_unmap_failures += 1;
                        failed.push(index, UnmapError::Injected);
                        continue;
                    }
                    st.unmap_one(*m);
                }
            }
            failed.into_result()
        })
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

    fn on_unbind(&self) {
        self.call(true, |st| {
            if !st.dead(Op::OnUnbind) {
                st.on_unbind();
            }
        });
    }

    /// The IOMMU page set with [`CheckingDeviceBuilder::iommu_page`].
    fn min_page_size(&self) -> Option<usize> {
        self.inner.state.lock().iommu_page
    }
}

/// Checks the range and records a CPU write (for
/// [`Violation::DeviceReadBeforeSync`]); a read of bytes the device wrote
/// and nobody synced for the CPU is a [`Violation::CpuReadBeforeSync`].
impl CpuAccessCheck for CheckingDevice {
    fn cpu_access(&self, mapping: DmaMapping, offset: usize, len: usize, access: CpuAccess) {
        self.call(true, |st| {
            if !st.dead(Op::CpuAccess) {
                st.stats.cpu_accesses += 1;
                st.cpu_access(mapping, offset, len, access);
            }
        });
    }
}
