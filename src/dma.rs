//! The seam between the pool and a device: [`DmaOps`].
//!
//! A backend maps CPU memory for a device and hands back the device-visible
//! address ([`DmaAddr`]); it unmaps, and it syncs ownership of a sub-range
//! between CPU and device. Everything the pool knows about hardware goes
//! through this trait, so the same pool runs on VFIO, on the
//! [`CheckingDevice`](crate::checking::CheckingDevice), or on a backend of
//! your own.
//!
//! # The backend's contract
//!
//! - `map` either returns an address under which the device sees exactly the
//!   `len` bytes at `cpu`, or an error and leaves nothing mapped.
//! - `unmap` / `unmap_batch` tear down exactly the mappings named, and never
//!   write CPU memory (pages held outside the pool may be read by their
//!   holders while the device unbinds; only `sync_for_cpu` may copy into
//!   CPU memory).
//! - An unmap that did not happen, or may not have happened completely
//!   (the system call failed, or removed less than asked), is reported:
//!   `unmap` returns an [`UnmapError`], `unmap_batch` an
//!   [`UnmapBatchError`] naming every mapping of the batch that may still
//!   be mapped. When in doubt, report: a mapping wrongly reported as failed
//!   only keeps its memory allocated, one wrongly reported as done lets the
//!   pool free memory the device can still reach.
//! - `map` is given memory aligned to [`min_page_size`](DmaOps::min_page_size)
//!   and a whole number of such pages; a backend that cannot map exactly
//!   `len` bytes refuses anything else ([`DmaError::Unaligned`]) rather
//!   than map more than it was given.
//! - Every method may be called from any thread, concurrently with any
//!   other method, for different mappings.
//! - `on_unbind` is the last call the pool ever makes; after it returns the
//!   pool drops its handle to the backend.
//! - Return when done: `unbind` waits for every call already in progress
//!   (and only for those), so a call that blocks makes `unbind` wait for it.
//!
//! # What a callback may do
//!
//! The pool calls every method outside its own locks, each inside a hold of
//! the calling pool's call gate that covers this one call. From inside any
//! method a backend may:
//!
//! - **panic.** The pool treats a call that panicked as made and never
//!   repeats it: a panicking `map` mapped nothing (its page memory goes back
//!   to the page source, so it must not stay mapped), a panicking `unmap` or
//!   `unmap_batch` unmapped what it was given, a panicking sync synced. The
//!   pool's state stays consistent and the panic reaches the pool's caller;
//!   inside `unbind`, every remaining step still runs first (see
//!   [`Device::unbind`](crate::Device::unbind)). A page whose sync on
//!   recycle panicked is released (unmapped and freed), not leaked.
//! - **drop pages, fragments, `Bytes` and pools**, of any pool and device,
//!   including pages of the pool the call is made for. That never waits:
//!   during `unbind`, a page dropped is handed to `unbind`, which frees it
//!   once its mapping is gone.
//! - **call back into the pool**: allocate from a pool it owns, sync other
//!   pages, read stats, build pools on other devices.
//! - **not unbind its own device**: [`Device::unbind`](crate::Device::unbind)
//!   called from inside a call of the same device (or from a callback that
//!   `unbind` itself runs) returns
//!   [`UnbindError::InsideCallback`](crate::UnbindError::InsideCallback) at
//!   once. Unbind from another thread, or after the call returned.
//!   Unbinding *another* device from inside a callback works, on any path
//!   the pool took to make the call. Dropping the device's last
//!   [`Device`](crate::Device) handle inside its own callback is allowed:
//!   the unbind is deferred until the thread's outermost call of the device
//!   returns (see [`Device`](crate::Device#dropped-inside-one-of-its-own-callbacks)).
//! - **block**, at the price above: `unbind` waits for that one call.
//!
//! # What the pool guarantees in return
//!
//! - CPU memory passed to `map` stays allocated and is not reused until the
//!   matching `unmap` has returned (invariant 4 of the crate).
//! - Every successful `map` is followed by exactly one `unmap` (or one entry
//!   in one `unmap_batch`) with the same address, length and direction,
//!   before `on_unbind` (invariant 1). Nothing is called after `on_unbind`
//!   (invariant 2).
//! - A mapping whose unmap the backend reported as failed is never handed
//!   to the backend again, and its memory is kept: never freed, never
//!   reused, for the life of the process (invariant 4 does not rest on
//!   unmaps that cannot fail). The pool counts such mappings in
//!   [`PoolStats::unmap_failures`](crate::PoolStats::unmap_failures), in
//!   [`UnbindReport::unmap_failures`](crate::UnbindReport::unmap_failures)
//!   and in [`Device::unmap_failures`](crate::Device::unmap_failures).
//! - Memory passed to `map` is aligned to `min_page_size` and a whole
//!   number of such pages long: the pool's own page and region memory is
//!   allocated that way, and memory from a page or region source of the
//!   user's that is not is refused
//!   ([`AllocError::Misaligned`](crate::AllocError::Misaligned)) before any
//!   device call.
//! - `sync_for_cpu` and `sync_for_device` are only called on a live mapping,
//!   inside it, while no CPU reference to that range exists, and only in the
//!   directions the DMA API allows.
//!
//! # CPU accesses are not part of the seam
//!
//! The pool does not tell a backend when the CPU reads or writes a page:
//! real hardware has no use for it. Checking that the CPU reads
//! device-written data only after `sync_for_cpu` is a test concern, served
//! by a separate hook, [`CpuAccessCheck`](crate::checking::CpuAccessCheck)
//! in the [`checking`](crate::checking) module. A device bound on a
//! [`CheckingDevice`](crate::checking::CheckingDevice) uses it
//! automatically; a test backend that wraps one passes the check to
//! [`Device::with_cpu_access_check`](crate::Device::with_cpu_access_check).

use core::fmt;
use core::ptr::NonNull;

/// The direction data moves in over a mapping (the DMA API's three).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DmaDirection {
    /// Both CPU and device read and write the memory.
    Bidirectional,
    /// The CPU writes, the device reads (transmit buffers).
    ToDevice,
    /// The device writes, the CPU reads (receive buffers).
    FromDevice,
}

impl DmaDirection {
    /// Whether the device may write memory mapped in this direction.
    pub const fn device_writes(self) -> bool {
        matches!(self, Self::Bidirectional | Self::FromDevice)
    }

    /// Whether the device may read memory mapped in this direction.
    pub const fn device_reads(self) -> bool {
        matches!(self, Self::Bidirectional | Self::ToDevice)
    }
}

impl fmt::Display for DmaDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bidirectional => "DMA_BIDIRECTIONAL",
            Self::ToDevice => "DMA_TO_DEVICE",
            Self::FromDevice => "DMA_FROM_DEVICE",
        })
    }
}

/// A device-visible (bus or IO virtual) address. Shown in hex by both
/// `Display` (`0x1000`) and `Debug` (`DmaAddr(0x1000)`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DmaAddr(pub u64);

impl fmt::Debug for DmaAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DmaAddr({:#x})", self.0)
    }
}

impl DmaAddr {
    /// The value Linux uses for a failed mapping (`DMA_MAPPING_ERROR`); no
    /// backend may return it from a successful `map`.
    pub const ERROR: DmaAddr = DmaAddr(u64::MAX);

    /// The address `bytes` further on.
    pub const fn offset(self, bytes: u64) -> DmaAddr {
        DmaAddr(self.0 + bytes)
    }
}

impl fmt::Display for DmaAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// One live mapping: what `map` returned plus what was asked of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaMapping {
    /// The device address `map` returned.
    pub addr: DmaAddr,
    /// Length of the mapping in bytes.
    pub len: usize,
    /// The direction it was mapped for.
    pub direction: DmaDirection,
}

/// Why a backend could not map memory.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DmaError {
    /// The device's address space (IOVA ranges) has no room left.
    AddressSpaceExhausted,
    /// The backend's limit on the number of mappings is reached (VFIO:
    /// `dma_entry_limit`, 65535 per container by default).
    MappingLimit {
        /// The limit, where the backend knows it.
        limit: Option<u64>,
    },
    /// Pinning the memory would exceed the locked-memory limit
    /// (`RLIMIT_MEMLOCK` for VFIO).
    LockedMemoryLimit,
    /// The range overlaps a mapping that already exists.
    Overlap,
    /// The backend rejected the arguments (alignment, size, direction).
    InvalidArgument,
    /// The memory is not aligned to the device's IOMMU page, or its length
    /// is not a whole number of them: mapping it would expose neighbouring
    /// memory to the device.
    Unaligned {
        /// The IOMMU page the memory must be aligned to, in bytes.
        iommu_page: usize,
    },
    /// A failure injected on purpose by a test backend.
    Injected,
    /// The device is no longer bound.
    Unbound,
    /// The backend's `map` returned [`DmaAddr::ERROR`] as if it had
    /// succeeded. Linux's value for a failed mapping is never a valid
    /// address, so the pool treats the call as a failed map (nothing
    /// mapped) and never hands out a page with that address.
    ErrorAddress,
    /// Any other operating-system error, with the `errno` and the operation.
    Os {
        /// The operation that failed (for example `"VFIO_IOMMU_MAP_DMA"`).
        op: &'static str,
        /// The raw `errno`.
        errno: i32,
    },
}

impl fmt::Display for DmaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AddressSpaceExhausted => f.write_str("device address space exhausted"),
            Self::MappingLimit { limit: Some(n) } => {
                write!(f, "device mapping limit of {n} entries reached")
            }
            Self::MappingLimit { limit: None } => f.write_str("device mapping limit reached"),
            Self::LockedMemoryLimit => {
                f.write_str("locked-memory limit reached (raise RLIMIT_MEMLOCK)")
            }
            Self::Overlap => f.write_str("range overlaps an existing mapping"),
            Self::InvalidArgument => f.write_str("backend rejected the mapping arguments"),
            Self::Unaligned { iommu_page } => write!(
                f,
                "memory not aligned to the {iommu_page}-byte IOMMU page (or not a whole number of them)"
            ),
            Self::Injected => f.write_str("injected mapping failure"),
            Self::Unbound => f.write_str("device is unbound"),
            Self::ErrorAddress => {
                f.write_str("backend returned DMA_MAPPING_ERROR from a successful map")
            }
            Self::Os { op, errno } => write!(f, "{op} failed with errno {errno}"),
        }
    }
}

impl std::error::Error for DmaError {}

/// Why a backend could not unmap a mapping (or cannot say that it did).
///
/// A mapping reported this way may still be reachable by the device: the
/// pool never frees or reuses its memory (see the
/// [module documentation](self)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnmapError {
    /// The operating system refused the unmap.
    Os {
        /// The operation that failed (for example `"VFIO_IOMMU_UNMAP_DMA"`).
        op: &'static str,
        /// The raw `errno`.
        errno: i32,
    },
    /// The backend removed a different number of bytes than the mappings
    /// it was asked to remove hold (VFIO answers a process that does not
    /// own the mappings, such as a forked child, with success and 0 bytes).
    Incomplete {
        /// Bytes asked for.
        expected: u64,
        /// Bytes the backend reported removed.
        unmapped: u64,
    },
    /// A failure injected on purpose by a test backend.
    Injected,
}

impl fmt::Display for UnmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Os { op, errno } => write!(f, "{op} failed with errno {errno}"),
            Self::Incomplete { expected, unmapped } => write!(
                f,
                "unmap removed {unmapped:#x} bytes, expected {expected:#x}"
            ),
            Self::Injected => f.write_str("injected unmap failure"),
        }
    }
}

impl std::error::Error for UnmapError {}

/// The mappings of one [`DmaOps::unmap_batch`] call that were not (or not
/// surely) unmapped, each with its index in the batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnmapBatchError {
    failed: Vec<(usize, UnmapError)>,
}

impl UnmapBatchError {
    /// No failure yet.
    pub const fn new() -> Self {
        Self { failed: Vec::new() }
    }

    /// Records that the mapping at `index` in the batch may still be mapped.
    pub fn push(&mut self, index: usize, error: UnmapError) {
        self.failed.push((index, error));
    }

    /// The failed mappings, as `(index in the batch, why)`.
    pub fn failed(&self) -> &[(usize, UnmapError)] {
        &self.failed
    }

    /// Whether no failure was recorded.
    pub fn is_empty(&self) -> bool {
        self.failed.is_empty()
    }

    /// `Ok(())` if nothing was recorded, else `Err(self)`.
    pub fn into_result(self) -> Result<(), Self> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for UnmapBatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} mappings of the batch not unmapped",
            self.failed.len()
        )?;
        if let Some((index, error)) = self.failed.first() {
            write!(f, " (first: #{index}: {error})")?;
        }
        Ok(())
    }
}

impl std::error::Error for UnmapBatchError {}

/// DMA operations of one device: the pool's only way to reach hardware.
///
/// See the [module documentation](self) for the contract between pool and
/// backend. Methods that let the backend touch CPU memory are `unsafe`: the
/// caller promises the memory is valid and not referenced by the CPU for the
/// duration stated on each method.
///
/// # Writing a backend
///
/// A backend for a device behind a simple IOMMU of your own: it picks IOVAs
/// with the crate's [`IovaAllocator`](crate::iova::IovaAllocator), programs
/// its page tables (here a map kept for the example) and reports a failed
/// unmap, so the pool keeps that memory instead of freeing it under a live
/// mapping.
///
/// ```
/// use std::collections::HashMap;
/// use std::ptr::NonNull;
/// use std::sync::Mutex;
///
/// use pagepool::iova::{IovaAllocator, IovaRange};
/// use pagepool::{Device, DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, UnmapError};
///
/// struct MyIommu {
///     iova: Mutex<IovaAllocator>,
///     /// IOVA -> CPU address: the "page tables".
///     tables: Mutex<HashMap<u64, usize>>,
/// }
///
/// impl DmaOps for MyIommu {
///     unsafe fn map(
///         &self,
///         cpu: NonNull<u8>,
///         len: usize,
///         _direction: DmaDirection,
///     ) -> Result<DmaAddr, DmaError> {
///         let iova = self
///             .iova
///             .lock()
///             .unwrap()
///             .alloc(len as u64)
///             .map_err(|_| DmaError::AddressSpaceExhausted)?;
///         self.tables.lock().unwrap().insert(iova, cpu.as_ptr() as usize);
///         Ok(DmaAddr(iova))
///     }
///
///     unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
///         if self.tables.lock().unwrap().remove(&mapping.addr.0).is_none() {
///             // Not in the tables: say so; the pool keeps the memory.
///             return Err(UnmapError::Incomplete { expected: mapping.len as u64, unmapped: 0 });
///         }
///         // Unmapped: the IOVA may be reused (after its quarantine).
///         let _ = self.iova.lock().unwrap().free(mapping.addr.0, mapping.len as u64);
///         Ok(())
///     }
///
///     // A coherent device without bounce buffers: nothing to sync.
///     unsafe fn sync_for_device(&self, _: DmaMapping, _: usize, _: usize) {}
///     unsafe fn sync_for_cpu(&self, _: DmaMapping, _: usize, _: usize) {}
///     fn needs_sync(&self) -> bool {
///         false
///     }
///
///     fn min_page_size(&self) -> Option<usize> {
///         Some(4096)
///     }
/// }
///
/// let iommu = MyIommu {
///     iova: Mutex::new(IovaAllocator::new(&[IovaRange { start: 0, end: u32::MAX as u64 }], 4096)?),
///     tables: Mutex::default(),
/// };
/// let device = Device::new(iommu);
/// let mut pool = device.pool_builder().build()?;
/// let page = pool.alloc()?;
/// assert_ne!(page.dma_addr().0, 0);
/// drop(page);
/// let report = device.unbind()?; // unmaps every page through `unmap`
/// assert_eq!(report.mappings_left, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait DmaOps: Send + Sync + 'static {
    /// Maps `len` bytes at `cpu` for the device, for `direction`.
    ///
    /// # Safety
    /// `cpu..cpu+len` is valid memory that stays allocated, and is not
    /// handed to anyone else, until the returned mapping is unmapped. While
    /// this call runs no CPU reference to the range exists.
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError>;

    /// Unmaps one mapping. An `Err` says the mapping may still be mapped:
    /// the pool then keeps its memory for good and never passes the mapping
    /// again.
    ///
    /// # Safety
    /// `mapping` is exactly what a successful `map` on this backend
    /// returned (address, length, direction), and it is unmapped once.
    unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError>;

    /// Unmaps several mappings. The default loops over [`unmap`](Self::unmap)
    /// and collects its failures; a backend whose unmap is a system call may
    /// merge neighbours. The error names every mapping that may still be
    /// mapped (by its index in `mappings`); the others are unmapped.
    ///
    /// # Safety
    /// As for [`unmap`](Self::unmap), for every element; no element appears
    /// twice.
    unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) -> Result<(), UnmapBatchError> {
        let mut failed = UnmapBatchError::new();
        for (index, mapping) in mappings.iter().enumerate() {
            // SAFETY: the caller's contract covers every element.
            if let Err(error) = unsafe { self.unmap(*mapping) } {
                failed.push(index, error);
            }
        }
        failed.into_result()
    }

    /// Gives `len` bytes from `offset` inside `mapping` to the device.
    ///
    /// # Safety
    /// `mapping` is live; `offset + len <= mapping.len`; no CPU reference to
    /// the range exists while this runs.
    unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize);

    /// Gives `len` bytes from `offset` inside `mapping` back to the CPU.
    ///
    /// # Safety
    /// As for [`sync_for_device`](Self::sync_for_device); the backend may
    /// write the range (bounce buffers, shadow copies).
    unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize);

    /// Whether this backend's syncs do anything (Linux's `dma_need_sync`).
    /// Read once, when the device is bound. A backend on coherent DMA with
    /// no bounce buffers returns `false`: the pool then never calls
    /// [`sync_for_cpu`](Self::sync_for_cpu) or
    /// [`sync_for_device`](Self::sync_for_device), and a page's syncs and
    /// sync-on-recycle cost nothing. The default is `true`.
    fn needs_sync(&self) -> bool {
        true
    }

    /// The smallest block the device's IOMMU can map, in bytes (VFIO: the
    /// lowest bit of `iova_pgsizes`), a power of two, or `None` if any
    /// page-aligned length maps exactly. Read once, when the device is
    /// bound. A pool that maps page by page refuses pages smaller than this,
    /// because mapping one would expose its neighbours to the device; a
    /// region-mapped pool needs regions that are a multiple of it. Every
    /// block the pool maps is aligned to it (memory from a source that is
    /// not is refused with
    /// [`AllocError::Misaligned`](crate::AllocError::Misaligned)). The
    /// default is `None`.
    fn min_page_size(&self) -> Option<usize> {
        None
    }

    /// The device is being released: the last call the pool makes. A
    /// checking backend reports mappings still live here.
    fn on_unbind(&self) {}
}

/// `DmaOps` for a pointer to a backend: every method forwarded unchanged.
macro_rules! forward_dma_ops {
    ($(#[$doc:meta])* $pointer:ty) => {
        $(#[$doc])*
        impl<T: DmaOps + ?Sized> DmaOps for $pointer {
            unsafe fn map(
                &self,
                cpu: NonNull<u8>,
                len: usize,
                direction: DmaDirection,
            ) -> Result<DmaAddr, DmaError> {
                // SAFETY: the caller's contract, forwarded.
                unsafe { (**self).map(cpu, len, direction) }
            }
            unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
                // SAFETY: the caller's contract, forwarded.
                unsafe { (**self).unmap(mapping) }
            }
            unsafe fn unmap_batch(
                &self,
                mappings: &[DmaMapping],
            ) -> Result<(), UnmapBatchError> {
                // SAFETY: the caller's contract, forwarded.
                unsafe { (**self).unmap_batch(mappings) }
            }
            unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
                // SAFETY: the caller's contract, forwarded.
                unsafe { (**self).sync_for_device(mapping, offset, len) }
            }
            unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
                // SAFETY: the caller's contract, forwarded.
                unsafe { (**self).sync_for_cpu(mapping, offset, len) }
            }
            fn needs_sync(&self) -> bool {
                (**self).needs_sync()
            }
            fn min_page_size(&self) -> Option<usize> {
                (**self).min_page_size()
            }
            fn on_unbind(&self) {
                (**self).on_unbind()
            }
        }
    };
}

forward_dma_ops!(
    /// Forwards every method, so a backend can be shared: a driver keeps an
    /// `Arc` of its backend (for its own statistics or its MMIO) and binds
    /// the device on a clone.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use pagepool::{Device, IdentityDma};
    ///
    /// let backend = Arc::new(IdentityDma::new());
    /// let device = Device::new(Arc::clone(&backend));
    /// let mut pool = device.pool_builder().build()?;
    /// let page = pool.alloc()?;
    /// assert!(backend.live_mappings() > 0, "the driver still sees its backend");
    /// drop(page);
    /// device.unbind()?;
    /// assert_eq!(backend.live_mappings(), 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    std::sync::Arc<T>
);

forward_dma_ops!(
    /// Forwards every method: a backend in a `static`.
    &'static T
);

forward_dma_ops!(
    /// Forwards every method: a backend chosen at run time
    /// (`Box<dyn DmaOps>`).
    Box<T>
);
