//! Unit tests of the checking device, through its public API only: each
//! check of the table in the [module documentation](super), the shadow and
//! sync-mark model, the address space, the reports, the device's
//! behaviour across threads, panics and unbind, and how a `Device` gets
//! its CPU-access check (detected, given, or none).
//!
//! Invariants: CPU memory handed to `map` is a [`Buf`], reached only through
//! its raw pointer, so the tests are clean under Miri; built only without
//! loom (the tests use real threads and clocks).

use core::ptr::NonNull;
use std::time::Duration;

use super::*;
use crate::dma::{DmaAddr, DmaDirection, DmaError, DmaMapping, DmaOps, UnmapError};
use DmaDirection::{Bidirectional, FromDevice, ToDevice};

/// CPU memory for tests: a heap buffer reached only through its raw
/// pointer, so handing that pointer to `map` is clean under Miri.
struct Buf {
    ptr: NonNull<[u8]>,
}

impl Buf {
    fn new(len: usize) -> Self {
        let raw = Box::into_raw(vec![0u8; len].into_boxed_slice());
        Self {
            ptr: NonNull::new(raw).expect("Box is non-null"),
        }
    }

    fn len(&self) -> usize {
        self.ptr.len()
    }

    fn at(&self, offset: usize) -> NonNull<u8> {
        assert!(offset <= self.len());
        // SAFETY: `offset` is within (or one past) the allocation.
        unsafe { self.ptr.cast::<u8>().add(offset) }
    }

    fn read(&self) -> Vec<u8> {
        // SAFETY: the buffer is live; no mutable reference exists and no
        // device call runs concurrently in these tests.
        unsafe { core::slice::from_raw_parts(self.at(0).as_ptr(), self.len()).to_vec() }
    }

    fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len());
        // SAFETY: in bounds (asserted); no reference to the buffer exists.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), self.at(offset).as_ptr(), data.len())
        };
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `Box::into_raw` and is freed once.
        drop(unsafe { Box::from_raw(self.ptr.as_ptr()) });
    }
}

fn record() -> CheckingDevice {
    CheckingDevice::new(CheckMode::Record)
}

fn map_at(
    dev: &CheckingDevice,
    buf: &Buf,
    offset: usize,
    len: usize,
    dir: DmaDirection,
) -> DmaMapping {
    try_map(dev, buf, offset, len, dir).expect("map failed")
}

fn try_map(
    dev: &CheckingDevice,
    buf: &Buf,
    offset: usize,
    len: usize,
    dir: DmaDirection,
) -> Result<DmaMapping, DmaError> {
    assert!(offset + len <= buf.len());
    // SAFETY: the buffer outlives the device calls of each test and is
    // not referenced while a call runs.
    let addr = unsafe { dev.map(buf.at(offset), len, dir) }?;
    Ok(DmaMapping {
        addr,
        len,
        direction: dir,
    })
}

fn map(dev: &CheckingDevice, buf: &Buf, dir: DmaDirection) -> DmaMapping {
    map_at(dev, buf, 0, buf.len(), dir)
}

fn unmap(dev: &CheckingDevice, m: DmaMapping) {
    // SAFETY: the checker touches no memory on unmap.
    let result = unsafe { dev.unmap(m) };
    assert_eq!(result, Ok(()), "only an injected unmap failure fails");
}

fn sync_cpu(dev: &CheckingDevice, m: DmaMapping, offset: usize, len: usize) {
    // SAFETY: the test's buffer is live and not referenced during the call.
    unsafe { dev.sync_for_cpu(m, offset, len) }
}

fn sync_dev(dev: &CheckingDevice, m: DmaMapping, offset: usize, len: usize) {
    // SAFETY: the test's buffer is live and not referenced during the call.
    unsafe { dev.sync_for_device(m, offset, len) }
}

/// Asserts exactly these violations were recorded, in order.
fn expect(dev: &CheckingDevice, expected: &[Violation]) {
    assert_eq!(dev.take_violations(), expected, "{}", dev.report());
}

#[test]
fn is_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<CheckingDevice>();
    check::<Violation>();
}

#[test]
fn correct_sequence_has_no_violations() {
    let dev = CheckingDevice::new(CheckMode::Panic);
    let rx = Buf::new(64);
    let tx = Buf::new(32);
    let rx_m = map(&dev, &rx, FromDevice);
    tx.write(0, b"hello");
    let tx_m = map(&dev, &tx, ToDevice);
    assert_eq!(dev.live_mappings(), 2);

    // Device receives, driver syncs part of it for the CPU and reads it.
    dev.device_write(rx_m.addr.offset(8), b"packet").unwrap();
    sync_cpu(&dev, rx_m, 8, 6);
    dev.cpu_access(rx_m, 8, 6, CpuAccess::Read);
    assert_eq!(&rx.read()[8..14], b"packet");
    // Reading bytes the device did not write is fine too.
    dev.cpu_access(rx_m, 20, 10, CpuAccess::Read);

    // Device transmits.
    assert_eq!(dev.device_read(tx_m.addr, 5).unwrap(), b"hello");
    dev.cpu_access(tx_m, 0, 5, CpuAccess::Write);
    tx.write(0, b"world");
    sync_dev(&dev, tx_m, 0, 5);
    assert_eq!(dev.device_read(tx_m.addr, 5).unwrap(), b"world");

    // Bidirectional: both syncs allowed.
    let bi = Buf::new(16);
    let bi_m = map(&dev, &bi, Bidirectional);
    sync_dev(&dev, bi_m, 0, 16);
    sync_cpu(&dev, bi_m, 4, 4);

    unmap(&dev, rx_m);
    // SAFETY: the checker touches no memory on unmap.
    unsafe { dev.unmap_batch(&[tx_m, bi_m]) }.unwrap();
    dev.on_unbind();

    assert!(dev.violations().is_empty());
    let verdict = dev.verdict();
    assert!(verdict.is_clean());
    assert_eq!(
        verdict.to_string(),
        "0 violations, 0 live mappings (unbound)"
    );
    assert!(dev.is_unbound());
    dev.assert_clean();
    let s = dev.stats();
    assert_eq!(s.maps, 3);
    assert_eq!(s.unmaps, 3);
    assert_eq!(s.batch_unmaps, 1);
    assert_eq!(s.syncs_for_cpu, 2);
    assert_eq!(s.syncs_for_device, 2);
    assert_eq!(s.cpu_accesses, 3);
    assert_eq!(s.device_writes, 1);
    assert_eq!(s.device_reads, 2);
    assert_eq!(s.violations, 0);
    assert_eq!(s.peak_live_mappings, 3);
}

#[test]
fn addresses_are_aligned_distinct_guarded_and_never_reused() {
    let dev = record();
    let buf = Buf::new(3 * 4096 + 100);
    let mut seen = Vec::new();
    for i in 0..3 {
        let m = map_at(&dev, &buf, i * 4096, 4096 + (i % 2) * 50, FromDevice);
        assert_ne!(m.addr, DmaAddr::ERROR);
        assert_eq!(m.addr.0 % IOVA_PAGE, 0);
        assert!(m.addr.0 >= IOVA_BASE);
        seen.push(m);
        // Unmapping before the next map must not let the address return.
        if i == 1 {
            unmap(&dev, m);
        }
    }
    for w in seen.windows(2) {
        // At least one unmapped guard page between mappings.
        let end = w[0].addr.0 + w[0].len as u64;
        assert!(w[1].addr.0 >= end.next_multiple_of(IOVA_PAGE) + IOVA_PAGE);
    }
    let again = map_at(&dev, &buf, 4096, 10, FromDevice);
    assert!(seen.iter().all(|m| m.addr != again.addr));
    // The guard page after a mapping faults.
    let first = seen[0];
    assert!(dev.device_write(first.addr.offset(4096), &[1]).is_err());
    assert_eq!(dev.stats().violations, 1);
}

#[test]
fn shadow_device_data_reaches_cpu_only_after_sync_for_cpu() {
    let dev = record();
    let buf = Buf::new(32);
    let m = map(&dev, &buf, FromDevice);
    dev.device_write(m.addr, &[7; 32]).unwrap();
    assert_eq!(buf.read(), vec![0; 32], "device data leaked before sync");
    sync_cpu(&dev, m, 0, 8);
    let seen = buf.read();
    assert_eq!(&seen[..8], &[7; 8]);
    assert_eq!(&seen[8..], &[0; 24], "partial sync copied too much");
    assert_eq!(dev.live_mapping_list()[0].unsynced_device_bytes, 24);
    sync_cpu(&dev, m, 8, 24);
    assert_eq!(buf.read(), vec![7; 32]);
    assert_eq!(dev.live_mapping_list()[0].unsynced_device_bytes, 0);
    unmap(&dev, m);
    dev.on_unbind();
    expect(&dev, &[]);
}

#[test]
fn shadow_cpu_data_reaches_device_at_map_and_after_sync_for_device() {
    let dev = record();
    let buf = Buf::new(8);
    buf.write(0, b"abcdefgh");
    let m = map(&dev, &buf, ToDevice);
    assert_eq!(dev.device_read(m.addr, 8).unwrap(), b"abcdefgh");
    buf.write(0, b"ABCDEFGH");
    assert_eq!(dev.device_read(m.addr, 8).unwrap(), b"abcdefgh");
    sync_dev(&dev, m, 2, 3);
    assert_eq!(dev.device_read(m.addr, 8).unwrap(), b"abCDEfgh");
    // A FromDevice mapping starts zeroed on the device side.
    let rx = Buf::new(4);
    rx.write(0, b"junk");
    let rx_m = map(&dev, &rx, Bidirectional);
    assert_eq!(dev.device_read(rx_m.addr, 4).unwrap(), b"junk");
    expect(&dev, &[]);
}

#[test]
fn unmap_never_writes_cpu_memory() {
    let dev = record();
    let buf = Buf::new(16);
    buf.write(0, &[1; 16]);
    let m = map(&dev, &buf, Bidirectional);
    dev.device_write(m.addr, &[9; 16]).unwrap();
    unmap(&dev, m);
    assert_eq!(buf.read(), vec![1; 16]);
    expect(&dev, &[]);
}

#[test]
fn unmap_of_never_mapped_address() {
    let dev = record();
    let bogus = DmaMapping {
        addr: DmaAddr(0x1234_0000),
        len: 64,
        direction: FromDevice,
    };
    unmap(&dev, bogus);
    // Inside a live mapping, but not its start.
    let buf = Buf::new(64);
    let m = map(&dev, &buf, FromDevice);
    let inside = DmaMapping {
        addr: m.addr.offset(8),
        ..m
    };
    unmap(&dev, inside);
    expect(
        &dev,
        &[
            Violation::UnmapNotMapped {
                addr: DmaAddr(0x1234_0000),
                len: 64,
                direction: FromDevice,
            },
            Violation::UnmapNotMapped {
                addr: m.addr.offset(8),
                len: 64,
                direction: FromDevice,
            },
        ],
    );
    assert_eq!(dev.live_mappings(), 1);
}

#[test]
fn unmap_size_mismatch() {
    let dev = record();
    let buf = Buf::new(64);
    let m = map(&dev, &buf, FromDevice);
    unmap(&dev, DmaMapping { len: 32, ..m });
    expect(
        &dev,
        &[Violation::UnmapSizeMismatch {
            addr: m.addr,
            mapped_len: 64,
            unmap_len: 32,
        }],
    );
    // The mapping is gone anyway (as in dma-debug): no cascade.
    assert_eq!(dev.live_mappings(), 0);
}

#[test]
fn unmap_direction_mismatch() {
    let dev = record();
    let buf = Buf::new(64);
    let m = map(&dev, &buf, FromDevice);
    unmap(
        &dev,
        DmaMapping {
            direction: Bidirectional,
            ..m
        },
    );
    expect(
        &dev,
        &[Violation::UnmapDirectionMismatch {
            addr: m.addr,
            len: 64,
            mapped: FromDevice,
            unmapped: Bidirectional,
        }],
    );
}

#[test]
fn unmap_of_error_address() {
    let dev = record();
    unmap(
        &dev,
        DmaMapping {
            addr: DmaAddr::ERROR,
            len: 4096,
            direction: ToDevice,
        },
    );
    expect(
        &dev,
        &[Violation::UnmapInvalidAddress {
            len: 4096,
            direction: ToDevice,
        }],
    );
}

#[test]
fn double_unmap() {
    let dev = record();
    let buf = Buf::new(64);
    let m = map(&dev, &buf, FromDevice);
    unmap(&dev, m);
    expect(&dev, &[]);
    unmap(&dev, m);
    let double = Violation::DoubleUnmap {
        addr: m.addr,
        len: 64,
        direction: FromDevice,
    };
    expect(&dev, std::slice::from_ref(&double));
    // Within one batch too.
    let m2 = map(&dev, &buf, FromDevice);
    // SAFETY: the checker touches no memory on unmap.
    unsafe { dev.unmap_batch(&[m2, m2]) }.unwrap();
    expect(
        &dev,
        &[Violation::DoubleUnmap {
            addr: m2.addr,
            len: 64,
            direction: FromDevice,
        }],
    );
    assert_eq!(dev.stats().batch_unmaps, 1);
    assert_eq!(dev.stats().unmaps, 4);
}

#[test]
fn retired_record_is_bounded_fifo() {
    let dev = CheckingDevice::builder()
        .mode(CheckMode::Record)
        .retired_capacity(2)
        .build();
    let buf = Buf::new(8);
    let ms: Vec<_> = (0..3)
        .map(|_| {
            let m = map(&dev, &buf, ToDevice);
            unmap(&dev, m);
            m
        })
        .collect();
    unmap(&dev, ms[0]);
    unmap(&dev, ms[2]);
    let [oldest, newest] = dev.take_violations().try_into().unwrap();
    assert!(
        matches!(oldest, Violation::UnmapNotMapped { .. }),
        "{oldest}"
    );
    assert!(matches!(newest, Violation::DoubleUnmap { .. }), "{newest}");
}

#[test]
fn sync_of_never_mapped_address() {
    let dev = record();
    let bogus = DmaMapping {
        addr: DmaAddr(IOVA_BASE),
        len: 64,
        direction: Bidirectional,
    };
    sync_cpu(&dev, bogus, 0, 64);
    sync_dev(&dev, bogus, 4, 8);
    expect(
        &dev,
        &[
            Violation::NotMapped {
                op: Op::SyncForCpu,
                addr: DmaAddr(IOVA_BASE),
                offset: 0,
                len: 64,
            },
            Violation::NotMapped {
                op: Op::SyncForDevice,
                addr: DmaAddr(IOVA_BASE),
                offset: 4,
                len: 8,
            },
        ],
    );
}

#[test]
fn sync_after_unmap_is_not_mapped_and_touches_nothing() {
    let dev = record();
    let buf = Buf::new(8);
    let m = map(&dev, &buf, FromDevice);
    dev.device_write(m.addr, &[5; 8]).unwrap();
    unmap(&dev, m);
    sync_cpu(&dev, m, 0, 8);
    assert_eq!(buf.read(), vec![0; 8]);
    expect(
        &dev,
        &[Violation::NotMapped {
            op: Op::SyncForCpu,
            addr: m.addr,
            offset: 0,
            len: 8,
        }],
    );
}

#[test]
fn sync_outside_the_mapping() {
    let dev = record();
    let buf = Buf::new(64);
    let m = map(&dev, &buf, FromDevice);
    dev.device_write(m.addr, &[3; 64]).unwrap();
    sync_cpu(&dev, m, 60, 8);
    sync_cpu(&dev, m, usize::MAX, 2);
    // Nothing was copied by the bad syncs.
    assert_eq!(buf.read(), vec![0; 64]);
    // Partial syncs inside, including at the very end, are fine.
    sync_cpu(&dev, m, 56, 8);
    sync_cpu(&dev, m, 64, 0);
    expect(
        &dev,
        &[
            Violation::OutOfRange {
                op: Op::SyncForCpu,
                addr: m.addr,
                mapped_len: 64,
                offset: 60,
                len: 8,
            },
            Violation::OutOfRange {
                op: Op::SyncForCpu,
                addr: m.addr,
                mapped_len: 64,
                offset: usize::MAX,
                len: 2,
            },
        ],
    );
    assert_eq!(&buf.read()[56..], &[3; 8]);
}

#[test]
fn sync_for_cpu_of_to_device_mapping() {
    let dev = CheckingDevice::builder()
        .mode(CheckMode::Record)
        .strict_sync_directions(true)
        .build();
    let buf = Buf::new(16);
    let m = map(&dev, &buf, ToDevice);
    sync_cpu(&dev, m, 0, 16);
    expect(
        &dev,
        &[Violation::SyncDirectionNotAllowed {
            op: Op::SyncForCpu,
            addr: m.addr,
            len: 16,
            direction: ToDevice,
        }],
    );
}

#[test]
fn sync_for_device_of_from_device_mapping() {
    let dev = CheckingDevice::builder()
        .mode(CheckMode::Record)
        .strict_sync_directions(true)
        .build();
    let buf = Buf::new(16);
    let m = map(&dev, &buf, FromDevice);
    sync_dev(&dev, m, 0, 16);
    expect(
        &dev,
        &[Violation::SyncDirectionNotAllowed {
            op: Op::SyncForDevice,
            addr: m.addr,
            len: 16,
            direction: FromDevice,
        }],
    );
}

#[test]
fn lenient_sync_directions_are_ownership_only() {
    let dev = CheckingDevice::builder()
        .mode(CheckMode::Record)
        .strict_sync_directions(false)
        .build();
    let rx = Buf::new(8);
    let rx_m = map(&dev, &rx, FromDevice);
    dev.device_write(rx_m.addr, &[1; 8]).unwrap();
    sync_dev(&dev, rx_m, 0, 8);
    // No data moved, and the device data is still unsynced for the CPU.
    assert_eq!(dev.live_mapping_list()[0].unsynced_device_bytes, 8);
    let tx = Buf::new(8);
    tx.write(0, &[2; 8]);
    let tx_m = map(&dev, &tx, ToDevice);
    tx.write(0, &[0; 8]);
    sync_cpu(&dev, tx_m, 0, 8);
    assert_eq!(tx.read(), vec![0; 8]);
    expect(&dev, &[]);
}

#[test]
fn sync_with_different_direction() {
    let dev = record();
    let buf = Buf::new(16);
    let m = map(&dev, &buf, FromDevice);
    let wrong = DmaMapping {
        direction: Bidirectional,
        ..m
    };
    sync_cpu(&dev, wrong, 0, 16);
    expect(
        &dev,
        &[Violation::MappingDirectionMismatch {
            op: Op::SyncForCpu,
            addr: m.addr,
            mapped: FromDevice,
            given: Bidirectional,
        }],
    );
    // Not checked when the mapping is bidirectional.
    let bi = Buf::new(16);
    let bi_m = map(&dev, &bi, Bidirectional);
    sync_cpu(
        &dev,
        DmaMapping {
            direction: FromDevice,
            ..bi_m
        },
        0,
        16,
    );
    sync_dev(
        &dev,
        DmaMapping {
            direction: ToDevice,
            ..bi_m
        },
        0,
        16,
    );
    expect(&dev, &[]);
}

#[test]
fn sync_with_different_length() {
    let dev = record();
    let buf = Buf::new(16);
    let m = map(&dev, &buf, ToDevice);
    sync_dev(&dev, DmaMapping { len: 8, ..m }, 0, 8);
    expect(
        &dev,
        &[Violation::MappingLenMismatch {
            op: Op::SyncForDevice,
            addr: m.addr,
            mapped_len: 16,
            given_len: 8,
        }],
    );
}

#[test]
fn map_overlapping_live_cpu_memory() {
    let dev = record();
    let buf = Buf::new(64);
    let a = map_at(&dev, &buf, 16, 16, FromDevice);
    // Adjacent ranges are fine.
    let below = map_at(&dev, &buf, 0, 16, FromDevice);
    let above = map_at(&dev, &buf, 32, 16, ToDevice);
    expect(&dev, &[]);
    // Overlaps at the end, at the start, and containing.
    assert_eq!(
        try_map(&dev, &buf, 8, 16, FromDevice),
        Err(DmaError::Overlap)
    );
    assert_eq!(
        try_map(&dev, &buf, 20, 4, FromDevice),
        Err(DmaError::Overlap)
    );
    let cpu = buf.at(0).as_ptr().addr();
    let expected = Violation::MapOverlap {
        cpu_addr: cpu + 8,
        len: 16,
        existing: a,
        existing_cpu_addr: cpu + 16,
    };
    let got = dev.take_violations();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0], expected);
    assert!(matches!(got[1], Violation::MapOverlap { existing, .. } if existing == a));
    assert_eq!(dev.live_mappings(), 3);
    assert_eq!(dev.stats().map_failures, 2);
    // After unmapping, the memory can be mapped again.
    for m in [a, below, above] {
        unmap(&dev, m);
    }
    let whole = map(&dev, &buf, Bidirectional);
    unmap(&dev, whole);
    expect(&dev, &[]);
}

#[test]
fn map_of_zero_length() {
    let dev = record();
    let buf = Buf::new(8);
    assert_eq!(
        try_map(&dev, &buf, 0, 0, FromDevice),
        Err(DmaError::InvalidArgument)
    );
    expect(
        &dev,
        &[Violation::InvalidMap {
            cpu_addr: buf.at(0).as_ptr().addr(),
            len: 0,
        }],
    );
    assert_eq!(dev.live_mappings(), 0);
}

#[test]
fn every_call_after_unbind_is_reported() {
    let dev = record();
    let buf = Buf::new(8);
    let m = map(&dev, &buf, Bidirectional);
    unmap(&dev, m);
    dev.on_unbind();
    expect(&dev, &[]);

    assert_eq!(
        try_map(&dev, &buf, 0, 8, FromDevice),
        Err(DmaError::Unbound)
    );
    unmap(&dev, m);
    // SAFETY: the checker touches no memory on unmap.
    unsafe { dev.unmap_batch(&[m]) }.unwrap();
    sync_dev(&dev, m, 0, 8);
    sync_cpu(&dev, m, 0, 8);
    dev.cpu_access(m, 0, 8, CpuAccess::Read);
    let after = |op| Violation::CallAfterUnbind { op };
    assert_eq!(dev.device_write(m.addr, &[1]), Err(after(Op::DeviceWrite)));
    assert_eq!(dev.device_read(m.addr, 1), Err(after(Op::DeviceRead)));
    dev.on_unbind();
    expect(
        &dev,
        &[
            after(Op::Map),
            after(Op::Unmap),
            after(Op::UnmapBatch),
            after(Op::SyncForDevice),
            after(Op::SyncForCpu),
            after(Op::CpuAccess),
            after(Op::DeviceWrite),
            after(Op::DeviceRead),
            after(Op::OnUnbind),
        ],
    );
    let s = dev.stats();
    assert_eq!(s.calls_after_unbind, 9);
    assert_eq!(s.map_failures, 1);
    assert_eq!(s.unmaps, 1, "calls after unbind do nothing");
}

#[test]
fn calls_after_unbind_with_live_mappings_touch_nothing() {
    let dev = record();
    let buf = Buf::new(8);
    let m = map(&dev, &buf, FromDevice);
    dev.device_write(m.addr, &[4; 8]).unwrap();
    dev.on_unbind();
    sync_cpu(&dev, m, 0, 8);
    assert_eq!(buf.read(), vec![0; 8]);
    let v = dev.take_violations();
    assert!(matches!(v[0], Violation::Leak { count: 1, .. }));
    assert_eq!(v[1], Violation::CallAfterUnbind { op: Op::SyncForCpu });
}

#[test]
fn iommu_faults() {
    let dev = record();
    let tx = Buf::new(16);
    let rx = Buf::new(16);
    let tx_m = map(&dev, &tx, ToDevice);
    let rx_m = map(&dev, &rx, FromDevice);
    let fault = |addr, len, access, reason| Violation::IommuFault {
        addr,
        len,
        access,
        reason,
    };
    let expected = [
        fault(DmaAddr(0x42), 4, DeviceAccess::Write, FaultReason::Unmapped),
        fault(
            rx_m.addr.offset(12),
            8,
            DeviceAccess::Write,
            FaultReason::PastEnd {
                mapping: rx_m.addr,
                mapping_len: 16,
            },
        ),
        fault(
            tx_m.addr,
            4,
            DeviceAccess::Write,
            FaultReason::Direction(ToDevice),
        ),
        fault(
            rx_m.addr,
            4,
            DeviceAccess::Read,
            FaultReason::Direction(FromDevice),
        ),
        fault(
            rx_m.addr.offset(16),
            1,
            DeviceAccess::Read,
            FaultReason::Unmapped,
        ),
        fault(
            DmaAddr(u64::MAX - 1),
            4,
            DeviceAccess::Read,
            FaultReason::Unmapped,
        ),
    ];
    assert_eq!(
        dev.device_write(DmaAddr(0x42), &[0; 4]),
        Err(expected[0].clone())
    );
    assert_eq!(
        dev.device_write(rx_m.addr.offset(12), &[0; 8]),
        Err(expected[1].clone())
    );
    assert_eq!(
        dev.device_write(tx_m.addr, &[0; 4]),
        Err(expected[2].clone())
    );
    assert_eq!(dev.device_read(rx_m.addr, 4), Err(expected[3].clone()));
    assert_eq!(
        dev.device_read(rx_m.addr.offset(16), 1),
        Err(expected[4].clone())
    );
    assert_eq!(
        dev.device_read(DmaAddr(u64::MAX - 1), 4),
        Err(expected[5].clone())
    );
    expect(&dev, &expected);
    // Nothing was written by the faulting write.
    unmap(&dev, rx_m);
    // A write after unmap faults too.
    assert_eq!(
        dev.device_write(rx_m.addr, &[1]),
        Err(fault(
            rx_m.addr,
            1,
            DeviceAccess::Write,
            FaultReason::Unmapped
        ))
    );
    assert_eq!(rx.read(), vec![0; 16]);
}

#[test]
fn cpu_read_of_device_data_before_sync_for_cpu() {
    let dev = record();
    let buf = Buf::new(32);
    let m = map(&dev, &buf, FromDevice);
    dev.device_write(m.addr.offset(10), &[1; 4]).unwrap();
    dev.cpu_access(m, 0, 10, CpuAccess::Read);
    expect(&dev, &[]);
    dev.cpu_access(m, 0, 32, CpuAccess::Read);
    expect(
        &dev,
        &[Violation::CpuReadBeforeSync {
            addr: m.addr,
            offset: 0,
            len: 32,
            first_unsynced: 10,
        }],
    );
    sync_cpu(&dev, m, 0, 32);
    dev.cpu_access(m, 0, 32, CpuAccess::Read);
    // A CPU write replaces device data in the CPU's view.
    dev.device_write(m.addr, &[2; 4]).unwrap();
    dev.cpu_access(m, 0, 4, CpuAccess::Write);
    dev.cpu_access(m, 0, 4, CpuAccess::Read);
    expect(&dev, &[]);
}

#[test]
fn device_read_of_cpu_data_before_sync_for_device() {
    let dev = record();
    let buf = Buf::new(16);
    let m = map(&dev, &buf, ToDevice);
    dev.cpu_access(m, 4, 4, CpuAccess::Write);
    buf.write(4, &[9; 4]);
    assert_eq!(dev.device_read(m.addr, 4).unwrap(), vec![0; 4]);
    let v = Violation::DeviceReadBeforeSync {
        addr: m.addr,
        len: 16,
        first_unsynced: m.addr.offset(4),
    };
    assert_eq!(dev.device_read(m.addr, 16), Err(v.clone()));
    expect(&dev, &[v]);
    sync_dev(&dev, m, 0, 16);
    assert_eq!(&dev.device_read(m.addr, 16).unwrap()[4..8], &[9; 4]);
    expect(&dev, &[]);
}

#[test]
fn cpu_access_checks_mapping_and_range() {
    let dev = record();
    let buf = Buf::new(16);
    let m = map(&dev, &buf, FromDevice);
    dev.cpu_access(m, 8, 16, CpuAccess::Read);
    dev.cpu_access(DmaMapping { len: 4, ..m }, 0, 4, CpuAccess::Write);
    unmap(&dev, m);
    dev.cpu_access(m, 0, 4, CpuAccess::Read);
    expect(
        &dev,
        &[
            Violation::OutOfRange {
                op: Op::CpuAccess,
                addr: m.addr,
                mapped_len: 16,
                offset: 8,
                len: 16,
            },
            Violation::MappingLenMismatch {
                op: Op::CpuAccess,
                addr: m.addr,
                mapped_len: 16,
                given_len: 4,
            },
            Violation::NotMapped {
                op: Op::CpuAccess,
                addr: m.addr,
                offset: 0,
                len: 4,
            },
        ],
    );
}

#[test]
fn leak_at_unbind() {
    let dev = record();
    let a = Buf::new(64);
    let b = Buf::new(32);
    let ma = map(&dev, &a, FromDevice);
    let _mb = map(&dev, &b, ToDevice);
    dev.on_unbind();
    let v = dev.take_violations();
    assert_eq!(
        v,
        [Violation::Leak {
            count: 2,
            example: ma,
        }]
    );
    let text = v[0].to_string();
    assert!(
        text.starts_with(
            "device driver has pending DMA allocations while released from device [count=2]"
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!("[device address={}]", ma.addr)),
        "{text}"
    );
    assert!(text.contains("[size=64 bytes]"), "{text}");
    assert!(text.contains("DMA_FROM_DEVICE"), "{text}");
    assert!(dev.is_unbound());
    assert_eq!(dev.live_mapping_list().len(), 2);
    assert_eq!(
        dev.verdict().to_string(),
        "1 violation, 2 live mappings (unbound)"
    );
}

#[test]
fn fail_next_maps_maps_nothing() {
    let dev = CheckingDevice::new(CheckMode::Panic);
    let buf = Buf::new(8);
    dev.fail_next_maps(2);
    assert_eq!(
        try_map(&dev, &buf, 0, 8, FromDevice),
        Err(DmaError::Injected)
    );
    assert_eq!(
        try_map(&dev, &buf, 0, 8, FromDevice),
        Err(DmaError::Injected)
    );
    assert_eq!(dev.live_mappings(), 0);
    let m = map(&dev, &buf, FromDevice);
    unmap(&dev, m);
    let s = dev.stats();
    assert_eq!((s.maps, s.map_failures, s.injected_failures), (1, 2, 2));
    assert!(dev.verdict().is_clean());
}

#[test]
fn fail_maps_every_kth() {
    let dev = CheckingDevice::builder().fail_maps_every(3).build();
    let buf = Buf::new(8);
    let results: Vec<bool> = (0..6)
        .map(|_| match try_map(&dev, &buf, 0, 8, FromDevice) {
            Ok(m) => {
                unmap(&dev, m);
                true
            }
            Err(e) => {
                assert_eq!(e, DmaError::Injected);
                false
            }
        })
        .collect();
    assert_eq!(results, [true, true, false, true, true, false]);
    dev.fail_maps_every(0);
    let m = map(&dev, &buf, FromDevice);
    unmap(&dev, m);
    assert_eq!(dev.stats().injected_failures, 2);
}

#[test]
fn mapping_limit() {
    let dev = CheckingDevice::builder().mapping_limit(1).build();
    let a = Buf::new(8);
    let b = Buf::new(8);
    let m = map(&dev, &a, FromDevice);
    assert_eq!(
        try_map(&dev, &b, 0, 8, FromDevice),
        Err(DmaError::MappingLimit { limit: Some(1) })
    );
    unmap(&dev, m);
    let m = map(&dev, &b, FromDevice);
    unmap(&dev, m);
    dev.assert_clean();
}

#[test]
#[should_panic(expected = "device driver unmaps DMA memory it never mapped")]
fn panic_mode_panics_at_first_violation() {
    let dev = CheckingDevice::new(CheckMode::Panic);
    unmap(
        &dev,
        DmaMapping {
            addr: DmaAddr(IOVA_BASE),
            len: 1,
            direction: ToDevice,
        },
    );
}

#[test]
#[should_panic(expected = "pending DMA allocations while released from device [count=1]")]
fn panic_mode_panics_on_leak() {
    let dev = CheckingDevice::default();
    let buf = Buf::new(8);
    let _m = map(&dev, &buf, FromDevice);
    dev.on_unbind();
}

#[test]
fn panic_mode_records_and_stays_usable() {
    let dev = CheckingDevice::new(CheckMode::Panic);
    let clone = dev.clone();
    let r = std::panic::catch_unwind(move || {
        clone.device_write(DmaAddr(1), &[0]).ok();
    });
    assert!(r.is_err());
    assert_eq!(dev.violations().len(), 1);
    let buf = Buf::new(8);
    let m = map(&dev, &buf, FromDevice);
    unmap(&dev, m);
    assert_eq!(dev.stats().violations, 1);
}

#[test]
fn panic_mode_does_not_panic_while_unwinding() {
    struct UnmapOnDrop(CheckingDevice);
    impl Drop for UnmapOnDrop {
        fn drop(&mut self) {
            let bogus = DmaMapping {
                addr: DmaAddr(IOVA_BASE),
                len: 1,
                direction: ToDevice,
            };
            unmap(&self.0, bogus);
        }
    }
    let dev = CheckingDevice::new(CheckMode::Panic);
    let guard = UnmapOnDrop(dev.clone());
    let r = std::panic::catch_unwind(move || {
        let _guard = guard;
        panic!("first");
    });
    assert_eq!(*r.unwrap_err().downcast::<&str>().unwrap(), "first");
    assert!(matches!(
        dev.violations()[..],
        [Violation::UnmapNotMapped { .. }]
    ));
}

#[test]
#[should_panic(expected = "CheckingDevice found violations")]
fn assert_clean_panics_with_report() {
    let dev = record();
    dev.on_unbind();
    dev.on_unbind();
    dev.assert_clean();
}

#[test]
fn clones_share_one_device() {
    let dev = record();
    let ops: Box<dyn DmaOps> = Box::new(dev.clone());
    let buf = Buf::new(8);
    // SAFETY: `buf` outlives the mapping.
    let addr = unsafe { ops.map(buf.at(0), 8, FromDevice) }.unwrap();
    assert_eq!(dev.live_mappings(), 1);
    dev.device_write(addr, &[1; 8]).unwrap();
    // SAFETY: the checker touches no memory on unmap.
    unsafe {
        ops.unmap(DmaMapping {
            addr,
            len: 8,
            direction: FromDevice,
        })
    }
    .unwrap();
    ops.on_unbind();
    drop(ops);
    assert!(dev.is_unbound());
    assert_eq!(
        dev.verdict().to_string(),
        "0 violations, 0 live mappings (unbound)"
    );
}

#[test]
fn call_delay_slows_every_call() {
    let dev = CheckingDevice::builder()
        .call_delay(Duration::from_millis(2))
        .build();
    let buf = Buf::new(8);
    let start = std::time::Instant::now();
    let m = map(&dev, &buf, FromDevice);
    assert!(start.elapsed() >= Duration::from_millis(4));
    dev.set_call_delay(Duration::ZERO);
    unmap(&dev, m);
    dev.assert_clean();
}

#[test]
fn concurrent_use_from_threads() {
    let dev = CheckingDevice::new(CheckMode::Panic);
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let buf = Buf::new(16);
                for i in 0..4u8 {
                    let m = map(&dev, &buf, FromDevice);
                    dev.device_write(m.addr, &[t * 16 + i; 16]).unwrap();
                    sync_cpu(&dev, m, 0, 16);
                    dev.cpu_access(m, 0, 16, CpuAccess::Read);
                    assert_eq!(buf.read(), vec![t * 16 + i; 16]);
                    unmap(&dev, m);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(dev.stats().maps, 12);
    assert_eq!(dev.verdict().to_string(), "0 violations, 0 live mappings");
}

#[test]
fn report_lists_violations() {
    let dev = CheckingDevice::builder()
        .mode(CheckMode::Record)
        .strict_sync_directions(true)
        .build();
    let buf = Buf::new(8);
    let m = map(&dev, &buf, ToDevice);
    sync_cpu(&dev, m, 0, 8);
    dev.device_write(m.addr, &[0]).ok();
    let report = dev.report();
    assert!(
        report.starts_with("2 violations, 1 live mapping\n"),
        "{report}"
    );
    assert!(
        report.contains("violation 1: device driver calls sync_for_cpu on a DMA_TO_DEVICE mapping"),
        "{report}"
    );
    assert!(
        report.contains("violation 2: IOMMU fault: device write"),
        "{report}"
    );
    assert!(format!("{dev:?}").contains("violations: 2"));
    // Taking keeps the count.
    assert_eq!(dev.take_violations().len(), 2);
    assert!(dev.violations().is_empty());
    assert_eq!(dev.verdict().violations, 2);
}

#[test]
fn every_violation_displays() {
    let m = DmaMapping {
        addr: DmaAddr(IOVA_BASE),
        len: 8,
        direction: FromDevice,
    };
    let all = [
        Violation::InvalidMap {
            cpu_addr: 1,
            len: 0,
        },
        Violation::MapOverlap {
            cpu_addr: 1,
            len: 2,
            existing: m,
            existing_cpu_addr: 0,
        },
        Violation::UnmapInvalidAddress {
            len: 1,
            direction: ToDevice,
        },
        Violation::UnmapNotMapped {
            addr: m.addr,
            len: 1,
            direction: ToDevice,
        },
        Violation::DoubleUnmap {
            addr: m.addr,
            len: 1,
            direction: ToDevice,
        },
        Violation::UnmapSizeMismatch {
            addr: m.addr,
            mapped_len: 1,
            unmap_len: 2,
        },
        Violation::UnmapDirectionMismatch {
            addr: m.addr,
            len: 1,
            mapped: ToDevice,
            unmapped: FromDevice,
        },
        Violation::NotMapped {
            op: Op::SyncForCpu,
            addr: m.addr,
            offset: 0,
            len: 1,
        },
        Violation::OutOfRange {
            op: Op::SyncForDevice,
            addr: m.addr,
            mapped_len: 1,
            offset: 1,
            len: 1,
        },
        Violation::MappingLenMismatch {
            op: Op::CpuAccess,
            addr: m.addr,
            mapped_len: 1,
            given_len: 2,
        },
        Violation::MappingDirectionMismatch {
            op: Op::SyncForCpu,
            addr: m.addr,
            mapped: ToDevice,
            given: FromDevice,
        },
        Violation::SyncDirectionNotAllowed {
            op: Op::SyncForDevice,
            addr: m.addr,
            len: 1,
            direction: FromDevice,
        },
        Violation::CpuReadBeforeSync {
            addr: m.addr,
            offset: 0,
            len: 1,
            first_unsynced: 0,
        },
        Violation::DeviceReadBeforeSync {
            addr: m.addr,
            len: 1,
            first_unsynced: m.addr,
        },
        Violation::IommuFault {
            addr: m.addr,
            len: 1,
            access: DeviceAccess::Read,
            reason: FaultReason::Unmapped,
        },
        Violation::CallAfterUnbind { op: Op::Map },
        Violation::Leak {
            count: 1,
            example: m,
        },
    ];
    for v in &all {
        let text = v.to_string();
        assert!(text.contains("device") || text.starts_with("CPU"), "{text}");
    }
    assert!(all[11].to_string().contains("the device never reads it"));
    assert!(all[6]
        .to_string()
        .contains("[mapped as DMA_TO_DEVICE] [unmapped as DMA_FROM_DEVICE]"));
}

// ---------------------------------------------------------------------------
// The CPU-access check as a `Device` picks it: detected, given, or none.
// ---------------------------------------------------------------------------

/// A test backend that hides a checking device behind a `DmaOps` of its
/// own: `Device::new` cannot see through it.
struct Wrapped(CheckingDevice);

impl DmaOps for Wrapped {
    unsafe fn map(
        &self,
        cpu: NonNull<u8>,
        len: usize,
        direction: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        // SAFETY: forwarded `DmaOps::map` contract.
        unsafe { self.0.map(cpu, len, direction) }
    }
    unsafe fn unmap(&self, mapping: DmaMapping) -> Result<(), UnmapError> {
        // SAFETY: forwarded `DmaOps::unmap` contract.
        unsafe { self.0.unmap(mapping) }
    }
    unsafe fn sync_for_device(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded `DmaOps::sync_for_device` contract.
        unsafe { self.0.sync_for_device(mapping, offset, len) }
    }
    unsafe fn sync_for_cpu(&self, mapping: DmaMapping, offset: usize, len: usize) {
        // SAFETY: forwarded `DmaOps::sync_for_cpu` contract.
        unsafe { self.0.sync_for_cpu(mapping, offset, len) }
    }
    fn on_unbind(&self) {
        self.0.on_unbind()
    }
}

/// One call of a [`LoggedCheck`]: mapping, offset, length, access.
type CheckCall = (DmaMapping, usize, usize, CpuAccess);

/// Holds a [`LoggedCheck`]'s call until the test lets it go on.
struct Blocker {
    /// Told when a call has begun.
    entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    /// The go-ahead.
    go: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

/// A check that logs every call (and then hands it to `inner`, if any),
/// and can be told to block inside the call.
#[derive(Clone, Default)]
struct LoggedCheck {
    inner: Option<CheckingDevice>,
    log: std::sync::Arc<std::sync::Mutex<Vec<CheckCall>>>,
    block: Option<std::sync::Arc<Blocker>>,
}

impl LoggedCheck {
    fn calls(&self) -> Vec<CheckCall> {
        self.log.lock().unwrap().clone()
    }
}

impl CpuAccessCheck for LoggedCheck {
    fn cpu_access(&self, mapping: DmaMapping, offset: usize, len: usize, access: CpuAccess) {
        self.log
            .lock()
            .unwrap()
            .push((mapping, offset, len, access));
        if let Some(block) = &self.block {
            block.entered.lock().unwrap().send(()).unwrap();
            block.go.lock().unwrap().recv().unwrap();
        }
        if let Some(inner) = &self.inner {
            inner.cpu_access(mapping, offset, len, access);
        }
    }
}

/// A `FromDevice` page the device wrote `frame` into, on a fresh pool of
/// `device`.
fn written_page<M: crate::TrackingMode>(
    device: &crate::Device<M>,
    checker: &CheckingDevice,
) -> (crate::PagePool<M>, crate::Page<M>) {
    let mut pool = device
        .pool_builder()
        .direction(FromDevice)
        .cache_size(1)
        .refill_batch(1)
        .build()
        .unwrap();
    let page = pool.alloc().unwrap();
    checker.device_write(page.dma_addr(), b"frame").unwrap();
    (pool, page)
}

fn read_before_sync(addr: DmaAddr, len: usize) -> Violation {
    Violation::CpuReadBeforeSync {
        addr,
        offset: 0,
        len,
        first_unsynced: 0,
    }
}

#[test]
fn device_new_on_a_checking_device_checks_cpu_accesses() {
    let checker = record();
    let device = crate::Device::new(checker.clone());
    let (pool, mut page) = written_page(&device, &checker);
    assert_eq!(&page.as_slice()[..5], [0; 5], "not synced for the CPU yet");
    expect(&checker, &[read_before_sync(page.dma_addr(), 4096)]);
    page.sync_for_cpu(0..5).unwrap();
    assert_eq!(&page.as_slice()[..5], b"frame");
    expect(&checker, &[]);
    assert_eq!(checker.stats().cpu_accesses, 2);
    drop((page, pool));
    device.unbind().unwrap();
    assert_eq!(checker.stats().calls_after_unbind, 0);

    // The untracked device detects it too.
    let checker = record();
    let device = crate::Device::new_untracked(checker.clone());
    let (pool, page) = written_page(&device, &checker);
    let _ = page.as_slice();
    expect(&checker, &[read_before_sync(page.dma_addr(), 4096)]);
    drop((page, pool));
    device.unbind().unwrap();
}

#[test]
fn a_wrapper_gets_the_checks_through_with_cpu_access_check() {
    let checker = record();
    let device = crate::Device::with_cpu_access_check(Wrapped(checker.clone()), checker.clone());
    let (mut pool, page) = written_page(&device, &checker);
    let addr = page.dma_addr();
    let _ = page.as_slice();
    expect(&checker, &[read_before_sync(addr, 4096)]);
    drop(page);

    // Fragments report their own range.
    let frag = pool.alloc_frag(100).unwrap();
    assert_eq!(frag.dma_addr(), addr, "the same page, recycled");
    let _ = frag.as_slice();
    expect(&checker, &[read_before_sync(addr, 100)]);
    assert_eq!(checker.stats().cpu_accesses, 2);
    drop((frag, pool));
    device.unbind().unwrap();
    assert!(checker.is_unbound());
}

#[test]
fn a_device_without_a_check_makes_no_hook_call() {
    let checker = record();
    // The wrapper hides the checking device: no check is detected.
    let device = crate::Device::new(Wrapped(checker.clone()));
    let (mut pool, mut page) = written_page(&device, &checker);
    let _ = page.as_slice();
    page.as_mut_slice()[0] = 1;
    let mut frag = pool.alloc_frag(64).unwrap();
    let _ = frag.as_slice();
    frag.as_mut_slice()[0] = 1;
    assert_eq!(checker.stats().cpu_accesses, 0);
    assert!(
        checker.violations().is_empty(),
        "the unsynced read is not seen"
    );
    drop((page, frag, pool));
    device.unbind().unwrap();
    checker.assert_clean();
}

#[test]
fn a_given_check_replaces_the_detected_one_and_sees_ranges() {
    let checker = record();
    let check = LoggedCheck::default();
    let device = crate::Device::with_cpu_access_check(checker.clone(), check.clone());
    let mut pool = device
        .pool_builder()
        .cache_size(1)
        .refill_batch(1)
        .build()
        .unwrap();
    let mut page = pool.alloc().unwrap();
    let mapping = DmaMapping {
        addr: page.dma_addr(),
        len: 4096,
        direction: page.direction(),
    };
    page.as_mut_slice()[0] = 1;
    let _ = page.as_slice();
    drop(page);
    let a = pool.alloc_frag(1000).unwrap();
    let mut b = pool.alloc_frag(100).unwrap();
    b.as_mut_slice()[0] = 2;
    assert_eq!(
        check.calls(),
        [
            (mapping, 0, 4096, CpuAccess::Write),
            (mapping, 0, 4096, CpuAccess::Read),
            (mapping, b.offset(), 100, CpuAccess::Write),
        ]
    );
    assert_eq!(
        checker.stats().cpu_accesses,
        0,
        "the checker is not the check"
    );

    // Held across unbind: still readable, and the check is not called.
    device.unbind().unwrap();
    let _ = b.as_slice();
    let _ = a.as_slice();
    assert_eq!(check.calls().len(), 3);
    drop((a, b, pool));
    checker.assert_clean();
}

#[test]
fn unbind_waits_for_a_check_in_progress() {
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let checker = record();
    let check = LoggedCheck {
        inner: Some(checker.clone()),
        block: Some(std::sync::Arc::new(Blocker {
            entered: std::sync::Mutex::new(entered_tx),
            go: std::sync::Mutex::new(go_rx),
        })),
        ..LoggedCheck::default()
    };
    let device = std::sync::Arc::new(crate::Device::with_cpu_access_check(
        Wrapped(checker.clone()),
        check,
    ));
    let mut pool = device.pool_builder().build().unwrap();
    let page = pool.alloc().unwrap();
    let reader = std::thread::spawn(move || {
        let _ = page.as_slice();
        page
    });
    entered_rx.recv().unwrap();
    let unbound = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let unbinder = {
        let (device, unbound) = (device.clone(), unbound.clone());
        std::thread::spawn(move || {
            device.unbind().unwrap();
            unbound.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !unbound.load(std::sync::atomic::Ordering::SeqCst),
        "unbind returned while a check was running"
    );
    go_tx.send(()).unwrap();
    let page = reader.join().unwrap();
    unbinder.join().unwrap();
    assert!(unbound.load(std::sync::atomic::Ordering::SeqCst));
    let s = checker.stats();
    assert_eq!((s.cpu_accesses, s.calls_after_unbind), (1, 0));
    drop((page, pool));
    checker.assert_clean();
}
