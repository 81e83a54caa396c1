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
#![cfg(loom)]

pub use loom;
pub use pagepool;

use loom::sync::Arc;
use pagepool::checking::{CheckMode, CheckingDevice, CheckingStats};
use pagepool::{Device, DmaDirection, PagePool, UnbindReport};

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
/// containing `expected` (see README.md). Variants exist only in
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
pub fn expect_caught(test_name: &str, variant: &str, expected: &str, run: impl FnOnce()) {
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
    assert!(
        text.contains(expected),
        "broken variant {variant:?} failed, but not with {expected:?}:\n{text}"
    );
    // Show how it was caught (visible with --nocapture): which execution
    // failed, and the first line with the expected text.
    let lines: Vec<&str> = text.lines().collect();
    let execution = lines
        .iter()
        .find(|l| l.starts_with("loom: failing execution"))
        .copied()
        .unwrap_or("loom: failing execution unknown");
    let at = lines.iter().position(|l| l.contains(expected)).unwrap_or(0);
    let context = lines[at.saturating_sub(1)..(at + 2).min(lines.len())].join("\n");
    eprintln!(
        "broken variant {variant:?} caught by {test_name} (child {}):\n{execution}\n{context}",
        out.status
    );
}

/// Spawns a loom thread.
pub fn spawn<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> loom::thread::JoinHandle<T> {
    loom::thread::spawn(f)
}
