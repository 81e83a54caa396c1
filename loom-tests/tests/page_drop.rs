//! A page dropped on another thread while `unbind` runs.
#![cfg(loom)]

use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static SEEN: Outcomes = Outcomes::new();

/// One page is out; a second thread drops it (into the ring, or released
/// once the pool is closing) while the main thread unbinds.
#[test]
fn page_dropped_while_unbinding() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h.small_pool();
        let page = pool.alloc().unwrap();
        let t = spawn(move || drop(page));
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        SEEN.saw(
            match (report.pages_from_rings, report.pages_held_or_cached) {
                (1, 0) => "dropped into the ring, drained by unbind",
                (0, 1) => "held during unbind, unmapped through the tracker",
                // After unbind closed the pool, before it closed the gate.
                (0, 0) => "released and unmapped by the dropping thread",
                other => panic!("unexpected report {other:?}"),
            },
        );
        t.join().unwrap();
        drop(pool);
        h.finish();
    });
    SEEN.assert_seen(&[
        "dropped into the ring, drained by unbind",
        "held during unbind, unmapped through the tracker",
        "released and unmapped by the dropping thread",
    ]);
}

/// `unbind` never waits for page holders (invariant 3): a thread holds a
/// page and a fragment and gives them back only after it hears that
/// `unbind` returned. If `unbind` waited for them, every thread would block
/// and loom would report a deadlock. The holder still reads its buffers
/// after unbind (valid memory, no device call).
#[test]
fn unbind_does_not_wait_for_page_holders() {
    model(|| {
        let mut h = Harness::new();
        let mut pool = h.small_pool();
        let page = pool.alloc().unwrap();
        let frag = pool.alloc_frag(100).unwrap();
        let (done_tx, done_rx) = loom::sync::mpsc::channel::<()>();
        let holder = spawn(move || {
            done_rx.recv().unwrap();
            assert_eq!(page.as_slice()[0], 0);
            assert_eq!(frag.as_slice().len(), 100);
            drop(page);
            drop(frag);
        });
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        assert_eq!(report.pages_held_or_cached, 2, "both pages still held");
        done_tx.send(()).unwrap();
        holder.join().unwrap();
        drop(pool);
        h.finish();
    });
}
