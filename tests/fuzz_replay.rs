//! Replays the fuzz target's seed corpus (`fuzz/seeds/interleavings/`) and
//! every saved fuzz regression (`fuzz/regressions/interleavings/`) on
//! stable, as an ordinary `cargo test`, with the very interpreter the fuzz
//! target runs (`tests/support/interp/`). Each input runs in both modes: the
//! deterministic one with the full reference-model check, and the one with
//! real threads.
//!
//! The seeds are generated from the sequences in [`seeds`]; after changing
//! them (or the encoding) run
//! `cargo test --features bytes --test fuzz_replay -- --ignored write_seeds`.

#[path = "support/interp/mod.rs"]
mod interp;

use std::path::{Path, PathBuf};

use interp::codec::{encode, pool_cfg_from};
use interp::ops::{Callback, Config, How, Op, UnbindHow};

fn inputs(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory").path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

fn replay(path: &Path) {
    let data = std::fs::read(path).expect("readable input");
    let (cfg, _threaded, ops) = interp::codec::decode(&data);
    eprintln!("replaying {} ({} ops)", path.display(), ops.len());
    interp::harness::run(&cfg, &ops);
    interp::actors::run_threaded(&cfg, &ops);
}

#[test]
fn replay_seed_corpus() {
    let files = inputs("fuzz/seeds/interleavings");
    assert!(files.len() >= 5, "the seed corpus is missing");
    for f in &files {
        replay(f);
    }
}

#[test]
fn replay_fuzz_regressions() {
    for f in &inputs("fuzz/regressions/interleavings") {
        replay(f);
    }
}

/// Every seed in the repository is what [`seeds`] encodes (so the files
/// cannot silently go stale when the encoding changes).
#[test]
fn seed_files_are_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/interleavings");
    for (name, cfg, threaded, ops) in seeds() {
        let want = encode(&cfg, threaded, &ops);
        let got = std::fs::read(dir.join(name)).unwrap_or_default();
        assert!(
            got == want,
            "fuzz/seeds/interleavings/{name} is stale: run \
             `cargo test --features bytes --test fuzz_replay -- --ignored write_seeds`"
        );
        let (dcfg, dthreaded, dops) = interp::codec::decode(&want);
        assert_eq!(
            (dcfg, dthreaded, dops),
            (cfg, threaded, ops),
            "{name}: encode/decode"
        );
    }
}

/// Writes the seed corpus.
#[test]
#[ignore = "writes fuzz/seeds/interleavings; run by hand"]
fn write_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/interleavings");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, cfg, threaded, ops) in seeds() {
        std::fs::write(dir.join(name), encode(&cfg, threaded, &ops)).unwrap();
    }
}

// Three bugs the fuzzer's panicking-callback ops found in the pool (all
// fixed), each kept as a minimal input.

/// Pool 0: order 0, FromDevice, cache 2, batch 2, ring 1, sync on recycle
/// (0, 1). Pool 1: order 0, FromDevice, cache 1, batch 1, ring 1.
fn panic_config() -> Config {
    Config {
        pools: [
            pool_cfg_from([0x80, 0x09, 0x00, 0]),
            pool_cfg_from([0x00, 0x00, 0x00, 0]),
        ],
    }
}

/// A page released because its sync on recycle panicked is counted as
/// returned (`released_closed`): `pages_held` goes back to 0. (It
/// stayed 1 for good.)
#[test]
fn panicking_recycle_sync_counts_the_page_returned() {
    use Op::*;
    interp::harness::run(
        &panic_config(),
        &[
            Alloc { t: 0 },
            ArmPanic {
                at: Callback::SyncForDevice,
            },
            Drop {
                t: 0,
                item: 0,
                how: How::Here,
            },
        ],
    );
}

/// A pool drop whose cache unmap panics still unregisters the pool:
/// `Device::pools` no longer lists it. (It stayed listed, and `unbind`
/// counted it as open.)
#[test]
fn panicking_pool_drop_unregisters_the_pool() {
    use Op::*;
    interp::harness::run(
        &panic_config(),
        &[
            Alloc { t: 0 },
            ArmPanic {
                at: Callback::UnmapBatch,
            },
            DropPool { t: 0 },
        ],
    );
}

/// A pool drop whose fragment page's sync on recycle panics still releases
/// the pool's cache. (The cached pages leaked, and the pool stayed open and
/// registered.)
#[test]
fn panicking_pool_drop_releases_the_cache() {
    use Op::*;
    interp::harness::run(
        &panic_config(),
        &[
            AllocFrag { t: 0, size: 100 },
            Drop {
                t: 0,
                item: 0,
                how: How::Here,
            },
            ArmPanic {
                at: Callback::SyncForDevice,
            },
            DropPool { t: 0 },
        ],
    );
}

/// A `put_bulk` whose release of a refused run panics (the closed ring of a
/// dropped pool refuses it; `unmap_batch` panics) must not lose the next
/// run's first page: it is dropped like the pages not yet taken. (It was
/// once taken out of its handle before the previous run was pushed, and
/// leaked: mapped, counted in flight, never freed.)
#[test]
fn put_bulk_whose_run_release_panics_loses_no_page() {
    use Op::*;
    interp::harness::run(
        &Config {
            pools: [
                pool_cfg_from([0x00, 0x00, 0x00, 0]),
                pool_cfg_from([0x00, 0x00, 0x00, 0]),
            ],
        },
        &[
            Alloc { t: 0 },
            Alloc { t: 1 },
            DropPool { t: 0 },
            ArmPanic {
                at: Callback::UnmapBatch,
            },
            Send {
                t: 1,
                item: 0,
                to: 0,
            },
            PutBulk { t: 0, n: 1 },
        ],
    );
}

/// The seeds: small sequences that each reach one area (the fuzzer mutates
/// from there).
fn seeds() -> Vec<(&'static str, Config, bool, Vec<Op>)> {
    use Callback::*;
    use Op::*;
    // Pool 0: order 0, FromDevice, cache 4, batch 2, ring 2, sync on recycle
    // (0, 1 + 7*61 = 428). Pool 1: order 1, Bidirectional, cache 2, batch 1,
    // ring 1.
    let basic = Config {
        pools: [
            pool_cfg_from([0x80, 0x0b, 0x01, 7]),
            pool_cfg_from([0x03, 0x01, 0x00, 0]),
        ],
    };
    // Pool 0: ToDevice with sync; pool 1: FromDevice, cache 1, ring 1.
    let tx = Config {
        pools: [
            pool_cfg_from([0x84, 0x09, 0x0a, 3]),
            pool_cfg_from([0x00, 0x00, 0x00, 0]),
        ],
    };
    // Pool 0: order 0, FromDevice, cache 4, batch 1, ring 8: keeps back up
    // to 8 remote returns per thread. Pool 1: cache 2, batch 1, ring 2:
    // keeps back 2.
    let batches = Config {
        pools: [
            pool_cfg_from([0x00, 0x03, 0x07, 0]),
            pool_cfg_from([0x00, 0x01, 0x01, 0]),
        ],
    };
    vec![
        (
            "alloc_recycle_drop",
            basic.clone(),
            false,
            vec![
                Alloc { t: 0 },
                Alloc { t: 0 },
                Alloc { t: 1 },
                RecycleDirect { t: 0, item: 0 },
                Send {
                    t: 0,
                    item: 0,
                    to: 2,
                },
                Drop {
                    t: 2,
                    item: 0,
                    how: How::Spawned,
                },
                RecycleDirect { t: 1, item: 0 },
                Alloc { t: 0 },
                Drop {
                    t: 0,
                    item: 0,
                    how: How::Worker,
                },
            ],
        ),
        (
            "fragments",
            basic.clone(),
            false,
            vec![
                AllocFrag { t: 0, size: 1500 },
                AllocFrag { t: 0, size: 1500 },
                AllocFrag { t: 0, size: 1500 },
                Send {
                    t: 0,
                    item: 1,
                    to: 2,
                },
                Sync {
                    t: 2,
                    item: 0,
                    start: 7,
                    len: 100,
                    tag: 0x5a,
                    to_device: false,
                },
                Drop {
                    t: 0,
                    item: 0,
                    how: How::Here,
                },
                AllocFrag { t: 1, size: 0 },
                AllocFrag { t: 1, size: 9000 },
                DropPool { t: 0 },
                Drop {
                    t: 2,
                    item: 0,
                    how: How::Spawned,
                },
            ],
        ),
        (
            "ring_overflow",
            tx.clone(),
            false,
            vec![
                FillRing {
                    t: 0,
                    extra: 2,
                    how: How::Here,
                },
                FillRing {
                    t: 1,
                    extra: 0,
                    how: How::Bulk,
                },
                Alloc { t: 0 },
                Alloc { t: 0 },
                PutBulk { t: 0, n: 7 },
                FillRing {
                    t: 0,
                    extra: 1,
                    how: How::Spawned,
                },
            ],
        ),
        (
            "sync_and_bytes",
            tx.clone(),
            false,
            vec![
                Alloc { t: 0 },
                Sync {
                    t: 0,
                    item: 0,
                    start: 0,
                    len: 60,
                    tag: 0x43,
                    to_device: true,
                },
                IntoBytes { t: 0, item: 0 },
                CloneBytes { t: 0, item: 0 },
                Send {
                    t: 0,
                    item: 1,
                    to: 2,
                },
                Alloc { t: 1 },
                Sync {
                    t: 1,
                    item: 0,
                    start: 100,
                    len: 20,
                    tag: 0x16,
                    to_device: false,
                },
                SyncOutOfRange {
                    t: 1,
                    item: 0,
                    past: 9,
                },
                Check { t: 1, item: 0 },
                Drop {
                    t: 0,
                    item: 0,
                    how: How::Here,
                },
                Check { t: 2, item: 0 },
            ],
        ),
        (
            "unbind_while_held",
            basic.clone(),
            false,
            vec![
                Alloc { t: 0 },
                AllocFrag { t: 1, size: 64 },
                Alloc { t: 0 },
                Send {
                    t: 0,
                    item: 1,
                    to: 2,
                },
                IntoBytes { t: 1, item: 0 },
                FillRing {
                    t: 0,
                    extra: 0,
                    how: How::Here,
                },
                Unbind {
                    how: UnbindHow::Call,
                },
                Alloc { t: 0 },
                AllocFrag { t: 1, size: 64 },
                Sync {
                    t: 2,
                    item: 0,
                    start: 0,
                    len: 8,
                    tag: 0x98,
                    to_device: false,
                },
                RecycleDirect { t: 0, item: 0 },
                Drop {
                    t: 2,
                    item: 0,
                    how: How::Spawned,
                },
                NewPool { t: 0 },
                Unbind {
                    how: UnbindHow::Call,
                },
            ],
        ),
        (
            "drop_pool_then_device",
            basic.clone(),
            false,
            vec![
                Alloc { t: 0 },
                AllocFrag { t: 0, size: 2000 },
                DropPool { t: 0 },
                Drop {
                    t: 0,
                    item: 0,
                    how: How::Bulk,
                },
                NewPool { t: 0 },
                Alloc { t: 0 },
                Unbind {
                    how: UnbindHow::DropDevice,
                },
                Drop {
                    t: 0,
                    item: 1,
                    how: How::Worker,
                },
            ],
        ),
        (
            "map_failures",
            basic.clone(),
            false,
            vec![
                FailMaps { n: 1 },
                Alloc { t: 0 },
                FailPageAllocs { n: 2 },
                Alloc { t: 1 },
                Alloc { t: 1 },
                Alloc { t: 0 },
                FailMaps { n: 3 },
                AllocFrag { t: 1, size: 300 },
            ],
        ),
        (
            "threads_unbind_race",
            basic.clone(),
            true,
            vec![
                Alloc { t: 0 },
                AllocFrag { t: 1, size: 200 },
                AllocFrag { t: 1, size: 200 },
                Send {
                    t: 0,
                    item: 0,
                    to: 2,
                },
                Send {
                    t: 1,
                    item: 0,
                    to: 2,
                },
                Sync {
                    t: 2,
                    item: 0,
                    start: 0,
                    len: 16,
                    tag: 0x32,
                    to_device: false,
                },
                FillRing {
                    t: 0,
                    extra: 1,
                    how: How::Spawned,
                },
                Unbind {
                    how: UnbindHow::OtherThread,
                },
                Drop {
                    t: 2,
                    item: 0,
                    how: How::Here,
                },
                Alloc { t: 0 },
                Drop {
                    t: 1,
                    item: 0,
                    how: How::Here,
                },
            ],
        ),
        (
            // A panicking map maps nothing, a panicking alloc_pages returns
            // no block, a free_pages that panics has freed its block.
            "panic_in_alloc",
            basic.clone(),
            false,
            vec![
                ArmPanic { at: Map },
                Alloc { t: 0 },
                Alloc { t: 0 },
                ArmPanic { at: AllocPages },
                Alloc { t: 1 },
                ArmPanic { at: FreePages },
                FailMaps { n: 1 },
                Alloc { t: 1 },
                Alloc { t: 1 },
                ArmPanic { at: Map },
                AllocFrag { t: 0, size: 3000 },
                AllocFrag { t: 0, size: 3000 },
                AllocFrag { t: 0, size: 3000 },
            ],
        ),
        (
            // Panicking syncs on recycle (drop, direct recycle, bulk) and
            // unmaps of pages leaving their pool.
            "panic_in_recycle",
            basic.clone(),
            false,
            vec![
                Alloc { t: 0 },
                Alloc { t: 0 },
                Alloc { t: 0 },
                ArmPanic { at: SyncForDevice },
                Drop {
                    t: 0,
                    item: 0,
                    how: How::Here,
                },
                ArmPanic { at: SyncForDevice },
                RecycleDirect { t: 0, item: 0 },
                ArmPanic { at: UnmapBatch },
                FillRing {
                    t: 1,
                    extra: 2,
                    how: How::Here,
                },
                Alloc { t: 0 },
                Alloc { t: 0 },
                ArmPanic { at: SyncForDevice },
                PutBulk { t: 0, n: 7 },
                Alloc { t: 1 },
                ArmPanic { at: FreePages },
                FillRing {
                    t: 1,
                    extra: 0,
                    how: How::Worker,
                },
                ArmPanic { at: SyncForCpu },
                Alloc { t: 0 },
                Sync {
                    t: 0,
                    item: 0,
                    start: 0,
                    len: 32,
                    tag: 0x60,
                    to_device: false,
                },
                Check { t: 0, item: 0 },
            ],
        ),
        (
            // unbind finishes whatever its callbacks do, then the first
            // panic comes out of it; the device is unbound either way.
            "panic_in_unbind",
            basic.clone(),
            false,
            vec![
                Alloc { t: 0 },
                AllocFrag { t: 1, size: 64 },
                FillRing {
                    t: 0,
                    extra: 0,
                    how: How::Here,
                },
                Alloc { t: 0 },
                ArmPanic { at: UnmapBatch },
                Unbind {
                    how: UnbindHow::Call,
                },
                Alloc { t: 0 },
                Drop {
                    t: 0,
                    item: 0,
                    how: How::Spawned,
                },
                NewPool { t: 0 },
                Unbind {
                    how: UnbindHow::OtherThread,
                },
            ],
        ),
        (
            "panic_in_on_unbind",
            tx.clone(),
            false,
            vec![
                Alloc { t: 0 },
                FillRing {
                    t: 1,
                    extra: 1,
                    how: How::Bulk,
                },
                ArmPanic { at: OnUnbind },
                Unbind {
                    how: UnbindHow::DropDevice,
                },
                Drop {
                    t: 0,
                    item: 0,
                    how: How::Bulk,
                },
            ],
        ),
        (
            // A held buffer dropped from inside the pool's callbacks: in a
            // map (same pool, slow path), a sync, a page-source call, and
            // unbind's unmaps (handed to unbind, freed at its end).
            "reentrant_drop",
            basic.clone(),
            false,
            vec![
                Alloc { t: 0 },
                Alloc { t: 0 },
                AllocFrag { t: 1, size: 100 },
                AllocFrag { t: 1, size: 100 },
                ArmDrop {
                    t: 0,
                    item: 0,
                    at: Map,
                },
                Alloc { t: 1 },
                ArmDrop {
                    t: 1,
                    item: 0,
                    at: SyncForCpu,
                },
                Sync {
                    t: 0,
                    item: 0,
                    start: 8,
                    len: 8,
                    tag: 0x32,
                    to_device: false,
                },
                ArmDrop {
                    t: 1,
                    item: 0,
                    at: AllocPages,
                },
                Alloc { t: 1 },
                FillRing {
                    t: 0,
                    extra: 0,
                    how: How::Here,
                },
                ArmDrop {
                    t: 0,
                    item: 0,
                    at: UnmapBatch,
                },
                Unbind {
                    how: UnbindHow::Call,
                },
            ],
        ),
        (
            "reentrant_drop_at_teardown",
            tx.clone(),
            false,
            vec![
                Alloc { t: 0 },
                Alloc { t: 0 },
                ArmDrop {
                    t: 0,
                    item: 1,
                    at: FreePages,
                },
                FillRing {
                    t: 0,
                    extra: 2,
                    how: How::Here,
                },
                ArmDrop {
                    t: 0,
                    item: 0,
                    at: OnUnbind,
                },
            ],
        ),
        (
            "threads_faults",
            basic,
            true,
            vec![
                Alloc { t: 0 },
                AllocFrag { t: 1, size: 500 },
                Alloc { t: 0 },
                ArmDrop {
                    t: 1,
                    item: 0,
                    at: Map,
                },
                Alloc { t: 1 },
                ArmPanic { at: SyncForDevice },
                Drop {
                    t: 0,
                    item: 0,
                    how: How::Spawned,
                },
                ArmPanic { at: UnmapBatch },
                Unbind {
                    how: UnbindHow::OtherThread,
                },
                Drop {
                    t: 0,
                    item: 0,
                    how: How::Here,
                },
            ],
        ),
        (
            "remote_batches",
            batches.clone(),
            false,
            remote_batches_ops(),
        ),
        (
            "remote_batches_exit",
            batches,
            false,
            remote_batches_exit_ops(),
        ),
    ]
}

/// The `remote_batches` seed: pages waiting in per-thread batches. Pool 0
/// batches 8 pages (ring 8), pool 1 batches 2 (ring 2); both drop and
/// rebuild, so the worker's four slots fill with pages of pools dropped
/// since, and the next pool evicts the oldest: the eviction's release
/// panics, then drops a page inside its unmap (which evicts again). Then a
/// flush on the worker with a panic, full slots and the owner's hand-back
/// on the main thread, a flush there, drops on spawned threads whose exit
/// hand-back overflows the ring and panics (stopped in the thread).
fn remote_batches_ops() -> Vec<Op> {
    use Callback::*;
    use Op::*;
    let worker_drop = |t| Drop {
        t,
        item: 0,
        how: How::Worker,
    };
    let here = |t| Drop {
        t,
        item: 0,
        how: How::Here,
    };
    let mut ops = Vec::new();
    for _ in 0..4 {
        ops.extend([
            Alloc { t: 0 },
            worker_drop(0),
            DropPool { t: 0 },
            NewPool { t: 0 },
        ]);
    }
    ops.extend([
        Alloc { t: 0 },
        ArmPanic { at: FreePages },
        worker_drop(0),
        Alloc { t: 1 },
        DropPool { t: 0 },
        NewPool { t: 0 },
        Alloc { t: 0 },
        ArmDrop {
            t: 1,
            item: 0,
            at: UnmapBatch,
        },
        worker_drop(0),
        // Flush the worker (`NewPool` of thread 2), a release panicking.
        ArmPanic { at: FreePages },
        NewPool { t: 2 },
        Alloc { t: 1 },
        Alloc { t: 1 },
        Alloc { t: 1 },
        here(1),
        here(1),
        here(1),
        Alloc { t: 1 },
        Alloc { t: 1 },
        Alloc { t: 1 },
        here(1),
        // Flush the main thread (`DropPool` of thread 2).
        DropPool { t: 2 },
        FillRing {
            t: 1,
            extra: 0,
            how: How::Spawned,
        },
        ArmPanic { at: UnmapBatch },
        FillRing {
            t: 0,
            extra: 2,
            how: How::Spawned,
        },
    ]);
    ops
}

/// The `remote_batches_exit` seed: the worker keeps back a page of a pool
/// dropped since; at the teardown the worker exits and hands it back (the
/// ring is closed: released), and the unmap drops a page of the other pool
/// on the exiting thread, whose batches are gone: that page takes the
/// direct path into its ring.
fn remote_batches_exit_ops() -> Vec<Op> {
    use Op::*;
    vec![
        Alloc { t: 1 },
        Alloc { t: 0 },
        Drop {
            t: 0,
            item: 0,
            how: How::Worker,
        },
        DropPool { t: 0 },
        ArmDrop {
            t: 1,
            item: 0,
            at: Callback::UnmapBatch,
        },
    ]
}
