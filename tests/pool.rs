//! Pool-level behaviour: the fast, ring and slow paths, higher orders,
//! fragments, sync for the device on recycle, statistics and introspection,
//! pool and device lifetimes, unbind from several callers, configuration
//! errors, allocation failures, the simulated device's view of the data,
//! bulk allocation and bulk put, and the untracked build.

mod support;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::SystemTime;

use pagepool::checking::{CheckingDevice, Violation};
use pagepool::{
    put_bulk, AllocError, BuildError, ConfigError, Device, DmaDirection, DmaError, Frag, Page,
    PagePool, SyncError, Tracked, UnbindError, DEFAULT_CACHE_SIZE, DEFAULT_REFILL_BATCH,
    DEFAULT_RING_SIZE, FRAG_ALIGN, MAX_CACHE_SIZE, MAX_ORDER, MAX_RING_SIZE, PAGE_SIZE,
};
use support::checks::{
    assert_unbound_clean, checker, CountingOps, GuardedPages, LimitedPages, SyncCall,
};
use support::counting::CountingPages;
use support::rig::Rig;

// ---------------------------------------------------------------------------
// Types.
// ---------------------------------------------------------------------------

/// A `Page` is one pointer, and `Option<Page>` too: a burst of handles is
/// a burst of pointers.
#[test]
fn a_page_handle_is_one_pointer() {
    use core::mem::size_of;
    assert_eq!(size_of::<Page>(), size_of::<usize>());
    assert_eq!(size_of::<Option<Page>>(), size_of::<usize>());
    assert_eq!(size_of::<Page<pagepool::Untracked>>(), size_of::<usize>());
}

/// The driver's remove path may run on any thread while pools are in use,
/// so the handles must be shareable and movable as documented.
#[test]
fn handles_are_send_and_sync_as_documented() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Device>();
    send_sync::<Device<pagepool::Untracked>>();
    send_sync::<Page>();
    send_sync::<Frag>();
    send::<PagePool>();
    send_sync::<CheckingDevice>();
}

// ---------------------------------------------------------------------------
// Fast path, ring path, slow path.
// ---------------------------------------------------------------------------

#[test]
fn fast_path_hands_back_the_same_mapping_without_a_new_map() {
    let rig = Rig::new();
    let mut pool = rig.pool();
    let page = pool.alloc().unwrap();
    let addr = page.dma_addr();
    let maps = rig.checker.stats().maps;
    for _ in 0..100 {
        let p = pool.alloc().unwrap();
        pool.recycle_direct(p);
    }
    pool.recycle_direct(page);
    let again = pool.alloc().unwrap();
    assert_eq!(again.dma_addr(), addr, "the page recycled last comes first");
    assert_eq!(
        rig.checker.stats().maps,
        maps,
        "no new map on the fast path"
    );
    assert_eq!(rig.checker.stats().unmaps, 0);
    let s = pool.stats();
    assert_eq!(s.alloc.fast, 101);
    assert_eq!(s.alloc.slow, 1);
    assert_eq!(s.recycle.cached, 101);
    drop(again);
    rig.finish(pool);
}

#[test]
fn ring_path_takes_pages_dropped_on_other_threads_and_refills() {
    let rig = Rig::new();
    let mut pool = rig.builder().cache_size(8).refill_batch(8).build().unwrap();
    let batch: Vec<Page> = (0..8).map(|_| pool.alloc().unwrap()).collect();
    let addrs: Vec<_> = batch.iter().map(Page::dma_addr).collect();
    assert_eq!(pool.cached(), 0);
    thread::spawn(move || drop(batch)).join().unwrap();
    assert_eq!(pool.stats().recycle.ring, 8);
    assert_eq!(
        pool.cached(),
        0,
        "remote drops go to the ring, not the cache"
    );

    let maps = rig.checker.stats().maps;
    let again: Vec<Page> = (0..8).map(|_| pool.alloc().unwrap()).collect();
    assert_eq!(rig.checker.stats().maps, maps, "refilled from the ring");
    let s = pool.stats();
    assert_eq!(s.alloc.refill, 1, "one refill of a whole batch");
    assert_eq!(s.alloc.fast, 7 + 7);
    let mut a: Vec<_> = again.iter().map(Page::dma_addr).collect();
    let mut b = addrs;
    a.sort();
    b.sort();
    assert_eq!(a, b, "the same mappings came back");
    drop(again);
    rig.finish(pool);
}

#[test]
fn ring_full_releases_unmap_and_free() {
    let rig = Rig::new();
    let mut pool = rig.builder().ring_size(3).refill_batch(10).build().unwrap();
    let batch: Vec<Page> = (0..10).map(|_| pool.alloc().unwrap()).collect();
    thread::spawn(move || drop(batch)).join().unwrap();
    let s = pool.stats();
    assert_eq!((s.recycle.ring, s.recycle.ring_full), (3, 7));
    assert_eq!(rig.checker.stats().unmaps, 7);
    assert_eq!(rig.pages.counting.freed(), 7, "ring-full pages are freed");
    assert_eq!(s.pages_mapped, 3);
    assert_eq!(s.pages_held, 0);
    assert_eq!(rig.checker.live_mappings(), 3);
    assert_eq!(rig.device.tracked_mappings(), 3);
    drop(pool);
    assert_eq!(
        rig.checker.live_mappings(),
        0,
        "the dropped pool drained its ring"
    );
    rig.finish(());
}

#[test]
fn slow_path_maps_a_batch_of_64() {
    let rig = Rig::new();
    let mut pool = rig.pool();
    assert_eq!(DEFAULT_REFILL_BATCH, 64);
    assert_eq!(DEFAULT_CACHE_SIZE, 128);
    assert_eq!(DEFAULT_RING_SIZE, 1024);
    let first = pool.alloc().unwrap();
    assert_eq!(rig.checker.stats().maps, 64);
    assert_eq!(rig.pages.counting.allocated(), 64);
    assert_eq!(pool.cached(), 63);
    let rest: Vec<Page> = (0..63).map(|_| pool.alloc().unwrap()).collect();
    assert_eq!(rig.checker.stats().maps, 64, "63 more from the cache");
    let next = pool.alloc().unwrap();
    assert_eq!(rig.checker.stats().maps, 128, "empty again: another batch");
    let s = pool.stats();
    assert_eq!((s.alloc.slow, s.alloc.empty, s.alloc.fast), (2, 2, 63));
    assert_eq!(s.pages_mapped, 128);
    assert_eq!(s.bytes_mapped, 128 * PAGE_SIZE as u64);
    assert_eq!(rig.device.tracked_mappings(), 128);

    // A smaller refill batch maps that many.
    let mut small = rig.builder().refill_batch(5).build().unwrap();
    let _p = small.alloc().unwrap();
    assert_eq!(rig.checker.stats().maps, 133);
    drop((first, rest, next, _p));
    rig.finish((pool, small));
}

#[test]
fn higher_order_pages_are_mapped_one_at_a_time_at_full_size() {
    let rig = Rig::new();
    for order in [1u32, 2, 4, MAX_ORDER] {
        let mut pool = rig.builder().order(order).build().unwrap();
        let len = PAGE_SIZE << order;
        assert_eq!(pool.page_len(), len);
        let maps = rig.checker.stats().maps;
        let mut page = pool.alloc().unwrap();
        assert_eq!(rig.checker.stats().maps, maps + 1, "one page per slow path");
        assert_eq!(page.len(), len);
        assert!(!page.is_empty(), "a page is never empty");
        assert_eq!(page.as_slice().as_ptr() as usize % PAGE_SIZE, 0);
        let list = rig.checker.live_mapping_list();
        let m = list
            .iter()
            .find(|m| m.mapping.addr == page.dma_addr())
            .unwrap();
        assert_eq!(m.mapping.len, len);
        page.as_mut_slice()[len - 1] = 1; // the whole block is usable
        let s = pool.stats();
        assert_eq!((s.alloc.slow, s.alloc.slow_high_order), (0, 1));
        assert_eq!(s.bytes_held, len as u64);
        pool.recycle_direct(page);
        let again = pool.alloc().unwrap();
        assert_eq!(rig.checker.stats().maps, maps + 1, "recycled, not remapped");
        drop(again);
    }
    rig.finish(());
}

// ---------------------------------------------------------------------------
// Fragments.
// ---------------------------------------------------------------------------

#[test]
fn fragments_are_carved_aligned_from_one_page() {
    let rig = Rig::new();
    let mut pool = rig.pool();
    let frags: Vec<Frag> = (0..4).map(|_| pool.alloc_frag(1000).unwrap()).collect();
    let base = frags[0].dma_addr();
    for (i, f) in frags.iter().enumerate() {
        assert_eq!(f.offset(), i * 1024);
        assert_eq!(f.offset() % FRAG_ALIGN, 0);
        assert_eq!(f.dma_addr(), base.offset((i * 1024) as u64));
        assert_eq!(f.len(), 1000);
        assert!(!f.is_empty());
        assert_eq!(f.as_slice().len(), 1000);
        assert_eq!(
            format!("{f:?}"),
            format!(
                "Frag {{ dma_addr: {:?}, offset: {}, len: 1000 }}",
                f.dma_addr(),
                i * 1024
            )
        );
    }
    let fifth = pool.alloc_frag(1000).unwrap();
    assert_eq!(fifth.offset(), 0, "did not fit: a new page");
    assert_ne!(fifth.dma_addr(), base.offset(4096));
    assert_eq!(
        pool.alloc_frag(0).unwrap_err(),
        AllocError::FragmentSize {
            requested: 0,
            page_len: 4096
        }
    );
    assert!(matches!(
        pool.alloc_frag(4097),
        Err(AllocError::FragmentSize {
            requested: 4097,
            ..
        })
    ));
    assert_eq!(pool.stats().pages_held, 2, "two pages carry fragments");
    drop((frags, fifth));
    rig.finish(pool);
}

/// A fragment that ends exactly at the page's end still comes from the
/// current page; a fragment syncs its own range for the device.
#[test]
fn a_fragment_may_end_exactly_at_the_page_end_and_syncs_for_the_device() {
    let rig = Rig::new();
    let mut pool = rig.pool();
    let head = pool.alloc_frag(3072).unwrap();
    let mut tail = pool.alloc_frag(1024).unwrap();
    assert_eq!(tail.offset(), 3072, "fits exactly: same page");
    assert_eq!(tail.dma_addr(), head.dma_addr().offset(3072));
    let syncs = rig.checker.stats().syncs_for_device;
    tail.sync_for_device(0..64).unwrap();
    assert_eq!(rig.checker.stats().syncs_for_device, syncs + 1);
    drop((head, tail));
    rig.finish(pool);
}

/// A pool dropped before it mapped anything leaves no detached entry; one
/// that mapped pages is listed until its pages are back.
#[test]
fn only_pools_that_mapped_pages_stay_listed_as_detached() {
    let rig = Rig::new();
    let unused = rig.pool();
    drop(unused);
    assert!(rig.device.detached_pools().is_empty());
    let mut used = rig.pool();
    let page = used.alloc().unwrap();
    drop(used);
    assert_eq!(rig.device.detached_pools().len(), 1);
    drop(page);
    rig.device.unbind().unwrap();
    rig.checker.assert_clean();
}

/// The page is synced for the device once, after its last fragment drops
/// (and after the owner moved on), never per fragment.
#[test]
fn last_fragment_recycles_the_page_and_only_then_syncs_once() {
    let (rig, state) = Rig::spied();
    let mut pool = rig
        .builder()
        .direction(DmaDirection::Bidirectional)
        .sync_for_device(0, 4096)
        .build()
        .unwrap();
    let frags: Vec<Frag> = (0..4).map(|_| pool.alloc_frag(1000).unwrap()).collect();
    let page_addr = frags[0].dma_addr();
    let mut frags = frags.into_iter();
    let last = frags.next().unwrap();
    // Three fragments dropped on three threads: nothing happens to the page.
    let hs: Vec<_> = frags.map(|f| thread::spawn(move || drop(f))).collect();
    for h in hs {
        h.join().unwrap();
    }
    assert!(state.take_syncs().is_empty());
    assert_eq!(pool.stats().recycle.ring, 0);
    // The owner moves to a new page: still one fragment alive.
    let other = pool.alloc_frag(4000).unwrap();
    assert!(state.take_syncs().is_empty());
    assert_eq!(pool.stats().recycle.ring, 0);
    // The last fragment goes: one sync of the whole max_len, then the ring.
    thread::spawn(move || drop(last)).join().unwrap();
    assert_eq!(
        state.take_syncs(),
        vec![SyncCall {
            to_device: true,
            addr: page_addr,
            offset: 0,
            len: 4096
        }]
    );
    assert_eq!(pool.stats().recycle.ring, 1);
    // While the owner is still carving a page, fragments dropping does not
    // recycle it.
    drop(other);
    assert!(state.take_syncs().is_empty());
    assert_eq!(pool.stats().recycle.ring, 1);
    drop(pool); // lets go of the fragment page: recycled into the closing pool
    assert_eq!(rig.checker.live_mappings(), 0);
    rig.finish(());
}

/// Fragments of one page written on different threads do not overlap, and
/// each one syncs only its own range for the CPU.
#[test]
fn fragments_sync_their_own_range() {
    let (rig, state) = Rig::spied();
    let mut pool = rig.device.pool_builder().build().unwrap();
    let mut a = pool.alloc_frag(100).unwrap();
    let mut b = pool.alloc_frag(100).unwrap();
    rig.checker.device_write(a.dma_addr(), &[1; 100]).unwrap();
    rig.checker.device_write(b.dma_addr(), &[2; 100]).unwrap();
    a.sync_for_cpu(0..100).unwrap();
    b.sync_for_cpu(10..20).unwrap();
    assert!(a.as_slice().iter().all(|&x| x == 1));
    let syncs = state.take_syncs();
    assert_eq!(syncs[0].offset, 0);
    assert_eq!((syncs[1].offset, syncs[1].len), (128 + 10, 10));
    assert_eq!(
        b.sync_for_cpu(0..101),
        Err(SyncError::OutOfRange {
            start: 0,
            end: 101,
            len: 100
        })
    );
    let tb = thread::spawn(move || {
        b.as_mut_slice().fill(9);
        b
    });
    a.as_mut_slice().fill(8);
    let b = tb.join().unwrap();
    assert!(a.as_slice().iter().all(|&x| x == 8));
    assert!(b.as_slice().iter().all(|&x| x == 9));
    drop((a, b));
    rig.finish(pool);
}

// ---------------------------------------------------------------------------
// Sync for device on recycle.
// ---------------------------------------------------------------------------

#[test]
fn recycle_syncs_min_of_dirty_len_and_max_len_from_offset() {
    let (rig, state) = Rig::spied();
    let mut pool = rig
        .builder()
        .direction(DmaDirection::Bidirectional)
        .sync_for_device(256, 1024)
        .cache_size(4)
        .refill_batch(1)
        .build()
        .unwrap();
    let sync = |offset, len, addr| SyncCall {
        to_device: true,
        addr,
        offset,
        len,
    };
    for (dirty, expect) in [
        (Some(100), Some(100)),
        (None, Some(1024)),
        (Some(5000), Some(1024)),
        (Some(0), None),
    ] {
        let mut page = pool.alloc().unwrap();
        let addr = page.dma_addr();
        if let Some(d) = dirty {
            page.set_dirty_len(d);
        }
        pool.recycle_direct(page);
        let want: Vec<_> = expect.map(|len| sync(256, len, addr)).into_iter().collect();
        assert_eq!(state.take_syncs(), want, "direct recycle, dirty {dirty:?}");
    }
    // Remote recycling (ring) and bulk put sync the same way.
    let mut page = pool.alloc().unwrap();
    let addr = page.dma_addr();
    page.set_dirty_len(300);
    thread::spawn(move || drop(page)).join().unwrap();
    assert_eq!(state.take_syncs(), vec![sync(256, 300, addr)]);
    let mut page = pool.alloc().unwrap();
    let addr = page.dma_addr();
    page.set_dirty_len(7);
    put_bulk([page]);
    assert_eq!(state.take_syncs(), vec![sync(256, 7, addr)]);

    // What the device sees: CPU writes in the synced range reach it, those
    // outside do not (the checker flags a device read of unsynced bytes).
    let mut page = pool.alloc().unwrap();
    let addr = page.dma_addr();
    page.as_mut_slice()[256..356].fill(0xEE);
    page.as_mut_slice()[400] = 1;
    page.set_dirty_len(100);
    pool.recycle_direct(page);
    assert_eq!(
        rig.checker.device_read(addr.offset(256), 100).unwrap(),
        vec![0xEE; 100]
    );
    assert!(matches!(
        rig.checker.device_read(addr.offset(400), 1),
        Err(Violation::DeviceReadBeforeSync { .. })
    ));
    assert_eq!(rig.checker.take_violations().len(), 1);
    assert_eq!(state.take_syncs(), vec![sync(256, 100, addr)]);

    // After unbind nothing is synced: recycling releases instead.
    let page = pool.alloc().unwrap();
    rig.device.unbind().unwrap();
    pool.recycle_direct(page);
    assert!(state.take_syncs().is_empty());
    assert_eq!(pool.stats().recycle.released_closed, 1);
    drop(pool);
    // Not `Rig::finish`: the checker keeps the deliberate violation.
    assert_eq!(rig.checker.stats().violations, 1, "only the deliberate one");
    assert_eq!(rig.checker.live_mappings(), 0);
    assert_eq!(rig.checker.stats().calls_after_unbind, 0);
    rig.pages.assert_all_freed_once_unmapped();
}

/// The dirty length belongs to the page's owner of the moment: whoever
/// holds the page next starts again from the whole `max_len`, on every
/// path a page comes back by.
#[test]
fn the_next_owner_of_a_page_starts_from_the_whole_dirty_length() {
    let (rig, state) = Rig::spied();
    // One page only: every allocation below hands out the same page.
    let mut pool = rig
        .builder()
        .direction(DmaDirection::Bidirectional)
        .sync_for_device(0, 512)
        .cache_size(1)
        .refill_batch(1)
        .build()
        .unwrap();
    let sync = |len, addr| SyncCall {
        to_device: true,
        addr,
        offset: 0,
        len,
    };
    let mut page = pool.alloc().unwrap();
    let addr = page.dma_addr();
    page.set_dirty_len(10);
    thread::spawn(move || drop(page)).join().unwrap(); // ring
    let page = pool.alloc().unwrap(); // refilled from the ring
    assert_eq!(page.dma_addr(), addr, "the same page");
    drop(page);
    assert_eq!(state.take_syncs(), vec![sync(10, addr), sync(512, addr)]);
    let mut page = pool.alloc().unwrap();
    page.set_dirty_len(20);
    put_bulk([page]);
    let page = pool.alloc().unwrap();
    pool.recycle_direct(page);
    assert_eq!(state.take_syncs(), vec![sync(20, addr), sync(512, addr)]);
    assert_eq!(pool.stats().alloc.slow, 1, "one page all along");
    rig.finish(pool);
}

/// Without sync_for_device configured, recycling makes no device call.
#[test]
fn no_sync_on_recycle_unless_configured() {
    let (rig, state) = Rig::spied();
    let mut pool = rig.device.pool_builder().build().unwrap();
    let p = pool.alloc().unwrap();
    let before = rig.checker.stats();
    pool.recycle_direct(p);
    let p = pool.alloc().unwrap();
    thread::spawn(move || drop(p)).join().unwrap();
    assert!(state.take_syncs().is_empty());
    assert_eq!(rig.checker.stats(), before);
    rig.finish(pool);
}

// ---------------------------------------------------------------------------
// Statistics and introspection.
// ---------------------------------------------------------------------------

/// A scripted run with every counter worked out by hand (Linux's names).
#[test]
fn stats_count_every_path_with_linux_names() {
    let rig = Rig::new();
    let mut pool = rig
        .builder()
        .cache_size(4)
        .refill_batch(2)
        .ring_size(2)
        .build()
        .unwrap();
    let a = pool.alloc().unwrap(); // empty, slow (maps 2)
    let b = pool.alloc().unwrap(); // fast
    let c = pool.alloc().unwrap(); // empty, slow (maps 2)
    let d = pool.alloc().unwrap(); // fast
    let e = pool.alloc().unwrap(); // empty, slow (maps 2)
    let s = pool.stats();
    assert_eq!(s.pages_held, 5);
    assert_eq!(s.bytes_held, 5 * 4096);
    assert_eq!(s.pages_mapped, 6);
    pool.recycle_direct(a); // cached
    pool.recycle_direct(b); // cached
    pool.recycle_direct(c); // cached: cache full now (4)
    pool.recycle_direct(d); // cache_full, then ring
    thread::spawn(move || drop(e)).join().unwrap(); // ring (2 of 2)
    let f: Vec<Page> = (0..4).map(|_| pool.alloc().unwrap()).collect(); // fast x4
    let g = pool.alloc().unwrap(); // refill from ring (2 pages), fast pop
    let h = pool.alloc().unwrap(); // fast
    let i = pool.alloc().unwrap(); // empty, slow (maps 2)
                                   // Three from another thread into a ring of 2: 2 ring, 1 ring_full.
    thread::spawn(move || drop((g, h, i))).join().unwrap();
    let s = pool.stats();
    assert_eq!(s.alloc.fast, 2 + 4 + 1);
    assert_eq!(s.alloc.slow, 4);
    assert_eq!(s.alloc.slow_high_order, 0);
    assert_eq!(s.alloc.empty, 4);
    assert_eq!(s.alloc.refill, 1);
    assert_eq!(s.alloc.waive, 0);
    assert_eq!(s.recycle.cached, 3);
    assert_eq!(s.recycle.cache_full, 1);
    assert_eq!(s.recycle.ring, 2 + 2);
    assert_eq!(s.recycle.ring_full, 1);
    assert_eq!(s.recycle.released_closed, 0);
    assert_eq!(s.pages_held, 4, "the four in `f`");
    assert_eq!(s.pages_mapped, 8 - 1);
    assert_eq!(s.bytes_mapped, 7 * 4096);
    assert_eq!(rig.checker.live_mappings(), 7);

    rig.device.unbind().unwrap();
    drop(f);
    let s = pool.stats();
    assert_eq!(s.recycle.released_closed, 4, "came back after unbind");
    assert_eq!(s.pages_held, 0);
    assert_eq!(s.pages_mapped, 0);
    rig.finish(pool);
}

#[test]
fn pool_info_is_page_pool_get() {
    let rig = Rig::new();
    let mut pool = rig.device.pool_builder().order(1).build().unwrap();
    let other = rig.device.pool_builder().build().unwrap();
    assert_ne!(pool.id(), other.id());
    let held: Vec<Page> = (0..3).map(|_| pool.alloc().unwrap()).collect();
    assert!(held.iter().all(|p| p.pool_id() == pool.id()));
    let info = pool.info();
    assert_eq!(info.id, pool.id());
    // Higher-order pages are mapped one at a time: all three are held.
    assert_eq!(info.inflight, 3);
    assert_eq!(info.inflight_mem, 3 * 8192);
    assert_eq!(info.stats.pages_held, 3);
    assert_eq!(info.detach_time, None);
    // Linux's `inflight` counts every page taken from memory and not
    // released: an order-0 pool's cached rest of the refill too.
    let mut batched = rig.device.pool_builder().build().unwrap();
    let one = batched.alloc().unwrap();
    let info0 = batched.info();
    assert_eq!(info0.inflight, pagepool::DEFAULT_REFILL_BATCH as u64);
    assert_eq!(info0.stats.pages_held, 1);
    drop(one);
    drop(batched);
    let listed = rig.device.pools();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&info));
    drop(other);
    assert_eq!(rig.device.pools(), vec![pool.info()]);
    drop(held);
    rig.finish(pool);
}

/// Like Linux's `page-pool-get`, a pool dropped by its owner while pages
/// are still in flight stays listed (as detached, with its detach time)
/// until the pages come back.
#[test]
fn dropped_pool_with_pages_in_flight_is_listed_with_detach_time() {
    let rig = Rig::new();
    let mut pool = rig.device.pool_builder().build().unwrap();
    let mut idle = rig.device.pool_builder().build().unwrap();
    let id = pool.id();
    let held: Vec<Page> = (0..2).map(|_| pool.alloc().unwrap()).collect();
    drop(idle.alloc().unwrap()); // back in its ring: nothing in flight
    assert!(rig.device.detached_pools().is_empty());
    let before = SystemTime::now();
    drop(pool);
    drop(idle);
    assert!(rig.device.pools().is_empty(), "no pool is open");
    let detached = rig.device.detached_pools();
    assert_eq!(detached.len(), 1, "only the pool with pages in flight");
    let info = &detached[0];
    assert_eq!(info.id, id);
    assert_eq!(info.inflight, 2);
    assert_eq!(info.inflight_mem, 2 * 4096);
    assert!(info.detach_time.expect("detach time is set") >= before);
    drop(held);
    assert!(
        rig.device.detached_pools().is_empty(),
        "gone once every page came back"
    );
    rig.finish(());
}

/// A detached pool's pages held across unbind: unbind forgets the pool.
#[test]
fn detached_pools_are_forgotten_at_unbind() {
    let rig = Rig::new();
    let mut pool = rig.device.pool_builder().build().unwrap();
    let held = pool.alloc().unwrap();
    drop(pool);
    assert_eq!(rig.device.detached_pools().len(), 1);
    let report = rig.device.unbind().unwrap();
    assert_eq!(report.pools, 0, "no pool was open");
    assert_eq!(report.pages_held_or_cached, 1);
    assert!(rig.device.detached_pools().is_empty());
    rig.finish(held);
}

// ---------------------------------------------------------------------------
// Lifetimes: pool drop, device drop, unbind twice / concurrently.
// ---------------------------------------------------------------------------

#[test]
fn dropped_pool_keeps_held_pages_mapped_and_tracked_until_they_return() {
    let rig = Rig::new();
    let mut pool = rig.pool();
    let mut held: Vec<Page> = (0..5).map(|_| pool.alloc().unwrap()).collect();
    drop(pool); // 59 cached pages unmapped and freed
    assert_eq!(rig.checker.stats().unmaps, 59);
    assert_eq!(rig.checker.live_mappings(), 5);
    assert_eq!(rig.device.tracked_mappings(), 5);
    assert_eq!(rig.pages.live(), 5);
    // Still usable for DMA: the device writes, the CPU syncs and reads.
    rig.checker
        .device_write(held[0].dma_addr(), b"late")
        .unwrap();
    held[0].sync_for_cpu(0..4).unwrap();
    assert_eq!(&held[0].as_slice()[..4], b"late");
    // Each page that comes back is unmapped and freed, from any thread.
    let last = held.pop().unwrap();
    thread::spawn(move || drop(last)).join().unwrap();
    assert_eq!(rig.checker.live_mappings(), 4);
    assert_eq!(rig.pages.live(), 4);
    put_bulk(held.drain(..2));
    assert_eq!(rig.checker.live_mappings(), 2);
    // The rest is unmapped by unbind, and freed when it comes back.
    let report = rig.device.unbind().unwrap();
    assert_eq!(report.pools, 0);
    assert_eq!(report.pages_held_or_cached, 2);
    assert_unbound_clean(&rig.checker);
    rig.finish(held);
}

#[test]
fn dropping_the_device_unbinds_it() {
    let checker = checker();
    let pages = GuardedPages::new(&checker);
    let device = Device::new(checker.clone());
    let mut pool = device
        .pool_builder()
        .page_source(pages.clone())
        .build()
        .unwrap();
    let held = pool.alloc().unwrap();
    assert!(!checker.is_unbound());
    drop(device);
    assert_unbound_clean(&checker);
    assert_eq!(pool.alloc().unwrap_err(), AllocError::Unbound);
    drop((held, pool));
    pages.assert_all_freed_once_unmapped();
}

#[test]
fn unbind_twice_is_already_unbound() {
    let rig = Rig::new();
    let mut pool = rig.device.pool_builder().build().unwrap();
    let _p = pool.alloc().unwrap();
    assert!(rig.device.is_bound());
    let first = rig.device.unbind().unwrap();
    assert_eq!(first.pages_held_or_cached, 64);
    assert_eq!(rig.device.unbind(), Err(UnbindError::AlreadyUnbound));
    assert_eq!(rig.device.unbind(), Err(UnbindError::AlreadyUnbound));
    assert!(UnbindError::AlreadyUnbound
        .to_string()
        .contains("already unbound"));
    assert!(!rig.device.is_bound());
    rig.finish(());
}

#[test]
fn concurrent_unbind_from_two_threads_unbinds_once() {
    for _ in 0..50 {
        let rig = Rig::new();
        let mut pool = rig.pool();
        let held: Vec<Page> = (0..70).map(|_| pool.alloc().unwrap()).collect();
        let barrier = Arc::new(Barrier::new(2));
        let results: Vec<_> = (0..2)
            .map(|_| {
                let device = Arc::clone(&rig.device);
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    barrier.wait();
                    let r = device.unbind();
                    // Whichever returns, the device is fully unbound by then.
                    assert!(!device.is_bound());
                    r
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(ok.len(), 1, "exactly one unbind does the work: {results:?}");
        assert_eq!(ok[0].pages_held_or_cached, 128);
        assert!(results.contains(&Err(UnbindError::AlreadyUnbound)));
        assert_unbound_clean(&rig.checker);
        rig.finish((held, pool));
    }
}

// ---------------------------------------------------------------------------
// Configuration errors.
// ---------------------------------------------------------------------------

/// The checking device, reporting a smallest IOMMU page that is not a
/// power of two (a defective backend).
struct OddIommuPage(CheckingDevice);

impl pagepool::DmaOps for OddIommuPage {
    unsafe fn map(
        &self,
        cpu: std::ptr::NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<pagepool::DmaAddr, DmaError> {
        // SAFETY: forwarded caller contract.
        unsafe { self.0.map(cpu, len, direction) }
    }
    unsafe fn unmap(&self, mapping: pagepool::DmaMapping) -> Result<(), pagepool::UnmapError> {
        // SAFETY: forwarded caller contract.
        unsafe { self.0.unmap(mapping) }
    }
    unsafe fn sync_for_device(&self, mapping: pagepool::DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded caller contract.
        unsafe { self.0.sync_for_device(mapping, offset, len) }
    }
    unsafe fn sync_for_cpu(&self, mapping: pagepool::DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded caller contract.
        unsafe { self.0.sync_for_cpu(mapping, offset, len) }
    }
    fn on_unbind(&self) {
        self.0.on_unbind()
    }
    fn min_page_size(&self) -> Option<usize> {
        Some(3 * 4096)
    }
}

#[test]
fn a_backend_iommu_page_that_is_not_a_power_of_two_is_refused() {
    let checker = checker();
    let device = Device::with_cpu_access_check(OddIommuPage(checker.clone()), checker.clone());
    for builder in [
        device.pool_builder(),
        device.pool_builder().order(2),
        device.pool_builder().regions(),
    ] {
        let e = builder.build().unwrap_err();
        assert_eq!(
            e,
            BuildError::InvalidIommuPage {
                min_page_size: 12288
            }
        );
        assert!(e.to_string().contains("12288"), "{e}");
    }
    device.unbind().unwrap();
    assert_eq!(checker.stats().maps, 0);
}

/// A backend whose `map` answers `DmaAddr::ERROR` as if it had succeeded;
/// nothing else may ever be called.
struct AnswersErrorAddress;

impl pagepool::DmaOps for AnswersErrorAddress {
    unsafe fn map(
        &self,
        _cpu: std::ptr::NonNull<u8>,
        _len: usize,
        _direction: DmaDirection,
    ) -> Result<pagepool::DmaAddr, DmaError> {
        Ok(pagepool::DmaAddr::ERROR)
    }
    unsafe fn unmap(&self, mapping: pagepool::DmaMapping) -> Result<(), pagepool::UnmapError> {
        panic!("{mapping:?} was never mapped");
    }
    unsafe fn sync_for_device(&self, mapping: pagepool::DmaMapping, _: usize, _: usize) {
        panic!("{mapping:?} was never mapped");
    }
    unsafe fn sync_for_cpu(&self, mapping: pagepool::DmaMapping, _: usize, _: usize) {
        panic!("{mapping:?} was never mapped");
    }
}

#[test]
fn a_map_answering_the_error_address_fails_the_allocation() {
    let pages = CountingPages::default();
    let device = Device::new(AnswersErrorAddress);
    let mut pool = device
        .pool_builder()
        .page_source(pages.clone())
        .build()
        .unwrap();
    assert_eq!(
        pool.alloc().unwrap_err(),
        AllocError::Map(DmaError::ErrorAddress)
    );
    let mut regions = device.pool_builder().regions().build().unwrap();
    assert_eq!(
        regions.alloc().unwrap_err(),
        AllocError::Map(DmaError::ErrorAddress)
    );
    assert_eq!(pages.live(), 0, "the block went back to its source");
    assert_eq!(pool.stats().pages_mapped, 0);
    assert_eq!(device.tracked_mappings(), 0);
    drop((pool, regions));
    let report = device.unbind().unwrap();
    assert_eq!(report.bytes_unmapped, 0, "nothing to unmap");
    pages.assert_all_freed_once();
}

#[test]
fn dma_addresses_debug_in_hex() {
    assert_eq!(
        format!("{:?}", pagepool::DmaAddr(0x1000)),
        "DmaAddr(0x1000)"
    );
    assert_eq!(pagepool::DmaAddr(0x1000).to_string(), "0x1000");
}

#[test]
fn builder_errors_name_every_invalid_field() {
    let device = Device::new(checker());
    let err = |b: pagepool::PagePoolBuilder<'_, Tracked>| match b.build() {
        Err(BuildError::Config(e)) => e,
        other => panic!("expected a configuration error, got {other:?}"),
    };
    let cases: Vec<(ConfigError, &str, usize)> = vec![
        (err(device.pool_builder().order(MAX_ORDER + 1)), "order", 11),
        (
            err(device.pool_builder().order(u32::MAX)),
            "order",
            u32::MAX as usize,
        ),
        (err(device.pool_builder().ring_size(0)), "ring_size", 0),
        (
            err(device.pool_builder().ring_size(MAX_RING_SIZE + 1)),
            "ring_size",
            16385,
        ),
        (err(device.pool_builder().cache_size(0)), "cache_size", 0),
        (
            err(device.pool_builder().cache_size(MAX_CACHE_SIZE + 1)),
            "cache_size",
            65537,
        ),
        (
            err(device.pool_builder().refill_batch(0)),
            "refill_batch",
            0,
        ),
        (
            err(device.pool_builder().cache_size(8).refill_batch(9)),
            "refill_batch",
            9,
        ),
        (
            err(device.pool_builder().sync_for_device(0, 0)),
            "sync_for_device.max_len",
            0,
        ),
        (
            err(device.pool_builder().sync_for_device(0, 4097)),
            "sync_for_device.max_len",
            4097,
        ),
        (
            err(device.pool_builder().sync_for_device(1, 4096)),
            "sync_for_device.offset",
            1,
        ),
        (
            err(device.pool_builder().sync_for_device(4096, 1)),
            "sync_for_device.offset",
            4096,
        ),
        (
            err(device.pool_builder().order(1).sync_for_device(4097, 4096)),
            "sync_for_device.offset",
            4097,
        ),
        (
            err(device
                .pool_builder()
                .remote_batch(pagepool::MAX_REMOTE_BATCH + 1)),
            "remote_batch",
            pagepool::MAX_REMOTE_BATCH + 1,
        ),
    ];
    for (e, field, value) in cases {
        let ConfigError::OutOfRange {
            field: named,
            value: given,
            expected,
        } = &e
        else {
            panic!("expected an out-of-range error, got {e:?}");
        };
        assert_eq!((*named, *given), (field, value), "{e}");
        assert_eq!(e.field(), field);
        let text = e.to_string();
        assert!(text.contains(field), "{text}");
        assert!(text.contains(expected), "{text}");
        let build: Box<dyn std::error::Error> = Box::new(BuildError::Config(e.clone()));
        assert!(build.to_string().contains(field));
        assert!(build.source().is_some());
    }
    // The boundaries themselves are accepted.
    for b in [
        device.pool_builder().order(MAX_ORDER),
        device.pool_builder().ring_size(1),
        device.pool_builder().ring_size(MAX_RING_SIZE),
        device.pool_builder().cache_size(1).refill_batch(1),
        device.pool_builder().cache_size(MAX_CACHE_SIZE),
        device.pool_builder().cache_size(32).refill_batch(32),
        device.pool_builder().sync_for_device(0, 4096),
        device.pool_builder().sync_for_device(4095, 1),
        device.pool_builder().order(1).sync_for_device(4096, 4096),
        device
            .pool_builder()
            .remote_batch(pagepool::MAX_REMOTE_BATCH),
        device.pool_builder().regions().region_size(PAGE_SIZE),
        device
            .pool_builder()
            .regions()
            .region_size(pagepool::MAX_REGION_SIZE),
    ] {
        b.build().unwrap();
    }
}

/// A pool shows its id, its configuration and what it has cached.
#[test]
fn a_pool_debugs_as_its_id_config_and_cache() {
    let rig = Rig::new();
    let mut pool = rig.builder().ring_size(77).build().unwrap();
    drop(pool.alloc().unwrap());
    assert_shows(
        &format!("{pool:?}"),
        &[
            "PagePool",
            &format!("id: {}", pool.id()),
            "ring_size: 77",
            &format!("cached: {}", pool.cached()),
        ],
    );
    rig.finish(pool);
}

/// `recycle_direct` of a page of another pool sends it home, to that
/// pool's ring, not into this pool's cache; a full cache and a full ring
/// release the page (counted as `ring_full`, not as a page of a closing
/// pool).
#[test]
fn recycle_direct_sends_foreign_pages_home_and_releases_past_a_full_ring() {
    let rig = Rig::new();
    let mut mine = rig
        .builder()
        .cache_size(1)
        .refill_batch(1)
        .ring_size(1)
        .remote_batch(0)
        .build()
        .unwrap();
    let mut theirs = rig.builder().remote_batch(0).build().unwrap();
    let foreign = theirs.alloc().unwrap();
    let cached_before = mine.cached();
    mine.recycle_direct(foreign);
    assert_eq!(mine.cached(), cached_before, "not into this pool's cache");
    assert_eq!(theirs.stats().recycle.ring, 1, "home, into its own ring");
    assert_eq!(theirs.stats().pages_held, 0);

    let pages: Vec<Page> = (0..3).map(|_| mine.alloc().unwrap()).collect();
    for page in pages {
        mine.recycle_direct(page); // the cache, the ring, then released
    }
    let s = mine.stats();
    assert_eq!((s.recycle.cached, s.recycle.cache_full), (1, 2));
    assert_eq!((s.recycle.ring, s.recycle.ring_full), (1, 1));
    assert_eq!(s.recycle.released_closed, 0, "the pool is not closing");
    assert_eq!(s.pages_held, 0);
    rig.finish((mine, theirs));
}

/// The builder shows every setting it holds.
#[test]
fn the_builder_debugs_as_its_settings() {
    let device = Device::new(checker());
    let shown = format!(
        "{:?}",
        device
            .pool_builder()
            .order(2)
            .ring_size(77)
            .cache_size(33)
            .refill_batch(11)
            .remote_batch(5)
    );
    assert_shows(
        &shown,
        &[
            "PagePoolBuilder",
            "order: 2",
            "ring_size: 77",
            "cache_size: 33",
            "refill_batch: 11",
            "remote_batch: 5",
        ],
    );
}

/// Fails unless `shown` (a `Debug` output) contains every one of `parts`.
#[track_caller]
fn assert_shows(shown: &str, parts: &[&str]) {
    for part in parts {
        assert!(shown.contains(part), "{part} missing from {shown}");
    }
}

// ---------------------------------------------------------------------------
// Allocation failures.
// ---------------------------------------------------------------------------

#[test]
fn map_failure_is_typed_and_leaks_nothing() {
    let rig = Rig::new();
    let mut pool = rig.pool();
    rig.checker.fail_next_maps(1);
    let err = pool.alloc().unwrap_err();
    assert_eq!(err, AllocError::Map(DmaError::Injected));
    assert!(err.to_string().contains("DMA map"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(rig.checker.live_mappings(), 0);
    assert_eq!(rig.device.tracked_mappings(), 0);
    assert_eq!(
        rig.pages.live(),
        0,
        "the block that failed to map was freed"
    );
    assert_eq!(pool.stats().pages_mapped, 0);
    assert_eq!(pool.stats().pages_held, 0);

    // A failure in the middle of a batch keeps what was mapped.
    rig.checker.fail_maps_every(10);
    let p = pool.alloc().unwrap();
    assert_eq!(rig.checker.live_mappings(), 9);
    assert_eq!(pool.cached(), 8);
    assert_eq!(rig.pages.live(), 9);
    rig.checker.fail_maps_every(0);
    drop(p);
    rig.finish(pool);
}

// ---------------------------------------------------------------------------
// Bulk allocation.
// ---------------------------------------------------------------------------

/// `alloc_bulk` gives what as many `alloc` calls would: distinct mapped
/// pages, from the cache first, refilling (ring, then fresh maps) as often
/// as it needs, with the same counters.
#[test]
fn alloc_bulk_gives_count_distinct_pages_across_refills() {
    let rig = Rig::new();
    let mut pool = rig.builder().cache_size(8).refill_batch(4).build().unwrap();
    let mut pages = Vec::new();
    assert_eq!(pool.alloc_bulk(&mut pages, 0), Ok(0));
    assert!(pages.is_empty());
    // 10 pages: three fresh batches of 4 (the first page of each comes
    // from the slow path, the other 3 from the cache).
    assert_eq!(pool.alloc_bulk(&mut pages, 10), Ok(10));
    assert_eq!(pages.len(), 10);
    let mut addrs: Vec<_> = pages.iter().map(|p| p.dma_addr()).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 10, "distinct pages");
    assert_eq!(pool.cached(), 2);
    let s = pool.stats();
    assert_eq!((s.alloc.slow, s.alloc.fast, s.alloc.empty), (3, 7, 3));
    assert_eq!(s.pages_held, 10);
    assert_eq!(rig.checker.live_mappings(), 12);
    // Appends: what the vector held stays.
    for page in pages.drain(5..) {
        pool.recycle_direct(page); // the cache: 2 + 5
    }
    thread::spawn(move || drop(pages)).join().unwrap(); // the ring: 5
    let mut pages = vec![pool.alloc().unwrap()];
    // 6 from the cache, then two refills from the ring (4, then 1).
    assert_eq!(pool.alloc_bulk(&mut pages, 11), Ok(11));
    assert_eq!(pages.len(), 12, "appended after the page already there");
    let s = pool.stats();
    assert_eq!(s.alloc.slow, 3, "cache and ring were enough: no new map");
    assert_eq!(s.alloc.refill, 2);
    assert_eq!(s.alloc.fast, 7 + 1 + 6 + 3);
    assert_eq!(pool.cached(), 0);
    drop(pages);
    rig.finish(pool);
}

/// `alloc_bulk` stops where the pool cannot make more: the pages it got
/// are the caller's, the next call reports the error, and after unbind it
/// fails as `alloc` does, appending nothing.
#[test]
fn alloc_bulk_gives_what_it_could_then_a_typed_error() {
    let rig = Rig::on(
        CheckingDevice::builder()
            .mode(pagepool::checking::CheckMode::Record)
            .mapping_limit(3)
            .build(),
    );
    let mut pool = rig.pool();
    let mut pages = Vec::new();
    // A count far above what the pool can make is no caller error: it
    // gets what can be made (here, the device's limit of 3 mappings).
    assert_eq!(pool.alloc_bulk(&mut pages, usize::MAX), Ok(3));
    assert_eq!(pages.len(), 3);
    assert_eq!(
        pool.alloc_bulk(&mut pages, 5),
        Err(AllocError::Map(DmaError::MappingLimit { limit: Some(3) }))
    );
    assert_eq!(pages.len(), 3, "nothing appended on error");
    for page in pages.drain(..) {
        pool.recycle_direct(page);
    }
    rig.device.unbind().unwrap();
    assert_eq!(pool.cached(), 3, "the cache still holds the unmapped pages");
    assert_eq!(pool.alloc_bulk(&mut pages, 2), Err(AllocError::Unbound));
    assert!(pages.is_empty());
    drop(pool);
    assert_eq!(rig.checker.live_mappings(), 0);
    assert_eq!(rig.checker.stats().violations, 0);
    rig.pages.assert_all_freed_once_unmapped();
}

#[test]
fn mapping_limit_is_a_typed_map_error() {
    let rig = Rig::on(
        CheckingDevice::builder()
            .mode(pagepool::checking::CheckMode::Record)
            .mapping_limit(3)
            .build(),
    );
    let mut pool = rig.pool();
    let held: Vec<Page> = (0..3).map(|_| pool.alloc().unwrap()).collect();
    assert_eq!(
        pool.alloc().unwrap_err(),
        AllocError::Map(DmaError::MappingLimit { limit: Some(3) })
    );
    assert_eq!(rig.pages.live(), 3);
    drop(held);
    let again = pool.alloc().unwrap(); // recycled through the ring: no map
    drop(again);
    rig.finish(pool);
}

#[test]
fn out_of_memory_is_a_typed_error() {
    let rig = Rig::new();
    let source = LimitedPages::new(0);
    let mut pool = rig
        .device
        .pool_builder()
        .order(1)
        .page_source(source.clone())
        .build()
        .unwrap();
    let err = pool.alloc().unwrap_err();
    assert_eq!(err, AllocError::OutOfMemory { bytes: 8192 });
    assert!(err.to_string().contains("out of memory"), "{err}");
    assert_eq!(rig.checker.stats().maps, 0);

    // Memory for 10 pages: the first batch is short, then OOM.
    let source = LimitedPages::new(10);
    let mut pool = rig
        .device
        .pool_builder()
        .page_source(source.clone())
        .build()
        .unwrap();
    let held: Vec<Page> = (0..10).map(|_| pool.alloc().unwrap()).collect();
    assert_eq!(
        pool.alloc().unwrap_err(),
        AllocError::OutOfMemory { bytes: 4096 }
    );
    assert_eq!(rig.checker.live_mappings(), 10);
    drop(held);
    rig.finish(pool);
    source.inner.assert_all_freed_once();
}

// ---------------------------------------------------------------------------
// The simulated device's view: DMA writes and reads, syncs.
// ---------------------------------------------------------------------------

#[test]
fn device_writes_reach_the_cpu_only_after_sync_for_cpu() {
    let checker = checker();
    let device = Device::new(checker.clone());
    let mut pool = device.pool_builder().build().unwrap();
    let mut page = pool.alloc().unwrap();
    checker.device_write(page.dma_addr(), b"hello").unwrap();
    checker
        .device_write(page.dma_addr().offset(100), b"world")
        .unwrap();
    // Before the sync the CPU sees its old bytes, and the checker flags it.
    assert_eq!(&page.as_slice()[..5], &[0; 5]);
    assert!(matches!(
        checker.take_violations().as_slice(),
        [Violation::CpuReadBeforeSync { .. }]
    ));
    // A partial sync hands over only its range.
    page.sync_for_cpu(0..5).unwrap();
    assert_eq!(&page.as_slice()[..5], b"hello");
    assert!(matches!(
        checker.take_violations().as_slice(),
        [Violation::CpuReadBeforeSync {
            first_unsynced: 100,
            ..
        }]
    ));
    page.sync_for_cpu(100..105).unwrap();
    assert_eq!(&page.as_slice()[100..105], b"world");
    assert!(checker.take_violations().is_empty());
    let stats = checker.stats();
    assert_eq!((stats.device_writes, stats.syncs_for_cpu), (2, 2));
    assert_eq!(stats.violations, 2, "the two deliberate early reads");
    drop(page);
    device.unbind().unwrap();
    drop(pool);
    assert_eq!(checker.live_mappings(), 0);
    assert_eq!(checker.stats().violations, 2);
}

#[test]
fn tx_pages_reach_the_device_after_sync_for_device() {
    let checker = checker();
    let device = Device::new(checker.clone());
    let mut pool = device
        .pool_builder()
        .direction(DmaDirection::ToDevice)
        .build()
        .unwrap();
    let mut page = pool.alloc().unwrap();
    assert_eq!(page.direction(), DmaDirection::ToDevice);
    page.as_mut_slice()[..5].copy_from_slice(b"frame");
    page.sync_for_device(0..5).unwrap();
    assert_eq!(checker.device_read(page.dma_addr(), 5).unwrap(), b"frame");
    // The device cannot write a ToDevice page (an IOMMU fault).
    assert!(matches!(
        checker.device_write(page.dma_addr(), b"x"),
        Err(Violation::IommuFault { .. })
    ));
    assert_eq!(checker.take_violations().len(), 1);
    drop(page);
    device.unbind().unwrap();
    drop(pool);
    assert_eq!(checker.live_mappings(), 0);
}

#[test]
fn sync_range_is_checked() {
    let rig = Rig::new();
    let mut pool = rig.device.pool_builder().build().unwrap();
    let mut page = pool.alloc().unwrap();
    assert_eq!(
        page.sync_for_cpu(4000..4097),
        Err(SyncError::OutOfRange {
            start: 4000,
            end: 4097,
            len: 4096
        })
    );
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = page.sync_for_cpu(10..5);
    assert!(matches!(backwards, Err(SyncError::OutOfRange { .. })));
    assert_eq!(page.sync_for_cpu(7..7), Ok(()));
    assert_eq!(page.sync_for_cpu(0..4096), Ok(()));
    drop(page);
    rig.finish(pool);
}

// ---------------------------------------------------------------------------
// Bulk put.
// ---------------------------------------------------------------------------

#[test]
fn put_bulk_returns_pages_of_several_pools_to_their_rings() {
    let rig = Rig::new();
    let mut a = rig.builder().ring_size(4).build().unwrap();
    let mut b = rig.pool();
    let mut mixed = Vec::new();
    for _ in 0..6 {
        mixed.push(a.alloc().unwrap());
        mixed.push(b.alloc().unwrap());
    }
    let mut sorted: Vec<Page> = Vec::new();
    sorted.extend((0..5).map(|_| a.alloc().unwrap()));
    thread::spawn(move || {
        put_bulk(mixed); // interleaved: a, b, a, b...
        put_bulk(sorted); // runs of one pool: one lock
    })
    .join()
    .unwrap();
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!((sa.recycle.ring, sa.recycle.ring_full), (4, 7));
    assert_eq!((sb.recycle.ring, sb.recycle.ring_full), (6, 0));
    // A full ring is not a closing pool: nothing counted as released.
    assert_eq!(sa.recycle.released_closed + sb.recycle.released_closed, 0);
    assert_eq!(sa.pages_held + sb.pages_held, 0);
    assert_eq!(rig.checker.stats().unmaps, 7);
    put_bulk(Vec::<Page>::new());

    // After unbind, bulk-put pages are released without device calls.
    let held: Vec<Page> = (0..3).map(|_| b.alloc().unwrap()).collect();
    rig.device.unbind().unwrap();
    let frozen = rig.checker.stats();
    put_bulk(held);
    assert_eq!(b.stats().recycle.released_closed, 3);
    assert_eq!(rig.checker.stats(), frozen);
    rig.finish((a, b));
}

/// The caller's iterator may panic halfway through a `put_bulk`: the pages
/// already taken are released (here their pool's device is unbound, so
/// the run refused them all), the pages not yet taken are dropped as the
/// panic unwinds, and nothing is lost or released twice.
#[test]
fn put_bulk_whose_iterator_panics_releases_what_it_took() {
    let rig = Rig::new();
    let mut pool = rig.pool();
    let held: Vec<Page> = (0..5).map(|_| pool.alloc().unwrap()).collect();
    rig.device.unbind().unwrap();
    let frozen = rig.checker.stats();
    let mut given = 0;
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        put_bulk(held.into_iter().inspect(|_| {
            given += 1;
            assert!(
                given <= 3,
                "the caller's iterator panics at its fourth page"
            );
        }))
    }));
    assert!(unwound.is_err());
    assert_eq!(
        pool.stats().recycle.released_closed,
        5,
        "all five came back"
    );
    assert_eq!(pool.stats().pages_held, 0);
    assert_eq!(rig.checker.stats(), frozen, "no device call after unbind");
    rig.finish(pool);
}

/// A burst longer than one run (64 pages) of one pool: the run is pushed
/// when full and the next one begins; every page reaches the ring, in runs
/// of 64, and nothing is released.
#[test]
fn put_bulk_of_more_pages_than_one_run_pushes_run_after_run() {
    let rig = Rig::new();
    let mut pool = rig
        .builder()
        .cache_size(256)
        .refill_batch(64)
        .ring_size(1024)
        .build()
        .unwrap();
    let burst: Vec<Page> = (0..200).map(|_| pool.alloc().unwrap()).collect();
    thread::spawn(move || put_bulk(burst)).join().unwrap();
    let s = pool.stats();
    assert_eq!((s.recycle.ring, s.recycle.ring_full), (200, 0));
    assert_eq!(s.pages_held, 0);
    assert_eq!(rig.checker.stats().unmaps, 0, "nothing left the pool");
    rig.finish(pool);
}

#[test]
fn a_page_debugs_as_its_pool_address_and_length() {
    let rig = Rig::new();
    let mut pool = rig.pool();
    let page = pool.alloc().unwrap();
    let shown = format!("{page:?}");
    assert_eq!(
        shown,
        format!(
            "Page {{ pool: {}, dma_addr: {:?}, len: 4096 }}",
            pool.id(),
            page.dma_addr()
        )
    );
    drop(page);
    rig.finish(pool);
}

// ---------------------------------------------------------------------------
// Untracked build.
// ---------------------------------------------------------------------------

#[test]
fn untracked_unbind_reports_mappings_left_and_leaks_held_pages() {
    let checker = checker();
    let pages = CountingPages::default();
    let device = Device::new_untracked(checker.clone());
    let mut pool = device
        .pool_builder()
        .refill_batch(8)
        .ring_size(2)
        .page_source(pages.clone())
        .build()
        .unwrap();
    let held: Vec<_> = (0..5).map(|_| pool.alloc().unwrap()).collect();
    let back: Vec<_> = (0..2).map(|_| pool.alloc().unwrap()).collect();
    drop(back); // into the ring: reachable by unbind
    assert_eq!(device.tracked_mappings(), 0, "nothing is tracked");
    let report = device.unbind().unwrap();
    assert_eq!(report.pages_from_rings, 2);
    assert_eq!(report.pages_held_or_cached, 0);
    assert_eq!(report.mappings_left, 5 + 1, "held pages and the cached one");
    // The checker sees what dma-debug would: mappings live at unbind.
    assert_eq!(checker.live_mappings(), 6);
    assert!(matches!(
        checker.violations().as_slice(),
        [Violation::Leak { count: 6, .. }]
    ));
    let frozen = checker.stats();
    drop(held);
    drop(pool);
    assert_eq!(
        device.leaked_pages(),
        6,
        "still mapped, so leaked, not freed"
    );
    assert_eq!(pages.live(), 6);
    assert_eq!(pages.freed(), 2);
    assert_eq!(checker.stats(), frozen, "no device call after unbind");
}

/// Pages held after their pool was dropped still count in `mappings_left`.
#[test]
fn untracked_mappings_left_counts_pages_of_dropped_pools() {
    let checker = checker();
    let device = Device::new_untracked(checker.clone());
    let mut pool = device.pool_builder().refill_batch(4).build().unwrap();
    let held: Vec<_> = (0..3).map(|_| pool.alloc().unwrap()).collect();
    drop(pool); // the cached page is unmapped; 3 held stay mapped
    assert_eq!(checker.live_mappings(), 3);
    let report = device.unbind().unwrap();
    assert_eq!(
        report.mappings_left,
        checker.live_mappings(),
        "mappings_left must count every mapping unbind could not reach"
    );
    drop(held);
    assert_eq!(device.leaked_pages(), 3);
}

/// The untracked build and a counting backend: fast-path numbers identical
/// to the tracked build (tracking costs nothing there).
#[test]
fn untracked_pool_behaves_like_tracked_while_bound() {
    let ops = CountingOps::default();
    let device = Device::new_untracked(ops.clone());
    let mut pool = device.pool_builder().build().unwrap();
    let p = pool.alloc().unwrap();
    let addr = p.dma_addr();
    pool.recycle_direct(p);
    assert_eq!(pool.alloc().unwrap().dma_addr(), addr);
    assert_eq!(ops.maps.load(std::sync::atomic::Ordering::SeqCst), 64);
    drop(pool);
    assert_eq!(ops.unmaps.load(std::sync::atomic::Ordering::SeqCst), 64);
    assert_eq!(device.unbind().unwrap().mappings_left, 0);
}

/// The error messages a driver logs say what went wrong.
#[test]
fn errors_display_what_went_wrong() {
    assert_eq!(
        SyncError::OutOfRange {
            start: 1,
            end: 9,
            len: 4
        }
        .to_string(),
        "sync range 1..9 is outside the 4-byte buffer"
    );
    assert_eq!(
        SyncError::Unbound.to_string(),
        "nothing to sync: the device is unbound"
    );
    assert_eq!(
        pagepool::OutOfMemory.to_string(),
        "page source is out of memory"
    );
    assert_eq!(
        DmaError::MappingLimit { limit: Some(7) }.to_string(),
        "device mapping limit of 7 entries reached"
    );
    assert_eq!(pagepool::DmaAddr(0x1000).to_string(), "0x1000");
}

/// A checking device in panic mode names the driver's line: the page
/// access or sync that broke a rule, not the pool's internals.
#[test]
fn checker_panics_point_at_the_callers_line() {
    use pagepool::checking::{CheckMode, CheckingDevice};
    let checker = CheckingDevice::new(CheckMode::Panic);
    let device = Device::new(checker.clone());
    let mut pool = device
        .pool_builder()
        .direction(DmaDirection::FromDevice)
        .build()
        .unwrap();
    let mut page = pool.alloc().unwrap();
    checker.device_write(page.dma_addr(), b"frame").unwrap();
    let message = |payload: Box<dyn std::any::Any + Send>| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default()
    };
    let line = line!() + 1;
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| page.as_slice()[0]));
    let text = message(read.unwrap_err());
    assert!(
        text.contains(&format!("called at {}:{line}:", file!())),
        "{text}"
    );
    // The same through a fragment.
    let frag = pool.alloc_frag(256).unwrap();
    checker.device_write(frag.dma_addr(), b"frag").unwrap();
    let line = line!() + 1;
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| frag.as_slice()[0]));
    let text = message(read.unwrap_err());
    assert!(
        text.contains(&format!("called at {}:{line}:", file!())),
        "{text}"
    );
    // Synced first, the same read is fine.
    page.sync_for_cpu(0..5).unwrap();
    assert_eq!(&page.as_slice()[..5], b"frame");
    drop((page, frag, pool));
    let _ = device.unbind();
}
