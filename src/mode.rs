//! Tracking on or off: a type parameter of [`Device`](crate::Device) and
//! everything built on it, so the pool's code has no runtime branch on it.
//!
//! # Invariants
//!
//! - Only [`Tracked`] keeps every invariant of the crate; [`Untracked`]
//!   exists to measure what tracking costs.

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Tracked {}
    impl Sealed for super::Untracked {}
}

/// Whether a device records its mappings: a build-time choice, made by the
/// type, so the pool's code has no runtime branch on it.
pub trait TrackingMode: sealed::Sealed + Send + Sync + Sized + 'static {
    /// Whether mappings are recorded in the in-flight tracker.
    const TRACKED: bool;
}

/// Every mapping is recorded; `unbind` unmaps pages held anywhere. The
/// default, and the only mode that keeps all of the crate's invariants.
#[derive(Debug)]
pub enum Tracked {}

/// No tracking: for measuring what tracking costs, and nothing else.
///
/// `unbind` can then unmap only the pages in the rings; pages held outside
/// keep their mappings forever, and their memory is leaked when they come
/// back rather than freed while mapped (Linux before 2025, minus the crash).
/// [`UnbindReport::mappings_left`](crate::UnbindReport::mappings_left) counts them.
#[derive(Debug)]
pub enum Untracked {}

impl TrackingMode for Tracked {
    const TRACKED: bool = true;
}
impl TrackingMode for Untracked {
    const TRACKED: bool = false;
}
