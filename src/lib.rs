//! pagepool: see README.md.
#![warn(missing_docs)]

mod sync;

pub mod checking;
pub mod dma;

pub use dma::{CpuAccess, DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps};
