//! Shared harness for the loom models in `tests/` (see README.md).
//!
//! Build and run only with `RUSTFLAGS="--cfg loom"`; without it this crate
//! is empty. Every model:
//!
//! - runs the real pool code, whose sync primitives are loom's
//!   (`pagepool::sync` switches them under `cfg(loom)`), against a
//!   [`CheckingDevice`] in [`CheckMode::Record`], itself built on those same
//!   primitives;
//! - snapshots the checker's counters right after `unbind` returns
//!   ([`Harness::unbound`]) and checks at the end ([`Harness::finish`]) that
//!   nothing changed since (no device call after unbind), that no violation
//!   was recorded (no double unmap, no unmap of an unknown mapping, no call
//!   after `on_unbind`, no mapping left live at `on_unbind`), and that every
//!   successful map was unmapped exactly once (`maps == unmaps`, no live
//!   mapping);
//! - relies on loom's leak check when the model closure returns: page
//!   memory comes from `loom::alloc` and pools/devices live in loom `Arc`s,
//!   so a page that is never freed fails the model with "Allocation leaked"
//!   or "Arc leaked".
//!
//! For the models of the call gate, page sources and backends with hooks:
//! [`CheckedSource`] fails a model the moment page memory is freed while
//! still mapped, and logs who freed what; [`HookedOps`] puts the checker
//! behind a backend whose `unmap_batch` panics or drops a page once.
#![cfg(loom)]

pub use loom;
pub use pagepool;

use core::ptr::NonNull;

use loom::sync::Arc;
use loom::thread::ThreadId;
use pagepool::checking::{CheckMode, CheckingDevice, CheckingStats};
use pagepool::{
    Device, DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, GlobalPages, OutOfMemory, Page,
    PagePool, PageSource, RegionBlock, RegionSource, SystemRegions, UnbindReport, UnmapBatchError,
    UnmapError,
};

/// Preemption bound used when `LOOM_MAX_PREEMPTIONS` is not set (see
/// README.md for why this value).
pub const DEFAULT_PREEMPTIONS: usize = 3;

/// The execution the last model started (for [`expect_caught`]'s report).
static EXECUTIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `f` under loom with the crate's default bound unless the
/// environment sets one.
pub fn model<F>(f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(DEFAULT_PREEMPTIONS);
    }
    let bound = builder.preemption_bound;
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&executions);
    let started = std::time::Instant::now();
    builder.check(move || {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        EXECUTIONS.store(n, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    // Shown with `--nocapture`; README.md's timings come from these lines.
    eprintln!(
        "loom model {}: {} executions, preemption bound {:?}, {:.1?}",
        std::thread::current().name().unwrap_or("?"),
        executions.load(std::sync::atomic::Ordering::Relaxed),
        bound,
        started.elapsed()
    );
}

/// A checking device, the bound `Device` over it, and the snapshot taken
/// when unbind returned.
pub struct Harness {
    /// The checker's inspection handle (the device owns another clone).
    pub checker: CheckingDevice,
    /// The device, shareable with model threads.
    pub device: Arc<Device>,
    at_unbind: Option<CheckingStats>,
}

impl Harness {
    /// A strict checker in record mode.
    pub fn new() -> Self {
        Self::with_checker(CheckingDevice::builder().mode(CheckMode::Record).build())
    }

    /// Uses `checker` (built by the model, in record mode).
    pub fn with_checker(checker: CheckingDevice) -> Self {
        assert_eq!(checker.mode(), CheckMode::Record);
        let device = Arc::new(Device::new(checker.clone()));
        Self {
            checker,
            device,
            at_unbind: None,
        }
    }

    /// A strict checker in record mode behind [`HookedOps`], and the hooks'
    /// handle.
    pub fn hooked(hook: UnmapHook) -> (Self, Arc<Hooks>) {
        let checker = CheckingDevice::builder().mode(CheckMode::Record).build();
        let hooks = Arc::new(Hooks {
            hook,
            armed: std::sync::Mutex::new(None),
            page: std::sync::Mutex::new(None),
            device: std::sync::Mutex::new(None),
            fired_on: std::sync::Mutex::new(None),
            retired: std::sync::atomic::AtomicBool::new(false),
        });
        let ops = HookedOps {
            inner: checker.clone(),
            hooks: Arc::clone(&hooks),
        };
        // The wrapper hides the checker from `Device::new`: hand it over as
        // the CPU-access check, so page reads are checked as before.
        let device = Arc::new(Device::with_cpu_access_check(ops, checker.clone()));
        let harness = Self {
            checker,
            device,
            at_unbind: None,
        };
        (harness, hooks)
    }

    /// A page source that checks every free against this harness's checker
    /// (see [`CheckedSource`]), and the log of its frees.
    pub fn checked_source(&self) -> (CheckedSource, FreeLog) {
        let log = FreeLog::default();
        let source = CheckedSource {
            checker: self.checker.clone(),
            log: log.clone(),
            slow: None,
            log_threads: true,
        };
        (source, log)
    }

    /// The small pool every model uses: cache 2, refill 1, ring 1.
    pub fn small_pool(&self) -> PagePool {
        self.device
            .pool_builder()
            .cache_size(2)
            .refill_batch(1)
            .ring_size(1)
            .build()
            .expect("pool builds on a bound device")
    }

    /// A pool whose slow path maps two pages in one refill (one gate hold
    /// each; their metadata in one block), cache 2, ring 1.
    pub fn refill_two_pool(&self) -> PagePool {
        self.device
            .pool_builder()
            .cache_size(2)
            .refill_batch(2)
            .ring_size(1)
            .build()
            .expect("pool builds on a bound device")
    }

    /// A pool whose ring holds one page (a second page dropped is released
    /// through the gate), cache 2, refill 1, taking memory from `source`.
    pub fn one_page_ring_pool(&self, source: CheckedSource) -> PagePool {
        self.device
            .pool_builder()
            .cache_size(2)
            .refill_batch(1)
            .ring_size(1)
            .page_source(source)
            .build()
            .unwrap()
    }

    /// A region source that checks every free against this harness's
    /// checker (see [`CheckedRegions`]), and the log of its frees.
    pub fn checked_regions(&self) -> (CheckedRegions, FreeLog) {
        let log = FreeLog::default();
        let source = CheckedRegions {
            checker: self.checker.clone(),
            log: log.clone(),
        };
        (source, log)
    }

    /// A region-mapped pool of two-page (8 KiB) regions, cache 2, refill 1,
    /// ring 1: the first allocation maps a region and puts one page in the
    /// cache and the other in the spare list.
    pub fn region_pool(&self, source: CheckedRegions) -> PagePool {
        self.device
            .pool_builder()
            .cache_size(2)
            .refill_batch(1)
            .ring_size(1)
            .region_size(REGION_LEN)
            .region_source(source)
            .build()
            .expect("pool builds on a bound device")
    }

    /// A small pool that syncs 64 bytes for the device on every recycle.
    /// Bidirectional, so the strict checker allows the sync.
    pub fn sync_pool(&self) -> PagePool {
        self.device
            .pool_builder()
            .cache_size(2)
            .refill_batch(1)
            .ring_size(1)
            .direction(DmaDirection::Bidirectional)
            .sync_for_device(0, 64)
            .build()
            .expect("pool builds on a bound device")
    }

    /// Call on the unbinding thread right after `unbind` returned `report`:
    /// snapshots the checker's counters (see [`finish`](Self::finish)).
    pub fn unbound(&mut self, report: &UnbindReport) -> CheckingStats {
        assert!(
            self.checker.is_unbound(),
            "unbind returned before on_unbind"
        );
        assert_eq!(report.mappings_left, 0, "tracked unbind leaves no mapping");
        let stats = self.checker.stats();
        self.at_unbind = Some(stats);
        stats
    }

    /// The end-of-model checks; call after every model thread was joined and
    /// every page, fragment, `Bytes` and pool was dropped.
    pub fn finish(self) {
        let at_unbind = self.at_unbind.expect("the model unbound the device");
        self.finish_with(at_unbind);
    }

    /// As [`finish`](Self::finish), with a snapshot taken elsewhere (by a
    /// model thread that ran `unbind`).
    pub fn finish_with(self, at_unbind: CheckingStats) {
        let checker = &self.checker;
        let stats = checker.stats();
        let report = checker.report();
        assert_eq!(
            stats, at_unbind,
            "a device call was made after unbind returned\n{report}"
        );
        assert_eq!(stats.violations, 0, "checker violations\n{report}");
        assert_eq!(stats.calls_after_unbind, 0, "{report}");
        assert_eq!(checker.live_mappings(), 0, "mapping left live\n{report}");
        assert_eq!(
            stats.maps, stats.unmaps,
            "every mapping unmapped exactly once\n{report}"
        );
        assert!(!self.device.is_bound());
        assert_eq!(self.device.tracked_mappings(), 0);
        assert!(self.device.unbind().is_err(), "second unbind is refused");
        assert_eq!(checker.stats(), at_unbind, "{}", checker.report());
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

/// Which outcomes a model's executions reached, across all executions: a
/// guard against a model that passes because its race never happens.
///
/// Uses a `std` mutex on purpose: it is bookkeeping outside the modelled
/// code, held only for an insert, never across a loom operation.
pub struct Outcomes {
    seen: std::sync::Mutex<std::collections::BTreeSet<&'static str>>,
}

impl Outcomes {
    /// No outcome seen yet; use in a `static`.
    pub const fn new() -> Self {
        Self {
            seen: std::sync::Mutex::new(std::collections::BTreeSet::new()),
        }
    }

    /// Records that an execution reached `outcome`.
    pub fn saw(&self, outcome: &'static str) {
        self.seen.lock().unwrap().insert(outcome);
    }

    /// Asserts that every one of `expected` was reached by some execution.
    pub fn assert_seen(&self, expected: &[&'static str]) {
        let seen = self.seen.lock().unwrap();
        for outcome in expected {
            assert!(
                seen.contains(outcome),
                "no execution reached outcome {outcome:?}; seen: {seen:?}"
            );
        }
    }
}

impl Default for Outcomes {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `run` (a loom model) against the deliberately broken variant
/// `variant` of the core and passes only if the model FAILS with a message
/// containing one of `expected` (see README.md; a bug may show in more than
/// one way, and which one loom meets first depends on its exploration
/// order). Variants exist only in
/// `--cfg pagepool_broken` builds; `"none"` runs the real core (for models
/// that break something themselves).
///
/// The model runs in a child process: the test binary re-runs itself,
/// filtered to `test_name`, with `PAGEPOOL_BROKEN=variant` in its
/// environment (the core reads it to switch the variant on). A child is
/// needed because loom reports a leak by panicking after the model
/// returned, and then aborts the process while tearing down the leaked
/// allocation, which `#[should_panic]` cannot catch; it also keeps the
/// variant away from every other test in the binary.
pub fn expect_caught(test_name: &str, variant: &str, expected: &[&str], run: impl FnOnce()) {
    if let Ok(active) = std::env::var("PAGEPOOL_BROKEN") {
        // The child: run the model with the variant on; it should fail.
        assert_eq!(active, variant, "child started for another variant");
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            eprintln!(
                "loom: failing execution is number {} of this model",
                EXECUTIONS.load(std::sync::atomic::Ordering::Relaxed)
            );
            hook(info);
        }));
        run();
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
        !out.status.success(),
        "loom did NOT catch broken variant {variant:?}: the model passed\n{text}"
    );
    let Some(found) = expected.iter().find(|e| text.contains(**e)) else {
        panic!("broken variant {variant:?} failed, but not with any of {expected:?}:\n{text}");
    };
    // Show how it was caught (visible with --nocapture): which execution
    // failed, and the first line with the expected text.
    let lines: Vec<&str> = text.lines().collect();
    let execution = lines
        .iter()
        .find(|l| l.starts_with("loom: failing execution"))
        .copied()
        .unwrap_or("loom: failing execution unknown");
    let at = lines.iter().position(|l| l.contains(found)).unwrap_or(0);
    let context = lines[at.saturating_sub(1)..(at + 2).min(lines.len())].join("\n");
    eprintln!(
        "broken variant {variant:?} caught by {test_name} (child {}):\n{execution}\n{context}",
        out.status
    );
}

/// How a device call that `unbind` did not wait for shows (for
/// [`expect_caught`]): the checker reports a call after `on_unbind` (or a
/// mapping still live then), or loom reports the ops read by the call while
/// `unbind` takes them out of their `UnsafeCell` to drop them.
pub const CALL_AFTER_UNBIND: &[&str] = &[
    "after the device was released (on_unbind)",
    "Causality violation: Concurrent read and write accesses",
];

/// The message [`CheckedSource`] panics with when page memory is freed while
/// the device still has it mapped.
pub const FREED_WHILE_MAPPED: &str = "page memory freed while the device still has it mapped";

/// One `free_pages` call seen by a [`CheckedSource`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Free {
    /// The block's CPU address.
    pub block: usize,
    /// The loom thread that freed it; `None` from a source built with
    /// [`CheckedSource::without_threads`].
    pub thread: Option<ThreadId>,
}

/// The frees a [`CheckedSource`] saw, in order. A `std` mutex: bookkeeping,
/// held only for a push or a copy, never across a loom operation.
#[derive(Clone, Default)]
pub struct FreeLog(std::sync::Arc<std::sync::Mutex<Vec<Free>>>);

impl FreeLog {
    /// Every free of `block` so far.
    pub fn of(&self, block: usize) -> Vec<Free> {
        let frees = self.0.lock().unwrap();
        frees.iter().filter(|f| f.block == block).copied().collect()
    }
}

/// Page memory from loom's tracked allocator (as [`GlobalPages`]), with
/// one check on every free: the checker must not have the block mapped any
/// more (invariant 4: memory is freed only after its unmap returned). A
/// free of a mapped block panics with [`FREED_WHILE_MAPPED`] before the
/// memory is released, which fails the model at the free itself, before
/// anything can go on to use the freed page. Every free is logged, with
/// its thread, so a model can tell who freed a page.
pub struct CheckedSource {
    checker: CheckingDevice,
    log: FreeLog,
    slow: Option<ThreadId>,
    log_threads: bool,
}

impl CheckedSource {
    /// Makes the source slow to take memory back: a free on any thread but
    /// `unbinder` first gives way until the device was released
    /// (`on_unbind`). The pool never waits for a page source, so this only
    /// stretches the time between a page's unmap and its free, to the end
    /// of the unbind that runs meanwhile.
    pub fn slow_until_unbound(mut self, unbinder: ThreadId) -> Self {
        self.slow = Some(unbinder);
        self
    }

    /// Logs frees without their thread: for frees made by a thread-local's
    /// destructor at thread exit, where loom can no longer name the thread
    /// (its own thread-locals are being destroyed too).
    pub fn without_threads(mut self) -> Self {
        self.log_threads = false;
        self
    }
}

// SAFETY: every block comes from `GlobalPages` and goes back to it, once,
// unchanged; the check and the log add nothing to the blocks' lifetimes.
unsafe impl PageSource for CheckedSource {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        GlobalPages.alloc_pages(order)
    }

    unsafe fn free_pages(&self, block: NonNull<u8>, order: u32) {
        if self.slow.is_some_and(|t| t != loom::thread::current().id()) {
            while !self.checker.is_unbound() {
                loom::thread::yield_now();
            }
        }
        let addr = block.as_ptr().addr();
        let mapped = self
            .checker
            .live_mapping_list()
            .iter()
            .any(|m| m.cpu_addr == addr);
        let thread = self.log_threads.then(|| loom::thread::current().id());
        self.log.0.lock().unwrap().push(Free {
            block: addr,
            thread,
        });
        if mapped {
            let report = self.checker.report();
            panic!("{FREED_WHILE_MAPPED} (block {addr:#x})\nchecker: {report}");
        }
        // SAFETY: the pool's caller contract (from `alloc_pages(order)` on
        // this source, freed once), and `GlobalPages` gave the block out.
        unsafe { GlobalPages.free_pages(block, order) }
    }
}

/// Bytes per region of [`Harness::region_pool`]: two pages.
pub const REGION_LEN: usize = 8192;

/// Region memory from [`SystemRegions`] (loom's tracked allocator under
/// loom), with the check of [`CheckedSource`] on every free: the checker
/// must not have any byte of the region mapped any more. Every free is
/// logged with its thread.
pub struct CheckedRegions {
    checker: CheckingDevice,
    log: FreeLog,
}

// SAFETY: every block comes from `SystemRegions` and goes back to it, once,
// unchanged.
unsafe impl RegionSource for CheckedRegions {
    fn alloc_region(&self, len: usize) -> Result<RegionBlock, OutOfMemory> {
        SystemRegions::new().alloc_region(len)
    }

    unsafe fn free_region(&self, block: RegionBlock, len: usize) {
        let addr = block.ptr.as_ptr().addr();
        let mapped = self
            .checker
            .live_mapping_list()
            .iter()
            .any(|m| m.cpu_addr < addr + len && addr < m.cpu_addr + m.mapping.len);
        let thread = Some(loom::thread::current().id());
        self.log.0.lock().unwrap().push(Free {
            block: addr,
            thread,
        });
        if mapped {
            let report = self.checker.report();
            panic!("{FREED_WHILE_MAPPED} (region {addr:#x})\nchecker: {report}");
        }
        // SAFETY: the pool's caller contract; `SystemRegions` gave the block
        // out with this length.
        unsafe { SystemRegions::new().free_region(block, len) }
    }
}

impl FreeLog {
    /// Every free logged so far.
    pub fn all(&self) -> Vec<Free> {
        self.0.lock().unwrap().clone()
    }
}

/// What [`HookedOps`] does on the first `unmap_batch` that its trigger
/// matches (see [`Hooks::arm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnmapHook {
    /// Unmaps, then panics with [`HookPanic`]: a backend whose unmap
    /// panics after doing its work (the call counts as made).
    PanicAfterUnmap,
    /// Drops the page given to [`Hooks::give_page`] first (a re-entrant
    /// drop from inside a device callback), then unmaps.
    DropPageThenUnmap,
    /// Drops the device handle given to [`Hooks::give_device`] first (a
    /// remove path run from inside a device callback), then unmaps.
    DropDeviceThenUnmap,
}

/// The payload [`UnmapHook::PanicAfterUnmap`] panics with.
#[derive(Debug)]
pub struct HookPanic;

/// The shared side of [`HookedOps`]: the trigger, the page to drop, and
/// what happened. `std` mutexes and atomics: bookkeeping, never held across
/// a loom operation (a page is taken out before it is dropped).
pub struct Hooks {
    hook: UnmapHook,
    /// `None`: not armed. `Some(None)`: any thread. `Some(Some(t))`: only
    /// calls on thread `t`.
    armed: std::sync::Mutex<Option<Option<ThreadId>>>,
    page: std::sync::Mutex<Option<Page>>,
    device: std::sync::Mutex<Option<Arc<Device>>>,
    fired_on: std::sync::Mutex<Option<ThreadId>>,
    retired: std::sync::atomic::AtomicBool,
}

impl Hooks {
    /// Arms the hook for the next `unmap_batch`, on `thread` only, or on
    /// any thread. It fires once.
    pub fn arm(&self, thread: Option<ThreadId>) {
        *self.armed.lock().unwrap() = Some(thread);
    }

    /// The page [`UnmapHook::DropPageThenUnmap`] drops. A page left here
    /// when the ops are retired is dropped with them.
    pub fn give_page(&self, page: Page) {
        *self.page.lock().unwrap() = Some(page);
    }

    /// The device handle [`UnmapHook::DropDeviceThenUnmap`] drops. A handle
    /// left here when the ops are retired is dropped with them.
    pub fn give_device(&self, device: Arc<Device>) {
        *self.device.lock().unwrap() = Some(device);
    }

    /// The thread whose `unmap_batch` fired the hook, if it fired.
    pub fn fired_on(&self) -> Option<ThreadId> {
        *self.fired_on.lock().unwrap()
    }

    /// Whether the device dropped its ops (`unbind` retired them).
    pub fn retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether this call fires the hook (and disarms it).
    fn fire(&self) -> bool {
        let me = loom::thread::current().id();
        let mut armed = self.armed.lock().unwrap();
        match *armed {
            Some(None) => {}
            Some(Some(thread)) if thread == me => {}
            _ => return false,
        }
        *armed = None;
        *self.fired_on.lock().unwrap() = Some(me);
        true
    }
}

/// A [`CheckingDevice`] with one hook on `unmap_batch` (see [`UnmapHook`]);
/// every other method delegates unchanged. [`Harness::hooked`] binds it with
/// the checker as the device's CPU-access check.
pub struct HookedOps {
    inner: CheckingDevice,
    hooks: Arc<Hooks>,
}

impl DmaOps for HookedOps {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        // SAFETY: forwarded `DmaOps::map` contract.
        unsafe { self.inner.map(cpu, len, direction) }
    }

    unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
        // SAFETY: forwarded contract.
        unsafe { self.inner.unmap(mapping) }
    }

    unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) -> Result<(), UnmapBatchError> {
        let fire = self.hooks.fire();
        if fire && self.hooks.hook == UnmapHook::DropPageThenUnmap {
            let page = self.hooks.page.lock().unwrap().take();
            drop(page);
        }
        if fire && self.hooks.hook == UnmapHook::DropDeviceThenUnmap {
            let device = self.hooks.device.lock().unwrap().take();
            drop(device);
        }
        // SAFETY: forwarded contract.
        let result = unsafe { self.inner.unmap_batch(mappings) };
        if fire && self.hooks.hook == UnmapHook::PanicAfterUnmap {
            std::panic::panic_any(HookPanic);
        }
        result
    }

    unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.inner.sync_for_device(mapping, offset, len) }
    }

    unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.inner.sync_for_cpu(mapping, offset, len) }
    }

    fn needs_sync(&self) -> bool {
        self.inner.needs_sync()
    }

    fn on_unbind(&self) {
        self.inner.on_unbind();
    }
}

impl Drop for HookedOps {
    fn drop(&mut self) {
        self.hooks
            .retired
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let page = self.hooks.page.lock().unwrap().take();
        drop(page);
        let device = self.hooks.device.lock().unwrap().take();
        drop(device);
    }
}

/// Keeps [`HookPanic`]s, which models cause and catch on purpose in every
/// execution, out of the test output; every other panic is reported as
/// before.
pub fn quiet_hook_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<HookPanic>() {
                previous(info);
            }
        }));
    });
}

/// Spawns a loom thread.
pub fn spawn<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> loom::thread::JoinHandle<T> {
    loom::thread::spawn(f)
}
