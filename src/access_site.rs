//! Where the pool's caller is while the pool reports a CPU access or makes
//! a sync for it, so that a checking backend's report points at the
//! driver's line, not at the pool's internals.
//!
//! The page and fragment accessors and syncs are `#[track_caller]`; when
//! their device has a CPU-access check bound (tests), they note the
//! caller's location here for the duration of that one check or device
//! call. Real backends never look, and the accessors of a page on one pay
//! nothing beyond the flag test they make anyway.
//!
//! # Invariants
//!
//! - A noted site is the calling thread's and lives only while the guard
//!   that noted it does; nested calls restore the outer site when they end.

use core::cell::Cell;
use core::panic::Location;

use crate::sync::per_thread;

per_thread! {
    static SITE: Cell<Option<&'static Location<'static>>> = const { Cell::new(None) };
}

/// The site noted by [`note`], until dropped.
pub(crate) struct Noted(Option<&'static Location<'static>>);

/// Notes the location of the outermost `#[track_caller]` caller.
#[track_caller]
#[inline]
pub(crate) fn note() -> Noted {
    let here = Location::caller();
    Noted(SITE.with(|site| site.replace(Some(here))))
}

impl Drop for Noted {
    fn drop(&mut self) {
        let outer = self.0;
        SITE.with(|site| site.set(outer));
    }
}

/// The site noted on this thread, if a page access or sync is in progress.
pub(crate) fn current() -> Option<&'static Location<'static>> {
    SITE.with(Cell::get)
}
