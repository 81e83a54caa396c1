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
    /// Slice the result (`Bytes::slice`) for the received frame. The page
    /// goes back to its pool when the last clone drops, on whichever
    /// thread.
    ///
    /// ```
    /// use pagepool::{Device, IdentityDma};
    ///
    /// let device = Device::new(IdentityDma::new());
    /// let mut rx = device.pool_builder().build()?;
    /// let mut page = rx.alloc()?;
    /// page.as_mut_slice()[..5].copy_from_slice(b"frame");
    /// let frame = page.into_bytes().slice(..5);
    /// let shared = frame.clone(); // a second protocol layer keeps a view
    /// assert_eq!(&shared[..], b"frame");
    /// drop(frame);
    /// assert_eq!(rx.stats().pages_held, 1, "still held by the clone");
    /// drop(shared);
    /// pagepool::flush_thread_returns();
    /// assert_eq!(rx.stats().pages_held, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(PageOwner(self))
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "bytes")))]
impl<M: TrackingMode> Frag<M> {
    /// Turns the fragment into `Bytes`, without copying. The page goes back
    /// to its pool when its last fragment (or clone of one) drops.
    ///
    /// ```
    /// use pagepool::{Device, IdentityDma};
    ///
    /// let device = Device::new(IdentityDma::new());
    /// let mut rx = device.pool_builder().build()?;
    /// let a = rx.alloc_frag(1024)?.into_bytes();
    /// let b = rx.alloc_frag(1024)?.into_bytes();
    /// assert_eq!((a.len(), b.len()), (1024, 1024));
    /// drop((a, b));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(FragOwner(self))
    }
}
