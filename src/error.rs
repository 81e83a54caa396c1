//! Typed errors of the public API.
//!
//! Every error names what went wrong and, where the caller can act on it,
//! what to do. None of them carries a `String`: callers match on variants.

use core::fmt;

use crate::dma::DmaError;

/// A pool configuration value the builder rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The builder method / field that holds the bad value.
    pub field: &'static str,
    /// The value given.
    pub value: usize,
    /// What the field accepts.
    pub expected: &'static str,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid page pool configuration: {} = {} (expected {})",
            self.field, self.value, self.expected
        )
    }
}

impl std::error::Error for ConfigError {}

/// Why a pool could not be built.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// A configuration value is out of range.
    Config(ConfigError),
    /// The device was unbound; no new pool can be created on it.
    Unbound,
    /// The pool maps page by page, and its pages are smaller than the
    /// smallest page the device's IOMMU maps: mapping one would expose its
    /// neighbours to the device. Use a higher page order, or a
    /// region-mapped pool.
    PageBelowIommuPage {
        /// The pool's page length.
        page_len: usize,
        /// The IOMMU's smallest page ([`DmaOps::min_page_size`](crate::DmaOps::min_page_size)).
        iommu_page: usize,
    },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => e.fmt(f),
            Self::Unbound => f.write_str("cannot create a page pool: the device is unbound"),
            Self::PageBelowIommuPage {
                page_len,
                iommu_page,
            } => write!(
                f,
                "cannot create a page pool: {page_len}-byte pages are smaller than the IOMMU's {iommu_page}-byte page (raise the order or map regions)"
            ),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Config(e) => Some(e),
            Self::Unbound | Self::PageBelowIommuPage { .. } => None,
        }
    }
}

impl From<ConfigError> for BuildError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

/// Why an allocation from a pool failed. Nothing is leaked in any case.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllocError {
    /// The pool's device has been unbound: no page can be mapped any more.
    Unbound,
    /// The device refused to map a fresh page.
    Map(DmaError),
    /// The page memory source had no memory for a page of this many bytes.
    OutOfMemory {
        /// Size of the page that could not be allocated.
        bytes: usize,
    },
    /// A fragment of this size does not fit in one page of the pool.
    FragmentSize {
        /// The size asked for.
        requested: usize,
        /// The pool's page size.
        page_len: usize,
    },
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unbound => f.write_str("page pool allocation failed: the device is unbound"),
            Self::Map(e) => write!(f, "page pool allocation failed: DMA map: {e}"),
            Self::OutOfMemory { bytes } => {
                write!(f, "page pool allocation failed: out of memory for a {bytes}-byte page")
            }
            Self::FragmentSize { requested, page_len } => write!(
                f,
                "fragment of {requested} bytes does not fit a {page_len}-byte page (must be 1..={page_len})"
            ),
        }
    }
}

impl std::error::Error for AllocError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Map(e) => Some(e),
            _ => None,
        }
    }
}

/// Why a sync of a page range failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncError {
    /// The range does not lie inside the buffer.
    OutOfRange {
        /// Start of the range asked for.
        start: usize,
        /// End (exclusive) of the range asked for.
        end: usize,
        /// Length of the buffer.
        len: usize,
    },
    /// The device is unbound: the page is no longer mapped, so there is
    /// nothing to sync (the CPU owns the memory for good).
    Unbound,
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfRange { start, end, len } => {
                write!(
                    f,
                    "sync range {start}..{end} is outside the {len}-byte buffer"
                )
            }
            Self::Unbound => f.write_str("nothing to sync: the device is unbound"),
        }
    }
}

impl std::error::Error for SyncError {}

/// Why [`Device::unbind`](crate::Device::unbind) did nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnbindError {
    /// `unbind` was already called on this device (by this or another
    /// thread); when this is returned, that earlier unbind has finished.
    AlreadyUnbound,
    /// `unbind` was called from inside a callback of this device: a
    /// [`DmaOps`](crate::DmaOps) method the pool is running for it (on this
    /// thread), or a callback that this thread's `unbind` of it runs.
    /// Waiting there would wait for the caller itself, so it returns at once
    /// and unbinds nothing; call `unbind` once the callback has returned
    /// (from the driver's remove path, or another thread), or drop the last
    /// [`Device`](crate::Device) handle, which defers the unbind until the
    /// callback returns. Callbacks of other devices are not refused (except
    /// past a nesting depth no driver reaches: more than 20 device calls
    /// nested on one thread, or 16 inside a thread-local destructor, where
    /// the thread no longer tells devices apart).
    InsideCallback,
}

impl fmt::Display for UnbindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AlreadyUnbound => "the device is already unbound",
            Self::InsideCallback => {
                "cannot unbind a device from inside one of its own callbacks; unbind after it returns"
            }
        })
    }
}

impl std::error::Error for UnbindError {}
