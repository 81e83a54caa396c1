mod common;
use common::{CountingOps, CountingPages};
use pagepool::{AllocError, Device};
use std::sync::atomic::Ordering;

#[test]
fn alloc_recycle_unbind_smoke() {
    let ops = CountingOps::default();
    let pages = CountingPages::default();
    let device = Device::new(ops.clone());
    let mut pool = device
        .pool_builder()
        .page_source(pages.clone())
        .build()
        .unwrap();
    let a = pool.alloc().unwrap();
    let b = pool.alloc().unwrap();
    assert_ne!(a.dma_addr(), b.dma_addr());
    pool.recycle_direct(a);
    let held = pool.alloc().unwrap();
    let t = std::thread::spawn(move || drop(b));
    t.join().unwrap();
    let report = device.unbind().unwrap();
    assert_eq!(ops.maps.load(Ordering::SeqCst), 64);
    assert_eq!(ops.unmaps.load(Ordering::SeqCst), 64);
    assert_eq!(report.pages_from_rings + report.pages_in_flight, 64);
    assert_eq!(pool.alloc().unwrap_err(), AllocError::Unbound);
    assert_eq!(held.as_slice().len(), 4096);
    drop(held);
    drop(pool);
    assert_eq!(ops.unmaps.load(Ordering::SeqCst), 64);
    pages.assert_all_freed_once();
}
