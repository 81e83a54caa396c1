//! The call gate: who may call the device's [`DmaOps`](crate::DmaOps), and
//! until when.
//!
//! Every pool has its own gate, one word on its own cache line: the number of
//! device calls in progress for the pool, plus a `CLOSED` bit. Every device
//! call made outside `unbind` (a `map` on the slow path, the unmap of a page
//! leaving its pool, a sync, a CPU-access report) runs inside one
//! [`CallGate::enter`] hold. `unbind` sets `CLOSED` on the gate of every pool
//! of the device ([`CallGate::close`]), then waits until no call is in
//! progress ([`CallGate::wait_idle`]).
//!
//! # Invariants
//!
//! - `CLOSED` is set once and never cleared. `enter` succeeds only if it was
//!   clear when the count went up (one read-modify-write orders the two), so
//!   once `close` and `wait_idle` have returned, no call through the gate
//!   runs or will start (invariant 2).
//! - A hold covers one device call (a single `map`, `unmap_batch`, sync or
//!   CPU-access report) and the bookkeeping next to it, never a `PageSource`
//!   call, a wait for another thread, or a batch of calls. So `unbind` waits
//!   for at most one device call per thread (invariant 3), and a call that
//!   blocks makes `unbind` wait for that call only.
//! - Holds nest: a callback may drop a page (which enters a gate again)
//!   without waiting for anything. Threads working for different pools write
//!   different lines: the read side shares nothing across the pools of a
//!   device.
//! - Every thread lists the devices it is inside a call of ([`held`]), so an
//!   `unbind` from inside a device call of the same device refuses at once
//!   instead of waiting for its own caller.
//! - Whoever holds a [`CallGuard`] may use the device's ops: `unbind` retires
//!   them only after every gate of the device is closed and idle.

use core::ops::Deref;

use crate::dma::DmaOps;
use crate::sync::{backoff, AtomicUsize, Ordering, UnsafeCell};

/// Set once `unbind` began: no new hold is granted.
const CLOSED: usize = 1;
/// One call in progress (the count sits above the `CLOSED` bit).
const ONE_CALL: usize = 2;

/// A pool's gate. See the [module docs](self).
#[repr(align(128))]
pub(crate) struct CallGate {
    state: AtomicUsize,
    /// The device the gate belongs to, as [`held`] names it.
    device: usize,
}

/// One device call in progress; leaving it (drop, also on unwind) lets
/// `unbind` proceed.
#[must_use]
pub(crate) struct CallGuard<'a> {
    gate: &'a CallGate,
}

impl CallGate {
    /// An open gate of the device named `device` (see [`held`]).
    pub(crate) fn new(device: usize) -> Self {
        Self {
            state: AtomicUsize::new(0),
            device,
        }
    }

    /// Starts one device call, or returns `None` once `unbind` has begun.
    #[inline]
    pub(crate) fn enter(&self) -> Option<CallGuard<'_>> {
        // Acquire pairs with nothing on the open path (the ops were set
        // before the pool existed); on the closed path it keeps the caller's
        // later reads after unbind's close.
        let before = self.state.fetch_add(ONE_CALL, Ordering::Acquire);
        if before & CLOSED != 0 {
            self.state.fetch_sub(ONE_CALL, Ordering::Release);
            return None;
        }
        held::push(self.device);
        Some(CallGuard { gate: self })
    }

    /// Whether `unbind` has begun (a plain load: for paths that skip the
    /// device call but must still refuse once the device is going away).
    #[inline]
    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Refuses every later `enter`. Calls already in progress go on.
    pub(crate) fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
    }

    /// Waits until no call is in progress. After `close`, this waits for the
    /// calls that were running when it was closed, and for nothing else.
    pub(crate) fn wait_idle(&self) {
        let mut round = 0;
        // BROKEN VARIANT (test-only, `--cfg pagepool_broken`,
        // PAGEPOOL_BROKEN=unbind-no-wait): return without waiting for calls
        // in progress, so unbind unmaps and retires the ops while a sync or
        // a map still runs. Caught by the sync-on-recycle and slow-path loom
        // models (a call after `on_unbind`).
        #[cfg(pagepool_broken)]
        if crate::sync::broken("unbind-no-wait") {
            return;
        }
        // Acquire: each call's effects (a record inserted after `map`, a
        // page's record removed before its unmap) happen-before unbind's
        // walk, through the release of the call's exit.
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
    pub(crate) unsafe fn get(&self) -> Option<&dyn DmaOps> {
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
pub(crate) struct DeviceCall<'a> {
    ops: &'a dyn DmaOps,
    _call: CallGuard<'a>,
}

impl<'a> DeviceCall<'a> {
    /// Enters `gate` and, while it is open, hands out the ops in `cell`.
    ///
    /// # Safety
    /// `cell` holds the ops of the device `gate` belongs to.
    #[inline]
    pub(crate) unsafe fn enter(gate: &'a CallGate, cell: &'a OpsCell) -> Option<Self> {
        let call = gate.enter()?;
        // SAFETY: inside a device call of one of the device's pools.
        let ops = unsafe { cell.get() }?;
        Some(Self { ops, _call: call })
    }
}

impl Deref for DeviceCall<'_> {
    type Target = dyn DmaOps;

    #[inline]
    fn deref(&self) -> &Self::Target {
        self.ops
    }
}

impl Drop for CallGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        held::pop();
        // Release: the call and its bookkeeping happen-before the
        // `wait_idle` that sees the count drop.
        self.gate.state.fetch_sub(ONE_CALL, Ordering::Release);
    }
}

/// The devices the current thread is inside a call of, innermost last.
///
/// A few entries suffice: holds nest only when a callback drops a page, and
/// beyond [`held::DEPTH`] the list answers "maybe" ([`held::contains`] is
/// then `true`), which makes an `unbind` from there refuse rather than risk
/// waiting for itself.
pub(crate) mod held {
    use core::cell::Cell;

    /// Entries kept exactly.
    pub(crate) const DEPTH: usize = 4;

    struct Held {
        depth: Cell<usize>,
        devices: [Cell<usize>; DEPTH],
    }

    #[cfg(not(loom))]
    std::thread_local! {
        static HELD: Held = const {
            Held {
                depth: Cell::new(0),
                devices: [const { Cell::new(0) }; DEPTH],
            }
        };
    }

    #[cfg(loom)]
    loom::thread_local! {
        static HELD: Held = Held {
            depth: Cell::new(0),
            devices: [const { Cell::new(0) }; DEPTH],
        };
    }

    /// Notes that this thread entered a call of `device`.
    #[inline]
    pub(crate) fn push(device: usize) {
        HELD.with(|held| {
            let depth = held.depth.get();
            if let Some(slot) = held.devices.get(depth) {
                slot.set(device);
            }
            held.depth.set(depth + 1);
        });
    }

    /// Notes that this thread left its innermost call.
    #[inline]
    pub(crate) fn pop() {
        HELD.with(|held| held.depth.set(held.depth.get().saturating_sub(1)));
    }

    /// Whether this thread may be inside a call of `device`.
    pub(crate) fn contains(device: usize) -> bool {
        HELD.with(|held| {
            let depth = held.depth.get();
            depth > DEPTH || held.devices[..depth].iter().any(|d| d.get() == device)
        })
    }

    /// Marks the current thread as working for `device` until dropped:
    /// `unbind` wears it, so that a callback it runs cannot unbind again.
    pub(crate) struct Marker(());

    impl Marker {
        pub(crate) fn new(device: usize) -> Self {
            push(device);
            Marker(())
        }
    }

    impl Drop for Marker {
        fn drop(&mut self) {
            pop();
        }
    }
}

#[cfg(all(test, not(loom)))]
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
            let waiter = s.spawn(|| gate.wait_idle());
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
        gate.wait_idle();
    }

    #[test]
    fn deep_nesting_answers_maybe() {
        let gates: Vec<_> = (0..=held::DEPTH).map(|i| CallGate::new(100 + i)).collect();
        let holds: Vec<_> = gates.iter().map(|g| g.enter().unwrap()).collect();
        assert!(held::contains(999), "past DEPTH the answer is maybe");
        drop(holds);
        assert!(!held::contains(999));
    }
}
