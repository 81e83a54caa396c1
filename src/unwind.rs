//! Cleanup that survives a panicking callback.
//!
//! Every `DmaOps` and `PageSource` method is user code and may panic. Where
//! the pool must finish a sequence of steps whatever one step does (free
//! every page of a batch, unmap every mapping at `unbind`, retire the ops),
//! it runs each step through [`Panics::run`], which catches a panic, keeps
//! the first one, and goes on; [`Panics::resume`] rethrows it once the
//! sequence is complete.
//!
//! # Invariants
//!
//! - Every step runs, in order, whatever the earlier ones did.
//! - The first panic reaches the caller unchanged, after the last step; a
//!   thread that is already unwinding (the cleanup runs from a destructor)
//!   drops it instead, since a second panic would abort the process.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

/// The first panic of a cleanup sequence, if any. See the
/// [module docs](self).
#[must_use = "resume the first panic once the cleanup is complete"]
pub(crate) struct Panics {
    first: Option<Box<dyn Any + Send + 'static>>,
}

impl Panics {
    pub(crate) const fn new() -> Self {
        Self { first: None }
    }

    /// Runs one step; a panic in it is kept (if it is the first) and the
    /// sequence goes on. Returns the step's result, if it did not panic.
    pub(crate) fn run<R>(&mut self, step: impl FnOnce() -> R) -> Option<R> {
        // The steps leave nothing half-updated that a later step reads:
        // each one either completed or counts as made (see `DmaOps`).
        match catch_unwind(AssertUnwindSafe(step)) {
            Ok(value) => Some(value),
            Err(payload) => {
                self.first.get_or_insert(payload);
                None
            }
        }
    }

    /// Whether a step panicked.
    #[cfg(test)]
    pub(crate) fn any(&self) -> bool {
        self.first.is_some()
    }

    /// Rethrows the first panic, unless the thread is already unwinding.
    pub(crate) fn resume(self) {
        if let Some(payload) = self.first {
            if !std::thread::panicking() {
                resume_unwind(payload);
            }
        }
    }
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use super::*;

    #[test]
    fn every_step_runs_and_the_first_panic_comes_back() {
        let mut ran = Vec::new();
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut panics = Panics::new();
            panics.run(|| ran.push(1));
            panics.run(|| -> () { panic!("first") });
            panics.run(|| ran.push(2));
            panics.run(|| -> () { panic!("second") });
            assert!(panics.any());
            panics.resume();
        }));
        assert_eq!(ran, [1, 2]);
        let payload = result.unwrap_err();
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"first"));
    }

    #[test]
    fn no_panic_no_resume() {
        let mut panics = Panics::new();
        assert_eq!(panics.run(|| 5), Some(5));
        assert!(!panics.any());
        panics.resume();
    }
}
