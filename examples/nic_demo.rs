//! A simulated NIC on the checking device, hot-unplugged mid-traffic.
//!
//! ```text
//! cargo run --release --example nic_demo --features bytes -- [--seconds N] [--workers N]
//! ```
//!
//! (Without the `bytes` feature it runs too, handing out no `Bytes`.)
//!
//! - **RX**: one thread plays NAPI. It owns a `FromDevice` page pool and a
//!   256-descriptor ring of posted buffers (whole pages and 2 KiB
//!   fragments). The "hardware" DMA-writes Ethernet-like frames into the
//!   posted buffers (`CheckingDevice::device_write` at their device
//!   address); the poll loop syncs each one for the CPU and hands it to a
//!   worker as `Bytes`, a `Page` or a `Frag`. Small frames are copied
//!   (copybreak) and their page recycled directly into the pool's cache.
//! - **Workers** (sockets) check every byte of every frame, drop most at
//!   once, hold some for up to 200 ms and a few "forever", then drop them
//!   on their own thread.
//! - **TX**: a thread writes frames into pages of a `ToDevice` pool and
//!   syncs them for the device; the "hardware" reads them
//!   (`device_read`) and checks them; a completion thread gives them back
//!   to the pool in bulk, from its own thread.
//! - **Hot-unplug** after N seconds: the hardware vanishes, the driver's
//!   remove path stops RX and TX and calls `Device::unbind` while sockets
//!   hold thousands of pages, buffers sit posted in the RX ring and frames
//!   wait in the TX queue. The sockets keep reading their pages after
//!   unbind, then drop them.
//!
//! At the end: throughput, recycling (Linux's page_pool stat names),
//! in-flight figures, the unbind report and the checker's verdict. Exits
//! with status 1 on any violation, leak, corrupted frame, or device call
//! after unbind.

// The stand-ins shared with the tests: a page source that counts every
// block (and catches a double free), and the RNG.
#[path = "../tests/support/counting.rs"]
mod counting;
#[path = "../tests/support/rng.rs"]
// Without `bytes` the demo flips no coin for `Bytes` (`Rng::one_in`).
#[cfg_attr(not(feature = "bytes"), allow(dead_code))]
mod rng;

use std::collections::VecDeque;
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

#[cfg(feature = "bytes")]
use bytes::Bytes;
use counting::CountingPages;
use pagepool::checking::{CheckMode, CheckingDevice};
use pagepool::{put_bulk, Device, DmaDirection, Frag, Page, PagePool, PoolStats, UnbindReport};
use rng::Rng;

const RX_DESCRIPTORS: usize = 256;
const NAPI_BUDGET: usize = 64;
const FRAG_SIZE: usize = 2048;
const COPYBREAK: usize = 256;
const HEADER: usize = 24;
const ETHERTYPE: [u8; 2] = [0x88, 0xb5]; // IEEE local experimental
const DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

// ---------------------------------------------------------------------------
// Frames.
// ---------------------------------------------------------------------------

/// Writes frame `seq` of `len` bytes: dst, src, ethertype, seq, length,
/// then a payload derived from `seq`.
fn write_frame(buf: &mut [u8], seq: u64, len: usize) {
    buf[0..6].copy_from_slice(&DST);
    buf[6..12].copy_from_slice(&SRC);
    buf[12..14].copy_from_slice(&ETHERTYPE);
    buf[14..22].copy_from_slice(&seq.to_be_bytes());
    buf[22..24].copy_from_slice(&(len as u16).to_be_bytes());
    let base = (seq as u8).wrapping_mul(31);
    for (i, b) in buf[HEADER..len].iter_mut().enumerate() {
        *b = base.wrapping_add(i as u8);
    }
}

fn frame(seq: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    write_frame(&mut v, seq, len);
    v
}

/// Checks a received frame byte for byte; returns its sequence number.
fn check_frame(buf: &[u8]) -> Option<u64> {
    if buf.len() < HEADER || buf[0..6] != DST || buf[6..12] != SRC || buf[12..14] != ETHERTYPE {
        return None;
    }
    let seq = u64::from_be_bytes(buf[14..22].try_into().ok()?);
    let len = u16::from_be_bytes([buf[22], buf[23]]) as usize;
    if len != buf.len() {
        return None;
    }
    let base = (seq as u8).wrapping_mul(31);
    let ok = buf[HEADER..]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == base.wrapping_add(i as u8));
    ok.then_some(seq)
}

// ---------------------------------------------------------------------------
// Shared counters.
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Counters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    rx_copybreak: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    tx_completed: AtomicU64,
    delivered: AtomicU64,
    held: AtomicUsize,
    bad_frames: AtomicU64,
    reads_after_unbind: AtomicU64,
}

fn bad(counters: &Counters, what: &str) {
    if counters.bad_frames.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("  !! {what}");
    }
}

// ---------------------------------------------------------------------------
// RX: NAPI loop and the hardware writing into posted buffers.
// ---------------------------------------------------------------------------

enum RxBuf {
    Page(Page),
    Frag(Frag),
}

impl RxBuf {
    fn dma_addr(&self) -> pagepool::DmaAddr {
        match self {
            RxBuf::Page(p) => p.dma_addr(),
            RxBuf::Frag(f) => f.dma_addr(),
        }
    }
    fn capacity(&self) -> usize {
        match self {
            RxBuf::Page(p) => p.len(),
            RxBuf::Frag(f) => f.len(),
        }
    }
}

/// What a socket receives.
enum Packet {
    #[cfg(feature = "bytes")]
    Bytes(Bytes),
    Page(Page, usize),
    Frag(Frag, usize),
    Copied(Vec<u8>),
}

impl Packet {
    fn data(&self) -> &[u8] {
        match self {
            #[cfg(feature = "bytes")]
            Packet::Bytes(b) => b,
            Packet::Page(p, len) => &p.as_slice()[..*len],
            Packet::Frag(f, len) => &f.as_slice()[..*len],
            Packet::Copied(v) => v,
        }
    }
}

/// Half the whole pages go up the stack as `Bytes` (zero-copy), half as
/// `Page`s.
#[cfg(feature = "bytes")]
fn page_packet(page: Page, len: usize, rng: &mut Rng) -> Packet {
    if rng.one_in(2) {
        Packet::Bytes(page.into_bytes().slice(0..len))
    } else {
        Packet::Page(page, len)
    }
}

/// A third of the fragments go up as `Bytes`, the rest as `Frag`s.
#[cfg(feature = "bytes")]
fn frag_packet(frag: Frag, len: usize, rng: &mut Rng) -> Packet {
    if rng.one_in(3) {
        Packet::Bytes(frag.into_bytes().slice(0..len))
    } else {
        Packet::Frag(frag, len)
    }
}

#[cfg(not(feature = "bytes"))]
fn page_packet(page: Page, len: usize, _: &mut Rng) -> Packet {
    Packet::Page(page, len)
}

#[cfg(not(feature = "bytes"))]
fn frag_packet(frag: Frag, len: usize, _: &mut Rng) -> Packet {
    Packet::Frag(frag, len)
}

/// The driver's RX state handed back to the remove path.
struct RxQueue {
    pool: PagePool,
    posted: VecDeque<RxBuf>,
    completed: VecDeque<(RxBuf, usize)>,
}

struct Shared {
    checker: CheckingDevice,
    counters: Counters,
    hw_present: AtomicBool,
    stop: AtomicBool,
    unbound: AtomicBool,
}

fn rx_loop(mut q: RxQueue, shared: Arc<Shared>, sockets: Vec<SyncSender<Vec<Packet>>>) -> RxQueue {
    let c = &shared.counters;
    let mut rng = Rng::new(1);
    let mut seq = 0u64;
    let mut next_is_page = true;
    let mut batches: Vec<Vec<Packet>> = sockets.iter().map(|_| Vec::new()).collect();
    while !shared.stop.load(Ordering::Relaxed) {
        // The hardware: DMA a frame into each of up to a budget of posted
        // buffers, at their device address.
        if shared.hw_present.load(Ordering::Relaxed) {
            for _ in 0..NAPI_BUDGET {
                let Some(buf) = q.posted.pop_front() else {
                    break;
                };
                let max = if buf.capacity() > FRAG_SIZE {
                    4000
                } else {
                    1514
                };
                let len = rng.range(60, max);
                if shared
                    .checker
                    .device_write(buf.dma_addr(), &frame(seq, len))
                    .is_err()
                {
                    bad(c, "device write faulted");
                }
                seq += 1;
                q.completed.push_back((buf, len));
            }
        }
        // NAPI poll: sync for the CPU, hand to the stack.
        for _ in 0..NAPI_BUDGET {
            let Some((buf, len)) = q.completed.pop_front() else {
                break;
            };
            c.rx_packets.fetch_add(1, Ordering::Relaxed);
            c.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
            let packet = match buf {
                RxBuf::Page(mut page) => {
                    page.sync_for_cpu(0..len).expect("bound while running");
                    page.set_dirty_len(len);
                    if len <= COPYBREAK {
                        // Copybreak: copy the small frame, recycle the page
                        // straight into the cache (the fast path).
                        c.rx_copybreak.fetch_add(1, Ordering::Relaxed);
                        let copy = page.as_slice()[..len].to_vec();
                        q.pool.recycle_direct(page);
                        Packet::Copied(copy)
                    } else {
                        page_packet(page, len, &mut rng)
                    }
                }
                RxBuf::Frag(mut frag) => {
                    frag.sync_for_cpu(0..len).expect("bound while running");
                    frag_packet(frag, len, &mut rng)
                }
            };
            let flow = rng.below(sockets.len() as u64) as usize;
            batches[flow].push(packet);
        }
        // Deliver each socket's share of the poll in one go.
        for (socket, batch) in sockets.iter().zip(&mut batches) {
            if batch.is_empty() {
                continue;
            }
            match socket.try_send(core::mem::take(batch)) {
                Ok(()) => {}
                Err(TrySendError::Full(dropped) | TrySendError::Disconnected(dropped)) => {
                    c.rx_dropped
                        .fetch_add(dropped.len() as u64, Ordering::Relaxed);
                    for packet in dropped {
                        if let Packet::Page(page, _) = packet {
                            q.pool.recycle_direct(page);
                        }
                    }
                }
            }
        }
        // Refill the ring: whole pages and 2 KiB fragments, alternately.
        while q.posted.len() + q.completed.len() < RX_DESCRIPTORS {
            let buf = if next_is_page {
                q.pool.alloc().map(RxBuf::Page)
            } else {
                q.pool.alloc_frag(FRAG_SIZE).map(RxBuf::Frag)
            };
            match buf {
                Ok(buf) => q.posted.push_back(buf),
                Err(e) => {
                    eprintln!("  rx refill failed: {e}");
                    break;
                }
            }
            next_is_page = !next_is_page;
        }
        if !shared.hw_present.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_micros(200));
        }
    }
    q
}

// ---------------------------------------------------------------------------
// Sockets: check, hold for a while, drop.
// ---------------------------------------------------------------------------

fn socket(rx: Receiver<Vec<Packet>>, shared: Arc<Shared>, seed: u64) {
    let c = &shared.counters;
    let mut rng = Rng::new(seed);
    // (release time, packet); `None`: held until after the unplug.
    let mut held: Vec<(Option<Instant>, Packet)> = Vec::new();
    let mut last_sweep = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(1)) {
            Ok(batch) => {
                c.delivered.fetch_add(batch.len() as u64, Ordering::Relaxed);
                for packet in batch {
                    if check_frame(packet.data()).is_none() {
                        bad(c, "corrupted frame received");
                    }
                    let roll = rng.below(1000);
                    if roll < 700 {
                        continue; // consumed at once: dropped here
                    }
                    let until = if roll < 995 {
                        let ms = rng.range(1, 200) as u64;
                        Some(Instant::now() + Duration::from_millis(ms))
                    } else {
                        None // a socket nobody reads
                    };
                    held.push((until, packet));
                    c.held.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        if now - last_sweep >= Duration::from_millis(1) {
            sweep(&mut held, now, c);
            last_sweep = now;
        }
    }
    // RX is stopped. Wait for the remove path to unbind the device, then
    // keep reading what is held: it must still be intact, valid memory.
    while !shared.unbound.load(Ordering::Acquire) {
        thread::sleep(Duration::from_millis(1));
    }
    for (until, packet) in &mut held {
        if check_frame(packet.data()).is_none() {
            bad(c, "frame changed after unbind");
        }
        c.reads_after_unbind.fetch_add(1, Ordering::Relaxed);
        if until.is_none() {
            let ms = rng.range(20, 250) as u64;
            *until = Some(Instant::now() + Duration::from_millis(ms));
        }
    }
    // ...and let go of it as the sockets would, on this thread.
    while !held.is_empty() {
        thread::sleep(Duration::from_millis(2));
        sweep(&mut held, Instant::now(), c);
    }
}

/// Drops the packets whose time is up.
fn sweep(held: &mut Vec<(Option<Instant>, Packet)>, now: Instant, c: &Counters) {
    let before = held.len();
    held.retain(|(until, _)| until.is_none_or(|t| t > now));
    c.held.fetch_sub(before - held.len(), Ordering::Relaxed);
}

// ---------------------------------------------------------------------------
// TX: CPU writes, device reads, completion recycles from another thread.
// ---------------------------------------------------------------------------

type TxBatch = Vec<(Page, usize)>;

fn tx_loop(mut pool: PagePool, shared: Arc<Shared>, ring: SyncSender<TxBatch>) -> PagePool {
    let c = &shared.counters;
    let mut rng = Rng::new(2);
    let mut seq = 0u64;
    let mut pending: Option<TxBatch> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let batch = match pending.take() {
            Some(batch) => batch,
            None => {
                let mut batch = Vec::with_capacity(32);
                for _ in 0..32 {
                    let Ok(mut page) = pool.alloc() else { break };
                    let len = rng.range(60, 1514);
                    write_frame(&mut page.as_mut_slice()[..len], seq, len);
                    page.sync_for_device(0..len).expect("bound while running");
                    seq += 1;
                    batch.push((page, len));
                }
                batch
            }
        };
        let (n, bytes) = (batch.len() as u64, batch.iter().map(|b| b.1 as u64).sum());
        match ring.try_send(batch) {
            Ok(()) => {
                c.tx_packets.fetch_add(n, Ordering::Relaxed);
                c.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(TrySendError::Full(batch)) => {
                pending = Some(batch); // the TX ring is full: wait a little
                thread::sleep(Duration::from_micros(50));
            }
            Err(TrySendError::Disconnected(_)) => break,
        }
    }
    pool
}

/// The NIC's transmit engine: reads each frame by DMA, then completes it.
/// Returns its queue when the hardware disappears, frames still in it.
fn tx_hardware(
    ring: Receiver<TxBatch>,
    shared: Arc<Shared>,
    done: mpsc::Sender<Vec<Page>>,
) -> Receiver<TxBatch> {
    let c = &shared.counters;
    while shared.hw_present.load(Ordering::Relaxed) {
        let Ok(batch) = ring.recv_timeout(Duration::from_millis(1)) else {
            continue;
        };
        let mut completed = Vec::with_capacity(batch.len());
        for (page, len) in batch {
            match shared.checker.device_read(page.dma_addr(), len) {
                Ok(data) if check_frame(&data).is_some() => {}
                Ok(_) => bad(c, "device read a corrupted TX frame"),
                Err(e) => bad(c, &format!("device read failed: {e}")),
            }
            completed.push(page);
        }
        if done.send(completed).is_err() {
            break;
        }
    }
    ring
}

/// TX completion (another thread, as in a driver's completion IRQ):
/// returns pages to their pool in bulk.
fn tx_completion(done: Receiver<Vec<Page>>, shared: Arc<Shared>) {
    for batch in done {
        let n = batch.len() as u64;
        put_bulk(batch);
        shared.counters.tx_completed.fetch_add(n, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Main: run, unplug, report.
// ---------------------------------------------------------------------------

struct Args {
    seconds: u64,
    workers: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        seconds: 3,
        workers: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|&v| v > 0)
                .unwrap_or_else(|| {
                    eprintln!("{name} needs a positive number");
                    exit(2)
                })
        };
        match arg.as_str() {
            "--seconds" => args.seconds = value("--seconds"),
            "--workers" => args.workers = value("--workers") as usize,
            "-h" | "--help" => {
                println!("usage: nic_demo [--seconds N (3)] [--workers N (4)]");
                exit(0);
            }
            other => {
                eprintln!("unknown argument {other:?} (try --help)");
                exit(2);
            }
        }
    }
    args
}

fn si(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2}G", n / 1e9),
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n if n >= 1e4 => format!("{:.1}k", n / 1e3),
        n => format!("{n:.0}"),
    }
}

fn stats_table(rx: &PoolStats, tx: &PoolStats) {
    println!(
        "  {:<28}{:>14}{:>14}",
        "page_pool stat", "RX pool", "TX pool"
    );
    type Row = (&'static str, fn(&PoolStats) -> u64);
    let rows: [Row; 11] = [
        ("alloc.fast", |s| s.alloc.fast),
        ("alloc.slow", |s| s.alloc.slow),
        ("alloc.slow_high_order", |s| s.alloc.slow_high_order),
        ("alloc.empty", |s| s.alloc.empty),
        ("alloc.refill", |s| s.alloc.refill),
        ("alloc.waive", |s| s.alloc.waive),
        ("recycle.cached", |s| s.recycle.cached),
        ("recycle.cache_full", |s| s.recycle.cache_full),
        ("recycle.ring", |s| s.recycle.ring),
        ("recycle.ring_full", |s| s.recycle.ring_full),
        ("recycle.released_closed", |s| s.recycle.released_closed),
    ];
    for (name, get) in rows {
        println!("  {name:<28}{:>14}{:>14}", get(rx), get(tx));
    }
}

fn main() {
    let args = parse_args();
    let checker = CheckingDevice::builder()
        .mode(CheckMode::Record)
        // Linux's page_pool syncs FROM_DEVICE pages for the device on
        // recycle (PP_FLAG_DMA_SYNC_DEV): an ownership hand-over, no copy.
        .strict_sync_directions(false)
        .build();
    let pages = CountingPages::default();
    let device = Device::new(checker.clone());
    let rx_pool = device
        .pool_builder()
        .direction(DmaDirection::FromDevice)
        .sync_for_device(0, 4096)
        .ring_size(4096)
        .page_source(pages.clone())
        .build()
        .expect("rx pool");
    let tx_pool = device
        .pool_builder()
        .direction(DmaDirection::ToDevice)
        .ring_size(4096)
        .page_source(pages.clone())
        .build()
        .expect("tx pool");
    let (rx_id, tx_id) = (rx_pool.id(), tx_pool.id());
    let shared = Arc::new(Shared {
        checker: checker.clone(),
        counters: Counters::default(),
        hw_present: AtomicBool::new(true),
        stop: AtomicBool::new(false),
        unbound: AtomicBool::new(false),
    });

    println!(
        "nic_demo: simulated NIC on the checking device, {} s of traffic, {} sockets, \
         {RX_DESCRIPTORS} RX descriptors{}",
        args.seconds,
        args.workers,
        if cfg!(feature = "bytes") {
            ""
        } else {
            " (without feature `bytes`: no Bytes buffers)"
        }
    );

    // Sockets.
    let mut socket_tx = Vec::new();
    let mut sockets = Vec::new();
    for w in 0..args.workers {
        let (tx, rx) = mpsc::sync_channel(64);
        socket_tx.push(tx);
        let shared = Arc::clone(&shared);
        sockets.push(thread::spawn(move || socket(rx, shared, 100 + w as u64)));
    }
    // RX.
    let rx_queue = RxQueue {
        pool: rx_pool,
        posted: VecDeque::with_capacity(RX_DESCRIPTORS),
        completed: VecDeque::with_capacity(RX_DESCRIPTORS),
    };
    let rx = {
        let shared = Arc::clone(&shared);
        thread::spawn(move || rx_loop(rx_queue, shared, socket_tx))
    };
    // TX: driver, hardware, completion.
    let (tx_ring_tx, tx_ring_rx) = mpsc::sync_channel(8); // 8 x 32 descriptors
    let (done_tx, done_rx) = mpsc::channel();
    let tx = {
        let shared = Arc::clone(&shared);
        thread::spawn(move || tx_loop(tx_pool, shared, tx_ring_tx))
    };
    let tx_hw = {
        let shared = Arc::clone(&shared);
        thread::spawn(move || tx_hardware(tx_ring_rx, shared, done_tx))
    };
    let tx_done = {
        let shared = Arc::clone(&shared);
        thread::spawn(move || tx_completion(done_rx, shared))
    };

    // Progress, once a second.
    let c = &shared.counters;
    let start = Instant::now();
    let (mut last_rx, mut last_tx) = (0, 0);
    for s in 1..=args.seconds {
        let deadline = start + Duration::from_secs(s);
        thread::sleep(deadline.saturating_duration_since(Instant::now()));
        let (rx_n, tx_n) = (
            c.rx_packets.load(Ordering::Relaxed),
            c.tx_packets.load(Ordering::Relaxed),
        );
        let in_flight: u64 = device.pools().iter().map(|p| p.inflight).sum();
        println!(
            "[{s:>3}s] rx {:>7} pps  tx {:>7} pps  in flight {:>6} pages  mapped {:>6}  held by sockets {:>6}",
            si((rx_n - last_rx) as f64),
            si((tx_n - last_tx) as f64),
            in_flight,
            checker.live_mappings(),
            c.held.load(Ordering::Relaxed),
        );
        (last_rx, last_tx) = (rx_n, tx_n);
    }
    let elapsed = start.elapsed().as_secs_f64();

    // Hot-unplug: the hardware is gone; the driver's remove path runs.
    println!(
        "\n*** hot-unplug at {elapsed:.1} s: the NIC is gone; remove() stops RX/TX and unbinds ***"
    );
    shared.hw_present.store(false, Ordering::Relaxed);
    shared.stop.store(true, Ordering::Relaxed);
    let rx_queue = rx.join().expect("rx thread");
    let tx_pool = tx.join().expect("tx thread");
    let tx_queue = tx_hw.join().expect("tx hardware");
    let (rx_stats, tx_stats) = (rx_queue.pool.stats(), tx_pool.stats());
    let held_at_unplug = c.held.load(Ordering::Relaxed);
    let posted = rx_queue.posted.len() + rx_queue.completed.len();
    // Frames the hardware never got to: still the driver's, still mapped.
    let tx_queued: Vec<(Page, usize)> = tx_queue.try_iter().flatten().collect();
    let mapped_at_unplug = checker.live_mappings();

    let report: UnbindReport = device.unbind().expect("first unbind");
    let after_unbind = checker.stats();
    shared.unbound.store(true, Ordering::Release);
    println!(
        "  before: {mapped_at_unplug} mappings live; pages out of the pools: {} RX + {} TX \
         ({held_at_unplug} buffers held by sockets, {posted} RX descriptors posted, \
         {} frames queued for TX, the rest in transit)",
        rx_stats.pages_held,
        tx_stats.pages_held,
        tx_queued.len(),
    );
    println!("  {report}");
    println!(
        "  after:  {} mappings live; sockets keep reading their buffers, then drop them",
        checker.live_mappings()
    );

    // The driver frees its rings: no device call any more.
    drop(rx_queue.posted);
    drop(rx_queue.completed);
    drop(tx_queued);
    // Sockets read their pages after unbind, then drop them.
    for s in sockets {
        s.join().expect("socket thread");
    }
    tx_done.join().expect("tx completion");
    let (rx_stats, tx_stats) = (rx_queue.pool.stats(), tx_pool.stats());
    drop(rx_queue.pool);
    drop(tx_pool);
    drop(device);

    // Report.
    let rx_n = c.rx_packets.load(Ordering::Relaxed) as f64;
    let tx_n = c.tx_packets.load(Ordering::Relaxed) as f64;
    println!("\nthroughput over {elapsed:.1} s");
    println!(
        "  RX {} packets ({} pps, {:.2} Gbit/s), {} copybreak, {} dropped (socket queue full)",
        si(rx_n),
        si(rx_n / elapsed),
        c.rx_bytes.load(Ordering::Relaxed) as f64 * 8.0 / elapsed / 1e9,
        si(c.rx_copybreak.load(Ordering::Relaxed) as f64),
        si(c.rx_dropped.load(Ordering::Relaxed) as f64),
    );
    println!(
        "  TX {} packets ({} pps, {:.2} Gbit/s), {} completed",
        si(tx_n),
        si(tx_n / elapsed),
        c.tx_bytes.load(Ordering::Relaxed) as f64 * 8.0 / elapsed / 1e9,
        si(c.tx_completed.load(Ordering::Relaxed) as f64),
    );
    let maps = after_unbind.maps as f64;
    println!(
        "\nrecycling: {} packets through {} DMA-mapped pages: each mapping served {:.0} packets",
        si(rx_n + tx_n),
        si(maps),
        (rx_n + tx_n) / maps.max(1.0),
    );
    println!("  (pools #{rx_id} RX, #{tx_id} TX; final counters, after every page came back)");
    stats_table(&rx_stats, &tx_stats);

    let verdict = checker.verdict();
    let stats = checker.stats();
    let allocated = pages.allocated();
    let freed = pages.freed();
    let bad_frees = pages.double_frees();
    let bad_frames = c.bad_frames.load(Ordering::Relaxed);
    let calls_since_unbind = stats != after_unbind;
    println!("\nchecker verdict: {verdict}");
    println!(
        "  maps {}  unmaps {}  syncs for cpu {}  for device {}  device writes {}  reads {}",
        stats.maps,
        stats.unmaps,
        stats.syncs_for_cpu,
        stats.syncs_for_device,
        stats.device_writes,
        stats.device_reads
    );
    println!(
        "  live mappings after unbind: {}   device calls after unbind: {}{}",
        verdict.live_mappings,
        stats.calls_after_unbind,
        if calls_since_unbind {
            " (counters moved!)"
        } else {
            ""
        }
    );
    println!(
        "  buffers re-read by sockets after unbind: {}   corrupted frames: {bad_frames}",
        c.reads_after_unbind.load(Ordering::Relaxed)
    );
    println!(
        "  page memory: {allocated} blocks allocated, {freed} freed, {} bad frees",
        bad_frees
    );

    let mut failures = Vec::new();
    if verdict.violations > 0 {
        failures.push(format!("{} DMA API violations", verdict.violations));
    }
    if verdict.live_mappings > 0 || report.mappings_left > 0 {
        failures.push("mappings outlived unbind".into());
    }
    if stats.calls_after_unbind > 0 || calls_since_unbind {
        failures.push("device called after unbind".into());
    }
    if allocated != freed || bad_frees > 0 {
        failures.push(format!(
            "page memory leaked or double-freed ({allocated} vs {freed})"
        ));
    }
    if bad_frames > 0 {
        failures.push(format!("{bad_frames} corrupted frames"));
    }
    if failures.is_empty() {
        println!("\nOK: every mapping unmapped exactly once at unbind, nothing touched the device after it, every page freed.");
    } else {
        println!("\nFAILED: {}", failures.join("; "));
        print!("{}", checker.report());
        exit(1);
    }
}
