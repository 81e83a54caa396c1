//! The rig most tests start from, and the teardown they end with: a
//! checking device (as [`checker`] configures it), a `Device` on it, and
//! guarded page memory for the pools; at the end, the device unbound,
//! everything dropped, and the invariants checked.

use std::sync::Arc;

use pagepool::checking::{CheckingDevice, CpuAccessCheck};
use pagepool::{Device, DmaOps, PagePool, PagePoolBuilder};

use super::checks::{assert_unbound_clean, checker, GuardedPages, SpyOps, SpyState};

/// A device on a checking device, and page memory for its pools.
pub struct Rig {
    /// The checking device the device maps through (directly, or behind a
    /// wrapper such as [`SpyOps`]).
    pub checker: CheckingDevice,
    /// Page memory for the pools of [`Rig::builder`] and [`Rig::pool`]:
    /// every block must be freed exactly once, and never while mapped.
    pub pages: GuardedPages,
    /// Shared, so that threads can unbind it.
    pub device: Arc<Device>,
}

impl Rig {
    /// A device straight on a fresh [`checker`].
    pub fn new() -> Self {
        Self::on(checker())
    }

    /// A device straight on `checker` (one configured otherwise: a call
    /// delay, a mapping limit).
    pub fn on(checker: CheckingDevice) -> Self {
        let device = Device::new(checker.clone());
        Self::with_device(checker, device)
    }

    /// A device on `ops`, a wrapper around `checker`, whose CPU accesses
    /// `check` checks (`checker` itself, or a wrapper's handle on it).
    pub fn over(checker: CheckingDevice, ops: impl DmaOps, check: impl CpuAccessCheck) -> Self {
        let device = Device::with_cpu_access_check(ops, check);
        Self::with_device(checker, device)
    }

    /// `device`, bound on `checker` (directly or through a wrapper).
    fn with_device(checker: CheckingDevice, device: Device) -> Self {
        Self {
            pages: GuardedPages::new(&checker),
            device: Arc::new(device),
            checker,
        }
    }

    /// A device on a [`SpyOps`] around a fresh [`checker`]; the spy's
    /// record comes with it.
    pub fn spied() -> (Self, Arc<SpyState>) {
        Self::spied_on(checker())
    }

    /// A device on a [`SpyOps`] around `checker`.
    pub fn spied_on(checker: CheckingDevice) -> (Self, Arc<SpyState>) {
        let (spy, state) = SpyOps::new(&checker);
        (Self::with_device(checker, spy.into_device()), state)
    }

    /// A pool builder whose pages come from the rig's page memory.
    pub fn builder(&self) -> PagePoolBuilder<'_> {
        self.device.pool_builder().page_source(self.pages.clone())
    }

    /// A pool of the default configuration on the rig's page memory.
    pub fn pool(&self) -> PagePool {
        self.builder().build().unwrap()
    }

    /// What must hold at the end, the device unbound and every pool and
    /// page dropped: invariants 1 and 2 as the checker sees them
    /// ([`assert_unbound_clean`]) and invariant 4 (every block freed
    /// exactly once, none while mapped).
    #[track_caller]
    pub fn assert_clean(&self) {
        assert_unbound_clean(&self.checker);
        self.pages.assert_all_freed_once_unmapped();
    }

    /// The teardown: unbinds the device (unless the test already has),
    /// then drops `rest` (the pools and pages the test still holds, in
    /// tuple order), then [`Rig::assert_clean`].
    #[track_caller]
    pub fn finish<T>(self, rest: T) {
        if self.device.is_bound() {
            self.device.unbind().unwrap();
        }
        drop(rest);
        self.assert_clean();
    }
}
