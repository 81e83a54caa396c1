#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod sync;

pub mod checking;
pub mod dma;
#[cfg(all(feature = "vfio", target_os = "linux"))]
pub mod vfio;

mod device;
mod error;
mod frag;
mod gate;
#[cfg(feature = "bytes")]
mod into_bytes;
mod mapping;
mod memory;
mod page;
mod pool;
mod ring;
mod stats;
mod tracker;
mod unwind;

pub use device::{Device, Tracked, TrackingMode, UnbindReport, Untracked};
pub use dma::{CpuAccess, DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps};
pub use error::{AllocError, BuildError, ConfigError, SyncError, UnbindError};
pub use frag::{Frag, FRAG_ALIGN};
pub use memory::{GlobalPages, OutOfMemory, PageSource, MAX_ORDER, PAGE_SIZE};
pub use page::{put_bulk, Page};
pub use pool::{
    PagePool, PagePoolBuilder, SyncForDevice, DEFAULT_CACHE_SIZE, DEFAULT_REFILL_BATCH,
    DEFAULT_RING_SIZE, MAX_CACHE_SIZE, MAX_RING_SIZE,
};
pub use stats::{AllocStats, PoolInfo, PoolStats, RecycleStats};
