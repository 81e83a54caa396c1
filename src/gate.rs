//! The call gates: who may call the device's [`DmaOps`], and
//! until when.
//!
//! Every device call made outside `unbind` (a `map` on the slow path, the
//! unmap of a batch of pages leaving their pool, a sync, a CPU-access report)
//! runs inside one [`CallGate::enter`] hold of the pool it is made for.
//! `unbind` closes the gate of every pool of the device, then waits until no
//! call is in progress. A hold is announced in one of two ways:
//!
//! - **Fast**: in the calling thread's own slot ([`held`]): a plain store of
//!   the device's key into a cache line only that thread writes, then a
//!   *light* fence, then a plain load of the gate's `CLOSED` bit. `unbind`
//!   sets `CLOSED`, issues the matching *heavy* fence
//!   ([`crate::sync::asymmetric`]), and scans every thread's slots until none
//!   names the device. The two fences order the store before the load on
//!   both sides (Dekker's pattern), so either the caller sees `CLOSED` and
//!   backs out, or `unbind` sees the slot and waits. On Linux the heavy fence
//!   is `membarrier(2)` and the light one costs nothing at run time, so a
//!   device call adds no atomic read-modify-write and no shared write to the
//!   per-packet path; elsewhere both are full fences.
//! - **Counted**: when the thread's slots are all in use (deeply nested
//!   callbacks) or gone (thread-local destructors running), the gate's word
//!   counts the call with a read-modify-write, which the same word's
//!   `CLOSED` bit orders; `unbind` waits for the count to reach zero. The
//!   thread still notes, in its private state, which device each counted
//!   call is for (up to [`held::COUNTED_NAMED`] of them), so that it can
//!   tell its own callbacks apart from other devices' on either path.
//!
//! # Invariants
//!
//! - `CLOSED` is set once and never cleared. Once `unbind` has closed the
//!   gates and both waits returned, no call through them runs or will start
//!   (invariant 2).
//! - A hold covers one device call (a single `map`, `unmap_batch`, sync or
//!   CPU-access report) and the bookkeeping next to it, never a `PageSource`
//!   call, a wait for another thread, or a batch of calls. So `unbind` waits
//!   for at most one device call per thread (invariant 3), and a call that
//!   blocks makes `unbind` wait for that call only.
//! - Holds nest: a callback may drop a page (which enters a gate again)
//!   without waiting for anything.
//! - On the fast path a thread writes only its own slot line; the gate's
//!   word is read, and written only by `unbind` and the counted path. Pools
//!   of a device, and threads of a pool, share no written line.
//! - A thread's slots and its counted-call notes tell whether it is inside
//!   a call of a device ([`held::contains`]), so an `unbind` from inside a
//!   device call of the same device refuses at once instead of waiting for
//!   its own caller, and one of another device goes ahead. The answer is
//!   exact unless the thread nests more than `DEPTH + COUNTED_NAMED` calls;
//!   only then does it answer "maybe" for every device.
//! - An unbind deferred on a thread ([`held::defer_unbind`]: the last
//!   `Device` handle dropped inside one of its own callbacks) runs when that
//!   thread's last call of the device ends, right after the hold is
//!   released (its slot cleared or its count given back), so the unbind
//!   never waits for its own thread.
//! - Whoever holds a [`CallGuard`] may use the device's ops: `unbind`
//!   retires them only after every gate of the device is closed and idle.

use core::ops::Deref;
use core::ptr::NonNull;

use crate::dma::DmaOps;
use crate::sync::{asymmetric, backoff, AtomicUsize, Ordering, UnsafeCell};

/// Set once `unbind` began: no new hold is granted.
const CLOSED: usize = 1;
/// One counted call in progress (the count sits above the `CLOSED` bit).
const ONE_CALL: usize = 2;

/// A pool's gate. See the [module docs](self).
#[repr(align(128))]
pub(crate) struct CallGate {
    state: AtomicUsize,
    /// The device the gate belongs to, as [`held`] names it.
    device: usize,
    /// [`asymmetric::uses_membarrier`], read once at build time so the
    /// fast path finds it on the line it reads anyway.
    membarrier: bool,
}

/// One device call in progress; leaving it (drop, also on unwind) lets
/// `unbind` proceed.
#[must_use]
pub(crate) struct CallGuard<'a> {
    gate: &'a CallGate,
    /// Announced in one of the thread's slots, or counted in the gate.
    slot: Option<held::Announced>,
}

impl CallGate {
    /// An open gate of the device named `device` (see [`held`]).
    pub(crate) fn new(device: usize) -> Self {
        // Both sides of this gate's handshake use the fence mode fixed here.
        asymmetric::prepare();
        Self {
            state: AtomicUsize::new(0),
            device,
            membarrier: asymmetric::uses_membarrier(),
        }
    }

    /// Starts one device call, or returns `None` once `unbind` has begun.
    #[inline(always)]
    pub(crate) fn enter(&self) -> Option<CallGuard<'_>> {
        match held::announce(self.device) {
            Some(slot) => {
                // The slot store above, then this fence, then the load: see
                // the module docs (unbind: close, heavy fence, scan).
                asymmetric::light_for(self.membarrier);
                if self.state.load(Ordering::Relaxed) & CLOSED != 0 {
                    if held::withdraw(&slot) {
                        held::run_due_unbinds();
                    }
                    return None;
                }
                Some(CallGuard {
                    gate: self,
                    slot: Some(slot),
                })
            }
            None => self.enter_counted(),
        }
    }

    /// The counted path of [`enter`](Self::enter).
    #[cold]
    fn enter_counted(&self) -> Option<CallGuard<'_>> {
        let before = self.state.fetch_add(ONE_CALL, Ordering::Acquire);
        if before & CLOSED != 0 {
            self.state.fetch_sub(ONE_CALL, Ordering::Release);
            return None;
        }
        held::enter_counted(self.device);
        Some(CallGuard {
            gate: self,
            slot: None,
        })
    }

    /// Whether `unbind` has begun (a plain load: for paths that skip the
    /// device call but must still refuse once the device is going away).
    #[inline]
    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Refuses every later `enter`. Calls already in progress go on; wait
    /// for them with [`held::wait_for_threads`] (once per device, after
    /// closing all its gates) and [`wait_idle`](Self::wait_idle).
    pub(crate) fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::SeqCst);
    }

    /// Waits until no counted call is in progress.
    pub(crate) fn wait_idle(&self) {
        // BROKEN VARIANT (test-only, `--cfg pagepool_broken`,
        // PAGEPOOL_BROKEN=unbind-no-wait): see `held::wait_for_threads`.
        #[cfg(pagepool_broken)]
        if crate::sync::broken("unbind-no-wait") {
            return;
        }
        let mut round = 0;
        // Acquire: each call's effects happen-before unbind's walk, through
        // the release of the call's exit.
        while self.state.load(Ordering::Acquire) >= ONE_CALL {
            backoff(round);
            round = round.saturating_add(1);
        }
    }
}

/// The device's ops, until `unbind` retires them.
///
/// Read only by a thread inside a device call of one of the device's pools
/// (a [`CallGuard`] of theirs is live), or by `unbind` itself; taken only by
/// `unbind`, after it closed every gate of the device and waited for each
/// to go idle. Those two rules are the whole of its synchronisation: the
/// gates order every read before the take.
pub(crate) struct OpsCell(UnsafeCell<Option<Box<dyn DmaOps>>>);

// SAFETY: the ops are `Send + Sync` (a `DmaOps` bound); reads and the one
// take are ordered by the gates (see above).
unsafe impl Send for OpsCell {}
// SAFETY: as above.
unsafe impl Sync for OpsCell {}

impl OpsCell {
    pub(crate) fn new(ops: Box<dyn DmaOps>) -> Self {
        Self(UnsafeCell::new(Some(ops)))
    }

    /// The ops, or `None` once retired.
    ///
    /// # Safety
    /// The caller is inside a device call of one of the device's pools, or
    /// is the device's `unbind` (see the type's docs).
    pub(crate) unsafe fn get(&self) -> Option<&(dyn DmaOps + 'static)> {
        // SAFETY: no `take` runs concurrently (caller contract), so the box
        // stays where it is while the reference lives.
        self.0.with(|ops| unsafe { (*ops).as_deref() })
    }

    /// Takes the ops out, for good.
    ///
    /// # Safety
    /// Called by `unbind` only, after every gate of the device is closed and
    /// idle; no reference from [`get`](Self::get) is used afterwards.
    pub(crate) unsafe fn take(&self) -> Option<Box<dyn DmaOps>> {
        // SAFETY: exclusive by the caller contract.
        self.0.with_mut(|ops| unsafe { (*ops).take() })
    }
}

/// One device call in progress, with the ops to make it through.
///
/// The ops are kept as a pointer, not a reference: leaving the call (the
/// guard's drop) may run a deferred unbind on this thread, which retires
/// and drops the ops, so no reference to them may be live (or, as a field
/// of the value being dropped, protected) at that point. References are
/// handed out by `Deref`, borrowing the call.
pub(crate) struct DeviceCall<'a> {
    ops: NonNull<dyn DmaOps>,
    _call: CallGuard<'a>,
}

impl<'a> DeviceCall<'a> {
    /// Enters `gate` and, while it is open, hands out the ops in `cell`.
    ///
    /// # Safety
    /// `cell` holds the ops of the device `gate` belongs to.
    #[inline(always)]
    pub(crate) unsafe fn enter(gate: &'a CallGate, cell: &'a OpsCell) -> Option<Self> {
        let call = gate.enter()?;
        // SAFETY: inside a device call of one of the device's pools.
        let ops = unsafe { cell.get() }?;
        Some(Self {
            ops: NonNull::from(ops),
            _call: call,
        })
    }
}

impl Deref for DeviceCall<'_> {
    type Target = dyn DmaOps;

    #[inline]
    fn deref(&self) -> &Self::Target {
        // SAFETY: the ops stay in their cell while the call is held (no
        // `take` before every hold of the device ended), and the reference
        // borrows the call, so it ends before the call does.
        unsafe { self.ops.as_ref() }
    }
}

impl Drop for CallGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        let deferred = match self.slot {
            // Release: the call and its bookkeeping happen-before the scan
            // that sees the slot cleared.
            Some(ref slot) => held::withdraw(slot),
            None => {
                let deferred = held::leave_counted();
                self.gate.state.fetch_sub(ONE_CALL, Ordering::Release);
                deferred
            }
        };
        // After the hold is released: a deferred unbind of this device must
        // not wait for this very call.
        if deferred {
            held::run_due_unbinds();
        }
    }
}

/// Every thread's announcement slots: which devices it is inside a call of.
///
/// A thread gets its slots on its first device call: one cache line of
/// [`held::DEPTH`] words, registered in a process-wide list that `unbind`
/// scans, and removed from it when the thread exits. Slot `i` holds the
/// device of the thread's `i`-th nested call, or 0.
pub(crate) mod held {
    use core::cell::Cell;

    use crate::sync::{asymmetric, backoff, Arc, AtomicUsize, Mutex, Ordering};

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
            let _ = STATE.try_with(|state| state.slots.set(gone()));
            self.registry
                .lock()
                .retain(|slots| !Arc::ptr_eq(slots, &self.slots));
        }
    }

    /// The `slots` value of a thread whose registration is gone.
    fn gone() -> *const Slots {
        core::ptr::NonNull::dangling().as_ptr()
    }

    #[cfg(not(any(loom, shuttle)))]
    fn registry() -> Arc<Registry> {
        static REGISTRY: std::sync::OnceLock<Arc<Registry>> = std::sync::OnceLock::new();
        Arc::clone(REGISTRY.get_or_init(|| Arc::new(Mutex::new(Vec::new()))))
    }

    #[cfg(loom)]
    fn registry() -> Arc<Registry> {
        loom::lazy_static! {
            static ref REGISTRY: Arc<Registry> = Arc::new(Mutex::new(Vec::new()));
        }
        Arc::clone(&REGISTRY)
    }

    /// Under shuttle, as under loom, a registry per execution: a static
    /// holding shuttle primitives must not outlive the execution that
    /// built them. Shuttle drops it after the execution's thread-locals.
    #[cfg(all(shuttle, not(loom)))]
    fn registry() -> Arc<Registry> {
        shuttle::lazy_static! {
            static ref REGISTRY: Arc<Registry> = Arc::new(Mutex::new(Vec::new()));
        }
        Arc::clone(&REGISTRY)
    }

    #[cfg(not(any(loom, shuttle)))]
    std::thread_local! {
        static STATE: State = const { State::new(core::ptr::null()) };
        static REGISTRATION: Registration = Registration::new();
    }

    #[cfg(loom)]
    loom::thread_local! {
        static STATE: State = State::new(core::ptr::null());
        static REGISTRATION: Registration = Registration::new();
    }

    // Under shuttle, each shuttle thread's registration (the threads share
    // one OS thread), fresh in every execution and dropped at the thread's
    // exit, as `std`'s.
    #[cfg(all(shuttle, not(loom)))]
    shuttle::thread_local! {
        static REGISTRATION: Registration = Registration::new();
    }

    /// Under shuttle, `STATE` keeps what the `std` build relies on: it is
    /// reachable for as long as the thread runs, its thread-local
    /// destructors included. A `shuttle::thread_local!` value is destroyed
    /// at thread exit like any other (oldest first) and cannot be read
    /// again, so a later destructor that makes a device call (a per-thread
    /// batch of returned pages going home) would panic in `announce`. Each
    /// shuttle thread's `State` lives instead in a map of the execution,
    /// dropped with the execution's statics after every thread-local.
    #[cfg(all(shuttle, not(loom)))]
    static STATE: shuttle_state::Key = shuttle_state::Key;

    #[cfg(all(shuttle, not(loom)))]
    mod shuttle_state {
        use core::cell::RefCell;
        use std::collections::HashMap;

        use super::State;

        /// Every shuttle thread's `State`, boxed so that a `State` stays
        /// where it is while the map grows; entries are never removed.
        struct States(RefCell<HashMap<shuttle::thread::ThreadId, Box<State>>>);

        // SAFETY: shuttle runs every thread of an execution on one OS
        // thread, one at a time, switching only at its own scheduling
        // points; the map is borrowed only inside `Key::with`, across no
        // scheduling point, so no two borrows overlap.
        unsafe impl Sync for States {}

        shuttle::lazy_static! {
            static ref STATES: States = States(RefCell::new(HashMap::new()));
        }

        /// `STATE` under shuttle: `with` and `try_with` as a `LocalKey`'s.
        pub(super) struct Key;

        impl Key {
            pub(super) fn with<R>(&'static self, f: impl FnOnce(&State) -> R) -> R {
                let me = shuttle::thread::current().id();
                let state: *const State = {
                    let mut states = STATES.0.borrow_mut();
                    let state = states
                        .entry(me)
                        .or_insert_with(|| Box::new(State::new(core::ptr::null())));
                    &**state
                };
                // SAFETY: the box is never removed from the map nor moved
                // before the execution ends, which outlives this call; the
                // map's borrow ended above, so `f` may call `with` again.
                f(unsafe { &*state })
            }

            pub(super) fn try_with<R>(
                &'static self,
                f: impl FnOnce(&State) -> R,
            ) -> Result<R, core::convert::Infallible> {
                Ok(self.with(f))
            }
        }
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
        let _ = STATE.try_with(|state| state.slots.set(gone()));
    }

    /// Runs `f` on the calling thread's state.
    #[cfg(not(loom))]
    #[inline(always)]
    fn with_state<R>(f: impl FnOnce(&State) -> R) -> R {
        STATE.with(f)
    }

    /// Under loom a thread's `STATE` is destroyed at thread exit with its
    /// other thread-locals (`std`'s never is: it has no `Drop`), so a device
    /// call made from a thread-local's destructor (a batch of remote returns
    /// going home) finds it gone. It then gets a state of its own with no
    /// slots: the call takes the counted path, which needs no thread state
    /// for `unbind` to wait for it.
    #[cfg(loom)]
    #[inline(always)]
    fn with_state<R>(f: impl FnOnce(&State) -> R) -> R {
        let mut f = Some(f);
        if let Ok(r) = STATE.try_with(|state| f.take().expect("runs once")(state)) {
            return r;
        }
        let exiting = State::new(gone());
        f.take().expect("runs once")(&exiting)
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
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use super::*;

    #[test]
    fn close_refuses_new_calls_and_waits_for_running_ones() {
        let gate = CallGate::new(1);
        let running = gate.enter().expect("open");
        assert!(held::contains(1));
        assert!(!held::contains(2));
        gate.close();
        assert!(gate.is_closed());
        assert!(gate.enter().is_none(), "closed: no new call");
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                held::wait_for_threads(1);
                gate.wait_idle();
            });
            std::thread::sleep(std::time::Duration::from_millis(5));
            assert!(!waiter.is_finished(), "waits for the running call");
            drop(running);
            waiter.join().unwrap();
        });
        assert!(!held::contains(1));
    }

    #[test]
    fn holds_nest_and_unwind() {
        let gate = CallGate::new(7);
        let outer = gate.enter().unwrap();
        let inner = gate.enter().unwrap();
        drop(inner);
        drop(outer);
        let result = std::panic::catch_unwind(|| {
            let _call = gate.enter().unwrap();
            panic!("a device call panics");
        });
        assert!(result.is_err());
        assert!(!held::contains(7), "the unwind left the call");
        gate.close();
        held::wait_for_threads(7);
        gate.wait_idle();
    }

    /// Once a thread is exiting, its calls are counted in the gate, not
    /// announced in slots (it registers nothing any more).
    #[test]
    fn an_exiting_thread_counts_its_calls() {
        let gate = CallGate::new(11);
        std::thread::scope(|s| {
            s.spawn(|| {
                let first = gate.enter().expect("open");
                assert!(first.slot.is_some(), "announced");
                drop(first);
                held::exiting();
                let call = gate.enter().expect("open");
                assert!(call.slot.is_none(), "counted once exiting");
                assert!(held::contains(11));
                assert!(!held::contains(12), "another device is not refused");
                drop(call);
                assert!(!held::contains(11));
            })
            .join()
            .unwrap()
        });
        gate.close();
        gate.wait_idle();
    }

    #[test]
    fn deep_nesting_is_counted_and_waited_for() {
        let gates: Vec<_> = (0..=held::DEPTH).map(|i| CallGate::new(100 + i)).collect();
        let holds: Vec<_> = gates.iter().map(|g| g.enter().unwrap()).collect();
        assert!(holds.last().unwrap().slot.is_none(), "counted");
        assert!(held::contains(100 + held::DEPTH), "a counted call is noted");
        assert!(!held::contains(999), "and names its device only");
        let deepest = gates.last().unwrap();
        deepest.close();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| deepest.wait_idle());
            std::thread::sleep(std::time::Duration::from_millis(5));
            assert!(!waiter.is_finished(), "waits for the counted call");
            drop(holds);
            waiter.join().unwrap();
        });
        assert!(!held::contains(999));
    }

    /// Past the noted depth the answer is "maybe", and exact again once the
    /// calls return.
    #[test]
    fn counted_calls_past_the_noted_depth_answer_maybe() {
        let depth = held::DEPTH + held::COUNTED_NAMED + 1;
        let gates: Vec<_> = (0..depth).map(|i| CallGate::new(200 + i)).collect();
        let mut holds: Vec<_> = gates.iter().map(|g| g.enter().unwrap()).collect();
        assert!(held::contains(999), "an unnamed call: maybe");
        holds.pop();
        assert!(!held::contains(999), "every call named again");
        assert!(held::contains(200 + depth - 2));
        drop(holds);
        assert!(!held::contains(200));
    }

    /// A deferred unbind runs once the thread's outermost call of its device
    /// has ended, after that hold was released, on either path.
    #[test]
    fn a_deferred_unbind_runs_after_the_outermost_call_of_its_device() {
        use std::cell::Cell;
        use std::rc::Rc;

        for counted in [false, true] {
            let device = 300;
            let gate = CallGate::new(device);
            let other = CallGate::new(301);
            // Fill the slots so that the calls below are counted.
            let fillers: Vec<_> = (0..if counted { held::DEPTH } else { 0 })
                .map(|_| other.enter().unwrap())
                .collect();
            let ran = Rc::new(Cell::new(0));
            let outer = gate.enter().unwrap();
            assert_eq!(outer.slot.is_none(), counted);
            let inner = gate.enter().unwrap();
            let seen = Rc::clone(&ran);
            let closing = std::sync::Arc::new(CallGate::new(device));
            held::defer_unbind(
                device,
                Box::new(move || {
                    // Runs outside every call of the device...
                    assert!(!held::contains(device));
                    // ...so waiting for the device's calls returns at once.
                    closing.close();
                    held::wait_for_threads(device);
                    closing.wait_idle();
                    seen.set(seen.get() + 1);
                }),
            );
            drop(inner);
            assert_eq!(ran.get(), 0, "the outer call is still in progress");
            let unrelated = other.enter().unwrap();
            drop(unrelated);
            assert_eq!(ran.get(), 0, "another device's call changes nothing");
            drop(outer);
            assert_eq!(ran.get(), 1, "ran when the outermost call ended");
            drop(fillers);
            assert_eq!(ran.get(), 1, "once");
        }
    }
}
