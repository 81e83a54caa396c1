//! Consumer threads: the "network stack". Each takes received frames from a
//! channel, checks their content, holds them for a while (as sockets and
//! reassembly queues do), and drops them on its own thread, which gives the
//! page back to the pool through its shared ring.
//!
//! For the unplug experiment each also answers three requests: freeze (stop
//! dropping, re-read every held frame, then fill each held page with a
//! pattern, or snapshot it where it is held as immutable `Bytes`), check
//! (count bytes that changed since), release (drop everything).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pagepool::{DmaAddr, Page};

use crate::frame::{check_rx, fnv1a, Expect, RxKind};

/// A received frame as a consumer holds it: the pool page itself, or a
/// zero-copy `Bytes` over it (whose last clone gives the page back).
pub enum RxBuf {
    Page(Page),
    Bytes(Bytes),
}

impl RxBuf {
    fn page_bytes(&self) -> &[u8] {
        match self {
            RxBuf::Page(page) => page.as_slice(),
            RxBuf::Bytes(bytes) => bytes,
        }
    }
}

pub struct RxFrame {
    pub buf: RxBuf,
    pub len: usize,
    /// The device address the frame was received at (stale after unbind).
    pub iova: DmaAddr,
}

pub enum Msg {
    Frame(RxFrame),
    Freeze(Sender<FreezeReport>),
    Check(Sender<CheckReport>),
    Release,
}

#[derive(Default, Debug)]
pub struct FreezeReport {
    pub held: usize,
    pub as_bytes: usize,
    /// Held frames whose content still matches what was checked on receipt.
    pub unchanged_since_receipt: usize,
    pub iovas: Vec<DmaAddr>,
}

#[derive(Default, Debug)]
pub struct CheckReport {
    pub pages: usize,
    pub pages_changed: usize,
    pub bytes_changed: usize,
}

/// Counters shared by all consumers.
#[derive(Default)]
pub struct Shared {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub echo_requests: AtomicU64,
    pub other_icmpv6: AtomicU64,
    pub other_ipv6: AtomicU64,
    pub bad: AtomicU64,
    pub first_bad: Mutex<Option<String>>,
    /// Pages dropped (given back to the pool) by consumers.
    pub dropped: AtomicU64,
    /// Frames held right now.
    pub held: AtomicU64,
}

/// How long a consumer holds a frame, and how many it always keeps.
pub struct HoldPolicy {
    pub hold: Duration,
    pub min_held: usize,
}

struct Held {
    frame: RxFrame,
    since: Instant,
    hash: u64,
    /// After freeze: what the page must still contain.
    reference: Option<Reference>,
}

enum Reference {
    /// The page was filled with the pattern of this seed.
    Pattern(u8),
    /// The page is immutable `Bytes`: a copy of it.
    Snapshot(Vec<u8>),
}

fn pattern_byte(seed: u8, i: usize) -> u8 {
    (i as u8).wrapping_mul(29).wrapping_add(seed) ^ 0x5a
}

fn check_frame(shared: &Shared, frame: &RxFrame, expect: &Expect) {
    shared.frames.fetch_add(1, Ordering::Relaxed);
    shared.bytes.fetch_add(frame.len as u64, Ordering::Relaxed);
    match check_rx(&frame.buf.page_bytes()[..frame.len], expect) {
        Ok(RxKind::EchoRequest) => shared.echo_requests.fetch_add(1, Ordering::Relaxed),
        Ok(RxKind::OtherIcmpv6) => shared.other_icmpv6.fetch_add(1, Ordering::Relaxed),
        Ok(RxKind::OtherIpv6) => shared.other_ipv6.fetch_add(1, Ordering::Relaxed),
        Err(why) => {
            shared
                .first_bad
                .lock()
                .unwrap()
                .get_or_insert_with(|| format!("{} bytes at {}: {why}", frame.len, frame.iova));
            shared.bad.fetch_add(1, Ordering::Relaxed)
        }
    };
}

/// The consumer thread's body.
pub fn run(rx: Receiver<Msg>, shared: Arc<Shared>, expect: Expect, policy: HoldPolicy) {
    let mut held: VecDeque<Held> = VecDeque::new();
    let mut frozen = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(Msg::Frame(frame)) => {
                check_frame(&shared, &frame, &expect);
                let hash = fnv1a(&frame.buf.page_bytes()[..frame.len]);
                held.push_back(Held {
                    frame,
                    since: Instant::now(),
                    hash,
                    reference: None,
                });
                shared.held.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Msg::Freeze(reply)) => {
                frozen = true;
                let mut report = FreezeReport::default();
                for (n, h) in held.iter_mut().enumerate() {
                    report.held += 1;
                    report.iovas.push(h.frame.iova);
                    if fnv1a(&h.frame.buf.page_bytes()[..h.frame.len]) == h.hash {
                        report.unchanged_since_receipt += 1;
                    }
                    h.reference = Some(match &mut h.frame.buf {
                        RxBuf::Page(page) => {
                            let seed = n as u8;
                            for (i, b) in page.as_mut_slice().iter_mut().enumerate() {
                                *b = pattern_byte(seed, i);
                            }
                            Reference::Pattern(seed)
                        }
                        RxBuf::Bytes(bytes) => {
                            report.as_bytes += 1;
                            Reference::Snapshot(bytes.to_vec())
                        }
                    });
                }
                let _ = reply.send(report);
            }
            Ok(Msg::Check(reply)) => {
                let mut report = CheckReport::default();
                for h in &held {
                    let now = h.frame.buf.page_bytes();
                    let changed = match &h.reference {
                        Some(Reference::Pattern(seed)) => now
                            .iter()
                            .enumerate()
                            .filter(|&(i, &b)| b != pattern_byte(*seed, i))
                            .count(),
                        Some(Reference::Snapshot(copy)) => {
                            now.iter().zip(copy).filter(|(a, b)| a != b).count()
                        }
                        None => 0,
                    };
                    report.pages += 1;
                    report.bytes_changed += changed;
                    report.pages_changed += usize::from(changed > 0);
                }
                let _ = reply.send(report);
            }
            Ok(Msg::Release) | Err(RecvTimeoutError::Disconnected) => {
                let n = held.len() as u64;
                held.clear(); // the pages go back, from this thread
                shared.dropped.fetch_add(n, Ordering::Relaxed);
                shared.held.fetch_sub(n, Ordering::Relaxed);
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if !frozen {
            while held.len() > policy.min_held
                && held
                    .front()
                    .is_some_and(|h| h.since.elapsed() >= policy.hold)
            {
                drop(held.pop_front()); // back to the pool's ring
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                shared.held.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}
