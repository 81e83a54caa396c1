//! Two `Bytes` clones of one page dropped on two threads while `unbind`
//! runs. The last clone's drop returns the page.
//!
//! `bytes` counts its clones with `std` atomics, which loom does not model:
//! the interleavings explored are those of the pool's own operations around
//! the last clone's drop (see README.md).
#![cfg(loom)]

use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static PAGE: Outcomes = Outcomes::new();
static FRAG: Outcomes = Outcomes::new();

/// A whole page as `Bytes`, cloned, each clone dropped on its own thread;
/// the clones stay readable across unbind.
#[test]
fn bytes_clones_dropped_while_unbinding() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h.small_pool();
        let bytes = pool.alloc().unwrap().into_bytes();
        let clone = bytes.clone();
        let ta = spawn(move || {
            assert_eq!(bytes.len(), 4096);
            assert_eq!(bytes[4095], 0);
            drop(bytes);
        });
        let tb = spawn(move || {
            assert_eq!(clone[0], 0);
            drop(clone);
        });
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        PAGE.saw(
            match (report.pages_from_rings, report.pages_held_or_cached) {
                (1, 0) => "last clone recycled the page into the ring",
                (0, 1) => "clones held during unbind",
                (0, 0) => "last clone released the page after the pool closed",
                other => panic!("unexpected report {other:?}"),
            },
        );
        ta.join().unwrap();
        tb.join().unwrap();
        drop(pool);
        h.finish();
    });
    PAGE.assert_seen(&[
        "last clone recycled the page into the ring",
        "clones held during unbind",
        "last clone released the page after the pool closed",
    ]);
}

/// The same with a fragment: two `Bytes` clones of one fragment, after the
/// pool was dropped (so they hold the page's last reference).
#[test]
fn fragment_bytes_clones_dropped_while_unbinding() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h.small_pool();
        let bytes = pool.alloc_frag(1500).unwrap().into_bytes();
        drop(pool);
        let clone = bytes.clone();
        let ta = spawn(move || drop(bytes));
        let tb = spawn(move || drop(clone));
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        FRAG.saw(match report.pages_held_or_cached {
            1 => "unmapped by unbind",
            0 => "unmapped by the last clone's thread",
            n => panic!("{n} pages in flight"),
        });
        ta.join().unwrap();
        tb.join().unwrap();
        h.finish();
    });
    FRAG.assert_seen(&["unmapped by unbind", "unmapped by the last clone's thread"]);
}
