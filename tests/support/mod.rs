//! The integration tests' support tree, one module per job; each test file
//! takes it with `mod support;` and uses the parts it needs.
//!
//! - [`counting`]: a page source that checks every block is freed exactly
//!   once.
//! - [`checks`]: the checking device as the tests configure it, the guarded
//!   page source (no block freed while mapped), the `DmaOps` spy, a
//!   counting `DmaOps`, the RNG, and the after-unbind assertions.
//! - [`faulty`]: programmable faults (panic, re-enter, block) for the
//!   callback tests.
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
