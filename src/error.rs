//! Typed errors of the public API.
//!
//! Every error names what went wrong and, where the caller can act on it,
//! what to do. None of them carries a `String`: callers match on variants.

use core::fmt;

use crate::dma::DmaError;

/// A pool configuration the builder rejected. Each variant names the
/// builder settings involved, as the caller wrote them.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A value outside what its setting accepts.
    OutOfRange {
        /// The builder method that set the value.
        field: &'static str,
        /// The value given.
        value: usize,
        /// What the setting accepts.
        expected: &'static str,
    },
    /// Two settings that cannot be used together.
    Conflict {
        /// The setting that cannot be used here.
        field: &'static str,
        /// The setting it conflicts with.
        with: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
    /// A region-mapped pool whose pages do not fit in its regions: the
    /// page order asks for larger pages than the region size holds.
    PageLargerThanRegion {
        /// The page order set.
        order: u32,
        /// Bytes per page at that order.
        page_len: usize,
        /// Bytes per region.
        region_len: usize,
        /// Whether the region size is the default
        /// ([`DEFAULT_REGION_SIZE`](crate::DEFAULT_REGION_SIZE)) rather than
        /// one set with `region_size`.
        region_len_is_default: bool,
    },
}

impl ConfigError {
    /// The builder setting at fault (the first one, for a conflict).
    pub fn field(&self) -> &'static str {
        match self {
            Self::OutOfRange { field, .. } | Self::Conflict { field, .. } => field,
            Self::PageLargerThanRegion { .. } => "order",
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfRange {
                field,
                value,
                expected,
            } => write!(
                f,
                "invalid page pool configuration: {field} = {value} (expected {expected})"
            ),
            Self::Conflict { field, with, hint } => write!(
                f,
                "invalid page pool configuration: {field} cannot be used with {with} ({hint})"
            ),
            Self::PageLargerThanRegion {
                order,
                page_len,
                region_len,
                region_len_is_default,
            } => write!(
                f,
                "invalid page pool configuration: order {order} makes {page_len}-byte pages, larger than the {}region size of {region_len} bytes (set region_size to at least {page_len}, or lower the order)",
                if *region_len_is_default { "default " } else { "" }
            ),
        }
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
    /// The device's backend reported a smallest IOMMU page
    /// ([`DmaOps::min_page_size`](crate::DmaOps::min_page_size)) that is not
    /// a power of two: no page or region can be aligned to it. A defect of
    /// the backend, not of the pool's configuration.
    InvalidIommuPage {
        /// What the backend reported.
        min_page_size: usize,
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
            Self::InvalidIommuPage { min_page_size } => write!(
                f,
                "cannot create a page pool: the device's backend reports a smallest IOMMU page of {min_page_size} bytes, which is not a power of two"
            ),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Config(e) => Some(e),
            Self::Unbound | Self::PageBelowIommuPage { .. } | Self::InvalidIommuPage { .. } => None,
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
    /// The page (or region) source returned memory not aligned to the
    /// device's IOMMU page: mapping it would expose the memory around it to
    /// the device, so it went back to its source unmapped. Align the
    /// source's blocks to their size (see [`PageSource`](crate::PageSource)
    /// and [`RegionSource`](crate::RegionSource)).
    Misaligned {
        /// The alignment needed: the IOMMU's smallest page.
        align: usize,
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
            Self::Misaligned { align } => write!(
                f,
                "page pool allocation failed: the page source's memory is not aligned to the \
                 {align}-byte IOMMU page"
            ),
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
