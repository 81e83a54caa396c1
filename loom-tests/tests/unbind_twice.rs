//! Two `unbind` calls at once (the second waits for the first and is
//! refused), and an implicit unbind by dropping the `Device`, each while a
//! page is dropped on another thread.
#![cfg(loom)]

use loom::sync::Arc;
use pagepool::checking::{CheckMode, CheckingDevice};
use pagepool::Device;
use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static TWICE: Outcomes = Outcomes::new();

#[test]
fn two_unbinds_race_a_page_drop() {
    model(|| {
        let h = Harness::new();
        let mut pool = h.small_pool();
        let page = pool.alloc().unwrap();
        let (device, checker) = (Arc::clone(&h.device), h.checker.clone());
        let other = spawn(move || {
            let result = device.unbind();
            // Ok or refused, once it returns the device is fully unbound.
            assert!(checker.is_unbound());
            (result.is_ok(), checker.stats())
        });
        let dropper = spawn(move || drop(page));
        let result = h.device.unbind();
        assert!(h.checker.is_unbound());
        let mine = (result.is_ok(), h.checker.stats());
        let theirs = other.join().unwrap();
        dropper.join().unwrap();
        assert!(mine.0 != theirs.0, "exactly one unbind succeeds");
        TWICE.saw(if mine.0 {
            "main unbound"
        } else {
            "other thread unbound"
        });
        // Both returned after the work was done: nothing changed since either.
        assert_eq!(mine.1, theirs.1);
        drop(pool);
        h.finish_with(mine.1);
    });
    TWICE.assert_seen(&["main unbound", "other thread unbound"]);
}

/// Dropping the last `Device` handle unbinds it while a page is returned.
#[test]
fn device_drop_unbinds_while_page_returns() {
    model(|| {
        let checker = CheckingDevice::builder().mode(CheckMode::Record).build();
        let device = Device::new(checker.clone());
        let mut pool = device
            .pool_builder()
            .cache_size(2)
            .refill_batch(1)
            .ring_size(1)
            .build()
            .unwrap();
        let page = pool.alloc().unwrap();
        let dropper = spawn(move || drop(page));
        drop(device);
        assert!(checker.is_unbound());
        let at_unbind = checker.stats();
        dropper.join().unwrap();
        drop(pool);
        let stats = checker.stats();
        assert_eq!(stats, at_unbind, "{}", checker.report());
        assert_eq!(stats.violations, 0, "{}", checker.report());
        assert_eq!(checker.live_mappings(), 0);
        assert_eq!(stats.maps, stats.unmaps);
    });
}
