//! The device gate: who may call the device's [`DmaOps`], and until when.
//!
//! Every device call made outside `unbind` (map on the slow path, unmap of a
//! page leaving its pool, syncs) runs inside [`DeviceGate::enter`], a shared
//! (read) hold on the ops. `unbind` takes the exclusive (write) hold with
//! [`DeviceGate::close`]: that waits for the calls already running, and only
//! for them, since each is one bounded device call, never for a page holder.
//! Holding it, `unbind` unmaps what is left, then drops the ops.
//!
//! # Invariants
//!
//! - Once `close` has taken the ops, `enter` returns `None` forever: no
//!   device method runs after `unbind` returns (invariant 2).
//! - The lock is task-fair (`parking_lot`), so a stream of readers cannot
//!   starve `unbind` (invariant 3).
//! - Lock order is gate, then a pool's ring, then a tracker shard. No code
//!   takes the gate while holding a ring or shard lock, and no code holds
//!   the gate while waiting for a page holder.

use core::ops::Deref;

use crate::dma::DmaOps;
use crate::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

type Slot = Option<Box<dyn DmaOps>>;

/// The ops of one device behind a reader-writer lock.
pub(crate) struct DeviceGate {
    ops: RwLock<Slot>,
}

/// A shared hold on live ops: device calls may be made through it.
pub(crate) struct OpsGuard<'a>(RwLockReadGuard<'a, Slot>);

impl Deref for OpsGuard<'_> {
    type Target = dyn DmaOps;

    fn deref(&self) -> &Self::Target {
        // `enter` only builds a guard over `Some`, and the slot cannot change
        // while a read guard lives.
        self.0.as_deref().expect("OpsGuard over live ops")
    }
}

/// The exclusive hold `unbind` works under.
pub(crate) struct ClosingGuard<'a>(RwLockWriteGuard<'a, Slot>);

impl ClosingGuard<'_> {
    /// The ops, if the device was still bound when the hold was taken.
    pub(crate) fn ops(&self) -> Option<&dyn DmaOps> {
        self.0.as_deref()
    }

    /// Drops the ops: the gate is closed for good.
    pub(crate) fn retire(mut self) {
        let ops = self.0.take();
        drop(self);
        drop(ops);
    }
}

impl DeviceGate {
    pub(crate) fn new(ops: Box<dyn DmaOps>) -> Self {
        Self {
            ops: RwLock::new(Some(ops)),
        }
    }

    /// A shared hold on the ops, or `None` once the device is unbound.
    pub(crate) fn enter(&self) -> Option<OpsGuard<'_>> {
        let guard = self.ops.read();
        guard.is_some().then(|| OpsGuard(guard))
    }

    /// The exclusive hold: waits for device calls already running.
    pub(crate) fn close(&self) -> ClosingGuard<'_> {
        ClosingGuard(self.ops.write())
    }
}
