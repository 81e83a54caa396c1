//! A lock-light DMA page pool for NIC drivers that survives driver unbind.
//!
//! A [`Device`] owns a device's [`DmaOps`]; [`PagePool`]s built on it map
//! pages once and recycle them without re-mapping (an owner-only fast path,
//! a shared ring for pages coming back from other threads, a slow path that
//! maps fresh pages). Every live mapping is recorded, and
//! [`Device::unbind`] synchronously unmaps every mapping the device still
//! has, including pages held far outside the pool, before it returns,
//! without ever waiting for their holders. Pages held outside stay valid
//! memory and are freed, with no device call, when they come back.
//!
//! The protocol behind that, its invariants and the rules for callbacks are
//! in [`design`]. Backends: [`checking::CheckingDevice`] (a strict software
//! device for tests) and, with the `vfio` feature, `vfio::VfioDma`.
//!
//! ```
//! use pagepool::checking::{CheckMode, CheckingDevice};
//! use pagepool::{AllocError, Device, DmaDirection};
//!
//! let checker = CheckingDevice::new(CheckMode::Panic);
//! let device = Device::new(checker.clone());
//! let mut rx = device.pool_builder().direction(DmaDirection::FromDevice).build()?;
//!
//! // Fast path: the RX loop owns the pool through `&mut`.
//! let mut page = rx.alloc()?;
//! checker.device_write(page.dma_addr(), b"frame")?; // the device DMAs a frame in
//! page.sync_for_cpu(0..5)?;                          // hand it to the CPU
//! assert_eq!(&page.as_slice()[..5], b"frame");
//! rx.recycle_direct(page);                           // no unmap, no lock
//!
//! // The stack holds a page while the driver unbinds.
//! let held = rx.alloc()?;
//! let report = device.unbind()?;
//! assert_eq!(report.pages_held_or_cached, 64); // the held page + the cached batch
//! assert_eq!(checker.live_mappings(), 0);
//! assert_eq!(rx.alloc().unwrap_err(), AllocError::Unbound);
//! assert_eq!(held.as_slice().len(), 4096); // still valid memory
//! drop(held);                              // freed, no device call
//! assert!(checker.verdict().is_clean());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]
// docs.rs (`--cfg docsrs`): items behind a feature say which one.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod sync;

pub mod checking;
pub mod design;
pub mod dma;
pub mod iova;
#[cfg(all(feature = "vfio", target_os = "linux"))]
#[cfg_attr(docsrs, doc(cfg(all(feature = "vfio", target_os = "linux"))))]
pub mod vfio;

mod access_site;
mod device;
mod error;
mod frag;
mod gate;
mod held;
mod identity;
#[cfg(feature = "bytes")]
mod into_bytes;
mod mapping;
mod memory;
mod mode;
mod page;
mod pool;
mod remote;
mod ring;
mod shared;
mod stats;
mod trace;
mod tracker;
mod unwind;

pub use device::{Device, UnbindReport};
pub use dma::{DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, UnmapBatchError, UnmapError};
pub use error::{AllocError, BuildError, ConfigError, SyncError, UnbindError};
pub use frag::{Frag, FRAG_ALIGN};
pub use identity::IdentityDma;
pub use memory::{
    GlobalPages, OutOfMemory, PageSource, RegionBacking, RegionBlock, RegionSource, SystemRegions,
    DEFAULT_REGION_SIZE, MAX_ORDER, MAX_REGION_SIZE, PAGE_SIZE,
};
pub use mode::{Tracked, TrackingMode, Untracked};
pub use page::{put_bulk, Page};
pub use pool::{
    PagePool, PagePoolBuilder, DEFAULT_CACHE_SIZE, DEFAULT_REFILL_BATCH, DEFAULT_REMOTE_BATCH,
    DEFAULT_RING_SIZE, MAX_CACHE_SIZE, MAX_RING_SIZE,
};
pub use remote::{flush_thread_returns, MAX_REMOTE_BATCH};
pub use shared::SyncForDevice;
pub use stats::{AllocStats, PoolInfo, PoolStats, RecycleStats, RegionInfo};

/// The README's examples, compiled and run as doctests (never built
/// otherwise).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
