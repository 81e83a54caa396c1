//! Events for the optional `tracing` feature: pool created and destroyed,
//! unbind started and finished, map failures, the ring full, pools
//! detached while still holding pages (Linux's "zombie" pools).
//!
//! # Invariants
//!
//! - Without the feature, [`event!`] expands to nothing: its arguments are
//!   not evaluated and no code is generated, so the pool pays nothing.
//! - Every event has the target `pagepool`, so a subscriber can filter the
//!   crate's events with one directive (`pagepool=debug`).
//! - No event is emitted while a pool lock is held or from inside a gate
//!   hold: a subscriber is user code, like a callback.

/// Emits a `tracing` event at `$level` (`trace`, `debug`, `info`, `warn`)
/// with the target `pagepool`, when the `tracing` feature is on; nothing
/// otherwise.
macro_rules! event {
    ($level:ident, $($arg:tt)+) => {
        #[cfg(feature = "tracing")]
        {
            ::tracing::$level!(target: "pagepool", $($arg)+);
        }
    };
}

pub(crate) use event;
