//! Programmable faults for the callback tests: [`FaultyOps`], a `DmaOps`
//! around a `CheckingDevice`, and [`FaultyPages`], a `PageSource` around
//! [`GuardedPages`], both driven by one shared [`Faults`] program.
//!
//! A program is a list of rules, each "on the n-th call of this method (or
//! on every call), before or after delegating, do this": panic, run a
//! closure (drop a page or a pool, call `unbind`, block on a channel), or
//! sleep. Rules never run while a lock of the `Faults` or of the checking
//! device is held, so a closure may call back into the pool and the device.
//!
//! Injected panics carry an [`Injected`] payload and are kept out of the
//! test output by a panic hook that forwards every other panic.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, Once, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use pagepool::checking::{CheckingDevice, CpuAccess, CpuAccessCheck};
use pagepool::{
    DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, OutOfMemory, PageSource, UnmapBatchError,
    UnmapError,
};

use super::checks::GuardedPages;

/// How long a scenario may take before the watchdog calls it a deadlock
/// (Miri runs the same code a few hundred times slower).
pub const TIMEOUT: Duration = if cfg!(miri) {
    Duration::from_secs(900)
} else {
    Duration::from_secs(30)
};

/// A method of [`FaultyOps`] or [`FaultyPages`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    Map,
    Unmap,
    UnmapBatch,
    SyncForCpu,
    SyncForDevice,
    CpuAccess,
    OnUnbind,
    AllocPages,
    FreePages,
}

const CALLS: usize = 9;

/// Whether a rule runs before or after the call is delegated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    Before,
    After,
}

/// The payload of every panic a [`Faults`] program injects: the method
/// that panicked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injected(pub Call);

/// The method an injected panic came from, if the payload is one.
pub fn injected(payload: &(dyn Any + Send)) -> Option<Call> {
    payload.downcast_ref::<Injected>().map(|i| i.0)
}

enum Action {
    Once(Box<dyn FnOnce() + Send>),
    Every(Arc<dyn Fn() + Send + Sync>),
}

struct Rule {
    call: Call,
    /// `None`: every call.
    nth: Option<usize>,
    when: When,
    action: Action,
}

/// A block whose `free_pages` panicked before freeing it.
struct Lost(NonNull<u8>, u32);

// SAFETY: an owned block of page memory, handed back to its source only.
unsafe impl Send for Lost {}

/// A fault program shared by a [`FaultyOps`] and any number of
/// [`FaultyPages`]. See the module docs.
#[derive(Default)]
pub struct Faults {
    counts: [AtomicUsize; CALLS],
    rules: Mutex<Vec<Rule>>,
    lost: Mutex<Vec<Lost>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Faults {
    pub fn new() -> Arc<Self> {
        quiet_injected_panics();
        Arc::default()
    }

    /// Calls of `call` made (started) so far.
    pub fn calls(&self, call: Call) -> usize {
        self.counts[call as usize].load(Ordering::SeqCst)
    }

    /// The number the next call of `call` will have (calls count from 1).
    pub fn next(&self, call: Call) -> usize {
        self.calls(call) + 1
    }

    /// All device calls made so far (every `DmaOps` method).
    pub fn device_calls(&self) -> usize {
        [
            Call::Map,
            Call::Unmap,
            Call::UnmapBatch,
            Call::SyncForCpu,
            Call::SyncForDevice,
            Call::CpuAccess,
            Call::OnUnbind,
        ]
        .iter()
        .map(|&c| self.calls(c))
        .sum()
    }

    fn add(&self, call: Call, nth: Option<usize>, when: When, action: Action) {
        lock(&self.rules).push(Rule {
            call,
            nth,
            when,
            action,
        });
    }

    /// Panics with [`Injected`] on the `nth` call of `call`. A `map`,
    /// `alloc_pages` or `free_pages` panics before delegating (it maps,
    /// allocates or frees nothing; a lost block is kept for
    /// [`FaultyPages::free_lost`]); every other method panics after
    /// delegating ("a call that panics counts as made").
    pub fn panic_on(&self, call: Call, nth: usize) {
        let when = match call {
            Call::Map | Call::AllocPages | Call::FreePages => When::Before,
            _ => When::After,
        };
        self.add(
            call,
            Some(nth),
            when,
            Action::Once(Box::new(move || std::panic::panic_any(Injected(call)))),
        );
    }

    /// Runs `f` once, on the `nth` call of `call`.
    pub fn run_on(&self, call: Call, nth: usize, when: When, f: impl FnOnce() + Send + 'static) {
        self.add(call, Some(nth), when, Action::Once(Box::new(f)));
    }

    /// Runs `f` on every call of `call`.
    pub fn every(&self, call: Call, when: When, f: impl Fn() + Send + Sync + 'static) {
        self.add(call, None, when, Action::Every(Arc::new(f)));
    }

    /// Sleeps `delay` in every call of `call`, before delegating.
    pub fn sleep_every(&self, call: Call, delay: Duration) {
        self.every(call, When::Before, move || thread::sleep(delay));
    }

    /// Drops every rule not yet run (outside the lock: a rule may own pages
    /// whose drop calls back in).
    pub fn clear(&self) {
        let rules = core::mem::take(&mut *lock(&self.rules));
        drop(rules);
    }

    /// Rules that have not run yet (`every` rules always count).
    pub fn pending(&self) -> usize {
        lock(&self.rules).len()
    }

    fn begin(&self, call: Call) -> usize {
        self.counts[call as usize].fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Runs the rules for call number `n` of `call` at `when`, in the order
    /// they were added, with no lock held.
    fn fire(&self, call: Call, n: usize, when: When) {
        let mut due = Vec::new();
        {
            let mut rules = lock(&self.rules);
            let mut i = 0;
            while i < rules.len() {
                let r = &rules[i];
                if r.call != call || r.when != when || r.nth.is_some_and(|nth| nth != n) {
                    i += 1;
                    continue;
                }
                match &r.action {
                    Action::Every(f) => {
                        due.push(Action::Every(Arc::clone(f)));
                        i += 1;
                    }
                    Action::Once(_) => due.push(rules.remove(i).action),
                }
            }
        }
        for action in due {
            match action {
                Action::Once(f) => f(),
                Action::Every(f) => f(),
            }
        }
    }

    fn around<R>(&self, call: Call, body: impl FnOnce() -> R) -> R {
        let n = self.begin(call);
        self.fire(call, n, When::Before);
        let result = body();
        self.fire(call, n, When::After);
        result
    }

    /// Blocks whose `free_pages` panicked before freeing them.
    pub fn lost_blocks(&self) -> usize {
        lock(&self.lost).len()
    }
}

/// Keeps [`Injected`] panics out of the test output; other panics are
/// reported by the previous hook as usual.
fn quiet_injected_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<Injected>().is_none() {
                previous(info);
            }
        }));
    });
}

/// A `DmaOps` that delegates to a [`CheckingDevice`] and runs a
/// [`Faults`] program around every call. Its CPU-access check
/// ([`FaultyOps::check`], [`Call::CpuAccess`]) runs under the same program:
/// bind with `Device::with_cpu_access_check(ops, ops.check())`.
pub struct FaultyOps {
    inner: CheckingDevice,
    faults: Arc<Faults>,
}

impl FaultyOps {
    pub fn new(inner: &CheckingDevice, faults: &Arc<Faults>) -> Self {
        Self {
            inner: inner.clone(),
            faults: Arc::clone(faults),
        }
    }

    /// The CPU-access check that goes with these ops: the checking
    /// device's, under the same program.
    pub fn check(&self) -> FaultyCheck {
        FaultyCheck {
            inner: self.inner.clone(),
            faults: Arc::clone(&self.faults),
        }
    }
}

/// The CPU-access check of a [`FaultyOps`]: delegates to the
/// [`CheckingDevice`] and runs the [`Faults`] program's
/// [`Call::CpuAccess`] rules around every call.
pub struct FaultyCheck {
    inner: CheckingDevice,
    faults: Arc<Faults>,
}

impl CpuAccessCheck for FaultyCheck {
    fn cpu_access(&self, mapping: DmaMapping, offset: usize, len: usize, access: CpuAccess) {
        self.faults.around(Call::CpuAccess, || {
            self.inner.cpu_access(mapping, offset, len, access)
        })
    }
}

impl DmaOps for FaultyOps {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        self.faults.around(Call::Map, || {
            // SAFETY: forwarded contract.
            unsafe { self.inner.map(cpu, len, direction) }
        })
    }

    unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
        self.faults.around(Call::Unmap, || {
            // SAFETY: forwarded contract.
            unsafe { self.inner.unmap(mapping) }
        })
    }

    unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) -> Result<(), UnmapBatchError> {
        self.faults.around(Call::UnmapBatch, || {
            // SAFETY: forwarded contract.
            unsafe { self.inner.unmap_batch(mappings) }
        })
    }

    unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
        self.faults.around(Call::SyncForDevice, || {
            // SAFETY: forwarded contract.
            unsafe { self.inner.sync_for_device(mapping, offset, len) }
        })
    }

    unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
        self.faults.around(Call::SyncForCpu, || {
            // SAFETY: forwarded contract.
            unsafe { self.inner.sync_for_cpu(mapping, offset, len) }
        })
    }

    fn on_unbind(&self) {
        self.faults
            .around(Call::OnUnbind, || self.inner.on_unbind())
    }
}

/// A `PageSource` that delegates to [`GuardedPages`] (every block freed
/// once, never while mapped) and runs a [`Faults`] program around every
/// call. Clones share the program and the accounting.
#[derive(Clone)]
pub struct FaultyPages {
    pub inner: GuardedPages,
    faults: Arc<Faults>,
}

impl FaultyPages {
    pub fn new(inner: &GuardedPages, faults: &Arc<Faults>) -> Self {
        Self {
            inner: inner.clone(),
            faults: Arc::clone(faults),
        }
    }

    /// Frees the blocks whose `free_pages` panicked before freeing them (so
    /// the accounting closes, and Miri sees no leak); returns how many.
    pub fn free_lost(&self) -> usize {
        let lost = core::mem::take(&mut *lock(&self.faults.lost));
        for Lost(block, order) in &lost {
            // SAFETY: the block came from this source and was never freed:
            // its `free_pages` panicked before delegating.
            unsafe { self.inner.free_pages(*block, *order) };
        }
        lost.len()
    }
}

// SAFETY: delegates to GuardedPages; the program never touches a block.
unsafe impl PageSource for FaultyPages {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        self.faults
            .around(Call::AllocPages, || self.inner.alloc_pages(order))
    }

    unsafe fn free_pages(&self, block: NonNull<u8>, order: u32) {
        let n = self.faults.begin(Call::FreePages);
        let before = catch_unwind(AssertUnwindSafe(|| {
            self.faults.fire(Call::FreePages, n, When::Before)
        }));
        if let Err(payload) = before {
            lock(&self.faults.lost).push(Lost(block, order));
            resume_unwind(payload);
        }
        // SAFETY: forwarded contract.
        unsafe { self.inner.free_pages(block, order) };
        self.faults.fire(Call::FreePages, n, When::After);
    }
}

/// Polls `cond` every millisecond until it holds; panics after
/// [`TIMEOUT`] naming `what`.
#[track_caller]
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < TIMEOUT,
            "timed out after {TIMEOUT:?} waiting until {what}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Runs `scenario` on its own thread and waits up to [`TIMEOUT`] for it:
/// a scenario that deadlocks fails the test with a clear message instead of
/// hanging it; a panic in it is resumed here.
#[track_caller]
pub fn watchdog(name: &str, scenario: impl FnOnce() + Send + 'static) {
    let (done_tx, done_rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            scenario();
            let _ = done_tx.send(());
        })
        .expect("spawn the scenario thread");
    match done_rx.recv_timeout(TIMEOUT) {
        Ok(()) => handle.join().expect("the scenario finished"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(payload) => resume_unwind(payload),
            Ok(()) => unreachable!("the scenario ended without reporting"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!(
            "scenario `{name}` did not finish within {TIMEOUT:?}: deadlock or unbounded wait"
        ),
    }
}
