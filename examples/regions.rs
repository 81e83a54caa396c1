//! Region-mapped pools: one `DmaOps::map` per 2 MiB region instead of one
//! per page, and what `unbind` does with them.
//!
//! Run: `cargo run --example regions`
//!
//! A region-mapped pool maps a whole region (huge pages where the system
//! has them) once and carves its pages from it. The example fills a pool,
//! counts the device's maps, shows which memory backs the regions, lets
//! threads hold pages across `unbind`, and checks that every region was
//! unmapped exactly once and nothing reached the device afterwards.

use std::error::Error;
use std::thread;

use pagepool::checking::{CheckMode, CheckingDevice};
use pagepool::{Device, DmaDirection, DEFAULT_REGION_SIZE, PAGE_SIZE};

fn main() -> Result<(), Box<dyn Error>> {
    let checker = CheckingDevice::new(CheckMode::Panic);
    let device = Device::new(checker.clone());
    let mut rx = device
        .pool_builder()
        .direction(DmaDirection::FromDevice)
        .regions()
        .build()?;

    // 4096 pages in flight: 8 regions, 8 maps (a per-page pool: 4096).
    let mut pages = Vec::new();
    for _ in 0..4096 {
        pages.push(rx.alloc()?);
    }
    let info = rx.info().regions.expect("a region-mapped pool");
    println!(
        "{} pages in flight through {} maps: {} regions of {} KiB ({} pages each), backed by {}",
        pages.len(),
        checker.stats().maps,
        info.regions_mapped,
        info.region_len / 1024,
        DEFAULT_REGION_SIZE / PAGE_SIZE,
        info.backing.map_or("nothing".into(), |b| b.to_string()),
    );
    println!(
        "tracker: {} mappings recorded, {} bytes pinned for the device",
        device.tracked_mappings(),
        info.bytes_pinned
    );

    // The device writes a frame into one page; the CPU syncs and reads it.
    let mut page = pages.pop().expect("a page");
    checker.device_write(page.dma_addr(), b"frame")?;
    page.sync_for_cpu(0..5)?;
    assert_eq!(&page.as_slice()[..5], b"frame");
    rx.recycle_direct(page);

    // A thread holds a quarter of the pages while the driver unbinds.
    let (tx, rx_done) = std::sync::mpsc::channel::<()>();
    let mut held_pages = pages.split_off(3072);
    let holder = thread::spawn(move || {
        rx_done.recv().expect("unbind finished");
        // Still valid memory after unbind; dropping calls nothing.
        for page in &mut held_pages {
            page.as_mut_slice()[0] = 1;
        }
        held_pages.len()
    });
    drop(pages); // back to the pool: its ring and spare list
    let report = device.unbind()?;
    tx.send(())?;
    let calls = checker.stats();
    let held = holder.join().expect("holder thread");
    drop(rx);
    assert_eq!(checker.stats(), calls, "no device call after unbind");
    println!("{report}");
    println!("{held} pages written and dropped after unbind, with no device call");
    let stats = checker.stats();
    assert_eq!(stats.maps, stats.unmaps, "every region unmapped once");
    assert_eq!(checker.live_mappings(), 0);
    println!("checker: {}", checker.verdict());
    checker.assert_clean();
    Ok(())
}
