//! A multi-queue driver skeleton: four RX queues and one TX queue on one
//! device, a monitor thread that prints every queue's counters and the
//! device's totals once a second, and an unbind in the middle of traffic
//! while sockets still hold received frames.
//!
//! Run: `cargo run --release --example multiqueue [-- --seconds N --queues Q]`
//!
//! Self-contained: the simulated NIC is the crate's own checking device
//! (`pagepool::checking`), which stands in for the hardware (it writes
//! frames into mapped pages as a device's DMA would, and reads what TX
//! hands it) and checks every DMA rule on the way. A real driver passes its
//! VFIO container or its own `DmaOps` instead; the driver code around the
//! pools does not change.
//!
//! What it shows:
//! - one pool per queue, each labelled and numbered, owned by its queue's
//!   thread (the fast path is `&mut`);
//! - frames handed to "socket" threads, which hold some of them for a while
//!   and drop them there (the pages go home through the per-thread batches
//!   of remote returns);
//! - a monitor that reads every pool's counters through the `Device`, from
//!   its own thread, with no channel to the queues;
//! - the remove path, in a driver's order: stop the NIC's DMA, then
//!   `Device::unbind` while the RX and TX threads still run. Each queue
//!   notices (`PagePool::is_bound`, a sync's `SyncError::Unbound`, or
//!   `AllocError::Unbound`) and stops; sockets read the frames they still
//!   hold after the unbind (valid memory) and drop them (no device call).

use std::collections::VecDeque;
use std::error::Error;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use pagepool::checking::{CheckMode, CheckingDevice};
use pagepool::{AllocError, Device, DmaDirection, Page, PagePool};

/// Frames a socket keeps before it lets the oldest go (the stack holding
/// buffers: sockets, reassembly).
const SOCKET_HOLDS: usize = 256;
/// Frame length.
const FRAME: usize = 128;

struct Args {
    seconds: u64,
    queues: u32,
}

fn args() -> Result<Args, Box<dyn Error>> {
    let mut parsed = Args {
        seconds: 3,
        queues: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value = it.next().ok_or_else(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--seconds" => parsed.seconds = value.parse()?,
            "--queues" => parsed.queues = value.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if parsed.queues == 0 || parsed.seconds == 0 {
        return Err("--queues and --seconds must be at least 1".into());
    }
    Ok(parsed)
}

/// The simulated NIC: the checking device's DMA, behind the NIC's DMA
/// enable bit. The remove path clears the bit (waiting for a DMA in
/// progress, as a driver waits for the hardware to quiesce) before it
/// unbinds, so no DMA reaches a mapping the unbind took down.
#[derive(Clone)]
struct Nic {
    checker: CheckingDevice,
    dma_enabled: Arc<RwLock<bool>>,
}

impl Nic {
    /// The NIC writes a received frame into a posted buffer; `false` once
    /// its DMA is stopped.
    fn receive_into(&self, page: &Page, bytes: &[u8]) -> bool {
        let enabled = self.dma_enabled.read().expect("not poisoned");
        if !*enabled {
            return false;
        }
        self.checker
            .device_write(page.dma_addr(), bytes)
            .expect("a posted buffer is mapped");
        true
    }

    /// The NIC reads a frame to send; `false` once its DMA is stopped.
    fn transmit_from(&self, page: &Page, len: usize) -> bool {
        let enabled = self.dma_enabled.read().expect("not poisoned");
        if !*enabled {
            return false;
        }
        let sent = self
            .checker
            .device_read(page.dma_addr(), len)
            .expect("a frame given to the device is mapped");
        assert_eq!(sent.len(), len);
        true
    }

    /// Stops all DMA, after the one in progress.
    fn stop_dma(&self) {
        *self.dma_enabled.write().expect("not poisoned") = false;
    }
}

/// A received frame: queue, sequence number, then a fill byte.
fn frame(queue: u32, seq: u64) -> [u8; FRAME] {
    let mut bytes = [queue as u8; FRAME];
    bytes[..8].copy_from_slice(&seq.to_le_bytes());
    bytes
}

/// One RX queue's poll loop: take a buffer from the pool, let the NIC DMA a
/// frame into it, give it to the CPU, pass it up to the queue's socket.
fn rx_queue(
    queue: u32,
    mut pool: PagePool,
    nic: Nic,
    socket: mpsc::SyncSender<Page>,
    received: Arc<AtomicU64>,
) -> PagePool {
    let mut seq = 0u64;
    loop {
        let mut page = match pool.alloc() {
            Ok(page) => page,
            // The remove path ran: the queue is gone.
            Err(AllocError::Unbound) => break,
            Err(e) => panic!("rx{queue}: {e}"),
        };
        // The hardware writes the frame; then the driver syncs it for the
        // CPU (which fails once the device is unbound: nothing to sync).
        if !nic.receive_into(&page, &frame(queue, seq)) {
            break;
        }
        if page.sync_for_cpu(0..FRAME).is_err() {
            break;
        }
        seq += 1;
        received.fetch_add(1, Ordering::Relaxed);
        if socket.send(page).is_err() || !pool.is_bound() {
            break;
        }
    }
    pool
}

/// A socket: reads each frame, keeps the last `SOCKET_HOLDS`, drops the
/// oldest. Returns what it still holds when the queue stops.
fn socket(queue: u32, frames: mpsc::Receiver<Page>) -> VecDeque<Page> {
    let mut held = VecDeque::with_capacity(SOCKET_HOLDS);
    for page in frames {
        assert_eq!(page.as_slice()[8], queue as u8, "a frame of this queue");
        held.push_back(page);
        if held.len() > SOCKET_HOLDS {
            held.pop_front(); // dropped here: home through this thread's batch
        }
    }
    held
}

/// The TX queue: fill a buffer, give it to the device, let the NIC send it.
fn tx_queue(mut pool: PagePool, nic: Nic, sent: Arc<AtomicU64>) {
    let mut seq = 0u64;
    while pool.is_bound() {
        let mut page = match pool.alloc() {
            Ok(page) => page,
            Err(AllocError::Unbound) => break,
            Err(e) => panic!("tx: {e}"),
        };
        page.as_mut_slice()[..FRAME].copy_from_slice(&frame(u32::MAX, seq));
        if page.sync_for_device(0..FRAME).is_err() {
            break;
        }
        // The NIC reads the frame out (DMA), then the completion returns
        // the buffer to the pool.
        if !nic.transmit_from(&page, FRAME) {
            break;
        }
        seq += 1;
        sent.fetch_add(1, Ordering::Relaxed);
        pool.recycle_direct(page);
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = args()?;
    // The simulated NIC: Record mode keeps every violation for the verdict
    // at the end instead of panicking in a queue thread.
    let checker = CheckingDevice::new(CheckMode::Record);
    let device = Arc::new(Device::new(checker.clone()));
    let nic = Nic {
        checker: checker.clone(),
        dma_enabled: Arc::new(RwLock::new(true)),
    };
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));

    let mut rx_threads = Vec::new();
    let mut sockets = Vec::new();
    for queue in 0..args.queues {
        let pool = device
            .pool_builder()
            .label("sim0-rx")
            .queue(queue)
            .direction(DmaDirection::FromDevice)
            .build()?;
        let (to_socket, from_queue) = mpsc::sync_channel(64);
        sockets.push(thread::spawn(move || socket(queue, from_queue)));
        let (nic, received) = (nic.clone(), Arc::clone(&received));
        rx_threads.push(thread::spawn(move || {
            rx_queue(queue, pool, nic, to_socket, received)
        }));
    }
    let tx_pool = device
        .pool_builder()
        .label("sim0-tx")
        .queue(0)
        .direction(DmaDirection::ToDevice)
        .build()?;
    let tx = {
        let (nic, sent) = (nic.clone(), Arc::clone(&sent));
        thread::spawn(move || tx_queue(tx_pool, nic, sent))
    };

    // The monitor: every second, each queue's counters and the totals,
    // read through the device from this thread alone.
    let stop_monitor = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (device, stop) = (Arc::clone(&device), Arc::clone(&stop_monitor));
        let (received, sent) = (Arc::clone(&received), Arc::clone(&sent));
        thread::spawn(move || {
            let start = Instant::now();
            let mut tick = 1;
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(50));
                if start.elapsed() < Duration::from_secs(tick) {
                    continue;
                }
                println!(
                    "[{tick}s] rx {} frames, tx {} frames",
                    received.load(Ordering::Relaxed),
                    sent.load(Ordering::Relaxed)
                );
                for pool in device.pools() {
                    let s = &pool.stats;
                    println!(
                        "  {} queue {}: inflight {:>5}, held {:>5}, fast {:>8}, slow {:>4}, ring {:>8}, ring_full {:>4}",
                        pool.label.as_deref().unwrap_or("?"),
                        pool.queue.unwrap_or(0),
                        pool.inflight,
                        s.pages_held,
                        s.alloc.fast,
                        s.alloc.slow,
                        s.recycle.ring,
                        s.recycle.ring_full,
                    );
                }
                let total = device.stats();
                println!(
                    "  device total: held {}, mapped {} pages ({} bytes), fast {}, ring {}",
                    total.pages_held,
                    total.pages_mapped,
                    total.bytes_mapped,
                    total.alloc.fast,
                    total.recycle.ring
                );
                tick += 1;
            }
        })
    };

    thread::sleep(Duration::from_secs(args.seconds));

    // The remove path, mid-traffic: stop the NIC's DMA, then unbind while
    // the queue threads still run. Every mapping goes now, including the
    // frames the sockets hold; nothing waits for them.
    println!(
        "\n*** remove: DMA stopped, unbind while {} queue threads run ***",
        args.queues + 1
    );
    nic.stop_dma();
    let mapped_before = checker.live_mappings();
    let report = device.unbind()?;
    let calls_at_unbind = checker.stats();
    println!("  {mapped_before} mappings live before; {report}");
    assert_eq!(checker.live_mappings(), 0, "every mapping is gone");

    // The queues notice and stop; their pools are dropped here.
    for rx in rx_threads {
        drop(rx.join().expect("rx queue"));
    }
    tx.join().expect("tx queue");
    stop_monitor.store(true, Ordering::Relaxed);
    monitor.join().expect("monitor");

    // The sockets still hold frames: valid memory after the unbind.
    let mut held = 0;
    for (queue, socket) in sockets.into_iter().enumerate() {
        let frames = socket.join().expect("socket");
        for page in &frames {
            assert_eq!(page.as_slice()[8], queue as u8);
        }
        held += frames.len();
        drop(frames); // freed, no device call
    }
    println!("  sockets read {held} frames they held across the unbind, then dropped them");
    assert_eq!(
        checker.stats(),
        calls_at_unbind,
        "no device call after unbind returned"
    );
    println!(
        "  {} frames received on {} queues, {} sent; checker: {}",
        received.load(Ordering::Relaxed),
        args.queues,
        sent.load(Ordering::Relaxed),
        if checker.verdict().is_clean() {
            "clean".to_owned()
        } else {
            checker.report()
        }
    );
    assert!(checker.verdict().is_clean(), "{}", checker.report());
    Ok(())
}
