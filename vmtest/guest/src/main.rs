//! The vmtest guest program: runs as root inside the QEMU guest that
//! `vmtest/run.sh` boots, against the e1000e it bound to vfio-pci.
//!
//! Every test checks the kernel's own count of live mappings: the container's
//! `DMA_AVAIL` (entries left of `dma_entry_limit`). Each test opens its own
//! container (the group can be in one container at a time), so each starts
//! from an empty one.
//!
//! Usage: `pagepool-vmtest <bdf> [test-name-filter]`. Prints one line per
//! test and `N passed, N failed`; exits non-zero if any failed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use pagepool::vfio::{
    VfioDevice, VfioDma, VfioError, BAR0_REGION_INDEX, DMA_ENTRY_LIMIT_PARAM, ERR_IRQ_INDEX,
    REQ_IRQ_INDEX,
};
use pagepool::{
    AllocError, BuildError, Device, DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, Page,
    PagePool, RegionBacking, RegionInfo, SystemRegions, DEFAULT_REGION_SIZE,
};

const PAGE: usize = 4096;

type TestResult = Result<(), String>;

macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($msg)+)));
        }
    };
}

macro_rules! check_eq {
    ($left:expr, $right:expr, $($msg:tt)+) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err(format!(
                "{}:{}: {}: {:?} != {:?}",
                file!(),
                line!(),
                format!($($msg)+),
                l,
                r
            ));
        }
    }};
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Anonymous, page-aligned memory that only this program touches, and only
/// through raw pointers while it is mapped for the device.
struct Buf {
    ptr: NonNull<u8>,
    len: usize,
}

impl Buf {
    fn new(pages: usize) -> Buf {
        let len = pages * PAGE;
        // SAFETY: a fresh private anonymous mapping; nothing is replaced.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        assert!(p != libc::MAP_FAILED, "mmap of {len} bytes failed");
        Buf {
            ptr: NonNull::new(p.cast()).unwrap(),
            len,
        }
    }

    fn page(&self, i: usize) -> NonNull<u8> {
        assert!((i + 1) * PAGE <= self.len);
        // SAFETY: inside the mapping.
        unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(i * PAGE)) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: our own mapping; every device mapping of it is gone by now
        // (each test unmaps, or drops the container, before its buffers).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

struct Ctx {
    bdf: String,
}

impl Ctx {
    fn open(&self) -> Result<VfioDma, String> {
        ok(VfioDma::open_group_of(&self.bdf), "open the VFIO group")
    }
}

fn avail(dma: &VfioDma) -> Result<u32, String> {
    ok(dma.dma_avail(), "DMA_AVAIL")
}

fn map(
    dma: &VfioDma,
    cpu: NonNull<u8>,
    len: usize,
    dir: DmaDirection,
) -> Result<DmaMapping, String> {
    // SAFETY: `cpu` is in a live `Buf` that outlives the mapping (every test
    // unmaps before dropping its buffers) and the CPU does not touch it
    // while mapped.
    let addr = ok(unsafe { DmaOps::map(dma, cpu, len, dir) }, "map")?;
    Ok(DmaMapping {
        addr,
        len,
        direction: dir,
    })
}

/// Number of runs of touching IOVA blocks among page-sized mappings: the
/// `UNMAP_DMA` calls a merging batch unmap should make.
fn runs(mappings: &[DmaMapping]) -> u64 {
    let mut addrs: Vec<u64> = mappings.iter().map(|m| m.addr.0).collect();
    addrs.sort_unstable();
    1 + addrs
        .windows(2)
        .filter(|w| w[1] != w[0] + PAGE as u64)
        .count() as u64
}

// ---------------------------------------------------------------------------
// Backend tests: DmaOps on VfioDma directly.
// ---------------------------------------------------------------------------

fn test_device_access(ctx: &Ctx) -> TestResult {
    let dev = ok(VfioDevice::open(&ctx.bdf), "open device")?;
    let vendor = ok(dev.config_read_u16(0), "config read")?;
    let device = ok(dev.config_read_u16(2), "config read")?;
    check_eq!(
        (vendor, device),
        (0x8086, 0x10d3),
        "config space vendor/device"
    );
    let bar0 = ok(dev.region_info(BAR0_REGION_INDEX), "BAR0 info")?;
    check!(bar0.size >= 0x2_0000 && bar0.mappable(), "BAR0 {bar0:?}");
    let regs = ok(dev.map_region(BAR0_REGION_INDEX), "mmap BAR0")?;
    let status = regs.read32(0x0008);
    // STATUS never reads back all ones from a present device.
    check!(status != u32::MAX, "STATUS {status:#x}");
    ok(dev.set_bus_master(true), "set bus master")?;
    let command = ok(dev.config_read_u16(4), "config read")?;
    check!(
        command & 4 != 0,
        "bus master bit not set: command {command:#x}"
    );
    ok(dev.set_bus_master(false), "clear bus master")?;
    let dma = dev.dma();
    // No Snoop: cleared by set_bus_master where the IOMMU does not enforce
    // coherency. (QEMU's e1000e may hardwire the bit; set it if it can.)
    ok(dev.set_no_snoop(true), "set No Snoop")?;
    let settable = ok(dev.no_snoop_enabled(), "read No Snoop")?;
    check!(
        settable.is_some(),
        "the e1000e has a PCI Express capability"
    );
    println!("  Enable No Snoop after setting it: {settable:?}");
    ok(dev.set_bus_master(true), "set bus master")?;
    let no_snoop = ok(dev.no_snoop_enabled(), "read No Snoop")?;
    if !dma.cache_coherent() {
        check_eq!(
            no_snoop,
            Some(false),
            "No Snoop cleared on a non-coherent IOMMU"
        );
    }
    ok(dev.set_bus_master(false), "clear bus master")?;
    println!(
        "  VFIO_DMA_CC_IOMMU {}, No Snoop after set_bus_master {no_snoop:?}, iommufd compat {}",
        dma.cache_coherent(),
        dma.is_iommufd_compat()
    );
    println!(
        "  group {:?}, IOMMU page sizes {:#x}, IOVA ranges {:x?}, dma_entry_limit {:?}, DMA_AVAIL {}",
        dma.group_id(),
        dma.page_sizes(),
        dma.iova_ranges(),
        dma.entry_limit(),
        avail(dma)?
    );
    println!(
        "  BAR0 {:#x} bytes, STATUS {status:#010x}, command {command:#06x}",
        bar0.size
    );
    Ok(())
}

/// The constructor from already open fds, and the typed error for a group
/// that is already open.
fn test_from_fds(ctx: &Ctx) -> TestResult {
    use std::os::fd::OwnedFd;
    let group_path = ok(VfioDma::group_path_of(&ctx.bdf), "group path")?;
    let rw = |p: &std::path::Path| std::fs::OpenOptions::new().read(true).write(true).open(p);
    let container = ok(rw(std::path::Path::new("/dev/vfio/vfio")), "open container")?;
    let group = ok(rw(&group_path), "open group")?;
    let dma = ok(
        VfioDma::from_fds(OwnedFd::from(container), OwnedFd::from(group)),
        "from_fds",
    )?;
    check!(dma.group_id().is_some(), "group id from /proc/self/fd");
    // A second handle on the same container and group (duplicated fds)
    // would pick IOVAs from a second allocator: refused, typed.
    let dup = |fd: std::os::fd::BorrowedFd<'_>| ok(fd.try_clone_to_owned(), "dup");
    match VfioDma::from_fds(dup(dma.container_fd())?, dup(dma.group_fd())?) {
        Err(e @ VfioError::ContainerShared { .. }) => println!("  second handle: {e}"),
        other => return Err(format!("a second handle on one container gave {other:?}")),
    }
    let start = avail(&dma)?;
    let buf = Buf::new(1);
    let m = map(&dma, buf.page(0), PAGE, DmaDirection::FromDevice)?;
    check_eq!(avail(&dma)?, start - 1, "one mapping");
    // While this container holds the group, opening it again is refused.
    match VfioDma::open_group(&group_path) {
        Err(e @ VfioError::GroupBusy { .. }) => println!("  second open: {e}"),
        other => return Err(format!("second open of the group gave {other:?}")),
    }
    // SAFETY: once.
    ok(unsafe { dma.try_unmap(m) }, "unmap")?;
    check_eq!(avail(&dma)?, start, "DMA_AVAIL back");
    let dev = ok(
        dma.open_device(&ctx.bdf),
        "device fd from a from_fds container",
    )?;
    check_eq!(
        ok(dev.config_read_u16(0), "config read")?,
        0x8086,
        "vendor id"
    );
    Ok(())
}

/// A second group in a container that already has one (and its IOMMU):
/// refused with a typed error, the group left unattached, usable in a
/// container of its own; the first handle keeps working.
fn test_second_group_in_one_container(ctx: &Ctx) -> TestResult {
    use std::os::fd::OwnedFd;
    let Some(bdf2) = std::env::var("PAGEPOOL_VMTEST_SECOND_BDF")
        .ok()
        .filter(|b| !b.is_empty())
    else {
        return Err("no second e1000e in the guest (PAGEPOOL_VMTEST_SECOND_BDF)".into());
    };
    let dma = ctx.open()?;
    let start = avail(&dma)?;
    let group2 = ok(VfioDma::group_path_of(&bdf2), "second group path")?;
    check!(
        Some(group2.as_path()) != VfioDma::group_path_of(&ctx.bdf).ok().as_deref(),
        "the two e1000e share a group"
    );
    let rw = |p: &std::path::Path| std::fs::OpenOptions::new().read(true).write(true).open(p);
    let g2 = ok(rw(&group2), "open the second group")?;
    let c = ok(dma.container_fd().try_clone_to_owned(), "dup container")?;
    match VfioDma::from_fds(c, OwnedFd::from(g2)) {
        Err(e @ VfioError::ContainerShared { .. }) => println!("  second group: {e}"),
        other => return Err(format!("a second group in one container gave {other:?}")),
    }
    // The refused group was detached again: it opens in a container of its
    // own, whose IOVAs do not collide with the first one's.
    let other = ok(VfioDma::open_group(&group2), "second group, own container")?;
    let buf = Buf::new(2);
    let a = map(&dma, buf.page(0), PAGE, DmaDirection::FromDevice)?;
    let b = map(&other, buf.page(1), PAGE, DmaDirection::FromDevice)?;
    check_eq!(
        avail(&dma)?,
        start - 1,
        "one mapping in the first container"
    );
    // SAFETY: each once.
    ok(unsafe { dma.try_unmap(a) }, "unmap in the first")?;
    // SAFETY: once.
    ok(unsafe { other.try_unmap(b) }, "unmap in the second")?;
    check_eq!(avail(&dma)?, start, "DMA_AVAIL back");
    Ok(())
}

/// A BAR mapping outlives every handle: it holds the device fd, so it stays
/// valid; the DMA mappings do not wait for it (the last `VfioDma` removes
/// them with `UNMAP_DMA` flag ALL), so no memory stays pinned. The group
/// is free again once the region is dropped.
fn test_mmio_region_outlives_handles(ctx: &Ctx) -> TestResult {
    let base = locked_pages()?;
    let dev = ok(VfioDevice::open(&ctx.bdf), "open device")?;
    let regs = ok(dev.map_region(BAR0_REGION_INDEX), "mmap BAR0")?;
    let dma = dev.dma().clone();
    let start = avail(&dma)?;
    let buf = Buf::new(16);
    for i in 0..16 {
        map(&dma, buf.page(i), PAGE, DmaDirection::FromDevice)?;
    }
    check_eq!(avail(&dma)?, start - 16, "16 mappings");
    check!(
        locked_pages()? >= base + 16,
        "16 pages pinned: VmLck {} pages, was {base}",
        locked_pages()?
    );
    // Every handle goes, with 16 mappings left in the container and the
    // region still mapped.
    drop(dma);
    drop(dev);
    check_eq!(
        locked_pages()?,
        base,
        "no page pinned after the last handle, though the region lives"
    );
    let status = regs.read32(0x0008);
    check!(
        status != u32::MAX,
        "the region still reads: STATUS {status:#x}"
    );
    match VfioDma::open_group_of(&ctx.bdf) {
        Err(VfioError::GroupBusy { .. }) => {
            println!("  group busy while the region lives (it holds the device fd)")
        }
        other => println!("  group open while the region lives: {other:?}"),
    }
    drop(regs);
    let again = ok(VfioDma::open_group_of(&ctx.bdf), "reopen the group")?;
    check_eq!(
        Some(u64::from(avail(&again)?)),
        again.entry_limit(),
        "a fresh container: nothing left mapped"
    );
    drop(buf);
    Ok(())
}

/// A forked child's unmap of the parent's mapping. Kernels differ: some
/// remove it, some answer success with 0 bytes. Either way the backend's
/// answer must be the truth: `Ok` only if the mapping is gone, else
/// `UnmapError::Incomplete { 4096, 0 }` (a pool keeps such memory). Then
/// the parent's own unmap is reported the same way.
fn test_unmap_from_forked_child(ctx: &Ctx) -> TestResult {
    let dma = ctx.open()?;
    let start = avail(&dma)?;
    let buf = Buf::new(1);
    let m = map(&dma, buf.page(0), PAGE, DmaDirection::FromDevice)?;
    // SAFETY: fork; the child only makes the unmap call and `_exit`s.
    let pid = unsafe { libc::fork() };
    check!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: the mapping is live (in the parent); the child's call
        // changes nothing there.
        let got = unsafe { DmaOps::unmap(&dma, m) };
        let code = match got {
            Err(pagepool::UnmapError::Incomplete {
                expected: 4096,
                unmapped: 0,
            }) => 0,
            Ok(()) => 1,
            Err(_) => 2,
        };
        // SAFETY: leaves the child at once, running nothing of the parent's.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    check!(r == pid, "waitpid: {}", std::io::Error::last_os_error());
    check!(libc::WIFEXITED(status), "child status {status:#x}");
    match libc::WEXITSTATUS(status) {
        0 => {
            println!("  the child's unmap removed nothing: reported Incomplete {{ 4096, 0 }}");
            check_eq!(
                avail(&dma)?,
                start - 1,
                "the parent's mapping is still there"
            );
            // SAFETY: once, in the process that made it.
            ok(unsafe { dma.try_unmap(m) }, "unmap in the parent")?;
        }
        1 => {
            println!("  this kernel lets the child remove the parent's mapping: reported Ok");
            check_eq!(avail(&dma)?, start, "the mapping is gone, as reported");
            // The parent's unmap now removes nothing: reported, not hidden.
            // SAFETY: the pool's contract is broken on purpose here; the
            // kernel has nothing left to remove.
            let got = unsafe { DmaOps::unmap(&dma, m) };
            check_eq!(
                got,
                Err(pagepool::UnmapError::Incomplete {
                    expected: 4096,
                    unmapped: 0
                }),
                "a second unmap of the same IOVA"
            );
        }
        code => return Err(format!("the child's unmap failed otherwise (exit {code})")),
    }
    check_eq!(avail(&dma)?, start, "DMA_AVAIL back");
    Ok(())
}

fn test_map_unmap_single(ctx: &Ctx) -> TestResult {
    let dma = ctx.open()?;
    let start = avail(&dma)?;
    check_eq!(
        Some(u64::from(start)),
        dma.entry_limit(),
        "empty container: DMA_AVAIL is the limit"
    );
    let n = 64;
    let buf = Buf::new(n);
    let s0 = dma.stats();
    let dirs = [
        DmaDirection::FromDevice,
        DmaDirection::ToDevice,
        DmaDirection::Bidirectional,
    ];
    let mut maps = Vec::new();
    for i in 0..n {
        maps.push(map(&dma, buf.page(i), PAGE, dirs[i % 3])?);
    }
    let mid = avail(&dma)?;
    check_eq!(mid, start - n as u32, "DMA_AVAIL after {n} maps");
    for m in &maps {
        check!(
            m.addr.0 % PAGE as u64 == 0 && m.addr != DmaAddr(0),
            "address {}",
            m.addr
        );
    }
    for m in &maps {
        // SAFETY: mapped above, unmapped once.
        ok(unsafe { dma.try_unmap(*m) }, "unmap")?;
    }
    let end = avail(&dma)?;
    check_eq!(end, start, "DMA_AVAIL after single unmaps");
    let s1 = dma.stats();
    check_eq!(s1.map_calls - s0.map_calls, n as u64, "MAP_DMA calls");
    check_eq!(s1.unmap_calls - s0.unmap_calls, n as u64, "UNMAP_DMA calls");
    check_eq!(
        (s1.live_mappings, s1.unmap_errors, s1.map_failures),
        (0, 0, 0),
        "live/errors"
    );
    println!(
        "  DMA_AVAIL {start} -> {mid} ({n} pages mapped) -> {end}; {} MAP_DMA, {} UNMAP_DMA",
        n, n
    );
    Ok(())
}

fn test_map_unmap_batch(ctx: &Ctx) -> TestResult {
    let dma = ctx.open()?;
    let start = avail(&dma)?;
    let n = 512;
    let buf = Buf::new(n);

    // Round 1: everything in one batch, shuffled: one merged UNMAP_DMA per
    // run of touching IOVAs.
    let mut maps = Vec::new();
    for i in 0..n {
        maps.push(map(&dma, buf.page(i), PAGE, DmaDirection::FromDevice)?);
    }
    let mid = avail(&dma)?;
    check_eq!(mid, start - n as u32, "DMA_AVAIL after maps");
    let expected_calls = runs(&maps);
    maps.reverse();
    maps.swap(3, 300);
    let s0 = dma.stats();
    // SAFETY: each mapping once.
    ok(unsafe { dma.unmap_batch(&maps) }, "batch unmap")?;
    let s1 = dma.stats();
    check_eq!(avail(&dma)?, start, "DMA_AVAIL after batch unmap");
    check_eq!(
        s1.unmap_calls - s0.unmap_calls,
        expected_calls,
        "merged UNMAP_DMA calls"
    );
    check_eq!(s1.unmapped - s0.unmapped, n as u64, "mappings unmapped");
    println!(
        "  DMA_AVAIL {start} -> {mid} -> {start}: {n} mappings torn down by {} UNMAP_DMA call(s)",
        s1.unmap_calls - s0.unmap_calls
    );

    // Round 2: every other mapping, then the rest: no two touch, so no
    // merging is possible.
    let mut maps = Vec::new();
    for i in 0..n {
        maps.push(map(&dma, buf.page(i), PAGE, DmaDirection::Bidirectional)?);
    }
    let (even, odd): (Vec<_>, Vec<_>) = maps.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let even: Vec<DmaMapping> = even.into_iter().map(|(_, m)| *m).collect();
    let odd: Vec<DmaMapping> = odd.into_iter().map(|(_, m)| *m).collect();
    let s0 = dma.stats();
    // SAFETY: each mapping once.
    ok(unsafe { dma.unmap_batch(&even) }, "batch unmap")?;
    check_eq!(
        avail(&dma)?,
        start - odd.len() as u32,
        "DMA_AVAIL after half"
    );
    // SAFETY: each mapping once.
    let calls = ok(unsafe { dma.try_unmap_batch(&odd) }, "batch unmap")?;
    let s1 = dma.stats();
    check_eq!(avail(&dma)?, start, "DMA_AVAIL after both halves");
    check_eq!(
        s1.unmap_calls - s0.unmap_calls,
        runs(&even) + calls,
        "UNMAP_DMA calls for scattered batches"
    );
    check_eq!(s1.unmap_errors, 0, "unmap errors");
    Ok(())
}

fn test_iova_alignment_and_reuse(ctx: &Ctx) -> TestResult {
    let dma = ctx.open()?;
    let start = avail(&dma)?;
    let buf = Buf::new(64);
    let mut maps = Vec::new();
    let mut at = 0;
    for pages in [1usize, 2, 3, 4, 16, 1] {
        let m = map(
            &dma,
            buf.page(at),
            pages * PAGE,
            DmaDirection::Bidirectional,
        )?;
        let align = (pages * PAGE).next_power_of_two() as u64;
        check!(
            m.addr.0 % align == 0,
            "{pages}-page mapping at {} not aligned to {align:#x}",
            m.addr
        );
        maps.push(m);
        at += pages;
    }
    let mut spans: Vec<(u64, u64)> = maps
        .iter()
        .map(|m| (m.addr.0, m.addr.0 + m.len as u64))
        .collect();
    spans.sort_unstable();
    check!(
        spans.windows(2).all(|w| w[0].1 <= w[1].0),
        "overlapping IOVAs {spans:x?}"
    );
    check_eq!(
        avail(&dma)?,
        start - maps.len() as u32,
        "one entry per mapping"
    );

    // An unaligned buffer, or a length that is not whole pages, is refused:
    // mapping the whole pages around it would expose their neighbours.
    // SAFETY: inside `buf`.
    let odd = unsafe { NonNull::new_unchecked(buf.page(40).as_ptr().add(100)) };
    for (cpu, len) in [(odd, PAGE), (buf.page(40), 5000)] {
        // SAFETY: inside `buf`; refused before any system call.
        let got = unsafe { dma.try_map(cpu, len, DmaDirection::ToDevice) };
        check!(
            matches!(
                got,
                Err(VfioError::Unaligned {
                    iommu_page: 4096,
                    ..
                })
            ),
            "unaligned map of {len} bytes at {cpu:p}: {got:?}"
        );
        // SAFETY: as above.
        let got = unsafe { DmaOps::map(&dma, cpu, len, DmaDirection::ToDevice) };
        check_eq!(
            got,
            Err(DmaError::Unaligned { iommu_page: 4096 }),
            "DmaOps::map error"
        );
    }
    check_eq!(
        avail(&dma)?,
        start - maps.len() as u32,
        "nothing mapped for them"
    );

    // A freed IOVA block waits in quarantine: the next mapping of its size
    // gets another block, so a stale descriptor would fault, not reach it.
    let freed = maps.remove(2);
    // SAFETY: once.
    ok(unsafe { dma.try_unmap(freed) }, "unmap")?;
    let again = map(&dma, buf.page(50), freed.len, DmaDirection::Bidirectional)?;
    check!(
        again.addr != freed.addr,
        "freed IOVA {} reused at once",
        freed.addr
    );
    maps.push(again);
    // SAFETY: each once.
    ok(unsafe { dma.try_unmap_batch(&maps) }, "batch unmap")?;
    check_eq!(avail(&dma)?, start, "DMA_AVAIL back");
    Ok(())
}

/// `dma_entry_limit=64` for one container: `map` fails with the typed limit
/// error once 64 mappings exist, and the failure leaves nothing mapped. Then
/// the same through the pool.
fn test_entry_limit(ctx: &Ctx) -> TestResult {
    with_entry_limit(64, || entry_limit_inner(ctx))
}

/// Runs `f` with the `vfio_iommu_type1` module parameter `dma_entry_limit`
/// set to `limit`, and restores it afterwards. The parameter is writable at
/// run time and the kernel reads it when a container gets its IOMMU, so
/// every container opened inside `f` has this limit, with no module reload.
fn with_entry_limit(limit: u32, f: impl FnOnce() -> TestResult) -> TestResult {
    let old = ok(
        std::fs::read_to_string(DMA_ENTRY_LIMIT_PARAM),
        "read dma_entry_limit",
    )?;
    ok(
        std::fs::write(DMA_ENTRY_LIMIT_PARAM, limit.to_string()),
        "write dma_entry_limit",
    )?;
    let result = f();
    ok(
        std::fs::write(DMA_ENTRY_LIMIT_PARAM, old.trim()),
        "restore dma_entry_limit",
    )?;
    result
}

fn entry_limit_inner(ctx: &Ctx) -> TestResult {
    let dma = ctx.open()?;
    check_eq!(dma.entry_limit(), Some(64), "limit seen by the backend");
    check_eq!(avail(&dma)?, 64, "DMA_AVAIL of a fresh container");
    let buf = Buf::new(65);
    let mut maps = Vec::new();
    for i in 0..64 {
        maps.push(map(&dma, buf.page(i), PAGE, DmaDirection::FromDevice)?);
    }
    check_eq!(avail(&dma)?, 0, "DMA_AVAIL at the limit");
    // SAFETY: page 64 of `buf` is valid and unused.
    let err = unsafe { DmaOps::map(&dma, buf.page(64), PAGE, DmaDirection::FromDevice) };
    check_eq!(
        err,
        Err(DmaError::MappingLimit { limit: Some(64) }),
        "DmaOps::map past the limit"
    );
    // SAFETY: as above.
    let rich = unsafe { dma.try_map(buf.page(64), PAGE, DmaDirection::FromDevice) };
    let Err(rich @ VfioError::MappingLimit { .. }) = rich else {
        return Err(format!("try_map past the limit gave {rich:?}"));
    };
    println!("  error: {rich}");
    check!(
        rich.to_string().contains("dma_entry_limit"),
        "message names the knob"
    );
    check_eq!(avail(&dma)?, 0, "failed maps left nothing");
    let s = dma.stats();
    check_eq!(
        (s.live_mappings, s.map_failures),
        (64, 2),
        "live mappings / failures"
    );
    // SAFETY: each once.
    ok(unsafe { dma.try_unmap_batch(&maps) }, "batch unmap")?;
    check_eq!(avail(&dma)?, 64, "DMA_AVAIL back");

    // Through the pool: the 65th page fails with the typed error, and unbind
    // leaves the container empty.
    let device = Device::new(dma.clone());
    let mut pool = ok(
        device.pool_builder().cache_size(16).refill_batch(1).build(),
        "build pool",
    )?;
    let mut pages = Vec::new();
    let err = loop {
        match pool.alloc() {
            Ok(p) => pages.push(p),
            Err(e) => break e,
        }
        check!(pages.len() <= 64, "more than 64 pages mapped");
    };
    check_eq!(
        err,
        AllocError::Map(DmaError::MappingLimit { limit: Some(64) }),
        "pool alloc past the limit"
    );
    check_eq!(pages.len(), 64, "pages mapped before the limit");
    check_eq!(avail(&dma)?, 0, "DMA_AVAIL at the limit");
    let report = ok(device.unbind(), "unbind")?;
    check_eq!(avail(&dma)?, 64, "DMA_AVAIL after unbind");
    println!("  pool: {} pages, then {err}; {report}", pages.len());
    drop(pages);
    drop(pool);
    Ok(())
}

// Linux capability ABI for dropping CAP_IPC_LOCK from one thread.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_IPC_LOCK: u32 = 14;

fn drop_ipc_lock_in_this_thread() -> TestResult {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: valid header and two data structs, as version 3 wants.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    check!(r == 0, "capget: {}", std::io::Error::last_os_error());
    data[0].effective &= !(1 << CAP_IPC_LOCK);
    // SAFETY: as above; the raw syscall changes only the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    check!(r == 0, "capset: {}", std::io::Error::last_os_error());
    Ok(())
}

fn locked_pages() -> Result<u64, String> {
    let status = ok(
        std::fs::read_to_string("/proc/self/status"),
        "read /proc/self/status",
    )?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmLck:"))
        .ok_or("no VmLck line")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or("bad VmLck")?;
    Ok(kb / 4)
}

/// A low `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK`: `map` fails with the typed
/// locked-memory error and leaves nothing mapped.
fn test_memlock_limit(ctx: &Ctx) -> TestResult {
    let dma = ctx.open()?;
    let start = avail(&dma)?;
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    check!(
        unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut old) } == 0,
        "getrlimit"
    );
    let dma2 = dma.clone();
    let result = std::thread::spawn(move || -> TestResult {
        drop_ipc_lock_in_this_thread()?;
        let allowed = 16u64;
        let base = locked_pages()?;
        let limit = libc::rlimit {
            rlim_cur: ((base + allowed) * PAGE as u64) as _,
            rlim_max: old.rlim_max,
        };
        // SAFETY: valid rlimit.
        check!(
            unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } == 0,
            "setrlimit"
        );
        let buf = Buf::new(64);
        let mut maps = Vec::new();
        let mut failure = None;
        for i in 0..64 {
            // SAFETY: a page of `buf`, unmapped before `buf` drops.
            match unsafe { dma2.try_map(buf.page(i), PAGE, DmaDirection::FromDevice) } {
                Ok(addr) => maps.push(DmaMapping {
                    addr,
                    len: PAGE,
                    direction: DmaDirection::FromDevice,
                }),
                Err(e) => {
                    failure = Some((i, e));
                    break;
                }
            }
        }
        let avail_at_failure = avail(&dma2)?;
        // The trait-level error for the same situation.
        // SAFETY: as above.
        let trait_err = unsafe { DmaOps::map(&dma2, buf.page(63), PAGE, DmaDirection::FromDevice) };
        // SAFETY: each once.
        let unmapped = unsafe { dma2.try_unmap_batch(&maps) };
        // SAFETY: valid rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &old) };
        ok(unmapped, "batch unmap")?;
        let Some((at, err)) = failure else {
            return Err("64 maps succeeded under a 16-page RLIMIT_MEMLOCK".into());
        };
        println!("  VmLck base {base} pages, limit +{allowed}: map #{at} failed: {err}");
        check!(
            matches!(err, VfioError::LockedMemoryLimit { .. }),
            "error kind {err:?}"
        );
        check_eq!(at as u64, allowed, "maps that fit under the limit");
        check_eq!(
            avail_at_failure,
            start - at as u32,
            "the failed map left nothing"
        );
        check_eq!(
            trait_err,
            Err(DmaError::LockedMemoryLimit),
            "DmaOps::map error"
        );
        Ok(())
    })
    .join()
    .map_err(|_| "memlock thread panicked".to_string())?;
    result?;
    check_eq!(avail(&dma)?, start, "DMA_AVAIL back");
    Ok(())
}

/// `EEXIST`: something else mapped the IOVA this backend picks next; `map`
/// fails with the typed overlap error and its IOVA block is not leaked.
fn test_overlap(ctx: &Ctx) -> TestResult {
    #[repr(C)]
    struct DmaMap {
        argsz: u32,
        flags: u32,
        vaddr: u64,
        iova: u64,
        size: u64,
    }
    #[repr(C)]
    struct DmaUnmap {
        argsz: u32,
        flags: u32,
        iova: u64,
        size: u64,
    }
    let dma = ctx.open()?;
    let start = avail(&dma)?;
    let buf = Buf::new(2);
    // A fresh allocator hands out the lowest free page first: IOVA 0x1000.
    let mut raw = DmaMap {
        argsz: 32,
        flags: 3,
        vaddr: buf.page(1).as_ptr() as u64,
        iova: 0x1000,
        size: PAGE as u64,
    };
    use std::os::fd::AsRawFd;
    let fd = dma.container_fd().as_raw_fd();
    // SAFETY: VFIO_IOMMU_MAP_DMA with a valid struct; `buf` outlives it.
    let r = unsafe { libc::ioctl(fd, 0x3b71, &mut raw) };
    check!(r == 0, "raw MAP_DMA: {}", std::io::Error::last_os_error());
    // SAFETY: a page of `buf`.
    let err = unsafe { DmaOps::map(&dma, buf.page(0), PAGE, DmaDirection::Bidirectional) };
    check_eq!(err, Err(DmaError::Overlap), "map onto a foreign mapping");
    check_eq!(avail(&dma)?, start - 1, "only the foreign mapping is live");
    let mut unmap = DmaUnmap {
        argsz: 24,
        flags: 0,
        iova: 0x1000,
        size: PAGE as u64,
    };
    // SAFETY: VFIO_IOMMU_UNMAP_DMA with a valid struct.
    let r = unsafe { libc::ioctl(fd, 0x3b72, &mut unmap) };
    check!(r == 0 && unmap.size == PAGE as u64, "raw UNMAP_DMA");
    // The block was returned on failure: the same IOVA is handed out now.
    let m = map(&dma, buf.page(0), PAGE, DmaDirection::Bidirectional)?;
    check_eq!(m.addr, DmaAddr(0x1000), "IOVA reused after the failed map");
    // SAFETY: once.
    ok(unsafe { dma.try_unmap(m) }, "unmap")?;
    check_eq!(avail(&dma)?, start, "DMA_AVAIL back");
    Ok(())
}

/// A map the kernel refuses for a bad address leaves nothing behind.
fn test_bad_address(ctx: &Ctx) -> TestResult {
    let dma = ctx.open()?;
    let start = avail(&dma)?;
    let buf = Buf::new(4);
    let hole = buf.page(2);
    // SAFETY: unmapping the middle of our own mapping; `Buf::drop` later
    // unmaps the whole range again, which is fine for munmap.
    unsafe { libc::munmap(hole.as_ptr().cast(), PAGE) };
    // SAFETY: deliberately outside the contract's "valid memory", but the
    // kernel only fails to pin it; no Rust code touches the address.
    let err = unsafe { dma.try_map(hole, PAGE, DmaDirection::FromDevice) };
    println!("  map of an unmapped address: {err:?}");
    check!(err.is_err(), "map of an unmapped address succeeded");
    check_eq!(avail(&dma)?, start, "nothing left mapped");
    let m = map(&dma, buf.page(0), PAGE, DmaDirection::FromDevice)?;
    check_eq!(
        m.addr,
        DmaAddr(0x1000),
        "the failed map's IOVA was returned"
    );
    // SAFETY: once.
    ok(unsafe { dma.try_unmap(m) }, "unmap")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Pool tests: Device / PagePool over VfioDma.
// ---------------------------------------------------------------------------

fn test_pool_alloc_recycle_unbind(ctx: &Ctx) -> TestResult {
    let dma = ctx.open()?;
    let start = avail(&dma)?;
    let device = Device::new(dma.clone());
    let mut pool = ok(device.pool_builder().build(), "build pool")?;
    for round in 0..4 {
        let mut pages = Vec::new();
        for _ in 0..1000 {
            let mut page: Page = ok(pool.alloc(), "alloc")?;
            page.as_mut_slice()[0] = round;
            pages.push(page);
        }
        // Half come back through the owner, half from another thread.
        let remote = pages.split_off(500);
        std::thread::spawn(move || drop(remote)).join().unwrap();
        for page in pages {
            pool.recycle_direct(page);
        }
    }
    let mid = avail(&dma)?;
    let mapped = dma.stats().live_mappings;
    check_eq!(
        u64::from(start - mid),
        mapped,
        "DMA_AVAIL counts the pool's mappings"
    );
    check!(
        mapped >= 1000,
        "pages recycled, not leaked: {mapped} mapped"
    );
    let s0 = dma.stats();
    let report = ok(device.unbind(), "unbind")?;
    let s1 = dma.stats();
    let end = avail(&dma)?;
    check_eq!(end, start, "DMA_AVAIL after unbind");
    check_eq!(s1.live_mappings, 0, "live mappings after unbind");
    check_eq!(s1.unmap_errors, 0, "unmap errors");
    println!(
        "  4 rounds of 1000 allocs: {} MAP_DMA; DMA_AVAIL {start} -> {mid} -> {end}; {report}; {} UNMAP_DMA",
        s0.map_calls,
        s1.unmap_calls - s0.unmap_calls
    );
    check!(pool.alloc().is_err(), "alloc after unbind must fail");
    Ok(())
}

/// Pages held by 4 threads across unbind: when unbind returns the container
/// is empty; the held pages stay readable and writable; dropping them makes
/// no VFIO call at all.
fn test_unbind_with_pages_held_by_threads(ctx: &Ctx) -> TestResult {
    let dma = ctx.open()?;
    let start = avail(&dma)?;
    let device = Device::new(dma.clone());
    let mut pool = ok(
        device
            .pool_builder()
            .direction(DmaDirection::Bidirectional)
            .build(),
        "build pool",
    )?;
    let threads = 4;
    let per_thread = 256;
    let mut batches = Vec::new();
    for t in 0..threads {
        let mut batch = Vec::new();
        for i in 0..per_thread {
            let mut page: Page = ok(pool.alloc(), "alloc")?;
            page.as_mut_slice().fill((t * 31 + i) as u8);
            batch.push(page);
        }
        batches.push(batch);
    }
    check_eq!(
        avail(&dma)?,
        start - (threads * per_thread) as u32,
        "DMA_AVAIL with pages out"
    );

    let held = Arc::new(Barrier::new(threads + 1));
    let unbound = Arc::new(Barrier::new(threads + 1));
    let checked = Arc::new(Barrier::new(threads + 1));
    let release = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for (t, mut batch) in batches.into_iter().enumerate() {
        let (held, unbound, checked, release) = (
            held.clone(),
            unbound.clone(),
            checked.clone(),
            release.clone(),
        );
        handles.push(std::thread::spawn(move || -> TestResult {
            held.wait();
            // Keep using the pages while the device unbinds.
            let deadline = Instant::now() + Duration::from_millis(50);
            while Instant::now() < deadline {
                for page in batch.iter_mut() {
                    let s = page.as_mut_slice();
                    s[1] = s[1].wrapping_add(1);
                }
            }
            unbound.wait();
            // After unbind: every page still holds its data and takes writes.
            let mut result = Ok(());
            for (i, page) in batch.iter_mut().enumerate() {
                let want = (t * 31 + i) as u8;
                if page.as_slice()[0] != want || page.as_slice()[4095] != want {
                    result = Err(format!("thread {t} page {i}: data changed"));
                }
                page.as_mut_slice().fill(0xa5);
                if page.as_slice().iter().any(|&b| b != 0xa5) {
                    result = Err(format!("thread {t} page {i}: write lost"));
                }
            }
            checked.wait();
            release.wait();
            drop(batch);
            result
        }));
    }
    held.wait();
    let report = ok(device.unbind(), "unbind")?;
    // Unbind has returned: the kernel must already count zero mappings.
    let after = avail(&dma)?;
    unbound.wait();
    checked.wait();
    let before_drop = dma.stats();
    release.wait();
    let mut failures = Vec::new();
    for h in handles {
        if let Err(e) = h
            .join()
            .map_err(|_| "holder thread panicked".to_string())
            .and_then(|r| r)
        {
            failures.push(e);
        }
    }
    let after_drop = dma.stats();
    drop(pool);
    let after_pool = dma.stats();
    check!(failures.is_empty(), "{failures:?}");
    check_eq!(after, start, "DMA_AVAIL when unbind returned");
    check_eq!(
        report.pages_held_or_cached,
        threads * per_thread,
        "pages unmapped in flight"
    );
    check_eq!(
        after_drop.ioctls,
        before_drop.ioctls,
        "VFIO calls made by dropping held pages"
    );
    check_eq!(
        after_pool.ioctls,
        before_drop.ioctls,
        "VFIO calls made by dropping the pool"
    );
    check_eq!(after_drop.live_mappings, 0, "live mappings");
    println!(
        "  {} pages held by {threads} threads: DMA_AVAIL {start} -> {} -> {after} when unbind returned; {report}",
        threads * per_thread,
        start - (threads * per_thread) as u32
    );
    println!(
        "  dropping the held pages and the pool: {} VFIO calls (ioctls {} before, {} after)",
        after_pool.ioctls - before_drop.ioctls,
        before_drop.ioctls,
        after_pool.ioctls
    );
    Ok(())
}

fn unbind_time(ctx: &Ctx, n: usize) -> TestResult {
    let dma = ctx.open()?;
    let start = avail(&dma)?;
    let device = Device::new(dma.clone());
    let mut pool = ok(device.pool_builder().build(), "build pool")?;
    let t0 = Instant::now();
    let mut pages = Vec::with_capacity(n);
    for _ in 0..n {
        let page: Page = ok(pool.alloc(), "alloc")?;
        pages.push(page);
    }
    let map_time = t0.elapsed();
    let mid = avail(&dma)?;
    check!(
        start - mid >= n as u32,
        "DMA_AVAIL {start} -> {mid} with {n} pages out"
    );
    let s0 = dma.stats();
    let t1 = Instant::now();
    let report = ok(device.unbind(), "unbind")?;
    let took = t1.elapsed();
    let s1 = dma.stats();
    check_eq!(avail(&dma)?, start, "DMA_AVAIL after unbind");
    let before_drop = dma.stats();
    drop(pages);
    let s2 = dma.stats();
    check_eq!(
        s2.ioctls,
        before_drop.ioctls,
        "VFIO calls made by dropping the pages"
    );
    println!(
        "  {n} pages in flight: mapped in {map_time:?} ({} MAP_DMA); unbind took {took:?} with {} UNMAP_DMA \
         for {} mappings; DMA_AVAIL {start} -> {mid} -> {start}",
        s0.map_calls,
        s1.unmap_calls - s0.unmap_calls,
        s1.unmapped - s0.unmapped
    );
    println!("  {report}");
    drop(pool);
    Ok(())
}

fn test_unbind_time_1k(ctx: &Ctx) -> TestResult {
    unbind_time(ctx, 1024)
}

fn test_unbind_time_16k(ctx: &Ctx) -> TestResult {
    unbind_time(ctx, 16 * 1024)
}

// ---------------------------------------------------------------------------
// Region-mapped pools: one MAP_DMA per 2 MiB region, 512 pages carved from it.
// ---------------------------------------------------------------------------

/// Pages of one default region.
const REGION_PAGES: usize = DEFAULT_REGION_SIZE / PAGE;
/// The `dma_entry_limit` of the region tests.
const REGION_TEST_LIMIT: u32 = 64;
/// Huge pages reserved by `hugepages=` on the guest's kernel command line.
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// A `/proc/meminfo` value (kB, or a count for the `HugePages_` lines).
fn meminfo(key: &str) -> Result<u64, String> {
    let text = ok(
        std::fs::read_to_string("/proc/meminfo"),
        "read /proc/meminfo",
    )?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {key} in /proc/meminfo"))
}

fn region_info(pool: &PagePool) -> Result<RegionInfo, String> {
    pool.info()
        .regions
        .ok_or_else(|| "a region-mapped pool reports no RegionInfo".to_string())
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// The IOMMU's smallest page, as the pool sees it: intel-iommu maps 4 KiB
/// pages, so an order-0 pool mapped page by page is accepted (a pool whose
/// pages were smaller than this would be refused with
/// `BuildError::PageBelowIommuPage`, which an IOMMU with 4 KiB pages never
/// gives for 4 KiB pages).
fn test_iommu_min_page(ctx: &Ctx) -> TestResult {
    let dma = ctx.open()?;
    let start = avail(&dma)?;
    let min = DmaOps::min_page_size(&dma);
    println!(
        "  DmaOps::min_page_size {min:?} (IOMMU page sizes {:#x}: smallest {} bytes)",
        dma.page_sizes(),
        dma.page_size()
    );
    check_eq!(min, Some(PAGE), "min_page_size with intel-iommu");
    let device = Device::new(dma.clone());
    let per_page = device.pool_builder().build();
    check!(
        !matches!(per_page, Err(BuildError::PageBelowIommuPage { .. })),
        "an order-0 per-page pool refused: {:?}",
        per_page.err()
    );
    let region = ok(
        device.pool_builder().region_size(PAGE).build(),
        "a region pool with one-IOMMU-page regions",
    )?;
    drop((per_page, region));
    check_eq!(avail(&dma)?, start, "nothing left mapped");
    Ok(())
}

/// How one fill of a fresh pool went.
struct Fill {
    pages: usize,
    took: Duration,
    map_calls: u64,
    unmap_calls: u64,
    unmapped: u64,
    unbind: Duration,
    backing: Option<RegionBacking>,
}

impl Fill {
    fn rate(&self) -> f64 {
        self.pages as f64 / self.took.as_secs_f64()
    }
}

/// Takes `n` pages from a fresh pool (every one through the slow path),
/// timed, then unbinds with them all held.
fn fill_fresh_pool(
    ctx: &Ctx,
    n: usize,
    build: impl FnOnce(&Device) -> Result<PagePool, BuildError>,
) -> Result<Fill, String> {
    let dma = ctx.open()?;
    let start = avail(&dma)?;
    let device = Device::new(dma.clone());
    let mut pool = ok(build(&device), "build pool")?;
    let s0 = dma.stats();
    let t0 = Instant::now();
    let mut pages = Vec::with_capacity(n);
    for _ in 0..n {
        let page: Page = ok(pool.alloc(), "alloc")?;
        pages.push(page);
    }
    let took = t0.elapsed();
    let s1 = dma.stats();
    let mid = avail(&dma)?;
    let map_calls = s1.map_calls - s0.map_calls;
    check_eq!(
        u64::from(start - mid),
        map_calls,
        "one DMA_AVAIL entry per MAP_DMA"
    );
    let backing = pool.info().regions.and_then(|r| r.backing);
    let report = ok(device.unbind(), "unbind")?;
    let s2 = dma.stats();
    check_eq!(avail(&dma)?, start, "DMA_AVAIL after unbind");
    let before_drop = dma.stats();
    drop(pages);
    drop(pool);
    check_eq!(
        dma.stats().ioctls,
        before_drop.ioctls,
        "VFIO calls made by dropping the pages and the pool"
    );
    Ok(Fill {
        pages: n,
        took,
        map_calls,
        unmap_calls: s2.unmap_calls - s1.unmap_calls,
        unmapped: s2.unmapped - s1.unmapped,
        unbind: report.duration,
        backing,
    })
}

/// Map throughput in the guest: pages per second through the slow path of
/// a fresh pool, per-page mode (one `MAP_DMA` per page) against region mode
/// (one per 512 pages), with the `MAP_DMA`/`UNMAP_DMA` counts of each.
fn test_map_throughput(ctx: &Ctx) -> TestResult {
    let n = 8192;
    let per_page = fill_fresh_pool(ctx, n, |d| d.pool_builder().build())?;
    let huge = fill_fresh_pool(ctx, n, |d| d.pool_builder().regions().build())?;
    let thp = fill_fresh_pool(ctx, n, |d| {
        d.pool_builder()
            .region_source(SystemRegions::without_huge_tlb())
            .build()
    })?;
    check_eq!(per_page.map_calls, n as u64, "per-page MAP_DMA calls");
    check_eq!(per_page.unmapped, n as u64, "per-page mappings unmapped");
    for (what, fill) in [("hugetlb", &huge), ("without hugetlb", &thp)] {
        check_eq!(
            fill.map_calls,
            (n / REGION_PAGES) as u64,
            "region MAP_DMA calls ({what})"
        );
        check_eq!(
            fill.unmapped,
            (n / REGION_PAGES) as u64,
            "regions unmapped ({what})"
        );
    }
    for (name, fill) in [
        ("per-page", &per_page),
        ("regions, SystemRegions::new()", &huge),
        ("regions, SystemRegions::without_huge_tlb()", &thp),
    ] {
        println!(
            "  map throughput {name}: {} pages in {:?} = {:.0} pages/s; {} MAP_DMA; unbind {} \
             UNMAP_DMA for {} mappings in {:?}; backing {}",
            fill.pages,
            fill.took,
            fill.rate(),
            fill.map_calls,
            fill.unmap_calls,
            fill.unmapped,
            fill.unbind,
            fill.backing
                .map_or("per-page (global allocator)".to_string(), |b| b.to_string())
        );
    }
    println!(
        "  map throughput: region mode {:.1}x (hugetlb) and {:.1}x (without hugetlb) the pages/s \
         of per-page mode; {}x fewer MAP_DMA",
        huge.rate() / per_page.rate(),
        thp.rate() / per_page.rate(),
        per_page.map_calls / huge.map_calls.max(1)
    );
    check!(
        huge.rate() > per_page.rate() && thp.rate() > per_page.rate(),
        "region mode maps faster than per-page mode"
    );
    Ok(())
}

/// Region mode at `dma_entry_limit=64` with huge pages reserved (the guest
/// boots with `hugepages=`): 64 regions of 2 MiB hold 32768 pages, backed
/// by hugetlb. Then a per-page pool on the same container and limit.
fn test_regions_entry_limit_hugetlb(ctx: &Ctx) -> TestResult {
    let total = meminfo("HugePages_Total")?;
    let free = meminfo("HugePages_Free")?;
    println!("  huge pages reserved: {total} ({free} free)");
    check!(
        free > u64::from(REGION_TEST_LIMIT),
        "the guest needs more than {REGION_TEST_LIMIT} free huge pages (hugepages= on the kernel \
         command line): {free}"
    );
    with_entry_limit(REGION_TEST_LIMIT, || {
        let dma = ctx.open()?;
        regions_at_limit(&dma, RegionBacking::HugeTlb)?;
        per_page_at_limit(&dma)
    })
}

/// The same with no huge page reserved (`vm.nr_hugepages` set to 0 for the
/// test): `SystemRegions` falls back to transparent huge pages.
fn test_regions_entry_limit_no_hugepages(ctx: &Ctx) -> TestResult {
    let old = ok(std::fs::read_to_string(NR_HUGEPAGES), "read nr_hugepages")?;
    ok(std::fs::write(NR_HUGEPAGES, "0"), "write nr_hugepages")?;
    let result = (|| {
        check_eq!(
            meminfo("HugePages_Total")?,
            0,
            "huge pages after nr_hugepages=0"
        );
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_else(|e| e.to_string());
        println!(
            "  huge pages reserved: 0; transparent huge pages: {}",
            thp.trim()
        );
        with_entry_limit(REGION_TEST_LIMIT, || {
            let dma = ctx.open()?;
            regions_at_limit(&dma, RegionBacking::TransparentHuge)
        })
    })();
    ok(
        std::fs::write(NR_HUGEPAGES, old.trim()),
        "restore nr_hugepages",
    )?;
    println!(
        "  nr_hugepages restored to {} ({} reserved)",
        old.trim(),
        meminfo("HugePages_Total")?
    );
    result
}

/// A fresh container at `dma_entry_limit=64`: a region-mode pool keeps
/// 32768 pages (128 MiB) in flight through its 64 mappings, threads hold
/// some of them across `unbind`, which unmaps each region once and leaves
/// the container empty when it returns.
fn regions_at_limit(dma: &VfioDma, want_backing: RegionBacking) -> TestResult {
    let limit = REGION_TEST_LIMIT as usize;
    check_eq!(
        dma.entry_limit(),
        Some(limit as u64),
        "limit seen by the backend"
    );
    check_eq!(
        avail(dma)?,
        REGION_TEST_LIMIT,
        "DMA_AVAIL of a fresh container"
    );
    let device = Device::new(dma.clone());
    let mut pool = ok(
        device
            .pool_builder()
            .regions()
            .direction(DmaDirection::Bidirectional)
            .build(),
        "build region pool",
    )?;
    let huge_free0 = meminfo("HugePages_Free")?;
    let anon_huge0 = meminfo("AnonHugePages")?;
    let n = limit * REGION_PAGES;
    let s0 = dma.stats();
    let t0 = Instant::now();
    let mut pages = Vec::with_capacity(n);
    for i in 0..n {
        let mut page: Page = ok(pool.alloc(), "alloc")?;
        let s = page.as_mut_slice();
        let tag = (i as u32).to_le_bytes();
        s[..4].copy_from_slice(&tag);
        s[PAGE - 4..].copy_from_slice(&tag);
        pages.push(page);
    }
    let fill_time = t0.elapsed();
    let s1 = dma.stats();
    let at_limit = avail(dma)?;
    let info = region_info(&pool)?;
    let huge_used = huge_free0.saturating_sub(meminfo("HugePages_Free")?);
    let anon_huge = meminfo("AnonHugePages")?.saturating_sub(anon_huge0);
    check_eq!(at_limit, 0, "DMA_AVAIL with 64 regions mapped");
    check_eq!(s1.map_calls - s0.map_calls, limit as u64, "MAP_DMA calls");
    check_eq!(
        (
            info.regions_mapped,
            info.regions_live,
            info.regions_total,
            info.pages_carved,
            info.bytes_pinned
        ),
        (
            limit as u64,
            limit as u64,
            limit as u64,
            n as u64,
            (limit * DEFAULT_REGION_SIZE) as u64
        ),
        "RegionInfo (mapped, live, total, pages carved, bytes pinned)"
    );
    check_eq!(info.backing, Some(want_backing), "region backing");
    // Every page's IOVA lies in one of 64 distinct 2 MiB blocks, 512 each.
    let mut blocks = std::collections::HashMap::<u64, usize>::new();
    for page in &pages {
        *blocks
            .entry(page.dma_addr().0 / DEFAULT_REGION_SIZE as u64)
            .or_default() += 1;
    }
    check!(
        blocks.len() == limit && blocks.values().all(|&c| c == REGION_PAGES),
        "pages per 2 MiB IOVA block: {} blocks",
        blocks.len()
    );
    println!(
        "  {n} pages ({} MiB) in flight through {} MAP_DMA in {fill_time:?}: DMA_AVAIL {} -> \
         {at_limit}; regions mapped {}, live {}, carved {} pages, {} MiB pinned, backing {} \
         (HugePages used {huge_used}, AnonHugePages +{} MiB)",
        mib((n * PAGE) as u64),
        s1.map_calls - s0.map_calls,
        REGION_TEST_LIMIT,
        info.regions_mapped,
        info.regions_live,
        info.pages_carved,
        mib(info.bytes_pinned),
        want_backing,
        anon_huge / 1024
    );
    if want_backing == RegionBacking::HugeTlb {
        check_eq!(huge_used, limit as u64, "huge pages taken by the regions");
    }

    // The 65th region: the typed limit error, and the region given back.
    let err = pool.alloc().err();
    check_eq!(
        err,
        Some(AllocError::Map(DmaError::MappingLimit {
            limit: Some(limit as u64)
        })),
        "alloc past the 64th region"
    );
    let info = region_info(&pool)?;
    check_eq!(
        (info.regions_mapped, info.regions_live),
        (limit as u64, limit as u64),
        "regions after the refused map"
    );
    check_eq!(avail(dma)?, 0, "the refused map left nothing");
    let refused = dma.stats();
    check_eq!(
        (
            refused.map_calls - s1.map_calls,
            refused.map_failures - s1.map_failures
        ),
        (1, 1),
        "MAP_DMA calls (and failures) for the 65th region"
    );
    println!(
        "  page {}: one more MAP_DMA, refused: {}; its region went back to its source",
        n + 1,
        err.unwrap()
    );

    // Four threads hold 1024 pages each across unbind, writing to them
    // while it runs; the owner holds the rest.
    let threads = 4;
    let per_thread = 1024;
    let held = Arc::new(Barrier::new(threads + 1));
    let unbound = Arc::new(Barrier::new(threads + 1));
    let release = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for t in 0..threads {
        let mut batch = pages.split_off(pages.len() - per_thread);
        let (held, unbound, release) = (held.clone(), unbound.clone(), release.clone());
        handles.push(std::thread::spawn(move || -> TestResult {
            for page in batch.iter_mut() {
                page.as_mut_slice()[4..PAGE - 4].fill(t as u8 + 1);
            }
            held.wait();
            let deadline = Instant::now() + Duration::from_millis(50);
            while Instant::now() < deadline {
                for page in batch.iter_mut() {
                    let s = page.as_mut_slice();
                    s[8] = s[8].wrapping_add(1);
                    s[8] = s[8].wrapping_sub(1);
                }
            }
            unbound.wait();
            let mut result = Ok(());
            for (i, page) in batch.iter_mut().enumerate() {
                let s = page.as_slice();
                if s[4..PAGE - 4].iter().any(|&b| b != t as u8 + 1) || s[..4] != s[PAGE - 4..] {
                    result = Err(format!("thread {t} page {i}: data changed"));
                }
                page.as_mut_slice().fill(0x5a);
                if page.as_slice().iter().any(|&b| b != 0x5a) {
                    result = Err(format!("thread {t} page {i}: write lost"));
                }
            }
            release.wait();
            drop(batch);
            result
        }));
    }
    held.wait();
    let s2 = dma.stats();
    let report = ok(device.unbind(), "unbind")?;
    let after = avail(dma)?;
    let s3 = dma.stats();
    unbound.wait();
    let info_unbound = region_info(&pool)?;
    // The owner's pages: intact, and dropping them makes no VFIO call.
    let mut intact = 0;
    for (i, page) in pages.iter().enumerate() {
        let s = page.as_slice();
        let tag = (i as u32).to_le_bytes();
        if s[..4] == tag && s[PAGE - 4..] == tag {
            intact += 1;
        }
    }
    let owner_held = pages.len();
    drop(pages);
    release.wait();
    let mut failures = Vec::new();
    for h in handles {
        if let Err(e) = h
            .join()
            .map_err(|_| "holder thread panicked".to_string())
            .and_then(|r| r)
        {
            failures.push(e);
        }
    }
    let info_dropped = region_info(&pool)?;
    drop(pool);
    let s4 = dma.stats();
    check!(failures.is_empty(), "{failures:?}");
    check_eq!(after, REGION_TEST_LIMIT, "DMA_AVAIL when unbind returned");
    check_eq!(report.regions_unmapped, limit, "regions_unmapped");
    check_eq!(report.mappings_left, 0, "mappings left");
    check_eq!(s3.unmapped - s2.unmapped, limit as u64, "mappings unmapped");
    check_eq!(s3.live_mappings, 0, "live mappings after unbind");
    check_eq!(intact, owner_held, "owner's pages intact after unbind");
    check_eq!(
        (info_unbound.regions_mapped, info_unbound.regions_live),
        (0, limit as u64),
        "regions after unbind, pages still held"
    );
    check_eq!(
        (info_dropped.regions_mapped, info_dropped.regions_live),
        (0, 0),
        "regions after every page came back"
    );
    check_eq!(
        s4.ioctls,
        s3.ioctls,
        "VFIO calls made by dropping the held pages and the pool"
    );
    println!(
        "  unbind with {owner_held} pages held by the owner and {} by {threads} threads: \
         DMA_AVAIL 0 -> {after} when it returned; {} mappings torn down by {} UNMAP_DMA; {report}",
        threads * per_thread,
        s3.unmapped - s2.unmapped,
        s3.unmap_calls - s2.unmap_calls
    );
    println!(
        "  held pages intact and writable after unbind; regions live {} -> 0 as they came back; \
         dropping them and the pool: {} VFIO calls",
        info_unbound.regions_live,
        s4.ioctls - s3.ioctls
    );
    Ok(())
}

/// A per-page pool on a container at `dma_entry_limit=64`: 64 pages, then
/// the typed limit error; dropping the pages and the pool gives every entry
/// back without an unbind.
fn per_page_at_limit(dma: &VfioDma) -> TestResult {
    let limit = REGION_TEST_LIMIT as usize;
    check_eq!(
        avail(dma)?,
        REGION_TEST_LIMIT,
        "DMA_AVAIL before the per-page pool"
    );
    let device = Device::new(dma.clone());
    let mut pool = ok(device.pool_builder().build(), "build per-page pool")?;
    let mut pages = Vec::new();
    let err = loop {
        match pool.alloc() {
            Ok(p) => pages.push(p),
            Err(e) => break e,
        }
        check!(pages.len() <= limit, "more than {limit} pages mapped");
    };
    check_eq!(
        err,
        AllocError::Map(DmaError::MappingLimit {
            limit: Some(limit as u64)
        }),
        "per-page pool alloc past the limit"
    );
    check_eq!(pages.len(), limit, "pages mapped before the limit");
    check_eq!(avail(dma)?, 0, "DMA_AVAIL at the limit");
    let held = pages.len();
    drop(pages);
    drop(pool);
    let after = avail(dma)?;
    let s = dma.stats();
    check_eq!(
        after,
        REGION_TEST_LIMIT,
        "DMA_AVAIL after dropping pages and pool"
    );
    check_eq!(s.live_mappings, 0, "live mappings");
    let report = ok(device.unbind(), "unbind")?;
    check_eq!(
        (
            report.pages_held_or_cached,
            report.pages_from_rings,
            report.regions_unmapped
        ),
        (0, 0, 0),
        "nothing left for unbind"
    );
    println!(
        "  per-page pool on the same limit: {held} pages ({} KiB), then {err}; pages and pool \
         dropped: DMA_AVAIL 0 -> {after}",
        held * PAGE / 1024
    );
    println!(
        "  {REGION_TEST_LIMIT} mappings hold {} MiB as regions, {} KiB page by page ({}x)",
        mib((limit * DEFAULT_REGION_SIZE) as u64),
        held * PAGE / 1024,
        REGION_PAGES
    );
    Ok(())
}

/// Eventfds this process has open.
fn open_eventfds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| {
        dir.filter_map(Result::ok)
            .filter(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("eventfd"))
            })
            .count()
    })
}

/// The device request and error interrupts: what the kernel reports, arming
/// them with eventfds (again, replacing; disarming), waiting without a
/// request, and no eventfd left open afterwards. The request itself fires
/// only when the kernel removes the device: `run.sh e1000e-removal` does
/// that.
fn test_device_request_irq(ctx: &Ctx) -> TestResult {
    let dev = ok(VfioDevice::open(&ctx.bdf), "open device")?;
    let req = ok(dev.irq_info(REQ_IRQ_INDEX), "request irq info")?;
    check!(req.count == 1 && req.eventfd(), "request interrupt {req:?}");
    let err = ok(dev.irq_info(ERR_IRQ_INDEX), "error irq info")?;
    println!("  request interrupt {req:?}; error interrupt {err:?}");
    check_eq!(
        dev.irq_info(9).err(),
        Some(VfioError::NoSuchIrq { index: 9 }),
        "an index past the last"
    );
    let before = open_eventfds();
    let first = ok(dev.request_notifier(), "arm the request")?;
    let second = ok(dev.request_notifier(), "arm it again (replaces the first)")?;
    let error = ok(dev.error_notifier(), "arm the error interrupt")?;
    check_eq!(
        error.is_some(),
        err.count > 0,
        "an error notifier exactly where the device has the interrupt"
    );
    check_eq!(
        open_eventfds(),
        before + 2 + usize::from(error.is_some()),
        "one eventfd per notifier"
    );
    let ioctls = dev.dma().stats().ioctls;
    check_eq!(
        ok(second.wait(Some(Duration::from_millis(20))), "wait")?,
        None,
        "no request without a removal"
    );
    check_eq!(dev.dma().stats().ioctls, ioctls, "waiting makes no ioctl");
    ok(dev.disarm_irq(REQ_IRQ_INDEX), "disarm the request")?;
    drop((first, second, error));
    check_eq!(
        open_eventfds(),
        before,
        "the notifiers' eventfds are closed"
    );
    // Armed, then the device closed first: closing is no request, and the
    // notifier's eventfd goes with the notifier.
    let armed = ok(dev.request_notifier(), "arm once more")?;
    drop(dev);
    check_eq!(
        ok(armed.try_take(), "take")?,
        None,
        "closing the device signals nothing"
    );
    drop(armed);
    check_eq!(open_eventfds(), before, "no eventfd left");
    // The group opens again: nothing kept the device.
    let again = ok(VfioDevice::open(&ctx.bdf), "open the device again")?;
    drop(again);
    Ok(())
}

type Test = (&'static str, fn(&Ctx) -> TestResult);

const TESTS: &[Test] = &[
    ("device_access", test_device_access),
    ("device_request_irq", test_device_request_irq),
    ("from_fds", test_from_fds),
    (
        "second_group_in_one_container",
        test_second_group_in_one_container,
    ),
    (
        "mmio_region_outlives_handles",
        test_mmio_region_outlives_handles,
    ),
    ("unmap_from_forked_child", test_unmap_from_forked_child),
    ("map_unmap_single", test_map_unmap_single),
    ("map_unmap_batch", test_map_unmap_batch),
    ("iova_alignment_and_reuse", test_iova_alignment_and_reuse),
    ("entry_limit", test_entry_limit),
    ("memlock_limit", test_memlock_limit),
    ("overlap", test_overlap),
    ("bad_address", test_bad_address),
    ("pool_alloc_recycle_unbind", test_pool_alloc_recycle_unbind),
    (
        "unbind_with_pages_held_by_threads",
        test_unbind_with_pages_held_by_threads,
    ),
    ("unbind_time_1k", test_unbind_time_1k),
    ("unbind_time_16k", test_unbind_time_16k),
    ("iommu_min_page", test_iommu_min_page),
    ("map_throughput", test_map_throughput),
    (
        "regions_entry_limit_hugetlb",
        test_regions_entry_limit_hugetlb,
    ),
    (
        "regions_entry_limit_no_hugepages",
        test_regions_entry_limit_no_hugepages,
    ),
];

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(bdf) = args.next() else {
        eprintln!("usage: pagepool-vmtest <bdf> [filter]");
        std::process::exit(2);
    };
    let filter = args.next();
    let ctx = Ctx { bdf };
    let started = Instant::now();
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in TESTS {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        println!("test {name} ...");
        let t = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| test(&ctx))).unwrap_or_else(|p| {
            Err(format!(
                "panicked: {:?}",
                p.downcast_ref::<String>()
                    .map(String::as_str)
                    .or(p.downcast_ref::<&str>().copied())
            ))
        });
        match result {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:?})", t.elapsed());
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED: {e}");
            }
        }
    }
    println!("guest tests took {:?}", started.elapsed());
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 && passed > 0 { 0 } else { 1 });
}
