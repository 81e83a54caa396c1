//! A device whose DMA costs nothing: `map` returns the CPU address as the
//! device address; unmap and sync do nothing.
//!
//! Included by `#[path]` from `tests/no_alloc_fast_path.rs` and
//! `benches/pool.rs` (where a device must cost nothing, so the pool's own
//! work is what is measured), so it stays self-contained.

use std::ptr::NonNull;

use pagepool::{DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, UnmapError};

/// A device whose DMA costs nothing: the CPU address is the device address.
pub struct NoopOps;

impl DmaOps for NoopOps {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        _len: usize,
        _direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        Ok(DmaAddr(cpu.as_ptr() as u64))
    }
    unsafe fn unmap(&self, _mapping: DmaMapping) -> Result<(), UnmapError> {
        Ok(())
    }
    unsafe fn sync_for_device(&self, _mapping: DmaMapping, _offset: usize, _len: usize) {}
    unsafe fn sync_for_cpu(&self, _mapping: DmaMapping, _offset: usize, _len: usize) {}
}
