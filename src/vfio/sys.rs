//! The VFIO kernel ABI this backend uses, written out by hand.
//!
//! Why not `vfio-bindings`: the backend needs eight structures and a dozen
//! ioctl numbers, all of them frozen uAPI (`include/uapi/linux/vfio.h`);
//! copying them here, with size checks below, keeps the dependency list at
//! `libc` alone and lets the whole binding be read in one screen. The calls
//! themselves go through `libc::ioctl`, `libc::pread`/`pwrite` and
//! `libc::mmap`.
//!
//! Every VFIO ioctl is `_IO(';', 100 + n)`: no size or direction bits are
//! encoded, the structure carries its own `argsz` instead.

/// `VFIO_API_VERSION`: the only version there has ever been.
pub(crate) const API_VERSION: i32 = 0;
/// `VFIO_TYPE1v2_IOMMU` (extension and `SET_IOMMU` argument).
pub(crate) const TYPE1V2_IOMMU: libc::c_ulong = 3;
/// `VFIO_DMA_CC_IOMMU`: the extension that says the IOMMU enforces
/// cache-coherent DMA (no-snoop requests are snooped anyway).
pub(crate) const DMA_CC_IOMMU: libc::c_ulong = 4;
/// `VFIO_UNMAP_ALL`: `VFIO_DMA_UNMAP_FLAG_ALL` is supported (Linux 5.13).
pub(crate) const UNMAP_ALL: libc::c_ulong = 9;

const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;

/// `_IO(VFIO_TYPE, VFIO_BASE + nr)`: direction and size bits are zero.
const fn io(nr: u32) -> u32 {
    (VFIO_TYPE << 8) | (VFIO_BASE + nr)
}

pub(crate) const GET_API_VERSION: u32 = io(0);
pub(crate) const CHECK_EXTENSION: u32 = io(1);
pub(crate) const SET_IOMMU: u32 = io(2);
pub(crate) const GROUP_GET_STATUS: u32 = io(3);
pub(crate) const GROUP_SET_CONTAINER: u32 = io(4);
pub(crate) const GROUP_UNSET_CONTAINER: u32 = io(5);
pub(crate) const GROUP_GET_DEVICE_FD: u32 = io(6);
pub(crate) const DEVICE_GET_REGION_INFO: u32 = io(8);
pub(crate) const DEVICE_GET_IRQ_INFO: u32 = io(9);
pub(crate) const DEVICE_SET_IRQS: u32 = io(10);
pub(crate) const DEVICE_RESET: u32 = io(11);
pub(crate) const IOMMU_GET_INFO: u32 = io(12);
pub(crate) const IOMMU_MAP_DMA: u32 = io(13);
pub(crate) const IOMMU_UNMAP_DMA: u32 = io(14);

/// `VFIO_GROUP_FLAGS_VIABLE`.
pub(crate) const GROUP_FLAGS_VIABLE: u32 = 1 << 0;
/// `VFIO_GROUP_FLAGS_CONTAINER_SET`.
pub(crate) const GROUP_FLAGS_CONTAINER_SET: u32 = 1 << 1;

/// `VFIO_IOMMU_INFO_PGSIZES`.
pub(crate) const IOMMU_INFO_PGSIZES: u32 = 1 << 0;
/// `VFIO_IOMMU_INFO_CAPS`.
pub(crate) const IOMMU_INFO_CAPS: u32 = 1 << 1;
/// `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`.
pub(crate) const CAP_IOVA_RANGE: u16 = 1;
/// `VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`.
pub(crate) const CAP_DMA_AVAIL: u16 = 3;

/// `VFIO_DMA_MAP_FLAG_READ`: the device may read the memory.
pub(crate) const DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// `VFIO_DMA_MAP_FLAG_WRITE`: the device may write the memory.
pub(crate) const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;

/// `VFIO_DMA_UNMAP_FLAG_ALL`: unmap every mapping (`iova` and `size` 0).
pub(crate) const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// `MADV_POPULATE_WRITE` (Linux 5.14): fault the range in as if written,
/// breaking copy-on-write and zero-page sharing; not in `libc` yet.
pub(crate) const MADV_POPULATE_WRITE: libc::c_int = 23;

/// `VFIO_REGION_INFO_FLAG_MMAP`.
pub(crate) const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;

/// `VFIO_IRQ_INFO_EVENTFD`: the interrupt can signal an eventfd.
pub(crate) const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// `VFIO_IRQ_SET_DATA_NONE`: no data follows the header.
pub(crate) const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// `VFIO_IRQ_SET_DATA_EVENTFD`: an array of `__s32` eventfds follows.
pub(crate) const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// `VFIO_IRQ_SET_ACTION_TRIGGER`: set (or, with no data and a count of 0,
/// clear) what the interrupt signals.
pub(crate) const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// `struct vfio_group_status`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct GroupStatus {
    pub argsz: u32,
    pub flags: u32,
}

/// `struct vfio_iommu_type1_info` (the fixed part; capabilities follow it
/// in the same buffer, at offsets relative to its start).
#[repr(C)]
#[derive(Default)]
pub(crate) struct Type1Info {
    pub argsz: u32,
    pub flags: u32,
    pub iova_pgsizes: u64,
    pub cap_offset: u32,
    pub pad: u32,
}

/// `struct vfio_info_cap_header`.
pub(crate) const CAP_HEADER_LEN: usize = 8;

/// `struct vfio_iommu_type1_dma_map`.
#[repr(C)]
pub(crate) struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    pub vaddr: u64,
    pub iova: u64,
    pub size: u64,
}

/// `struct vfio_iommu_type1_dma_unmap` (without the flexible `data[]`).
#[repr(C)]
pub(crate) struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// `struct vfio_irq_info`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// `struct vfio_irq_set` (without the flexible `data[]`): the form that
/// clears a trigger (`DATA_NONE`, `count` 0).
#[repr(C)]
pub(crate) struct IrqSet {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

/// `struct vfio_irq_set` with one `__s32` eventfd as its `data[]`.
#[repr(C)]
pub(crate) struct IrqSetEventfd {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
    pub fd: i32,
}

/// `argsz` of a structure: its size, which always fits in `u32`.
pub(crate) const fn argsz<T>() -> u32 {
    core::mem::size_of::<T>() as u32
}

// The layouts must match the kernel's byte for byte.
const _: () = {
    assert!(core::mem::size_of::<GroupStatus>() == 8);
    assert!(core::mem::size_of::<Type1Info>() == 24);
    assert!(core::mem::size_of::<DmaMap>() == 32);
    assert!(core::mem::size_of::<DmaUnmap>() == 24);
    assert!(core::mem::size_of::<RegionInfo>() == 32);
    assert!(core::mem::size_of::<IrqInfo>() == 16);
    // `data[]` starts right after the five `__u32`s: no padding before it.
    assert!(core::mem::size_of::<IrqSet>() == 20);
    assert!(core::mem::size_of::<IrqSetEventfd>() == 24);
    assert!(core::mem::offset_of!(IrqSetEventfd, fd) == 20);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_header() {
        // _IO(';', 100) == 0x3b64.
        assert_eq!(GET_API_VERSION, 0x3b64);
        assert_eq!(GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(IOMMU_GET_INFO, 0x3b70);
        assert_eq!(IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(IOMMU_UNMAP_DMA, 0x3b72);
        assert_eq!(GROUP_UNSET_CONTAINER, 0x3b69);
        assert_eq!(DEVICE_GET_IRQ_INFO, 0x3b6d);
        assert_eq!(DEVICE_SET_IRQS, 0x3b6e);
    }

    #[test]
    fn irq_flags_match_the_header() {
        assert_eq!(IRQ_INFO_EVENTFD, 0x1);
        assert_eq!(IRQ_SET_DATA_NONE, 0x1);
        assert_eq!(IRQ_SET_DATA_EVENTFD, 0x4);
        assert_eq!(IRQ_SET_ACTION_TRIGGER, 0x20);
        // The header's data[] offset, where the eventfd goes.
        assert_eq!(core::mem::offset_of!(IrqSetEventfd, fd), 20);
    }
}
