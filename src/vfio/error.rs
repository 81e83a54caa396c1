//! [`VfioError`]: what went wrong, and what to do about it.

use core::fmt;
use std::path::PathBuf;

use crate::{DmaError, UnmapError};

/// The default of the `vfio_iommu_type1` module parameter `dma_entry_limit`.
pub const DEFAULT_DMA_ENTRY_LIMIT: u64 = 65535;

/// Where the running kernel exposes `dma_entry_limit`.
pub const DMA_ENTRY_LIMIT_PARAM: &str = "/sys/module/vfio_iommu_type1/parameters/dma_entry_limit";

/// An error from the VFIO backend. Every message says what to do.
///
/// [`DmaOps::map`](crate::DmaOps::map) has to return a [`DmaError`]; the
/// conversion (`From<VfioError> for DmaError`) keeps the kind (entry limit,
/// locked memory, overlap, invalid argument, errno). The explicit methods
/// ([`VfioDma::try_map`](super::VfioDma::try_map) and the constructors)
/// return this richer type.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VfioError {
    /// `/dev/vfio/vfio` does not exist.
    NoVfio {
        /// The path that was tried.
        path: PathBuf,
    },
    /// Opening a VFIO node was refused (`EACCES`/`EPERM`).
    PermissionDenied {
        /// The node.
        path: PathBuf,
    },
    /// The PCI device does not exist.
    NoSuchDevice {
        /// The PCI address asked for.
        bdf: String,
    },
    /// The PCI device has no IOMMU group (the IOMMU is off).
    NoIommuGroup {
        /// The PCI address.
        bdf: String,
    },
    /// `/dev/vfio/<group>` does not exist: the device is not bound to a VFIO
    /// driver.
    GroupNotFound {
        /// The group node.
        path: PathBuf,
    },
    /// The group is already open elsewhere (`EBUSY`).
    GroupBusy {
        /// The group node.
        path: PathBuf,
    },
    /// The group is not viable: some device in it is bound to a host driver.
    GroupNotViable {
        /// The group number, where known.
        group: Option<u32>,
        /// The devices of the group (from sysfs), where known.
        devices: Vec<String>,
    },
    /// `VFIO_GET_API_VERSION` returned something other than 0.
    ApiVersion {
        /// The version the kernel reported.
        found: i32,
    },
    /// The kernel has no TYPE1v2 IOMMU backend.
    NoType1v2,
    /// The container has no `DMA_AVAIL` (or IOVA range) capability; it came
    /// with Linux 5.10.
    Unsupported {
        /// What is missing.
        what: &'static str,
    },
    /// `ENOSPC` from `VFIO_IOMMU_MAP_DMA`: the container's `dma_entry_limit`
    /// is used up.
    MappingLimit {
        /// The limit in force, where known.
        limit: Option<u64>,
    },
    /// `ENOMEM` from `VFIO_IOMMU_MAP_DMA`: pinning would exceed
    /// `RLIMIT_MEMLOCK`.
    LockedMemoryLimit {
        /// Bytes the failed call tried to pin.
        requested: u64,
        /// The soft `RLIMIT_MEMLOCK` in bytes (`None`: unlimited or unknown).
        limit: Option<u64>,
    },
    /// `EEXIST`: the IOVA range is already mapped in this container (by
    /// someone other than this backend's allocator).
    Overlap {
        /// The IOVA asked for.
        iova: u64,
        /// Its size.
        size: u64,
    },
    /// `EINVAL` from the kernel.
    InvalidArgument {
        /// The ioctl.
        op: &'static str,
        /// What was passed, for the report.
        detail: String,
    },
    /// No free block in the IOMMU's valid IOVA ranges is large enough.
    AddressSpaceExhausted {
        /// The size that did not fit.
        size: u64,
    },
    /// `VFIO_IOMMU_UNMAP_DMA` unmapped a different number of bytes than the
    /// mappings it was asked to remove.
    UnmapMismatch {
        /// First IOVA of the request.
        iova: u64,
        /// Bytes asked for.
        expected: u64,
        /// Bytes the kernel reported.
        unmapped: u64,
    },
    /// Memory handed to `map` is not aligned to the IOMMU page, or its
    /// length is not a whole number of them: the IOMMU would map the whole
    /// pages around it and expose the neighbouring memory to the device.
    Unaligned {
        /// The CPU address.
        vaddr: u64,
        /// The length asked for.
        len: u64,
        /// The IOMMU's smallest page.
        iommu_page: u64,
    },
    /// The container already serves another `VfioDma` of this process, or
    /// already holds another group with its IOMMU set: two handles would
    /// pick IOVAs from two allocators in one IOVA space and collide. One
    /// `VfioDma` per container: clone the existing handle, or give the
    /// other group a container of its own.
    ContainerShared {
        /// The group this handle was being set up for, where known.
        group: Option<u32>,
    },
    /// The device has no such region, or it is empty.
    NoSuchRegion {
        /// The region index.
        index: u32,
    },
    /// The device has no such interrupt (index out of range, none of that
    /// kind, or not one that can signal an eventfd).
    NoSuchIrq {
        /// The interrupt index.
        index: u32,
    },
    /// The region cannot be `mmap`ed.
    RegionNotMappable {
        /// The region index.
        index: u32,
    },
    /// An access outside a region.
    OutOfBounds {
        /// The region index.
        index: u32,
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// The region's size.
        size: u64,
    },
    /// Any other failure: the call and its `errno`.
    Os {
        /// The call (for example `"VFIO_GROUP_SET_CONTAINER"`).
        op: &'static str,
        /// The raw `errno`.
        errno: i32,
    },
}

impl VfioError {
    /// The `errno` behind this error, where there is one.
    pub fn errno(&self) -> Option<i32> {
        Some(match self {
            Self::NoVfio { .. } | Self::GroupNotFound { .. } => libc::ENOENT,
            Self::PermissionDenied { .. } => libc::EACCES,
            Self::GroupBusy { .. } => libc::EBUSY,
            Self::MappingLimit { .. } => libc::ENOSPC,
            Self::LockedMemoryLimit { .. } => libc::ENOMEM,
            Self::Overlap { .. } => libc::EEXIST,
            Self::InvalidArgument { .. } => libc::EINVAL,
            Self::Os { errno, .. } => *errno,
            _ => return None,
        })
    }
}

fn human_bytes(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = KIB * KIB;
    if bytes >= MIB {
        let mib = (bytes + MIB / 2) / MIB;
        if bytes % MIB == 0 {
            format!("{mib} MiB")
        } else {
            format!("about {mib} MiB")
        }
    } else if bytes >= KIB && bytes % KIB == 0 {
        format!("{} KiB", bytes / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

impl fmt::Display for VfioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoVfio { path } => write!(
                f,
                "{} does not exist: load VFIO (`modprobe vfio-pci`, which also loads vfio and \
                 vfio_iommu_type1) on a kernel built with CONFIG_VFIO",
                path.display()
            ),
            Self::PermissionDenied { path } => write!(
                f,
                "permission denied opening {}: run as root, or give your user the group node \
                 (chown it, or a udev rule) and a large enough RLIMIT_MEMLOCK",
                path.display()
            ),
            Self::NoSuchDevice { bdf } => write!(
                f,
                "no PCI device {bdf} (/sys/bus/pci/devices/{bdf} is missing): give the full \
                 address, domain included, as `lspci -D` prints it"
            ),
            Self::NoIommuGroup { bdf } => write!(
                f,
                "PCI device {bdf} has no IOMMU group: turn the IOMMU on (boot with \
                 intel_iommu=on or amd_iommu=on, and VT-d/AMD-Vi enabled in the firmware)"
            ),
            Self::GroupNotFound { path } => write!(
                f,
                "{} does not exist: bind the device to vfio-pci (`echo vfio-pci > \
                 /sys/bus/pci/devices/<bdf>/driver_override; echo <bdf> > \
                 /sys/bus/pci/drivers_probe`)",
                path.display()
            ),
            Self::GroupBusy { path } => write!(
                f,
                "{} is busy: another process (or another container of this one) has the group \
                 open; close it there first",
                path.display()
            ),
            Self::GroupNotViable { group, devices } => {
                f.write_str("the IOMMU group")?;
                if let Some(group) = group {
                    write!(f, " {group}")?;
                }
                f.write_str(
                    " is not viable: every device in it must be bound to vfio-pci (or to no \
                     driver); bind all of them",
                )?;
                if !devices.is_empty() {
                    write!(f, " ({})", devices.join(", "))?;
                }
                Ok(())
            }
            Self::ApiVersion { found } => write!(
                f,
                "VFIO API version {found}, expected 0: this kernel's VFIO is not supported"
            ),
            Self::NoType1v2 => f.write_str(
                "the kernel offers no VFIO TYPE1v2 IOMMU: load vfio_iommu_type1 and make sure \
                 the IOMMU is on",
            ),
            Self::Unsupported { what } => {
                write!(
                    f,
                    "this kernel's VFIO lacks {what}: use Linux 5.10 or later"
                )
            }
            Self::MappingLimit { limit } => {
                let n = limit.unwrap_or(DEFAULT_DMA_ENTRY_LIMIT);
                write!(
                    f,
                    "VFIO DMA entry limit reached ({n} mappings{}): every MAP_DMA uses one \
                     entry, so a pool of 4 KiB pages holds at most {} mapped; raise the \
                     vfio_iommu_type1 module parameter dma_entry_limit (`modprobe \
                     vfio_iommu_type1 dma_entry_limit=N`, or write {DMA_ENTRY_LIMIT_PARAM} \
                     before the container is set up), or map fewer, larger chunks (a \
                     region-mapped pool, `PagePoolBuilder::regions`, maps 2 MiB per entry)",
                    if limit.is_some() { "" } else { ", the default" },
                    human_bytes(n.saturating_mul(4096))
                )
            }
            Self::LockedMemoryLimit { requested, limit } => {
                write!(
                    f,
                    "pinning {} more for DMA would exceed RLIMIT_MEMLOCK",
                    human_bytes(*requested)
                )?;
                if let Some(limit) = limit {
                    write!(f, " ({})", human_bytes(*limit))?;
                }
                f.write_str(
                    ": raise it (`ulimit -l`, setrlimit(RLIMIT_MEMLOCK), LimitMEMLOCK= for a \
                     systemd service, memlock in /etc/security/limits.conf) or give the process \
                     CAP_IPC_LOCK",
                )
            }
            Self::Overlap { iova, size } => write!(
                f,
                "IOVA range {iova:#x}+{size:#x} is already mapped in this container: something \
                 else maps into it outside this backend; give each user its own container"
            ),
            Self::InvalidArgument { op, detail } => write!(
                f,
                "{op} rejected its arguments (EINVAL) for {detail}: check alignment to the IOMMU \
                 page size and that the IOVA lies in the container's valid ranges"
            ),
            Self::AddressSpaceExhausted { size } => write!(
                f,
                "no free IOVA block of {} in the IOMMU's valid ranges: unmap something first",
                human_bytes(*size)
            ),
            Self::UnmapMismatch {
                iova,
                expected,
                unmapped,
            } => write!(
                f,
                "VFIO_IOMMU_UNMAP_DMA at {iova:#x} unmapped {unmapped:#x} bytes, expected \
                 {expected:#x}: the container's mappings differ from this backend's records \
                 (was it shared, or a mapping unmapped twice?)"
            ),
            Self::Unaligned {
                vaddr,
                len,
                iommu_page,
            } => write!(
                f,
                "refusing to map {len:#x} bytes at {vaddr:#x}: not aligned to the IOMMU's \
                 {iommu_page:#x}-byte page (or not a whole number of them), so the device would \
                 reach the memory around it; allocate buffers aligned to VfioDma::page_size"
            ),
            Self::ContainerShared { group } => {
                f.write_str("the VFIO container")?;
                if let Some(group) = group {
                    write!(f, " of group {group}")?;
                }
                f.write_str(
                    " is already in use by another VfioDma of this process (or holds another \
                     group with its IOMMU set): one IOVA space needs one allocator, so clone \
                     the existing VfioDma instead, or open the other group in a container of \
                     its own",
                )
            }
            Self::NoSuchRegion { index } => {
                write!(f, "the device has no region {index} (or it is empty)")
            }
            Self::NoSuchIrq { index } => write!(
                f,
                "the device has no interrupt {index} that can signal an eventfd (the device \
                 request is index 4, the error interrupt index 3 on PCI Express devices only)"
            ),
            Self::RegionNotMappable { index } => write!(
                f,
                "region {index} does not support mmap: use read_region/write_region instead"
            ),
            Self::OutOfBounds {
                index,
                offset,
                len,
                size,
            } => write!(
                f,
                "access of {len} bytes at {offset:#x} is outside region {index} ({size:#x} bytes)"
            ),
            Self::Os { op, errno } => write!(
                f,
                "{op} failed: {} (errno {errno})",
                std::io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

impl std::error::Error for VfioError {}

impl From<VfioError> for UnmapError {
    fn from(error: VfioError) -> Self {
        match error {
            VfioError::UnmapMismatch {
                expected, unmapped, ..
            } => UnmapError::Incomplete { expected, unmapped },
            VfioError::Os { op, errno } => UnmapError::Os { op, errno },
            VfioError::InvalidArgument { op, .. } => UnmapError::Os {
                op,
                errno: libc::EINVAL,
            },
            other => UnmapError::Os {
                op: "VFIO_IOMMU_UNMAP_DMA",
                errno: other.errno().unwrap_or(libc::EIO),
            },
        }
    }
}

impl From<VfioError> for DmaError {
    fn from(error: VfioError) -> Self {
        match error {
            VfioError::MappingLimit { limit } => DmaError::MappingLimit { limit },
            VfioError::LockedMemoryLimit { .. } => DmaError::LockedMemoryLimit,
            VfioError::Overlap { .. } => DmaError::Overlap,
            VfioError::InvalidArgument { .. } => DmaError::InvalidArgument,
            VfioError::AddressSpaceExhausted { .. } => DmaError::AddressSpaceExhausted,
            VfioError::Unaligned { iommu_page, .. } => DmaError::Unaligned {
                iommu_page: usize::try_from(iommu_page).unwrap_or(usize::MAX),
            },
            VfioError::Os { op, errno } => DmaError::Os { op, errno },
            other => DmaError::Os {
                op: "VFIO",
                errno: other.errno().unwrap_or(libc::EIO),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        let e = VfioError::MappingLimit { limit: None };
        let s = e.to_string();
        assert!(
            s.contains("65535") && s.contains("256 MiB") && s.contains("dma_entry_limit"),
            "{s}"
        );
        let e = VfioError::LockedMemoryLimit {
            requested: 4096,
            limit: Some(65536),
        };
        let s = e.to_string();
        assert!(
            s.contains("ulimit -l") && s.contains("CAP_IPC_LOCK") && s.contains("64 KiB"),
            "{s}"
        );
        let e = VfioError::GroupNotViable {
            group: Some(7),
            devices: vec!["0000:01:00.1".into()],
        };
        assert!(e.to_string().contains("0000:01:00.1"));
    }

    #[test]
    fn unaligned_and_shared_say_what_to_do() {
        let e = VfioError::Unaligned {
            vaddr: 0x1000,
            len: 0x1000,
            iommu_page: 0x10000,
        };
        assert!(e.to_string().contains("page_size"), "{e}");
        assert_eq!(
            DmaError::from(e),
            DmaError::Unaligned {
                iommu_page: 0x10000
            }
        );
        let e = VfioError::ContainerShared { group: Some(3) };
        assert!(e.to_string().contains("clone"), "{e}");
        let e = VfioError::NoSuchIrq { index: 4 };
        assert!(e.to_string().contains("index 4"), "{e}");
        assert_eq!(e.errno(), None);
    }

    #[test]
    fn a_short_unmap_converts_to_incomplete() {
        assert_eq!(
            UnmapError::from(VfioError::UnmapMismatch {
                iova: 0x1000,
                expected: 0x1000,
                unmapped: 0
            }),
            UnmapError::Incomplete {
                expected: 0x1000,
                unmapped: 0
            }
        );
        assert_eq!(
            UnmapError::from(VfioError::InvalidArgument {
                op: "VFIO_IOMMU_UNMAP_DMA",
                detail: String::new()
            }),
            UnmapError::Os {
                op: "VFIO_IOMMU_UNMAP_DMA",
                errno: libc::EINVAL
            }
        );
    }

    #[test]
    fn converts_to_dma_error_by_kind() {
        assert_eq!(
            DmaError::from(VfioError::MappingLimit { limit: Some(64) }),
            DmaError::MappingLimit { limit: Some(64) }
        );
        assert_eq!(
            DmaError::from(VfioError::LockedMemoryLimit {
                requested: 1,
                limit: None
            }),
            DmaError::LockedMemoryLimit
        );
        assert_eq!(
            DmaError::from(VfioError::Overlap { iova: 0, size: 1 }),
            DmaError::Overlap
        );
        assert_eq!(
            DmaError::from(VfioError::InvalidArgument {
                op: "x",
                detail: String::new()
            }),
            DmaError::InvalidArgument
        );
        assert_eq!(
            DmaError::from(VfioError::Os {
                op: "VFIO_IOMMU_MAP_DMA",
                errno: libc::EFAULT
            }),
            DmaError::Os {
                op: "VFIO_IOMMU_MAP_DMA",
                errno: libc::EFAULT
            }
        );
    }
}
