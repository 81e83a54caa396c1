//! Randomized schedule testing of whole-pool scenarios with
//! [shuttle](https://docs.rs/shuttle) (see README.md).
//!
//! Build and run only with `RUSTFLAGS="--cfg shuttle"`; without it this
//! crate is empty. Under `--cfg shuttle` the pool's `sync` module swaps
//! every primitive (atomics, fences, mutexes, yields, thread-locals, the
//! call gates' registry) for shuttle's, so shuttle controls every
//! interleaving of the real pool code and of the [`CheckingDevice`], which
//! is built on the same primitives.
//!
//! Where the loom models in `loom-tests/` prove each small race exhaustively
//! (2-4 threads, 3 preemptions), these scenarios run the whole pool at once
//! with 8-16 threads: owners allocating and recycling, holders cloning
//! `Bytes` and dropping pages, fragments and bulk returns, pools dropped
//! while their pages are held, a pool built while the device unbinds, and
//! `unbind` from its own thread. Each scenario runs a fixed number of
//! schedules, half under shuttle's PCT scheduler and half under its random
//! scheduler ([`explore`]), and checks every execution exactly
//! ([`World::finish`]).
#![cfg(shuttle)]

pub use pagepool;
pub use shuttle;

use core::cell::{Cell, RefCell};
use core::ptr::NonNull;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::panic::catch_unwind;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pagepool::checking::{CheckMode, CheckingDevice, CheckingStats};
use pagepool::{
    AllocError, BuildError, Device, DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, Frag,
    GlobalPages, OutOfMemory, Page, PagePool, PageSource, UnbindError, UnbindReport,
    UnmapBatchError, UnmapError, PAGE_SIZE,
};
use shuttle::rand::{thread_rng, Rng};
use shuttle::scheduler::{PctScheduler, RandomScheduler};
use shuttle::sync::mpsc;
use shuttle::thread::{self, ThreadId};

/// Schedules per scenario when `PAGEPOOL_SHUTTLE_ITERS` is not set: what
/// CI runs (see README.md for the time it takes).
pub const DEFAULT_SCHEDULES: usize = 2000;

/// Seed of the schedulers when `PAGEPOOL_SHUTTLE_SEED` is not set, so
/// that CI explores the same schedules every run; shuttle's own
/// `SHUTTLE_RANDOM_SEED` overrides both.
pub const DEFAULT_SEED: u64 = 0x7061_6765_706f_6f6c;

/// The PCT scheduler's bug depth: it inserts `depth - 1` priority changes
/// per execution, so depth 3 finds every bug that needs at most two
/// preemptions with a probability its paper bounds.
pub const PCT_DEPTH: usize = 3;

/// Schedules per scenario: `PAGEPOOL_SHUTTLE_ITERS`, else
/// [`DEFAULT_SCHEDULES`].
pub fn schedules() -> usize {
    env_number("PAGEPOOL_SHUTTLE_ITERS").map_or(DEFAULT_SCHEDULES, |n| n as usize)
}

/// The schedulers' seed: `PAGEPOOL_SHUTTLE_SEED` (decimal or `0x` hex),
/// else [`DEFAULT_SEED`].
pub fn seed() -> u64 {
    env_number("PAGEPOOL_SHUTTLE_SEED").unwrap_or(DEFAULT_SEED)
}

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={text:?} is not a number")))
}

std::thread_local! {
    /// The execution the running scenario is at, counted from 1 across
    /// both schedulers (for [`expect_found`]'s report). Shuttle runs every
    /// execution on the thread that called [`explore`], so a `std`
    /// thread-local of that thread keeps the tests of one binary, which run
    /// in parallel, apart.
    static EXECUTION: Cell<usize> = const { Cell::new(0) };

    /// Which outcomes the executions of the running scenario reached, and
    /// how often: a guard against a scenario that passes because its races
    /// never happen. Bookkeeping outside the schedule, as `EXECUTION`.
    static OUTCOMES: RefCell<BTreeMap<&'static str, usize>> = const { RefCell::new(BTreeMap::new()) };
}

/// Records that an execution reached `outcome`.
pub fn saw(outcome: &'static str) {
    OUTCOMES.with_borrow_mut(|outcomes| *outcomes.entry(outcome).or_default() += 1);
}

/// How many schedules a scenario explored, and how long it took.
#[derive(Clone, Debug)]
pub struct Explored {
    /// Executions under the PCT scheduler.
    pub pct: usize,
    /// Executions under the random scheduler.
    pub random: usize,
    /// Wall time of both.
    pub elapsed: Duration,
    /// How many executions reached each outcome ([`saw`]).
    pub outcomes: BTreeMap<&'static str, usize>,
}

impl Explored {
    /// Asserts that some execution reached each of `expected`, when the
    /// scenario ran at least [`DEFAULT_SCHEDULES`] schedules (a shorter
    /// run, asked for by hand, may miss the rarer ones: it says so).
    pub fn assert_seen(&self, expected: &[&'static str]) {
        if self.pct + self.random < DEFAULT_SCHEDULES {
            eprintln!("  (fewer than {DEFAULT_SCHEDULES} schedules: outcomes not checked)");
            return;
        }
        for outcome in expected {
            assert!(
                self.outcomes.contains_key(outcome),
                "no execution reached outcome {outcome:?}; seen: {:?}",
                self.outcomes
            );
        }
    }
}

/// Shuttle's configuration for every scenario: a larger stack than the
/// default 60 KiB, and no warnings about what shuttle does not model
/// (README.md says what that is).
fn config() -> shuttle::Config {
    let mut config = shuttle::Config::new();
    config.stack_size = 256 << 10;
    config.silence_warnings = true;
    config
}

/// Runs `scenario` for `schedules` schedules: the first half under the PCT
/// scheduler (depth [`PCT_DEPTH`]), the rest under the random scheduler,
/// both seeded with [`seed`]. Panics, with shuttle's replayable schedule
/// printed first, at the first execution that fails. Prints one line per
/// scenario (visible with `--nocapture`).
pub fn explore<F>(name: &str, schedules: usize, scenario: F) -> Explored
where
    F: Fn() + Send + Sync + 'static,
{
    let seed = seed();
    let scenario = Arc::new(scenario);
    let counted = |scenario: &Arc<F>| {
        let scenario = Arc::clone(scenario);
        move || {
            EXECUTION.set(EXECUTION.get() + 1);
            scenario();
        }
    };
    EXECUTION.set(0);
    OUTCOMES.take();
    let started = Instant::now();
    let pct_share = schedules.div_ceil(2);
    let pct = shuttle::Runner::new(
        PctScheduler::new_from_seed(seed, PCT_DEPTH, pct_share),
        config(),
    )
    .run(counted(&scenario));
    let random = shuttle::Runner::new(
        RandomScheduler::new_from_seed(seed, schedules - pct_share),
        config(),
    )
    .run(counted(&scenario));
    let explored = Explored {
        pct,
        random,
        elapsed: started.elapsed(),
        outcomes: OUTCOMES.take(),
    };
    eprintln!(
        "shuttle scenario {name}: {} schedules (PCT depth {PCT_DEPTH}: {pct}, random: {random}), seed {seed:#x}, {:.1?}\n  outcomes: {:?}",
        pct + random,
        explored.elapsed,
        explored.outcomes
    );
    explored
}

/// Counts of a [`CountingSource`], shared by every source of one world.
#[derive(Default)]
pub struct SourceCounts {
    allocs: AtomicU64,
    frees: AtomicU64,
}

/// Page memory from [`GlobalPages`], counted (shuttle tracks no
/// allocation), with one check on every free: the checker must not have
/// the block mapped any more (page memory is never freed while mapped). A
/// free of a mapped block panics with [`FREED_WHILE_MAPPED`] before the
/// memory is released.
///
/// Slow mode (`World::new(.., true)`): a free on any thread but the
/// unbinding one first yields until the device was released
/// (`on_unbind`). The pool never waits for a page source, so this only
/// stretches the time between a page's unmap and its free to the end of
/// the unbind that runs meanwhile, keeping the page's metadata alive
/// through unbind's tracker walk.
///
/// The counters are `std` atomics: bookkeeping, not part of the schedule.
pub struct CountingSource {
    checker: CheckingDevice,
    counts: Arc<SourceCounts>,
    slow_except: Option<Arc<Unbinder>>,
}

/// The message a [`CountingSource`] panics with when page memory is freed
/// while the device still has it mapped.
pub const FREED_WHILE_MAPPED: &str = "page memory freed while the device still has it mapped";

// SAFETY: every block comes from `GlobalPages` and goes back to it, once,
// unchanged; the counts and the check add nothing to the blocks' lifetimes.
unsafe impl PageSource for CountingSource {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        let block = GlobalPages.alloc_pages(order)?;
        self.counts.allocs.fetch_add(1, SeqCst);
        Ok(block)
    }

    unsafe fn free_pages(&self, block: NonNull<u8>, order: u32) {
        if let Some(unbinder) = &self.slow_except {
            if !unbinder.is_current() {
                unbinder.slow_frees_waiting.fetch_add(1, SeqCst);
                while !self.checker.is_unbound() {
                    thread::yield_now();
                }
                unbinder.slow_frees_waiting.fetch_sub(1, SeqCst);
            }
        }
        let addr = block.as_ptr().addr();
        let mapped = self
            .checker
            .live_mapping_list()
            .iter()
            .any(|m| m.cpu_addr == addr);
        if mapped {
            let report = self.checker.report();
            panic!("{FREED_WHILE_MAPPED} (block {addr:#x})\nchecker: {report}");
        }
        self.counts.frees.fetch_add(1, SeqCst);
        // SAFETY: the pool's caller contract (from `alloc_pages(order)` on
        // this source, freed once), and `GlobalPages` gave the block out.
        unsafe { GlobalPages.free_pages(block, order) }
    }
}

/// Which thread runs `unbind`, and the unmaps the device got from it while
/// it did: `std` bookkeeping, read and written by one shuttle thread at a
/// time with no scheduling point in between.
#[derive(Default)]
pub struct Unbinder {
    thread: std::sync::Mutex<Option<ThreadId>>,
    unbinding: std::sync::atomic::AtomicBool,
    unmaps: AtomicU64,
    /// Frees of a slow source waiting for `on_unbind`: the unbinder must
    /// not wait for the thread making one (see `whole_pool`).
    slow_frees_waiting: AtomicUsize,
}

impl Unbinder {
    fn is_current(&self) -> bool {
        *self.thread.lock().unwrap() == Some(thread::current().id())
    }

    /// Counts `n` unmaps if they are `unbind`'s own.
    fn note_unmaps(&self, n: usize) {
        if self.unbinding.load(SeqCst) && self.is_current() {
            self.unmaps.fetch_add(n as u64, SeqCst);
        }
    }
}

/// The checking device behind a `DmaOps` that also counts the unmaps made
/// on the unbinding thread while `unbind` runs (its steps 3 and 4), so that
/// the [`UnbindReport`] can be checked against what the device saw. Every
/// call is forwarded unchanged.
///
/// Zero-sized: the checker and the count live in a per-execution static
/// (shuttle resets a `lazy_static` for every execution). So the device's
/// box of it owns no memory, and a call still running through it after
/// `unbind` dropped the ops (which only the `unbind-no-wait` broken
/// variant allows) reads nothing that was freed: that variant fails on the
/// checker's report, not on a use after free.
pub struct CountingOps;

/// The running execution's checker and unbinder, for [`CountingOps`].
struct Current(std::sync::Mutex<Option<(CheckingDevice, Arc<Unbinder>)>>);

shuttle::lazy_static! {
    static ref CURRENT: Current = Current(std::sync::Mutex::new(None));
}

impl CountingOps {
    /// Binds this execution's ops to `checker` and `unbinder` (once).
    fn install(checker: &CheckingDevice, unbinder: &Arc<Unbinder>) -> Self {
        let mut current = CURRENT.0.lock().unwrap();
        assert!(current.is_none(), "one world per execution");
        *current = Some((checker.clone(), Arc::clone(unbinder)));
        Self
    }

    /// The checker, after counting `unmaps` if they are `unbind`'s own.
    fn checker(&self, unmaps: usize) -> CheckingDevice {
        let current = CURRENT.0.lock().unwrap();
        let (checker, unbinder) = current.as_ref().expect("installed by World::new");
        if unmaps > 0 {
            unbinder.note_unmaps(unmaps);
        }
        checker.clone()
    }
}

impl DmaOps for CountingOps {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        // SAFETY: forwarded `DmaOps::map` contract.
        unsafe { self.checker(0).map(cpu, len, direction) }
    }

    unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
        // SAFETY: forwarded contract.
        unsafe { self.checker(1).unmap(mapping) }
    }

    unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) -> Result<(), UnmapBatchError> {
        // SAFETY: forwarded contract.
        unsafe { self.checker(mappings.len()).unmap_batch(mappings) }
    }

    unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.checker(0).sync_for_device(mapping, offset, len) }
    }

    unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.checker(0).sync_for_cpu(mapping, offset, len) }
    }

    fn needs_sync(&self) -> bool {
        self.checker(0).needs_sync()
    }

    fn min_page_size(&self) -> Option<usize> {
        self.checker(0).min_page_size()
    }

    fn on_unbind(&self) {
        self.checker(0).on_unbind();
    }
}

/// One execution's device: a strict checker in record mode (every call
/// pauses twice, which under shuttle is two more scheduling points), the
/// bound [`Device`] over it, the page sources' counts, and what `unbind`
/// reported.
pub struct World {
    /// The checker's inspection handle (the device owns another clone).
    pub checker: CheckingDevice,
    /// The device, shared by every thread of the scenario.
    pub device: Arc<Device>,
    counts: Arc<SourceCounts>,
    unbinder: Arc<Unbinder>,
    slow_frees: bool,
}

/// What the unbinding thread saw: the report, the checker's counters right
/// after `unbind` returned, and the unmaps made by `unbind` itself.
#[derive(Clone, Copy, Debug)]
pub struct Unbound {
    /// `unbind`'s report.
    pub report: UnbindReport,
    /// The checker's counters when `unbind` returned.
    pub stats: CheckingStats,
    /// Mappings `unmap`/`unmap_batch` got from `unbind`'s own thread.
    pub unmaps: u64,
}

impl World {
    /// A fresh device; `slow_frees`: see [`CountingSource`].
    pub fn new(slow_frees: bool) -> Self {
        let checker = CheckingDevice::builder()
            .mode(CheckMode::Record)
            .call_delay(Duration::from_nanos(1))
            .build();
        let unbinder = Arc::new(Unbinder::default());
        let ops = CountingOps::install(&checker, &unbinder);
        Self {
            checker,
            device: Arc::new(Device::new(ops)),
            counts: Arc::default(),
            unbinder,
            slow_frees,
        }
    }

    /// A page source for one pool of this world.
    pub fn source(&self) -> CountingSource {
        CountingSource {
            checker: self.checker.clone(),
            counts: Arc::clone(&self.counts),
            slow_except: self.slow_frees.then(|| Arc::clone(&self.unbinder)),
        }
    }

    /// Unbinds the device from the calling thread and records what it saw.
    pub fn unbind(device: &Device, checker: &CheckingDevice, unbinder: &Unbinder) -> Unbound {
        *unbinder.thread.lock().unwrap() = Some(thread::current().id());
        unbinder.unbinding.store(true, SeqCst);
        let report = device.unbind().expect("the one unbind succeeds");
        unbinder.unbinding.store(false, SeqCst);
        let stats = checker.stats();
        assert!(checker.is_unbound(), "unbind returned before on_unbind");
        Unbound {
            report,
            stats,
            unmaps: unbinder.unmaps.load(SeqCst),
        }
    }

    /// The handles a thread needs to call [`World::unbind`].
    pub fn unbind_handles(&self) -> (Arc<Device>, CheckingDevice, Arc<Unbinder>) {
        (
            Arc::clone(&self.device),
            self.checker.clone(),
            Arc::clone(&self.unbinder),
        )
    }

    /// The end-of-execution checks; call after every thread was joined and
    /// every page, fragment, `Bytes` and pool was dropped.
    ///
    /// - no checker violation (no double unmap, no unmap of an unknown
    ///   mapping, no call after `on_unbind`, no mapping live at
    ///   `on_unbind`), no live mapping, `maps == unmaps`: every mapping
    ///   was unmapped exactly once; the tracker is empty;
    /// - the checker's counters are what they were when `unbind` returned:
    ///   no device call after unbind;
    /// - the report agrees with the device: `unbind`'s own unmaps are the
    ///   pages it drained from rings plus those it unmapped in flight, and
    ///   its bytes are those pages' bytes; no mapping left;
    /// - every page the sources gave out came back: allocs == frees;
    /// - a second `unbind` and a new pool are refused with their typed
    ///   errors.
    pub fn finish(self, unbound: Unbound, pools_built: usize) {
        let checker = &self.checker;
        let stats = checker.stats();
        let report = checker.report();
        assert_eq!(stats.violations, 0, "checker violations\n{report}");
        assert_eq!(stats.calls_after_unbind, 0, "{report}");
        assert_eq!(checker.live_mappings(), 0, "mapping left live\n{report}");
        assert_eq!(
            stats.maps, stats.unmaps,
            "every mapping unmapped exactly once\n{report}"
        );
        assert_eq!(
            stats, unbound.stats,
            "a device call was made after unbind returned\n{report}"
        );
        assert!(!self.device.is_bound());
        assert_eq!(self.device.tracked_mappings(), 0);

        let r = &unbound.report;
        assert_eq!(r.mappings_left, 0, "tracked unbind leaves no mapping: {r}");
        assert_eq!(r.regions_unmapped, 0, "no region pool here: {r}");
        assert!(r.pools <= pools_built, "{r}, {pools_built} pools built");
        assert_eq!(
            unbound.unmaps,
            (r.pages_from_rings + r.pages_held_or_cached) as u64,
            "unbind's own unmaps are the pages it drained and those in flight: {r}"
        );
        assert_eq!(
            r.bytes_unmapped,
            unbound.unmaps * PAGE_SIZE as u64,
            "bytes unmapped: {r}"
        );
        assert!(unbound.unmaps <= stats.maps, "{r}\n{report}");

        let allocs = self.counts.allocs.load(SeqCst);
        let frees = self.counts.frees.load(SeqCst);
        assert_eq!(
            allocs, frees,
            "page memory leaked: {allocs} blocks allocated, {frees} freed\n{r}\n{report}"
        );

        assert_eq!(
            self.device.unbind().unwrap_err(),
            UnbindError::AlreadyUnbound
        );
        assert_eq!(
            self.device.pool_builder().build().unwrap_err(),
            BuildError::Unbound
        );
        assert_eq!(checker.stats(), unbound.stats, "{}", checker.report());
    }
}

/// What an owner hands a holder.
pub enum Held {
    /// A whole page.
    Page(Page),
    /// A fragment of a page (its page goes back with its last fragment).
    Frag(Frag),
    /// A page or fragment as `Bytes`; holders clone it and pass clones on.
    Bytes(Bytes),
    /// Pages for `put_bulk`.
    Bulk(Vec<Page>),
}

/// A whole-pool scenario's shape: how many owners (one pool each) and
/// holders, and what they do.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Owner threads, each with a pool of its own (1-3). The last one waits
    /// for `unbind` to return and checks that its pool then refuses
    /// `alloc` and `alloc_frag` with `AllocError::Unbound`; the others drop
    /// their pools as soon as they are done, while holders may still hold
    /// their pages.
    pub owners: usize,
    /// Holder threads. Holder `k` passes `Bytes` clones on to holders after
    /// it, so every holder's channel closes.
    pub holders: usize,
    /// Allocations per owner.
    pub rounds: usize,
    /// Whether the first owner's pool syncs for the device on every
    /// recycle (a device call on every return).
    pub sync_on_recycle: bool,
    /// Frees wait for `on_unbind` (see [`CountingSource`]).
    pub slow_frees: bool,
    /// The pools' `remote_batch` (`None`: the default, which the ring of 4
    /// caps at 4; 0: pages dropped away from the owner go to the ring one
    /// at a time). A pool that syncs on recycle never batches.
    pub remote_batch: Option<usize>,
}

/// Two RX loops on one device, eleven holders, unbind and a pool built
/// while it runs: 16 threads. The first pool syncs for the device on every
/// recycle; the second batches remote returns (the default batch).
pub const RX_LOOPS: Shape = Shape {
    owners: 2,
    holders: 11,
    rounds: 12,
    sync_on_recycle: true,
    slow_frees: false,
    remote_batch: None,
};

/// Three pools, two of them dropped as soon as their owners are done,
/// while holders still hold their pages and the device may be unbinding;
/// no remote batches: 14 threads.
pub const POOLS_DROPPED: Shape = Shape {
    owners: 3,
    holders: 8,
    rounds: 8,
    sync_on_recycle: false,
    slow_frees: false,
    remote_batch: Some(0),
};

/// One owner, six holders, a page source that takes memory back only
/// after `on_unbind` (pages released before or during unbind are still
/// allocated when unbind walks the tracker), remote batches of 2: 10
/// threads.
pub const SLOW_SOURCE: Shape = Shape {
    owners: 1,
    holders: 6,
    rounds: 16,
    sync_on_recycle: false,
    slow_frees: true,
    remote_batch: Some(2),
};

impl Shape {
    /// Threads an execution runs, the main thread included: owners,
    /// holders, the unbinder, the builder of a pool racing unbind.
    pub fn threads(&self) -> usize {
        1 + self.owners + self.holders + 2
    }
}

/// Small pools, so that every path runs: a cache of 4 refilled 2 at a
/// time, a ring of 4 (a fuller one releases), fragments of 1 KiB.
fn small_pool(device: &Device, source: CountingSource, shape: &Shape, first: bool) -> PagePool {
    let mut builder = device
        .pool_builder()
        .cache_size(4)
        .refill_batch(2)
        .ring_size(4)
        .page_source(source);
    if let Some(batch) = shape.remote_batch {
        builder = builder.remote_batch(batch);
    }
    if shape.sync_on_recycle && first {
        builder = builder
            .direction(DmaDirection::Bidirectional)
            .sync_for_device(0, 64);
    }
    builder.build().expect("pool builds on a bound device")
}

/// An outcome: `unbind` unmapped pages held outside the pools (or cached).
pub const HELD_THROUGH_UNBIND: &str = "pages unmapped in flight";
/// An outcome: `unbind` drained pages from rings.
pub const DRAINED_FROM_RINGS: &str = "pages drained from rings";
/// An outcome: a pool was dropped before `unbind` took the registry.
pub const POOL_DROPPED_BEFORE_UNBIND: &str = "pool dropped before unbind";
/// An outcome: the pool built while unbinding was registered in time.
pub const BUILT_IN_TIME: &str = "racing pool built in time";
/// An outcome: the pool built while unbinding was refused.
pub const BUILD_REFUSED: &str = "racing pool refused";
/// An outcome: an owner's `alloc` failed with `Unbound` before its last
/// round.
pub const OWNER_STOPPED_BY_UNBIND: &str = "owner stopped by unbind";

/// The outcomes every whole-pool scenario must reach.
pub const EXPECTED: &[&str] = &[
    HELD_THROUGH_UNBIND,
    DRAINED_FROM_RINGS,
    BUILT_IN_TIME,
    BUILD_REFUSED,
    OWNER_STOPPED_BY_UNBIND,
];

/// The fragment size owners carve.
const FRAG: usize = 1024;

/// One execution of a whole-pool scenario (see [`Shape`]): the main thread
/// builds the device and the owners' pools, spawns every thread, joins
/// them all, and runs [`World::finish`]. The main thread itself never holds
/// a page: whatever a thread keeps back for its pools (thread-local
/// batches) goes home when the thread exits, before its join returns.
pub fn whole_pool(shape: Shape) {
    assert!((1..=3).contains(&shape.owners) && shape.holders >= 2);
    assert!((8..=16).contains(&shape.threads()), "{shape:?}");
    let world = World::new(shape.slow_frees);

    let mut pools: Vec<PagePool> = (0..shape.owners)
        .map(|i| small_pool(&world.device, world.source(), &shape, i == 0))
        .collect();

    // Holders: holder k receives from the owners and from holders before it.
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..shape.holders).map(|_| mpsc::channel::<Held>()).unzip();
    let mut holders = Vec::new();
    for (k, rx) in receivers.into_iter().enumerate() {
        let later: Vec<mpsc::Sender<Held>> = senders[k + 1..].to_vec();
        holders.push(thread::spawn(move || holder(rx, later)));
    }

    // The unbinder, and the last owner's signal that unbind returned. It
    // unbinds once the owners have made a random number of allocations
    // (all of them at most), so that unbind meets every stage of the run.
    let (unbound_tx, unbound_rx) = mpsc::channel::<()>();
    let (builder_tx, builder_rx) = mpsc::channel::<()>();
    let (device, checker, unbinder) = world.unbind_handles();
    let progress = Arc::new(Progress {
        owners: shape.owners,
        rounds: AtomicUsize::new(0),
        owners_done: AtomicUsize::new(0),
    });
    let owners_progress = Arc::clone(&progress);
    let total_rounds = shape.owners * shape.rounds;
    let unbinding = thread::spawn(move || {
        // A slow page source's free waits for unbind: the thread making one
        // makes no progress until then.
        let after = thread_rng().gen_range(0..=total_rounds);
        while progress.rounds.load(SeqCst) < after
            && progress.owners_done.load(SeqCst) < progress.owners
            && unbinder.slow_frees_waiting.load(SeqCst) == 0
        {
            thread::yield_now();
        }
        let unbound = World::unbind(&device, &checker, &unbinder);
        let _ = unbound_tx.send(());
        let _ = builder_tx.send(());
        unbound
    });

    // A pool built while unbind may run: registered in time (then closed by
    // unbind) or refused.
    let device = Arc::clone(&world.device);
    let source = world.source();
    let slow_frees = shape.slow_frees;
    let builder = thread::spawn(move || -> usize {
        match device
            .pool_builder()
            .cache_size(2)
            .refill_batch(1)
            .ring_size(2)
            .page_source(source)
            .build()
        {
            Ok(mut pool) => {
                match pool.alloc() {
                    Ok(page) => drop(page),
                    Err(e) => assert_eq!(e, AllocError::Unbound),
                }
                if slow_frees {
                    // Its drop would free pages, and a slow free waits for
                    // unbind, which would then always come right here.
                    builder_rx.recv().expect("the unbinder signals");
                }
                drop(pool);
                1
            }
            Err(e) => {
                assert_eq!(e, BuildError::Unbound);
                0
            }
        }
    });

    // Owners; the last one checks alloc after unbind.
    let mut owners = Vec::new();
    let last = shape.owners - 1;
    let mut unbound_rx = Some(unbound_rx);
    let stopped = Arc::new(AtomicUsize::new(0));
    for (i, pool) in pools.drain(..).enumerate() {
        let senders = senders.clone();
        let wait_for_unbind = if i == last { unbound_rx.take() } else { None };
        let stopped = Arc::clone(&stopped);
        let progress = Arc::clone(&owners_progress);
        owners.push(thread::spawn(move || {
            if !owner(pool, senders, shape.rounds, wait_for_unbind, &progress) {
                stopped.fetch_add(1, SeqCst);
            }
        }));
    }
    drop(senders);

    for owner in owners {
        owner.join().expect("owner thread");
    }
    let built = builder.join().expect("builder thread");
    for holder in holders {
        holder.join().expect("holder thread");
    }
    let unbound = unbinding.join().expect("unbinding thread");
    let r = unbound.report;
    if r.pages_held_or_cached > 0 {
        saw(HELD_THROUGH_UNBIND);
    }
    if r.pages_from_rings > 0 {
        saw(DRAINED_FROM_RINGS);
    }
    if r.pools < shape.owners + built {
        saw(POOL_DROPPED_BEFORE_UNBIND);
    }
    saw(if built == 1 {
        BUILT_IN_TIME
    } else {
        BUILD_REFUSED
    });
    if stopped.load(SeqCst) > 0 {
        saw(OWNER_STOPPED_BY_UNBIND);
    }
    world.finish(unbound, shape.owners + built);
}

/// How far the owners are, for the unbinder to pick its moment: `std`
/// counters, outside the schedule (the unbinder yields while it waits).
struct Progress {
    owners: usize,
    rounds: AtomicUsize,
    owners_done: AtomicUsize,
}

/// An owner: `rounds` allocations, each page recycled directly, dropped on
/// the spot, or handed to a random holder as a page, `Bytes`, fragments or
/// part of a bulk return; stops at `AllocError::Unbound`. Returns whether
/// it got through every round.
fn owner(
    mut pool: PagePool,
    holders: Vec<mpsc::Sender<Held>>,
    rounds: usize,
    wait_for_unbind: Option<mpsc::Receiver<()>>,
    progress: &Progress,
) -> bool {
    let mut rng = thread_rng();
    let mut bulk = Vec::new();
    let mut all_rounds = true;
    for _ in 0..rounds {
        progress.rounds.fetch_add(1, SeqCst);
        let choice = rng.gen_range(0..8);
        if choice == 7 {
            // Two fragments of one page, to two holders (one as `Bytes`).
            let (a, b) = match (pool.alloc_frag(FRAG), pool.alloc_frag(FRAG)) {
                (Ok(a), Ok(b)) => (a, b),
                (a, b) => {
                    for r in [a.err(), b.err()].into_iter().flatten() {
                        assert_eq!(r, AllocError::Unbound);
                    }
                    all_rounds = false;
                    break;
                }
            };
            let _ = pick(&holders, &mut rng).send(Held::Frag(a));
            let _ = pick(&holders, &mut rng).send(Held::Bytes(b.into_bytes()));
            continue;
        }
        let page = match pool.alloc() {
            Ok(page) => page,
            Err(e) => {
                assert_eq!(e, AllocError::Unbound, "the only way alloc fails here");
                all_rounds = false;
                break;
            }
        };
        match choice {
            0 | 1 => pool.recycle_direct(page),
            2 => drop(page),
            3 => {
                let _ = pick(&holders, &mut rng).send(Held::Page(page));
            }
            4 | 5 => {
                let _ = pick(&holders, &mut rng).send(Held::Bytes(page.into_bytes()));
            }
            _ => {
                bulk.push(page);
                if bulk.len() == 3 {
                    let _ = pick(&holders, &mut rng).send(Held::Bulk(core::mem::take(&mut bulk)));
                }
            }
        }
    }
    if !bulk.is_empty() {
        let _ = pick(&holders, &mut rng).send(Held::Bulk(bulk));
    }
    progress.owners_done.fetch_add(1, SeqCst);
    match wait_for_unbind {
        // Allocation after unbind fails with the typed error, also on the
        // fragment path; then the pool goes while holders still hold pages.
        Some(unbound) => {
            unbound.recv().expect("the unbinder signals");
            assert_eq!(pool.alloc().unwrap_err(), AllocError::Unbound);
            assert_eq!(pool.alloc_frag(FRAG).unwrap_err(), AllocError::Unbound);
            drop(pool);
        }
        // The pool goes first, while holders may still hold its pages and
        // the device may be unbinding; the channels close after.
        None => drop(pool),
    }
    drop(holders);
    all_rounds
}

/// A holder: keeps what it receives for a while, syncs pages for the CPU,
/// clones `Bytes` and passes clones on, returns bulks with `put_bulk`, and
/// drops everything in a random order once its channel closes.
fn holder(rx: mpsc::Receiver<Held>, later: Vec<mpsc::Sender<Held>>) {
    let mut rng = thread_rng();
    let mut kept: Vec<Held> = Vec::new();
    while let Ok(held) = rx.recv() {
        match held {
            Held::Page(mut page) => {
                if rng.gen_bool(0.5) {
                    match page.sync_for_cpu(0..64) {
                        Ok(()) => assert_eq!(page.as_slice().len(), PAGE_SIZE),
                        Err(e) => assert_eq!(e, pagepool::SyncError::Unbound),
                    }
                }
                kept.push(Held::Page(page));
            }
            Held::Bytes(bytes) => {
                if !later.is_empty() {
                    let _ = pick(&later, &mut rng).send(Held::Bytes(bytes.clone()));
                }
                kept.push(Held::Bytes(bytes));
            }
            Held::Bulk(pages) => {
                if rng.gen_bool(0.5) {
                    pagepool::put_bulk(pages);
                } else {
                    kept.push(Held::Bulk(pages));
                }
            }
            frag @ Held::Frag(_) => kept.push(frag),
        }
        if rng.gen_bool(0.3) && !kept.is_empty() {
            let i = rng.gen_range(0..kept.len());
            release(kept.swap_remove(i));
        }
    }
    drop(later);
    while !kept.is_empty() {
        let i = rng.gen_range(0..kept.len());
        release(kept.swap_remove(i));
    }
}

/// A random one of `senders`.
fn pick<'a, T>(senders: &'a [mpsc::Sender<T>], rng: &mut impl Rng) -> &'a mpsc::Sender<T> {
    &senders[rng.gen_range(0..senders.len())]
}

/// Gives `held` back, after reading it: a held page stays valid memory
/// for its holder, before and after unbind (the read makes no device call
/// once the device is unbound).
fn release(held: Held) {
    match held {
        Held::Page(page) => {
            black_box(page.as_slice()[PAGE_SIZE - 1]);
            drop(page);
        }
        Held::Frag(frag) => {
            black_box(frag.as_slice()[FRAG - 1]);
            drop(frag);
        }
        Held::Bytes(bytes) => {
            black_box(bytes[bytes.len() - 1]);
            drop(bytes);
        }
        Held::Bulk(pages) => {
            for page in &pages {
                black_box(page.as_slice()[0]);
            }
            pagepool::put_bulk(pages);
        }
    }
}

/// Schedules [`expect_found`] gives a scheduler to find a planted bug:
/// `PAGEPOOL_SHUTTLE_BROKEN_ITERS`, else [`DEFAULT_BROKEN_SCHEDULES`]. The
/// search stops at the first failing schedule.
pub fn broken_schedules() -> usize {
    env_number("PAGEPOOL_SHUTTLE_BROKEN_ITERS").map_or(DEFAULT_BROKEN_SCHEDULES, |n| n as usize)
}

/// The default of [`broken_schedules`]: PCT gets the first half.
pub const DEFAULT_BROKEN_SCHEDULES: usize = 40_000;

/// Runs the whole-pool scenario `shape` (as [`explore`] does, for
/// [`broken_schedules`] schedules) against the deliberately broken variant
/// `variant` of the core, and passes only if shuttle FINDS a failing
/// schedule whose panic message contains one of `expected`. Variants exist
/// only in `--cfg pagepool_broken` builds.
///
/// The scenario runs in a child process: the test binary re-runs itself,
/// filtered to `test_name`, with `PAGEPOOL_BROKEN=variant` in its
/// environment (the core reads it on every call, so the variable must not
/// reach the other tests of the binary, which run the real core). The
/// child catches the failing execution's panic (`catch_unwind` around the
/// schedulers), checks its message, and reports how many schedules it took;
/// the parent prints that and shuttle's failing schedule, which
/// `shuttle::replay` replays. A child also keeps a broken core's leaks
/// away from the other tests.
pub fn expect_found(
    test_name: &str,
    variant: &str,
    expected: &[&str],
    scenario: &str,
    shape: Shape,
) {
    if let Ok(active) = std::env::var("PAGEPOOL_BROKEN") {
        // The child: run the scenario with the variant on; it should fail.
        assert_eq!(active, variant, "child started for another variant");
        let budget = broken_schedules();
        let started = Instant::now();
        let outcome = catch_unwind(|| {
            explore(scenario, budget, move || whole_pool(shape));
        });
        let at = EXECUTION.get();
        let payload = match outcome {
            Ok(()) => panic!("shuttle did NOT find broken variant {variant:?} in {at} schedules"),
            Err(payload) => payload,
        };
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "<non-string panic>".into());
        let Some(found) = expected.iter().find(|e| message.contains(**e)) else {
            panic!(
                "broken variant {variant:?} failed, but not with any of {expected:?}:\n{message}"
            );
        };
        let scheduler = if at <= budget.div_ceil(2) {
            "PCT"
        } else {
            "random"
        };
        println!(
            "\nshuttle found broken variant {variant:?} in {scenario} at schedule {at} ({scheduler} scheduler, seed {:#x}), after {:.1?}: {found:?}",
            seed(),
            started.elapsed()
        );
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env("PAGEPOOL_BROKEN", variant)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("re-running the test binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "shuttle did not find broken variant {variant:?} as expected (child {}):\n{text}",
        out.status
    );
    let lines: Vec<&str> = text.lines().collect();
    // The harness may print the test's name on the same line.
    let found = lines
        .iter()
        .find_map(|l| l.find("shuttle found broken variant").map(|at| &l[at..]))
        .expect("the child reports what it found");
    // The failing schedule, replayable with `shuttle::replay` (shuttle
    // prints it between quotes, over as many lines as it takes).
    let schedule: String = lines
        .iter()
        .skip_while(|l| !l.starts_with("failing schedule"))
        .skip(2)
        .take_while(|l| **l != "\"")
        .copied()
        .collect();
    let shown = &schedule[..schedule.len().min(64)];
    eprintln!(
        "{found}\nfailing schedule ({} hex digits, for shuttle::replay): {shown}...",
        schedule.len()
    );
}
