//! The system calls under the backend: opening the VFIO nodes
//! ([`open_node`]), `ioctl` with a pointer ([`ioctl_ptr`]) or an integer
//! ([`ioctl_val`]) argument, and `errno`; plus [`Counters`], the
//! container's call counters they bump.
//!
//! Invariants: every ioctl this backend issues, on the container, group or
//! device fd, goes through `ioctl_ptr` or `ioctl_val` and is counted once in
//! [`VfioStats::ioctls`](super::VfioStats::ioctls); a failure comes back as
//! the raw `errno`, for the caller to turn into the [`VfioError`] that says
//! what to do. Nodes are opened read-write and close-on-exec, and their fds
//! are owned ([`OwnedFd`]) from the moment `open` returns.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::error::VfioError;
use crate::sync::{AtomicU64, Ordering};

/// The container's call counters, shared by every handle and device of
/// it; [`VfioDma::stats`](super::VfioDma::stats) snapshots them.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) ioctls: AtomicU64,
    pub(super) map_calls: AtomicU64,
    pub(super) map_failures: AtomicU64,
    pub(super) unmap_calls: AtomicU64,
    pub(super) unmapped: AtomicU64,
    pub(super) unmap_errors: AtomicU64,
    pub(super) live_mappings: AtomicU64,
    pub(super) live_bytes: AtomicU64,
}

/// The calling thread's `errno`.
pub(super) fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Issues `ioctl(fd, req, arg)` with a pointer argument, counting it.
///
/// # Safety
/// `arg` points to a live, properly initialised value of the type `req`
/// expects, writable if the kernel writes it back.
pub(super) unsafe fn ioctl_ptr<T>(
    counters: &Counters,
    fd: BorrowedFd<'_>,
    req: u32,
    arg: *mut T,
) -> Result<i32, i32> {
    counters.ioctls.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the caller guarantees `arg` matches `req`; `fd` is open for the
    // duration of the borrow.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

/// Issues `ioctl(fd, req, value)` with an integer argument, counting it.
pub(super) fn ioctl_val(
    counters: &Counters,
    fd: BorrowedFd<'_>,
    req: u32,
    value: libc::c_ulong,
) -> Result<i32, i32> {
    counters.ioctls.fetch_add(1, Ordering::Relaxed);
    // SAFETY: every integer-argument VFIO ioctl used here (GET_API_VERSION,
    // CHECK_EXTENSION, SET_IOMMU, GROUP_UNSET_CONTAINER, DEVICE_RESET) reads
    // no user memory; `fd` is open for the duration of the borrow.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, value) };
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

/// Opens a VFIO node read-write, close-on-exec.
pub(super) fn open_node(path: &Path, is_container: bool) -> Result<OwnedFd, VfioError> {
    let cpath = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VfioError::InvalidArgument {
            op: "open",
            detail: format!("path {}", path.display()),
        }
    })?;
    // SAFETY: `cpath` is a valid NUL-terminated string for the call.
    let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        let path = path.to_path_buf();
        return Err(match errno() {
            libc::ENOENT | libc::ENODEV | libc::ENXIO if is_container => VfioError::NoVfio { path },
            libc::ENOENT | libc::ENODEV | libc::ENXIO => VfioError::GroupNotFound { path },
            libc::EACCES | libc::EPERM => VfioError::PermissionDenied { path },
            libc::EBUSY => VfioError::GroupBusy { path },
            errno => VfioError::Os { op: "open", errno },
        });
    }
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
