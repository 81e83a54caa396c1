//! The unplug experiment: what a device that missed the remove would do.
//!
//! After `Device::unbind` has returned, the receive ring is re-armed with
//! the old device addresses of pages that consumers still hold and of pages
//! unbind freed, and the receiver is enabled again. The device fetches those
//! descriptors (the ring itself is still mapped: the driver frees it only
//! after this) and writes every frame it receives to an address the IOMMU no
//! longer translates. The kernel's intel-iommu driver logs each refused
//! write as a DMAR fault, and the held pages, filled with a pattern (or
//! snapshotted) just before, must not change by a single byte.

use std::collections::HashSet;
use std::io::Write;
use std::sync::mpsc::{channel, SyncSender};
use std::thread::sleep;
use std::time::{Duration, Instant};

use pagepool::DmaAddr;

use crate::consumer::Msg;
use crate::kmsg::{any_dmar_faults, dmar_faults, DmarFault, Kmsg};
use crate::nic::{Nic, RxQueue, RING_LEN};
use crate::Checks;

/// What the experiment saw.
#[derive(Default)]
pub struct Outcome {
    pub held: usize,
    pub held_as_bytes: usize,
    pub rearmed: usize,
    pub rearmed_held: usize,
    pub completed: usize,
    pub waited: Duration,
    pub faults: Vec<DmarFault>,
    pub bytes_changed: usize,
    pub pages_changed: usize,
}

/// Runs the experiment. `freed` are device addresses of pages unbind
/// unmapped and freed (with region-mapped pools, unmapped with their region,
/// whose memory lives on while a consumer holds one of its pages); `kmsg`
/// was opened when the driver started.
pub fn run(
    nic: &Nic,
    rxq: &mut RxQueue,
    consumers: &[SyncSender<Msg>],
    freed: &[DmaAddr],
    kmsg: &mut Kmsg,
    checks: &mut Checks,
) -> Outcome {
    let mut out = Outcome::default();

    // 1. Consumers stop dropping, re-read what they hold, then fill it with
    //    a pattern (pages) or snapshot it (Bytes).
    let mut held_iovas = Vec::new();
    let mut unchanged = 0;
    for tx in consumers {
        let (reply, answer) = channel();
        tx.send(Msg::Freeze(reply)).expect("consumer alive");
        let report = answer.recv().expect("consumer answers");
        out.held += report.held;
        out.held_as_bytes += report.as_bytes;
        unchanged += report.unchanged_since_receipt;
        held_iovas.extend(report.iovas);
    }
    checks.check(
        out.held > 0,
        format!("consumers still hold {} pages after unbind", out.held),
    );
    checks.check(
        unchanged == out.held,
        format!(
            "consumers re-read their {} held frames after unbind: {unchanged} unchanged since \
             receipt",
            out.held
        ),
    );

    // 2. No fault so far: the device only ever wrote where it was allowed.
    let before = kmsg.read_new();
    let early = any_dmar_faults(&before);
    checks.check(
        early.is_empty(),
        format!(
            "no DMAR fault while the driver ran ({} before the re-arm)",
            early.len()
        ),
    );
    for line in early.iter().take(5) {
        println!("e1000e:   unexpected: {line}");
    }

    // 3. Re-arm with the stale addresses: held pages first, so the device
    //    surely aims at them, then pages unbind freed.
    let mut seen = HashSet::new();
    let stale: Vec<DmaAddr> = held_iovas
        .iter()
        .chain(freed)
        .copied()
        .filter(|a| seen.insert(a.0))
        .take(RING_LEN - 1)
        .collect();
    out.rearmed_held = held_iovas.len().min(stale.len());
    let bdf = nic.dev.bdf().to_owned();
    println!(
        "e1000e: unplug: re-arming the RX ring with {} stale IOVAs ({} of pages consumers hold, \
         {} of pages unbind unmapped) and enabling RX: DMAR faults for {bdf} expected from here",
        stale.len(),
        out.rearmed_held,
        stale.len() - out.rearmed_held
    );
    let _ = std::io::stdout().flush();
    // Let the console print that line before the first fault line can.
    // SAFETY: tcdrain only waits on the fd; it fails harmlessly if stdout is
    // not a terminal.
    unsafe { libc::tcdrain(1) };
    let started = Instant::now();
    out.rearmed = rxq.rearm_stale(nic, &stale);

    // 4. Let the device receive into them: at least every held page's
    //    descriptor and a few more, or until the bound.
    let want = out.rearmed.min(out.rearmed_held + 32);
    while rxq.completed_of(out.rearmed) < want && started.elapsed() < Duration::from_secs(6) {
        sleep(Duration::from_millis(10));
    }
    let stopped = nic.stop_dma(Duration::from_millis(200));
    out.waited = started.elapsed();
    out.completed = rxq.completed_of(out.rearmed);
    checks.check(
        stopped.is_ok(),
        "the receiver stopped again after the experiment".to_owned(),
    );
    checks.check(
        out.completed > 0 && out.completed >= out.rearmed_held,
        format!(
            "the device wrote back {} of the {} stale descriptors in {:?}: it sent a frame to \
             the old IOVA of each of the {} held pages and of {} unmapped ones",
            out.completed,
            out.rearmed,
            out.waited,
            out.rearmed_held,
            out.completed.saturating_sub(out.rearmed_held)
        ),
    );
    let moved = (0..out.rearmed)
        .filter(|&i| rxq.desc_addr(i) != stale[i].0)
        .count();
    checks.check(
        moved == 0,
        format!("descriptor buffer addresses unchanged by the write-back ({moved} changed)"),
    );

    // 5. The IOMMU's verdict: fault lines for our device, at stale addresses.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut lines = Vec::new();
    loop {
        lines.extend(kmsg.read_new());
        if !dmar_faults(&lines, &bdf).is_empty() || Instant::now() > deadline {
            break;
        }
        sleep(Duration::from_millis(50));
    }
    sleep(Duration::from_millis(300));
    lines.extend(kmsg.read_new());
    out.faults = dmar_faults(&lines, &bdf);
    let all = any_dmar_faults(&lines);
    let stale_set: HashSet<u64> = stale.iter().map(|a| a.0 & !0xfff).collect();
    let outside: Vec<&DmarFault> = out
        .faults
        .iter()
        .filter(|f| !stale_set.contains(&(f.addr & !0xfff)))
        .collect();
    let held_set: HashSet<u64> = held_iovas.iter().map(|a| a.0 & !0xfff).collect();
    let on_held = out
        .faults
        .iter()
        .filter(|f| held_set.contains(&(f.addr & !0xfff)))
        .count();
    checks.check(
        !out.faults.is_empty(),
        format!(
            "the IOMMU refused the device's writes: {} DMAR fault lines for {bdf} in the kernel \
             log ({on_held} at pages consumers hold; the kernel rate-limits these lines)",
            out.faults.len()
        ),
    );
    checks.check(
        out.faults.iter().all(|f| f.write),
        "every fault is a DMA write (descriptor reads were allowed)".to_owned(),
    );
    checks.check(
        outside.is_empty(),
        format!(
            "every fault address is one of the stale IOVAs ({} elsewhere)",
            outside.len()
        ),
    );
    checks.check(
        all.len() == out.faults.len(),
        format!("no DMAR fault for any other device ({} in all)", all.len()),
    );
    for f in out.faults.iter().take(3) {
        println!("e1000e:   kernel: {}", f.line);
    }

    // 6. Not one byte of a held page changed.
    for tx in consumers {
        let (reply, answer) = channel();
        tx.send(Msg::Check(reply)).expect("consumer alive");
        let report = answer.recv().expect("consumer answers");
        out.bytes_changed += report.bytes_changed;
        out.pages_changed += report.pages_changed;
    }
    checks.check(
        out.bytes_changed == 0,
        format!(
            "bytes changed in the {} held pages: {} ({} pages changed)",
            out.held, out.bytes_changed, out.pages_changed
        ),
    );
    out
}
