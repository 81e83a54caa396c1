//! Pages dropped on other threads: per-thread batches of remote returns,
//! the RX-thread / consumer-thread pipeline (page by page, then in bursts
//! both ways with `alloc_bulk` and `put_bulk`), and `unbind` with pages
//! kept back in a consumer's batch.
//!
//! Run: `cargo run --example remote_returns`
//!
//! In a NIC driver most pages do not come back on the RX thread: the stack
//! hands them to sockets and application threads, which drop them there.
//! Such a drop is a few plain stores into the dropping thread's batch; the
//! batch reaches the pool's ring under one lock when it fills, and the RX
//! thread refills its cache from the ring.

use std::error::Error;
use std::sync::mpsc;
use std::thread;

use pagepool::checking::{CheckMode, CheckingDevice};
use pagepool::{put_bulk, Device, Page, DEFAULT_REMOTE_BATCH};

/// Packets the RX thread receives.
const PACKETS: usize = 100_000;

fn main() -> Result<(), Box<dyn Error>> {
    let checker = CheckingDevice::new(CheckMode::Panic);
    let device = Device::new(checker.clone());
    let mut rx = device.pool_builder().build()?;

    // The consumer: reads each frame and drops its page (kept back in the
    // consumer's batch of remote returns, sent home 64 at a time).
    let (to_consumer, from_rx) = mpsc::sync_channel::<Vec<Page>>(4);
    let consumer = thread::spawn(move || {
        let mut frames = 0u64;
        for burst in from_rx {
            for page in burst {
                assert_eq!(&page.as_slice()[..4], b"pkt!");
                frames += 1;
            }
        }
        // The thread ends: what its batch still holds goes home now.
        frames
    });

    // The RX thread: allocate, let the device write a frame, sync it for
    // the CPU, hand it over in bursts of 64.
    let mut burst = Vec::with_capacity(64);
    for _ in 0..PACKETS {
        let mut page = rx.alloc()?;
        checker.device_write(page.dma_addr(), b"pkt!")?;
        page.sync_for_cpu(0..4)?;
        burst.push(page);
        if burst.len() == 64 {
            to_consumer.send(std::mem::take(&mut burst))?;
        }
    }
    to_consumer.send(burst)?;
    drop(to_consumer);
    let frames = consumer.join().expect("consumer");
    let s = rx.stats();
    println!(
        "{frames} frames through {} mappings: {} refills from the ring ({} pages came back \
         through it, in batches of up to {DEFAULT_REMOTE_BATCH}), {} released for a full ring",
        checker.stats().maps,
        s.alloc.refill,
        s.recycle.ring,
        s.recycle.ring_full
    );

    // Bursts both ways: the RX thread refills 64 pages with one
    // `alloc_bulk` (the pool's checks once per burst), the consumer gives a
    // burst back with one `put_bulk` (one ring lock per burst).
    let (to_consumer, from_rx) = mpsc::sync_channel::<Vec<Page>>(4);
    let consumer = thread::spawn(move || {
        let mut frames = 0;
        for mut burst in from_rx {
            frames += burst.len();
            assert!(burst.iter().all(|page| &page.as_slice()[..4] == b"pkt!"));
            put_bulk(burst.drain(..));
        }
        frames
    });
    let refills_before = rx.stats().alloc.refill;
    let mut sent = 0;
    while sent < PACKETS {
        let mut burst = Vec::with_capacity(64);
        let got = rx.alloc_bulk(&mut burst, 64.min(PACKETS - sent))?;
        for page in &mut burst {
            checker.device_write(page.dma_addr(), b"pkt!")?;
            page.sync_for_cpu(0..4)?;
        }
        sent += got;
        to_consumer.send(burst)?;
    }
    drop(to_consumer);
    let frames = consumer.join().expect("consumer");
    println!(
        "{frames} frames in bursts of 64 both ways: {} more refills from the ring, \
         {} mappings in all",
        rx.stats().alloc.refill - refills_before,
        checker.stats().maps,
    );

    // A consumer keeps 10 pages back in its batch (not full) and waits;
    // the driver unbinds meanwhile. The kept-back pages are still mapped
    // and tracked, so `unbind` unmaps them; when the consumer's thread ends
    // they are freed with no device call.
    let pages: Vec<Page> = (0..10).map(|_| rx.alloc()).collect::<Result<_, _>>()?;
    let (unbound_tx, unbound_rx) = mpsc::channel::<()>();
    let (kept_tx, kept_rx) = mpsc::channel::<()>();
    let consumer = thread::spawn(move || {
        drop(pages); // kept back
        kept_tx.send(()).expect("main waits");
        unbound_rx.recv().expect("unbind finished");
        // Returning ends the thread: its batch goes home to a closed pool.
    });
    kept_rx.recv()?;
    let report = device.unbind()?;
    println!(
        "unbind: {} pages unmapped through the tracker (the 10 kept back among them), \
         {} from the ring",
        report.pages_held_or_cached, report.pages_from_rings
    );
    let calls = checker.stats();
    unbound_tx.send(())?;
    consumer.join().expect("consumer");
    drop(rx);
    assert_eq!(checker.stats(), calls, "no device call after unbind");
    assert_eq!(checker.live_mappings(), 0);
    checker.assert_clean();
    println!("checker: every mapping unmapped once, no call after unbind, no violation");
    Ok(())
}
