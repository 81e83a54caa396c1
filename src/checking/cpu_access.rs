//! The CPU-access hook: [`CpuAccessCheck`] and [`CpuAccess`], and how a
//! device picks its check when it is not given one ([`detect`]). The rules
//! are on [`CpuAccessCheck`].

use super::CheckingDevice;
use crate::dma::DmaMapping;

#[cfg(doc)]
use crate::{dma::DmaOps, Device};

/// How the CPU is about to touch a mapped range (see
/// [`CpuAccessCheck::cpu_access`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuAccess {
    /// The CPU reads the range.
    Read,
    /// The CPU writes the range.
    Write,
}

/// Told before the CPU reads or writes a mapped range through a pool page or
/// fragment: the hook a checking backend uses to catch a read of
/// device-written data before `sync_for_cpu` (and a device read of
/// CPU-written data before `sync_for_device`).
///
/// It is not part of [`DmaOps`]: real backends never see it, and a page
/// access on a device without a check costs one pointer test. A [`Device`]
/// holds at most one check, fixed when it is bound:
///
/// - [`Device::new`] and [`Device::new_untracked`] given a
///   [`CheckingDevice`] as the ops use that device as the check, so a test
///   that binds a checking device directly gets every CPU access checked
///   with no extra code;
/// - [`Device::with_cpu_access_check`] binds any ops with a check of your
///   choice: for a test backend that puts a checking device behind a
///   `DmaOps` of its own (which hides it from the detection above); pass a
///   clone of the checking device, or a handle of your own that forwards
///   to it;
/// - any other ops: no check, and a page access makes no call.
///
/// # When it is called
///
/// - Only inside a hold of the page's pool's call gate, exactly like a
///   device call: [`Device::unbind`] waits for a check in progress, and no
///   check runs or starts once `unbind` has returned.
/// - Before the CPU view is created, for a range that lies inside a live
///   mapping of the device; never for a page held across `unbind`.
/// - It may do what a [`DmaOps`] method may do (see
///   [what a callback may do](crate::dma#what-a-callback-may-do)). A check
///   that panics leaves the page as it was; the panic reaches the caller of
///   the page or fragment accessor.
pub trait CpuAccessCheck: Send + Sync + 'static {
    /// The CPU is about to read or write (`access`) `len` bytes from
    /// `offset` of `mapping`, a live mapping of the device.
    fn cpu_access(&self, mapping: DmaMapping, offset: usize, len: usize, access: CpuAccess);
}

/// The check a device binds with when it is not given one: the ops
/// themselves if they are a [`CheckingDevice`], else none.
pub(crate) fn detect(ops: &dyn core::any::Any) -> Option<Box<dyn CpuAccessCheck>> {
    ops.downcast_ref::<CheckingDevice>()
        .map(|checker| Box::new(checker.clone()) as Box<dyn CpuAccessCheck>)
}
