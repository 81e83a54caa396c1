//! The per-thread record of device calls in progress: which devices each
//! thread is inside a call of, and what it must do when it leaves them.
//!
//! A thread gets its announcement slots on its first device call: one cache
//! line of [`DEPTH`] words, registered in a process-wide list that `unbind`
//! scans ([`wait_for_threads`]), and removed from it when the thread exits.
//! Slot `i` holds the device of the thread's `i`-th nested call, or 0. Calls
//! the slots cannot hold (deeper nesting, or a thread whose registration is
//! gone because it is exiting) are counted in their gate instead (see
//! `gate.rs`); the thread still notes their devices privately.
//!
//! # Invariants
//!
//! - Only the owning thread writes its slots; `unbind` reads them after its
//!   heavy fence (`sync::asymmetric`), which pairs with the caller's light
//!   one (Dekker's pattern, see `gate.rs`).
//! - A slot is cleared with `Release` when its call ends, so the call's
//!   effects happen-before the `unbind` that sees it clear.
//! - [`contains`] is exact: a thread is inside a call of a device if and
//!   only if one of its slots or counted-call notes names it; only past
//!   `DEPTH + COUNTED_NAMED` nested calls (the notes end) does it answer
//!   "maybe" for every device.
//! - Deferred unbinds ([`defer_unbind`]) run on their thread, outside every
//!   hold of their device, right after the hold that was the thread's last
//!   call of that device is released; the list is the thread's own and is
//!   freed once empty, so none outlives the thread.
//! - The thread's state stays reachable while its thread-local destructors
//!   run (`sync::thread_state!`), so a device call made from one works.

use core::cell::Cell;

use crate::sync::{
    asymmetric, backoff, per_execution_static, per_thread, thread_state, Arc, AtomicUsize, Mutex,
    Ordering,
};

/// Nested calls announced in slots; deeper ones are counted.
pub(crate) const DEPTH: usize = 4;

/// One thread's slots, on a line of their own.
#[repr(align(128))]
struct Slots([AtomicUsize; DEPTH]);

/// Counted calls whose device the thread notes (see [`contains`]).
pub(crate) const COUNTED_NAMED: usize = 16;

/// The calling thread's state. Constant-initialised and without `Drop`,
/// so reaching it is a plain thread-local access, valid even while the
/// thread's destructors run.
struct State {
    /// The thread's registered slots: null before its first call,
    /// [`gone`] once its registration was dropped (thread exit).
    slots: Cell<*const Slots>,
    /// Slots in use.
    depth: Cell<usize>,
    /// Calls of this thread counted in a gate instead, in progress.
    counted: Cell<usize>,
    /// The device of the thread's `i`-th counted call in progress, for
    /// the first [`COUNTED_NAMED`]; deeper ones name no device.
    counted_devices: [Cell<usize>; COUNTED_NAMED],
    /// Unbinds deferred until the thread's calls of their device end:
    /// null, or a list made by [`defer_unbind`] (owned here, freed by
    /// [`run_due_unbinds`] once empty).
    deferred: Cell<*mut Vec<DeferredUnbind>>,
}

impl State {
    const fn new(slots: *const Slots) -> Self {
        Self {
            slots: Cell::new(slots),
            depth: Cell::new(0),
            counted: Cell::new(0),
            counted_devices: [const { Cell::new(0) }; COUNTED_NAMED],
            deferred: Cell::new(core::ptr::null_mut()),
        }
    }

    /// Whether the thread is (or, past the noted depth, may be) inside
    /// a call of `device`.
    fn in_call_of(&self, device: usize) -> bool {
        let counted = self.counted.get();
        counted > COUNTED_NAMED
            || self.counted_devices[..counted]
                .iter()
                .any(|noted| noted.get() == device)
            || slots(self).is_some_and(|slots| {
                slots.0[..self.depth.get()]
                    .iter()
                    .any(|slot| slot.load(Ordering::Relaxed) == device)
            })
    }
}

/// An unbind to run once the thread is no longer inside a call of
/// `device`.
struct DeferredUnbind {
    device: usize,
    unbind: Box<dyn FnOnce()>,
}

/// Owns the thread's slots and their place in the registry; dropped at
/// thread exit.
struct Registration {
    slots: Arc<Slots>,
    /// The registry, held for this thread's drop: under loom the
    /// registry's static is gone by the time the main thread's
    /// thread-locals are dropped.
    registry: Arc<Registry>,
}

type Registry = Mutex<Vec<Arc<Slots>>>;

impl Registration {
    fn new() -> Self {
        let slots = Arc::new(Slots(core::array::from_fn(|_| AtomicUsize::new(0))));
        let registry = registry();
        registry.lock().push(Arc::clone(&slots));
        Self { slots, registry }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // From here on the thread's calls are counted, not announced.
        with_state(|state| state.slots.set(gone()));
        self.registry
            .lock()
            .retain(|slots| !Arc::ptr_eq(slots, &self.slots));
    }
}

/// The `slots` value of a thread whose registration is gone.
fn gone() -> *const Slots {
    core::ptr::NonNull::dangling().as_ptr()
}

per_execution_static! {
    /// Every thread's slots. Under loom and shuttle, one registry per
    /// execution (dropped after the execution's thread-locals).
    static ref REGISTRY: Arc<Registry> = Arc::new(Mutex::new(Vec::new()));
}

fn registry() -> Arc<Registry> {
    Arc::clone(&REGISTRY)
}

thread_state! {
    /// The thread's state: reachable for as long as the thread runs, its
    /// thread-local destructors included (a batch of remote returns going
    /// home at thread exit makes device calls). Under loom, after the
    /// thread's thread-locals are gone, a call gets a state of its own with
    /// no slots: it takes the counted path, which needs no thread state for
    /// `unbind` to wait for it.
    static STATE: State = const { State::new(core::ptr::null()) };
    after exit: State::new(gone());
    access: with_state;
}

per_thread! {
    /// The thread's registration, dropped at its exit (under shuttle, each
    /// shuttle thread's: the threads share one OS thread).
    static REGISTRATION: Registration = Registration::new();
}

/// The calling thread's slots, registering them on first use; `None`
/// once the thread's registration is gone.
#[inline(always)]
fn slots(state: &State) -> Option<&Slots> {
    let mut slots = state.slots.get();
    if slots.is_null() {
        slots = register(state);
    }
    if slots == gone() {
        return None;
    }
    // SAFETY: a pointer other than null and `gone()` came from the
    // thread's live `Registration`, whose `Arc` keeps the slots alive;
    // its drop replaces the pointer with `gone()` first.
    Some(unsafe { &*slots })
}

/// The calling thread is exiting (a thread-local's destructor is
/// running): its device calls from here on take the counted path and
/// never register slots. Registering now would create a thread-local
/// after the thread's destructors began, which loom never drops; under
/// `std` it only saves the work.
pub(crate) fn exiting() {
    with_state(|state| state.slots.set(gone()));
}

#[cold]
#[inline(never)]
fn register(state: &State) -> *const Slots {
    let slots = REGISTRATION
        .try_with(|registration| Arc::as_ptr(&registration.slots))
        .unwrap_or_else(|_| gone());
    state.slots.set(slots);
    slots
}

/// A call announced in one of the calling thread's slots.
pub(crate) struct Announced {
    /// The slot: one of the thread's, alive while its registration is,
    /// which outlives every call the thread makes.
    slot: core::ptr::NonNull<AtomicUsize>,
    /// Its index: the thread's depth before the call.
    index: usize,
}

/// Announces a call of `device` in the calling thread's next free slot
/// (a plain store; the caller fences), or returns `None` if the thread
/// has no free slot (the call is then counted).
#[inline(always)]
pub(crate) fn announce(device: usize) -> Option<Announced> {
    with_state(|state| {
        let index = state.depth.get();
        let slot = slots(state)?.0.get(index)?;
        slot.store(device, Ordering::Relaxed);
        state.depth.set(index + 1);
        Some(Announced {
            slot: core::ptr::NonNull::from(slot),
            index,
        })
    })
}

/// Ends the announced call (the thread's innermost). Returns whether
/// the thread has deferred unbinds, to run with [`run_due_unbinds`]
/// now that the call is over.
#[inline(always)]
pub(crate) fn withdraw(announced: &Announced) -> bool {
    let deferred = with_state(|state| {
        state.depth.set(announced.index);
        !state.deferred.get().is_null()
    });
    // SAFETY: the slot belongs to this thread's registration, which is
    // dropped only at thread exit, after every call of the thread ended.
    unsafe { announced.slot.as_ref() }.store(0, Ordering::Release);
    deferred
}

/// Notes a call of `device` this thread makes on the counted path.
pub(crate) fn enter_counted(device: usize) {
    with_state(|state| {
        let index = state.counted.get();
        if let Some(noted) = state.counted_devices.get(index) {
            noted.set(device);
        }
        state.counted.set(index + 1);
    });
}

/// Ends the thread's innermost counted call. Returns whether the thread
/// has deferred unbinds, as [`withdraw`] does.
pub(crate) fn leave_counted() -> bool {
    with_state(|state| {
        let index = state.counted.get() - 1;
        if let Some(noted) = state.counted_devices.get(index) {
            noted.set(0);
        }
        state.counted.set(index);
        !state.deferred.get().is_null()
    })
}

/// Whether this thread is inside a call of `device`: one announced in a
/// slot or noted on the counted path. Exact, unless more than
/// [`COUNTED_NAMED`] counted calls are in progress on the thread: past
/// that depth calls name no device, and the answer is "maybe" (true)
/// for every device.
pub(crate) fn contains(device: usize) -> bool {
    with_state(|state| state.in_call_of(device))
}

/// A number that names the calling thread while it runs.
pub(crate) fn thread_token() -> usize {
    with_state(|state| core::ptr::from_ref(state).addr())
}

/// Runs `unbind` (of `device`) once this thread is no longer inside a
/// call of `device`: right after the hold of its outermost such call is
/// released. For a device whose last handle is dropped inside one of
/// its own callbacks, where unbinding at once would wait for the
/// caller. Call only while [`contains`]`(device)` holds.
pub(crate) fn defer_unbind(device: usize, unbind: Box<dyn FnOnce()>) {
    with_state(|state| {
        let mut list = state.deferred.get();
        if list.is_null() {
            list = Box::into_raw(Box::default());
            state.deferred.set(list);
        }
        // SAFETY: a non-null `deferred` is a list this thread boxed; it is
        // only reached through its own state, and no reference to it
        // outlives one of these short accesses (no callback runs while
        // one is held).
        unsafe { &mut *list }.push(DeferredUnbind { device, unbind });
    });
}

/// Runs each deferred unbind whose device the thread is no longer
/// inside a call of, one at a time, outside every hold. Each runs to
/// completion: the unbind itself finishes every step whatever its
/// callbacks do, and a callback's panic that it resumes is discarded
/// here, since the handle whose drop asked for the unbind is gone and
/// the thread may be releasing a hold while unwinding.
#[cold]
#[inline(never)]
pub(crate) fn run_due_unbinds() {
    while let Some(due) = with_state(take_due_unbind) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(due.unbind));
    }
}

/// Takes one deferred unbind that is due out of the thread's list, and
/// frees the list once it is empty.
fn take_due_unbind(state: &State) -> Option<DeferredUnbind> {
    let list = state.deferred.get();
    if list.is_null() {
        return None;
    }
    // SAFETY: as in `defer_unbind`; the unbind runs after this access
    // ended (it may defer more, or run this function again).
    let entries = unsafe { &mut *list };
    let due = entries
        .iter()
        .position(|entry| !state.in_call_of(entry.device))
        .map(|index| entries.remove(index));
    if entries.is_empty() {
        state.deferred.set(core::ptr::null_mut());
        // SAFETY: boxed by `defer_unbind`, unreachable from here on.
        drop(unsafe { Box::from_raw(list) });
    }
    due
}

/// Waits until no thread has a call of `device` announced. Call after
/// closing every gate of the device: the heavy fence pairs with each
/// caller's light one, so a call not seen here sees its gate closed.
pub(crate) fn wait_for_threads(device: usize) {
    // BROKEN VARIANT (test-only, `--cfg pagepool_broken`,
    // PAGEPOOL_BROKEN=unbind-no-wait): return without waiting for calls
    // in progress, so unbind unmaps and retires the ops while a sync or
    // a map still runs. Caught by the call-gate and sync-on-recycle loom
    // models (loom's causality check on the ops cell) and the slow-path
    // model (a mapping live at `on_unbind`, an unmap after it).
    #[cfg(pagepool_broken)]
    if crate::sync::broken("unbind-no-wait") {
        return;
    }
    asymmetric::heavy();
    // A snapshot: a thread that registers later sees the gates closed
    // (the registry lock orders its first call after the close), and a
    // callback we wait for may start a thread without waiting on us.
    let threads: Vec<Arc<Slots>> = registry().lock().clone();
    for slots in &threads {
        for slot in &slots.0 {
            let mut round = 0;
            // Acquire: pairs with `withdraw`'s release.
            while slot.load(Ordering::Acquire) == device {
                backoff(round);
                round = round.saturating_add(1);
            }
        }
    }
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use super::*;

    /// A thread's slots leave the registry when the thread exits.
    #[test]
    fn an_exited_thread_leaves_the_registry() {
        let slots = std::thread::spawn(|| {
            let announced = announce(41).expect("a free slot");
            withdraw(&announced);
            REGISTRATION.with(|registration| Arc::downgrade(&registration.slots))
        })
        .join()
        .unwrap();
        assert!(slots.upgrade().is_none(), "no longer registered");
    }
}
