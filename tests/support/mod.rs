//! The integration tests' support tree, one module per job; each test file
//! takes it with `mod support;` and uses the parts it needs.
//!
//! - [`counting`]: a page source that checks every block is freed exactly
//!   once.
//! - [`checks`]: the checking device as the tests configure it, the guarded
//!   page source (no block freed while mapped), the `DmaOps` spy, a
//!   counting `DmaOps`, and the after-unbind assertions.
//! - [`faulty`]: programmable faults (panic, re-enter, block) for the
//!   callback tests.
//! - [`rig`]: the setup and teardown most tests share: a checking device, a
//!   device on it and guarded page memory; at the end, unbind, drop
//!   everything, and check the invariants.
//! - [`rng`]: a tiny deterministic RNG for the stress tests.
//!
//! Some files here are also included by `#[path]` from outside the tree,
//! so they stand alone (no `super::`): `counting.rs` (by the interpreter
//! and `examples/nic_demo.rs`), `rng.rs` (by `examples/nic_demo.rs`) and
//! `noop.rs`, the device whose DMA costs nothing (by
//! `tests/no_alloc_fast_path.rs` and `benches/pool.rs`; no test here needs
//! it).
//!
//! `interp/` beside them is not part of this module: it is the operation
//! interpreter and reference model that `tests/state_machine.rs`,
//! `tests/fuzz_replay.rs` and the fuzz target each include on their own
//! (it takes `counting.rs` with it).
// Each test file uses a different part.
#![allow(dead_code)]

pub mod checks;
pub mod counting;
pub mod faulty;
pub mod rig;
pub mod rng;
