//! Probing the host outside VFIO: PCI addresses (BDFs) and their IOMMU
//! groups in sysfs, the group number behind an fd (procfs), the
//! `dma_entry_limit` module parameter, and `RLIMIT_MEMLOCK`. The results
//! feed paths to open and the hints in [`VfioError`]s.
//!
//! Invariants: a BDF goes into a path only after [`normalize_bdf`] has
//! accepted it (hex digits, `:` and `.` only), so nothing read here can
//! escape its sysfs directory. Reads are best effort: what cannot be read
//! is `None` or empty, never an error, except where the answer is the
//! error (no such device, no IOMMU group).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use super::error::{VfioError, DMA_ENTRY_LIMIT_PARAM};

/// `0000:00:02.0` from `0000:00:02.0` or `00:02.0`; rejects anything that
/// could escape a sysfs directory.
pub(super) fn normalize_bdf(bdf: &str) -> Result<String, VfioError> {
    let ok = !bdf.is_empty()
        && bdf.len() < 32
        && bdf
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.');
    if !ok {
        return Err(VfioError::NoSuchDevice {
            bdf: bdf.to_owned(),
        });
    }
    Ok(if bdf.matches(':').count() == 1 {
        format!("0000:{bdf}")
    } else {
        bdf.to_owned()
    })
}

/// The group number in a `/dev/vfio/<n>` path.
pub(super) fn group_id_of(path: &Path) -> Option<u32> {
    path.file_name()?.to_str()?.parse().ok()
}

/// The devices sysfs lists in IOMMU group `group`.
pub(super) fn group_devices(group: Option<u32>) -> Vec<String> {
    let Some(group) = group else {
        return Vec::new();
    };
    let dir = format!("/sys/kernel/iommu_groups/{group}/devices");
    let mut devices: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_owned()))
                .collect()
        })
        .unwrap_or_default();
    devices.sort();
    devices
}

/// The soft `RLIMIT_MEMLOCK` in bytes; `None` when unlimited or unreadable.
pub(super) fn memlock_limit() -> Option<u64> {
    let mut rlim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rlim` is a valid, writable `struct rlimit`.
    let ret = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rlim) };
    // `rlim_t` is 32 bits wide on some 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    let cur = rlim.rlim_cur as u64;
    (ret == 0 && rlim.rlim_cur != libc::RLIM_INFINITY).then_some(cur)
}

/// The `dma_entry_limit` module parameter, if the module exposes it.
pub(super) fn entry_limit_param() -> Option<u64> {
    std::fs::read_to_string(DMA_ENTRY_LIMIT_PARAM)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The `/dev/vfio/<group>` node of PCI device `bdf`, through
/// `/sys/bus/pci/devices/<bdf>/iommu_group`.
pub(super) fn group_path_of(bdf: &str) -> Result<PathBuf, VfioError> {
    let bdf = normalize_bdf(bdf)?;
    let dev = PathBuf::from(format!("/sys/bus/pci/devices/{bdf}"));
    if !dev.exists() {
        return Err(VfioError::NoSuchDevice { bdf });
    }
    let link = std::fs::read_link(dev.join("iommu_group"))
        .map_err(|_| VfioError::NoIommuGroup { bdf: bdf.clone() })?;
    let group = link.file_name().ok_or(VfioError::NoIommuGroup { bdf })?;
    Ok(Path::new("/dev/vfio").join(group))
}

/// The group number of an open group fd, from the node it was opened from
/// (`/proc/self/fd/<fd>`).
pub(super) fn group_id_of_fd(group: BorrowedFd<'_>) -> Option<u32> {
    std::fs::read_link(format!("/proc/self/fd/{}", group.as_raw_fd()))
        .ok()
        .and_then(|p| group_id_of(&p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_is_normalised_and_checked() {
        assert_eq!(normalize_bdf("00:02.0").unwrap(), "0000:00:02.0");
        assert_eq!(normalize_bdf("0000:00:02.0").unwrap(), "0000:00:02.0");
        assert!(normalize_bdf("../../etc").is_err());
        assert!(normalize_bdf("").is_err());
    }
}
