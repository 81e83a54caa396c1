//! A mapping's life, from `map` to free: the one place where a mapping
//! begins and ends, and the one owner of the `pages_mapped` and
//! `pages_allocated` counters.
//!
//! - [`page`]: pools that map page by page: [`map_page`] maps one page,
//!   [`release_pages`] takes pages out of their pool (unmap, then free).
//! - [`region`]: region-mapped pools: [`map_region`] maps one region and
//!   carves it into pages; pages that leave the pool for good are retired,
//!   and the region is unmapped and freed when its last page is
//!   ([`retire_pages`]).
//! - [`meta_block`]: where the metas of pages mapped one by one live: a
//!   refill's metas side by side in one block ([`MetaFiller`]).
//! - [`unmapper`]: the one batcher, [`Unmapper`], that every unmap goes
//!   through (`release_pages`, a region's release, `unbind`).
//!
//! # The rule
//!
//! **Whoever removes a mapping's tracker record unmaps it, and only after
//! the unmap may its memory be freed.** (A mapping is a page, or in a
//! region-mapped pool a whole region.) A page leaving its pool removes its own
//! record inside a device call ([`PoolShared::device_call`]), unmaps it in
//! the same call, then frees the page outside it. `unbind` removes every
//! record left, and so unmaps every mapping left, only after it has closed
//! every gate and waited for the calls in progress; pages that come back
//! meanwhile are handed to it ([`DeviceShared::free_after_unbind`]) and
//! freed once its unmaps are done.
//!
//! # Invariants
//!
//! - No mapping without a record: [`map_page`] records a page in the same
//!   device call that mapped it, so an `unbind` either waits for that call
//!   (and then finds the record) or closed the gate before it (and then the
//!   page was never mapped). Memory allocated for a page that is not mapped
//!   in the end (error, panic, unbind) goes back to its source at once.
//! - A record is removed before its mapping is handed to `unmap_batch`, so a
//!   backend that panics can never see the same mapping twice.
//! - Page memory is freed only after its unmap returned (or, if the unmap
//!   panicked, after the call that counts as made), and never inside a
//!   device call: `PageSource` calls run outside every gate.
//! - Every `PageSource::free_pages` of a batch is made even if one panics,
//!   and a release goes on after a panicking `unmap_batch`; the first panic
//!   goes on afterwards. The guards that do this cost nothing on the normal
//!   path (no `catch_unwind` there).

//! - A region's pages never leave it one by one: while the pool is open a
//!   page that finds the ring full waits in the pool's spare list, still
//!   mapped; a page leaving for good (pool dropped, device unbound) is
//!   retired, and whoever retires a region's last page owns the region and
//!   releases it like a page: record removed and region unmapped in one
//!   device call, memory freed after it, or handed to a running `unbind`.

pub(crate) mod meta_block;
pub(crate) mod page;
pub(crate) mod region;
pub(crate) mod unmapper;

pub(crate) use meta_block::MetaFiller;
pub(crate) use page::{free_pages, map_page, release_pages};
pub(crate) use region::{free_regions, map_region};
pub(crate) use unmapper::{KeptMappings, Unmapper};
