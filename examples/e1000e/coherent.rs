//! Descriptor-ring memory: one page the driver maps for the device itself,
//! through [`VfioDma`] directly — this driver's `dma_alloc_coherent`.
//!
//! Why not a page from a [`pagepool::PagePool`]? A ring is not a buffer: it
//! is allocated once at probe, never recycled, shared by CPU and device for
//! the whole life of the queue, and the driver frees it itself in remove,
//! after the device's DMA is stopped. A pool buys nothing for it, and keeping
//! it apart keeps the accounting plain: every mapping the pool's `unbind`
//! reports is a buffer, and after it the container holds exactly the rings.
//!
//! The device writes this memory (status write-back), so the CPU touches it
//! only through raw pointers with volatile accesses, never through a Rust
//! reference.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use pagepool::vfio::{VfioDma, VfioError};
use pagepool::{DmaAddr, DmaDirection, DmaMapping, PAGE_SIZE};

/// One page of device-visible memory, mapped `Bidirectional` (the device
/// reads descriptors and writes their status back).
pub struct CoherentPage {
    cpu: NonNull<u8>,
    iova: DmaAddr,
    dma: VfioDma,
    mapped: bool,
}

// SAFETY: the page is plain memory owned by this value; every access goes
// through volatile raw-pointer reads and writes (see the module docs).
unsafe impl Send for CoherentPage {}

fn layout() -> Layout {
    Layout::from_size_align(PAGE_SIZE, PAGE_SIZE).expect("page layout")
}

impl CoherentPage {
    /// Allocates a zeroed page and maps it for the device.
    pub fn new(dma: &VfioDma) -> Result<Self, VfioError> {
        // SAFETY: the layout has a non-zero size.
        let cpu = NonNull::new(unsafe { alloc_zeroed(layout()) }).expect("out of memory");
        // SAFETY: the page stays allocated until it is unmapped (`unmap`, or
        // `drop`, which frees only after a successful unmap); the CPU reaches
        // it only through raw pointers.
        match unsafe { dma.try_map(cpu, PAGE_SIZE, DmaDirection::Bidirectional) } {
            Ok(iova) => Ok(Self {
                cpu,
                iova,
                dma: dma.clone(),
                mapped: true,
            }),
            Err(e) => {
                // SAFETY: never mapped, allocated above with this layout.
                unsafe { dealloc(cpu.as_ptr(), layout()) };
                Err(e)
            }
        }
    }

    /// Where the device sees the page.
    pub fn iova(&self) -> DmaAddr {
        self.iova
    }

    fn at(&self, offset: usize) -> *mut u64 {
        assert!(offset % 8 == 0 && offset + 8 <= PAGE_SIZE);
        // SAFETY: inside the page (checked above).
        unsafe { self.cpu.as_ptr().add(offset).cast() }
    }

    /// Volatile read of the 64-bit word at `offset`.
    pub fn read_u64(&self, offset: usize) -> u64 {
        // SAFETY: aligned and inside the live page.
        unsafe { self.at(offset).read_volatile() }
    }

    /// Volatile read of the byte at `offset`.
    pub fn read_u8(&self, offset: usize) -> u8 {
        assert!(offset < PAGE_SIZE);
        // SAFETY: inside the live page.
        unsafe { self.cpu.as_ptr().wrapping_add(offset).read_volatile() }
    }

    /// Volatile write of the 64-bit word at `offset`.
    pub fn write_u64(&self, offset: usize, value: u64) {
        // SAFETY: aligned and inside the live page.
        unsafe { self.at(offset).write_volatile(value) }
    }

    /// Unmaps the page (the remove path, once the device's DMA is stopped).
    /// The memory stays allocated until drop.
    pub fn unmap(&mut self) -> Result<(), VfioError> {
        if !self.mapped {
            return Ok(());
        }
        let mapping = DmaMapping {
            addr: self.iova,
            len: PAGE_SIZE,
            direction: DmaDirection::Bidirectional,
        };
        // SAFETY: mapped by `new`, unmapped once (the flag).
        unsafe { self.dma.try_unmap(mapping) }?;
        self.mapped = false;
        Ok(())
    }
}

impl Drop for CoherentPage {
    fn drop(&mut self) {
        if self.unmap().is_ok() {
            // SAFETY: unmapped, allocated by `new` with this layout.
            unsafe { dealloc(self.cpu.as_ptr(), layout()) };
        }
        // If the unmap failed the device may still reach the page: leak it
        // rather than hand mapped memory back to the allocator.
    }
}
