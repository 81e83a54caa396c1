//! Every synchronisation primitive the crate uses, in one place.
//!
//! Normal builds get `std` atomics and `Arc` and `parking_lot` locks (`std`
//! locks under Miri, see `std_locks`). Builds
//! with `RUSTFLAGS="--cfg loom"` get loom's versions of all of them, wrapped
//! to the same (non-poisoning) API, so the loom models in `loom-tests/`
//! explore every interleaving of the real pool code. Builds with
//! `RUSTFLAGS="--cfg shuttle"` get shuttle's (atomics, fences, mutexes,
//! yields, thread-locals), wrapped the same way, so the randomized
//! whole-pool scenarios in `shuttle-tests/` schedule the real pool code.
//!
//! Invariants:
//! - No other module names `std::sync`, `parking_lot`, `loom` or `shuttle`
//!   directly, or switches on `cfg(loom)` / `cfg(shuttle)` (but to leave
//!   its unit tests out of the checkers' builds): thread-locals
//!   ([`per_thread!`], [`thread_state!`]) and per-process statics
//!   ([`per_execution_static!`]) are declared through this module's macros,
//!   which pick the checker's version. A primitive declared elsewhere would
//!   be invisible to the model checker and the scheduler.
//! - Page memory comes from [`alloc_zeroed`] / [`dealloc`], which are loom's
//!   tracked allocator under loom, so a leaked page fails the model. Shuttle
//!   tracks no allocation: its scenarios count what their page sources give
//!   out and take back.

#[cfg(all(loom, shuttle))]
compile_error!("`--cfg loom` and `--cfg shuttle` are two different checkers: pick one");

#[cfg(not(any(loom, shuttle)))]
mod imp {
    #[cfg(miri)]
    pub(crate) use super::std_locks::{Mutex, MutexGuard};
    #[cfg(not(miri))]
    pub(crate) use parking_lot::{Mutex, MutexGuard};
    // Only the VFIO backend orders its doorbell writes with a fence.
    #[cfg_attr(not(feature = "vfio"), allow(unused_imports))]
    pub(crate) use std::sync::atomic::fence;
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    pub(crate) use std::sync::Arc;

    /// Allocates zeroed memory for `layout`.
    ///
    /// # Safety
    /// `layout` has a non-zero size.
    pub(crate) unsafe fn alloc_zeroed(layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller guarantees a non-zero size.
        unsafe { std::alloc::alloc_zeroed(layout) }
    }

    /// Frees memory from [`alloc_zeroed`].
    ///
    /// # Safety
    /// `ptr` came from `alloc_zeroed(layout)` and is not used afterwards.
    pub(crate) unsafe fn dealloc(ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded caller contract.
        unsafe { std::alloc::dealloc(ptr, layout) }
    }

    /// Lets the current thread give way inside a deliberately slow call.
    pub(crate) fn pause(delay: std::time::Duration) {
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
    }

    /// One round of waiting for another thread to finish a bounded piece
    /// of work (a device call): spin briefly, then yield, then sleep a
    /// little, so a long device call does not burn a core.
    pub(crate) fn backoff(round: u32) {
        if round < 64 {
            core::hint::spin_loop();
        } else if round < 128 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
    }

    pub(crate) use core::cell::UnsafeCell as RawUnsafeCell;
}

#[cfg(loom)]
mod loom_imp {
    pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
    pub(crate) use loom::sync::Arc;

    /// A loom mutex with `parking_lot`'s non-poisoning API.
    #[derive(Debug)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);
    pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(loom::sync::Mutex::new(value))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().expect("loom mutex poisoned")
        }
    }

    /// Allocates zeroed memory through loom's leak-tracking allocator.
    ///
    /// # Safety
    /// `layout` has a non-zero size.
    pub(crate) unsafe fn alloc_zeroed(layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller guarantees a non-zero size.
        let ptr = unsafe { loom::alloc::alloc(layout) };
        if !ptr.is_null() {
            // SAFETY: `ptr` is a fresh allocation of `layout.size()` bytes.
            unsafe { ptr.write_bytes(0, layout.size()) };
        }
        ptr
    }

    /// Frees memory from [`alloc_zeroed`] through loom's allocator.
    ///
    /// # Safety
    /// `ptr` came from `alloc_zeroed(layout)` and is not used afterwards.
    pub(crate) unsafe fn dealloc(ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded caller contract.
        unsafe { loom::alloc::dealloc(ptr, layout) }
    }

    /// Under loom a delay is a yield: it widens the race window by letting
    /// the scheduler switch threads here.
    pub(crate) fn pause(delay: std::time::Duration) {
        if !delay.is_zero() {
            loom::thread::yield_now();
        }
    }

    /// Under loom every round of a wait loop yields, so the model explores
    /// the other threads instead of spinning.
    pub(crate) fn backoff(_round: u32) {
        loom::thread::yield_now();
    }

    pub(crate) use loom::cell::UnsafeCell as RawUnsafeCell;
}

#[cfg(all(shuttle, not(loom)))]
mod shuttle_imp {
    pub(crate) use shuttle::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
    // `std`'s `Arc`: shuttle's is the same type (it schedules nothing).
    pub(crate) use shuttle::sync::Arc;

    /// A shuttle mutex with `parking_lot`'s non-poisoning API: each lock is
    /// a scheduling point.
    #[derive(Debug)]
    pub(crate) struct Mutex<T>(shuttle::sync::Mutex<T>);
    pub(crate) type MutexGuard<'a, T> = shuttle::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(shuttle::sync::Mutex::new(value))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }

    /// Allocates zeroed memory for `layout` (`std`'s allocator: shuttle
    /// tracks no allocation).
    ///
    /// # Safety
    /// `layout` has a non-zero size.
    pub(crate) unsafe fn alloc_zeroed(layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller guarantees a non-zero size.
        unsafe { std::alloc::alloc_zeroed(layout) }
    }

    /// Frees memory from [`alloc_zeroed`].
    ///
    /// # Safety
    /// `ptr` came from `alloc_zeroed(layout)` and is not used afterwards.
    pub(crate) unsafe fn dealloc(ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded caller contract.
        unsafe { std::alloc::dealloc(ptr, layout) }
    }

    /// Under shuttle a delay is a yield: shuttle has no clock, and a real
    /// sleep would stall every thread of the execution (they share one OS
    /// thread). The yield lets the scheduler switch threads here.
    pub(crate) fn pause(delay: std::time::Duration) {
        if !delay.is_zero() {
            shuttle::thread::yield_now();
        }
    }

    /// Under shuttle every round of a wait loop yields, which also tells the
    /// scheduler to run another thread instead of this spinning one.
    pub(crate) fn backoff(_round: u32) {
        shuttle::thread::yield_now();
    }

    pub(crate) use core::cell::UnsafeCell as RawUnsafeCell;
}

#[cfg(not(any(loom, shuttle)))]
pub(crate) use imp::*;
#[cfg(loom)]
pub(crate) use loom_imp::*;
#[cfg(all(shuttle, not(loom)))]
pub(crate) use shuttle_imp::*;

/// `thread_local!` for the build: `std`'s, loom's or shuttle's, so that each
/// model thread gets its own value and it starts afresh in every execution.
/// Use it, not `std::thread_local!`, for any thread-local that holds pool
/// state. The initialiser is written `const { .. }`: `std` builds use it as
/// a `const` initialiser (no lazy-init check on access), loom and shuttle,
/// which have none, as a plain one. Under loom and shuttle a thread's
/// values are destroyed at its exit oldest first, and a value already
/// destroyed cannot be read again (its `with` panics, `try_with` fails); a
/// destructor that may make a device call must cope with that, or keep its
/// state in a [`thread_state!`].
macro_rules! per_thread {
    ($(#[$attr:meta])* static $name:ident: $t:ty = const { $init:expr };) => {
        #[cfg(not(any(loom, shuttle)))]
        std::thread_local! { $(#[$attr])* static $name: $t = const { $init }; }
        #[cfg(loom)]
        loom::thread_local! { $(#[$attr])* static $name: $t = $init; }
        #[cfg(all(shuttle, not(loom)))]
        shuttle::thread_local! { $(#[$attr])* static $name: $t = $init; }
    };
    ($(#[$attr:meta])* static $name:ident: $t:ty = $init:expr;) => {
        #[cfg(not(any(loom, shuttle)))]
        std::thread_local! { $(#[$attr])* static $name: $t = $init; }
        #[cfg(loom)]
        loom::thread_local! { $(#[$attr])* static $name: $t = $init; }
        #[cfg(all(shuttle, not(loom)))]
        shuttle::thread_local! { $(#[$attr])* static $name: $t = $init; }
    };
}
pub(crate) use per_thread;

/// Per-thread state that every code path of the thread can reach, its
/// thread-local destructors included: declared as
/// `static NAME: T = const { init }; after exit: exiting; access: with_name;`
/// it defines `fn with_name<R>(f: impl FnOnce(&T) -> R) -> R`. `T` must not
/// need dropping.
///
/// - `std`: a `const`-initialised thread-local without `Drop`, which stays
///   readable while the thread's other thread-locals are destroyed.
/// - shuttle: the value lives in a per-execution map keyed by the thread
///   and the static ([`ShuttleThreadState`]), dropped with the execution's
///   statics after every thread-local, for the same reach.
/// - loom: a loom thread-local (fresh in every execution), destroyed at
///   thread exit with the others; a call after that gets a fresh value
///   built by `exiting`, for that call only.
macro_rules! thread_state {
    (
        $(#[$attr:meta])* static $name:ident: $t:ty = const { $init:expr };
        after exit: $exiting:expr;
        access: $with:ident;
    ) => {
        #[cfg(not(any(loom, shuttle)))]
        std::thread_local! { $(#[$attr])* static $name: $t = const { $init }; }
        #[cfg(loom)]
        loom::thread_local! { $(#[$attr])* static $name: $t = $init; }
        #[cfg(all(shuttle, not(loom)))]
        $(#[$attr])*
        static $name: $crate::sync::ShuttleThreadState<$t> =
            $crate::sync::ShuttleThreadState::new(|| $init);

        /// Runs `f` on the calling thread's value (see `sync::thread_state!`).
        #[inline(always)]
        fn $with<R>(f: impl FnOnce(&$t) -> R) -> R {
            #[cfg(not(loom))]
            {
                $name.with(f)
            }
            #[cfg(loom)]
            {
                let mut f = Some(f);
                if let Ok(r) = $name.try_with(|state| f.take().expect("runs once")(state)) {
                    return r;
                }
                let exiting: $t = $exiting;
                f.take().expect("runs once")(&exiting)
            }
        }
    };
}
pub(crate) use thread_state;

/// A static built on first use and, under loom and shuttle, again in every
/// execution (a static holding their primitives must not outlive the
/// execution that built them): `std::sync::LazyLock`, or the checker's
/// `lazy_static!`. Declared as `static ref NAME: T = init;`; read through
/// `&*NAME`.
macro_rules! per_execution_static {
    ($(#[$attr:meta])* static ref $name:ident: $t:ty = $init:expr;) => {
        #[cfg(not(any(loom, shuttle)))]
        $(#[$attr])*
        static $name: std::sync::LazyLock<$t> = std::sync::LazyLock::new(|| $init);
        #[cfg(loom)]
        loom::lazy_static! { $(#[$attr])* static ref $name: $t = $init; }
        #[cfg(all(shuttle, not(loom)))]
        shuttle::lazy_static! { $(#[$attr])* static ref $name: $t = $init; }
    };
}
pub(crate) use per_execution_static;

#[cfg(all(shuttle, not(loom)))]
pub(crate) use shuttle_state::ShuttleThreadState;

/// [`thread_state!`] under shuttle.
#[cfg(all(shuttle, not(loom)))]
mod shuttle_state {
    use core::any::Any;
    use core::cell::RefCell;
    use std::collections::HashMap;

    /// Every shuttle thread's value of every [`ShuttleThreadState`] static,
    /// boxed so that a value stays where it is while the map grows; entries
    /// are never removed before the execution ends.
    struct States(RefCell<HashMap<(shuttle::thread::ThreadId, usize), Box<dyn Any>>>);

    // SAFETY: shuttle runs every thread of an execution on one OS thread,
    // one at a time, switching only at its own scheduling points; the map
    // is borrowed only inside `ShuttleThreadState::with`, across no
    // scheduling point, so no two borrows overlap.
    unsafe impl Sync for States {}

    shuttle::lazy_static! {
        static ref STATES: States = States(RefCell::new(HashMap::new()));
    }

    /// A per-thread value under shuttle, reachable for as long as the
    /// thread runs, its thread-local destructors included.
    pub(crate) struct ShuttleThreadState<T: 'static> {
        init: fn() -> T,
    }

    impl<T: 'static> ShuttleThreadState<T> {
        pub(crate) const fn new(init: fn() -> T) -> Self {
            Self { init }
        }

        pub(crate) fn with<R>(&'static self, f: impl FnOnce(&T) -> R) -> R {
            let key = (
                shuttle::thread::current().id(),
                core::ptr::from_ref(self).addr(),
            );
            let value: *const T = {
                let mut states = STATES.0.borrow_mut();
                let value = states.entry(key).or_insert_with(|| Box::new((self.init)()));
                value.downcast_ref::<T>().expect("one type per static")
            };
            // SAFETY: the box is never removed from the map nor moved
            // before the execution ends, which outlives this call; the
            // map's borrow ended above, so `f` may call `with` again.
            f(unsafe { &*value })
        }
    }
}

/// An `UnsafeCell` that loom checks: every access goes through
/// [`with`](Self::with) / [`with_mut`](Self::with_mut), which loom records
/// and checks for causality (a write must happen-after every earlier read).
/// Outside loom it is `core::cell::UnsafeCell` with the same two methods.
pub(crate) struct UnsafeCell<T>(RawUnsafeCell<T>);

impl<T> UnsafeCell<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(RawUnsafeCell::new(value))
    }

    /// Reads through a shared pointer.
    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        #[cfg(loom)]
        return self.0.with(f);
        #[cfg(not(loom))]
        f(self.0.get())
    }

    /// Writes through a unique pointer.
    #[inline]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        #[cfg(loom)]
        return self.0.with_mut(f);
        #[cfg(not(loom))]
        f(self.0.get())
    }
}

/// Under Miri, `std`'s locks with `parking_lot`'s non-poisoning API:
/// `parking_lot_core` makes its futex system call with an argument type
/// recent Miri rejects, and `std`'s locks are what Miri models natively.
/// What Miri checks is the pool's own memory safety, which does not depend
/// on the lock implementation.
#[cfg(all(miri, not(loom), not(shuttle)))]
mod std_locks {
    pub(crate) struct Mutex<T>(std::sync::Mutex<T>);
    pub(crate) type MutexGuard<'a, T> = std::sync::MutexGuard<'a, T>;

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(std::sync::Mutex::new(value))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }
}

/// Asymmetric fences: a [`light`](asymmetric::light_for) one on the frequent
/// side of a store-then-load handshake (a device call starting), a
/// [`heavy`](asymmetric::heavy) one on the rare side (`unbind`). Together
/// they order each side's store before its load, as two `SeqCst` fences
/// would.
///
/// On Linux (not under Miri, loom or shuttle) the heavy fence is
/// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which runs a full memory
/// barrier on every CPU currently running a thread of this process, and the
/// light fence is then a compiler fence only: no instruction at run time.
/// The process registers for it the first time [`asymmetric::prepare`] runs;
/// where that fails, and on other targets, both fences are `SeqCst` fences.
///
/// Invariant: the two sides of one handshake agree on the mode. The mode
/// changes at most once, inside the first `prepare`, and every handshake
/// runs on an object (a call gate) built after `prepare` returned, so both
/// of its sides read the final mode.
pub(crate) mod asymmetric {
    #[cfg(all(target_os = "linux", not(miri), not(loom), not(shuttle)))]
    mod imp {
        use std::sync::atomic::{compiler_fence, fence, AtomicU8, Ordering};
        use std::sync::Once;

        const FULL_FENCES: u8 = 1;
        const MEMBARRIER: u8 = 2;

        static MODE: AtomicU8 = AtomicU8::new(FULL_FENCES);
        static PREPARE: Once = Once::new();

        const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
        const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
        const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

        fn membarrier(cmd: libc::c_long) -> libc::c_long {
            // SAFETY: membarrier takes two integer arguments and touches no
            // memory of ours; an unsupported command returns an error.
            unsafe {
                libc::syscall(
                    libc::SYS_membarrier,
                    cmd,
                    0 as libc::c_long,
                    0 as libc::c_long,
                )
            }
        }

        pub(crate) fn prepare() {
            PREPARE.call_once(|| {
                let supported = membarrier(MEMBARRIER_CMD_QUERY);
                if supported >= 0
                    && supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED != 0
                    && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0
                {
                    MODE.store(MEMBARRIER, Ordering::SeqCst);
                }
            });
        }

        /// Whether the heavy fence is a membarrier (fixed by `prepare`).
        pub(crate) fn uses_membarrier() -> bool {
            MODE.load(Ordering::SeqCst) == MEMBARRIER
        }

        /// The light fence, for a caller that read [`uses_membarrier`]
        /// after `prepare` (a call gate keeps it on its own line).
        #[inline(always)]
        pub(crate) fn light_for(membarrier: bool) {
            if membarrier {
                compiler_fence(Ordering::SeqCst);
            } else {
                fence(Ordering::SeqCst);
            }
        }

        pub(crate) fn heavy() {
            if MODE.load(Ordering::SeqCst) == MEMBARRIER {
                // Cannot fail once registered (the kernel checks nothing
                // else); if it ever did, the pairing would be lost, which is
                // no state to go on in.
                let done = membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED);
                assert_eq!(done, 0, "membarrier failed after registration");
            } else {
                fence(Ordering::SeqCst);
            }
        }
    }

    // Under loom and shuttle: `SeqCst` fences, which both model (shuttle
    // runs every atomic access sequentially consistent, so its fence is a
    // no-op); neither has `membarrier`.
    #[cfg(not(all(target_os = "linux", not(miri), not(loom), not(shuttle))))]
    mod portable {
        use super::super::{fence, Ordering};

        pub(crate) fn prepare() {}

        pub(crate) fn uses_membarrier() -> bool {
            false
        }

        #[inline(always)]
        pub(crate) fn light_for(_membarrier: bool) {
            fence(Ordering::SeqCst);
        }

        pub(crate) fn heavy() {
            fence(Ordering::SeqCst);
        }
    }

    #[cfg(all(target_os = "linux", not(miri), not(loom), not(shuttle)))]
    pub(crate) use imp::{heavy, light_for, prepare, uses_membarrier};
    #[cfg(not(all(target_os = "linux", not(miri), not(loom), not(shuttle))))]
    pub(crate) use portable::{heavy, light_for, prepare, uses_membarrier};
}

/// A process-unique pool id. The counter is a plain `std` atomic: it hands
/// out names, it orders nothing, so there is nothing to model. Under loom
/// and shuttle, ids restart at 1 in every execution: the id picks the
/// pool's tracker shard, hence which shard lock the slow path takes, and a
/// process-wide counter would make every execution take a different lock
/// (loom fails a model that is not deterministic, "Reached unexpected
/// exploration state"; shuttle could not replay a schedule from its seed).
pub(crate) fn next_pool_id() -> u32 {
    per_execution_static! {
        static ref NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    }
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// TEST-ONLY, `--cfg pagepool_broken` builds only: whether the deliberately
/// broken variant `name` of the core is switched on (environment variable
/// `PAGEPOOL_BROKEN`). The loom models in `loom-tests/` switch one on and
/// expect loom to catch it; see loom-tests/README.md. The shuttle scenarios
/// in `shuttle-tests/` do the same for the variants a whole-pool scenario
/// hits. Normal builds have no such code.
#[cfg(pagepool_broken)]
pub(crate) fn broken(name: &str) -> bool {
    std::env::var("PAGEPOOL_BROKEN").is_ok_and(|v| v == name)
}

#[cfg(all(test, target_os = "linux", not(miri), not(loom), not(shuttle)))]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::{asymmetric, backoff};

    /// Voluntary context switches of the calling thread so far: how often
    /// it blocked (slept), not counting preemption.
    fn times_blocked() -> i64 {
        // SAFETY: all zeros is a valid `rusage`.
        let mut usage: libc::rusage = unsafe { core::mem::zeroed() };
        // SAFETY: `usage` is a valid out-pointer for the call.
        let done = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
        assert_eq!(done, 0, "the thread's usage is readable");
        usage.ru_nvcsw as i64
    }

    /// A waiter that backs off for a long time (an `unbind` waiting for a
    /// device call that blocks) gives its core away: after its first 128
    /// rounds (spins, then yields) every round sleeps, so it blocks about
    /// once a round. A waiter that spins or yields never blocks. Counted in
    /// rounds and blocks, not in time or CPU time, so a loaded machine
    /// (where yields take milliseconds and a spinning thread gets little
    /// CPU) changes nothing.
    #[test]
    fn a_long_wait_sleeps_instead_of_burning_a_core() {
        const SLEEPING_ROUNDS: u32 = 200;
        let blocked_before = times_blocked();
        for round in 0..128 + SLEEPING_ROUNDS {
            backoff(round);
        }
        let blocked = times_blocked() - blocked_before;
        assert!(
            blocked * 2 >= i64::from(SLEEPING_ROUNDS),
            "the waiter blocked {blocked} times in {SLEEPING_ROUNDS} rounds that sleep"
        );
    }

    /// What the kernel says of `membarrier`, asked without the code under
    /// test: whether it has the private expedited command.
    fn kernel_has_private_expedited_membarrier() -> bool {
        // SAFETY: MEMBARRIER_CMD_QUERY (0) takes no pointer and changes
        // nothing; it returns the supported commands as a bit mask.
        let supported = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                0 as libc::c_long,
                0 as libc::c_long,
                0 as libc::c_long,
            )
        };
        supported > 0 && supported & (1 << 3) != 0
    }

    /// Where the kernel has private expedited `membarrier`, `prepare`
    /// registers for it and the light fence becomes a compiler fence;
    /// elsewhere both sides stay `SeqCst` fences.
    #[test]
    fn prepare_uses_membarrier_exactly_where_the_kernel_has_it() {
        asymmetric::prepare();
        assert_eq!(
            asymmetric::uses_membarrier(),
            kernel_has_private_expedited_membarrier()
        );
    }

    /// Store buffering, the reordering the call gate's handshake rules out
    /// with this fence pair: one thread stores `a` and then reads `b` behind
    /// the light fence (a thread entering the gate), the other stores `b`
    /// and then reads `a` behind the heavy one (`unbind` closing it). In no
    /// round may both read the value from before the round. The two threads
    /// leave a barrier together every round, so their stores and loads
    /// overlap; without the heavy fence x86 shows the forbidden outcome.
    #[test]
    fn the_fence_pair_forbids_store_buffering() {
        const ROUNDS: usize = 20_000;
        asymmetric::prepare();
        let membarrier = asymmetric::uses_membarrier();
        let a = AtomicUsize::new(0);
        let b = AtomicUsize::new(0);
        let arrived = AtomicUsize::new(0);
        let light_saw_old: Vec<AtomicBool> = (0..=ROUNDS).map(|_| AtomicBool::new(false)).collect();
        let light_done = AtomicUsize::new(0);
        // Both threads leave together; on a loaded machine, where the other
        // may not be running, a waiter yields now and then.
        let meet = |round: usize| {
            arrived.fetch_add(1, Ordering::AcqRel);
            let mut spins = 0u32;
            while arrived.load(Ordering::Acquire) < 2 * round {
                spins += 1;
                if spins % 1024 == 0 {
                    std::thread::yield_now();
                } else {
                    core::hint::spin_loop();
                }
            }
        };
        let mut both_old = 0;
        std::thread::scope(|s| {
            s.spawn(|| {
                for (round, saw_old) in light_saw_old.iter().enumerate().skip(1) {
                    meet(round);
                    a.store(round, Ordering::Relaxed);
                    asymmetric::light_for(membarrier);
                    let old = b.load(Ordering::Relaxed) < round;
                    saw_old.store(old, Ordering::Relaxed);
                    light_done.store(round, Ordering::Release);
                }
            });
            for (round, light_saw_old) in light_saw_old.iter().enumerate().skip(1) {
                meet(round);
                b.store(round, Ordering::Relaxed);
                asymmetric::heavy();
                let old = a.load(Ordering::Relaxed) < round;
                while light_done.load(Ordering::Acquire) < round {
                    core::hint::spin_loop();
                }
                if old && light_saw_old.load(Ordering::Relaxed) {
                    both_old += 1;
                }
            }
        });
        assert_eq!(both_old, 0, "rounds where both threads read the old value");
    }
}
