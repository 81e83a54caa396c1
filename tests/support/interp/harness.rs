//! [`run`]: the deterministic runner. Every op runs on the calling OS
//! thread, except that drops may really happen on a spawned thread (spawn +
//! join) or on a worker thread (send + wait), unbind may run on a spawned
//! thread, and the worker may flush its remote returns. Each pool call runs
//! under `catch_unwind` next to the model's prediction of it, the model
//! told which OS thread makes it (remote returns wait in per-thread
//! batches); after every op the [`Harness`] compares everything observable
//! with the model.
//!
//! Invariants: the real pools and the model see the same calls in the same
//! order, on the same OS threads; every buffer a logical thread holds is a
//! [`Held`] whose key (its page's device address at allocation, never
//! reused by the checking device) names its page in the model; a buffer in
//! the fault slot belongs to the thread that armed it until the fault
//! fires; a run starts and ends with the calling thread's batches empty
//! (the proptest runs every case on one thread).

use std::any::Any;
use std::collections::HashSet;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread;

use pagepool::checking::CheckingDevice;
use pagepool::{
    flush_thread_returns, put_bulk, BuildError, Device, DmaOps, Page, PagePool, SyncError,
    UnbindError,
};

use super::buffers::{device_writes, drop_each, range_in, Buf, SyncBuf, Under};
use super::faults::{catching, on_spawned_thread, Faults, FaultyPages, Injected};
use super::model::{ExpectedUnbind, Fail, ItemModel, Model, Step, Th, TrapModel};
use super::ops::{Callback, Config, How, Op, UnbindHow};
use super::setup::{assert_torn_down, build_pool, World};
use super::{discard_leftover_returns, POOLS, THREADS};

/// A buffer held by a logical thread, with what the model knows of it.
struct Held {
    buf: Buf,
    /// Model index of its pool.
    pool: usize,
    /// The page's device address at allocation (unique: the checking device
    /// never reuses an address), naming the page in the model.
    key: u64,
    /// For `Bytes`: the clone group and what the group owns.
    group: Option<(u64, Under)>,
    /// The last range written and synced: (start, len, byte).
    expect: Option<(usize, usize, u8)>,
    /// The page's dirty length (`Page::set_dirty_len`; `usize::MAX` until
    /// set): whether its sync on recycle makes a device call.
    dirty: usize,
}

impl Held {
    fn check_content(&self, ctx: &str) {
        self.buf.check_content(self.expect, ctx);
    }

    fn model(&self) -> ItemModel {
        ItemModel {
            pool: self.pool,
            key: self.key,
            kind: self.buf.kind(),
            group: self.group,
            dirty: self.dirty,
        }
    }
}

/// What the worker is asked to do.
enum Job {
    /// Drop the buffer.
    Drop(Buf),
    /// `pagepool::flush_thread_returns()`.
    Flush,
}

/// A long-lived thread that drops what it is sent (or flushes its remote
/// returns); a job that panics is reported back to the sender. Dropping it
/// ends the thread and waits for it, its exit hand-back included.
struct Worker {
    tx: Option<mpsc::Sender<Job>>,
    ack: mpsc::Receiver<Option<Box<dyn Any + Send>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Worker {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ack_tx, ack) = mpsc::channel();
        let handle = thread::spawn(move || {
            for job in rx {
                let panicked = catch_unwind(AssertUnwindSafe(|| match job {
                    Job::Drop(buf) => drop(buf),
                    Job::Flush => flush_thread_returns(),
                }))
                .err();
                if ack_tx.send(panicked).is_err() {
                    break;
                }
            }
        });
        Self {
            tx: Some(tx),
            ack,
            handle: Some(handle),
        }
    }

    /// Runs `job` on the worker; a panic there goes on here.
    fn run(&self, job: Job) {
        self.tx.as_ref().unwrap().send(job).expect("worker alive");
        if let Some(payload) = self.ack.recv().expect("worker acknowledges") {
            resume_unwind(payload);
        }
    }
}

impl Drop for Worker {
    /// Ends the thread and joins it: its batches are handed back as it
    /// exits (a panic there is stopped by the pool, not reported here).
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            // A panic in the worker (a pool bug) is reported here, unless
            // we are already unwinding.
            if h.join().is_err() && !thread::panicking() {
                panic!("the worker thread panicked");
            }
        }
    }
}

// ---------------------------------------------------------------------------

/// Panics unless the pool call and the model agree on whether an injected
/// panic came out, and which.
fn agree(ctx: &str, got: Result<(), Injected>, want: Step) {
    assert_eq!(
        got, want,
        "{ctx}: real (left) and model (right) disagree on an injected panic"
    );
}

/// Runs ops one at a time and checks the model after each.
struct Harness {
    cfg: Config,
    checking: CheckingDevice,
    faults: Faults,
    source: FaultyPages,
    device: Option<Device>,
    pools: [Option<(PagePool, usize)>; POOLS],
    held: [Vec<Held>; THREADS],
    /// The thread whose buffer sits in the fault slot (it gets the buffer
    /// back if the fault is replaced before it fires).
    armed_by: Option<usize>,
    worker: Option<Worker>,
    model: Model,
    step: usize,
}

impl Harness {
    /// A device with every pool slot built.
    fn new(cfg: Config) -> Self {
        discard_leftover_returns();
        let World {
            checking,
            faults,
            source,
            device,
        } = World::new(&cfg);
        // The model derives each pool's remote batch from its configuration:
        // a pool that syncs on recycle does not batch, on a device that
        // needs syncs.
        assert!(
            DmaOps::needs_sync(&checking),
            "the model expects a checking device that needs syncs"
        );
        let mut model = Model {
            bound: true,
            ..Model::default()
        };
        let pools = [0, 1].map(|i| {
            let pool = build_pool(&device, &cfg.pools[i], &source).expect("valid config");
            Some((pool, model.new_pool(cfg.pools[i])))
        });
        let h = Self {
            cfg,
            checking,
            faults,
            source,
            device: Some(device),
            pools,
            held: Default::default(),
            armed_by: None,
            worker: None,
            model,
            step: 0,
        };
        h.check("start");
        h
    }

    fn pool_of(&mut self, t: u8) -> Option<(&mut PagePool, usize)> {
        let slot = usize::from(t) % THREADS;
        self.pools
            .get_mut(slot)?
            .as_mut()
            .map(|(pool, m)| (pool, *m))
    }

    fn item(&self, t: u8, item: u8) -> Option<(usize, usize)> {
        let t = usize::from(t) % THREADS;
        let n = self.held[t].len();
        (n > 0).then(|| (t, usize::from(item) % n))
    }

    fn worker(&mut self) -> &Worker {
        if self.worker.is_none() {
            assert!(
                self.model.batches[Th::Worker as usize].is_empty(),
                "model: a new worker starts with empty batches"
            );
        }
        self.worker.get_or_insert_with(Worker::new)
    }

    /// Drops `held` as `how` says and updates the model.
    fn drop_held(&mut self, held: Held, how: How) {
        let ctx = self.ctx("drop");
        let item = held.model();
        let buf = held.buf;
        let bulk = how == How::Bulk && matches!(buf, Buf::Page(_));
        if how == How::Worker {
            // Started before the model follows the drop onto it.
            self.worker();
        }
        let want = match how {
            _ if bulk => self.model.put_bulk(&[(item.pool, item.key, item.dirty)]),
            How::Spawned => self.model.on_spawned(|m| m.dropped(&item)),
            How::Worker => self.model.on(Th::Worker, |m| m.dropped(&item)),
            How::Here | How::Bulk => self.model.dropped(&item),
        };
        let got = match (how, buf) {
            (How::Spawned, buf) => catching(|| on_spawned_thread(move || drop(buf))),
            (How::Worker, buf) => {
                let worker = self.worker();
                catching(|| worker.run(Job::Drop(buf)))
            }
            (How::Bulk, Buf::Page(page)) => catching(|| put_bulk([page])),
            (_, buf) => catching(|| drop(buf)),
        };
        agree(&ctx, got, want);
    }

    /// Allocates one page from pool slot `t` for thread `t`: kept by the
    /// thread (`keep`) or handed back.
    fn alloc_into(&mut self, t: u8, keep: bool) -> Option<Held> {
        let ctx = self.ctx("alloc");
        let (pool, m) = self.pool_of(t)?;
        let got = catching(|| pool.alloc());
        let want = self.model.alloc(m);
        match (got, want) {
            (Ok(Ok(page)), Ok(())) => {
                let key = page.dma_addr().0;
                let held = Held {
                    buf: Buf::Page(page),
                    pool: m,
                    key,
                    group: None,
                    expect: None,
                    dirty: usize::MAX,
                };
                if keep {
                    self.held[usize::from(t) % THREADS].push(held);
                    None
                } else {
                    Some(held)
                }
            }
            (Ok(Err(e)), Err(Fail::Alloc(w))) => {
                assert_eq!(e, w, "{ctx}: wrong error");
                None
            }
            (Err(injected), Err(Fail::Panicked(w))) => {
                assert_eq!(injected, w, "{ctx}: another callback panicked");
                None
            }
            (got, want) => panic!(
                "{ctx}: got {:?}, model says {want:?}",
                got.map(|r| r.map(|p| p.dma_addr()))
            ),
        }
    }

    fn ctx(&self, what: &str) -> String {
        format!("step {} ({what})", self.step)
    }

    /// Runs one op, then checks the model.
    fn apply(&mut self, op: &Op) {
        self.step += 1;
        self.exec(op);
        self.check(&format!("after {op:?}"));
    }

    /// Takes the armed fault out of the slot (real and model); a buffer it
    /// held goes back to the thread that armed it.
    fn disarm(&mut self) {
        if let Some(item) = self.faults.disarm() {
            let held = *item.downcast::<Held>().expect("the slot holds a Held");
            let t = self.armed_by.expect("armed by a thread");
            self.held[t].push(held);
        }
        self.armed_by = None;
        self.model.trap = None;
    }

    fn exec(&mut self, op: &Op) {
        match *op {
            Op::Alloc { t } => {
                self.alloc_into(t, true);
            }
            Op::AllocFrag { t, size } => self.alloc_frag(t, usize::from(size)),
            Op::RecycleDirect { t, item } => {
                let Some((ti, i)) = self.item(t, item) else {
                    return;
                };
                if !matches!(self.held[ti][i].buf, Buf::Page(_)) {
                    return;
                }
                let Some((_, target)) = self.pool_of(t) else {
                    return;
                };
                let ctx = self.ctx("recycle_direct");
                let held = self.held[ti].swap_remove(i);
                let want = self
                    .model
                    .ret_direct(target, held.pool, held.key, held.dirty);
                let Buf::Page(page) = held.buf else {
                    unreachable!()
                };
                let (pool, _) = self.pool_of(t).expect("checked");
                let got = catching(|| pool.recycle_direct(page));
                agree(&ctx, got, want);
            }
            Op::Drop { t, item, how } => {
                if let Some((ti, i)) = self.item(t, item) {
                    let held = self.held[ti].swap_remove(i);
                    self.drop_held(held, how);
                }
            }
            Op::Send { t, item, to } => {
                if let Some((ti, i)) = self.item(t, item) {
                    let held = self.held[ti].swap_remove(i);
                    self.held[usize::from(to) % THREADS].push(held);
                }
            }
            Op::PutBulk { t, n } => {
                let ti = usize::from(t) % THREADS;
                let mut pages = Vec::new();
                let mut models = Vec::new();
                let mut i = 0;
                while i < self.held[ti].len() && pages.len() <= usize::from(n % 8) {
                    if matches!(self.held[ti][i].buf, Buf::Page(_)) {
                        let held = self.held[ti].remove(i);
                        models.push((held.pool, held.key, held.dirty));
                        let Buf::Page(page) = held.buf else {
                            unreachable!()
                        };
                        pages.push(page);
                    } else {
                        i += 1;
                    }
                }
                let ctx = self.ctx("put_bulk");
                let want = self.model.put_bulk(&models);
                let got = catching(|| put_bulk(pages));
                agree(&ctx, got, want);
            }
            Op::FillRing { t, extra, how } => {
                if self.pool_of(t).is_none() {
                    return;
                }
                let slot = usize::from(t) % THREADS;
                let n = self.cfg.pools[slot].ring_size + 1 + usize::from(extra % 3);
                let mut got = Vec::new();
                for _ in 0..n {
                    match self.alloc_into(t, false) {
                        Some(h) => got.push(h),
                        None => break,
                    }
                }
                let ctx = self.ctx("fill ring");
                match how {
                    How::Spawned => {
                        let want = self.model.on_spawned(|m| {
                            let mut want = Ok(());
                            for h in &got {
                                let w = m.dropped(&h.model());
                                want = want.and(w);
                            }
                            want
                        });
                        let bufs: Vec<Buf> = got.into_iter().map(|h| h.buf).collect();
                        let r = catching(|| on_spawned_thread(move || drop_each(bufs)));
                        agree(&ctx, r, want);
                    }
                    How::Bulk => {
                        let models: Vec<_> = got.iter().map(|h| (h.pool, h.key, h.dirty)).collect();
                        let want = self.model.put_bulk(&models);
                        let pages: Vec<Page> = got
                            .into_iter()
                            .filter_map(|h| match h.buf {
                                Buf::Page(p) => Some(p),
                                _ => None,
                            })
                            .collect();
                        let r = catching(|| put_bulk(pages));
                        agree(&ctx, r, want);
                    }
                    How::Here | How::Worker => {
                        for h in got {
                            self.drop_held(h, how);
                        }
                    }
                }
            }
            Op::Sync {
                t,
                item,
                start,
                len,
                tag,
                to_device,
            } => self.sync(t, item, start, len, tag, to_device),
            Op::SyncOutOfRange { t, item, past } => {
                let Some((ti, i)) = self.item(t, item) else {
                    return;
                };
                let before = self.checking.stats();
                let ctx = self.ctx("sync out of range");
                let h = &mut self.held[ti][i];
                let len = h.buf.len();
                // Odd `past`: a reversed range; even: one running past the end.
                let (s, e) = if past % 2 == 1 {
                    (2 + usize::from(past) % len, 1)
                } else {
                    (usize::from(past) % len, len + 1 + usize::from(past))
                };
                let want = Err(SyncError::OutOfRange {
                    start: s,
                    end: e,
                    len,
                });
                #[allow(clippy::reversed_empty_ranges)]
                let range = s..e;
                let got = match &mut h.buf {
                    Buf::Page(p) if to_cpu(past) => p.sync_for_cpu(range),
                    Buf::Page(p) => p.sync_for_device(range),
                    Buf::Frag(f) if to_cpu(past) => f.sync_for_cpu(range),
                    Buf::Frag(f) => f.sync_for_device(range),
                    #[cfg(feature = "bytes")]
                    Buf::Bytes(_) => return,
                };
                assert_eq!(got, want, "{ctx}");
                let after = self.checking.stats();
                assert_eq!(
                    (before.syncs_for_cpu, before.syncs_for_device),
                    (after.syncs_for_cpu, after.syncs_for_device),
                    "{ctx}: a rejected sync reached the device"
                );
            }
            Op::Check { t, item } => {
                if let Some((ti, i)) = self.item(t, item) {
                    let ctx = self.ctx("check");
                    self.held[ti][i].check_content(&ctx);
                }
            }
            Op::SetDirtyLen { t, item, len } => {
                if let Some((ti, i)) = self.item(t, item) {
                    let h = &mut self.held[ti][i];
                    if let Buf::Page(p) = &mut h.buf {
                        p.set_dirty_len(usize::from(len));
                        h.dirty = usize::from(len);
                    }
                }
            }
            Op::IntoBytes { t, item } => self.convert_to_bytes(t, item),
            Op::CloneBytes { t, item } => self.clone_bytes(t, item),
            Op::DropPool { t } if Op::flushes(t) => self.flush_main(),
            Op::NewPool { t } if Op::flushes(t) => self.flush_worker(),
            Op::DropPool { t } => {
                let slot = usize::from(t) % THREADS;
                if let Some((pool, m)) = self.pools.get_mut(slot).and_then(Option::take) {
                    let ctx = self.ctx("drop pool");
                    let want = self.model.drop_pool(m);
                    let got = catching(|| drop(pool));
                    agree(&ctx, got, want);
                }
            }
            Op::NewPool { t } => {
                let slot = usize::from(t) % THREADS;
                if slot >= POOLS || self.pools[slot].is_some() {
                    return;
                }
                let Some(device) = &self.device else {
                    return;
                };
                let got = build_pool(device, &self.cfg.pools[slot], &self.source);
                let ctx = self.ctx("new pool");
                match got {
                    Ok(pool) => {
                        assert!(self.model.bound, "{ctx}: built a pool on an unbound device");
                        let m = self.model.new_pool(self.cfg.pools[slot]);
                        self.pools[slot] = Some((pool, m));
                    }
                    Err(e) => {
                        assert!(!self.model.bound, "{ctx}: {e}");
                        assert_eq!(e, BuildError::Unbound, "{ctx}");
                    }
                }
            }
            Op::Unbind { how } => self.unbind(how),
            Op::FailMaps { n } => {
                let n = n % 4;
                self.checking.fail_next_maps(u64::from(n));
                self.model.map_fail = u64::from(n);
            }
            Op::FailPageAllocs { n } => {
                let n = n % 4;
                self.source.fail_next(usize::from(n));
                self.model.src_fail = u64::from(n);
            }
            Op::ArmPanic { at } => {
                self.disarm();
                let displaced = self.faults.arm_panic(at);
                assert!(displaced.is_none(), "disarmed just before");
                self.model.trap = Some(TrapModel::Panic(at));
            }
            Op::ArmDrop { t, item, at } => {
                let Some((ti, i)) = self.item(t, item) else {
                    return;
                };
                self.disarm();
                let held = self.held[ti].swap_remove(i);
                let model = held.model();
                let displaced = self.faults.arm_drop(at, Box::new(held));
                assert!(displaced.is_none(), "disarmed just before");
                self.model.trap = Some(TrapModel::Drop(at, model));
                self.armed_by = Some(ti);
            }
        }
    }

    /// `flush_thread_returns()` on the main thread.
    fn flush_main(&mut self) {
        let ctx = self.ctx("flush");
        let want = self.model.flush();
        let got = catching(flush_thread_returns);
        agree(&ctx, got, want);
    }

    /// `flush_thread_returns()` on the worker, if it was started (a worker
    /// not started yet has nothing to give back).
    fn flush_worker(&mut self) {
        let ctx = self.ctx("flush on the worker");
        let Some(worker) = &self.worker else {
            return;
        };
        let want = self.model.on(Th::Worker, Model::flush);
        let got = catching(|| worker.run(Job::Flush));
        agree(&ctx, got, want);
    }

    /// Ends the worker thread, if it was started: its exit hands back its
    /// batches (a panic there stays in the worker).
    fn end_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.model.on(Th::Worker, Model::thread_exit);
            drop(worker);
        }
    }

    fn alloc_frag(&mut self, t: u8, size: usize) {
        let ctx = self.ctx("alloc_frag");
        let Some((pool, m)) = self.pool_of(t) else {
            return;
        };
        let got = catching(|| pool.alloc_frag(size));
        let want = self.model.alloc_frag(m, size);
        match (got, want) {
            (Ok(Ok(frag)), Ok(same_page)) => {
                assert_eq!(frag.len(), size, "{ctx}");
                let offset = frag.offset();
                let key = frag.dma_addr().0 - offset as u64;
                match same_page {
                    Some((k, o)) => {
                        assert_eq!((key, offset), (k, o), "{ctx}: fragment placed wrongly")
                    }
                    None => {
                        assert_eq!(offset, 0, "{ctx}: a new fragment page starts at 0");
                        self.model.frag_new_page(m, key, size);
                    }
                }
                self.held[usize::from(t) % THREADS].push(Held {
                    buf: Buf::Frag(frag),
                    pool: m,
                    key,
                    group: None,
                    expect: None,
                    dirty: usize::MAX,
                });
            }
            (Ok(Err(e)), Err(Fail::Alloc(w))) => assert_eq!(e, w, "{ctx}: wrong error"),
            (Err(injected), Err(Fail::Panicked(w))) => {
                assert_eq!(injected, w, "{ctx}: another callback panicked")
            }
            (got, want) => panic!(
                "{ctx}: got {:?}, model says {want:?}",
                got.map(|r| r.map(|f| f.dma_addr()))
            ),
        }
    }

    fn sync(&mut self, t: u8, item: u8, start: u16, len: u16, tag: u8, to_device: bool) {
        let Some((ti, i)) = self.item(t, item) else {
            return;
        };
        let ctx = self.ctx("sync");
        let bound = self.model.bound;
        let h = &self.held[ti][i];
        if h.buf.is_bytes() {
            // Immutable: just a read.
            return h.check_content(&ctx);
        }
        let direction = self.model.pools[h.pool].cfg.direction;
        let (s, n) = range_in(h.buf.len(), start, len);
        let device_writes = device_writes(direction, to_device);
        // One device call while bound (the range is never empty).
        let want = if !bound {
            Ok(())
        } else if device_writes {
            self.model.hit(Callback::SyncForCpu)
        } else {
            self.model.hit(Callback::SyncForDevice)
        };
        let checking = self.checking.clone();
        let h = &mut self.held[ti][i];
        let data = vec![tag; n];
        let r = s..s + n;
        let b = h.buf.syncable().expect("a `Bytes` is handled above");
        let got = sync_one(&ctx, &checking, bound, device_writes, b, &data, r);
        agree(&ctx, got, want);
        // A sync that panicked after the backend made it counts as made:
        // the content moved either way.
        h.expect = Some((s, n, tag));
        h.check_content(&ctx);
    }

    #[cfg(feature = "bytes")]
    fn convert_to_bytes(&mut self, t: u8, item: u8) {
        let Some((ti, i)) = self.item(t, item) else {
            return;
        };
        if matches!(self.held[ti][i].buf, Buf::Bytes(_)) {
            return;
        }
        let ctx = self.ctx("into_bytes");
        let mut held = self.held[ti].swap_remove(i);
        let len = held.buf.len();
        let (bytes, under) = match held.buf {
            Buf::Page(p) => (p.into_bytes(), Under::Page),
            Buf::Frag(f) => (f.into_bytes(), Under::Frag),
            Buf::Bytes(_) => unreachable!(),
        };
        assert_eq!(bytes.len(), len, "{ctx}");
        let g = self.model.next_group;
        self.model.next_group += 1;
        self.model.groups.insert(g, 1);
        held.buf = Buf::Bytes(bytes);
        held.group = Some((g, under));
        held.check_content(&ctx);
        self.held[ti].push(held);
    }

    #[cfg(not(feature = "bytes"))]
    fn convert_to_bytes(&mut self, _: u8, _: u8) {}

    #[cfg(feature = "bytes")]
    fn clone_bytes(&mut self, t: u8, item: u8) {
        let Some((ti, i)) = self.item(t, item) else {
            return;
        };
        let h = &self.held[ti][i];
        let (Buf::Bytes(b), Some((g, under))) = (&h.buf, h.group) else {
            return;
        };
        let clone = Held {
            buf: Buf::Bytes(b.clone()),
            pool: h.pool,
            key: h.key,
            group: Some((g, under)),
            expect: h.expect,
            dirty: h.dirty,
        };
        *self.model.groups.get_mut(&g).expect("group known") += 1;
        self.held[ti].push(clone);
    }

    #[cfg(not(feature = "bytes"))]
    fn clone_bytes(&mut self, _: u8, _: u8) {}

    fn unbind(&mut self, how: UnbindHow) {
        let ctx = self.ctx("unbind");
        let Some(device) = &self.device else {
            return;
        };
        if !self.model.bound {
            if how == UnbindHow::DropDevice {
                self.device = None;
            } else {
                assert_eq!(device.unbind(), Err(UnbindError::AlreadyUnbound), "{ctx}");
            }
            return;
        }
        let want = match how {
            UnbindHow::OtherThread => self.model.on_spawned(Model::unbind),
            UnbindHow::Call | UnbindHow::DropDevice => self.model.unbind(),
        };
        let got = match how {
            UnbindHow::Call => catching(|| device.unbind().map(Some)),
            UnbindHow::OtherThread => catching(|| on_spawned_thread(|| device.unbind()).map(Some)),
            UnbindHow::DropDevice => {
                let device = self.device.take();
                catching(|| drop(device)).map(|()| Ok(None))
            }
        };
        let report = match (got, want) {
            (Ok(Ok(report)), Ok(want)) => report.map(|r| (r, want)),
            (Ok(Err(e)), _) => panic!("{ctx}: {e}"),
            (Err(injected), Err(w)) => {
                assert_eq!(injected, w, "{ctx}: another callback panicked");
                None
            }
            (got, want) => panic!("{ctx}: got {got:?}, model says {want:?}"),
        };
        if let Some((report, want)) = report {
            let got = ExpectedUnbind {
                pools: report.pools,
                pages_from_rings: report.pages_from_rings,
                pages_held_or_cached: report.pages_held_or_cached,
                bytes_unmapped: report.bytes_unmapped,
            };
            assert_eq!(got, want, "{ctx}: unbind report {report}");
            assert_eq!(report.mappings_left, 0, "{ctx}");
        }
    }

    /// Compares everything observable with the model.
    fn check(&self, what: &str) {
        let ctx = format!("step {} {what}", self.step);
        let verdict = self.checking.verdict();
        if verdict.violations != 0 {
            panic!("{ctx}: violations:\n{}", self.checking.report());
        }
        let m = &self.model;
        assert!(
            !m.unwinding && !m.unbinding && m.deferred.is_empty(),
            "{ctx}: model left mid-call"
        );
        assert!(
            m.thread == Th::Main
                && m.batches.iter().all(|b| !b.exiting)
                && m.batches[Th::Spawned as usize].is_empty(),
            "{ctx}: model left on another thread"
        );
        assert_eq!(
            self.faults.armed(),
            m.trap.as_ref().map(TrapModel::at),
            "{ctx}: armed fault: real (left) vs model (right): it fired in another call"
        );
        assert_eq!(
            self.checking.live_mappings(),
            m.mapped(),
            "{ctx}: live mappings (checking device) vs model; model {m:#?}"
        );
        assert_eq!(self.checking.is_unbound(), !m.bound, "{ctx}: unbound?");
        if let Some(device) = &self.device {
            assert_eq!(device.is_bound(), m.bound, "{ctx}");
            assert_eq!(device.tracked_mappings(), m.mapped(), "{ctx}: tracker");
            let open = m.pools.iter().filter(|p| p.registered).count();
            assert_eq!(device.pools().len(), open, "{ctx}: registered pools");
        }
        let blocks = self.source.counting();
        assert_eq!(blocks.double_frees(), 0, "{ctx}: a page was freed twice");
        assert_eq!(blocks.allocated(), m.allocated, "{ctx}: blocks allocated");
        assert_eq!(blocks.freed(), m.freed, "{ctx}: blocks freed");
        assert_eq!(blocks.live(), m.blocks(), "{ctx}: blocks live");
        for (pool, mi) in self.pools.iter().flatten() {
            let p = &m.pools[*mi];
            let stats = pool.stats();
            assert_eq!(
                stats.pages_held, p.out as u64,
                "{ctx}: pool {mi} pages in flight; stats {stats:#?}, model {p:#?}"
            );
            assert_eq!(
                stats.pages_mapped, p.mapped as u64,
                "{ctx}: pool {mi} pages mapped; stats {stats:#?}, model {p:#?}"
            );
            assert_eq!(pool.cached(), p.cache, "{ctx}: pool {mi} cached");
        }
        // Pages held: a pool's pages out are exactly those behind a held
        // buffer, its current fragment page, the armed fault's buffer, and
        // those waiting in a thread's batch.
        let mut out: Vec<HashSet<u64>> = vec![HashSet::new(); m.pools.len()];
        for h in self.held.iter().flatten() {
            out[h.pool].insert(h.key);
        }
        for (pool, key) in m.batched() {
            assert!(
                out[pool].insert(key),
                "{ctx}: pool {pool}: page {key:#x} both batched and held"
            );
        }
        if let Some(TrapModel::Drop(_, item)) = &m.trap {
            out[item.pool].insert(item.key);
        }
        for (mi, p) in m.pools.iter().enumerate() {
            if let Some((key, _)) = p.frag {
                out[mi].insert(key);
            }
            assert_eq!(
                out[mi].len(),
                p.out,
                "{ctx}: pool {mi}: pages behind held buffers vs model pages out"
            );
        }
    }

    /// Drops everything (held buffers, the worker, pools, the device, then
    /// the armed fault's buffer if it never fired), then flushes this
    /// thread's remote returns, with checks after each step; then the final
    /// checks: every page block freed exactly once, no mapping left, zero
    /// violations, no page left in any thread's batch. A fault still armed
    /// acts during the teardown like anywhere else.
    fn finish(mut self) {
        for t in 0..THREADS {
            while let Some(h) = self.held[t].pop() {
                self.step += 1;
                self.drop_held(h, How::Here);
                self.check("teardown: drop held");
            }
        }
        self.step += 1;
        self.end_worker();
        self.check("teardown: the worker exited");
        for t in 0..POOLS as u8 {
            self.apply(&Op::DropPool { t });
        }
        self.apply(&Op::Unbind {
            how: UnbindHow::DropDevice,
        });
        self.step += 1;
        let armed = self.faults.disarm();
        self.model.trap = None;
        if let Some(item) = armed {
            let held = *item.downcast::<Held>().expect("the slot holds a Held");
            self.drop_held(held, How::Here);
        }
        self.check("teardown: the armed fault's buffer");
        // Pages this thread kept back (also of pools dropped meanwhile, or
        // stashed by a drop inside a teardown callback) go home now, not in
        // the next run on this thread.
        self.step += 1;
        self.flush_main();
        self.check("teardown: flush");
        let m = &self.model;
        assert!(
            m.batches.iter().all(|b| b.is_empty()),
            "model: pages left in a batch"
        );
        assert!(m
            .pools
            .iter()
            .all(|p| p.out == 0 && p.mapped == 0 && p.blocks == 0));
        assert_torn_down(&self.source, &self.checking);
    }
}

fn to_cpu(past: u16) -> bool {
    past & 2 == 0
}

/// One transfer of `data` into range `r` of `b`. `device_writes`: the
/// device writes it and the CPU syncs it in; else the CPU writes it, syncs
/// it out, and the device must read exactly it. After unbind: the sync
/// fails with `Unbound` and the CPU, which now owns the memory for good,
/// writes it. Returns the injected panic of the sync call, if any (the
/// sync was made before it: the transfer is checked all the same).
fn sync_one(
    ctx: &str,
    checking: &CheckingDevice,
    bound: bool,
    device_writes: bool,
    b: &mut dyn SyncBuf,
    data: &[u8],
    r: Range<usize>,
) -> Result<(), Injected> {
    let at = b.dma().offset(r.start as u64);
    if !bound {
        let got = if device_writes {
            b.for_cpu(r.clone())
        } else {
            b.for_device(r.clone())
        };
        assert_eq!(got, Err(SyncError::Unbound), "{ctx}");
        b.write()[r].copy_from_slice(data);
        return Ok(());
    }
    if device_writes {
        checking
            .device_write(at, data)
            .unwrap_or_else(|v| panic!("{ctx}: device write: {v}"));
        let got = catching(|| b.for_cpu(r));
        got.map(|res| res.unwrap_or_else(|e| panic!("{ctx}: sync_for_cpu: {e}")))
    } else {
        b.write()[r.clone()].copy_from_slice(data);
        let got = catching(|| b.for_device(r));
        let got = got.map(|res| res.unwrap_or_else(|e| panic!("{ctx}: sync_for_device: {e}")));
        let read = checking
            .device_read(at, data.len())
            .unwrap_or_else(|v| panic!("{ctx}: device read: {v}"));
        assert!(
            read == data,
            "{ctx}: the device read other bytes than the CPU synced"
        );
        got
    }
}

/// Runs `ops` deterministically with full model checks, then tears down.
pub fn run(cfg: &Config, ops: &[Op]) {
    let mut h = Harness::new(cfg.clone());
    for op in ops {
        h.apply(op);
    }
    h.finish();
}
