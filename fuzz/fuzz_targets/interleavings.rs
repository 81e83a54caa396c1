//! Fuzz target: the input is a configuration and a sequence of operations
//! over three logical threads (see `tests/support/interp/codec.rs` for the
//! format). Byte 0 bit 0 chooses the mode: deterministic (one OS thread,
//! the input picks which logical thread acts next, full reference-model
//! check after every op) or real threads (each logical thread on its own
//! OS thread). The checking device runs in record mode; any violation,
//! leak, double free, wrong allocation result or content mismatch panics: a
//! crash. Ops may arm a callback fault (a panic, or a re-entrant drop of a
//! held buffer, in the next call of a chosen `DmaOps` or `PageSource`
//! method): those injected panics are caught and checked by the
//! interpreter, and the panic hook stays quiet about them; any other panic
//! still aborts.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/support/interp/mod.rs"]
mod interp;

fuzz_target!(|data: &[u8]| {
    let (cfg, threaded, ops) = interp::codec::decode(data);
    if threaded {
        interp::actors::run_threaded(&cfg, &ops);
    } else {
        interp::harness::run(&cfg, &ops);
    }
});
