//! The operation interpreter and reference model shared by three drivers
//! (it lives with the tests; the fuzz target includes it from here):
//!
//! - `tests/state_machine.rs`: proptest generates a [`Config`](ops::Config)
//!   and a `Vec<Op>`,
//! - `fuzz/fuzz_targets/interleavings.rs`: libFuzzer bytes,
//!   [`decode`](codec::decode)d,
//! - `tests/fuzz_replay.rs`: every seed file (and fuzz regression) replayed
//!   as an ordinary stable `cargo test`.
//!
//! Each includes this directory with `#[path = ".../interp/mod.rs"] mod
//! interp;` and names the parts it uses (`interp::codec::decode`,
//! `interp::harness::run`, ...), so the three run exactly the same
//! decoding, execution and checks. The files here name their siblings with
//! `super::`; the page source is the support tree's `counting.rs`, included
//! below by path, so nothing else of the support tree comes along.
//!
//! # The parts
//!
//! - [`ops`]: the input language: a configuration (two pool slots) and
//!   operations, each naming the logical thread that acts. Every op is valid
//!   in every state (one that does not apply does nothing), so shrinking
//!   works.
//! - [`codec`]: bytes to a run and back. Every input decodes to something
//!   runnable; op codes are only appended, so committed seeds and
//!   regressions keep decoding as they did.
//! - [`faults`]: the one fault slot and the two wrappers that fire it (the
//!   backend around the checking device, the page source around
//!   `CountingPages`), and how an injected panic is caught. A fault is
//!   one-shot and never fires on a thread that is already unwinding.
//! - [`setup`]: the world both runners build (checking device in record
//!   mode, faulty backend, one `Device`, one page source) and the checks
//!   both make at the end.
//! - [`buffers`]: what a logical thread holds (page, fragment, `Bytes`) and
//!   how a range of it is synced and checked.
//! - [`model`]: the reference model. It never touches the real pool; it
//!   predicts every count and every callback, in order, so it knows where
//!   an armed fault fires. It follows each OS thread's batches of remote
//!   returns (main, worker, spawned), slot by slot, since when a batch
//!   reaches its ring decides the counts and the callbacks.
//! - [`harness`]: [`run`](harness::run), the deterministic runner: real
//!   pools and model see the same calls, and after every op everything
//!   observable is compared with the model.
//! - [`actors`]: [`run_threaded`](actors::run_threaded), the same ops on
//!   real OS threads, with model-free checks.
//!
//! # What runs
//!
//! One `CheckingDevice` in record mode behind a `FaultyOps` wrapper, one
//! `Device` on it, up to [`POOLS`] pools (pool `i` owned by logical thread
//! `i`), all taking page memory from one `FaultyPages` source (a
//! `CountingPages`). [`THREADS`] logical threads each hold their own pages,
//! fragments and `Bytes`; every op names the logical thread that acts, so
//! the input chooses the interleaving.
//!
//! - `run` (deterministic): every op runs on the calling OS thread, except
//!   that drops may really happen on a spawned thread (spawn + join, which
//!   hands the thread's batches back as it exits) or on a worker thread
//!   (send + wait), unbind may run on a spawned thread, and the worker may
//!   flush its batches (`NewPool` of the thread that owns no pool; its
//!   `DropPool` flushes the calling thread's). Each run starts and ends
//!   with the calling thread's batches empty: it flushes them at the end,
//!   and the worker exits before the teardown's checks.
//!   After every op the harness compares the real state with the model:
//!   pages held, pages in flight (pool stats), pages cached, mappings live
//!   (checking device and tracker), page blocks live, allocated and freed
//!   (counting source), the unbind report, every allocation result, whether
//!   an armed callback fault fired (and the panic it raised); and zero
//!   violations.
//! - `run_threaded`: the ops of each logical thread run on a real OS thread
//!   of its own, concurrently; items sent between threads go through
//!   channels. Only model-free invariants are checked (zero violations,
//!   content after every successful sync), and at the end (the threads
//!   joined, so their batches handed back, and the calling thread's
//!   flushed) the same leak checks.
//!
//! # Callback faults
//!
//! `Op::ArmPanic` and `Op::ArmDrop` arm the one fault slot shared by the
//! backend wrapper and the page source: the next call of the chosen
//! callback panics (with an `Injected` payload), or drops one of the
//! interpreter's held buffers from inside the call (a re-entrant drop: the
//! page goes back to its pool while the pool is inside a device call or a
//! page-source call). `map` and `alloc_pages` act before the call takes
//! effect (a panicking `map` maps nothing, a panicking `alloc_pages`
//! returns no block); `unmap_batch`, the syncs, `on_unbind` and
//! `free_pages` act after it (a call that panics counts as made). The
//! interpreter runs every pool call under `catch_unwind`; an `Injected`
//! panic is expected exactly when the model says the fault fires in that
//! call, any other panic is a failure.
//!
//! At the end everything is dropped (held buffers, pools, device, the armed
//! fault's buffer) and every page block must have been freed exactly once,
//! no mapping may be left, no device call may follow unbind and no
//! violation may be recorded. Any failure panics, which is a crash for the
//! fuzzer and a (shrunk) failure for proptest.

pub mod actors;
pub mod codec;
pub mod harness;
pub mod ops;

mod buffers;
#[path = "../counting.rs"]
mod counting;
mod faults;
mod model;
mod setup;

/// Logical threads.
pub const THREADS: usize = 3;
/// Pool slots; slot `i` is owned by logical thread `i`.
pub const POOLS: usize = 2;
/// Longest op sequence [`decode`](codec::decode) produces.
pub const MAX_OPS: usize = 512;

/// Hands back whatever a run that failed on this thread left in its
/// remote-return batches (pages of that run's pools), so the next run on
/// the same thread (proptest's shrinking, the fuzzer) starts with empty
/// batches. What that does (callbacks of the old run, an injected panic)
/// is that run's business and is ignored here. A run that passes leaves
/// nothing: it flushes at its end.
fn discard_leftover_returns() {
    let _ = std::panic::catch_unwind(pagepool::flush_thread_returns);
}
