//! Callback faults: the one fault slot ([`Faults`]) and the two wrappers
//! that fire it, the backend ([`FaultyOps`], around the checking device)
//! and the page source ([`FaultyPages`], around the support tree's
//! `CountingPages`); and how an injected panic is caught.
//!
//! Invariants: a fault is one-shot (the first call of its callback takes
//! it out of the slot, under the lock) and acts outside the lock, so a
//! re-entrant drop may make callbacks of its own; a thread that is already
//! unwinding never fires one (a second panic would abort); an injected
//! panic carries an [`Injected`] payload, and any other panic is a failure.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::thread;

use pagepool::checking::CheckingDevice;
use pagepool::{
    DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, OutOfMemory, PageSource, UnmapBatchError,
    UnmapError,
};

use super::counting::CountingPages;
use super::ops::Callback;

/// The payload of a panic raised by an armed fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injected(pub Callback);

/// What an armed fault does.
enum Action {
    Panic,
    /// Drops the buffer (a `Held` or a `TItem`) from inside the call.
    Drop(Box<dyn Any + Send>),
}

struct Trap {
    at: Callback,
    action: Action,
}

/// The one fault slot, shared by the backend wrapper ([`FaultyOps`]) and the
/// page source ([`FaultyPages`]). A fault is one-shot: the first call of
/// its callback takes it out of the slot (under the lock) and then acts
/// (outside the lock, so a re-entrant drop may make callbacks of its own).
/// Arming replaces the fault armed before and hands back its buffer, if it
/// had one. A thread that is already unwinding never fires a fault (a
/// second panic would abort the process).
#[derive(Clone, Default)]
pub struct Faults {
    slot: Arc<Mutex<Option<Trap>>>,
}

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Trap>> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn arm(&self, at: Callback, action: Action) -> Option<Box<dyn Any + Send>> {
        let old = self.lock().replace(Trap { at, action });
        match old {
            Some(Trap {
                action: Action::Drop(item),
                ..
            }) => Some(item),
            _ => None,
        }
    }

    /// Arms a panic in the next call of `at`.
    pub fn arm_panic(&self, at: Callback) -> Option<Box<dyn Any + Send>> {
        self.arm(at, Action::Panic)
    }

    /// Arms a drop of `item` inside the next call of `at`.
    pub fn arm_drop(&self, at: Callback, item: Box<dyn Any + Send>) -> Option<Box<dyn Any + Send>> {
        self.arm(at, Action::Drop(item))
    }

    /// Takes the armed fault out; hands back its buffer, if it had one.
    pub fn disarm(&self) -> Option<Box<dyn Any + Send>> {
        match self.lock().take() {
            Some(Trap {
                action: Action::Drop(item),
                ..
            }) => Some(item),
            _ => None,
        }
    }

    /// The callback the armed fault waits for.
    pub fn armed(&self) -> Option<Callback> {
        self.lock().as_ref().map(|t| t.at)
    }

    /// Called by the wrappers at the point where a fault of `at` acts.
    fn fire(&self, at: Callback) {
        if thread::panicking() {
            return;
        }
        let trap = {
            let mut slot = self.lock();
            let fires = slot.as_ref().is_some_and(|t| t.at == at);
            if fires {
                slot.take()
            } else {
                None
            }
        };
        match trap.map(|t| t.action) {
            None => {}
            Some(Action::Panic) => std::panic::panic_any(Injected(at)),
            Some(Action::Drop(item)) => drop(item),
        }
    }
}

/// Runs `f`; an [`Injected`] panic comes back as `Err`, any other panic goes
/// on (a failure).
pub fn catching<R>(f: impl FnOnce() -> R) -> Result<R, Injected> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => Ok(r),
        Err(payload) => match payload.downcast::<Injected>() {
            Ok(injected) => Err(*injected),
            Err(payload) => resume_unwind(payload),
        },
    }
}

/// Runs `f` on a fresh OS thread and waits for it; a panic there goes on
/// here, payload unchanged.
pub(super) fn on_spawned_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|payload| resume_unwind(payload))
    })
}

/// Silences the panic hook for [`Injected`] panics (they are expected and
/// caught); every other panic reaches the hook installed before (the
/// default one, or libFuzzer's, which aborts). Installed once per process.
pub fn quiet_injected_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<Injected>() {
                previous(info);
            }
        }));
    });
}

/// The backend the pools see: a [`CheckingDevice`] behind the fault slot.
/// Every method delegates; `map` lets an armed fault act first,
/// `unmap_batch`, the syncs and `on_unbind` after the checking device has
/// performed the call. CPU accesses are not part of `DmaOps`: the device is
/// bound with the checking device itself as its CPU-access check.
pub struct FaultyOps {
    inner: CheckingDevice,
    faults: Faults,
}

impl FaultyOps {
    /// Wraps `inner`; faults come from `faults`.
    pub fn new(inner: CheckingDevice, faults: Faults) -> Self {
        Self { inner, faults }
    }
}

impl DmaOps for FaultyOps {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        self.faults.fire(Callback::Map);
        // SAFETY: forwarded `DmaOps::map` contract.
        unsafe { self.inner.map(cpu, len, direction) }
    }

    unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
        // SAFETY: forwarded `DmaOps::unmap` contract.
        unsafe { self.inner.unmap(mapping) }
    }

    unsafe fn unmap_batch(&self, mappings: &[DmaMapping]) -> Result<(), UnmapBatchError> {
        // SAFETY: forwarded `DmaOps::unmap_batch` contract.
        let result = unsafe { self.inner.unmap_batch(mappings) };
        self.faults.fire(Callback::UnmapBatch);
        result
    }

    unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded `DmaOps::sync_for_device` contract.
        unsafe { self.inner.sync_for_device(mapping, offset, len) };
        self.faults.fire(Callback::SyncForDevice);
    }

    unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded `DmaOps::sync_for_cpu` contract.
        unsafe { self.inner.sync_for_cpu(mapping, offset, len) };
        self.faults.fire(Callback::SyncForCpu);
    }

    fn needs_sync(&self) -> bool {
        self.inner.needs_sync()
    }

    fn on_unbind(&self) {
        self.inner.on_unbind();
        self.faults.fire(Callback::OnUnbind);
    }
}

/// The page source the pools see: [`CountingPages`] (every block freed
/// exactly once) that can be told to fail the next allocations, and lets an
/// armed fault act in `alloc_pages` (before allocating) and `free_pages`
/// (after freeing). Clones share everything.
#[derive(Clone)]
pub struct FaultyPages {
    counting: CountingPages,
    faults: Faults,
    fail_next: Arc<AtomicUsize>,
}

impl FaultyPages {
    /// A source whose faults come from `faults`.
    pub fn new(faults: Faults) -> Self {
        Self {
            counting: CountingPages::default(),
            faults,
            fail_next: Arc::default(),
        }
    }

    /// The blocks handed out and given back.
    pub fn counting(&self) -> &CountingPages {
        &self.counting
    }

    /// Makes the next `n` allocations fail (replaces an earlier count).
    pub fn fail_next(&self, n: usize) {
        self.fail_next.store(n, Ordering::SeqCst);
    }
}

// SAFETY: delegates to CountingPages, which meets the contract; a fault
// never hands out or keeps a block (a panicking alloc_pages allocates
// nothing, a panicking free_pages has freed its block).
unsafe impl PageSource for FaultyPages {
    fn alloc_pages(&self, order: u32) -> Result<NonNull<u8>, OutOfMemory> {
        self.faults.fire(Callback::AllocPages);
        let failing = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(OutOfMemory);
        }
        self.counting.alloc_pages(order)
    }

    unsafe fn free_pages(&self, block: NonNull<u8>, order: u32) {
        // SAFETY: forwarded contract.
        let freed = unsafe { self.counting.free_once(block, order) };
        // A double free is only counted (a failure the checks report); no
        // fault acts in it.
        if freed {
            self.faults.fire(Callback::FreePages);
        }
    }
}
