//! Multi-threaded stress: owner threads allocate pages, fragments and
//! (feature `bytes`) `Bytes`, the simulated device writes some of them,
//! holder threads verify, hold and drop them (singly and in bulk), and
//! another thread unbinds the device in the middle of it all. Repeated
//! many times, with and without a delay inside every device call to widen
//! the race windows.
//!
//! After each round: zero violations and zero live mappings in the
//! `CheckingDevice`, every mapping unmapped exactly once, no device call in
//! progress when `unbind` returned and none after, every page freed exactly
//! once and never while mapped, and every buffer's content intact.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::Duration;

use pagepool::checking::{CheckMode, CheckingDevice};
use pagepool::{put_bulk, AllocError, Device, DmaDirection, Frag, Page, PagePool, Untracked};
use support::checks::{assert_unbound_clean, GuardedPages, SpyOps};
use support::rig::Rig;
use support::rng::Rng;

/// What a holder receives: a buffer and what it must contain.
enum Buf {
    Page(Page, Pattern),
    Frag(Frag, Pattern),
    #[cfg(feature = "bytes")]
    Bytes(bytes::Bytes, Pattern),
}

/// `len` bytes, byte `i` = `seed + i`; `synced`: written by the device and
/// synced for the CPU (so a further partial sync for the CPU is harmless).
#[derive(Clone, Copy)]
struct Pattern {
    seed: u8,
    len: usize,
    device_written: bool,
}

impl Pattern {
    fn bytes(&self) -> Vec<u8> {
        (0..self.len)
            .map(|i| self.seed.wrapping_add(i as u8))
            .collect()
    }
    fn check(&self, got: &[u8]) {
        assert_eq!(
            &got[..self.len],
            &self.bytes()[..],
            "buffer content changed"
        );
    }
}

impl Buf {
    fn verify(&mut self, rng: &mut Rng) {
        match self {
            Buf::Page(p, pat) => {
                if pat.device_written && rng.one_in(2) {
                    // Racing unbind: either synced (same bytes) or Unbound.
                    let _ = p.sync_for_cpu(0..pat.len.min(16));
                }
                pat.check(p.as_slice());
            }
            Buf::Frag(f, pat) => {
                if pat.device_written && rng.one_in(2) {
                    let _ = f.sync_for_cpu(0..pat.len.min(16));
                }
                pat.check(f.as_slice());
            }
            #[cfg(feature = "bytes")]
            Buf::Bytes(b, pat) => pat.check(b),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Round {
    seed: u64,
    owners: usize,
    holders: usize,
    delay: Duration,
    direction: DmaDirection,
    sync_for_device: bool,
    /// Buffers each owner hands out before the device stops writing.
    phase1: usize,
    /// At most this many more after that, until unbind stops the owner.
    phase2: usize,
}

/// Makes one buffer; `device` plays the NIC writing into it while `live`.
fn make_buf(
    pool: &mut PagePool,
    checker: &CheckingDevice,
    rng: &mut Rng,
    device_writes: bool,
) -> Result<Buf, AllocError> {
    let len = 1 + rng.below(512) as usize;
    let pat = Pattern {
        seed: rng.next_u64() as u8,
        len,
        device_written: device_writes,
    };
    let kind = rng.below(if cfg!(feature = "bytes") { 4 } else { 2 });
    if kind % 2 == 0 {
        let mut page = pool.alloc()?;
        if device_writes {
            checker.device_write(page.dma_addr(), &pat.bytes()).unwrap();
            page.sync_for_cpu(0..len).unwrap();
        } else {
            page.as_mut_slice()[..len].copy_from_slice(&pat.bytes());
        }
        page.set_dirty_len(len);
        #[cfg(feature = "bytes")]
        if kind == 2 {
            return Ok(Buf::Bytes(page.into_bytes().slice(0..len), pat));
        }
        Ok(Buf::Page(page, pat))
    } else {
        let mut frag = pool.alloc_frag(len + rng.below(200) as usize)?;
        if device_writes {
            checker.device_write(frag.dma_addr(), &pat.bytes()).unwrap();
            frag.sync_for_cpu(0..len).unwrap();
        } else {
            frag.as_mut_slice()[..len].copy_from_slice(&pat.bytes());
        }
        #[cfg(feature = "bytes")]
        if kind == 3 {
            return Ok(Buf::Bytes(frag.into_bytes().slice(0..len), pat));
        }
        Ok(Buf::Frag(frag, pat))
    }
}

fn owner(
    mut pool: PagePool,
    checker: CheckingDevice,
    round: Round,
    index: usize,
    holders: Vec<mpsc::Sender<Buf>>,
    quiesced: mpsc::Sender<()>,
) {
    let mut rng = Rng::new(round.seed * 31 + index as u64);
    let send = |buf: Buf, rng: &mut Rng| {
        let to = rng.below(holders.len() as u64) as usize;
        holders[to].send(buf).ok();
    };
    // Phase 1: the device writes into buffers; the owner recycles some
    // directly (fast path) and hands the rest out.
    for _ in 0..round.phase1 {
        let buf = make_buf(&mut pool, &checker, &mut rng, true).unwrap();
        match buf {
            Buf::Page(page, _) if rng.one_in(4) => pool.recycle_direct(page),
            buf => send(buf, &mut rng),
        }
    }
    // The device stops writing (hardware quiesced); unbind may come now.
    quiesced.send(()).unwrap();
    // Phase 2: CPU-written buffers until unbind refuses allocation; the
    // pool may be dropped by its owner while unbind runs.
    let drop_early = rng.one_in(4).then(|| rng.below(round.phase2 as u64));
    for i in 0..round.phase2 {
        if Some(i as u64) == drop_early {
            return; // drops the pool mid-traffic
        }
        match make_buf(&mut pool, &checker, &mut rng, false) {
            Ok(Buf::Page(page, _)) if rng.one_in(4) => pool.recycle_direct(page),
            Ok(buf) => send(buf, &mut rng),
            Err(AllocError::Unbound) => break,
            Err(e) => panic!("unexpected allocation error: {e}"),
        }
    }
    // Keep the pool until unbind has happened, sometimes.
    if rng.one_in(2) {
        while pool.alloc().is_ok() {
            thread::yield_now();
        }
    }
}

fn holder(rx: mpsc::Receiver<Buf>, seed: u64) -> usize {
    let mut rng = Rng::new(seed);
    let mut held: Vec<Buf> = Vec::new();
    let mut seen = 0;
    for mut buf in rx {
        seen += 1;
        buf.verify(&mut rng);
        held.push(buf);
        while held.len() > 48 || (!held.is_empty() && rng.one_in(3)) {
            if rng.one_in(8) {
                // A bulk put of every whole page held.
                let (pages, rest): (Vec<Buf>, Vec<Buf>) =
                    held.drain(..).partition(|b| matches!(b, Buf::Page(..)));
                held = rest;
                put_bulk(pages.into_iter().filter_map(|b| match b {
                    Buf::Page(p, _) => Some(p),
                    _ => None,
                }));
            } else {
                let i = rng.below(held.len() as u64) as usize;
                let mut buf = held.swap_remove(i);
                buf.verify(&mut rng);
                drop(buf);
            }
        }
    }
    // The channel closed: the owners are done, the device is unbound by
    // now or soon. What is still held stays readable, then is dropped here.
    for mut buf in held {
        buf.verify(&mut rng);
    }
    seen
}

fn run_round(round: Round) {
    let checker = CheckingDevice::builder()
        .mode(CheckMode::Record)
        .strict_sync_directions(false)
        .call_delay(round.delay)
        .build();
    let (spy, spy_state) = SpyOps::new(&checker);
    let pages = GuardedPages::with_spy(&spy_state);
    let device = Arc::new(spy.into_device());
    let mut rng = Rng::new(round.seed);

    let pools: Vec<PagePool> = (0..round.owners)
        .map(|_| {
            let mut b = device
                .pool_builder()
                .direction(round.direction)
                .ring_size(1 + rng.below(64) as usize)
                .cache_size(32)
                .refill_batch(1 + rng.below(32) as usize)
                .page_source(pages.clone());
            if round.sync_for_device {
                b = b.sync_for_device(0, 1024);
            }
            b.build().unwrap()
        })
        .collect();

    let mut senders = Vec::new();
    let mut holder_threads = Vec::new();
    for h in 0..round.holders {
        let (tx, rx) = mpsc::channel();
        senders.push(tx);
        let seed = round.seed * 7 + h as u64;
        holder_threads.push(thread::spawn(move || holder(rx, seed)));
    }
    let (quiesced_tx, quiesced_rx) = mpsc::channel();
    let owner_threads: Vec<_> = pools
        .into_iter()
        .enumerate()
        .map(|(i, pool)| {
            let checker = checker.clone();
            let senders = senders.clone();
            let quiesced = quiesced_tx.clone();
            thread::spawn(move || owner(pool, checker, round, i, senders, quiesced))
        })
        .collect();
    drop(senders);

    // The remove path: once every owner's device stopped writing, unbind
    // at a random moment of phase 2.
    for _ in 0..round.owners {
        quiesced_rx.recv().unwrap();
    }
    let wait = rng.below(1500);
    if wait > 0 {
        thread::sleep(Duration::from_micros(wait));
    }
    let unbinder = {
        let device = Arc::clone(&device);
        let spy_state = Arc::clone(&spy_state);
        thread::spawn(move || {
            let report = device.unbind().unwrap();
            (report, spy_state.active(), spy_state.dropped())
        })
    };
    let (report, active_at_return, dropped) = unbinder.join().unwrap();
    assert_eq!(
        active_at_return, 0,
        "{round:?}: a device call outlived unbind"
    );
    assert!(dropped, "{round:?}: unbind did not drop the ops");
    assert_eq!(report.mappings_left, 0);

    for t in owner_threads {
        t.join().unwrap();
    }
    let mut received = 0;
    for t in holder_threads {
        received += t.join().unwrap();
    }
    assert!(received > 0);

    assert_eq!(spy_state.calls_after_unbind(), 0, "{round:?}");
    assert_unbound_clean(&checker);
    pages.assert_all_freed_once_unmapped();
    let stats = checker.stats();
    assert_eq!(
        stats.unmaps, stats.maps,
        "{round:?}: unbind's report {report}"
    );
}

/// 200 rounds over directions, sync settings, thread counts and delays.
#[test]
fn stress_hold_and_drop_while_unbinding() {
    let directions = [
        DmaDirection::FromDevice,
        DmaDirection::Bidirectional,
        DmaDirection::FromDevice,
    ];
    for seed in 0..200u64 {
        let slow = seed % 5 == 4;
        run_round(Round {
            seed,
            owners: 1 + (seed % 2) as usize,
            holders: 2 + (seed % 3) as usize,
            delay: if slow {
                Duration::from_micros(20)
            } else {
                Duration::ZERO
            },
            direction: directions[(seed % 3) as usize],
            sync_for_device: seed % 3 != 0,
            phase1: if slow { 40 } else { 150 },
            phase2: if slow { 60 } else { 400 },
        });
    }
}

/// Unbind, pool drop, allocation and remote recycling all at once, with
/// slow device calls: each page still unmapped exactly once, each block
/// freed once after its unmap.
#[test]
fn stress_unbind_races_pool_drop_and_slow_path() {
    for seed in 0..60u64 {
        let rig = Rig::on(
            CheckingDevice::builder()
                .mode(CheckMode::Record)
                .call_delay(Duration::from_micros(if seed % 2 == 0 { 0 } else { 30 }))
                .build(),
        );
        let mut pool = rig
            .builder()
            .ring_size(4)
            .cache_size(8)
            .refill_batch(8)
            .build()
            .unwrap();
        let held: Vec<Page> = (0..24).map(|_| pool.alloc().unwrap()).collect();
        let start = Arc::new(Barrier::new(4));
        let dropper = {
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                drop(held); // ring, then ring-full unmaps
            })
        };
        let owner = {
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                let mut rng = Rng::new(seed);
                let mut out = Vec::new();
                for _ in 0..rng.below(40) {
                    match pool.alloc() {
                        Ok(p) => out.push(p),
                        Err(_) => break,
                    }
                }
                drop(pool); // races unbind
                out
            })
        };
        let unbinder = {
            let start = Arc::clone(&start);
            let device = Arc::clone(&rig.device);
            thread::spawn(move || {
                start.wait();
                device.unbind().unwrap()
            })
        };
        start.wait();
        dropper.join().unwrap();
        let out = owner.join().unwrap();
        unbinder.join().unwrap();
        thread::spawn(move || drop(out)).join().unwrap();
        rig.finish(());
    }
}

/// Readers hammer `as_slice` / `sync_for_cpu` on held pages and fragments
/// while unbind runs: every call either reaches a live mapping or is refused
/// (`Unbound`); none reaches the device after unbind.
#[test]
fn stress_syncs_and_reads_race_unbind() {
    for seed in 0..40u64 {
        let (rig, state) = Rig::spied_on(
            CheckingDevice::builder()
                .mode(CheckMode::Record)
                .call_delay(Duration::from_micros(if seed % 2 == 0 { 0 } else { 10 }))
                .build(),
        );
        let mut pool = rig.device.pool_builder().build().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for r in 0..3 {
            let mut page = pool.alloc().unwrap();
            let mut frag = pool.alloc_frag(256).unwrap();
            rig.checker.device_write(page.dma_addr(), &[r; 64]).unwrap();
            rig.checker.device_write(frag.dma_addr(), &[r; 64]).unwrap();
            let stop = Arc::clone(&stop);
            readers.push(thread::spawn(move || {
                let mut refused = 0;
                while !stop.load(Ordering::Relaxed) {
                    match page.sync_for_cpu(0..64) {
                        Ok(()) => assert_eq!(page.as_slice()[..64], [r; 64]),
                        Err(_) => refused += 1,
                    }
                    if frag.sync_for_cpu(0..64).is_ok() {
                        assert_eq!(frag.as_slice()[..64], [r; 64]);
                    }
                }
                (page, frag, refused)
            }));
        }
        thread::sleep(Duration::from_micros(200 + 100 * (seed % 5)));
        rig.device.unbind().unwrap();
        assert_eq!(state.active(), 0);
        let frozen = rig.checker.stats();
        thread::sleep(Duration::from_micros(300));
        stop.store(true, Ordering::Relaxed);
        for t in readers {
            let (page, frag, _refused) = t.join().unwrap();
            drop((page, frag));
        }
        drop(pool);
        assert_eq!(rig.checker.stats(), frozen, "device called after unbind");
        assert_eq!(state.calls_after_unbind(), 0);
        rig.finish(());
    }
}

/// The untracked build under the same kind of race: pages it cannot unmap
/// are leaked rather than freed while mapped, and everything else is freed
/// exactly once.
#[test]
fn stress_untracked_never_frees_mapped_memory() {
    for seed in 0..40u64 {
        let checker = CheckingDevice::builder().mode(CheckMode::Record).build();
        let pages = GuardedPages::new(&checker);
        let device: Arc<Device<Untracked>> = Arc::new(Device::new_untracked(checker.clone()));
        let mut pool = device
            .pool_builder()
            .ring_size(8)
            .refill_batch(16)
            .page_source(pages.clone())
            .build()
            .unwrap();
        let held: Vec<_> = (0..40).map(|_| pool.alloc().unwrap()).collect();
        let start = Arc::new(Barrier::new(2));
        let dropper = {
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                for p in held {
                    drop(p);
                    thread::yield_now();
                }
            })
        };
        start.wait();
        if seed % 2 == 1 {
            thread::yield_now();
        }
        let report = device.unbind().unwrap();
        dropper.join().unwrap();
        drop(pool);
        assert_eq!(pages.freed_while_mapped(), 0, "seed {seed}");
        assert_eq!(pages.counting.double_frees(), 0);
        // Left mapped at unbind = leaked now; everything else was freed.
        assert_eq!(checker.live_mappings(), report.mappings_left, "seed {seed}");
        assert_eq!(device.leaked_pages(), report.mappings_left, "seed {seed}");
        assert_eq!(pages.live(), report.mappings_left);
        assert_eq!(checker.stats().calls_after_unbind, 0);
    }
}
