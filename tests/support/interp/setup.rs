//! What both runners build, and the checks both make once everything is
//! dropped.
//!
//! Invariant: both runners see the same world: one checking device in
//! record mode behind the faulty backend, one `Device` on it, one page
//! source for every pool, one fault slot shared by the backend and the
//! page source.

use pagepool::checking::{CheckMode, CheckingDevice};
use pagepool::{BuildError, Device, PagePool};

use super::faults::{quiet_injected_panics, Faults, FaultyOps, FaultyPages};
use super::ops::{Config, PoolCfg};

/// The device, its backend and the page source of one run.
pub(super) struct World {
    pub(super) checking: CheckingDevice,
    pub(super) faults: Faults,
    pub(super) source: FaultyPages,
    pub(super) device: Device,
}

impl World {
    /// A fresh world for `cfg` (no pool built yet); injected panics are
    /// kept out of the panic hook's output from now on.
    pub(super) fn new(cfg: &Config) -> Self {
        quiet_injected_panics();
        let checking = CheckingDevice::builder()
            .mode(CheckMode::Record)
            .strict_sync_directions(cfg.strict_sync_directions())
            .build();
        let faults = Faults::default();
        let source = FaultyPages::new(faults.clone());
        // The wrapper hides the checking device from `Device::new`: hand it
        // over as the CPU-access check.
        let device = Device::with_cpu_access_check(
            FaultyOps::new(checking.clone(), faults.clone()),
            checking.clone(),
        );
        Self {
            checking,
            faults,
            source,
            device,
        }
    }
}

/// Builds a pool of configuration `cfg` on `device`, its pages from
/// `source`.
pub(super) fn build_pool(
    device: &Device,
    cfg: &PoolCfg,
    source: &FaultyPages,
) -> Result<PagePool, BuildError> {
    let mut b = device
        .pool_builder()
        .order(cfg.order)
        .cache_size(cfg.cache_size)
        .refill_batch(cfg.refill_batch)
        .ring_size(cfg.ring_size)
        .direction(cfg.direction)
        .page_source(source.clone());
    if let Some((offset, max_len)) = cfg.sync {
        b = b.sync_for_device(offset, max_len);
    }
    b.build()
}

/// The end of a run, with every buffer, pool and the device dropped: every
/// page block freed exactly once, no mapping left, the device unbound with
/// no call after it, zero violations.
#[track_caller]
pub(super) fn assert_torn_down(source: &FaultyPages, checking: &CheckingDevice) {
    source.counting().assert_all_freed_once();
    assert_eq!(checking.live_mappings(), 0);
    assert!(checking.is_unbound());
    assert_eq!(checking.stats().calls_after_unbind, 0);
    checking.assert_clean();
}
