//! How the pool keeps its promises: the invariants, the unbind protocol,
//! the rules for callbacks, and the races the model checker covers. This
//! module has no code; it is the one place where the protocol is written
//! down whole, and every other module's docs state only their own part.
//!
//! # Layers
//!
//! ```text
//!  handles      Device (device.rs)  PagePool (pool.rs)  Page (page.rs)  Frag (frag.rs)
//!                  │ unbind             │ slow path          │ recycle / release
//!  lifecycle    mapping/: page.rs (map_page, release_pages, free_pages),
//!               region.rs (map_region, retire_pages), unmapper.rs (Unmapper)
//!               (the one place a mapping begins and ends)
//!  state        shared.rs: DeviceShared, PoolShared, PageMeta, Region   mode.rs
//!  mechanisms   gate.rs (call gates, OpsCell)  held.rs (calls in progress per thread)
//!               ring.rs  remote.rs (per-thread batches)
//!               tracker.rs  memory/  unwind.rs
//!  seam         dma.rs (DmaOps)  stats.rs  error.rs  trace.rs      sync.rs (all primitives)
//!  backends     identity.rs (IdentityDma)  iova.rs (IOVA allocator)  checking/  vfio/
//! ```
//!
//! Each layer imports only from the layers below it; `src/` has no import
//! cycle.
//!
//! # The invariants
//!
//! 1. **Every mapping is unmapped exactly once.** Tracked devices record
//!    each mapping in the in-flight tracker in the same device call that
//!    mapped it; *whoever removes the record unmaps*, and a record is
//!    removed once (`tracker.rs`). Records are removed before their
//!    mappings are handed to `unmap_batch`, so a backend that panics never
//!    sees a mapping twice.
//! 2. **After `unbind` returns, no `DmaOps` method runs or will ever run
//!    again.** Every device call outside `unbind` runs inside a hold of its
//!    pool's call gate; `unbind` closes every gate, waits for the holds in
//!    progress, and only then unmaps, calls `on_unbind` and drops the ops.
//! 3. **`unbind` finishes in bounded time.** A hold covers one device call,
//!    never a batch, a `PageSource` call or a wait for another thread; so
//!    `unbind` waits for at most one device call per thread, and walks the
//!    tracker without waiting for any holder.
//! 4. **Page memory is never freed, reused or handed out while mapped.**
//!    Pages are freed only after their unmap returned (`mapping/`); a
//!    page that comes back while `unbind` runs is handed to `unbind`, which
//!    frees it after its own unmaps. A region is freed only when its last
//!    page has left the pool for good and its one mapping is gone; whoever
//!    retires that last page releases it, or hands it to `unbind`.
//! 5. **Pages held outside stay valid after unbind**: `unbind` unmaps them
//!    but leaves their memory alone; when they come back, the closed gate
//!    sends them straight to be freed, with no device call. A page kept back
//!    in a thread's batch of remote returns (`remote.rs`) is such a page: it
//!    is still recorded, so `unbind` unmaps it, and when the batch goes home
//!    the closed ring refuses it and it is freed with no device call.
//! 6. **Allocation after unbind fails** with `AllocError::Unbound` (the
//!    pool's `closed` flag, and the closed gate on the slow path).
//! 7. **Whatever a callback does**, 1-6 hold: see the rules below.
//!
//! # Unbind, step by step
//!
//! 1. The registry stops new pools; every pool (open or detached) gets
//!    `closed` set and its call gate closed. From here no device call
//!    starts: syncs return `SyncError::Unbound`, the slow path gives its
//!    fresh block back and fails, releases hand their pages to `unbind`.
//! 2. Wait for the device calls in progress: the heavy fence, then every
//!    thread's announcement slots, then every gate's counted calls.
//! 3. Close and drain every ring: remove each page's record, unmap, free.
//!    A region-mapped pool's ring and spare list are drained too, and
//!    their pages retired (a region is never unmapped page by page).
//! 4. Close the tracker and take every record left, shard by shard (the
//!    records leave the shard under its lock; the unmaps happen after the
//!    lock is released): unmap each, wherever its page is. Then the same
//!    for the region tracker: every region is unmapped once, whatever its
//!    pages are doing.
//! 5. `on_unbind`, then take the ops out of their cell and drop them.
//! 6. Free the pages handed over since step 1.
//!
//! Each step runs whatever the previous one did: a callback's panic is kept
//! (`unwind.rs`) and resumed after step 6.
//!
//! # The four closes
//!
//! | what | set by | means |
//! | --- | --- | --- |
//! | `PoolShared::closed` | pool drop, unbind | authoritative for allocation; advisory for recycling (a page may still reach the ring just after) |
//! | `Ring::close` | pool drop, unbind | no page enters the ring again; what it held is handed back in the same critical section |
//! | `CallGate::close` | unbind | no device call starts for the pool; pages coming back go to `unbind` |
//! | the tracker's shard `closed` | unbind | no record is inserted again (a second guard: the gates already stop the slow path) |
//!
//! # Locks and waits
//!
//! No lock is held across a callback, and no callback runs under a lock of
//! the pool's: the ring's mutex, a tracker shard's mutex, the registry, the
//! hand-over list and the slot registry each guard a few instructions. A
//! gate hold is not a lock: holds nest and never wait. The only waits are
//! `unbind`'s, for holds in progress, and a second `unbind`'s, for the
//! first.
//!
//! The call gate's handshake is Dekker's: a caller stores its announcement
//! and then loads the gate's `CLOSED` bit; `unbind` stores `CLOSED` and
//! then loads every announcement. An asymmetric pair of fences orders both
//! (`sync::asymmetric`): on Linux the caller's is a compiler fence and
//! `unbind`'s a `membarrier(2)`, so the per-packet path has no atomic
//! read-modify-write and writes only its thread's own line.
//!
//! # Rules for callbacks
//!
//! The rules a `DmaOps` or `PageSource` implementation may rely on are in
//! [`DmaOps`](crate::DmaOps#what-a-callback-may-do) and
//! [`PageSource`](crate::PageSource). In short: panic (a call that panicked
//! counts as made), drop pages, fragments, `Bytes` and pools, call back in,
//! block (then `unbind` waits for that one call); `unbind` from inside a
//! callback of the same device returns `UnbindError::InsideCallback`, and of
//! any other device it unbinds that device.
//!
//! A thread knows which devices it is inside a call of, on both of the
//! gate's paths (`gate.rs`, `held.rs`): the announced calls are in its slots, the
//! counted ones (deep nesting, thread exit) in its private notes, so the
//! refusal is for the same device only. Past `DEPTH + COUNTED_NAMED` nested
//! calls on one thread the notes end and every device is refused ("maybe").
//!
//! Dropping the last `Device` handle never leaves the device bound. Inside
//! a call of that device, where unbinding at once would wait for the
//! caller, the drop defers the unbind to the thread's own state
//! (`held::defer_unbind`); the gate runs it when the thread's outermost
//! call of the device ends, after that hold is released and before the
//! pool operation that made the call returns. The deferred unbind is an
//! ordinary one (the same steps, the same `unbinding` lock, so it races an
//! explicit `unbind` on another thread like any second unbind). Elsewhere,
//! the drop unbinds at once.
//!
//! The CPU-access hook is not a `DmaOps` method: it is
//! [`CpuAccessCheck`](crate::checking::CpuAccessCheck), in the `checking`
//! module, held by the device from bind (a `CheckingDevice` passed to
//! `Device::new` is detected, a wrapper passes one to
//! `Device::with_cpu_access_check`; real backends have none, and a page
//! access then costs one pointer test). The pool calls it from the page and
//! fragment accessors inside a gate hold, like a device call: it follows
//! the same rules, `unbind` waits for a check in progress, and none runs
//! after `unbind` returned.
//!
//! # The races and the loom models that cover them
//!
//! The models live in `loom-tests/tests/`, one file per subject, and run
//! the real pool code on loom's primitives (`sync.rs`). Each checks, for
//! every interleaving, that no device call happens after `unbind` returned,
//! that nothing is unmapped twice or left mapped, and that no memory leaks.
//!
//! | race | model |
//! | --- | --- |
//! | a page dropped on another thread while unbinding | `page_drop` |
//! | a page recycled into the ring while unbind drains it | `ring_recycle` |
//! | sync-for-device on recycle racing unbind | `sync_on_recycle` |
//! | fragments of one page dropped on several threads, and unbind | `fragments` |
//! | the slow path mapping while unbinding | `slow_path` |
//! | a page released because the ring is full, racing unbind's walk | `ring_full` |
//! | the owner dropping its pool while pages come back | `pool_drop` |
//! | `Bytes` clones dropped on several threads | `bytes_clones` |
//! | two unbinds at once, and unbind by drop | `unbind_twice` |
//! | a pool built while the device unbinds | `build_racing_unbind` |
//! | a sync and a release entering the call gate while it closes | `call_gate` |
//! | an `unmap_batch` that panics during unbind | `panicking_unmap` |
//! | a page dropped from inside a callback while another thread drops one | `reentrant_drop` |
//! | the last page of a region coming back while unbind runs or the pool drops | `region_retire` |
//! | a thread exiting with pages in its batch of remote returns, racing unbind; a full batch going home while the pool drops | `remote_batch` |
//! | the last `Device` handle dropped inside its own callback (deferred unbind) racing the other handle's drop or explicit unbind, and page drops | `deferred_unbind` |
//!
//! Deliberately broken variants of the core (`--cfg pagepool_broken`) show
//! that the models can fail: `unbind-no-wait` (unbind does not wait for
//! device calls in progress), `release-keeps-record` (a release unmaps
//! without removing the record), `ring-push-after-close` (a ring drained
//! but left open), `free-before-unbind` (a page coming back during unbind
//! is freed at once instead of after unbind's unmaps), `region-free-before-unbind`
//! (the same for a region), `remote-exit-forgets` (a thread exits without
//! sending the pages it kept back home), `drop-inside-callback-forgets` (the
//! last `Device` handle dropped inside its own callback leaves the device
//! bound). `loom-tests/README.md`
//! says which model catches each.
//!
//! loom proves the small races (up to four threads, three preemptions).
//! Whole-pool scenarios with 10 to 16 threads (owners, holders cloning
//! `Bytes` and dropping pages, fragments and bulk returns, pools dropped and
//! built while `unbind` runs) run under shuttle's randomized and PCT
//! schedulers on the same `sync` shim (`--cfg shuttle`, `shuttle-tests/`),
//! with the same planted variants to show they can fail.
