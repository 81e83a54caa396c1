//! A userspace driver for the Intel 82574 (QEMU's `e1000e`) over VFIO, with
//! every receive and transmit buffer a `pagepool` page.
//!
//! ```text
//! e1000e <bdf> [--peer IFACE] [--seconds S] [--tx-frames N] [--consumers N]
//!              [--echo-pattern HEX] [--min-rx N] [--unplug-test] [--regions]
//!              [--no-huge-tlb] [--await-removal remove|unbind|unplug]
//!              [--ready-file PATH] [--queues 1|2]
//! ```
//!
//! - probe ([`nic::Nic::probe`]): VFIO device fd, BAR0, bus master, reset,
//!   interrupts masked, link up; descriptor rings mapped by the driver
//!   ([`coherent`]); one `Device` on the VFIO container, a receive pool
//!   (`FromDevice`) and a transmit pool (`ToDevice`), mapped page by page,
//!   or with `--regions` a 2 MiB region at a time (one `MAP_DMA` per 512
//!   pages, huge pages where the system has them reserved);
//! - the poll loop: receive with a NAPI budget of 64 and refill from the
//!   pool's fast path ([`nic::RxQueue::poll`]), frames to consumer threads
//!   ([`consumer`]) that check them, hold them and drop them on their own
//!   threads; transmit broadcast frames and recycle their pages on
//!   completion ([`nic::TxQueue`]);
//! - remove: stop both DMA engines (bounded wait), take the ring buffers
//!   back, `Device::unbind` while consumers still hold pages, free the
//!   rings;
//! - `--unplug-test` ([`unplug`]): between unbind and freeing the rings,
//!   re-arm the receive ring at the old addresses to show what an unplug
//!   race would do, and check the IOMMU refused it all.
//! - `--await-removal KIND` ([`removal`]): the kernel decides when the
//!   device goes. After `--seconds` of traffic the driver says it is ready
//!   (and creates `--ready-file`), keeps the traffic going, and waits for
//!   the VFIO device request; on it, remove runs as above and then closes
//!   the device and the container at once, while consumers still hold
//!   frames, and measures how long the kernel takes to finish (`remove`,
//!   `unplug`: the device gone from sysfs; `unbind`: driverless).
//!
//! `--peer IFACE` names the kernel's netdev on the other end of the link:
//! its MAC is checked as the source of every received frame, its
//! `rx_packets` counts the frames sent, and a packet socket on it
//! ([`capture`]) checks every transmitted frame arrived byte for byte as
//! written. `--no-huge-tlb` (with `--regions`) takes regions from
//! transparent huge pages only. Exit status 0 if every check passed.
//!
//! Walk-through: `examples/e1000e/README.md`.

#[cfg(target_os = "linux")]
mod capture;
#[cfg(target_os = "linux")]
mod coherent;
#[cfg(target_os = "linux")]
mod consumer;
#[cfg(target_os = "linux")]
mod frame;
#[cfg(target_os = "linux")]
mod kmsg;
#[cfg(target_os = "linux")]
mod nic;
#[cfg(target_os = "linux")]
mod regs;
#[cfg(target_os = "linux")]
mod removal;
#[cfg(target_os = "linux")]
mod unplug;

use std::process::ExitCode;

#[cfg(not(target_os = "linux"))]
fn main() -> ExitCode {
    eprintln!("e1000e drives a PCI NIC through Linux VFIO: Linux only");
    ExitCode::FAILURE
}

#[cfg(target_os = "linux")]
fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("e1000e: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match driver::run(&args) {
        Ok(checks) if checks.failed == 0 => {
            println!("e1000e: all {} checks passed", checks.passed);
            ExitCode::SUCCESS
        }
        Ok(checks) => {
            println!(
                "e1000e: {} of {} checks FAILED",
                checks.failed,
                checks.passed + checks.failed
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("e1000e: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(target_os = "linux")]
const USAGE: &str = "usage: e1000e <bdf> [--peer IFACE] [--seconds S] [--tx-frames N] \
                     [--consumers N] [--echo-pattern HEX] [--min-rx N] [--unplug-test] \
                     [--regions] [--no-huge-tlb] [--await-removal remove|unbind|unplug] \
                     [--ready-file PATH] [--queues 1|2]";

/// Command-line options.
#[cfg(target_os = "linux")]
struct Args {
    bdf: String,
    peer: Option<String>,
    seconds: f64,
    tx_frames: u64,
    consumers: usize,
    echo_pattern: Option<u8>,
    min_rx: u64,
    unplug_test: bool,
    /// Both pools region-mapped (`PagePoolBuilder::regions`).
    regions: bool,
    /// Regions from transparent huge pages only, never reserved ones.
    no_huge_tlb: bool,
    /// Wait for the kernel's device request instead of removing the device
    /// at the end of `seconds`.
    await_removal: Option<removal::RemovalKind>,
    /// Created when the driver is ready for the removal.
    ready_file: Option<String>,
    /// Receive queues: 1, or 2 with RSS spreading flows over them.
    queues: usize,
}

#[cfg(target_os = "linux")]
impl Args {
    fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut args = Args {
            bdf: String::new(),
            peer: None,
            seconds: 5.0,
            tx_frames: 1000,
            consumers: 3,
            echo_pattern: None,
            min_rx: 1,
            unplug_test: false,
            regions: false,
            no_huge_tlb: false,
            await_removal: None,
            ready_file: None,
            queues: 1,
        };
        fn value<T: std::str::FromStr>(
            it: &mut impl Iterator<Item = String>,
            name: &str,
        ) -> Result<T, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a valid value"))
        }
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--peer" => args.peer = Some(value(&mut it, "--peer")?),
                "--seconds" => args.seconds = value(&mut it, "--seconds")?,
                "--tx-frames" => args.tx_frames = value(&mut it, "--tx-frames")?,
                "--consumers" => args.consumers = value(&mut it, "--consumers")?,
                "--min-rx" => args.min_rx = value(&mut it, "--min-rx")?,
                "--echo-pattern" => {
                    let hex: String = value(&mut it, "--echo-pattern")?;
                    let hex = hex.trim_start_matches("0x");
                    args.echo_pattern = Some(
                        u8::from_str_radix(hex, 16)
                            .map_err(|_| format!("--echo-pattern {hex}: one hex byte"))?,
                    );
                }
                "--unplug-test" => args.unplug_test = true,
                "--await-removal" => args.await_removal = Some(value(&mut it, "--await-removal")?),
                "--ready-file" => args.ready_file = Some(value(&mut it, "--ready-file")?),
                "--queues" => args.queues = value(&mut it, "--queues")?,
                "--regions" => args.regions = true,
                "--no-huge-tlb" => {
                    args.regions = true;
                    args.no_huge_tlb = true;
                }
                "-h" | "--help" => return Err("help".into()),
                _ if args.bdf.is_empty() && !arg.starts_with('-') => args.bdf = arg,
                _ => return Err(format!("unknown argument {arg}")),
            }
        }
        if args.bdf.is_empty() {
            return Err("the PCI address of the NIC (bound to vfio-pci) is missing".into());
        }
        if !(1..=2).contains(&args.queues) {
            return Err("--queues: the 82574 has 1 or 2 receive queues".into());
        }
        if args.unplug_test && args.queues != 1 {
            return Err("--unplug-test re-arms queue 0 only: use it with --queues 1".into());
        }
        if args.unplug_test && args.await_removal.is_some() {
            return Err("--unplug-test and --await-removal exclude each other".into());
        }
        if args.consumers == 0 || !args.seconds.is_finite() || args.seconds <= 0.0 {
            return Err("--consumers and --seconds must be positive".into());
        }
        Ok(args)
    }
}

/// Pass/fail bookkeeping: every check prints one line.
#[cfg(target_os = "linux")]
#[derive(Default)]
pub struct Checks {
    passed: usize,
    failed: usize,
}

#[cfg(target_os = "linux")]
impl Checks {
    pub fn check(&mut self, ok: bool, what: String) {
        if ok {
            self.passed += 1;
            println!("e1000e: ok    {what}");
        } else {
            self.failed += 1;
            println!("e1000e: FAIL  {what}");
        }
    }
}

#[cfg(target_os = "linux")]
mod driver {
    use std::error::Error;
    use std::sync::atomic::Ordering;
    use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
    use std::sync::Arc;
    use std::thread::{self, sleep};
    use std::time::{Duration, Instant};

    use pagepool::vfio::VfioStats;
    use pagepool::{
        put_bulk, Device, DmaAddr, DmaDirection, PagePool, PagePoolBuilder, PoolStats, RegionInfo,
        SystemRegions,
    };

    use crate::capture::PeerCapture;
    use crate::consumer::{self, HoldPolicy, Msg, RxBuf, RxFrame};
    use crate::frame::{build_tx, Expect, Mac};
    use crate::kmsg::Kmsg;
    use crate::nic::{Nic, RxQueue, RxStats, TxQueue};
    use crate::removal::{CountedDma, RequestWatch};
    use crate::{unplug, Args, Checks};

    /// NAPI budget: frames per poll.
    const BUDGET: usize = 64;
    /// Descriptor rings mapped by the driver itself with one receive queue
    /// (RX and TX); a second receive queue adds one.
    const RING_MAPPINGS: u32 = 2;
    /// Bound on waiting for the DMA engines to go quiet in remove.
    const STOP_BOUND: Duration = Duration::from_millis(200);
    /// With `--await-removal`: how long to wait for the device request
    /// after the driver said it was ready.
    const REQUEST_BOUND: Duration = Duration::from_secs(60);
    /// The kernel must finish the removal this soon after the request
    /// reached the driver.
    const REMOVAL_BOUND: Duration = Duration::from_secs(1);

    fn netdev_file(peer: &str, file: &str) -> Result<String, Box<dyn Error>> {
        let path = format!("/sys/class/net/{peer}/{file}");
        Ok(std::fs::read_to_string(&path)
            .map_err(|e| format!("{path}: {e} (is --peer the kernel's netdev?)"))?
            .trim()
            .to_owned())
    }

    /// The peer's `rx_packets` and `rx_bytes`.
    fn peer_rx(peer: &str) -> Result<(u64, u64), Box<dyn Error>> {
        Ok((
            netdev_file(peer, "statistics/rx_packets")?.parse()?,
            netdev_file(peer, "statistics/rx_bytes")?.parse()?,
        ))
    }

    fn print_pool(name: &str, s: &PoolStats) {
        println!(
            "e1000e: {name} pool: alloc fast {} slow {} (batches) refill {} empty {}; recycle \
             cached {} ring {} ring_full {} released {}; after unbind: pages mapped {}, in \
             flight {}",
            s.alloc.fast,
            s.alloc.slow,
            s.alloc.refill,
            s.alloc.empty,
            s.recycle.cached,
            s.recycle.ring,
            s.recycle.ring_full,
            s.recycle.released_closed,
            s.pages_mapped,
            s.pages_held
        );
    }

    fn print_regions(name: &str, r: &RegionInfo) {
        println!(
            "e1000e: {name} pool regions: {} of {} KiB mapped in all ({} pages carved), {} \
             mapped now, {} live, {} KiB pinned; backing {}",
            r.regions_total,
            r.region_len / 1024,
            r.regions_total * (r.region_len / 4096) as u64,
            r.regions_mapped,
            r.regions_live,
            r.bytes_pinned / 1024,
            r.backing.map_or("none yet".to_owned(), |b| b.to_string())
        );
    }

    fn with_regions<'d>(builder: PagePoolBuilder<'d>, args: &Args) -> PagePoolBuilder<'d> {
        if args.no_huge_tlb {
            builder.region_source(SystemRegions::without_huge_tlb())
        } else if args.regions {
            builder.regions()
        } else {
            builder
        }
    }

    /// Pages the pool ever mapped: one region's pages per region mapped.
    fn pages_carved_ever(r: &RegionInfo) -> u64 {
        r.regions_total * (r.region_len / 4096) as u64
    }

    fn print_vfio(what: &str, s: &VfioStats) {
        println!(
            "e1000e: VFIO {what}: {} ioctls, {} MAP_DMA, {} UNMAP_DMA ({} mappings), {} live",
            s.ioctls, s.map_calls, s.unmap_calls, s.unmapped, s.live_mappings
        );
    }

    /// Where a received frame goes: round-robin over the consumers, the last
    /// of which takes frames as `Bytes`. Returns the page if no consumer
    /// could take it (its channel is full), for recycling on the fast path.
    struct Dispatch {
        senders: Vec<SyncSender<Msg>>,
        next: usize,
        dropped: u64,
    }

    impl Dispatch {
        fn deliver(&mut self, page: pagepool::Page, len: usize) -> Option<pagepool::Page> {
            let i = self.next % self.senders.len();
            self.next += 1;
            let iova = page.dma_addr();
            let bytes_consumer = self.senders.len() > 1 && i == self.senders.len() - 1;
            let buf = if bytes_consumer {
                RxBuf::Bytes(page.into_bytes())
            } else {
                RxBuf::Page(page)
            };
            match self.senders[i].try_send(Msg::Frame(RxFrame { buf, len, iova })) {
                Ok(()) => None,
                Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => {
                    self.dropped += 1;
                    match msg {
                        Msg::Frame(RxFrame {
                            buf: RxBuf::Page(page),
                            ..
                        }) => Some(page),
                        // A `Bytes` gives its page back when dropped.
                        _ => None,
                    }
                }
            }
        }
    }

    /// The rest of remove: free the rings, bus mastering off; returns
    /// `DMA_AVAIL` afterwards.
    fn free_rings(
        nic: &Nic,
        rxq: &mut RxQueue,
        rxq1: Option<&mut RxQueue>,
        txq: &mut TxQueue,
        dma: &pagepool::vfio::VfioDma,
    ) -> Result<u32, Box<dyn Error>> {
        rxq.ring_mut().unmap()?;
        if let Some(q) = rxq1 {
            q.ring_mut().unmap()?;
        }
        txq.ring_mut().unmap()?;
        nic.dev.set_bus_master(false)?;
        Ok(dma.dma_avail()?)
    }

    pub fn run(args: &Args) -> Result<Checks, Box<dyn Error>> {
        let mut checks = Checks::default();
        let mut kmsg = Kmsg::from_now().ok();
        if args.unplug_test && kmsg.is_none() {
            return Err("--unplug-test reads /dev/kmsg: run as root".into());
        }
        let peer_mac: Option<Mac> = match &args.peer {
            Some(peer) => Some(netdev_file(peer, "address")?.parse()?),
            None => None,
        };

        // ---- probe -------------------------------------------------------
        let (nic, info) = Nic::probe(&args.bdf)?;
        let dma = nic.dev.dma().clone();
        let avail_start = dma.dma_avail()?;
        println!(
            "e1000e: probe {}: 82574L, BAR0 {} KiB, MAC {}, link up after {:?}; DMA_AVAIL {} \
             before the driver mapped anything",
            nic.dev.bdf(),
            info.bar0_len / 1024,
            nic.mac,
            info.link_wait,
            avail_start
        );
        // The device request: armed before anything is mapped, so a
        // removal at any time from here on reaches the driver.
        let watch = match args.await_removal {
            Some(_) => Some(RequestWatch::start(&nic.dev)?),
            None => None,
        };
        let mut err_irq = nic.dev.error_notifier()?;
        println!(
            "e1000e: device request {}; PCI error interrupt {}",
            if watch.is_some() {
                "armed (eventfd, watched by a thread)"
            } else {
                "not armed (the driver removes the device itself)"
            },
            if err_irq.is_some() {
                "armed"
            } else {
                "not offered by vfio-pci for this device"
            }
        );
        // Two queues: RSS on (extended descriptors), both rings programmed.
        let rss = args.queues == 2;
        if rss {
            nic.enable_rss();
        }
        let ring_mappings = RING_MAPPINGS + u32::from(rss);
        let mut rxq = RxQueue::new(&nic, 0, rss)?;
        let mut rxq1 = if rss {
            Some(RxQueue::new(&nic, 1, rss)?)
        } else {
            None
        };
        let mut txq = TxQueue::new(&nic)?;
        let avail_rings = dma.dma_avail()?;
        checks.check(
            avail_rings == avail_start - ring_mappings,
            format!("descriptor rings mapped: DMA_AVAIL {avail_start} -> {avail_rings}"),
        );

        let (counted, dma_calls) = CountedDma::new(dma.clone());
        let device = Device::new(counted);
        // With --regions, each pool maps a 2 MiB region at a time and
        // carves its pages from it; the driver code is the same either way.
        let mode = |b| with_regions(b, args);
        println!(
            "e1000e: buffers from {}",
            if args.no_huge_tlb {
                "region-mapped pools (2 MiB regions, one MAP_DMA each, transparent huge pages only)"
            } else if args.regions {
                "region-mapped pools (2 MiB regions, one MAP_DMA each)"
            } else {
                "pools mapped page by page (one MAP_DMA per page)"
            }
        );
        let mut rx_pool: PagePool = mode(device.pool_builder())
            .direction(DmaDirection::FromDevice)
            .ring_size(1024)
            .cache_size(128)
            .refill_batch(BUDGET)
            .build()?;
        // Queue 1's own pool, on the same Device.
        let mut rx_pool1: Option<PagePool> = if rss {
            Some(
                mode(device.pool_builder())
                    .direction(DmaDirection::FromDevice)
                    .ring_size(1024)
                    .cache_size(128)
                    .refill_batch(BUDGET)
                    .build()?,
            )
        } else {
            None
        };
        let mut tx_pool: PagePool = mode(device.pool_builder())
            .direction(DmaDirection::ToDevice)
            .ring_size(256)
            .cache_size(64)
            .refill_batch(16)
            .build()?;

        // ---- consumers ---------------------------------------------------
        let shared = Arc::new(consumer::Shared::default());
        let expect = Expect {
            peer: peer_mac,
            echo_pattern: args.echo_pattern,
        };
        let mut dispatch = Dispatch {
            senders: Vec::new(),
            next: 0,
            dropped: 0,
        };
        let mut threads = Vec::new();
        for i in 0..args.consumers {
            let (tx, rx) = sync_channel(256);
            dispatch.senders.push(tx);
            let shared = Arc::clone(&shared);
            let policy = HoldPolicy {
                hold: Duration::from_millis(500 + 500 * i as u64),
                min_held: 16,
            };
            threads.push(
                thread::Builder::new()
                    .name(format!("consumer-{i}"))
                    .spawn(move || consumer::run(rx, shared, expect, policy))?,
            );
        }

        // ---- up ------------------------------------------------------------
        rxq.refill(&mut rx_pool, &nic);
        // Queue 1 delivers to the same consumers, starting one further on.
        let mut dispatch1 = Dispatch {
            senders: dispatch.senders.clone(),
            next: 1,
            dropped: 0,
        };
        if let (Some(q), Some(p)) = (&mut rxq1, &mut rx_pool1) {
            q.refill(p, &nic);
        }
        nic.enable_rx();
        nic.enable_tx();
        let peer_before = match &args.peer {
            Some(peer) => Some(peer_rx(peer)?),
            None => None,
        };
        let mut capture = match &args.peer {
            Some(peer) => Some(
                PeerCapture::open(peer, nic.mac)
                    .map_err(|e| format!("packet socket on {peer}: {e}"))?,
            ),
            None => None,
        };

        // ---- the poll loop -------------------------------------------------
        let started = Instant::now();
        let run_for = Duration::from_secs_f64(args.seconds);
        // Transmit spread over the first 60% of the run.
        let tx_window = run_for.mul_f64(0.6);
        let mut tx_seq = 0u64;
        let mut tx_alloc_failures = 0u64;
        let mut polls = 0u64;
        let mut ready_at = None;
        // Queue 1 (with --queues 2) runs on a thread of its own, with its own
        // pool, until the main loop (queue 0 and transmit) stops it.
        let stop1 = std::sync::atomic::AtomicBool::new(false);
        let mut polls1 = 0u64;
        let nic_ref = &nic;
        let loop_result = thread::scope(|scope| {
            let q1 = match (rxq1.take(), rx_pool1.take()) {
                (Some(mut q), Some(mut p)) => {
                    let (stop, d) = (&stop1, &mut dispatch1);
                    Some(
                        thread::Builder::new()
                            .name("rx-queue-1".into())
                            .spawn_scoped(scope, move || {
                                let mut n = 0u64;
                                while !stop.load(Ordering::Acquire) {
                                    n += 1;
                                    let got = q.poll(BUDGET, &mut p, nic_ref, |page, len| {
                                        d.deliver(page, len)
                                    });
                                    if got == 0 {
                                        sleep(Duration::from_micros(200));
                                    }
                                }
                                (q, p, n)
                            })
                            .expect("spawn the queue-1 thread"),
                    )
                }
                _ => None,
            };
            let result = (|| -> Result<(), Box<dyn Error>> {
                loop {
                    match &watch {
                        None if started.elapsed() >= run_for => break,
                        None => {}
                        Some(w) if w.fired() => break,
                        Some(_) if ready_at.is_none() && started.elapsed() >= run_for => {
                            println!(
                        "e1000e: removal: ready, traffic flowing, consumers holding {} frames; \
                         waiting for the device request",
                        shared.held.load(Ordering::Relaxed)
                    );
                            if let Some(path) = &args.ready_file {
                                std::fs::write(path, "ready\n")?;
                            }
                            ready_at = Some(Instant::now());
                        }
                        Some(_) if ready_at.is_some_and(|t| t.elapsed() > REQUEST_BOUND) => {
                            checks.check(
                                false,
                                format!("removal: no device request within {REQUEST_BOUND:?}"),
                            );
                            break;
                        }
                        Some(_) => {}
                    }
                    polls += 1;
                    let received = rxq.poll(BUDGET, &mut rx_pool, &nic, |page, len| {
                        dispatch.deliver(page, len)
                    });
                    txq.clean(&mut tx_pool);
                    if let Some(capture) = &mut capture {
                        capture.drain();
                    }
                    let due = (args.tx_frames as f64
                        * (started.elapsed().as_secs_f64() / tx_window.as_secs_f64()).min(1.0))
                        as u64;
                    let mut posted = 0;
                    while tx_seq < due && txq.free() > 0 && posted < 16 {
                        let mut page = match tx_pool.alloc() {
                            Ok(page) => page,
                            Err(_) => {
                                tx_alloc_failures += 1;
                                break;
                            }
                        };
                        let len = build_tx(page.as_mut_slice(), nic.mac, tx_seq);
                        page.sync_for_device(0..len)?;
                        if txq.post(page, len).is_err() {
                            break;
                        }
                        tx_seq += 1;
                        posted += 1;
                    }
                    if posted > 0 {
                        txq.kick(&nic);
                    }
                    if received == 0 && posted == 0 {
                        sleep(Duration::from_micros(200));
                    }
                }
                Ok(())
            })();
            stop1.store(true, Ordering::Release);
            if let Some(h) = q1 {
                let (q, p, n) = h.join().expect("queue-1 thread");
                rxq1 = Some(q);
                rx_pool1 = Some(p);
                polls1 = n;
            }
            result
        });
        loop_result?;

        // ---- remove, while traffic flows and consumers hold pages -------------
        match nic.stop_dma(STOP_BOUND) {
            Ok(waited) => checks.check(
                true,
                format!("remove: RCTL.EN/TCTL.EN cleared, DMA engines quiet after {waited:?}"),
            ),
            Err(e) => {
                // It would not stop: cut it off the bus before anything it
                // may still write is unmapped and freed.
                nic.dev.set_bus_master(false)?;
                checks.check(false, format!("remove: {e}; Bus Master Enable cleared"));
            }
        }
        // Frames the device finished before it stopped still go up (no
        // refill: the ring stays empty from here on).
        let mut tail = rxq.clean(usize::MAX, &mut rx_pool, |page, len| {
            dispatch.deliver(page, len)
        });
        if let (Some(q), Some(p)) = (&mut rxq1, &mut rx_pool1) {
            tail += q.clean(usize::MAX, p, |page, len| dispatch1.deliver(page, len));
        }
        txq.clean(&mut tx_pool);
        // The buffers the device owned come back to the driver, then to
        // their pools, in bulk. Their device addresses are kept for the
        // unplug experiment.
        let armed = rxq.take_armed();
        let freed: Vec<DmaAddr> = armed.iter().map(|p| p.dma_addr()).collect();
        put_bulk(armed);
        if let Some(q) = &mut rxq1 {
            put_bulk(q.take_armed());
        }
        put_bulk(txq.take_pending());
        let (device_rx, device_tx) = nic.take_packet_counters();
        let queue_stats: Vec<RxStats> = std::iter::once(rxq.stats)
            .chain(rxq1.as_ref().map(|q| q.stats))
            .collect();
        let rx_stats = queue_stats.iter().fold(RxStats::default(), |a, q| RxStats {
            frames: a.frames + q.frames,
            bytes: a.bytes + q.bytes,
            bad_descriptors: a.bad_descriptors + q.bad_descriptors,
            alloc_failures: a.alloc_failures + q.alloc_failures,
            posted: a.posted + q.posted,
            rss_hashed: a.rss_hashed + q.rss_hashed,
        });
        let tx_stats = txq.stats;
        let held_at_unbind = shared.held.load(Ordering::Relaxed);
        let vfio_before_unbind = dma.stats();
        let avail_pools = dma.dma_avail()?;
        let rx_regions = rx_pool.info().regions;
        let rx1_regions = rx_pool1.as_ref().and_then(|p| p.info().regions);
        let tx_regions = tx_pool.info().regions;
        let report = device.unbind()?;
        let vfio_after_unbind = dma.stats();
        println!(
            "e1000e: {report} (consumers holding about {held_at_unbind} pages, frames still \
             flowing at the peer)"
        );
        let avail_unbound = dma.dma_avail()?;
        let unbind_unmapped = vfio_after_unbind.unmapped - vfio_before_unbind.unmapped;
        if let (Some(rx), Some(tx)) = (&rx_regions, &tx_regions) {
            print_regions("RX", rx);
            print_regions("TX", tx);
            let mapped = rx.regions_mapped
                + tx.regions_mapped
                + rx1_regions.as_ref().map_or(0, |r| r.regions_mapped);
            checks.check(
                report.regions_unmapped as u64 == mapped
                    && unbind_unmapped == mapped
                    && avail_pools == avail_rings - mapped as u32,
                format!(
                    "unbind unmapped every region once: regions_unmapped {} = {mapped} regions \
                     mapped (RX {}, TX {}) = {unbind_unmapped} mappings the kernel removed \
                     ({} UNMAP_DMA); DMA_AVAIL {avail_pools} with the pools",
                    report.regions_unmapped,
                    rx.regions_mapped,
                    tx.regions_mapped,
                    vfio_after_unbind.unmap_calls - vfio_before_unbind.unmap_calls
                ),
            );
        } else {
            checks.check(
                unbind_unmapped == (report.pages_from_rings + report.pages_held_or_cached) as u64,
                format!(
                    "unbind unmapped every page once: {} from rings + {} in flight = \
                     {unbind_unmapped} mappings the kernel removed ({} UNMAP_DMA); DMA_AVAIL \
                     {avail_pools} with the pools",
                    report.pages_from_rings,
                    report.pages_held_or_cached,
                    vfio_after_unbind.unmap_calls - vfio_before_unbind.unmap_calls
                ),
            );
        }
        checks.check(
            report.mappings_left == 0,
            "unbind reached every mapping (mappings_left 0)".to_owned(),
        );
        checks.check(
            avail_unbound == avail_rings,
            format!(
                "after unbind returned: DMA_AVAIL {avail_unbound} = {avail_rings}, its value \
                 before the pools mapped anything (only the driver's {ring_mappings} rings left)"
            ),
        );

        let calls_at_unbind = dma_calls.load(Ordering::SeqCst);
        let rx_distinct =
            (rxq.distinct_posted() + rxq1.as_ref().map_or(0, |q| q.distinct_posted())) as u64;

        // ---- kernel-driven removal: close everything now ----------------------
        // The kernel waits for the device's fds; nothing below needs the
        // device, so free the rings, drop every handle, then watch the
        // kernel finish.
        let mut hw = Some((nic, rxq, rxq1, txq, dma));
        let mut early_end = None;
        if let (Some(kind), Some(w)) = (args.await_removal, &watch) {
            let (nic, mut rxq, mut rxq1, mut txq, dma) = hw.take().expect("not closed yet");
            let avail_end = free_rings(&nic, &mut rxq, rxq1.as_mut(), &mut txq, &dma)?;
            let bdf = nic.dev.bdf().to_owned();
            drop((nic, rxq, rxq1, txq, dma));
            drop(err_irq.take());
            let fired = w.fired_at();
            if let Some((at, signals)) = fired {
                let closed = at.elapsed();
                let done = kind.wait_done(&bdf, at, Duration::from_secs(5));
                println!(
                    "e1000e: REMOVAL kind={kind:?} request_to_closed_ms={:.1} \
                     request_to_kernel_done_ms={} signals={signals} held_at_unbind={held_at_unbind}",
                    closed.as_secs_f64() * 1e3,
                    done.map_or("timeout".to_owned(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
                );
                checks.check(
                    done.is_some_and(|d| d < REMOVAL_BOUND),
                    format!(
                        "removal ({kind:?}): the kernel finished {} after the request reached \
                         the driver (bound {REMOVAL_BOUND:?}); device, BAR, rings, pools' \
                         mappings and container all closed {closed:?} after it",
                        done.map_or("not within 5 s".to_owned(), |d| format!("{d:?}"))
                    ),
                );
            }
            early_end = Some(avail_end);
        }

        // ---- what happened -------------------------------------------------
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "e1000e: RX {} frames, {} bytes into pool pages in {seconds:.1} s ({} polls, {} at \
             stop); {} dropped for full channels, {} bad descriptors, {} refill failures",
            rx_stats.frames,
            rx_stats.bytes,
            polls,
            tail,
            dispatch.dropped + dispatch1.dropped,
            rx_stats.bad_descriptors,
            rx_stats.alloc_failures
        );
        println!(
            "e1000e: TX {} frames, {} bytes from pool pages ({} reclaimed unsent, {} allocation \
             failures); device counters: {device_rx} received, {device_tx} sent",
            tx_stats.frames, tx_stats.bytes, tx_stats.reclaimed, tx_alloc_failures
        );
        checks.check(
            u64::from(device_rx) == rx_stats.frames + rx_stats.bad_descriptors,
            format!(
                "every frame the device received was polled ({device_rx} = {} + {})",
                rx_stats.frames, rx_stats.bad_descriptors
            ),
        );
        checks.check(
            rx_stats.frames >= args.min_rx && rx_stats.bad_descriptors == 0,
            format!(
                "received {} frames (at least {}), no bad descriptor",
                rx_stats.frames, args.min_rx
            ),
        );
        if rss {
            for (i, q) in queue_stats.iter().enumerate() {
                println!(
                    "e1000e: QUEUE {i} frames={} bytes={} rss_hashed={} polls={} \
                     bad_descriptors={} refill_failures={}",
                    q.frames,
                    q.bytes,
                    q.rss_hashed,
                    if i == 0 { polls } else { polls1 },
                    q.bad_descriptors,
                    q.alloc_failures
                );
            }
            checks.check(
                queue_stats
                    .iter()
                    .all(|q| q.frames >= 10 && q.rss_hashed > 0),
                format!(
                    "RSS spread the flows over both queues, each on its own pool and thread: {} \
                     frames",
                    queue_stats
                        .iter()
                        .enumerate()
                        .map(|(i, q)| format!("queue {i}: {} ({} hashed)", q.frames, q.rss_hashed))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        checks.check(
            tx_stats.frames == args.tx_frames && u64::from(device_tx) == tx_stats.frames,
            format!(
                "transmitted {} of {} frames, all completed (device sent {device_tx})",
                tx_stats.frames, args.tx_frames
            ),
        );
        if let (Some(peer), Some(before)) = (&args.peer, peer_before) {
            // The peer's counters are the kernel's: wait until they settle.
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut after = peer_rx(peer)?;
            while after.0 - before.0 < tx_stats.frames && Instant::now() < deadline {
                sleep(Duration::from_millis(50));
                after = peer_rx(peer)?;
            }
            checks.check(
                after.0 - before.0 == tx_stats.frames,
                format!(
                    "the kernel's {peer} counted them: rx_packets {} -> {} (+{}), rx_bytes +{}",
                    before.0,
                    after.0,
                    after.0 - before.0,
                    after.1 - before.1
                ),
            );
        }
        if let (Some(peer), Some(capture)) = (&args.peer, &mut capture) {
            let deadline = Instant::now() + Duration::from_secs(3);
            capture.drain();
            while (capture.good.len() as u64) < tx_stats.frames && Instant::now() < deadline {
                sleep(Duration::from_millis(50));
                capture.drain();
            }
            if let Some(why) = &capture.first_bad {
                println!("e1000e:   first bad frame at the peer: {why}");
            }
            checks.check(
                capture.good.len() as u64 == tx_stats.frames && capture.bad == 0,
                format!(
                    "{peer} received the bytes written: {} of {} transmitted frames intact, {} \
                     differ",
                    capture.good.len(),
                    tx_stats.frames,
                    capture.bad
                ),
            );
        }
        // Consumers have checked every frame handed to them by now (give
        // them a moment for the last few).
        let delivered = rx_stats.frames - dispatch.dropped - dispatch1.dropped;
        let deadline = Instant::now() + Duration::from_secs(2);
        while shared.frames.load(Ordering::Relaxed) < delivered && Instant::now() < deadline {
            sleep(Duration::from_millis(5));
        }
        let c = &shared;
        let bad = c.bad.load(Ordering::Relaxed);
        println!(
            "e1000e: consumers checked {} frames, {} bytes: {} echo requests (payload {}), {} \
             other ICMPv6 (MLD, ND), {} other IPv6, {bad} bad; {} pages dropped back so far",
            c.frames.load(Ordering::Relaxed),
            c.bytes.load(Ordering::Relaxed),
            c.echo_requests.load(Ordering::Relaxed),
            args.echo_pattern
                .map_or("not checked".to_owned(), |p| format!("{p:#04x} checked")),
            c.other_icmpv6.load(Ordering::Relaxed),
            c.other_ipv6.load(Ordering::Relaxed),
            c.dropped.load(Ordering::Relaxed),
        );
        if let Some(why) = c.first_bad.lock().unwrap().as_ref() {
            println!("e1000e:   first bad frame: {why}");
        }
        checks.check(
            bad == 0 && c.frames.load(Ordering::Relaxed) == delivered,
            format!(
                "content of all {delivered} delivered frames checked (Ethernet header from the \
                 peer, IPv6 lengths, ICMPv6 checksums{}): {bad} bad",
                if args.echo_pattern.is_some() {
                    ", ping payload"
                } else {
                    ""
                }
            ),
        );
        let rx_pool_stats = rx_pool.stats();
        let tx_pool_stats = tx_pool.stats();
        print_pool("RX", &rx_pool_stats);
        if let Some(p) = &rx_pool1 {
            print_pool("RX queue 1", &p.stats());
        }
        print_pool("TX", &tx_pool_stats);
        let map_calls = vfio_before_unbind.map_calls - u64::from(ring_mappings);
        // Page by page, every MAP_DMA is one page; with regions, every one
        // is a region of 512 pages, most of which may never leave the pool.
        let rx_mapped_total = match (&rx_regions, &tx_regions) {
            (Some(rx), Some(tx)) => pages_carved_ever(rx) + pages_carved_ever(tx),
            _ => map_calls,
        };
        println!(
            "e1000e: pages recycled: {} through the RX pool's ring (dropped by consumers), {} \
             straight into the TX cache on completion; {} frames received into {} RX+TX pages \
             ever mapped ({map_calls} MAP_DMA)",
            rx_pool_stats.recycle.ring,
            tx_pool_stats.recycle.cached,
            rx_stats.frames,
            rx_mapped_total
        );
        // Reuse: more buffers posted than distinct pages behind them (and,
        // page by page, than pages ever mapped), pages back through the
        // ring, transmit pages straight back into the cache.
        checks.check(
            rx_pool_stats.recycle.ring > 0
                && rx_pool_stats.alloc.refill > 0
                && tx_pool_stats.recycle.cached > 0
                && rx_stats.posted > rx_distinct
                && (args.regions || rx_stats.posted > rx_mapped_total),
            format!(
                "pages were reused: {} RX buffers posted from {rx_distinct} distinct pages \
                 ({rx_mapped_total} RX+TX pages ever mapped by {map_calls} MAP_DMA), {} pages \
                 back through the RX ring, {} cache refills",
                rx_stats.posted, rx_pool_stats.recycle.ring, rx_pool_stats.alloc.refill
            ),
        );

        // ---- the unplug experiment -------------------------------------------
        let mut outcome = None;
        if let (true, Some((nic, rxq, _, _, _))) = (args.unplug_test, &mut hw) {
            let kmsg = kmsg.as_mut().expect("opened above");
            outcome = Some(unplug::run(
                nic,
                rxq,
                &dispatch.senders,
                &freed,
                kmsg,
                &mut checks,
            ));
        }

        // ---- the rest of remove: free the rings, bus mastering off -------------
        let avail_end = match (&mut hw, early_end) {
            (Some((nic, rxq, rxq1, txq, dma)), _) => free_rings(nic, rxq, rxq1.as_mut(), txq, dma)?,
            (None, Some(avail_end)) => avail_end,
            (None, None) => unreachable!("closed early only with its DMA_AVAIL"),
        };
        checks.check(
            avail_end == avail_start,
            format!(
                "rings freed: DMA_AVAIL {avail_end} = {avail_start}, its value before the \
                 driver started"
            ),
        );

        // ---- consumers still hold valid frames ------------------------------------
        if hw.is_none() {
            let mut held = 0;
            let mut as_bytes = 0;
            let mut unchanged = 0;
            for tx in &dispatch.senders {
                let (reply, report) = std::sync::mpsc::channel();
                if tx.send(Msg::Freeze(reply)).is_ok() {
                    if let Ok(r) = report.recv_timeout(Duration::from_secs(2)) {
                        held += r.held;
                        as_bytes += r.as_bytes;
                        unchanged += r.unchanged_since_receipt;
                    }
                }
            }
            println!(
                "e1000e: REMOVAL held_frames={held} held_as_bytes={as_bytes} \
                 unchanged={unchanged}"
            );
            checks.check(
                held > 0 && as_bytes > 0 && unchanged == held,
                format!(
                    "after the device and container were closed, consumers read the {held} \
                     frames they hold ({as_bytes} as Bytes): {unchanged} unchanged since receipt"
                ),
            );
        }

        // ---- consumers drop what they held: no VFIO call ----------------------
        let vfio_before = hw.as_ref().map(|(_, _, _, _, dma)| dma.stats());
        let held = shared.held.load(Ordering::Relaxed);
        for tx in &dispatch.senders {
            let _ = tx.send(Msg::Release);
        }
        for t in threads {
            t.join().map_err(|_| "a consumer thread panicked")?;
        }
        drop(rx_pool);
        drop(rx_pool1);
        drop(tx_pool);
        drop(device);
        if let (Some(vfio_before), Some((_, _, _, _, dma))) = (vfio_before, &hw) {
            let vfio_after = dma.stats();
            print_vfio("before the drops", &vfio_before);
            print_vfio("after", &vfio_after);
            checks.check(
                vfio_after == vfio_before,
                format!(
                    "consumers dropped their {held} pages on their threads, the pools and the \
                     Device were dropped: no VFIO call (ioctls {} -> {})",
                    vfio_before.ioctls, vfio_after.ioctls
                ),
            );
        }
        let calls_after = dma_calls.load(Ordering::SeqCst) - calls_at_unbind;
        println!("e1000e: REMOVAL dma_ops_calls_after_unbind={calls_after}");
        checks.check(
            calls_after == 0,
            format!(
                "no DmaOps call after unbind returned ({calls_after}), the {held} held pages \
                 dropped and the pools and Device dropped included"
            ),
        );
        if let Some(w) = watch {
            let later = w.later_signals();
            w.stop()?;
            checks.check(
                later == 0,
                format!("the device request came once ({later} repeats)"),
            );
        }

        // ---- summary --------------------------------------------------------
        println!(
            "e1000e: ---- summary ({}) ----",
            if args.regions {
                "region-mapped pools"
            } else {
                "pools mapped page by page"
            }
        );
        println!(
            "e1000e: RX {} frames / {} bytes; TX {} frames / {} bytes",
            rx_stats.frames, rx_stats.bytes, tx_stats.frames, tx_stats.bytes
        );
        println!(
            "e1000e: pages recycled {} (RX ring) + {} (TX cache); pages held by consumers when \
             unbind started: {held_at_unbind} ({} came back while or after it ran, freed with \
             no device call)",
            rx_pool_stats.recycle.ring,
            tx_pool_stats.recycle.cached,
            rx_pool_stats.recycle.released_closed
        );
        println!(
            "e1000e: DMA_AVAIL {avail_start} before, {avail_rings} with the rings, {avail_pools} \
             with the pools, {avail_unbound} after unbind, {avail_end} after remove"
        );
        if let Some(o) = outcome {
            println!(
                "e1000e: unplug: {} held pages ({} as Bytes) pattern-checked, {} stale \
                 descriptors re-armed, {} written back by the device, {} DMAR faults seen, {} \
                 bytes changed",
                o.held,
                o.held_as_bytes,
                o.rearmed,
                o.completed,
                o.faults.len(),
                o.bytes_changed
            );
        }
        Ok(checks)
    }
}
