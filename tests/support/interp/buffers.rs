//! The buffers a logical thread holds (a page, a fragment, a `Bytes`), and
//! the pieces both runners use to sync and check them.
//!
//! Invariant: a buffer's content is checked only against the last range
//! that was written and synced into it; nothing here calls the model.

use std::ops::Range;

use pagepool::{DmaAddr, DmaDirection, Frag, Page, SyncError};

use super::faults::catching;

/// What a `Bytes` owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Under {
    Page,
    Frag,
}

/// A held buffer.
pub(super) enum Buf {
    Page(Page),
    Frag(Frag),
    #[cfg(feature = "bytes")]
    Bytes(bytes::Bytes),
}

impl Buf {
    pub(super) fn len(&self) -> usize {
        match self {
            Buf::Page(p) => p.len(),
            Buf::Frag(f) => f.len(),
            #[cfg(feature = "bytes")]
            Buf::Bytes(b) => b.len(),
        }
    }

    pub(super) fn read(&self) -> &[u8] {
        match self {
            Buf::Page(p) => p.as_slice(),
            Buf::Frag(f) => f.as_slice(),
            #[cfg(feature = "bytes")]
            Buf::Bytes(b) => b,
        }
    }

    pub(super) fn is_bytes(&self) -> bool {
        match self {
            Buf::Page(_) | Buf::Frag(_) => false,
            #[cfg(feature = "bytes")]
            Buf::Bytes(_) => true,
        }
    }

    /// What the buffer's page is to the pool: a whole page or a fragment
    /// page (a `Bytes` made of a page counts as a page).
    pub(super) fn kind(&self) -> Under {
        match self {
            Buf::Frag(_) => Under::Frag,
            _ => Under::Page,
        }
    }

    /// The page or fragment, to sync; `None` for an (immutable) `Bytes`.
    pub(super) fn syncable(&mut self) -> Option<&mut dyn SyncBuf> {
        match self {
            Buf::Page(p) => Some(p),
            Buf::Frag(f) => Some(f),
            #[cfg(feature = "bytes")]
            Buf::Bytes(_) => None,
        }
    }

    /// Panics unless the last range written and synced, `expect = (start,
    /// len, byte)`, still reads back.
    pub(super) fn check_content(&self, expect: Option<(usize, usize, u8)>, ctx: &str) {
        if let Some((start, len, tag)) = expect {
            let bytes = &self.read()[start..start + len];
            if let Some(i) = bytes.iter().position(|&b| b != tag) {
                panic!(
                    "{ctx}: content lost: byte {} of the buffer is {:#x}, expected {tag:#x}",
                    start + i,
                    bytes[i]
                );
            }
        }
    }
}

/// Drops every buffer, each on its own (a panicking drop does not turn the
/// drops after it into drops during unwinding), then raises the first
/// injected panic again.
pub(super) fn drop_each(bufs: Vec<Buf>) {
    let mut first = None;
    for buf in bufs {
        if let Err(injected) = catching(|| drop(buf)) {
            first.get_or_insert(injected);
        }
    }
    if let Some(injected) = first {
        std::panic::panic_any(injected);
    }
}

/// A page or a fragment, as a sync sees it.
pub(super) trait SyncBuf {
    fn dma(&self) -> DmaAddr;
    fn write(&mut self) -> &mut [u8];
    fn for_cpu(&mut self, r: Range<usize>) -> Result<(), SyncError>;
    fn for_device(&mut self, r: Range<usize>) -> Result<(), SyncError>;
}

/// `Page` and `Frag` share their sync API, method for method.
macro_rules! impl_sync_buf {
    ($($buf:ty),*) => {$(
        impl SyncBuf for $buf {
            fn dma(&self) -> DmaAddr {
                self.dma_addr()
            }
            fn write(&mut self) -> &mut [u8] {
                self.as_mut_slice()
            }
            fn for_cpu(&mut self, r: Range<usize>) -> Result<(), SyncError> {
                self.sync_for_cpu(r)
            }
            fn for_device(&mut self, r: Range<usize>) -> Result<(), SyncError> {
                self.sync_for_device(r)
            }
        }
    )*};
}

impl_sync_buf!(Page, Frag);

/// A sync range inside a buffer of `len` bytes, from two arbitrary numbers:
/// `(start, len)`, never empty.
pub(super) fn range_in(len: usize, start: u16, n: u16) -> (usize, usize) {
    let start = usize::from(start) % len;
    let n = 1 + usize::from(n) % (len - start);
    (start, n)
}

/// Whether a `Sync` op on a buffer of `direction` is the device writing
/// (then the CPU syncs for the CPU) or the CPU writing (then syncs for the
/// device); `to_device` decides for a bidirectional buffer.
pub(super) fn device_writes(direction: DmaDirection, to_device: bool) -> bool {
    match direction {
        DmaDirection::FromDevice => true,
        DmaDirection::ToDevice => false,
        DmaDirection::Bidirectional => !to_device,
    }
}
