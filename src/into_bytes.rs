//! Zero-copy conversion of pool buffers into [`bytes::Bytes`] (feature
//! `bytes`).
//!
//! The `Bytes` owns the [`Page`] or [`Frag`]; clones share it, and the
//! buffer goes back to its pool when the last clone drops, on whatever
//! thread that happens.
//!
//! # Invariants
//!
//! - The `Bytes` views exactly the buffer's memory, which stays valid (and
//!   unchanged by the pool) while the owner lives, even across `unbind`.
//! - Convert after the device is done with the buffer (after
//!   `sync_for_cpu`): `Bytes` is an immutable view.

use bytes::Bytes;

use crate::frag::Frag;
use crate::mode::TrackingMode;
use crate::page::Page;

/// Owner handed to `Bytes::from_owner`: derefs to the buffer.
struct PageOwner<M: TrackingMode>(Page<M>);

impl<M: TrackingMode> AsRef<[u8]> for PageOwner<M> {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

struct FragOwner<M: TrackingMode>(Frag<M>);

impl<M: TrackingMode> AsRef<[u8]> for FragOwner<M> {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "bytes")))]
impl<M: TrackingMode> Page<M> {
    /// Turns the page into `Bytes` over its whole length, without copying.
    /// Slice the result (`Bytes::slice`) for the received frame.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(PageOwner(self))
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "bytes")))]
impl<M: TrackingMode> Frag<M> {
    /// Turns the fragment into `Bytes`, without copying.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(FragOwner(self))
    }
}
