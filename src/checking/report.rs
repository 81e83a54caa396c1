//! What a [`CheckingDevice`] tells about itself: the counters
//! ([`CheckingStats`]), the live mappings ([`LiveMapping`]), the one-line
//! [`Verdict`], and the text of [`CheckingDevice::report`] (which
//! [`CheckingDevice::assert_clean`] panics with).
//!
//! Invariants: all of these are snapshots, copied out under the device's
//! lock, never views into it. The violation count only grows:
//! [`CheckingStats::violations`] and [`Verdict::violations`] count every
//! violation ever detected, including those beyond
//! [`MAX_RECORDED_VIOLATIONS`] and those removed with
//! [`CheckingDevice::take_violations`], so a verdict is clean only if no
//! violation was ever detected. The report lists the recorded violations in
//! detection order and says how many more were not kept.

use core::fmt;

use super::violation::Violation;

#[cfg(doc)]
use super::{CheckingDevice, MAX_RECORDED_VIOLATIONS};
use crate::dma::DmaMapping;

/// Counters of a [`CheckingDevice`], from [`CheckingDevice::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckingStats {
    /// Successful maps.
    pub maps: u64,
    /// Maps that returned an error (injected, refused or after unbind).
    pub map_failures: u64,
    /// Of `map_failures`, those injected on purpose.
    pub injected_failures: u64,
    /// Unmaps failed on purpose
    /// ([`CheckingDevice::fail_next_unmaps`](super::CheckingDevice::fail_next_unmaps)):
    /// those mappings stayed live.
    pub injected_unmap_failures: u64,
    /// Mappings named for unmapping while bound (each `unmap` call and each
    /// element of an `unmap_batch`), including bad ones.
    pub unmaps: u64,
    /// `unmap_batch` calls while bound.
    pub batch_unmaps: u64,
    /// `sync_for_device` calls while bound.
    pub syncs_for_device: u64,
    /// `sync_for_cpu` calls while bound.
    pub syncs_for_cpu: u64,
    /// `cpu_access` calls while bound.
    pub cpu_accesses: u64,
    /// `device_write` calls while bound.
    pub device_writes: u64,
    /// `device_read` calls while bound.
    pub device_reads: u64,
    /// Calls of any kind after `on_unbind`.
    pub calls_after_unbind: u64,
    /// Violations detected (including any beyond
    /// [`MAX_RECORDED_VIOLATIONS`] that were not kept).
    pub violations: u64,
    /// The most mappings live at once.
    pub peak_live_mappings: u64,
}

/// One live mapping, from [`CheckingDevice::live_mapping_list`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LiveMapping {
    /// The mapping as `map` returned it.
    pub mapping: DmaMapping,
    /// Address of its CPU memory.
    pub cpu_addr: usize,
    /// Bytes the device wrote that were not yet synced for the CPU.
    pub unsynced_device_bytes: usize,
}

/// A one-line summary of a [`CheckingDevice`], from
/// [`CheckingDevice::verdict`]; `Display` gives e.g.
/// `"0 violations, 0 live mappings"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verdict {
    /// Violations detected so far.
    pub violations: u64,
    /// Mappings live now.
    pub live_mappings: usize,
    /// Whether `on_unbind` was called.
    pub unbound: bool,
}

impl Verdict {
    /// No violation was detected. (Live mappings before unbind are normal;
    /// live mappings at unbind are a [`Violation::Leak`].)
    pub fn is_clean(&self) -> bool {
        self.violations == 0
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = if self.violations == 1 { "" } else { "s" };
        let m = if self.live_mappings == 1 { "" } else { "s" };
        write!(
            f,
            "{} violation{v}, {} live mapping{m}",
            self.violations, self.live_mappings
        )?;
        if self.unbound {
            f.write_str(" (unbound)")?;
        }
        Ok(())
    }
}

/// The text of [`CheckingDevice::report`]: the verdict, the counters, and
/// every recorded violation.
pub(super) fn render(verdict: Verdict, s: &CheckingStats, violations: &[Violation]) -> String {
    use fmt::Write as _;
    let mut out = format!("{verdict}\n");
    let _ = writeln!(
        out,
        "maps={} map_failures={} (injected {}) unmaps={} batch_unmaps={} \
         syncs_for_device={} syncs_for_cpu={} cpu_accesses={} device_writes={} \
         device_reads={} calls_after_unbind={} peak_live_mappings={}",
        s.maps,
        s.map_failures,
        s.injected_failures,
        s.unmaps,
        s.batch_unmaps,
        s.syncs_for_device,
        s.syncs_for_cpu,
        s.cpu_accesses,
        s.device_writes,
        s.device_reads,
        s.calls_after_unbind,
        s.peak_live_mappings
    );
    for (i, v) in violations.iter().enumerate() {
        let _ = writeln!(out, "violation {}: {v}", i + 1);
    }
    let kept = violations.len() as u64;
    if s.violations > kept {
        let _ = writeln!(out, "({} more violations not listed)", s.violations - kept);
    }
    out
}
