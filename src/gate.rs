//! The call gates: who may call the device's [`DmaOps`], and
//! until when.
//!
//! Every device call made outside `unbind` (a `map` on the slow path, the
//! unmap of a batch of pages leaving their pool, a sync, a CPU-access report)
//! runs inside one [`CallGate::enter`] hold of the pool it is made for.
//! `unbind` closes the gate of every pool of the device, then waits until no
//! call is in progress. A hold is announced in one of two ways:
//!
//! - **Fast**: in the calling thread's own slot (`held.rs`): a plain store of
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
use crate::held;
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
