//! [`run_threaded`]: the ops of each logical thread run on a real OS
//! thread of its own, all concurrently; items sent between threads go
//! through channels.
//!
//! No model: the interleaving is the scheduler's. The checks are the
//! model-free invariants: zero violations after every op, every allocation
//! error one the run can cause, content after every sync that succeeded,
//! and at the end (everything dropped) every block freed exactly once and
//! no mapping left. The simulated device (device writes and reads) is
//! quiesced while unbind runs, as a real driver quiesces its device before
//! remove.

use std::sync::{mpsc, PoisonError, RwLock};
use std::thread;

use pagepool::checking::CheckingDevice;
use pagepool::{
    flush_thread_returns, put_bulk, AllocError, BuildError, Device, DmaDirection, DmaError,
    PagePool, SyncError,
};

use super::buffers::{device_writes, range_in, Buf};
use super::faults::{catching, on_spawned_thread, Faults, FaultyPages};
use super::ops::{Config, How, Op};
use super::setup::{assert_torn_down, build_pool, World};
use super::{discard_leftover_returns, POOLS, THREADS};

/// A buffer held by a real thread.
struct TItem {
    buf: Buf,
    direction: DmaDirection,
    expect: Option<(usize, usize, u8)>,
}

impl TItem {
    fn check_content(&self, ctx: &str) {
        self.buf.check_content(self.expect, ctx);
    }
}

/// What the real threads share.
struct Shared<'a> {
    cfg: &'a Config,
    checking: &'a CheckingDevice,
    faults: &'a Faults,
    source: &'a FaultyPages,
    device: &'a Device,
    /// The simulated device (device_write / device_read) holds this shared;
    /// unbind holds it exclusively. A real driver quiesces its device before
    /// remove; without this the harness itself would touch the device after
    /// unbind. Pool calls (syncs, maps, unmaps) are not under it and race
    /// unbind freely.
    sim: &'a RwLock<()>,
    inboxes: Vec<mpsc::Sender<TItem>>,
}

/// One real thread: its pool (threads `0..POOLS`), its buffers, its inbox.
struct Actor<'a> {
    t: usize,
    sh: &'a Shared<'a>,
    pool: Option<PagePool>,
    held: Vec<TItem>,
    inbox: mpsc::Receiver<TItem>,
}

fn alloc_error_allowed(e: &AllocError) -> bool {
    matches!(
        e,
        AllocError::Unbound | AllocError::Map(DmaError::Injected) | AllocError::OutOfMemory { .. }
    )
}

impl Actor<'_> {
    fn ctx(&self, what: &str) -> String {
        format!("thread {}: {what}", self.t)
    }

    fn take_inbox(&mut self) {
        while let Ok(item) = self.inbox.try_recv() {
            self.held.push(item);
        }
    }

    fn pick(&self, item: u8) -> Option<usize> {
        let n = self.held.len();
        (n > 0).then(|| usize::from(item) % n)
    }

    fn alloc(&mut self) -> Option<TItem> {
        let pool = self.pool.as_mut()?;
        match pool.alloc() {
            Ok(page) => Some(TItem {
                buf: Buf::Page(page),
                direction: pool.direction(),
                expect: None,
            }),
            Err(e) => {
                assert!(
                    alloc_error_allowed(&e),
                    "{}",
                    self.ctx(&format!("alloc: {e}"))
                );
                None
            }
        }
    }

    fn exec(&mut self, op: &Op) {
        self.take_inbox();
        match *op {
            Op::Alloc { .. } => {
                if let Some(item) = self.alloc() {
                    self.held.push(item);
                }
            }
            Op::AllocFrag { size, .. } => {
                let Some(pool) = self.pool.as_mut() else {
                    return;
                };
                let page_len = pool.page_len();
                match pool.alloc_frag(usize::from(size)) {
                    Ok(frag) => {
                        assert_eq!(frag.len(), usize::from(size));
                        self.held.push(TItem {
                            buf: Buf::Frag(frag),
                            direction: pool.direction(),
                            expect: None,
                        });
                    }
                    Err(AllocError::FragmentSize { .. })
                        if size == 0 || usize::from(size) > page_len => {}
                    Err(e) => {
                        assert!(
                            alloc_error_allowed(&e),
                            "{}",
                            self.ctx(&format!("alloc_frag: {e}"))
                        )
                    }
                }
            }
            Op::RecycleDirect { item, .. } => {
                let (Some(i), Some(_)) = (self.pick(item), &self.pool) else {
                    return;
                };
                if matches!(self.held[i].buf, Buf::Page(_)) {
                    let Buf::Page(page) = self.held.swap_remove(i).buf else {
                        unreachable!()
                    };
                    self.pool.as_mut().unwrap().recycle_direct(page);
                }
            }
            Op::Drop { item, how, .. } => {
                if let Some(i) = self.pick(item) {
                    let item = self.held.swap_remove(i);
                    match (how, item.buf) {
                        (How::Spawned | How::Worker, buf) => on_spawned_thread(move || drop(buf)),
                        (How::Bulk, Buf::Page(page)) => put_bulk([page]),
                        (_, buf) => drop(buf),
                    }
                }
            }
            Op::Send { item, to, .. } => {
                if let Some(i) = self.pick(item) {
                    let item = self.held.swap_remove(i);
                    // A receiver that already finished leaves it in its
                    // inbox, which the teardown empties.
                    self.sh.inboxes[usize::from(to) % THREADS]
                        .send(item)
                        .expect("inboxes outlive the threads");
                }
            }
            Op::PutBulk { n, .. } => {
                let mut pages = Vec::new();
                let mut i = 0;
                while i < self.held.len() && pages.len() <= usize::from(n % 8) {
                    if matches!(self.held[i].buf, Buf::Page(_)) {
                        let Buf::Page(page) = self.held.remove(i).buf else {
                            unreachable!()
                        };
                        pages.push(page);
                    } else {
                        i += 1;
                    }
                }
                put_bulk(pages);
            }
            Op::FillRing { extra, how, .. } => {
                if self.pool.is_none() {
                    return;
                }
                let n = self.sh.cfg.pools[self.t].ring_size + 1 + usize::from(extra % 3);
                let got: Vec<TItem> = (0..n).map_while(|_| self.alloc()).collect();
                match how {
                    How::Bulk => put_bulk(got.into_iter().filter_map(|i| match i.buf {
                        Buf::Page(p) => Some(p),
                        _ => None,
                    })),
                    How::Spawned | How::Worker => on_spawned_thread(move || drop(got)),
                    How::Here => drop(got),
                }
            }
            Op::Sync {
                item,
                start,
                len,
                tag,
                to_device,
                ..
            } => self.sync(item, start, len, tag, to_device),
            Op::SyncOutOfRange { item, past, .. } => {
                let Some(i) = self.pick(item) else { return };
                let len = self.held[i].buf.len();
                let (s, e) = (usize::from(past) % len, len + 1 + usize::from(past));
                let got = match &mut self.held[i].buf {
                    Buf::Page(p) => p.sync_for_cpu(s..e),
                    Buf::Frag(f) => f.sync_for_device(s..e),
                    #[cfg(feature = "bytes")]
                    Buf::Bytes(_) => return,
                };
                assert_eq!(
                    got,
                    Err(SyncError::OutOfRange {
                        start: s,
                        end: e,
                        len
                    })
                );
            }
            Op::Check { item, .. } => {
                if let Some(i) = self.pick(item) {
                    self.held[i].check_content(&self.ctx("check"));
                }
            }
            Op::SetDirtyLen { item, len, .. } => {
                if let Some(i) = self.pick(item) {
                    if let Buf::Page(p) = &mut self.held[i].buf {
                        p.set_dirty_len(usize::from(len));
                    }
                }
            }
            #[cfg(feature = "bytes")]
            Op::IntoBytes { item, .. } => {
                if let Some(i) = self.pick(item) {
                    let it = self.held.swap_remove(i);
                    let buf = match it.buf {
                        Buf::Page(p) => Buf::Bytes(p.into_bytes()),
                        Buf::Frag(f) => Buf::Bytes(f.into_bytes()),
                        b => b,
                    };
                    let it = TItem { buf, ..it };
                    it.check_content(&self.ctx("into_bytes"));
                    self.held.push(it);
                }
            }
            #[cfg(feature = "bytes")]
            Op::CloneBytes { item, .. } => {
                if let Some(i) = self.pick(item) {
                    if let Buf::Bytes(b) = &self.held[i].buf {
                        let clone = TItem {
                            buf: Buf::Bytes(b.clone()),
                            direction: self.held[i].direction,
                            expect: self.held[i].expect,
                        };
                        self.held.push(clone);
                    }
                }
            }
            #[cfg(not(feature = "bytes"))]
            Op::IntoBytes { .. } | Op::CloneBytes { .. } => {}
            Op::DropPool { t } | Op::NewPool { t } if Op::flushes(t) => flush_thread_returns(),
            Op::DropPool { .. } => {
                drop(self.pool.take());
            }
            Op::NewPool { .. } => {
                if self.t < POOLS && self.pool.is_none() {
                    match build_pool(self.sh.device, &self.sh.cfg.pools[self.t], self.sh.source) {
                        Ok(pool) => self.pool = Some(pool),
                        Err(e) => assert_eq!(e, BuildError::Unbound, "{}", self.ctx("new pool")),
                    }
                }
            }
            Op::Unbind { .. } => {
                // A panicking unbind poisons the lock; the device is unbound
                // all the same.
                let _quiet = self.sh.sim.write().unwrap_or_else(PoisonError::into_inner);
                if let Ok(report) = self.sh.device.unbind() {
                    assert_eq!(report.mappings_left, 0, "{}", self.ctx("unbind"));
                }
                assert_eq!(
                    self.sh.checking.live_mappings(),
                    0,
                    "{}",
                    self.ctx("after unbind")
                );
            }
            Op::FailMaps { n } => self.sh.checking.fail_next_maps(u64::from(n % 4)),
            Op::FailPageAllocs { n } => self.sh.source.fail_next(usize::from(n % 4)),
            Op::ArmPanic { at } => {
                drop(self.sh.faults.disarm());
                drop(self.sh.faults.arm_panic(at));
            }
            Op::ArmDrop { item, at, .. } => {
                if let Some(i) = self.pick(item) {
                    let it = self.held.swap_remove(i);
                    drop(self.sh.faults.disarm());
                    drop(self.sh.faults.arm_drop(at, Box::new(it)));
                }
            }
        }
        if self.sh.checking.verdict().violations != 0 {
            panic!(
                "{}: violations:\n{}",
                self.ctx(&format!("after {op:?}")),
                self.sh.checking.report()
            );
        }
    }

    fn sync(&mut self, item: u8, start: u16, len: u16, tag: u8, to_device: bool) {
        let Some(i) = self.pick(item) else { return };
        let ctx = self.ctx("sync");
        let sh = self.sh;
        let it = &mut self.held[i];
        let (s, n) = range_in(it.buf.len(), start, len);
        let r = s..s + n;
        let data = vec![tag; n];
        let device_writes = device_writes(it.direction, to_device);
        let Some(b) = it.buf.syncable() else {
            // A `Bytes` is immutable: just a read.
            return it.check_content(&ctx);
        };
        let at = b.dma().offset(s as u64);
        let synced = if device_writes {
            let written = {
                let _sim = sh.sim.read().unwrap_or_else(PoisonError::into_inner);
                !sh.checking.is_unbound()
                    && sh
                        .checking
                        .device_write(at, &data)
                        .map(|()| true)
                        .unwrap_or_else(|v| panic!("{ctx}: device write: {v}"))
            };
            // An injected panic comes after the backend made the sync: the
            // content moved all the same.
            match catching(|| b.for_cpu(r.clone())).unwrap_or(Ok(())) {
                Ok(()) => {
                    assert!(written, "{ctx}: sync_for_cpu succeeded after unbind");
                    true
                }
                Err(SyncError::Unbound) => false,
                Err(e) => panic!("{ctx}: sync_for_cpu: {e}"),
            }
        } else {
            b.write()[r.clone()].copy_from_slice(&data);
            match catching(|| b.for_device(r.clone())).unwrap_or(Ok(())) {
                Ok(()) => {
                    let _sim = sh.sim.read().unwrap_or_else(PoisonError::into_inner);
                    if !sh.checking.is_unbound() {
                        let got = sh
                            .checking
                            .device_read(at, n)
                            .unwrap_or_else(|v| panic!("{ctx}: device read: {v}"));
                        assert!(got == data, "{ctx}: the device read other bytes");
                    }
                }
                Err(SyncError::Unbound) => {}
                Err(e) => panic!("{ctx}: sync_for_device: {e}"),
            }
            true
        };
        if !synced {
            // Unbound: the CPU owns the memory for good; write it directly.
            b.write()[r].copy_from_slice(&data);
        }
        it.expect = Some((s, n, tag));
        it.check_content(&ctx);
    }
}

/// Runs the ops of each logical thread on a real OS thread of its own, all
/// concurrently (ops without a thread, like unbind, go to thread
/// `index % THREADS`). No model: the checks are zero violations after every
/// op, content after every sync that succeeded, and at the end (everything
/// dropped) every block freed exactly once and no mapping left.
// `tests/state_machine.rs` runs only the deterministic harness.
#[allow(dead_code)]
pub fn run_threaded(cfg: &Config, ops: &[Op]) {
    discard_leftover_returns();
    let World {
        checking,
        faults,
        source,
        device,
    } = World::new(cfg);
    let sim = RwLock::new(());
    let mut per_thread: [Vec<Op>; THREADS] = Default::default();
    for (i, op) in ops.iter().enumerate() {
        let t = match *op {
            Op::Alloc { t }
            | Op::AllocFrag { t, .. }
            | Op::RecycleDirect { t, .. }
            | Op::Drop { t, .. }
            | Op::Send { t, .. }
            | Op::PutBulk { t, .. }
            | Op::FillRing { t, .. }
            | Op::Sync { t, .. }
            | Op::SyncOutOfRange { t, .. }
            | Op::Check { t, .. }
            | Op::SetDirtyLen { t, .. }
            | Op::IntoBytes { t, .. }
            | Op::CloneBytes { t, .. }
            | Op::DropPool { t }
            | Op::NewPool { t }
            | Op::ArmDrop { t, .. } => usize::from(t) % THREADS,
            Op::Unbind { .. }
            | Op::FailMaps { .. }
            | Op::FailPageAllocs { .. }
            | Op::ArmPanic { .. } => i % THREADS,
        };
        per_thread[t].push(*op);
    }
    let (inboxes, mut receivers): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| mpsc::channel()).unzip();
    let shared = Shared {
        cfg,
        checking: &checking,
        faults: &faults,
        source: &source,
        device: &device,
        sim: &sim,
        inboxes,
    };
    let mut pools: Vec<Option<PagePool>> = cfg
        .pools
        .iter()
        .map(|c| Some(build_pool(&device, c, &source).expect("valid config")))
        .collect();
    let leftovers: Vec<(Vec<TItem>, Option<PagePool>, mpsc::Receiver<TItem>)> =
        thread::scope(|s| {
            let handles: Vec<_> = per_thread
                .iter()
                .enumerate()
                .map(|(t, my_ops)| {
                    let mut actor = Actor {
                        t,
                        sh: &shared,
                        pool: pools.get_mut(t).and_then(Option::take),
                        held: Vec::new(),
                        inbox: receivers.remove(0),
                    };
                    s.spawn(move || {
                        for op in my_ops {
                            // An injected panic ends the op; the next one
                            // runs (any other panic is a failure).
                            let _ = catching(|| actor.exec(op));
                        }
                        (actor.held, actor.pool, actor.inbox)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
    drop(shared);
    // A fault that never fired: its buffer comes back like any other.
    drop(faults.disarm());
    for (held, pool, inbox) in leftovers {
        drop(held);
        drop(inbox.try_iter().collect::<Vec<_>>());
        drop(pool);
    }
    drop(device);
    // The actor threads handed their batches back as they exited; this
    // thread's (pages dropped above) go now, not in the next run on it.
    flush_thread_returns();
    assert_torn_down(&source, &checking);
}
