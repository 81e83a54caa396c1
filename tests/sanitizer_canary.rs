//! Sanitizer canaries: two planted bugs that ThreadSanitizer and
//! AddressSanitizer must report, so that a clean sanitizer run is known to
//! be one that could have failed.
//!
//! Built only with `--cfg pagepool_canary`, which `scripts/sanitizers.sh`
//! passes to this test target alone (`cargo rustc ... -- --cfg
//! pagepool_canary`) and then requires each canary to fail with its
//! sanitizer's report. Every other build sees an empty test crate: the
//! canaries are undefined behaviour on purpose and must not run unchecked.
//!
//! - `planted_data_race`: two threads write one heap word through a raw
//!   pointer with nothing ordering the writes. TSan: "data race".
//! - `planted_use_after_free`: a read through a pointer into a freed box.
//!   ASan: "heap-use-after-free".
//! - `planted_leak`: a box no pointer reaches any more. ASan's leak check:
//!   "detected memory leaks" (so the leak suppressions the script loads
//!   have not switched leak checking off).
#![cfg(pagepool_canary)]

use std::thread;

#[test]
fn planted_data_race() {
    let word = Box::into_raw(Box::new(0u64));
    // Plain integers cross the threads: the pointer itself is not `Send`.
    let addr = word as usize;
    let write = move |value: u64| {
        // SAFETY: none, deliberately: both threads write the word at once
        // (the planted race). The box outlives both threads.
        unsafe { core::ptr::write_volatile(addr as *mut u64, value) };
    };
    // Both threads are spawned before either is joined, so neither write
    // happens-before the other.
    let a = thread::spawn(move || write(1));
    let b = thread::spawn(move || write(2));
    a.join().unwrap();
    b.join().unwrap();
    // SAFETY: from `Box::into_raw` above; both writers have been joined.
    drop(unsafe { Box::from_raw(word) });
}

#[test]
fn planted_use_after_free() {
    let buffer = Box::into_raw(Box::new([7u8; 64]));
    // SAFETY: from `Box::into_raw` above, freed here once.
    drop(unsafe { Box::from_raw(buffer) });
    // SAFETY: none, deliberately: the buffer was freed above (the planted
    // use-after-free).
    let byte = unsafe { core::ptr::read_volatile(buffer.cast::<u8>().wrapping_add(3)) };
    println!("read {byte} from a freed buffer");
}

#[test]
fn planted_leak() {
    let buffer = vec![7u8; 4096];
    // The planted leak: nothing frees the buffer or keeps a pointer to it.
    std::mem::forget(buffer);
}
