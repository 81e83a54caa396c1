//! [`IdentityDma`]: a ready coherent backend whose device addresses are the
//! CPU addresses.
//!
//! Every example and test of a pool needs a backend; for simulated devices,
//! benchmarks and devices that reach memory through the CPU's own address
//! space, the right one does nothing but hand back the CPU address. This
//! is that backend, so users need not write it.
//!
//! # Invariants
//!
//! - `map` returns the CPU address of the memory as the device address,
//!   and never [`DmaAddr::ERROR`] (it refuses memory at that address).
//! - Syncs do nothing: the backend reports `needs_sync() == false`, so the
//!   pool never calls them.
//! - The live-mapping count is exact once every call returned: one more per
//!   successful `map`, one less per unmapped mapping.

use core::ptr::NonNull;

use crate::dma::{
    DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, UnmapBatchError, UnmapError,
};
use crate::sync::{AtomicUsize, Ordering};

/// A coherent [`DmaOps`] backend whose device address is the CPU address:
/// no IOMMU, no bounce buffers, no syncs.
///
/// Use it for simulated devices (the "device" is code in the same
/// process), for benchmarks of the pool itself, and for devices that DMA
/// through the process's own page tables. It is **not** a backend for
/// real hardware without an IOMMU: such a device needs physical addresses,
/// which this backend does not know. Real hardware goes through the VFIO
/// backend (feature `vfio`) or a `DmaOps` of your own; a test that wants
/// every call checked uses [`CheckingDevice`](crate::checking::CheckingDevice).
///
/// ```
/// use pagepool::{Device, IdentityDma};
///
/// let device = Device::new(IdentityDma::new());
/// let mut pool = device.pool_builder().build()?;
/// let mut page = pool.alloc()?;
/// page.as_mut_slice()[..4].copy_from_slice(b"ping");
/// // The device address is where the CPU sees the bytes.
/// assert_eq!(page.dma_addr().0 as usize, page.as_slice().as_ptr() as usize);
/// drop(page);
/// drop(pool);
/// device.unbind()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Default)]
pub struct IdentityDma {
    live: AtomicUsize,
}

impl IdentityDma {
    /// A backend with no mapping yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Mappings made and not yet unmapped.
    pub fn live_mappings(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }
}

impl DmaOps for IdentityDma {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        _len: usize,
        _direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        let addr = DmaAddr(cpu.as_ptr().addr() as u64);
        if addr == DmaAddr::ERROR {
            return Err(DmaError::InvalidArgument);
        }
        self.live.fetch_add(1, Ordering::AcqRel);
        Ok(addr)
    }

    unsafe fn unmap(&self, _mapping: DmaMapping) -> Result<(), UnmapError> {
        self.live.fetch_sub(1, Ordering::AcqRel);
        Ok(())
    }

    unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) -> Result<(), UnmapBatchError> {
        self.live.fetch_sub(mappings.len(), Ordering::AcqRel);
        Ok(())
    }

    unsafe fn sync_for_device(&self, _mapping: DmaMapping, _offset: usize, _len: usize) {}

    unsafe fn sync_for_cpu(&self, _mapping: DmaMapping, _offset: usize, _len: usize) {}

    fn needs_sync(&self) -> bool {
        false
    }
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use super::*;
    use crate::Device;

    #[test]
    fn addresses_are_cpu_addresses_and_unbind_leaves_nothing_mapped() {
        let backend = std::sync::Arc::new(IdentityDma::new());
        let device = Device::new(std::sync::Arc::clone(&backend));
        let mut pool = device
            .pool_builder()
            .cache_size(4)
            .refill_batch(4)
            .build()
            .unwrap();
        let pages: Vec<_> = (0..3).map(|_| pool.alloc().unwrap()).collect();
        for page in &pages {
            assert_eq!(page.dma_addr().0 as usize, page.as_slice().as_ptr().addr());
        }
        assert_eq!(backend.live_mappings(), 4, "a refill of four");
        let report = device.unbind().unwrap();
        assert_eq!(report.mappings_left, 0);
        assert_eq!(backend.live_mappings(), 0);
        drop(pages);
        drop(pool);
        assert_eq!(backend.live_mappings(), 0, "no call after unbind");
    }
}
